"""Bedrock's native answers: AWS event-stream frames, and Converse's usage and text.

A Bedrock stream (`application/vnd.amazon.eventstream`) is binary frames, not SSE; botocore's
`EventStreamBuffer` decodes them (lengths and CRCs checked). Two kinds of stream come so:

    invoke-with-response-stream   frames of event type `chunk`, each {"bytes": base64 of one
                                  JSON event of the model's own API}: for Claude, Anthropic's
                                  message_start, content_block_delta, message_delta (read by
                                  `anthropic`); the last event also carries
                                  `amazon-bedrock-invocationMetrics` (input and output counts)
    converse-stream               frames whose event type names the event: contentBlockStart,
                                  contentBlockDelta (text, a tool's input, reasoning) and
                                  `metadata` with `usage` {inputTokens, outputTokens,
                                  cacheReadInputTokens, cacheWriteInputTokens,
                                  cacheDetails: the writes by lifetime, [{ttl, inputTokens}]}

The stream's last event (converse's `messageStop` and the `metadata` after it, invoke's chunk
with the invocation metrics, or Claude's message_stop) tells a client that left with the whole
answer from one cut before it. A stream that fails after its 200 ends with an `exception` frame (`:exception-type`
throttlingException, modelStreamErrorException, ...) or an `error` frame (`:error-code`):
its type is noted as the answer's error (never its message), nothing in it metered.

A Converse JSON answer (`/converse`) holds `output.message.content` and the same `usage`;
an invoke JSON answer is the model's own (a Claude message: `anthropic` reads it), and its
headers count its tokens for every model family (`X-Amzn-Bedrock-Input-Token-Count`,
`-Output-Token-Count`, `counted_in_headers`): what is charged when the body reports no usage
(a Llama's, a Mistral's, a Titan's). An error answered whole names its type in the
`x-amzn-ErrorType` header (`error_type`), its body only a message. Cache reads and writes are beside the input count, as
in Anthropic's usage.

A Converse request's prompt (`prompt_chars`, for the estimate and the reservation): its
`system` blocks, its messages' content blocks (text, earlier tool calls' names and input,
tool results' text and JSON, reasoning, guarded text) and `toolConfig`'s definitions. An
invoke request is the model's own API's body (a Claude model's: `anthropic` reads it).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from proxy.usage import anthropic, estimate
from proxy.usage.provider_usage import (
    CACHE_READ,
    CACHE_WRITE,
    CACHE_WRITE_1H,
    COMPLETION,
    PROMPT,
    UsageFields,
)
from proxy.usage.reading import Reading

EVENT_STREAM = "application/vnd.amazon.eventstream"

CONVERSE_USAGE = UsageFields(
    counts=(
        ("inputTokens", PROMPT),
        ("outputTokens", COMPLETION),
        ("cacheReadInputTokens", CACHE_READ),
        ("cacheWriteInputTokens", CACHE_WRITE),
    ),
    # The cache writes by lifetime: the 1-hour ones cost more.
    listed=(("cacheDetails", "ttl", "1h", "inputTokens", CACHE_WRITE_1H),),
    is_cache_beside_prompt=True,
)
INVOCATION_USAGE = UsageFields(
    counts=(
        ("inputTokenCount", PROMPT),
        ("outputTokenCount", COMPLETION),
        ("cacheReadInputTokenCount", CACHE_READ),
        ("cacheWriteInputTokenCount", CACHE_WRITE),
    ),
    is_cache_beside_prompt=True,
)


# InvokeModel counts every answer's tokens in its response headers, whatever the model family:
# a Llama's, Mistral's or Titan's body is the model's own, with no usage object read here.
# The headers, and the invocation metrics' fields (INVOCATION_USAGE) they stand for.
_COUNT_HEADERS = (
    ("x-amzn-bedrock-input-token-count", "inputTokenCount"),
    ("x-amzn-bedrock-output-token-count", "outputTokenCount"),
    ("x-amzn-bedrock-cache-read-input-token-count", "cacheReadInputTokenCount"),
    ("x-amzn-bedrock-cache-write-input-token-count", "cacheWriteInputTokenCount"),
)
# The header that says an answer's headers count its tokens (InvokeModel's: its answer is
# JSON; the streamed one counts in its last frame).
COUNTED = "x-amzn-bedrock-input-token-count"
# The header that names the type of an error answered whole (its body: only a `message`), as
# botocore reads it: `ThrottlingException`, or with AWS's suffix `ThrottlingException:http://…`.
ERROR_TYPE = "x-amzn-errortype"


def counted_in_headers(headers: Mapping[str, str]) -> dict[str, int] | None:
    """The token counts an InvokeModel answer's headers hold (INVOCATION_USAGE's fields);
    None without both the input's and the output's."""
    counts = {}
    for header, name in _COUNT_HEADERS:
        value = headers.get(header)
        if value is not None and value.strip().isdigit():
            counts[name] = int(value)
    return counts if "inputTokenCount" in counts and "outputTokenCount" in counts else None


def error_type(headers: Mapping[str, str]) -> str:
    """The type `x-amzn-ErrorType` names (without the suffix after its first `:`)."""
    return headers.get(ERROR_TYPE, "").partition(":")[0].strip()


class Frames:
    """An event stream fed chunk by chunk; each whole frame is read into `reading`."""

    __slots__ = ("_buffer", "_reading")

    def __init__(self, reading: Reading) -> None:
        from botocore.eventstream import EventStreamBuffer  # type: ignore[import-untyped]

        self._buffer = EventStreamBuffer()  # botocore loaded by the first Bedrock stream only
        self._reading = reading

    def feed(self, data: bytes) -> bool:
        """Read the frames `data` completes. False: the stream cannot be read any further."""
        from botocore.eventstream import ParserError

        self._buffer.add_data(data)
        try:
            for message in self._buffer:
                _read_frame(message.headers, message.payload, self._reading)
        except ParserError:  # a bad length or CRC: nothing after it can be framed
            return False
        return True

    @property
    def held_bytes(self) -> int:
        """The unfinished frame held (botocore refuses a frame past 24 MiB)."""
        return len(self._buffer._data)


def _read_frame(headers: Mapping[str, Any], payload: bytes, reading: Reading) -> None:
    message_type = headers.get(":message-type")
    if message_type != "event":
        # The stream failed under its 200: an exception (`throttlingException`,
        # `modelStreamErrorException`, ...) or an error (`:error-code`). Its type only.
        if message_type == "exception":
            reading.note_error({"type": headers.get(":exception-type")})
        elif message_type == "error":
            reading.note_error({"code": headers.get(":error-code")})
        return
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return
    if not isinstance(event, dict):
        return
    kind = headers.get(":event-type")
    if kind == "chunk":
        _read_chunk(event, reading)
    elif isinstance(kind, str):
        read = CONVERSE_EVENTS.get(kind)
        if read is not None:
            read(event, reading)


def _read_chunk(frame: dict[str, Any], reading: Reading) -> None:
    """An invoke stream's chunk: the model's own event, base64 inside JSON."""
    encoded = frame.get("bytes")
    if not isinstance(encoded, str):
        return
    try:
        event = orjson.loads(base64.b64decode(encoded, validate=True))
    except (binascii.Error, ValueError):
        return
    if not isinstance(event, dict):
        return
    kind = event.get("type")
    read = anthropic.EVENTS.get(kind) if isinstance(kind, str) else None
    if read is not None:
        read(event, reading)
    # Bedrock's own count, on the last event, whatever the model's API (its end: a Llama's
    # or a Titan's stream has no message_stop).
    metrics = event.get("amazon-bedrock-invocationMetrics")
    if metrics is not None:
        reading.reported.read(metrics, INVOCATION_USAGE)
        reading.is_ended = True


def _content_block_start(event: dict[str, Any], reading: Reading) -> None:
    start = event.get("start")
    tool = start.get("toolUse") if isinstance(start, dict) else None
    if isinstance(tool, dict):
        reading.add_generated(tool.get("name"))


def _content_block_delta(event: dict[str, Any], reading: Reading) -> None:
    delta = event.get("delta")
    if not isinstance(delta, dict):
        return
    reading.add_text(delta.get("text"))
    tool = delta.get("toolUse")
    if isinstance(tool, dict):
        reading.add_generated(tool.get("input"))
    thinking = delta.get("reasoningContent")
    if isinstance(thinking, dict):
        reading.add_generated(thinking.get("text"))


def _message_stop(event: dict[str, Any], reading: Reading) -> None:
    """Why the message stopped: the whole answer (its usage follows, in `metadata`)."""
    reading.is_ended = True


def _metadata(event: dict[str, Any], reading: Reading) -> None:
    """The stream's last event, with its usage."""
    reading.reported.read(event.get("usage"), CONVERSE_USAGE)
    reading.is_ended = True


