"""OpenAI Realtime events over a WebSocket: the usage of each response, as frames go by.

The provider's `response.done` event carries `response.usage`: {input_tokens,
output_tokens, input_token_details {cached_tokens, audio_tokens}, output_token_details
{audio_tokens}}, details parts of the totals (transcriptions report in the same fields).
Each response's usage is handed on as it arrives (a session may last an hour: each is
charged then) and summed for the session's log line. A `response.done` whose usage holds
no valid count is a response of 0 tokens, handed on all the same.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson

from proxy.record import Usage
from proxy.usage.provider_usage import (
    CACHE_READ,
    COMPLETION,
    INPUT_AUDIO,
    OUTPUT_AUDIO,
    PROMPT,
    ProviderUsage,
    UsageFields,
)

USAGE = UsageFields(
    counts=(("input_tokens", PROMPT), ("output_tokens", COMPLETION)),
    details=(
        ("input_token_details", "cached_tokens", CACHE_READ),
        ("input_token_details", "audio_tokens", INPUT_AUDIO),
        ("output_token_details", "audio_tokens", OUTPUT_AUDIO),
    ),
)
_SUMMED = (
    "prompt_tokens",
    "completion_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "input_audio_tokens",
    "reasoning_tokens",
    "output_audio_tokens",
)


class SessionUsage:
    """The usage of a session's `response.done` events: each handed on at once, all summed."""

    __slots__ = ("_on_response", "_total")

    def __init__(self, on_response: Callable[[Usage], None]) -> None:
        self._on_response = on_response
        self._total: Usage | None = None

    def read(self, frame: bytes) -> None:
        """One provider text frame, already sent on; most cost one substring search."""
        if b"response.done" not in frame:
            return
        try:
            event = orjson.loads(frame)
        except orjson.JSONDecodeError:
            return
        if not isinstance(event, dict) or event.get("type") != "response.done":
            return
        response = event.get("response")
        usage = response.get("usage") if isinstance(response, dict) else None
        if not isinstance(usage, dict):
            return
        reported = ProviderUsage()
        reported.read(usage, USAGE)
        self._add(reported.usage() or Usage())

    def _add(self, usage: Usage) -> None:
        total = self._total
        if total is None:
            self._total = usage
        else:
            summed = {name: getattr(total, name) + getattr(usage, name) for name in _SUMMED}
            self._total = Usage(**summed, estimated=total.estimated or usage.estimated)
        self._on_response(usage)

    @property
    def total(self) -> Usage | None:
        """The session's usage; None when the provider reported none."""
        return self._total
