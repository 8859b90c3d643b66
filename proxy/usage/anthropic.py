"""Anthropic messages: their usage and text, in bodies and streams.

A message (a JSON body, or a stream's `message_start`) holds `content` blocks and `usage`
{input_tokens, output_tokens, cache_creation_input_tokens, cache_read_input_tokens},
whose cache counts are *not* in input_tokens: they are added to the prompt. A stream
reports in `message_start` and then in cumulative `message_delta`s (the last value of each
field wins); its text comes in `content_block_delta`s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from proxy.usage import estimate
from proxy.usage.provider_usage import CACHE_READ, CACHE_WRITE, COMPLETION, PROMPT, UsageFields
from proxy.usage.reading import Reading

USAGE = UsageFields(
    counts=(
        ("input_tokens", PROMPT),
        ("output_tokens", COMPLETION),
        ("cache_read_input_tokens", CACHE_READ),
        ("cache_creation_input_tokens", CACHE_WRITE),
    ),
    is_cache_beside_prompt=True,
)


def _content_block_delta(event: dict[str, Any], reading: Reading) -> None:
    delta = event.get("delta")
    if isinstance(delta, dict):
        reading.add_text(delta.get("text"))


def _message_start(event: dict[str, Any], reading: Reading) -> None:
    message = event.get("message")
    if isinstance(message, dict):
        reading.note_model(message.get("model"))
        reading.reported.read(message.get("usage"), USAGE)


def _message_delta(event: dict[str, Any], reading: Reading) -> None:
    reading.reported.read(event.get("usage"), USAGE)


# The stream events read, by type; every other type carries nothing metered.
EVENTS: Mapping[str, Callable[[dict[str, Any], Reading], None]] = {
    "content_block_delta": _content_block_delta,
    "message_start": _message_start,
    "message_delta": _message_delta,
}


def read_answer(document: dict[str, Any], reading: Reading) -> None:
    """One JSON answer: a message."""
    reading.note_model(document.get("model"))
    reading.reported.read(document.get("usage"), USAGE)
    if reading.reported.usage() is None:  # only an estimate needs the answer's length
        reading.chars = estimate.answer_chars(document)
