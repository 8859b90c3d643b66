"""The OpenAI Responses API: its usage, text and stored response, in bodies and streams.

Answers are a `response` object (a JSON body, or in a stream the `response` of its
`response.*` events): `output` items hold what was generated, `usage` is {input_tokens,
output_tokens, input_tokens_details {cached_tokens}, output_tokens_details
{reasoning_tokens}}, details parts of the totals. A stream's final usage comes with
`response.completed` (or `.incomplete`, `.failed`); its text with
`response.output_text.delta`. The object's id and status are noted for a background
response's charge (`background.py`): when it finishes, and for a background stream already
when it starts (`response.created`, `.queued`, `.in_progress`), so a stream cut before its
end is owed, not forgotten.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

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

USAGE = UsageFields(
    counts=(("input_tokens", PROMPT), ("output_tokens", COMPLETION)),
    details=(
        ("input_tokens_details", "cached_tokens", CACHE_READ),
        ("input_tokens_details", "cache_write_tokens", CACHE_WRITE),
        ("input_tokens_details", "audio_tokens", INPUT_AUDIO),
        ("output_tokens_details", "reasoning_tokens", REASONING),
        ("output_tokens_details", "audio_tokens", OUTPUT_AUDIO),
    ),
)


def _text_delta(event: dict[str, Any], reading: Reading) -> None:
    reading.add_text(event.get("delta"))


def _finished(event: dict[str, Any], reading: Reading) -> None:
    """The final `response`, with its usage."""
    response = event.get("response")
    if isinstance(response, dict):
        reading.note_model(response.get("model"))
        reading.reported.read(response.get("usage"), USAGE)
        if reading.is_stored_noted:
            reading.note_stored(response)


def _started(event: dict[str, Any], reading: Reading) -> None:
    """A `response` still running: noted for a background stream, owed if it is cut."""
    response = event.get("response")
    if reading.is_started_noted and isinstance(response, dict):
        reading.note_stored(response)


# The stream events read, by type; every other type carries nothing metered.
EVENTS: Mapping[str, Callable[[dict[str, Any], Reading], None]] = {
    "response.output_text.delta": _text_delta,
    "response.completed": _finished,
    "response.incomplete": _finished,
    "response.failed": _finished,
    "response.created": _started,
    "response.queued": _started,
    "response.in_progress": _started,
}


def read_answer(document: dict[str, Any], reading: Reading) -> None:
    """One JSON answer: a `response` object."""
    reading.note_model(document.get("model"))
    reading.reported.read(document.get("usage"), USAGE)
    if reading.is_stored_noted:
        reading.note_stored(document)
    if reading.reported.usage() is None:  # only an estimate needs the answer's length
        reading.chars = estimate.answer_chars(document)
