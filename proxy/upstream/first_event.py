"""A stream's first event: is it a provider's error that another key or target may not have?

Providers answer some failures with a 200 and an event stream whose first event is the
error: Anthropic's `event: error` (`overloaded_error`, `rate_limit_error`, `api_error`),
OpenAI's and OpenAI-compatible servers' `data: {"error": {...}}`, OpenRouter's chunk with a
top-level `error` whose `code` is the status it stands for (after `: OPENROUTER PROCESSING`
comments), the Responses API's `error` event. The attempt loop (failover.py) asks this
module, for the bytes at hand before any went to the client, what that first event is.

Only a failure of the moment counts (overloaded, rate limited, a server error, timed out):
as the status it stands for (529, 429, 500, 503, 504...). An invalid request, a refused key,
a permission or a content policy fails the same everywhere: it is no failure here, and the
stream goes on as it came. The common stream, whose first event is content, is told by one
bytes search (`b"error"` absent) before any parsing.
"""

from __future__ import annotations

import enum
import json
from typing import Final, Literal

# Error kinds (`type`, else `code`, else Google's `status`) that say the provider could not
# serve now, as the HTTP status each stands for.
PASSING: Final = {
    "overloaded_error": 529,  # Anthropic
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "server_error": 500,  # OpenAI, OpenRouter
    "rate_limit_exceeded": 429,
    "requests": 429,  # OpenAI's rate limits: their type
    "tokens": 429,
    "service_unavailable": 503,
    "internal_error": 500,
    "UNAVAILABLE": 503,  # Google's status names
    "RESOURCE_EXHAUSTED": 429,
    "INTERNAL": 500,
    "DEADLINE_EXCEEDED": 504,
}
# Numeric codes (OpenRouter's: the HTTP status the error stands for) that are such failures.
PASSING_CODES: Final = frozenset((408, 429, 500, 502, 503, 504, 529))


class Undecided(enum.Enum):
    """The first event has not all come."""

    MORE = "more"


MORE: Final = Undecided.MORE


def failure(at_hand: bytes) -> tuple[str, int] | Literal[Undecided.MORE] | None:
    """What the stream's first event is, from the bytes of it at hand: (its error kind, the
    status it stands for) when a failure of the moment; None when anything else (content,
    an error that fails everywhere); MORE while that event has not all come."""
    if b"error" not in at_hand:  # the common stream: content first
        return None if b"data" in at_hand else MORE
    event = first_event(at_hand)
    if event is None:
        return MORE
    name, data = event
    try:
        parsed = json.loads(data)
    except ValueError:  # not JSON (a UnicodeDecodeError is one too)
        return None
    return _passing(parsed, name == b"error") if isinstance(parsed, dict) else None


def first_event(at_hand: bytes) -> tuple[bytes, bytes] | None:
    """The first event's name and data (its data lines joined), comments and empty events
    before it skipped; None while it has not all come (its blank line not yet here)."""
    text = at_hand.removeprefix(b"\xef\xbb\xbf").replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    blocks = text.split(b"\n\n")
    for block in blocks[:-1]:  # the last one is not yet ended
        name, data = b"", []
        for line in block.split(b"\n"):
            field, _, value = line.partition(b":")
            value = value.removeprefix(b" ")
            if field == b"event":
                name = value
            elif field == b"data":
                data.append(value)
        if data:
            return name, b"\n".join(data)
    return None


def _passing(event: dict[str, object], is_error_event: bool) -> tuple[str, int] | None:
    """An error event's kind and status when a failure of the moment, else None."""
    error = event.get("error")
    if not isinstance(error, dict):
        if is_error_event or event.get("type") == "error":  # the Responses API's error event
            error = event
        else:
            return None
    code = error.get("code")
    if type(code) is int:
        return (f"error {code}", code) if code in PASSING_CODES else None
    for name in ("type", "code", "status"):
        kind = error.get(name)
        if isinstance(kind, str) and kind in PASSING:
            return kind, PASSING[kind]
    return None
