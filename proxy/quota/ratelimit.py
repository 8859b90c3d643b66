"""The gateway's own x-ratelimit-* headers, in place of the provider's.

Every proxied response of a key with a quota carries them, in the providers' style
(`x-ratelimit-remaining-tokens`, a reset written as `1m30s`), so a client that reads
OpenAI's headers reads the gateway's limits instead of the provider's. An answer that came
with Anthropic's `anthropic-ratelimit-*` (the whole account's limits) gets the gateway's in
their place, in Anthropic's shape (a reset as an RFC 3339 time). A request that
passed several windows (its key's, its team's, its model group's) is told the tightest
(`tightest`): the requests trio of the window with the fewest requests left, the tokens
trio of the one with the fewest tokens left, so a client pacing itself by them meets no
429 they did not foretell.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from multidict import CIMultiDict

from proxy.quota.tracker import Admission, Limits

_PREFIX = "x-ratelimit-"
_ANTHROPIC = "anthropic-ratelimit-"


def stamp(headers: CIMultiDict[str], admission: Admission) -> None:
    """Replace the provider's x-ratelimit-* headers with the gateway's own (keys with a quota),
    and Anthropic's anthropic-ratelimit-* when it sent them."""
    if admission.limits is None:
        return
    names = "\n".join(headers).lower()  # one scan, not one lower() a header
    anthropic = _ANTHROPIC in names
    if anthropic or _PREFIX in names:
        prefixes = (_PREFIX, _ANTHROPIC)
        for name in [name for name in headers if name.lower().startswith(prefixes)]:
            headers.popall(name, None)
    headers.extend(ratelimit_headers(admission))  # none is left to replace
    if anthropic:
        headers.extend(anthropic_headers(admission, time.time()))


def tightest(answers: Sequence[Admission]) -> Admission:
    """The first answer, its headers' figures taken from the windows with the least left."""
    first = answers[0]
    windowed = [answer for answer in answers if answer.limits is not None]
    if not windowed or (len(windowed) == 1 and windowed[0] is first):
        return first  # one window: its own figures
    requests = min(windowed, key=lambda answer: answer.remaining_requests)
    metered = [a for a in windowed if a.limits is not None and a.limits.tokens is not None]
    tokens = min(metered, key=lambda answer: answer.remaining_tokens or 0, default=None)
    assert requests.limits is not None
    limits = Limits(
        requests.limits.requests,
        tokens.limits.tokens if tokens is not None and tokens.limits is not None else None,
        requests.limits.window_seconds,
    )
    return first._replace(
        limits=limits,
        remaining_requests=requests.remaining_requests,
        reset_requests_seconds=requests.reset_requests_seconds,
        remaining_tokens=None if tokens is None else tokens.remaining_tokens,
        reset_tokens_seconds=None if tokens is None else tokens.reset_tokens_seconds,
    )


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


def anthropic_headers(admission: Admission, now: float) -> dict[str, str]:
    """anthropic-ratelimit-requests-{limit,remaining,reset} (and the tokens trio when set),
    each reset the Unix time `now` plus its wait, in RFC 3339 to the second, rounded up."""
    limits = admission.limits
    if limits is None:
        return {}
    headers = {
        "anthropic-ratelimit-requests-limit": str(limits.requests),
        "anthropic-ratelimit-requests-remaining": str(max(0, admission.remaining_requests)),
        "anthropic-ratelimit-requests-reset": instant(now + admission.reset_requests_seconds),
    }
    if limits.tokens is not None:
        headers["anthropic-ratelimit-tokens-limit"] = str(limits.tokens)
        headers["anthropic-ratelimit-tokens-remaining"] = str(
            max(0, admission.remaining_tokens or 0)
        )
        headers["anthropic-ratelimit-tokens-reset"] = instant(
            now + (admission.reset_tokens_seconds or 0.0)
        )
    return headers


def instant(unix_time: float) -> str:
    """A Unix time as Anthropic writes a reset: '2026-01-01T00:00:01Z', rounded up."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(math.ceil(unix_time)))


def duration(seconds: float) -> str:
    """A wait in the providers' style: '1m30s', '2.5s', '0s'."""
    if not seconds > 0:
        return "0s"
    # Rounded up to the millisecond before it is split: 59.9996 s is '1m0s', not '60s'.
    minutes, millis = divmod(math.ceil(seconds * 1000), 60_000)
    text = f"{millis / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    if minutes >= 1:
        hours, minutes = divmod(int(minutes), 60)
        text = (f"{hours}h" if hours else "") + f"{minutes}m" + text
    return text
