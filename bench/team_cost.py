"""What teams, max_in_flight and model_quotas cost a request, on Redis: round trips and time.

    .venv/bin/python bench/team_cost.py [--requests 400]

One gateway (WORKERS=1, REDIS_URL to a redis-server of its own) in front of the mock
provider (answering at once). Two keys take turns, one request at a time: `plain` (a quota
of its own, as every key has) and `shared` (the same quota, in a team with a window and
max_in_flight, its own max_in_flight, and model_quotas matching the model it sends).
Printed per key: Redis calls per request (Redis's own INFO commandstats: EVALSHA and EVAL,
the scripts the tracker runs), and the median and p90 time per request at the client.
A call is one round trip: the admission of every scope is one, giving the slots back one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import redis
from harness import BENCH, ROOT, Processes, free_port, healthy, listening, med, pct, wait_until

PLAIN, SHARED = "vk_bench_plain_0123456789", "vk_bench_shared_0123456789"
BODY = {"model": "gpt-bench", "messages": [{"role": "user", "content": "Say hello."}]}
QUOTA = {"requests": 100_000_000, "window_seconds": 3600}


def keys_document(upstream: str) -> dict[str, object]:
    return {
        "providers": {"openai": {"base_url": f"{upstream}/v1"}},
        "teams": {"bench": {"quota": QUOTA, "max_in_flight": 1000}},
        "virtual_keys": {
            PLAIN: {"provider": "openai", "api_key": "sk-bench", "name": "plain", "quota": QUOTA},
            SHARED: {
                "provider": "openai",
                "api_key": "sk-bench",
                "name": "shared",
                "quota": QUOTA,
                "team": "bench",
                "max_in_flight": 1000,
                "model_quotas": [{"models": ["gpt-bench*"], "requests": 100_000_000}],
            },
        },
    }


def script_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval")
    )


async def drive(
    port: int, client: redis.Redis, requests: int
) -> dict[str, tuple[float, list[float]]]:
    """Per key: Redis script calls per request, and each request's seconds."""
    seen: dict[str, tuple[float, list[float]]] = {}
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        for name, key in (
            ("plain", PLAIN),
            ("shared", SHARED),
            ("plain", PLAIN),
            ("shared", SHARED),
        ):
            headers = {"Authorization": f"Bearer {key}"}
            for _ in range(20):  # warm: connections, scripts loaded
                async with session.post(url, json=BODY, headers=headers) as response:
                    await response.read()
            await asyncio.sleep(0.2)  # held settles and releases sent
            before, times = script_calls(client), []
            for _ in range(requests):
                started = time.perf_counter()
                async with session.post(url, json=BODY, headers=headers) as response:
                    await response.read()
                    assert response.status == 200, await response.text()
                times.append(time.perf_counter() - started)
            await asyncio.sleep(0.2)
            calls = (script_calls(client) - before) / requests
            previous = seen.get(name, (0.0, []))
            seen[name] = (previous[0] + calls / 2, previous[1] + times)
    return seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="per key, per turn")
    args = parser.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        print("redis-server is not installed", file=sys.stderr)
        return 2
    procs = Processes()
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        try:
            redis_port, mock_port, port = free_port(), free_port(), free_port()
            procs.start(
                [binary, "--port", str(redis_port), "--save", "", "--appendonly", "no"], None
            )
            mock = procs.start(
                [sys.executable, str(BENCH / "mock_provider.py"), "--port", str(mock_port)], None
            )
            wait_until(
                lambda: listening(redis_port) and listening(mock_port),
                "redis, mock",
                mock,
                tmp / "x",
            )
            (tmp / "keys.json").write_text(
                json.dumps(keys_document(f"http://127.0.0.1:{mock_port}"))
            )
            argv = [
                sys.executable, str(ROOT / "gateway.py"), "--server-host", "127.0.0.1",
                "--server-port", str(port), "--keys-file-path", str(tmp / "keys.json"),
                "--redis-url", f"redis://127.0.0.1:{redis_port}", "--workers", "1",
                "--log-to-file", "true", "--log-file-path", str(tmp / "log.jsonl"),
            ]  # fmt: skip
            gateway = procs.start(argv, None, tmp / "gateway.log")
            wait_until(lambda: healthy(port), "the gateway", gateway, tmp / "gateway.log")
            client = redis.Redis(port=redis_port)
            seen = asyncio.run(drive(port, client, args.requests))
            client.close()
        finally:
            procs.stop_all()
    for name, (calls, times) in seen.items():
        print(
            f"{name:>7}: {calls:.2f} Redis calls per request, "
            f"median {med(times) * 1e3:.3f} ms, p90 {pct(times, 90) * 1e3:.3f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
