"""The 429s of the quota and the budget, with the waits the SDKs understand.

A refused request answers 429 with `Retry-After` (whole seconds until the window admits
it) and `retry-after-ms`. The OpenAI and Anthropic SDKs honour a wait of at most 60 s and
retry silently (twice by default), so a short wait looks like a slow request to their
user; past 60 s they would knock on a closed window with their own short backoff, so the
gateway says `x-should-retry: false` and they fail at once. An exhausted budget always
says `x-should-retry: false` (it frees up in hours or days), with OpenAI's code
`insufficient_quota`.
"""

from __future__ import annotations

import math
import time

from proxy.errors import GatewayError
from proxy.quota.ratelimit import ratelimit_headers
from proxy.quota.tracker import MICRO, Admission

# The OpenAI and Anthropic SDKs honour a Retry-After of at most 60 s; past that they use
# their own short backoff, which would only knock on a window that is still closed.
SDK_MAX_RETRY_WAIT_SECONDS = 60.0


def refusal(admission: Admission) -> GatewayError:
    """The 429 for a refused admission: over the budget, or over the quota."""
    wait = max(admission.retry_after_seconds, 0.001)
    headers = {
        "retry-after": str(max(1, math.ceil(wait))),
        "retry-after-ms": str(math.ceil(wait * 1000)),
    }
    headers.update(ratelimit_headers(admission))
    if admission.over_budget and admission.budget is not None:
        budget = admission.budget
        headers["x-should-retry"] = "false"
        frees = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + wait))
        return GatewayError(
            429,
            "insufficient_quota",
            f"Budget exhausted for this key: ${budget.usd:g} per {span(budget.window_seconds)} "
            f"(${admission.spent_micro_usd / MICRO:.4f} spent or reserved). "
            f"It frees up in {span(wait)}, at {frees}.",
            headers=headers,
        )
    if wait > SDK_MAX_RETRY_WAIT_SECONDS:
        headers["x-should-retry"] = "false"
        retry = f"Retry in {math.ceil(wait)} seconds."
    else:
        # Said for the operator reading the log line: the client may never see this 429.
        retry = (
            f"Retry in {math.ceil(wait)} seconds (an SDK retries a wait of "
            f"{SDK_MAX_RETRY_WAIT_SECONDS:g} s or less by itself)."
        )
    limits = admission.limits
    assert limits is not None  # only a quota or a budget refuses
    if admission.remaining_requests <= 0:
        what = f"{limits.requests} requests"
    else:
        what = f"{limits.tokens} tokens"
    return GatewayError(
        429,
        "rate_limit_exceeded",
        f"Quota exceeded for this key: {what} per {limits.window_seconds:g} seconds. {retry}",
        headers=headers,
    )


def span(seconds: float) -> str:
    """A duration for people: '45 seconds', '3 hours', '30 days'."""
    seconds = math.ceil(seconds)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0 or seconds >= 2 * size:
            count = round(seconds / size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds} second{'s' if seconds != 1 else ''}"
