"""A client that leaves while its admission is on its way to Redis: the script still runs
there (it was written), so the request it admitted is settled like any other that ended
before it was sent: its reservation and its slot given back, nothing held for nobody."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp.test_utils import TestClient

from tests.conftest import auth
from tests.support.bodies import chat
from tests.support.polling import until
from tests.support.redis_server import RedisServer

VK = "vk_test_leaves_admitting_4d8e1a"
LIMITS = {"requests": 100, "tokens": 100_000, "window_seconds": 3600}


def unread_by_redis(port: int) -> bool:
    """Some connection to Redis holds bytes Redis has not read yet (it is stopped)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            rx_queue = int(fields[4].split(":")[1], 16)
            if local_port == port and fields[3] == "01" and rx_queue > 0:
                return True
    return False


async def test_a_client_leaving_while_redis_admits_it_leaves_no_reservation_behind(
    gateway_with_keys: Callable[..., Awaitable[TestClient]],
    redis_server: RedisServer,
    log_path: Path,
) -> None:
    key = {"provider": "openai", "api_key": "sk-real-leaves-1111", "name": "leaver"}
    entry = {**key, "quota": LIMITS, "max_in_flight": 4}
    gateway = await gateway_with_keys({VK: entry}, REDIS_URL=redis_server.url)
    first = await gateway.post("/v1/chat/completions", json=chat("warm"), headers=auth(VK))
    assert first.status == 200  # the gateway's one connection to Redis is open
    await first.read()

    async def idle() -> bool:
        usage = await (await gateway.get("/usage", headers=auth(VK))).json()
        return bool(usage["in_flight"]["used"] == 0)

    await until(idle, what="the first request's slot back")  # nothing else on its way
    assert redis_server.process is not None
    body = orjson.dumps(chat("leaving soon"))
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {VK}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        _, writer = await asyncio.open_connection(gateway.host, gateway.port)
        writer.write(head + body)
        await writer.drain()
        await until(lambda: unread_by_redis(redis_server.port), what="the admission sent")
        writer.close()  # the client leaves while its admission is in Redis's hands

        def logged() -> list[dict[str, Any]]:
            return [json.loads(line) for line in log_path.read_text().splitlines()]

        await until(lambda: len(logged()) == 2, what="the leaver's log line")
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    assert logged()[1]["status"] == 499

    async def given_back() -> bool:
        usage = await (await gateway.get("/usage", headers=auth(VK))).json()
        return bool(usage["tokens"]["reserved"] == 0 and usage["in_flight"]["used"] == 0)

    # Before: its 4,099 tokens (prompt and output allowance) reserved for nobody for 10
    # minutes, its slot held for 10 seconds.
    await until(given_back, what="the leaver's reservation given back")
    usage = await (await gateway.get("/usage", headers=auth(VK))).json()
    assert usage["requests"]["used"] == 2  # it was admitted, and is counted as its log line says
    assert usage["totals"]["tokens"] == logged()[0]["usage"]["total_tokens"]
