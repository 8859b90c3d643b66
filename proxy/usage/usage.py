"""The usage tap: token usage and text read from response bytes as they go by.

`relay` writes each body chunk to the client first and only then feeds it to a `UsageTap`,
so the tap can never delay, change or hold back a byte. A body in gzip, deflate, br or zstd
(or a stack of them) is decoded for the tap only (`encodings`). At the end of the body the
tap answers the provider's own usage when the provider reported one, every token kind.
Where a body or an event keeps its usage and its text is its dialect's knowledge, one module
per API (`openai_chat`, `responses`, `anthropic`, `bedrock`, `gemini`, and the native APIs
of self-hosted servers: `ollama`, `llamacpp`, `tgi`); the tap dispatches each event by its
type (none: an OpenAI chunk, or Gemini's `candidates`, llama.cpp's or TGI's result; else the
dialect whose `EVENTS` name it), each JSON body by its shape (`choices`, a Converse answer,
`candidates`, a `response` object, llama.cpp's counts, `content`, TGI's `generated_text`,
Ollama's `done`; a JSON array: Gemini's stream, or several prompts' results), each line of
newline-delimited JSON (`application/x-ndjson`: Ollama's streams) as Ollama's, and the
dialect writes what it read into the answer's `Reading`. An answer its server did not label
(no Content-Type, `application/octet-stream`, `text/plain`) or labelled JSON is read as the
event stream it is when its first bytes open one: some OpenAI-compatible servers send their
streams so, and the SDKs read them all the same.

What is charged depends on the endpoint (`charged`): an answer that produces tokens (POST
to chat/completions, completions, responses, messages, embeddings, Gemini's generateContent
and embedContent, the native generations of Ollama, llama.cpp and TGI) without a readable usage is charged an estimate (`estimate`: every string
of the request's prompt, read by its path's dialect (`prompt`), and every string the
provider generated, as its dialect counted them), marked `estimated` — never nothing, also when the body cannot be read (an unknown
coding, corrupt, not JSON, cut short, over the memory bound): then the response's decoded
(or received) bytes stand for its text. An answer that is only the provider's error (an Anthropic
stream's `error` event before `message_start`, an error object under the 200: nothing
generated, no usage) is charged nothing, as the provider's 4xx and 5xx are. A stream cut while its usage was only a running
count (`Reading.is_usage_provisional`: Anthropic's `message_start` says 1 output token) is
charged its reported prompt and at least the completion it delivered, estimated (nothing
delivered: completion 0, the work unknown, which the exchange charges its reservation). Speech is counted by its input's characters,
transcriptions and translations by their audio's seconds, unless they report tokens (`audio`). Other POSTs (images: GPT image models report tokens) are
charged only what the provider reports (a token count reports none); a GET (a models list,
a stored response) nothing, nor an update of a stored chat completion's metadata (answered
with the completion and the usage it was charged when made). Two exceptions, for background Responses (`background.py`): a
background POST answered queued or in progress is charged nothing yet, and a GET of one
response reports what the response says (`stored`: its id, status and usage), which
`background.py` charges only if its key owed it.

Memory: a tap holds a JSON body up to 1 MiB (parsed whole at the end), of a larger one only
its last 256 KiB, where the usage is (`last_usage`: orjson would need about 13 times a
body's size to parse it whole), and for a Responses object fetched or made in the
background its first HEAD_BYTES, where its id and status are (`responses.read_head`: a
finished image or a long output must still be claimed); or one unfinished SSE line (and an
event split over data lines, to WHOLE_PARSE_BYTES); with LOG_BODIES the whole JSON
body, for its text, or a stream's text. Each tap at most `MAX_HELD_BYTES`, all taps of a
process together at most `TAP_MEMORY_BYTES` (a shared `TapMemory`), whole bodies and texts
half of that, so they never starve the tails. A JSON body kept whole that would pass a
bound is cut to its tail, a stream's text let go (the log line goes without either); so is
an SSE line that would (a Responses stream's last event holds the whole response, every
image of its image_generation tool in base64): kept to its end as its last TAIL_BYTES, its
usage read there as a large JSON body's (`_cut_line`; its other strings are not read).
A tail takes no more memory as it moves: what it drops frees what it adds. At the end
(`usage` or `text`, whichever comes first) the tap lets go of everything.

Invariants: the answer does not depend on where the chunks were cut; `feed` never raises,
whatever the bytes. What it deliberately does not do: parse anything but `data:` lines
(one `orjson.loads` each, as providers send an event's JSON on one line; only a data line
opening JSON that does not parse alone is joined with the next ones, as the SSE
specification joins an event's data lines, and read at the event's end: whole up to
WHOLE_PARSE_BYTES, else its tail), and llama.cpp's `error:` line, a field of its own that
ends a failing stream. Lines end as the SSE specification says (CRLF,
LF or CR: `sse_lines`), and a UTF-8 BOM opening the stream is skipped. A Bedrock stream is AWS event-stream frames, not lines: `bedrock`
reads them, holding at most one unfinished frame.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import orjson

from proxy.encodings import CorruptBody, Decoder, UnsupportedEncoding
from proxy.record import PENDING, Batch, StoredResponse, Usage
from proxy.usage import (
    anthropic,
    audio,
    batches,
    bedrock,
    estimate,
    gemini,
    images,
    llamacpp,
    ollama,
    openai_chat,
    realtime_events,
    responses,
    tgi,
)
from proxy.usage.prompt import request_chars
from proxy.usage.provider_usage import UsageFields, last_usage
from proxy.usage.reading import Reading
from proxy.usage.sse_lines import LineReader

# Past this a JSON body (or one SSE line) is not a usage report we want to parse in memory.
MAX_HELD_BYTES = 16 * 1024 * 1024
# What all taps of a process hold at once: four such bodies.
TAP_MEMORY_BYTES = 4 * MAX_HELD_BYTES

# Past this a JSON body is not parsed whole (orjson needs about 13 times a body's size
# while parsing it): only its usage object is found and parsed (`last_usage`), in the
# last TAIL_BYTES, which is all the tap keeps of it (unless LOG_BODIES needs the text).
WHOLE_PARSE_BYTES = 1024 * 1024
TAIL_BYTES = 256 * 1024
# Of such a body, the start kept where a stored Response's id and status are read.
HEAD_BYTES = 16 * 1024

_JSON = "json"
_SSE = "sse"
_NDJSON = "ndjson"  # newline-delimited JSON (Ollama's native streams)
_FRAMES = "frames"  # AWS event stream (Bedrock)


class Charged(enum.Enum):
    """What an answer is charged, by endpoint."""

    NOTHING = "nothing"  # GET: a models list, a stored response
    REPORTED = "reported"  # only what the provider reports (a token count reports none)
    PROMPT = "prompt"  # embeddings: reported, else the prompt estimated
    TEXT = "text"  # generations: reported, else prompt and completion estimated
    # A background Response (POST /v1/responses, "background": true): as TEXT, but an
    # answer still queued or in progress (or a stream cut before its end: the response
    # runs on) is charged nothing yet (background.py owes it).
    LATER = "later"
    # GET /v1/responses/{id} (and POST .../cancel): nothing here; what the response
    # reports is read for background.py, which charges it if its key owed it.
    FETCHED = "fetched"
    # Speech: reported tokens, else the characters of the request's input (`audio`).
    CHARACTERS = "characters"
    # Transcriptions and translations: reported tokens or seconds of audio (`audio`).
    DURATION = "duration"
    # A batch made (POST), or one seen by its id (GET, cancel): nothing here; the batch is
    # read for batch_charges, which charges its output to the key that made it.
    BATCH_MADE = "batch_made"
    BATCH_SEEN = "batch_seen"

    # Members are singletons, equal only to themselves: hashed by identity, in C (Enum's
    # own hash is a Python call, paid by each of the tap's set lookups on every answer).
    __hash__ = object.__hash__


# Endpoints whose answers produce tokens; the path ends with one of these (Bedrock's and
# Vertex's native ones too: the model is in their path).
_GENERATIONS = (
    "/chat/completions",
    "/completions",
    "/responses",
    "/messages",
    "/invoke",
    "/invoke-with-response-stream",
    "/converse",
    "/converse-stream",
    ":rawPredict",
    ":streamRawPredict",
    ":generateContent",
    ":streamGenerateContent",
    *ollama.GENERATIONS,
    *llamacpp.GENERATIONS,
    *tgi.GENERATIONS,
)
# Endpoints that embed a prompt: OpenAI's, Gemini's native ones (Google AI answers them with
# no usage at all) and Ollama's.
_EMBEDDINGS = ("/embeddings", ":embedContent", ":batchEmbedContents", *ollama.EMBEDDINGS)
# A stored chat completion (`store: true`) is POST {this}/{id} to update its metadata.
_STORED_CHATS = "/chat/completions"
# Vertex's token count for Claude (the SDK's count_tokens) ends as a generation's path does.
_VERTEX_COUNT_TOKENS = "/count-tokens:rawPredict"
# Taps that read the Responses API object answered (its id and status).
_STORED = frozenset((Charged.LATER, Charged.FETCHED))
# Taps charged nothing here.
_UNCHARGED = frozenset((Charged.NOTHING, Charged.FETCHED, Charged.BATCH_MADE, Charged.BATCH_SEEN))
# Taps that read a batch.
_BATCHES = frozenset((Charged.BATCH_MADE, Charged.BATCH_SEEN))
# Taps of answers that generate text: a cut one is charged at least what it delivered.
_GENERATED = frozenset((Charged.TEXT, Charged.LATER))
# Taps charged what the provider reports, and nothing when it reports nothing.
_AS_REPORTED = frozenset((Charged.REPORTED, Charged.DURATION))
# The typed stream events each dialect reads (OpenAI chat chunks have no type).
_EVENTS = {**anthropic.EVENTS, **responses.EVENTS, **audio.EVENTS, **images.EVENTS}
_read_chunk = openai_chat.read_chunk
# A data line after a UTF-8 byte order mark, which the SSE specification skips at a
# stream's start (the first line: no other line starts with one in practice).
_BOM_DATA = b"\xef\xbb\xbfdata:"


def charged(method: str, path: str, is_background: bool = False) -> Charged:
    """What the answer to `method path` is charged; `is_background`: a background Response."""
    if "/batches" in path:
        batch_call = batches.call(method, path)
        if batch_call is not None:
            return Charged.BATCH_MADE if batch_call is batches.Call.MAKE else Charged.BATCH_SEEN
    if method != "POST":
        return Charged.FETCHED if method == "GET" and _is_stored_response(path) else Charged.NOTHING
    if path.endswith(_GENERATIONS):  # most requests; none of the endings below is one of these
        if path.endswith(_VERTEX_COUNT_TOKENS):
            return Charged.REPORTED  # counts a prompt, generates nothing
        return Charged.LATER if is_background else Charged.TEXT
    if path.endswith(_EMBEDDINGS):
        return Charged.PROMPT
    if path.endswith("/audio/speech"):
        return Charged.CHARACTERS
    if path.endswith(("/audio/transcriptions", "/audio/translations")):
        return Charged.DURATION
    if path.endswith("/cancel") and _is_stored_response(path[:-7]):
        return Charged.FETCHED  # a cancelled background response says what it used
    parent, _, completion_id = path.rpartition("/")
    if completion_id and parent.endswith(_STORED_CHATS):
        return Charged.NOTHING  # its metadata updated: answered with its usage, used before
    return Charged.REPORTED


def _is_stored_response(path: str) -> bool:
    """GET /v1/responses/{id}: one response (not its input_items, not a list)."""
    parent, _, response_id = path.rpartition("/")
    return bool(response_id) and parent.endswith("/responses")


class TapMemory:
    """The bytes all taps of a process hold at once, bounded. One per app; one event loop."""

    __slots__ = ("held_bytes", "limit_bytes")

    def __init__(self, limit_bytes: int = TAP_MEMORY_BYTES) -> None:
        self.limit_bytes = limit_bytes
        self.held_bytes = 0

    def take(self, count: int, is_whole: bool = False) -> bool:
        """Hold `count` more bytes if the bound allows.

        Whole bodies (kept to parse or to log) get half the bound, so they can never starve
        the tails and lines every other answer needs to be read.
        """
        limit = self.limit_bytes // 2 if is_whole else self.limit_bytes
        if self.held_bytes + count > limit:
            return False
        self.held_bytes += count
        return True

    def give(self, count: int) -> None:
        self.held_bytes -= count


class UsageTap:
    """Reads usage and text from one response body, fed chunk by chunk."""

    __slots__ = (
        "_body",
        "_charged",
        "_counted",
        "_decoder",
        "_finished",
        "_frames",
        "_head",
        "_held",
        "_is_sniffed",
        "_is_unread",
        "_keep_text",
        "_kind",
        "_lines",
        "_long_line",
        "_memory",
        "_path",
        "_reading",
        "_seen",
        "_sniffed",
        "_split_event",
        "_text",
        "_text_held",
        "batch",
        "stored",
    )

    def __init__(
        self,
        content_type: str | None,
        content_encoding: str | None,
        keep_text: bool,
        charged: Charged = Charged.TEXT,
        memory: TapMemory | None = None,
        path: str = "",
    ) -> None:
        # Made for every answer: only what its kind of body needs is built.
        self._kind = kind = _body_kind(content_type)
        self._path = path  # the request's: its dialect reads the prompt for an estimate
        self._keep_text = keep_text
        self._charged = charged
        self._memory = memory if memory is not None else TapMemory()
        self._held = 0  # bytes taken from memory
        self._text_held = 0  # of them, the text kept for the log (LOG_BODIES, a stream)
        self._seen = 0  # body bytes seen (decoded when the coding is known)
        # An answer its server did not label (no Content-Type, or one that says nothing of
        # it), or labelled JSON: its first bytes say whether it is an event stream (`_sniff`),
        # as the SDKs read it; until they do, they are held (`_sniffed`).
        self._is_sniffed = kind == _JSON or (kind is None and _is_unlabelled(content_type))
        self._sniffed = b""
        # The body cannot be read: not JSON or SSE, an unknown coding, corrupt, too large.
        self._is_unread = kind is None and not self._is_sniffed
        self._body: bytearray | None = bytearray() if kind == _JSON else None
        # A large JSON body's first HEAD_BYTES, kept for a stored Response's id and status.
        self._head: bytes | None = None
        # SSE and NDJSON: lines, and the unfinished last one (None once let go).
        self._lines = LineReader() if kind == _SSE or kind == _NDJSON else None
        # SSE: the tail of an event line too long to hold, until the line ends (`_cut_line`).
        self._long_line: bytearray | None = None
        # SSE: the data lines so far of an event whose first one is not JSON alone (its
        # JSON spans several data lines), joined with LFs until the event ends.
        self._split_event: bytearray | None = None
        self._text: str | None = None  # the text, once finished
        # What the answer said: SSE text deltas kept only with keep_text (a JSON body's text
        # is the body); a Responses object's id and status only for LATER and FETCHED.
        self._reading = Reading(
            keep_text and kind is not None and kind != _JSON,
            is_stored_noted=charged in _STORED,
            is_started_noted=charged is Charged.LATER,
        )
        # An event stream: its frames, and the unfinished last one.
        self._frames = bedrock.Frames(self._reading) if kind == _FRAMES else None
        self._finished = False
        self._counted: dict[str, int] | None = None  # counts in the headers (counted_aside)
        # Once finished: the Responses API object answered (LATER and FETCHED only), with
        # what it reports; read after `usage`.
        self.stored: StoredResponse | None = None
        # Once finished: the batch answered (BATCH_MADE and BATCH_SEEN only).
        self.batch: Batch | None = None
        self._decoder: Decoder | None = None
        if content_encoding:  # most answers: none, nothing to undo
            try:
                decoder = Decoder(content_encoding, self._take)
                self._decoder = None if decoder.is_identity else decoder
            except UnsupportedEncoding:
                self._give_up()

    def counted_aside(self, counts: dict[str, int] | None) -> None:
        """Token counts the answer's headers hold (Bedrock's InvokeModel, `bedrock`'s
        INVOCATION_USAGE fields): charged when its body reports none."""
        self._counted = counts

    def error_named_aside(self, kind: str) -> None:
        """The type of an error answered whole that its headers name (Bedrock's
        `x-amzn-ErrorType`, its body only a message)."""
        self._reading.note_error({"type": kind})

    def feed(self, chunk: bytes) -> None:
        """Take the next body chunk, already sent to the client."""
        if not chunk or self._finished:
            return
        if self._is_unread:
            self._seen += len(chunk)
        elif self._decoder is None:
            self._take(chunk)
        else:
            try:
                self._decoder.feed(chunk)
            except CorruptBody:
                self._seen += len(chunk)
                self._give_up()

    def usage(self, request_body: bytes) -> Usage | None:
        """The provider's usage, else an estimate where the endpoint is charged one."""
        self._finish()
        if self._charged in _UNCHARGED:
            return None
        reading = self._reading
        reported = reading.reported.usage()
        if reported is None and self._counted is not None:  # Bedrock's, in the headers
            reading.reported.read(self._counted, bedrock.INVOCATION_USAGE)
            reported = reading.reported.usage()
        if reported is not None and reading.is_usage_provisional and self._charged in _GENERATED:
            # Cut before the provider's total: its prompt counts, and at least what came.
            delivered = estimate.tokens(self._seen if self._is_unread else reading.chars)
            # Nothing delivered is no output known (Anthropic's message_start counts 1
            # before any): 0, so the reckon charges the work unknown its reservation.
            completion = max(reported.completion_tokens, delivered) if delivered else 0
            return dataclasses.replace(reported, completion_tokens=completion, estimated=True)
        if reported is not None or self._charged in _AS_REPORTED:
            return reported
        if reading.error_kind is not None and not reading.chars and not self._is_unread:
            return None  # the provider's error before anything it made: as its 4xx, 5xx
        if self._charged is Charged.CHARACTERS:
            return audio.speech_usage(request_body)
        if self._charged is Charged.LATER and reading.stored_status in PENDING:
            if self._kind != _SSE:
                return None  # queued: owed whole, charged when fetched finished (background.py)
            # A background stream cut before its end: charged what it delivered (as any cut
            # generation), and owed the rest (background.py).
        completion = 0
        if self._charged is Charged.TEXT or self._charged is Charged.LATER:
            completion = estimate.tokens(self._seen if self._is_unread else reading.chars)
        return Usage(
            estimate.tokens(request_chars(self._path, request_body)), completion, estimated=True
        )

    @property
    def model(self) -> str | None:
        """The model the provider says answered (traces' gen_ai.response.model); None: unsaid."""
        return self._reading.model

    @property
    def apart(self) -> tuple[tuple[str, Usage], ...]:
        """Parts of the reported usage billed at another model's rates than the answer's:
        (that model, its usage); a server-side fallback's declined attempts, the advisor's
        sub-inferences."""
        return self._reading.reported.apart()

    @property
    def service_tier(self) -> str | None:
        """The OpenAI service tier the provider says served the answer; None: unsaid."""
        return self._reading.service_tier

    @property
    def speed(self) -> str | None:
        """Anthropic's speed that served the answer ("fast": fast mode); None: unsaid."""
        return self._reading.speed

    @property
    def error_kind(self) -> str | None:
        """The type of an error the provider sent in its answer: a stream's error event, or
        an error answered whole."""
        self._finish()
        return self._reading.error_kind

    @property
    def is_whole(self) -> bool:
        """Whether the bytes fed hold the stream's last event, as its dialect knows it
        (OpenAI's `data: [DONE]`, Anthropic's `message_stop` or the `message_delta` with its
        stop_reason, a Response's `response.completed`, Gemini's finishReason with its
        usage, Bedrock's `metadata`, Ollama's `done`, …), however its lines end, it was cut
        or coded: asked when the client left, once its stream is over (a last line without
        its end counts)."""
        self._finish()
        return self._reading.is_ended

    @property
    def text(self) -> str | None:
        """The response as text (a stream's text deltas joined), only with keep_text."""
        self._finish()
        return self._text

    def _take(self, data: bytes) -> None:
        self._seen += len(data)
        if self._is_sniffed:
            if self._kind == _JSON and data[:1] == b"{" and not self._sniffed:
                self._is_sniffed = False  # most JSON answers: told by their first byte
            else:
                data = self._sniff(data)
        if self._is_unread or not data:
            return
        if self._lines is not None:
            self._take_lines(data)
        elif self._frames is not None:
            self._take_frames(self._frames, data)
        else:
            self._take_json(data)

    def _sniff(self, data: bytes) -> bytes:
        """The body's bytes so far once its first ones say what it is, else b"" (held).

        An event stream opens with a field (`data:`, `event:`...) or a comment, after a BOM
        or blank lines: read as one from here on. Anything else is JSON when labelled so,
        else not read. Undecided while the bytes could still open one (`e`, blank lines),
        up to SNIFF_BYTES."""
        held = self._sniffed + data
        start = held.lstrip(_BLANK)
        undecided = any(field.startswith(start) for field in _SSE_FIELDS)
        if undecided and len(held) < SNIFF_BYTES:
            self._sniffed = held
            return b""
        self._sniffed = b""
        self._is_sniffed = False
        if start.startswith(_SSE_FIELDS):
            self._kind = _SSE
            self._body = None
            self._lines = LineReader()
            if self._keep_text:
                self._reading.texts = []
        elif self._kind != _JSON:
            self._give_up()
            return b""
        return held

    def _take_json(self, data: bytes) -> None:
        body = self._body
        assert body is not None  # a JSON tap that reads has a body
        is_cut = len(body) < self._seen - len(data)  # only its tail is kept already
        if not self._keep_text and (is_cut or len(body) + len(data) > WHOLE_PARSE_BYTES):
            if not is_cut and self._reading.is_stored_noted:
                self._keep_head(body, data)
            self._take_tail(body, data)
        elif self._fits(len(data), is_whole=True):
            body += data
        else:
            # Past a bound keeping the whole body for the log: log it without; the tail
            # still has the usage.
            self._keep_text = False
            if not is_cut and self._reading.is_stored_noted:
                self._keep_head(body, data)
            self._take_tail(body, data)

    def _keep_head(self, body: bytearray, data: bytes) -> None:
        """The body's first HEAD_BYTES, before it is cut to its tail (once)."""
        head = bytes(body[:HEAD_BYTES]) + data[: max(0, HEAD_BYTES - len(body))]
        if self._fits(len(head)):
            self._head = head

    def _take_tail(self, body: bytearray, data: bytes) -> None:
        """Keep the last TAIL_BYTES of the body: what is dropped first frees what is added."""
        data = data[-TAIL_BYTES:]
        dropped = max(0, len(body) + len(data) - TAIL_BYTES)
        del body[:dropped]
        self._release(dropped)
        if not self._fits(len(data)):
            return self._give_up()
        body += data

    def _fits(self, count: int, is_whole: bool = False) -> bool:
        """Take `count` bytes from the bounds if they allow."""
        if self._held + count > MAX_HELD_BYTES or not self._memory.take(count, is_whole):
            return False
        self._held += count
        return True

    def _hold(self, count: int) -> bool:
        """Take `count` bytes from the bounds, or give up reading this body (the text kept
        for the log gives way first: reading the usage comes before logging the text)."""
        if self._fits(count):
            return True
        if self._text_held:
            self._let_go_text()
            if self._fits(count):
                return True
        if self._cut_line():
            return True
        self._give_up()
        return False

    def _cut_line(self) -> bool:
        """An event line too long to hold (a Responses stream's last event holds the whole
        response: every image the image_generation tool made, in base64) keeps only its
        last TAIL_BYTES until it ends, where its usage is (`_take_long_line`). False: the
        reader holds no such line."""
        lines = self._lines
        if lines is None or lines.held_bytes <= TAIL_BYTES:
            return False
        tail = lines.cut(TAIL_BYTES)
        needed = len(tail) + self._text_held
        if needed <= self._held:
            self._release(self._held - needed)
        elif not self._fits(needed - self._held):
            return False
        self._long_line = tail
        return True

    def _take_long_line(self, data: bytes) -> bytes:
        """`data` going on with a line too long to hold: its tail kept, and at the line's
        end its usage read; what follows that end is returned, its line end first (an empty
        line to the reader)."""
        tail = self._long_line
        assert tail is not None
        newline, cr = data.find(b"\n"), data.find(b"\r")
        end = newline if cr < 0 or 0 <= newline < cr else cr
        tail += data[:end][-TAIL_BYTES:] if end >= 0 else data[-TAIL_BYTES:]
        del tail[: max(0, len(tail) - TAIL_BYTES)]
        if end < 0:
            return b""
        self._long_line = None
        self._read_tail(tail)
        return data[end:]

    def _read_tail(self, tail: bytes | bytearray) -> None:
        """The usage in the tail of a JSON body, or of an event line, too large to parse whole."""
        usage = last_usage(tail)
        if self._charged is Charged.DURATION:  # a long transcription's verbose_json
            audio.read_usage(usage, self._reading)
        elif usage is None:  # none of OpenAI's kind: perhaps Gemini's (inline images)
            metadata = last_usage(tail, gemini.USAGE_KEY)
            gemini.read_usage(metadata, self._reading, is_final=False)
        else:
            fields = _fields_of(usage)
            self._reading.reported.read(usage, fields)
            if fields is responses.USAGE:
                responses.read_tail(tail, self._reading)

    def _release(self, count: int) -> None:
        self._memory.give(count)
        self._held -= count

    def _take_lines(self, data: bytes) -> None:
        lines = self._lines
        assert lines is not None  # an SSE tap that reads has its reader
        if self._long_line is not None:
            data = self._take_long_line(data)
        take = self._take_line if self._kind == _SSE else self._take_object
        for line in lines.feed(data):
            take(line)
        # What the reader holds now (an unfinished line, or a long one's tail) is what this
        # tap holds, beside the text (held after it: reading the usage comes first).
        held = lines.held_bytes + self._text_held
        if self._long_line is not None:
            held += len(self._long_line)
        if self._split_event is not None:
            held += len(self._split_event)
        if held > self._held:
            self._hold(held - self._held)
        elif held < self._held:
            self._release(self._held - held)
        if self._reading.texts is not None:
            self._hold_text()

    def _take_frames(self, frames: bedrock.Frames, data: bytes) -> None:
        if not frames.feed(data):
            self._is_unread = True  # what was read so far stands; the rest is estimated
            return self._let_go()
        # As for lines: an unfinished frame is what the tap holds, beside the text.
        held = frames.held_bytes + self._text_held
        if held > self._held:
            self._hold(held - self._held)
        elif held < self._held:
            self._release(self._held - held)
        if self._reading.texts is not None:
            self._hold_text()

    def _hold_text(self) -> None:
        """The stream's text kept for the log is held as a whole body is; past a bound it is
        let go, and the log line goes without it (as a JSON body's)."""
        reading = self._reading
        grown = reading.kept_chars - self._text_held
        if not grown:
            return
        if self._fits(grown, is_whole=True):
            self._text_held += grown
        else:
            self._let_go_text()

    def _let_go_text(self) -> None:
        """The log line goes without the stream's text."""
        self._reading.texts = None
        self._release(self._text_held)
        self._text_held = 0

    def _take_line(self, line: bytes | bytearray) -> None:
        # One JSON event per data line, as providers send them (some without the blank line
        # between two events); event:, id:, retry:, comments and the blank lines between
        # events carry nothing the tap needs, except ending an event split over data lines.
        if not line.startswith(b"data:"):
            if self._split_event is not None and not line:
                self._read_split_event()
            elif line.startswith(_BOM_DATA):  # the stream opens with a UTF-8 BOM: skipped
                self._take_line(line[3:])
            elif line.startswith(b"error:"):  # llama.cpp's server: a failure, a field of its own
                self._read_error_line(line[6:])
            return
        data = line[5:].strip()
        if data == b"[DONE]":  # an OpenAI stream's last event
            self._reading.is_ended = True
            return
        split = self._split_event
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            if split is not None:
                self._add_to_split(split, data)
            elif data[:1] == b"{":  # an event's JSON begins, to go on in its next data lines
                self._split_event = bytearray(data)
            return
        if split is not None:
            if not isinstance(event, dict):  # a part of the split event (`1`, `"a"`, `[]`)
                self._add_to_split(split, data)
                return
            self._split_event = None  # not JSON: a new event began without the blank line
        if isinstance(event, dict):
            self._read_event(event)

    def _read_error_line(self, data: bytes | bytearray) -> None:
        """llama.cpp's server ends a failing stream with `error: {"code", "message", "type"}`
        (then `data: [DONE]`): the provider's error, as an error event's."""
        try:
            error = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if isinstance(error, dict):
            self._reading.note_error(error)

    def _add_to_split(self, split: bytearray, data: bytes | bytearray) -> None:
        """The next data line of a split event; past WHOLE_PARSE_BYTES only its tail is
        kept, where its usage is (read as a large JSON body's)."""
        split += b"\n"
        split += data
        if len(split) > WHOLE_PARSE_BYTES:
            del split[:-TAIL_BYTES]

    def _read_split_event(self) -> None:
        """The event whose JSON spans several data lines ended: read whole (or its tail)."""
        split, self._split_event = self._split_event, None
        if split is None:
            return
        try:
            event = orjson.loads(split)
        except orjson.JSONDecodeError:  # cut to its tail (or not JSON): its usage, if there
            return self._read_tail(split)
        if isinstance(event, dict):
            self._read_event(event)

    def _take_object(self, line: bytes | bytearray) -> None:
        """One line of newline-delimited JSON: a JSON object (Ollama's)."""
        try:
            event = orjson.loads(line)
        except orjson.JSONDecodeError:
            return
        if isinstance(event, dict):
            ollama.read_line(event, self._reading)

    def _read_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind is None:  # OpenAI chat.completion.chunk or text_completion, or Gemini's
            if "choices" in event:
                _read_chunk(event, self._reading)
            elif gemini.is_answer(event):
                gemini.read_event(event, self._reading)
            elif llamacpp.is_answer(event):  # llama.cpp's own /completion
                llamacpp.read_answer(event, self._reading)
            elif tgi.is_answer(event):  # TGI's /generate_stream
                tgi.read_event(event, self._reading)
            else:
                _read_chunk(event, self._reading)
        elif type(kind) is str:
            read = _EVENTS.get(kind)
            if read is not None:
                read(event, self._reading)

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._kind == _NDJSON and not self._is_unread and self._lines is not None:
            self._take_object(self._lines.rest())  # a last line without its line end
            if self._reading.texts is not None:
                self._text = "".join(self._reading.texts)
        elif self._kind == _SSE and not self._is_unread and self._lines is not None:
            # A stream cut before its last line end still counts what that line said.
            if self._long_line is not None:
                self._read_tail(self._long_line)
            self._take_line(self._lines.rest())
            self._take_line(b"")  # the last event's end, if its blank line never came
            if self._reading.texts is not None:
                self._text = "".join(self._reading.texts)
        elif self._kind == _FRAMES and self._reading.texts is not None:
            self._text = "".join(self._reading.texts)
        elif self._kind == _JSON and self._body is not None:
            body = self._body
            if self._keep_text:
                self._text = body.decode("utf-8", "replace")
            if len(body) > WHOLE_PARSE_BYTES or len(body) < self._seen:
                self._read_tail(body)
                if self._reading.is_stored_noted:  # a stored Response: its id and status
                    head = body[:HEAD_BYTES] if len(body) >= self._seen else self._head
                    if head is not None:
                        responses.read_head(head, self._reading)
                self._is_unread = True  # its text is not read: the size stands for it
            else:
                self._read_document(body)
        reading = self._reading
        if reading.stored_id is not None:
            usage = reading.reported.usage()
            self.stored = StoredResponse(reading.stored_id, reading.stored_status, usage)
        self._let_go()

    def _read_document(self, body: bytearray) -> None:
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            # No usage in a body that does not parse (cut short?): estimated from its size.
            self._is_unread = True
            return
        reading = self._reading
        if not isinstance(document, dict):
            if not isinstance(document, list) or not document:
                return
            first = document[0]
            if isinstance(first, dict) and llamacpp.is_answer(first):  # several prompts'
                llamacpp.read_answers(document, reading)
            elif isinstance(first, dict) and tgi.is_answer(first):  # the Inference API's
                tgi.read_answers(document, reading)
            else:  # Gemini's stream without alt=sse; Google's errors
                gemini.read_answers(document, reading)
            return
        error = document.get("error")
        if isinstance(error, dict):  # an error answered whole, in any dialect: its kind
            reading.note_error(error)
        if self._charged in _BATCHES:
            self.batch = batches.read_batch(document, self._charged is Charged.BATCH_MADE)
        elif self._charged is Charged.DURATION:
            audio.read_transcription(document, reading)
        elif "choices" in document:
            openai_chat.read_answer(document, reading)
        elif bedrock.is_converse(document):
            bedrock.read_answer(document, reading)
        elif gemini.is_answer(document):
            gemini.read_answer(document, reading)
        elif "output" in document or document.get("object") == "response":
            responses.read_answer(document, reading)
        elif llamacpp.is_answer(document):  # before Anthropic's: its text is `content` too
            llamacpp.read_answer(document, reading)
        elif tgi.is_answer(document):
            tgi.read_answer(document, reading)
        elif "content" in document:
            anthropic.read_answer(document, reading)
        elif ollama.is_answer(document):
            ollama.read_line(document, reading)
        else:  # embeddings, transcriptions, …: only what they report
            reading.note_model(document.get("model"))
            usage = document.get("usage")
            reading.reported.read(usage, _fields_of(usage))

    def _give_up(self) -> None:
        """Stop reading this body: it will be estimated (and logged without its text)."""
        self._is_unread = True
        self._reading.reported.clear()
        self._let_go()

    def _let_go(self) -> None:
        self._release(self._held)
        self._text_held = 0
        self._body = None
        self._head = None
        self._lines = None
        self._long_line = None
        self._split_event = None
        self._frames = None
        self._reading.texts = None if self._reading.texts is None else []
        self._decoder = None


