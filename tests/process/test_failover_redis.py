"""Failover with quotas on Redis: two gateways sharing one redis-server keep a key's quota
exact while its primary fails and every request is answered by the fallback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp.test_utils import TestClient

from proxy.app import build_app
from proxy.settings import Settings
from tests.app.test_failover import BACKUP, CHAT, PRIMARY, VK, WITH_FALLBACK, document, keys_seen
from tests.conftest import auth
from tests.support.fake_provider import FakeState, Fault


async def test_two_instances_on_one_redis_keep_quotas_exact_while_failing_over(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    tmp_path: Path,
    fake_base: str,
    fake: FakeState,
    redis_url: str,
) -> None:
    path = tmp_path / "keys.json"
    limited = {**WITH_FALLBACK, "quota": {"requests": 20, "window_seconds": 3600}}
    path.write_text(json.dumps(document(fake_base, **limited)))
    instances = []
    for n in range(2):
        settings = Settings.from_env(
            {
                "KEYS_FILE_PATH": str(path),
                "LOG_TO_FILE": "true",
                "LOG_FILE_PATH": str(tmp_path / f"log-{n}.jsonl"),
                "REDIS_URL": redis_url,
            }
        )
        instances.append(await aiohttp_client(build_app(settings)))
    fake.faults[PRIMARY] = Fault(503)

    async def one(n: int) -> int:
        response = await instances[n % 2].post("/v1/chat/completions", json=CHAT, headers=auth(VK))
        await response.read()
        return response.status

    statuses = await asyncio.gather(*(one(n) for n in range(60)))
    assert sorted(statuses) == [200] * 20 + [429] * 40, statuses
    assert (
        keys_seen(fake).count(BACKUP) == 20
    )  # each admitted request answered once, by the fallback
