"""The interaction log: one JSON line per finished request, written off the request path.

Owns turning a `Record` into a line (one `orjson.dumps`), the queue, and
the one writer that appends lines to a file or to stdout. It does not decide what a record
holds (`relay`) nor when the log opens and closes (the app's cleanup context).

Why a thread fed by a `SimpleQueue`, and not an asyncio task or `logging.QueueHandler`:
a write to a file or a pipe can block, and on the event loop it would stall every request,
so the writer gets its own thread. `write` costs the request path a small dict and an
append (about a microsecond); decoding bodies, formatting and encoding all happen on the
writer thread. `QueueHandler.prepare` would format on the caller's thread, that is, on the
request path. The snapshots wait on the loop for up to HAND_OVER_SECONDS and go to the
writer together, in one `SimpleQueue.put`: each wake-up of the writer costs its GIL hand-overs
(futex calls, context switches on the loop's core) whatever the batch holds, so it wakes ten
times a second, not per line (at 10 ms: 1.8 futex calls a request at concurrency 1, at 0.1 s:
0.5; under load the writer's CPU went from ~9 to ~5 us a request). The price: a process
killed outright (SIGKILL, OOM) loses up to its last 0.1 s of lines; SIGTERM writes them all
(`close`). The writer formats BATCH_LINES lines at a time and writes them, which lets go of
the GIL: the loop waits for at most that many lines' formatting.

Invariants:
- Lines go out as one write of whole lines (one, or a batch that queued up meanwhile)
  through `logfile.LogFile`: O_APPEND (a file) or a lock (stdout), so worker processes
  sharing one log never interleave lines; a write that fails part-way is cut back to whole
  lines; the file follows its path through logrotate and a removal (`reopen`, SIGHUP).
- The queue is bounded (`max_lines`, and `max_bytes` of bodies with LOG_BODIES): a sink
  that stops taking lines (a log collector that does not read stdout) costs the process
  that much memory at most. Lines beyond it are dropped, counted (`on_dropped`), and said
  once per episode. Bodies the byte bound has no room for (a healthy sink, and large
  prompts together, or one long stream's text) do not cost their line: it goes without
  them (said once), so only a sink that stops taking lines loses any.
- `close` writes every line queued before it, then closes the file. It is bounded: after
  `timeout_seconds` it says how many lines were left and returns; the writer is left to
  its stuck write (a daemon thread: it does not hold the process).

With LOG_BODIES, bodies are logged as JSON values when they parse (request and response
alike), else as text; a multipart upload as its form's fields, other bytes that are no
text as a placeholder (`bodies`); every real key of the keys file is replaced by
`[redacted]` in them first, so a provider that echoes its key back (in an error message, say) does not put it
in the log. A virtual key of the file written in a body (the client's own, another user's)
is masked there when it stands as a word of its own, between spaces, quotes, brackets or
punctuation (`key=<key>&`, `<key>.`): each word of 8 characters or more is looked up in the
key ring. A key glued to other letters, or holding one of those marks (`.`, `:`, `=`, ...),
is not found that way. Credentials a JSON body hands the provider for a third party (a
remote MCP server's: Anthropic's `authorization_token`, the `authorization` and `headers` of
OpenAI's MCP tool) are `[redacted]` too: a string under a field so named
(`bodies.CREDENTIALS`), at any depth, and a form's field so named.

A write that fails at run time (disk full, file removed under a read-only mount, a closed
pipe) drops that line, calls `on_write_error` (the app counts it in a metric), says the
first failure of an episode as one warning without a traceback, and keeps going: serving requests comes
before logging them, and the metric shows every line lost after the first report. What the
logbook says goes through Python logging (in a gateway process: the non-blocking
`notices`), never a blocking print on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Collection
from queue import SimpleQueue
from typing import Any, NamedTuple

import orjson

from proxy.observe.bodies import logged_request, logged_text
from proxy.observe.logfile import LogFile, PartlyWritten, file_mode
from proxy.record import REDACTED, Record, dollars

log = logging.getLogger("llm_gateway")

BATCH_LINES = 64  # at most this many lines in one write
# Lines wait on the loop at most this long before the writer takes them, all at once.
HAND_OVER_SECONDS = 0.1
# A sink that stops taking lines holds at most this many, and this many bytes of bodies.
MAX_QUEUED_LINES = 10_000
MAX_QUEUED_BYTES = 32 * 1024 * 1024
CLOSE_POLL_SECONDS = 0.01
# A logged body's words, for the virtual keys among them: a JSON escape (`\n`, `\u0041`)
# ends a word, as do spaces, quotes, brackets and punctuation (`key=<key>`, `<key>.`).
_ESCAPE = re.compile(r"\\(?:u[0-9a-fA-F]{4}|.)")
_BETWEEN_WORDS = str.maketrans(dict.fromkeys("\t\n\r\f\v\"'`<>(){}[],;:=&|.!?", " "))
_LONG_WORD = re.compile(r" ([^ ]{8,})")  # shorter words are no key a key ring masks
# NEL, U+2028 and U+2029 as UTF-8: legal raw in a JSON string, and so written by orjson, but
# a line break to Node's readline and Python's str.splitlines(), which would cut the line in
# two halves that do not parse. Each sequence is that character alone in UTF-8 (C2 and E2
# only ever lead one), so it can be swapped for its JSON escape without decoding.
_UNICODE_BREAKS = (
    (b"\xc2\x85", b"\\u0085"),
    (b"\xe2\x80\xa8", b"\\u2028"),
    (b"\xe2\x80\xa9", b"\\u2029"),
)


def rfc3339(timestamp: float) -> str:
    """A Unix time as RFC 3339 UTC with milliseconds: 2026-11-23T17:27:32.123Z."""
    millis = int(timestamp * 1000)
    seconds, millis = divmod(millis, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class Logbook:
    """Appends one JSON line per record to `path`, or to stdout when `path` is None."""

    def __init__(
        self,
        path: str | None,
        log_bodies: bool,
        on_write_error: Callable[[], None],
        secrets: Callable[[], Collection[str]] = tuple,
        keys_in: Callable[[list[str]], list[tuple[str, str]]] = lambda words: [],
        on_dropped: Callable[[], None] = lambda: None,
        max_lines: int = MAX_QUEUED_LINES,
        max_bytes: int = MAX_QUEUED_BYTES,
    ) -> None:
        self._log_bodies = log_bodies
        # The real keys to keep out of logged bodies; asked per line, so a reloaded
        # keys file counts at once. Called on the writer thread.
        self._secrets = secrets
        # Which of some words are virtual keys of the file, each with its mask (`KeyRing.
        # secrets_in`). Called on the writer thread.
        self._keys_in = keys_in
        self._redaction: tuple[Collection[str], re.Pattern[str] | None] = ((), None)
        # Called on the writer thread, once per lost line: it must be thread-safe.
        self._on_write_error = on_write_error
        self._on_dropped = on_dropped  # on the loop, once per line the full queue refused
        self._max_lines, self._max_bytes = max_lines, max_bytes
        # Snapshots not yet handed to the writer, and the timer that will hand them over.
        self._pending: list[dict[str, Any]] = []
        self._pending_bytes = 0
        self._hand_over_timer: asyncio.TimerHandle | None = None
        # Batches of snapshots; None is queued by `close` after the last one: the writer
        # stops when it takes it.
        self._queue: SimpleQueue[_Batch | None] = SimpleQueue()
        # Lines (and body bytes) handed over, counted on the loop, and done with, on the
        # writer thread: each counter has one writer, so the difference is what the queue
        # holds, without a lock.
        self._handed = self._handed_bytes = 0
        self._done = self._done_bytes = 0
        self._is_dropping = False
        self._has_left_out_bodies = False  # said once: a line went without its bodies
        # The writer thread's alone, but for `reopen`.
        self._file = LogFile(path, file_mode(log_bodies))
        self._thread: threading.Thread | None = None
        self._is_closed = False
        self._has_complained = False
        # The writer's last second as RFC 3339 text: the lines of one second share it.
        self._second, self._second_text = -1, ""

    def open(self) -> None:
        """Open the file for appending and start the writer; OSError if it cannot be opened."""
        self._file.open()
        self._thread = threading.Thread(target=self._drain, name="logbook", daemon=True)
        self._thread.start()

    def reopen(self) -> None:
        """Ask the writer to open the path again before its next line (SIGHUP: rotated)."""
        self._file.reopen()

    def write(self, record: Record) -> None:
        """Hand the record's line to the writer; never blocks, never raises."""
        if self._is_closed:
            self._lose(f"line for request {record.request_id} came after close")
            return
        if self._is_full():
            self._drop()
            return
        size = _body_bytes(record) if self._log_bodies else 0
        has_bodies = size == 0 or self._has_room(size)
        if not has_bodies:
            self._leave_out_bodies(size)
            size = 0
        # A snapshot of plain values: the writer must not see later changes to the record.
        fields: dict[str, Any] = {
            "timestamp": record.timestamp,
            "request_id": record.request_id,
            "key": record.key,
            "team": record.team,
            "provider": record.provider,
            "method": record.method,
            "path": record.path,
            "model": record.model,
            "stream": record.is_stream,
            "status": record.status,
            "duration_ms": record.duration_ms,
            "ttft_ms": record.ttft_ms,
            "usage": record.usage,
            "cost_usd": record.cost_usd,
            "cache": record.cache,
        }
        if record.error is not None:
            fields["error"] = record.error
        if record.provider_request_id is not None:
            fields["provider_request_id"] = record.provider_request_id
        if record.websocket is not None:
            fields["websocket"] = record.websocket
        if record.attempts:
            fields["target"] = record.member  # a pool's key by its label: "openai#2"
            fields["attempts"] = [attempt.as_dict() for attempt in record.attempts]
        if self._log_bodies:
            fields["request"] = record.request_body if has_bodies else None
            fields["response"] = record.response_text if has_bodies else None
            fields["hidden"] = record.hidden
            fields["request_type"] = record.request_type
        self._pending.append(fields)
        self._pending_bytes += size
        if self._hand_over_timer is None:
            loop = asyncio.get_running_loop()
            self._hand_over_timer = loop.call_later(HAND_OVER_SECONDS, self._hand_over)

    def audit(self, action: dict[str, Any]) -> None:
        """A line for a change made through the admin API: who, what, never a secret."""
        if self._is_closed or self._is_full():
            self._drop()
            return
        self._pending.append({"timestamp": time.time(), "audit": action})
        if self._hand_over_timer is None:
            loop = asyncio.get_running_loop()
            self._hand_over_timer = loop.call_later(HAND_OVER_SECONDS, self._hand_over)

    @property
    def queued(self) -> tuple[int, int]:
        """Lines, and their body bytes, not yet written (waiting on the loop or the writer)."""
        lines = self._handed - self._done + len(self._pending)
        return lines, self._handed_bytes - self._done_bytes + self._pending_bytes

    def _is_full(self) -> bool:
        # `queued`, inline: asked for every line.
        lines = self._handed - self._done + len(self._pending)
        if lines >= self._max_lines:
            return True
        if self._is_dropping and lines < self._max_lines // 2:
            self._is_dropping = False  # the sink caught up: a next episode is said again
        return False

    def _has_room(self, size: int) -> bool:
        """Bodies of `size` bytes fit beside those queued."""
        size_queued = self._handed_bytes - self._done_bytes + self._pending_bytes
        return size_queued + size <= self._max_bytes

    def _leave_out_bodies(self, size: int) -> None:
        """A line whose bodies the byte bound has no room for goes without them; said once."""
        if not self._has_left_out_bodies:
            self._has_left_out_bodies = True
            log.warning(
                "logbook: a line's bodies (%.1f MiB) do not fit in the %.0f MiB the log holds "
                "for bodies waiting to be written; it and others like it are written without "
                "their bodies",
                size / 2**20,
                self._max_bytes / 2**20,
            )

    def _drop(self) -> None:
        """A line the full queue has no room for: counted; the first of an episode said."""
        if not self._is_dropping:
            self._is_dropping = True
            lines, size = self.queued
            log.warning(
                "logbook: %d lines (%d MB of bodies) wait for %s, which is not taking them; "
                "further lines are dropped and counted in llm_gateway_log_lines_dropped_total",
                lines,
                size // 1_000_000,
                self._file.name,
            )
        self._on_dropped()

    def _hand_over(self) -> None:
        """Give the writer every snapshot waiting on the loop, in one put."""
        self._hand_over_timer = None
        if self._pending:
            self._handed += len(self._pending)
            self._handed_bytes += self._pending_bytes
            self._queue.put(_Batch(self._pending, self._pending_bytes))
            self._pending, self._pending_bytes = [], 0

    async def close(
        self, timeout_seconds: float = 10.0, stall_seconds: float | None = None
    ) -> None:
        """Write every queued line, then close the file; give up after timeout_seconds, or
        once the sink has taken no line for stall_seconds (a stuck sink, not a slow one)."""
        if self._is_closed:
            return
        self._is_closed = True
        if self._hand_over_timer is not None:
            self._hand_over_timer.cancel()
        self._hand_over()
        thread = self._thread
        if thread is None:
            return
        self._queue.put(None)
        # Polled, not joined in an executor thread: a stuck writer must not leave behind a
        # thread that the interpreter waits for at exit.
        started = now = time.monotonic()
        deadline, stalled_at = started + timeout_seconds, now + (stall_seconds or timeout_seconds)
        done = self._done
        try:
            while thread.is_alive() and now < min(deadline, stalled_at):
                await asyncio.sleep(CLOSE_POLL_SECONDS)
                now = time.monotonic()
                if self._done != done and stall_seconds is not None:  # the sink took lines
                    done, stalled_at = self._done, now + stall_seconds
        finally:  # cancelled too (the shutdown's margin ran out): say what is left
            if thread.is_alive():
                # The writer is stuck in a write (a full pipe, a hung disk): leave it the fd.
                log.warning(
                    "logbook: %d lines not written to %s after %.1f s",
                    self._handed - self._done,
                    self._file.name,
                    time.monotonic() - started,
                )
        if not thread.is_alive():
            self._file.close()

    def _drain(self) -> None:
        """The writer thread: format and append lines until `close` queues None.

        A batch goes out in writes of up to BATCH_LINES whole lines, so O_APPEND still
        keeps them whole: one wake-up per batch, not per line.
        """
        while (batch := self._queue.get()) is not None:
            for start in range(0, len(batch.snapshots), BATCH_LINES):
                self._write_lines(batch.snapshots[start : start + BATCH_LINES])
            self._done_bytes += batch.size

    def _write_lines(self, snapshots: list[dict[str, Any]]) -> None:
        lines = []
        for fields in snapshots:
            try:
                lines.append(self._line(fields))
            except (TypeError, ValueError) as error:
                self._lose(f"cannot format line: {error}")
        try:
            if lines:
                self._file.append(b"".join(lines))
                if self._has_complained:  # the sink took lines again: a next failure is said
                    self._has_complained = False
                    log.warning("logbook: lines reach %s again", self._file.name)
        except PartlyWritten as failure:
            for _ in range(len(lines) - failure.whole_lines):
                self._lose(f"cannot write to {self._file.name}: {failure.reason}")
        finally:
            self._done += len(snapshots)

    def _line(self, fields: dict[str, Any]) -> bytes:
        """The JSON line for one snapshot, newline included."""
        fields["timestamp"] = self._rfc3339(fields["timestamp"])
        if "audit" in fields:
            return _escaped_breaks(orjson.dumps(fields, option=orjson.OPT_APPEND_NEWLINE))
        if fields["duration_ms"] is not None:
            fields["duration_ms"] = round(fields["duration_ms"], 1)
        if fields["ttft_ms"] is not None:
            fields["ttft_ms"] = round(fields["ttft_ms"], 1)
        if fields["usage"] is not None:
            fields["usage"] = fields["usage"].as_dict()
        if fields["cost_usd"] is not None:
            fields["cost_usd"] = orjson.Fragment(_json_dollars(fields["cost_usd"]))
        if self._log_bodies:
            redact = self._redactor(fields.pop("hidden"))
            fields["request"] = logged_request(
                fields["request"], fields.pop("request_type"), redact
            )
            fields["response"] = logged_text(fields["response"], redact)
        # The line is a dict of plain values: orjson writes it as python-json-logger's
        # OrjsonFormatter did (same bytes), without a LogRecord per line: 1 us, not 17 us,
        # on a thread that competes with the event loop for the GIL.
        return _escaped_breaks(orjson.dumps(fields, option=orjson.OPT_APPEND_NEWLINE))

    def _rfc3339(self, timestamp: float) -> str:
        """`rfc3339(timestamp)`, formatting each second once (gmtime and strftime: 1 us)."""
        seconds, millis = divmod(int(timestamp * 1000), 1000)
        if seconds != self._second:
            self._second = seconds
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        return f"{self._second_text}.{millis:03d}Z"

    def _redactor(self, hidden: tuple[str, str] | None) -> Callable[[str], str]:
        """Text → text without any real key (the pattern is compiled once per set of keys),
        with the client's own virtual key, when the record hides one, as its mask, and any
        other virtual key of the file written as a word of its own masked."""
        secrets = self._secrets()
        if secrets is not self._redaction[0]:
            # Longest first: a key that contains another is replaced whole.
            ordered = sorted(secrets, key=len, reverse=True)
            pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None
            self._redaction = (secrets, pattern)
        pattern = self._redaction[1]

        def redact(text: str) -> str:
            if pattern is not None:
                text = pattern.sub(REDACTED, text)
            if hidden is not None:
                text = text.replace(*hidden)
            for key, mask in self._keys_in(_words(text)):
                text = text.replace(key, mask)
            return text

        return redact

    def _lose(self, reason: str) -> None:
        """Count a lost line; say so the first time of an episode only.

        Said before counted: whoever sees the count (a scrape, a test) can rely on the line.
        """
        if not self._has_complained:
            self._has_complained = True
            log.warning(
                "logbook: %s; requests keep flowing, further lost lines are only counted", reason
            )
        self._on_write_error()