# The Content-Types most answers carry, as sent, and their kind: one lookup, no parsing.
_COMMON_TYPES = {
    "application/json": _JSON,
    "application/json; charset=utf-8": _JSON,
    "text/event-stream": _SSE,
    "text/event-stream; charset=utf-8": _SSE,
}


# Content-Types that say nothing of a body (aiohttp and others add octet-stream to one sent
# without any), and what may open an event stream: a BOM, blank lines, then a field or a comment.
_UNLABELLED = frozenset(("", "application/octet-stream", "text/plain"))
_BLANK = b"\xef\xbb\xbf \t\r\n"
_SSE_FIELDS = (b"data:", b"event:", b"id:", b"retry:", b":")
SNIFF_BYTES = 4096  # held at most while an answer's first bytes do not say what it is


def _is_unlabelled(content_type: str | None) -> bool:
    return not content_type or content_type.partition(";")[0].strip().lower() in _UNLABELLED


def _body_kind(content_type: str | None) -> str | None:
    if not content_type:
        return None
    kind = _COMMON_TYPES.get(content_type)
    if kind is not None:
        return kind
    media = content_type.partition(";")[0].strip().lower()
    if media == "text/event-stream":
        return _SSE
    if media == bedrock.EVENT_STREAM:
        return _FRAMES
    if media == ollama.NDJSON:
        return _NDJSON
    if media == "application/json" or media.endswith("+json"):
        return _JSON
    return None


def _fields_of(usage: object) -> UsageFields:
    """The dialect of a usage object found outside a known answer, by the fields it names."""
    if not isinstance(usage, dict) or "prompt_tokens" in usage or "completion_tokens" in usage:
        return openai_chat.USAGE  # chat, completions, embeddings
    if "cache_read_input_tokens" in usage or "cache_creation_input_tokens" in usage:
        return anthropic.USAGE
    if "input_token_details" in usage:
        return realtime_events.USAGE  # and transcriptions, in the same fields
    if images.is_usage(usage):
        return images.USAGE
    return responses.USAGE