# converse-stream's events read, by the frame's event type.
CONVERSE_EVENTS: Mapping[str, Callable[[dict[str, Any], Reading], None]] = {
    "contentBlockStart": _content_block_start,
    "contentBlockDelta": _content_block_delta,
    "messageStop": _message_stop,
    "metadata": _metadata,
}


def is_converse(document: dict[str, Any]) -> bool:
    """A Converse answer: `output.message` and a `stopReason`."""
    output = document.get("output")
    return isinstance(output, dict) and "message" in output and "stopReason" in document


def read_answer(document: dict[str, Any], reading: Reading) -> None:
    """One Converse JSON answer."""
    reading.reported.read(document.get("usage"), CONVERSE_USAGE)
    if reading.reported.is_reported:
        return  # only an estimate needs the answer's length
    output = document.get("output")
    message = output.get("message") if isinstance(output, dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    reading.chars += _blocks_chars(content)


def prompt_chars(document: dict[str, Any]) -> int:
    """Characters of a Converse request's prompt, every string of it (images not counted)."""
    chars = _blocks_chars(document.get("system")) + estimate.json_chars(document.get("toolConfig"))
    messages = document.get("messages")
    for message in messages if isinstance(messages, list) else ():
        if isinstance(message, dict):
            chars += _blocks_chars(message.get("content"))
    return chars


def _blocks_chars(blocks: object, depth: int = 0) -> int:
    """Converse content blocks, each a one-key object; a tool result holds blocks of its own."""
    if not isinstance(blocks, list) or depth > 1:
        return 0
    chars = 0
    for block in blocks:
        if not isinstance(block, dict):
            continue
        chars += estimate.string_chars(block.get("text")) + estimate.json_chars(block.get("json"))
        tool = block.get("toolUse")
        if isinstance(tool, dict):
            chars += estimate.string_chars(tool.get("name")) + estimate.json_chars(
                tool.get("input")
            )
        result = block.get("toolResult")
        if isinstance(result, dict):
            chars += _blocks_chars(result.get("content"), depth + 1)
        reasoning = block.get("reasoningContent")
        text = reasoning.get("reasoningText") if isinstance(reasoning, dict) else None
        if isinstance(text, dict):
            chars += estimate.string_chars(text.get("text"))
        guarded = block.get("guardContent")
        text = guarded.get("text") if isinstance(guarded, dict) else None
        if isinstance(text, dict):
            chars += estimate.string_chars(text.get("text"))
    return chars
