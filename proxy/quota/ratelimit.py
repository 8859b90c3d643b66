"""The gateway's own x-ratelimit-* headers, in place of the provider's.

Every proxied response of a key with a quota carries them, in the providers' style
(`x-ratelimit-remaining-tokens`, a reset written as `1m30s`), so a client that reads
OpenAI's headers reads the gateway's limits instead of the provider's.
"""

from __future__ import annotations

import math

from multidict import CIMultiDict

from proxy.quota.tracker import Admission

_PREFIX = "x-ratelimit-"


def stamp(headers: CIMultiDict[str], admission: Admission) -> None:
    """Replace the provider's x-ratelimit-* headers with the gateway's own (keys with a quota)."""
    if admission.limits is None:
        return
    if _PREFIX in "\n".join(headers).lower():  # one scan, not one lower() a header
        for name in [name for name in headers if name.lower().startswith(_PREFIX)]:
            headers.popall(name, None)
    headers.extend(ratelimit_headers(admission))  # none is left to replace


def ratelimit_headers(admission: Admission) -> dict[str, str]:
    """x-ratelimit-{limit,remaining,reset}-requests, and the -tokens trio when set."""
    limits = admission.limits
    if limits is None:
        return {}
    headers = {
        "x-ratelimit-limit-requests": str(limits.requests),
        "x-ratelimit-remaining-requests": str(max(0, admission.remaining_requests)),
        "x-ratelimit-reset-requests": duration(admission.reset_requests_seconds),
    }
    if limits.tokens is not None:
        headers["x-ratelimit-limit-tokens"] = str(limits.tokens)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, admission.remaining_tokens or 0))
        headers["x-ratelimit-reset-tokens"] = duration(admission.reset_tokens_seconds or 0.0)
    return headers


def duration(seconds: float) -> str:
    """A wait in the providers' style: '1m30s', '2.5s', '0s'."""
    if not seconds > 0:
        return "0s"
    minutes, rest = divmod(seconds, 60.0)
    rest = math.ceil(rest * 1000) / 1000
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    if minutes >= 1:
        hours, minutes = divmod(int(minutes), 60)
        text = (f"{hours}h" if hours else "") + f"{minutes}m" + text
    return text
