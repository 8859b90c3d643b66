"""What a provider's answer says of its key and of the wait it asks, beyond its status: a
Retry-After (in seconds, ms or as a date; Gemini's `retryDelay` in its body), a quota spent
(OpenAI's 429 `insufficient_quota`), a key refused under a 400 (Anthropic's credit balance too
low, Google's API key not valid). The attempt loop (failover.py) asks it of the answers it keeps.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Mapping
from typing import Protocol

import orjson
from multidict import CIMultiDictProxy

from proxy.encodings import decode_body
from proxy.errors import GatewayError
from proxy.upstream.targets import Target

# Refusals of a key some providers answer 400, not 401 or 402 (`refused_as`): Anthropic's
# account out of credit, Google's API key not valid (revoked, expired, deleted).
LOW_CREDIT = b"credit balance is too low"
# OpenAI's 429 for a key whose account quota is spent: its Retry-After is no promise.
SPENT_QUOTA = "insufficient_quota"
GOOGLE_KEY_INVALID = (b"API_KEY_INVALID", b"API key not valid", b"API key expired")
# A key's account out of credit (Anthropic's billing_error, OpenRouter's and DeepSeek's
# insufficient balance), as OpenAI's 429 insufficient_quota is: another key or target may
# have some. The key rests; never asked again within the request.
OUT_OF_CREDIT = 402
# The most of a kept answer decoded to be read (as much as is kept: failover's KEPT_ANSWER_BYTES).
READ_BYTES = 1 << 20


class Kept(Protocol):
    """An answer read whole (failover's StoredAnswer): its headers and its body as it came."""

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def body(self) -> bytes: ...


def asked_wait(headers: CIMultiDictProxy[str]) -> float | None:
    """The wait the provider asked for, in seconds; None when it asked nothing (or nothing
    that is a wait: negative, NaN, infinite, not a number)."""
    asked_ms = _seconds(headers.get("retry-after-ms"))
    if asked_ms is not None:
        return asked_ms / 1000.0
    asked = headers.get("retry-after")
    if asked is None:
        return None
    if (seconds := _seconds(asked)) is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(asked).timestamp()
    except (TypeError, ValueError, OverflowError):  # a year past C's long: no date either
        return None
    return max(0.0, when - time.time())


def _seconds(text: str | None) -> float | None:
    """A number of seconds (or ms) as a header says it; None unless finite and not negative."""
    if text is None:
        return None
    try:
        seconds = float(text)
    except ValueError:
        return None
    return seconds if 0.0 <= seconds < math.inf else None


def _decoded(answer: Kept) -> bytes | None:
    """A kept answer's body as the provider coded it (the SDKs ask for gzip, br, zstd),
    decoded; None when it does not decode."""
    try:
        coding = answer.headers.get("content-encoding", "")
        return decode_body(answer.body, coding, READ_BYTES)
    except GatewayError:
        return None


def is_spent(answer: Kept) -> bool:
    """A 429 whose error's code is OpenAI's `insufficient_quota` (the key's account quota
    spent, till its plan or billing changes), not a rate limit of the moment."""
    body = _decoded(answer)
    if body is None or SPENT_QUOTA.encode() not in body:
        return False
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    error = document.get("error") if isinstance(document, dict) else None
    return isinstance(error, dict) and SPENT_QUOTA in (error.get("code"), error.get("type"))


def google_retry_delay(answer: Kept) -> float | None:
    """The wait a Google error asks for in its body (a `google.rpc.RetryInfo` detail's
    `retryDelay`, "52s"), as Gemini's 429s do with no Retry-After; None when it asks none."""
    body = _decoded(answer)
    if body is None or b"retryDelay" not in body:
        return None
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(document, list) and document:  # Gemini's OpenAI endpoint: a list of one
        document = document[0]
    error = document.get("error") if isinstance(document, dict) else None
    details = error.get("details") if isinstance(error, dict) else None
    for detail in details if isinstance(details, list) else ():
        delay = detail.get("retryDelay") if isinstance(detail, dict) else None
        if isinstance(delay, str) and delay.endswith("s"):
            return _seconds(delay[:-1])
    return None


def refuses_keys_with_400(target: Target) -> bool:
    """Whether the target's provider answers some refusals of a key with 400 (`refused_as`)."""
    provider = target.provider
    return (
        provider.api == "anthropic"
        or provider.name == "gemini"
        or provider.auth == "x-goog-api-key"
    )


def refused_as(answer: Kept) -> int | None:
    """The status a 400 stands for when it refuses the key rather than the request: 402 for
    Anthropic's account out of credit ("Your credit balance is too low to access the
    Anthropic API"), 401 for Google's key not valid (INVALID_ARGUMENT, reason
    API_KEY_INVALID); None for any other 400."""
    body = _decoded(answer)
    if body is None:
        return None
    if LOW_CREDIT in body:
        status = OUT_OF_CREDIT
    elif any(words in body for words in GOOGLE_KEY_INVALID):
        status = 401
    else:
        return None
    try:  # an error answer (Google's OpenAI endpoint: a list of one), not other words
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(document, list) and document:
        document = document[0]
    is_error = isinstance(document, dict) and isinstance(document.get("error"), dict)
    return status if is_error else None
