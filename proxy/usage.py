"""The usage tap: token usage and text read from response bytes as they go by.

`relay` writes each body chunk to the client first and only then feeds it to a `UsageTap`,
so the tap can never delay, change or hold back a byte. At the end of the body it answers
the provider's own usage when the provider reported one:

- JSON bodies: OpenAI `usage` {prompt_tokens, completion_tokens} (embeddings: prompt only),
  the Responses API and Anthropic `usage` {input_tokens, output_tokens}, Anthropic's
  cache_creation_input_tokens and cache_read_input_tokens counted as prompt;
- SSE streams: the OpenAI usage chunk (sent when the client asked for
  `stream_options.include_usage`; the gateway never asks for it), the Responses API's
  `response.completed`, Anthropic's `message_start` and `message_delta`. Counts in
  `message_delta` are cumulative, so the last value of each field wins; nothing is summed.

Otherwise it estimates about 4 characters a token from the request's and the response's
text, and marks the usage `estimated`.

Invariants: the answer does not depend on where the chunks were cut; `feed` never raises,
whatever the bytes. What it deliberately does not do: parse anything but `data:` lines
(one `orjson.loads` each: every provider sends an event's JSON on one line, so an event
split over several data lines is not read), decode `br` or unknown encodings (it gives up
and answers None), keep more than 16 MiB of a JSON body or of one SSE line, or treat a
bare `\\r` as a line end (the SSE spec allows it; no provider sends it).
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import orjson

from proxy.record import Usage

# Past this a JSON body (or one SSE line) is not a usage report we want to parse in memory.
MAX_HELD_BYTES = 16 * 1024 * 1024
# Decompress in steps so a small gzip bomb cannot allocate much at once.
INFLATE_STEP = 256 * 1024
CHARS_PER_TOKEN = 4

_JSON = "json"
_SSE = "sse"

# Every count a provider's usage object may carry that we read; other fields are ignored.
_USAGE_FIELDS = (
    "prompt_tokens",
    "completion_tokens",
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)
# Anthropic bills cache writes and reads as input next to `input_tokens`; OpenAI's
# cached tokens are already inside `input_tokens`/`prompt_tokens` and have no field here.
_PROMPT_FIELDS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
# Responses API events whose `response` carries the final usage.
_RESPONSE_DONE = frozenset({"response.completed", "response.incomplete", "response.failed"})
# Where text sits in requests (messages, input, prompt, system) and responses (choices,
# Anthropic content blocks, Responses output items): strings under these keys, in lists.
_TEXT_KEYS = ("text", "content", "message")
_REQUEST_TEXT = ("messages", "input", "prompt", "system")
_RESPONSE_TEXT = ("choices", "content", "output")
_TEXT_DEPTH = 8


class UsageTap:
    """Reads usage and text from one response body, fed chunk by chunk."""

    __slots__ = (
        "_decoder",
        "_encoding",
        "_fields",
        "_finished",
        "_held",
        "_keep_text",
        "_kind",
        "_line",
        "_parts",
        "_readable",
        "_text_chars",
        "_texts",
        "_undecided",
    )

    def __init__(
        self, content_type: str | None, content_encoding: str | None, keep_text: bool
    ) -> None:
        self._kind = _body_kind(content_type)
        self._keep_text = keep_text
        self._encoding = _encoding(content_encoding)
        if self._encoding == "unknown":
            self._kind = None
        self._decoder = (
            zlib.decompressobj(16 + zlib.MAX_WBITS) if self._encoding == "gzip" else None
        )
        self._undecided = b""  # deflate: the first bytes, until we know zlib-wrapped or raw
        self._parts: list[bytes] = []  # JSON: the body so far
        self._held = 0
        self._line = bytearray()  # SSE: the unfinished last line
        self._texts: list[str] = []  # SSE: text deltas, only with keep_text
        self._text_chars = 0
        self._fields: dict[str, int] = {}  # the last value seen of each usage field
        self._finished = False
        self._readable = True

    def feed(self, chunk: bytes) -> None:
        """Take the next body chunk, already sent to the client."""
        if self._kind is None or not chunk or self._finished:
            return
        if self._encoding is None:
            self._take(chunk)
        else:
            self._inflate(chunk)

    def usage(self, request_body: bytes) -> Usage | None:
        """The provider's usage, else an estimate; None for a body the tap cannot read."""
        self._finish()
        if self._kind is None or not self._readable:
            return None
        reported = _reported(self._fields)
        if reported is not None:
            return reported
        return Usage(
            _tokens(_request_chars(request_body)), _tokens(self._text_chars), estimated=True
        )

    @property
    def text(self) -> str | None:
        """The response as text (a stream's text deltas joined), only with keep_text."""
        if not self._keep_text or self._kind is None:
            return None
        if self._kind == _JSON:
            return b"".join(self._parts).decode("utf-8", "replace")
        return "".join(self._texts)

    def _inflate(self, chunk: bytes) -> None:
        # The client got the encoded bytes; only the tap needs them decoded.
        if self._decoder is None:
            held = self._undecided + chunk
            if len(held) < 2:
                self._undecided = held
                return
            self._undecided = b""
            # RFC 9110 §8.4.1.2 says zlib-wrapped, but some servers send raw deflate.
            wbits = zlib.MAX_WBITS if _zlib_header(held) else -zlib.MAX_WBITS
            self._decoder = zlib.decompressobj(wbits)
            chunk = held
        pending = chunk
        try:
            while True:
                data = self._decoder.decompress(pending, INFLATE_STEP)
                if data:
                    self._take(data)
                    if self._kind is None:
                        return
                pending = self._decoder.unconsumed_tail
                if not pending and len(data) < INFLATE_STEP:
                    return
        except zlib.error:
            self._give_up()

    def _take(self, data: bytes) -> None:
        if self._kind == _SSE:
            self._take_lines(data)
            return
        self._held += len(data)
        if self._held > MAX_HELD_BYTES:
            self._give_up()
            return
        self._parts.append(data)

    def _take_lines(self, data: bytes) -> None:
        line = self._line
        searched = len(line)  # the held bytes hold no line end
        line += data
        end = line.find(b"\n", searched)
        if end < 0:
            if len(line) > MAX_HELD_BYTES:
                self._give_up()
            return
        end = line.rfind(b"\n")
        lines = line[:end].split(b"\n")
        del line[: end + 1]
        for each in lines:
            self._take_line(each)

    def _take_line(self, line: bytes | bytearray) -> None:
        # One JSON event per data line, as every provider sends them; event:, id:, retry:,
        # comments and the blank lines between events carry nothing the tap needs.
        if not line.startswith(b"data:"):
            return
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if isinstance(event, dict):
            self._read_event(event)

    def _read_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind is None:  # OpenAI chat.completion.chunk or text_completion
            choices = event.get("choices")
            if isinstance(choices, list):
                for choice in choices:
                    if isinstance(choice, dict):
                        delta = choice.get("delta")
                        if isinstance(delta, dict):
                            self._add_text(delta.get("content"))
                        self._add_text(choice.get("text"))
            self._read_usage(event.get("usage"))
        elif kind == "content_block_delta":
            delta = event.get("delta")
            if isinstance(delta, dict):
                self._add_text(delta.get("text"))
        elif kind == "response.output_text.delta":
            self._add_text(event.get("delta"))
        elif kind == "message_start":
            message = event.get("message")
            if isinstance(message, dict):
                self._read_usage(message.get("usage"))
        elif kind == "message_delta":
            self._read_usage(event.get("usage"))
        elif isinstance(kind, str) and kind in _RESPONSE_DONE:
            response = event.get("response")
            if isinstance(response, dict):
                self._read_usage(response.get("usage"))

    def _add_text(self, text: object) -> None:
        if isinstance(text, str) and text:
            self._text_chars += len(text)
            if self._keep_text:
                self._texts.append(text)

    def _read_usage(self, usage: object) -> None:
        if not isinstance(usage, dict):
            return
        for field in _USAGE_FIELDS:
            value = usage.get(field)
            if type(value) is int and value >= 0:  # bool and float are not counts
                self._fields[field] = value

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._kind == _SSE:
            # A stream cut before its last line end still counts what that line said.
            self._take_line(bytes(self._line))
            self._line.clear()
        elif self._kind == _JSON:
            body = b"".join(self._parts)
            self._parts = [body]
            try:
                document = orjson.loads(body)
            except orjson.JSONDecodeError:
                # No usage in a body that does not parse; its text may still be logged.
                self._readable = False
                return
            if isinstance(document, dict):
                self._read_usage(document.get("usage"))
                self._text_chars = sum(_text_length(document.get(key)) for key in _RESPONSE_TEXT)

    def _give_up(self) -> None:
        self._kind = None
        self._parts = []
        self._line = bytearray()
        self._texts = []
        self._fields.clear()