class _Batch(NamedTuple):
    snapshots: list[dict[str, Any]]
    size: int  # their body bytes, as counted on the loop


def _escaped_breaks(line: bytes) -> bytes:
    """`line` with its Unicode line breaks escaped; an ASCII line (most) is only checked."""
    if line.isascii():
        return line
    for raw, escaped in _UNICODE_BREAKS:
        line = line.replace(raw, escaped)
    return line


def _json_dollars(usd: float) -> bytes:
    """`cost_usd` as a JSON number that always reads as a float: 0.00000195, not 1.95e-06,
    and 0.0 or 1.0, not 0 or 1, so a loader that infers the column's type from its first
    lines (BigQuery, DuckDB) never makes it an integer the next line's price cannot load into.
    A cost past what a float holds (a huge rate times a huge count: inf) is null, as an
    unpriced request's: `inf` is no JSON, and the line would stop a reader at it."""
    if not math.isfinite(usd):
        return b"null"
    text = dollars(usd)
    return (text if "." in text else text + ".0").encode()


def _body_bytes(record: Record) -> int:
    """What a line's bodies hold in memory while it waits, roughly."""
    return len(record.request_body or b"") + len(record.response_text or "")


def _words(text: str) -> list[str]:
    """The words of `text` long enough to be a virtual key, each once (about 0.1 ms for
    10 kB of prose, on the writer thread)."""
    if "\\" in text:
        text = _ESCAPE.sub(" ", text)
    return list(set(_LONG_WORD.findall(" " + text.translate(_BETWEEN_WORDS))))
