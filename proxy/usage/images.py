"""OpenAI's images API: the usage GPT image models report, with its image parts.

An answer (generations, edits) is `{"created", "data": [...], "usage"?}`: GPT image models
report `usage` as {input_tokens, input_tokens_details {text_tokens, image_tokens,
cached_tokens?}, output_tokens, output_tokens_details {text_tokens, image_tokens}}, the
image tokens parts of the totals, priced at their own rates where the model has them
(`pricing`); DALL·E reports none (the request counts, and is not priced). A stream
(`stream: true`) reports it with `image_generation.completed` (`image_edit.completed`).
The SVG author's own usage (`svg_usage`) is not read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from proxy.usage.provider_usage import (
    CACHE_READ,
    COMPLETION,
    INPUT_IMAGE,
    OUTPUT_IMAGE,
    PROMPT,
    UsageFields,
)
from proxy.usage.reading import Reading

USAGE = UsageFields(
    counts=(("input_tokens", PROMPT), ("output_tokens", COMPLETION)),
    details=(
        ("input_tokens_details", "cached_tokens", CACHE_READ),
        ("input_tokens_details", "image_tokens", INPUT_IMAGE),
        ("output_tokens_details", "image_tokens", OUTPUT_IMAGE),
    ),
)


def is_usage(usage: dict[str, Any]) -> bool:
    """True for an images answer's usage: its details count image tokens."""
    return any(
        isinstance(details, dict) and "image_tokens" in details
        for details in (usage.get("input_tokens_details"), usage.get("output_tokens_details"))
    )


def _completed(event: dict[str, Any], reading: Reading) -> None:
    """The stream's last event, with the final image and its usage."""
    reading.reported.read(event.get("usage"), USAGE)
    reading.is_ended = True


EVENTS: Mapping[str, Callable[[dict[str, Any], Reading], None]] = {
    "image_generation.completed": _completed,
    "image_edit.completed": _completed,
}
