"""OpenAI chat completions and (legacy) text completions: their usage, text, and exact streams.

Answers, as JSON bodies and as streams of `chat.completion.chunk` / `text_completion`
events (no `type` field): the text is in `choices[].delta.content` (chat) or
`choices[].text` (completions); the usage object, in a body's `usage` or a stream's last
chunk (`choices: []`), is {prompt_tokens, completion_tokens, prompt_tokens_details
{cached_tokens, audio_tokens}, completion_tokens_details {reasoning_tokens,
audio_tokens}}, whose details are parts of the totals. Embeddings report in the same
fields (prompt only).

Exact stream usage: OpenAI reports a stream's usage only when the request sets
`stream_options.include_usage`; otherwise the gateway can only estimate it. A key with exact
stream usage makes the gateway ask for it when the client did not (`amended`) — the one
change the gateway ever makes to a request body — read it with the usage tap, and withhold
that one chunk from the client (`UsageChunkFilter`), so the client sees the stream it asked
for. OpenAI then also adds `"usage": null` to every other chunk; those pass as sent (the
SDKs ignore the field).

The change is a byte-level insertion of `"stream_options":{"include_usage":true},` after
the body's opening brace: every other byte stays. Only when the body already names
`stream_options` (null, or an object without `include_usage: true`) is it re-serialised,
because orjson does not say where in the bytes that object sits; the request's meaning is
the same. Nothing changes for a key without the setting, for a client that asked for usage
itself (its usage chunk reaches it), a body that is not plain JSON (a compressed upload),
or a request that is not a chat or text completion stream.

The filter works line by line on an uncompressed event stream, lines ending as the SSE
specification says (`sse_lines`): every whole line goes out at once, a line cut between
two chunks waits for its end (a few bytes, microseconds); only the usage chunk's `data:`
line and the blank line after it are withheld. A compressed or sized answer passes
unfiltered (its bytes cannot be cut without re-encoding it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from proxy.keys.keys import VirtualKey
from proxy.usage import estimate
from proxy.usage.provider_usage import (
    CACHE_READ,
    CACHE_WRITE,
    COMPLETION,
    INPUT_AUDIO,
    OUTPUT_AUDIO,
    PROMPT,
    REASONING,
    UsageFields,
)
from proxy.usage.reading import Reading
from proxy.usage.sse_lines import LineReader

USAGE = UsageFields(
    counts=(("prompt_tokens", PROMPT), ("completion_tokens", COMPLETION)),
    details=(
        ("prompt_tokens_details", "cached_tokens", CACHE_READ),
        ("prompt_tokens_details", "cache_write_tokens", CACHE_WRITE),
        ("prompt_tokens_details", "audio_tokens", INPUT_AUDIO),
        ("completion_tokens_details", "reasoning_tokens", REASONING),
        ("completion_tokens_details", "audio_tokens", OUTPUT_AUDIO),
    ),
)


def read_chunk(event: dict[str, Any], reading: Reading) -> None:
    """One stream event: a chat.completion.chunk or a text_completion."""
    if reading.model is None:
        reading.note_model(event.get("model"))
    choices = event.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if isinstance(choice, dict):
                delta = choice.get("delta")
                if isinstance(delta, dict):
                    reading.add_text(delta.get("content"))
                reading.add_text(choice.get("text"))
    usage = event.get("usage")
    if usage is not None:  # OpenAI's `"usage": null` on every chunk but the last
        reading.reported.read(usage, USAGE)


def read_answer(document: dict[str, Any], reading: Reading) -> None:
    """One JSON answer: a chat.completion, a text_completion (or an embeddings list)."""
    reading.note_model(document.get("model"))
    reading.reported.read(document.get("usage"), USAGE)
    if reading.reported.usage() is None:  # only an estimate needs the answer's length
        reading.chars = estimate.answer_chars(document)


_ASK = b'"stream_options":{"include_usage":true},'
# A usage object, not the `"usage":null` OpenAI then adds to every other chunk.
_MARKS_USAGE, _MARKS_USAGE_SPACED = b'"usage":{', b'"usage": {'
# Completions streams that report usage only when asked (chat and legacy text completions).
_ASKS_FOR_USAGE = "completions"


def amended(
    key: VirtualKey, tail: str, headers: Mapping[str, str], body: bytes, is_stream: bool
) -> tuple[bytes, bool]:
    """The body to send upstream, and whether the gateway asked for the usage chunk."""
    if not (key.exact_stream_usage and is_stream and tail.endswith(_ASKS_FOR_USAGE)):
        return body, False
    if headers.get("content-encoding", "identity").strip().lower() != "identity":
        return body, False
    changed = amend(body)
    return (body, False) if changed is None else (changed, True)


def amend(body: bytes) -> bytes | None:
    """`body` asking for the usage chunk; None when it asks already or is not a JSON object."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(document, dict) or document.get("stream") is not True:
        return None
    if "stream_options" not in document:
        brace = body.index(b"{")  # a JSON object: only whitespace before its brace
        return body[: brace + 1] + _ASK + body[brace + 1 :]
    options = document["stream_options"]
    if options is None:
        options = document["stream_options"] = {}
    if not isinstance(options, dict) or options.get("include_usage") is True:
        return None  # asked already (its chunk reaches the client), or the provider's 400
    options["include_usage"] = True
    return orjson.dumps(document)


class UsageChunkFilter:
    """Withholds the usage chunk from the bytes a client receives; every other byte passes."""

    __slots__ = ("_is_after_usage", "_lines")

    def __init__(self) -> None:
        self._lines = LineReader()  # holds a line cut between two chunks, until its end
        self._is_after_usage = False  # the blank line ending the usage event goes too

    @staticmethod
    def applies(headers: Mapping[str, str]) -> bool:
        """Only an uncompressed event stream of unknown length can be cut line by line."""
        return (
            headers.get("content-type", "").startswith("text/event-stream")
            and headers.get("content-encoding", "identity").strip().lower() == "identity"
            and "content-length" not in headers
        )

    def __call__(self, chunk: bytes) -> bytes:
        """What of `chunk` (and of the line held before it) the client gets now."""
        if self._is_plain(chunk):  # most chunks: whole lines, none a usage chunk
            return chunk
        lines = self._lines.feed_raw(chunk)
        if not any(_MARKS_USAGE in line or _MARKS_USAGE_SPACED in line for line in lines):
            if not self._is_after_usage:
                return b"".join(lines)
        kept = []
        for line in lines:
            if self._is_after_usage and not line.strip():
                self._is_after_usage = False
                continue
            self._is_after_usage = False
            if _is_usage_chunk(line):
                self._is_after_usage = True
                continue
            kept.append(line)
        return b"".join(kept)

    def _is_plain(self, chunk: bytes) -> bool:
        """Whole lines after whole lines, no usage object in them: the chunk passes as is."""
        return (
            chunk[-1:] == b"\n"
            and not self._is_after_usage
            and self._lines.held_bytes == 0
            and chunk.find(_MARKS_USAGE) < 0  # find: faster than `in` for bytes
            and chunk.find(_MARKS_USAGE_SPACED) < 0
        )

    def rest(self) -> bytes:
        """At the end of the body: a last line that never got its line end."""
        rest = self._lines.rest()
        return b"" if _is_usage_chunk(rest) else rest


def _is_usage_chunk(line: bytes | bytearray) -> bool:
    if not line.startswith(b"data:"):
        return False
    try:
        event = orjson.loads(line[5:])
    except orjson.JSONDecodeError:
        return False
    return (
        isinstance(event, dict)
        and event.get("choices") == []
        and isinstance(event.get("usage"), dict)
    )
