"""Anthropic messages: their usage and text, in bodies and streams.

A message (a JSON body, or a stream's `message_start`) holds `content` blocks and `usage`
{input_tokens, output_tokens, cache_creation_input_tokens, cache_read_input_tokens},
whose cache counts are *not* in input_tokens: they are added to the prompt; nor is a
server-side compaction's sampling nor the advisor tool's (its `iterations` of type
"compaction", "advisor_message"): added too. An `iterations` list that names the message's
own samplings ("message", "fallback_message") is the whole account, as the top-level counts
hold only the executor's first sampling's input (and a server-side fallback's answer only:
the attempts that declined before it, billed when they wrote output, are listed). Its
`cache_creation` splits the cache writes by lifetime (the 1-hour ones cost more), its
`output_tokens_details.thinking_tokens` says how much of the output was thinking (logged as
reasoning), and its
`server_tool_use` counts the web searches the server ran (each priced); its `speed` says
whether fast mode served it ("fast": priced at fast mode's rates). A stream
reports in `message_start` and then in cumulative `message_delta`s (the last value of each
field wins); `message_start`'s output count is only a start (1), so a stream cut before a
`message_delta` has a provisional usage (`Reading.is_usage_provisional`). Its text comes in
`content_block_delta`s (`text_delta`), and so does what else the model generates: a tool call's input (`input_json_delta`, its name in the block's
start) and thinking (`thinking_delta`), counted for an estimate, not kept as the logged
text. Signatures and redacted thinking are opaque, not text: not counted.

A request's prompt (`prompt_chars`, for the estimate and the reservation; Bedrock's invoke
and Vertex's rawPredict of a Claude model send the same body): its `system` (a string or
text blocks), its messages' content (a string, or blocks: text, earlier tool calls' names
and input, tool results, thinking) and its `tools`' definitions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from proxy.usage import estimate
from proxy.usage.provider_usage import (
    CACHE_READ,
    CACHE_WRITE,
    CACHE_WRITE_1H,
    COMPLETION,
    PROMPT,
    REASONING,
    WEB_SEARCHES,
    UsageFields,
)
from proxy.usage.reading import Reading

USAGE = UsageFields(
    counts=(
        ("input_tokens", PROMPT),
        ("output_tokens", COMPLETION),
        ("cache_read_input_tokens", CACHE_READ),
        ("cache_creation_input_tokens", CACHE_WRITE),
    ),
    details=(
        ("cache_creation", "ephemeral_1h_input_tokens", CACHE_WRITE_1H),
        ("server_tool_use", "web_search_requests", WEB_SEARCHES),
        ("output_tokens_details", "thinking_tokens", REASONING),  # a part of output_tokens
    ),
    is_cache_beside_prompt=True,
    # Billed samplings the counts leave out: a server-side compaction's (at the request's
    # model), the advisor tool's (at its own model's rates, which its iteration names).
    iterations="iterations",
    iterations_beside=frozenset(("compaction", "advisor_message")),
    # The message's own samplings (the executor's, around an advisor's; a server-side
    # fallback's answer and the attempts that declined before it, billed when they wrote
    # output, at their own model's rates): when listed, the iterations are the whole account.
    iterations_samplings=frozenset(("message", "fallback_message")),
    iterations_served="fallback_message",
    iterations_apart=frozenset(("advisor_message",)),
)


def _content_block_start(event: dict[str, Any], reading: Reading) -> None:
    """A block begins: a tool call's name comes whole here, its input as deltas. A server-side
    fallback's block says which model answers from there on (`to.model`): the model that
    answered, where `message_start`, sent before the requested model declined, names that one."""
    block = event.get("content_block")
    if isinstance(block, dict):
        reading.add_generated(block.get("name"))
        reading.add_generated(block.get("text"))  # "" in practice: the text comes as deltas
        if block.get("type") == "fallback":
            served = block.get("to")
            if isinstance(served, dict):
                reading.note_model(served.get("model"))


def _content_block_delta(event: dict[str, Any], reading: Reading) -> None:
    delta = event.get("delta")
    if isinstance(delta, dict):
        kind = delta.get("type")
        if kind == "text_delta":
            reading.add_text(delta.get("text"))
        elif kind == "input_json_delta":  # a tool call's input, JSON in pieces
            reading.add_generated(delta.get("partial_json"))
        elif kind == "thinking_delta":
            reading.add_generated(delta.get("thinking"))


def _message_start(event: dict[str, Any], reading: Reading) -> None:
    message = event.get("message")
    if isinstance(message, dict):
        reading.note_model(message.get("model"))
        reading.reported.read(message.get("usage"), USAGE)
        reading.note_speed(message.get("usage"))
        # Its prompt counts are final; its output_tokens (1) only starts the count.
        reading.is_usage_provisional = isinstance(message.get("usage"), dict)


def _message_delta(event: dict[str, Any], reading: Reading) -> None:
    usage, delta = event.get("usage"), event.get("delta")
    reading.reported.read(usage, USAGE)
    if isinstance(usage, dict):
        reading.is_usage_provisional = False
        reading.note_speed(usage)
    if isinstance(delta, dict) and delta.get("stop_reason") is not None:
        # Why the message stopped, with the final usage: the whole answer (message_stop
        # carries nothing more; LiteLLM's synchronous stream stops reading here).
        reading.is_ended = True


def _message_stop(event: dict[str, Any], reading: Reading) -> None:
    reading.is_ended = True


def _error(event: dict[str, Any], reading: Reading) -> None:
    """The stream ends with an error (`overloaded_error`) after what it sent: noted. The
    Responses API's `error` event, of the same type, holds its `code` in the event itself."""
    error = event.get("error")
    reading.note_error(error if isinstance(error, dict) else {"code": event.get("code")})


