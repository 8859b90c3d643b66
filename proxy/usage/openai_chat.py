"""OpenAI chat completions and (legacy) text completions: their usage, text, and exact streams.

Answers, as JSON bodies and as streams of `chat.completion.chunk` / `text_completion`
events (no `type` field): the text is in `choices[].delta.content` (chat, `message` in a
body) or `choices[].text` (completions). Beside it the model generates a refusal,
reasoning (`reasoning_content`, `reasoning`), tool calls (`tool_calls[].function.name`
and `.arguments`, a custom tool's `tool_calls[].custom.name` and `.input`, the older
`function_call`) and an audio transcript: each counted for an
estimate, none kept as the logged text. The usage object, in a body's `usage` or a
stream's last chunk (`choices: []`; Groq's, without stream_options: `x_groq.usage`), is {prompt_tokens, completion_tokens, prompt_tokens_details
{cached_tokens, audio_tokens}, completion_tokens_details {reasoning_tokens,
audio_tokens}}, whose details are parts of the totals; DeepSeek documents its cache hits as
`prompt_cache_hit_tokens` (a part of `prompt_tokens`, beside `prompt_cache_miss_tokens`), and
sends `prompt_tokens_details` only at times; Perplexity counts the web searches it ran (each
billed) as `num_search_queries`, and a deep research's reasoning as `reasoning_tokens`, beside
the completion (not a part of it: added to it). Embeddings report in the same fields (prompt only).

A request's prompt (`prompt_chars`, for the estimate and the reservation): chat's messages
(their content, and what earlier answers generated: tool calls, refusals, reasoning), its
`tools` and older `functions` definitions; completions' `prompt` and `suffix`; embeddings'
`input`. A prompt or an input may be a string, a list of strings, or tokens (a list of
integers, or a list of such lists): a token counts as 4 characters.

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
two chunks waits for its end (a few bytes, microseconds), unless it grows past
`USAGE_LINE_BYTES`: then it is not the usage chunk, and goes out as it comes (so a long
event is neither held whole nor copied once per chunk); only the usage chunk's `data:`
line and the blank line after it are withheld. So the gateway asks for the stream uncoded
(`Accept-Encoding: identity` upstream, `uncoded`: providers behind a compressing edge, as
OpenRouter's, code event streams when the SDKs' `gzip, deflate` allows it). A compressed
answer all the same, or a sized one, passes unfiltered (its bytes cannot be cut without
re-encoding it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from multidict import CIMultiDict, CIMultiDictProxy

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
    REASONING_BESIDE,
    TOTAL,
    WEB_SEARCHES,
    UsageFields,
)
from proxy.usage.reading import Reading
from proxy.usage.sse_lines import LineReader

USAGE = UsageFields(
    counts=(
        ("prompt_tokens", PROMPT),
        ("completion_tokens", COMPLETION),
        ("total_tokens", TOTAL),
        ("prompt_cache_hit_tokens", CACHE_READ),  # DeepSeek's cache hits, beside the details
        ("num_search_queries", WEB_SEARCHES),  # Perplexity's searches, each billed
        ("reasoning_tokens", REASONING_BESIDE),  # Perplexity's, beside the completion
    ),
    details=(
        ("prompt_tokens_details", "cached_tokens", CACHE_READ),
        ("prompt_tokens_details", "cache_write_tokens", CACHE_WRITE),
        ("prompt_tokens_details", "audio_tokens", INPUT_AUDIO),
        ("completion_tokens_details", "reasoning_tokens", REASONING),
        ("completion_tokens_details", "audio_tokens", OUTPUT_AUDIO),
    ),
)
# Strings a message (or a delta) holds beside its content, each generated by the model:
# a refusal, and reasoning (DeepSeek and vLLM's reasoning_content, OpenRouter's reasoning).
_GENERATED = frozenset(("refusal", "reasoning_content", "reasoning"))


def read_chunk(event: dict[str, Any], reading: Reading) -> None:
    """One stream event: a chat.completion.chunk or a text_completion."""
    if reading.model is None:
        reading.note_model(event.get("model"))
        reading.note_tier(event.get("service_tier"))
    choices = event.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if isinstance(choice, dict):
                delta = choice.get("delta")
                if isinstance(delta, dict):
                    content = delta.get("content")
                    reading.add_text(content)
                    if content is None or len(delta) > 1:  # most chunks: content alone
                        _read_generated(delta, reading)
                reading.add_text(choice.get("text"))
    usage = event.get("usage")
    if usage is None and "x_groq" in event:  # Groq: its last chunk's `x_groq.usage`
        groq = event["x_groq"]
        usage = groq.get("usage") if isinstance(groq, dict) else None
    if usage is not None:  # OpenAI's `"usage": null` on every chunk but the last
        reading.reported.read(usage, USAGE)
    # An error object sent mid-stream: OpenAI's alone; OpenRouter's at the top level of a
    # chunk whose choice finishes with "error" (beside choices: only an object, not a
    # null or a false some servers may send with every chunk).
    elif "error" in event:
        error = event["error"]
        if choices is None or isinstance(error, dict):
            reading.note_error(error)


def read_answer(document: dict[str, Any], reading: Reading) -> None:
    """One JSON answer: a chat.completion, a text_completion (or an embeddings list)."""
    reading.note_model(document.get("model"))
    reading.note_tier(document.get("service_tier"))
    reading.reported.read(document.get("usage"), USAGE)
    if reading.reported.is_reported:
        return  # only an estimate needs the answer's length
    choices = document.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if isinstance(choice, dict):
                message = choice.get("message")
                if isinstance(message, dict):
                    reading.chars += estimate.text_chars(message.get("content"))  # or parts
                    _read_generated(message, reading)
                reading.add_generated(choice.get("text"))


def prompt_chars(document: dict[str, Any]) -> int:
    """Characters of a chat, completions or embeddings request's prompt, every string of it."""
    chars = 0
    messages = document.get("messages")
    if isinstance(messages, list):
        history = Reading(keep_text=False)  # what earlier answers generated, counted alike
        for message in messages:
            if isinstance(message, dict):
                chars += estimate.text_chars(message.get("content"))
                _read_generated(message, history)
        chars += history.chars
    chars += estimate.json_chars(document.get("tools"))
    chars += estimate.json_chars(document.get("functions"))
    chars += estimate.string_chars(document.get("suffix"))
    return chars + _tokens_or_text(document.get("prompt")) + _tokens_or_text(document.get("input"))


