"""Keys changed through the admin API in real gateway processes: created, used, rotated
(the old key works during its grace, refused after), revoked, and refused within a second
on a connection kept alive across the change, by every worker."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import keys_document
from tests.support.polling import until
from tests.support.processes import Processes, start_gateway

ADMIN = "admin-token-for-key-processes-0123"
HEADERS = {"Authorization": f"Bearer {ADMIN}"}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
REAL = "sk-real-made-in-a-process-0042"


class KeptAlive:
    """One client connection to a gateway, kept alive: each request on the same socket."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.connections = 0  # opened: one, if every request went on the same socket
        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(self._opened)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1), trace_configs=[trace]
        )

    async def _opened(self, *_: Any) -> None:
        self.connections += 1

    async def status(self, key: str) -> int:
        headers = {"Authorization": f"Bearer {key}"}
        async with self.session.post(
            f"{self.url}/v1/chat/completions", json=CHAT, headers=headers
        ) as response:
            await response.read()
            return response.status

    async def close(self) -> None:
        await self.session.close()


async def lifecycle(admin_url: str, urls: list[str]) -> dict[str, float]:
    """Create → use → rotate (grace) → revoke through `admin_url`, seen on every url; the
    seconds each change took to reach the slowest of them."""
    figures: dict[str, float] = {}
    clients = [KeptAlive(url) for url in urls for _ in range(2)]  # two connections each
    async with aiohttp.ClientSession() as admin:

        async def call(method: str, path: str, body: Any = None) -> tuple[int, Any]:
            async with admin.request(method, admin_url + path, json=body, headers=HEADERS) as r:
                return r.status, (await r.json() if r.status != 204 else None)

        async def everywhere(key: str, status: int, other: list[float] | None = None) -> bool:
            """Every client answered `status`; the times the others were asked, to `other`."""
            answers = []
            for client in clients:
                asked = time.monotonic()
                answers.append(await client.status(key))
                if other is not None and answers[-1] != status:
                    other.append(asked)
            return all(answer == status for answer in answers)

        try:
            status, made = await call(
                "POST", "/admin/keys", {"name": "proc", "provider": "openai", "api_key": REAL}
            )
            assert status == 201
            first = made["key"]
            # The deadlines only bound a failure (two loaded cores answer slowly), 15 s each.
            figures["create"] = await until(
                lambda: everywhere(first, 200), 15, "the new key served"
            )
            status, rotated = await call("POST", "/admin/keys/proc/rotate", {"grace_seconds": 2})
            assert status == 201
            second = rotated["key"]
            started = time.monotonic()
            figures["rotate"] = await until(lambda: everywhere(second, 200), 15, "the rotated key")
            assert await everywhere(first, 200)  # in its grace, everywhere
            await until(lambda: everywhere(first, 401), 15, "the old key refused after its grace")
            assert time.monotonic() - started >= 1.9  # not before the grace ended
            status, _ = await call("DELETE", "/admin/keys/proc")
            assert status == 204
            deleted, served = time.monotonic(), []
            # Refused within a second of the 204, measured by when each request still served
            # was asked, not by when a round of them came back (on two loaded cores a round of
            # four can take over a second, most of it the test's own turns).
            await until(lambda: everywhere(second, 401, served), 15, "the key revoked")
            figures["revoke"] = max(served, default=deleted) - deleted
            assert all(client.connections == 1 for client in clients)  # kept alive throughout
        finally:
            for client in clients:
                await client.close()
    return figures


async def test_a_key_made_rotated_and_revoked_in_a_gateway_of_two_workers_on_keys_json(
    processes: Processes, tmp_path: Path, fake_base: str, redis_url: str
) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(keys_document(fake_base)))
    _, url = start_gateway(
        processes,
        keys,
        tmp_path / "log.jsonl",
        ADMIN_TOKEN=ADMIN,
        WORKERS="2",
        REDIS_URL=redis_url,
        AUTH_FAILURE_LIMIT="100000",  # polling with keys not yet, or no longer, known
    )
    figures = await lifecycle(url, [url, url])
    print(f"file store, 2 workers: {figures}")
    assert figures["revoke"] < 1.0
    document = json.loads(keys.read_text())
    assert "proc" not in json.dumps(document) and REAL not in keys.read_text()


async def test_200_creates_at_once_on_two_workers_leave_a_valid_keys_json_with_all_200(
    processes: Processes, tmp_path: Path, fake_base: str, redis_url: str
) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(keys_document(fake_base)))
    _, url = start_gateway(
        processes,
        keys,
        tmp_path / "log.jsonl",
        ADMIN_TOKEN=ADMIN,
        WORKERS="2",
        REDIS_URL=redis_url,
    )
    connector = aiohttp.TCPConnector(limit=50)  # many connections: both workers write
    async with aiohttp.ClientSession(connector=connector, headers=HEADERS) as admin:

        async def create(n: int) -> int:
            body = {"name": f"crowd-{n:03d}", "provider": "openai", "api_key": REAL}
            async with admin.post(f"{url}/admin/keys", json=body) as response:
                return response.status

        statuses = await asyncio.gather(*(create(n) for n in range(200)))
    assert statuses == [201] * 200
    document = json.loads(keys.read_text())
    names = {entry.get("name") for entry in document["virtual_keys"].values()}
    assert {f"crowd-{n:03d}" for n in range(200)} <= names


async def test_a_key_made_on_one_worker_serves_at_once_on_every_worker(
    processes: Processes, tmp_path: Path, fake_base: str, redis_url: str
) -> None:
    """Automation makes a key and uses it at once: on a gateway of two workers, its first
    requests land on either worker (a new connection each), and each is served, not told
    401 while the other worker has yet to read keys.json."""
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(keys_document(fake_base)))
    _, url = start_gateway(
        processes, keys, tmp_path / "log.jsonl", ADMIN_TOKEN=ADMIN, WORKERS="2", REDIS_URL=redis_url
    )
    statuses: list[int] = []
    async with aiohttp.ClientSession() as admin:
        for round_ in range(15):
            body = {"name": f"made-{round_}", "provider": "openai", "api_key": REAL}
            async with admin.post(f"{url}/admin/keys", json=body, headers=HEADERS) as made:
                assert made.status == 201
                key = (await made.json())["key"]
            for _ in range(4):  # a connection of its own each: either worker may take it
                async with aiohttp.ClientSession() as user:
                    headers = {"Authorization": f"Bearer {key}"}
                    async with user.post(
                        f"{url}/v1/chat/completions", json=CHAT, headers=headers
                    ) as response:
                        await response.read()
                        statuses.append(response.status)
    assert statuses == [200] * len(statuses), str(statuses)