# The stream events read, by type; every other type carries nothing metered.
EVENTS: Mapping[str, Callable[[dict[str, Any], Reading], None]] = {
    "error": _error,
    "content_block_start": _content_block_start,
    "content_block_delta": _content_block_delta,
    "message_start": _message_start,
    "message_delta": _message_delta,
    "message_stop": _message_stop,
}


def read_answer(document: dict[str, Any], reading: Reading) -> None:
    """One JSON answer: a message."""
    reading.note_model(document.get("model"))
    reading.reported.read(document.get("usage"), USAGE)
    reading.note_speed(document.get("usage"))
    if reading.reported.is_reported:
        return  # only an estimate needs the answer's length
    content = document.get("content")
    for block in content if isinstance(content, list) else ():
        if isinstance(block, dict):
            reading.add_generated(block.get("text"))
            reading.add_generated(block.get("thinking"))
            reading.add_generated(block.get("name"))  # a tool call's, and its input:
            if "input" in block:
                reading.chars += estimate.json_chars(block["input"])


def prompt_chars(document: dict[str, Any]) -> int:
    """Characters of a messages request's prompt, every string of it (images not counted)."""
    chars = _content_chars(document.get("system")) + estimate.json_chars(document.get("tools"))
    messages = document.get("messages")
    for message in messages if isinstance(messages, list) else ():
        if isinstance(message, dict):
            chars += _content_chars(message.get("content"))
    return chars


def _content_chars(content: object, depth: int = 0) -> int:
    """A string, or blocks; a tool result's content holds blocks of its own."""
    if isinstance(content, str):
        return len(content)
    if not isinstance(content, list) or depth > 1:
        return 0
    chars = 0
    for block in content:
        if isinstance(block, dict):
            chars += estimate.string_chars(block.get("text"))
            chars += estimate.string_chars(block.get("thinking"))
            chars += estimate.string_chars(block.get("name"))
            if "input" in block:
                chars += estimate.json_chars(block["input"])
            chars += _content_chars(block.get("content"), depth + 1)
    return chars