def _body_kind(content_type: str | None) -> str | None:
    if not content_type:
        return None
    media = content_type.partition(";")[0].strip().lower()
    if media == "text/event-stream":
        return _SSE
    if media == "application/json" or media.endswith("+json"):
        return _JSON
    return None


def _encoding(content_encoding: str | None) -> str | None:
    """None for identity, else "gzip", "deflate" or "unknown" (br, stacked codings, …)."""
    coding = (content_encoding or "").strip().lower()
    if coding in ("", "identity"):
        return None
    if coding in ("gzip", "x-gzip"):
        return "gzip"
    if coding == "deflate":
        return "deflate"
    return "unknown"


def _zlib_header(data: bytes) -> bool:
    # RFC 1950 §2.2: method 8 in the low nibble, and CMF*256+FLG a multiple of 31.
    return data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0


def _reported(fields: dict[str, int]) -> Usage | None:
    if not fields:
        return None
    if "prompt_tokens" in fields or "completion_tokens" in fields:
        return Usage(fields.get("prompt_tokens", 0), fields.get("completion_tokens", 0))
    prompt = sum(fields.get(field, 0) for field in _PROMPT_FIELDS)
    return Usage(prompt, fields.get("output_tokens", 0))


def _request_chars(request_body: bytes) -> int:
    if not request_body:
        return 0
    try:
        document = orjson.loads(request_body)
    except orjson.JSONDecodeError:
        return 0
    if not isinstance(document, dict):
        return 0
    return sum(_text_length(document.get(key)) for key in _REQUEST_TEXT)


def _text_length(value: object, depth: int = 0) -> int:
    """Characters of text in strings, lists of parts and dicts under the text keys."""
    if isinstance(value, str):
        return len(value)
    # Bounded, because a client's body may nest as deep as orjson allows.
    if depth >= _TEXT_DEPTH:
        return 0
    if isinstance(value, list):
        return sum(_text_length(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return sum(_text_length(value.get(key), depth + 1) for key in _TEXT_KEYS)
    return 0


def _tokens(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)
