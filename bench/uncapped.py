"""Issue 22 point 4's scenario: many concurrent requests that name no max_tokens against a
100-token window and a $0.01 budget, two workers on one Redis; what each checkout admits.

    .venv/bin/python bench/uncapped.py [--requests 300] [--allowance N] [before=../main after=.]

Each contender is `name=checkout` (default: `after=.` alone). For each, one redis-server
(no persistence, started here), and that checkout's gateway with WORKERS=2 and REDIS_URL
on one port; the fake provider of tests/support (this checkout's) answers every chat
completion with 1 prompt and 66 completion tokens (67, the issue's figure per request)
after `--think-ms` (a generation takes time: the burst overlaps as real traffic does).
Every token costs $0.0001 (PRICES_FILE). Two keys: `windowed` (a 100-token window) and
`budgeted` (a $0.01 budget), each sent `--requests` uncapped requests at once
(`{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}`), with
OUTPUT_ALLOWANCE_TOKENS from `--allowance` (unset: the checkout's default). Printed:
requests admitted, and tokens charged in the window / dollars spent once every one settled.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
from harness import ROOT, Processes, free_port, healthy, listening, wait_until

sys.path.insert(0, str(ROOT))

from tests.support.redis_server import RedisServer  # noqa: E402

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
TOKENS_EACH = 1 + 66
USD_PER_TOKEN = 0.0001
PRICES = {"openai": {"*": {"input_mtok": 100, "output_mtok": 100}}}
WINDOWED, BUDGETED = "vk_bench_windowed_4d5e6f7a8b9c0d", "vk_bench_budgeted_4d5e6f7a8b9c0d"


def keys_document(upstream: str) -> dict[str, Any]:
    real = {"provider": "openai", "api_key": "sk-bench-real-123456"}
    return {
        "providers": {"openai": {"base_url": f"{upstream}/v1"}},
        "virtual_keys": {
            WINDOWED: {**real, "name": "windowed", "quota": {"requests": 100_000, "tokens": 100}},
            BUDGETED: {**real, "name": "budgeted", "budget": {"usd": 0.01, "window_seconds": 3600}},
        },
    }


async def burst(url: str, key: str, count: int, think_ms: int) -> tuple[int, dict[str, Any]]:
    """`count` uncapped requests at once; how many were admitted, and the key's /usage once
    every admitted one was charged."""
    headers = {
        "Authorization": f"Bearer {key}",
        "x-fake-chunks": str(TOKENS_EACH - 1),
        "x-fake-think-ms": str(think_ms),
    }
    limits = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=limits) as session:

        async def one() -> int:
            async with session.post(f"{url}/v1/chat/completions", json=BODY, headers=headers) as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(one() for _ in range(count)))
        admitted = statuses.count(200)
        for _ in range(500):  # the settles ride on Redis a moment after the answers
            async with session.get(f"{url}/usage", headers={"Authorization": f"Bearer {key}"}) as r:
                usage: dict[str, Any] = await r.json()
            if usage["totals"]["tokens"] >= admitted * TOKENS_EACH:
                break
            await asyncio.sleep(0.02)
        return admitted, usage


def run(
    name: str, checkout: Path, upstream: str, tmp: Path, procs: Processes, args: Any
) -> list[str]:
    server = RedisServer(tmp / name)
    (tmp / name).mkdir()
    keys, prices = tmp / name / "keys.json", tmp / name / "prices.json"
    keys.write_text(json.dumps(keys_document(upstream)))
    prices.write_text(json.dumps(PRICES))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "OUTPUT_"))}
    env.update(
        PYTHONPATH=str(checkout),
        KEYS_FILE_PATH=str(keys),
        PRICES_FILE=str(prices),
        SERVER_HOST="127.0.0.1",
        SERVER_PORT=str(port),
        WORKERS="2",
        LOG_TO_FILE="true",
        LOG_FILE_PATH=str(tmp / name / "log.jsonl"),
    )
    if args.allowance is not None:
        env["OUTPUT_ALLOWANCE_TOKENS"] = str(args.allowance)
    server.start()
    try:
        env["REDIS_URL"] = server.url
        log = tmp / name / "gateway.log"
        child = procs.start([sys.executable, str(checkout / "gateway.py")], None, log, env=env)
        wait_until(lambda: healthy(port), name, child, log)
        url = f"http://127.0.0.1:{port}"
        count, think = args.requests, args.think_ms
        windowed, window = asyncio.run(burst(url, WINDOWED, count, think))
        budgeted, budget = asyncio.run(burst(url, BUDGETED, count, think))
        procs.stop(child)
    finally:
        server.kill()
    used, spent = window["tokens"]["used"], budget["budget"]["spent_usd"]
    return [
        f"{name:>8}  window 100 tokens: {windowed:3d} of {count} admitted, "
        f"{used:6,d} tokens charged ({used / 100:.2f}x the limit)",
        f"{name:>8}  budget $0.01:      {budgeted:3d} of {count} admitted, "
        f"${spent:.4f} spent ({spent / 0.01:.2f}x the budget)",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("contenders", nargs="*", default=["after=."])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--think-ms", type=int, default=1000, help="before each answer")
    parser.add_argument("--allowance", type=int, help="OUTPUT_ALLOWANCE_TOKENS (unset: default)")
    args = parser.parse_args()
    procs = Processes()
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        try:
            fake_port = free_port()
            fake_argv = [sys.executable, "-m", "tests.support.fake_provider"]
            fake_argv += ["--host", "127.0.0.1", "--port", str(fake_port)]
            fake = procs.start(fake_argv, None, tmp / "fake.log")
            wait_until(lambda: listening(fake_port), "the fake provider", fake, tmp / "fake.log")
            upstream = f"http://127.0.0.1:{fake_port}"
            for spec in args.contenders:
                name, _, directory = spec.partition("=")
                lines += run(name, Path(directory or ".").resolve(), upstream, tmp, procs, args)
        finally:
            procs.stop_all()
    print(
        f"{args.requests} concurrent requests without max_tokens, two workers on one Redis, "
        f"each answer {TOKENS_EACH} tokens after {args.think_ms} ms, ${USD_PER_TOKEN} a token, "
        f"OUTPUT_ALLOWANCE_TOKENS={args.allowance or 'default'}:"
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