def _tokens_or_text(value: object, depth: int = 0) -> int:
    """A prompt or an input: a string, a token (an integer), or lists of them, two deep."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return estimate.CHARS_PER_TOKEN
    if isinstance(value, list) and depth < 2:
        return sum(_tokens_or_text(item, depth + 1) for item in value)
    return 0


def _read_generated(message: dict[str, Any], reading: Reading) -> None:
    """What a message or a delta holds beside its content: every string the model generated."""
    for name, value in message.items():  # a delta holds one or two fields: no lookups
        if name in _GENERATED:
            reading.add_generated(value)
        elif name == "tool_calls":
            if isinstance(value, list):
                for call in value:
                    if isinstance(call, dict):  # a function's, or a custom tool's call
                        _read_function(call.get("function") or call.get("custom"), reading)
        elif name == "function_call":  # the older single call
            _read_function(value, reading)
        elif name == "audio" and isinstance(value, dict):
            reading.add_generated(value.get("transcript"))


def _read_function(function: object, reading: Reading) -> None:
    """A call's `name` and `arguments` (all a function object holds; a custom tool's call:
    its `name` and freeform `input`), counted."""
    if isinstance(function, dict):
        for value in function.values():
            if isinstance(value, str):
                reading.chars += len(value)


_ASK = b'"stream_options":{"include_usage":true},'
# A usage object, not the `"usage":null` OpenAI then adds to every other chunk.
_MARKS_USAGE, _MARKS_USAGE_SPACED = b'"usage":{', b'"usage": {'
# The usage chunk is well under 1 KiB: a line longer than this is not it, and is passed on
# as it comes instead of held to its end.
USAGE_LINE_BYTES = 64 * 1024
# The last event of an OpenAI stream (chat and text completions, and the compatible APIs).
# Completions streams that report usage only when asked (chat and legacy text completions).
_ASKS_FOR_USAGE = "completions"
# Azure OpenAI's api-versions before this one (GA 2024-06-01, 2024-02-01, ...) refuse
# stream_options with a 400: a request naming one is not asked (dates compare as text;
# "2024-09-01-preview" is the first that takes it, and the v1 API's "preview" comes after).
_AZURE_STREAM_OPTIONS = "2024-09-01"


# What pydantic's lax booleans read as true (vLLM's and SGLang's request models), besides true.
_TRUE_SPELLINGS = frozenset(("1", "on", "t", "true", "y", "yes"))


def is_set(flag: Any) -> bool:
    """A flag of a request body (`stream`, `background`) as the most lenient servers read it
    (pydantic's lax booleans, under vLLM and SGLang): true, 1, or "true", "yes", "on"..."""
    if flag is True:
        return True
    if isinstance(flag, int | float) and not isinstance(flag, bool):
        return flag == 1
    return isinstance(flag, str) and flag.strip().lower() in _TRUE_SPELLINGS


def amended(
    key: VirtualKey,
    tail: str,
    headers: Mapping[str, str],
    body: bytes,
    is_stream: bool,
    query: Mapping[str, str],
) -> tuple[bytes, bool]:
    """The body to send upstream, and whether the gateway asked for the usage chunk."""
    if not (key.exact_stream_usage and is_stream and tail.endswith(_ASKS_FOR_USAGE)):
        return body, False
    if headers.get("content-encoding", "identity").strip().lower() != "identity":
        return body, False
    if query.get("api-version", _AZURE_STREAM_OPTIONS) < _AZURE_STREAM_OPTIONS:
        return body, False
    changed = amend(body)
    return (body, False) if changed is None else (changed, True)


def uncoded(headers: CIMultiDictProxy[str]) -> CIMultiDictProxy[str]:
    """The client's headers for a stream whose usage chunk the gateway asked for: the answer
    asked for uncoded, so that the chunk can be cut out of its bytes (any client reads it)."""
    changed = CIMultiDict(headers)
    changed["Accept-Encoding"] = "identity"
    return CIMultiDictProxy(changed)


def amend(body: bytes) -> bytes | None:
    """`body` asking for the usage chunk; None when it asks already, is not a JSON object, or
    cannot be written again (nested deeper than orjson writes: it reads deeper)."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(document, dict) or not is_set(document.get("stream")):
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
    try:
        return orjson.dumps(document)
    except orjson.JSONEncodeError:
        return None


class UsageChunkFilter:
    """Withholds the usage chunk from the bytes a client receives; every other byte passes."""

    __slots__ = ("_is_after_usage", "_is_passing", "_lines", "_was_cr_kept")

    def __init__(self) -> None:
        self._lines = LineReader()  # holds a line cut between two chunks, until its end
        self._is_after_usage = False  # the blank line ending the usage event goes too
        # The line going by is too long to be the usage chunk: its bytes pass as they come.
        self._is_passing = False
        # The last chunk ended with a CR: whether its line went out (a LF opening the next
        # chunk is the rest of that line end, and goes where the CR went); None: it did not.
        self._was_cr_kept: bool | None = None

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
        if self._was_cr_kept is not None:
            return self._after_cr(chunk)
        if self._is_plain(chunk):  # most chunks: whole lines, none a usage chunk
            return chunk
        if self._is_passing:
            return self._passed(chunk)
        sent = self._filtered(chunk)
        if self._lines.held_bytes > USAGE_LINE_BYTES:
            # Held whole, a long line would reach the client only at its end (and be copied
            # once per chunk on the way): what came of it goes now, the rest as it comes.
            self._is_passing, self._is_after_usage = True, False
            sent += self._lines.rest()
        return sent

    def _passed(self, chunk: bytes) -> bytes:
        """Bytes of a line too long to be the usage chunk: to its end, as they come."""
        ends = [index for index in (chunk.find(b"\n"), chunk.find(b"\r")) if index >= 0]
        if not ends:
            return chunk
        self._is_passing = False
        end = min(ends) + 1
        if chunk[end - 1 : end + 1] == b"\r\n":
            end += 1
        elif end == len(chunk) and chunk[-1:] == b"\r":
            self._was_cr_kept = True  # a LF opening the next chunk goes where the CR went
        return chunk[:end] + self(chunk[end:]) if end < len(chunk) else chunk

    def _after_cr(self, chunk: bytes) -> bytes:
        """A chunk after one that ended with a CR: a LF opening it goes where the CR went."""
        was_kept, self._was_cr_kept = self._was_cr_kept, None
        if chunk[:1] != b"\n":
            return self(chunk)
        rest = self(chunk[1:]) if len(chunk) > 1 else b""
        return b"\n" + rest if was_kept else rest

    def _filtered(self, chunk: bytes) -> bytes:
        lines = self._lines.feed_raw(chunk)
        # The chunk ended with a CR: its line is given now (feed_raw holds no such line).
        is_cr_end = bool(lines) and lines[-1][-1:] == b"\r"
        if not any(_MARKS_USAGE in line or _MARKS_USAGE_SPACED in line for line in lines):
            if not self._is_after_usage:
                if is_cr_end:
                    self._was_cr_kept = True
                return b"".join(lines)
        kept = []
        is_kept = True
        for line in lines:
            is_kept = False
            if self._is_after_usage and not line.strip():
                self._is_after_usage = False
                continue
            self._is_after_usage = False
            if _is_usage_chunk(line):
                self._is_after_usage = True
                continue
            is_kept = True
            kept.append(line)
        if is_cr_end:
            self._was_cr_kept = is_kept
        return b"".join(kept)

    def _is_plain(self, chunk: bytes) -> bool:
        """Whole lines after whole lines, no usage object in them: the chunk passes as is."""
        return (
            chunk[-1:] == b"\n"
            and not self._is_after_usage
            and not self._is_passing
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
