"""How fast a key change made on one instance reaches another, with KEYS_STORE=redis.

    .venv/bin/python bench/admin_keys.py [--rounds 50] [--workers 2]

Starts a redis-server, the mock provider and two gateways (each `--workers` workers,
KEYS_STORE=redis on that Redis). Each round creates a key through instance A's admin API
and polls instance B (`GET /usage` with the new key, on four kept-alive connections the
kernel spreads over B's workers) until all of them answer 200; then deletes the key through A and polls B until all answer 401. Prints the
median, 95th percentile and worst of both, measured from A's answer (201 or 204) to B's
first answer with the new state (the target: under 1 s, every time). A notification
lost on the way is caught up by the version B polls every 0.25 s: proved by
tests/process/test_admin_keys_redis.py, not timed here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from harness import ROOT, Processes, free_port, healthy, med, pct, wait_until

sys.path.insert(0, str(ROOT))

from tests.support.redis_server import RedisServer  # noqa: E402

ADMIN = "bench-admin-token-0123456789"
HEADERS = {"Authorization": f"Bearer {ADMIN}"}
TARGET_S = 1.0
CONNECTIONS = 4  # kept alive to B, spread by the kernel over its workers


def start(procs: Processes, tmp: Path, redis_url: str, workers: int) -> list[str]:
    mock_port = free_port()
    procs.start(
        [sys.executable, str(ROOT / "bench" / "mock_provider.py"), "--port", str(mock_port)],
        None,
        tmp / "mock.log",
    )
    keys = {
        "providers": {"openai": {"base_url": f"http://127.0.0.1:{mock_port}/v1"}},
        "virtual_keys": {"vk_bench_seed_0123456789": {"provider": "openai", "api_key": "sk-b"}},
    }
    (tmp / "keys.json").write_text(json.dumps(keys))
    urls = []
    for n in range(2):
        port = free_port()
        env = {
            **os.environ,
            "KEYS_FILE_PATH": str(tmp / "keys.json"),
            "SERVER_HOST": "127.0.0.1",
            "SERVER_PORT": str(port),
            "LOG_TO_FILE": "true",
            "LOG_FILE_PATH": str(tmp / f"log-{n}.jsonl"),
            "REDIS_URL": redis_url,
            "KEYS_STORE": "redis",
            "KEYS_STORE_SECRET": "bench-keys-store-secret",
            "ADMIN_TOKEN": ADMIN,
            "WORKERS": str(workers),
            "AUTH_FAILURE_LIMIT": "100000000",  # B is polled with keys it does not know yet
        }
        log = tmp / f"gateway-{n}.log"
        gateway = procs.start([sys.executable, str(ROOT / "gateway.py")], None, log, env)
        wait_until(lambda port=port: healthy(port), f"gateway {n}", gateway, log)  # type: ignore[misc]
        urls.append(f"http://127.0.0.1:{port}")
    return urls


async def until_status(session: aiohttp.ClientSession, url: str, key: str, status: int) -> None:
    """Poll on CONNECTIONS connections at once until every one answers `status`."""
    headers = {"Authorization": f"Bearer {key}"}

    async def one() -> int:
        async with session.get(f"{url}/usage", headers=headers) as response:
            await response.read()
            return response.status

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if await asyncio.gather(*(one() for _ in range(CONNECTIONS))) == [status] * CONNECTIONS:
            return
    raise SystemExit(f"bench: {url} never answered {status}")


async def rounds(a: str, b: str, count: int) -> tuple[list[float], list[float]]:
    created, revoked = [], []
    polling = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONNECTIONS))
    async with aiohttp.ClientSession(headers=HEADERS) as admin, polling:
        for n in range(count):
            body = {"name": f"bench-{n}-{time.time_ns()}", "provider": "openai", "api_key": "sk"}
            async with admin.post(f"{a}/admin/keys", json=body) as response:
                assert response.status == 201, await response.text()
                key = (await response.json())["key"]
            started = time.monotonic()
            await until_status(polling, b, key, 200)
            created.append(time.monotonic() - started)
            async with admin.delete(f"{a}/admin/keys/{body['name']}") as response:
                assert response.status == 204
            started = time.monotonic()
            await until_status(polling, b, key, 401)
            revoked.append(time.monotonic() - started)
    return created, revoked


def say(what: str, seconds: list[float]) -> None:
    worst = max(seconds)
    verdict = "within" if worst < TARGET_S else "OVER"
    print(
        f"{what}: median {med(seconds) * 1000:.1f} ms, p95 {pct(seconds, 95) * 1000:.1f} ms, "
        f"worst {worst * 1000:.1f} ms ({verdict} the {TARGET_S:g} s target, "
        f"{len(seconds)} rounds)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        server = RedisServer(tmp)
        server.start()
        procs = Processes()
        try:
            a, b = start(procs, tmp, server.url, args.workers)
            created, revoked = asyncio.run(rounds(a, b, args.rounds))
            print(f"two instances of {args.workers} workers on one Redis, A changes, B polled:")
            say("created on A, served by B", created)
            say("deleted on A, refused by B", revoked)
        finally:
            procs.stop_all()
            server.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
