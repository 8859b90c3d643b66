"""WORKERS without Redis: each worker keeps its own cache in memory, and a drop through the
admin API reaches every worker before it is answered."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import orjson

from tests.conftest import OPENAI_REAL, keys_document
from tests.support.processes import Processes, start_gateway, wait_listening

CACHED_VK = "vk_test_cached_workers_3d5e7f9a1b"
ADMIN_TOKEN = "admin-token-for-cache-workers-0123"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "say hello please"}]}


async def ask(session: aiohttp.ClientSession, url: str) -> tuple[str, bytes]:
    async with session.post(
        f"{url}/v1/chat/completions",
        data=orjson.dumps(CHAT),
        headers={"Authorization": f"Bearer {CACHED_VK}"},
    ) as response:
        assert response.status == 200
        return response.headers["x-llm-gateway-cache"], await response.read()


async def test_a_cache_drop_reaches_every_worker(
    processes: Processes, tmp_path: Path, fake_url: str
) -> None:
    # The drop answered 200 from one worker; the other kept serving the dropped answer
    # until its TTL ran out.
    document = keys_document(fake_url)
    document["virtual_keys"][CACHED_VK] = {
        "provider": "openai",
        "api_key": OPENAI_REAL,
        "name": "cached",
        "cache": {"ttl_seconds": 600},
    }
    keys = tmp_path / "cached-keys.json"
    keys.write_text(json.dumps(document))
    _, url = start_gateway(
        processes,
        keys,
        tmp_path / "log.jsonl",
        WORKERS="2",
        QUOTA_ENABLED="false",
        ADMIN_TOKEN=ADMIN_TOKEN,
    )
    await asyncio.to_thread(wait_listening, int(url.rsplit(":", 1)[1]), 2)
    # A connection per request: the kernel spreads them over both workers.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        stored = set()
        for _ in range(200):  # each worker misses once and stores its own answer
            cached, body = await ask(session, url)
            if cached == "miss":
                stored.add(body)
            if len(stored) == 2:
                break
        assert len(stored) == 2, "both workers store an answer"
        async with session.delete(
            f"{url}/admin/cache?key=cached", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        ) as dropped:
            assert dropped.status == 200, await dropped.text()
        after = [await ask(session, url) for _ in range(40)]
    served = [body for _, body in after]
    assert not stored & set(served), "a dropped answer is served after the drop's 200"
    # Both workers missed again, then answered from what they stored after the drop.
    assert [cached for cached, _ in after].count("miss") == 2
