"""The line a start prints before serving: what this gateway is about to do, in one reading.

llm-gateway starting: 4 keys from keys.json; quotas in memory, a request naming no
max_tokens reserves 4096 output tokens (OUTPUT_ALLOWANCE_TOKENS); admin off (set
ADMIN_TOKEN), file watch off, CORS off, traces off, Redis off, 1 worker

(the allowance is said only when a key has a token limit or a budget to reserve against; an
outbound proxy, "outbound proxy: https via proxy.corp:3128, 2 NO_PROXY entries", only when
HTTPS_PROXY, HTTP_PROXY or ALL_PROXY is set: its host and port, never its credentials)
"""

from __future__ import annotations

from proxy.keys.keys import KeyRing
from proxy.settings import Settings, masked_redis_url
from proxy.upstream.egress import Egress


def start_line(settings: Settings, key_ring: KeyRing) -> str:
    count = len(key_ring)
    keys = f"{count} key{'' if count == 1 else 's'} from {settings.keys_file_path}"
    if not settings.quota_enabled:
        store = "quotas off (QUOTA_ENABLED=false)"
    elif settings.redis_url is None:
        store = "quotas in memory (this process only)"
    else:
        store = f"quotas on Redis {masked_redis_url(settings.redis_url)}"
    metered = [key for key in key_ring if key.reserves]
    if metered:  # what a request naming no output cap holds of a token limit or a budget
        own = sum(1 for key in metered if key.output_allowance != settings.output_allowance_tokens)
        store += (
            f", a request naming no max_tokens reserves {settings.output_allowance_tokens} "
            "output tokens (OUTPUT_ALLOWANCE_TOKENS"
            + (f"; {own} key{' has its' if own == 1 else 's have their'} own)" if own else ")")
        )
    switches = [
        "admin on" if settings.admin_token else "admin off (set ADMIN_TOKEN)",
        f"file watch {'on' if settings.keys_file_watch else 'off'}",
        "CORS "
        + (", ".join(settings.cors_allowed_origins) if settings.cors_allowed_origins else "off"),
        f"traces {'on' if settings.is_tracing_on else 'off'}",
        f"Redis {'on' if settings.redis_url else 'off'}",
        f"{settings.worker_count} worker{'' if settings.worker_count == 1 else 's'}",
    ]
    egress = Egress.of(settings.proxies)
    if egress is not None:  # its host and port, never its credentials
        switches.append(f"outbound proxy: {egress.describe()}")
    return f"llm-gateway starting: {keys}; {store}; {', '.join(switches)}"
