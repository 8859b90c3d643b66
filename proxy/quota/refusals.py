"""The 429s of the quota and the budget, with the waits the SDKs understand.

A refused request answers 429 with `Retry-After` (whole seconds until the window admits
it) and `retry-after-ms`. The OpenAI and Anthropic SDKs honour a wait of at most 60 s and
retry silently (twice by default), so a short wait looks like a slow request to their
user; past 60 s they would knock on a closed window with their own short backoff, so the
gateway says `x-should-retry: false` and they fail at once. An exhausted budget says so too
(it frees up in hours or days), with OpenAI's code `insufficient_quota`. A window or a
budget full only while requests in flight hold their reservations frees up when they
settle: its wait is a second, which the SDKs retry, and its code `rate_limit_exceeded`
(agents such as Codex give up at once on `insufficient_quota`); so is a budget that frees
up within the SDKs' 60 s (a budget of dollars a minute: a rate, not exhausted billing).
"""

from __future__ import annotations

import math
import time

from proxy.errors import GatewayError
from proxy.quota.ratelimit import ratelimit_headers
from proxy.quota.tracker import MICRO, Admission, Scope
from proxy.record import dollars

# The OpenAI and Anthropic SDKs honour a Retry-After of at most 60 s; past that they use
# their own short backoff, which would only knock on a window that is still closed.
SDK_MAX_RETRY_WAIT_SECONDS = 60.0


def refusal(admission: Admission, who: str | None = None) -> GatewayError:
    """The 429 for a refused admission: over the budget, or over the quota.

    `who` names the limit that refused when several apply (`label`); None: the key's own.
    """
    wait = max(admission.retry_after_seconds, 0.001)
    headers = {
        "retry-after": str(max(1, math.ceil(wait))),
        "retry-after-ms": str(math.ceil(wait * 1000)),
    }
    headers.update(ratelimit_headers(admission))
    if admission.over_budget and admission.budget is not None:
        budget = admission.budget
        spent = f"${dollars(admission.spent_micro_usd / MICRO)} spent or reserved"
        # Held only by requests in flight, or free again within the wait the SDKs sleep (a
        # budget of dollars a minute), it is not exhausted: a rate limit, which SDKs and
        # agents retry (Codex ends its turn at once on insufficient_quota: billing exhausted).
        exhausted = not admission.awaits_in_flight and wait > SDK_MAX_RETRY_WAIT_SECONDS
        code = "insufficient_quota" if exhausted else "rate_limit_exceeded"
        if admission.awaits_in_flight:
            frees = f"It has room once requests in flight settle: retry in {span(wait)}."
        else:
            if exhausted:
                headers["x-should-retry"] = "false"
            at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + wait))
            frees = f"It frees up in {span(wait)}, at {at}."
        return GatewayError(
            429,
            code,
            f"Budget exhausted for {who or 'this key'}: "
            f"${dollars(budget.usd)} per {span(budget.window_seconds) if who is None else per(budget.window_seconds)} "
            f"({spent}). {frees}",
            headers=headers,
        )
    if admission.awaits_in_flight:
        retry = "Requests in flight hold the rest until they settle: retry in 1 second."
    elif wait > SDK_MAX_RETRY_WAIT_SECONDS:
        headers["x-should-retry"] = "false"
        retry = f"Retry in {counted(math.ceil(wait), 'second')}."
    else:
        # Said for the operator reading the log line: the client may never see this 429.
        retry = (
            f"Retry in {counted(math.ceil(wait), 'second')} (an SDK retries a wait of "
            f"{SDK_MAX_RETRY_WAIT_SECONDS:g} s or less by itself)."
        )
    limits = admission.limits
    assert limits is not None  # only a quota or a budget refuses
    if admission.names_requests:
        what = counted(limits.requests, "request")
    else:
        what = counted(limits.tokens or 0, "token")
    if who is not None:
        return GatewayError(
            429,
            "rate_limit_exceeded",
            f"Quota exceeded for {who}: {what} per {per(limits.window_seconds)}. {retry}",
            headers=headers,
        )
    return GatewayError(
        429,
        "rate_limit_exceeded",
        f"Quota exceeded for this key: {what} per {limits.window_seconds:g} seconds. {retry}",
        headers=headers,
    )


def counted(count: int, noun: str) -> str:
    """'1 request', '1,000 requests'."""
    return f"{count:,} {noun}{'s' if count != 1 else ''}"


def per(seconds: float) -> str:
    """A window for people: 'hour', '30 days', '90 seconds' (as in '1,000 requests per hour')."""
    text = span(seconds)
    return text[2:] if text.startswith("1 ") else text


def span(seconds: float) -> str:
    """A duration for people: '45 seconds', '3 hours', '30 days'."""
    seconds = math.ceil(seconds)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0 or seconds >= 2 * size:
            count = round(seconds / size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds} second{'s' if seconds != 1 else ''}"


def label(scope: Scope, key_name: str) -> str:
    """How a refusal names a limit: key 'alice', team 'research', or a model group."""
    if scope.kind == "team":
        return f"team '{scope.name}'"
    if scope.kind == "model":
        return f"key '{key_name}' for models {scope.name}"
    return f"key '{key_name}'"


def concurrency_refusal(scope: Scope, key_name: str, waited: float) -> GatewayError:
    """The 429 of a request over a max_in_flight (after waiting `waited` seconds for a slot)."""
    cap = scope.max_in_flight
    queued = f" (waited {waited:g} seconds for a slot)" if waited else ""
    return GatewayError(
        429,
        "concurrency_limit_exceeded",
        f"Too many requests in flight: {label(scope, key_name)}: {cap} at once{queued}. "
        "Retry in 1 second.",
        headers={"retry-after": "1", "retry-after-ms": "1000"},
    )
