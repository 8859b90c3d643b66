"""Many clients behind one address (a NAT, an ingress): one stale key locks out nobody else."""

from __future__ import annotations

import time
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.conftest import ANTHROPIC_VK, OPENAI_VK, auth
from tests.support.processes import Processes, start_gateway

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
ADMIN_TOKEN = "admin-token-shared-address-0123"
STALE_VK = "vk_test_openai_stale0000"  # a revoked key: begins as OPENAI_VK does


async def status(url: str, key: str, client: str, path: str = "/v1/chat/completions") -> int:
    headers = {**auth(key), "X-Forwarded-For": client}
    async with aiohttp.ClientSession() as session:
        if path.startswith("/v1/"):
            async with session.post(f"{url}{path}", json=CHAT, headers=headers) as response:
                return response.status
        async with session.get(f"{url}{path}", headers=headers) as response:
            return response.status


async def test_behind_an_ingress_a_stale_key_is_told_to_stop_and_locks_out_no_valid_key(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    _, url = start_gateway(
        processes,
        process_keys,
        tmp_path / "log.jsonl",
        TRUSTED_PROXIES="127.0.0.1",  # the test plays the ingress
        AUTH_FAILURE_LIMIT="3",
        ADMIN_TOKEN=ADMIN_TOKEN,
        QUOTA_ENABLED="false",
    )
    office = "198.51.100.7"  # everyone behind one NAT
    assert await status(url, OPENAI_VK, office) == 200
    stale = openai.AsyncOpenAI(
        base_url=f"{url}/v1",
        api_key=STALE_VK,
        max_retries=2,  # the SDK's default
        default_headers={"X-Forwarded-For": office},
    )
    for _ in range(3):
        with pytest.raises(openai.AuthenticationError):
            await stale.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as throttled:
        await stale.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    waited = time.monotonic() - started
    # Retry-After is the window's 60 s: without x-should-retry: false the SDK waits it, twice.
    # 30 s: loaded cores' room, still far under the 60 s a single retry would have waited.
    assert waited < 30, f"the SDK waited {waited:.1f} s on the lockout's 429"
    assert throttled.value.response.headers["x-should-retry"] == "false"
    # Everyone else at that address is served: a key used there before (though it begins
    # as the stale one does), a key never seen before, and the admin token.
    assert await status(url, OPENAI_VK, office) == 200
    assert await status(url, ANTHROPIC_VK, office) == 200
    assert await status(url, ADMIN_TOKEN, office, "/admin/keys") == 200
    # The stale key from another client behind the ingress has its own count.
    assert await status(url, STALE_VK, "198.51.100.8") == 401
