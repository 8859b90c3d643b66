"""Issue 22's timeout scenarios, measured on a real gateway process: what a slow provider costs.

    .venv/bin/python bench/timeouts.py [--checkout DIR] [--runs 3]

`--checkout` runs that checkout's gateway.py (say a worktree of main, for the figures
before a change); the fake provider (tests/support/fake_provider.py, in this process, so
its counts can be read) is this checkout's. Two scenarios:

- `slow`: REQUEST_TIMEOUT=2, RETRY_ATTEMPTS=2, a key whose primary has a fallback pool of
  three real keys; one non-streamed chat request the provider takes 5 s to answer
  (`x-fake-think-ms`). Printed: the requests the provider received (each one an answer
  it generates and bills), the seconds until the client's 504, and what the key was
  charged (`GET /usage`: tokens and dollars).
- `breaker`: REQUEST_TIMEOUT=1 and RETRY_DEADLINE_SECONDS=0.5 (as the defaults, 600 and
  60, a timed-out attempt leaves no time for a fallback); key A sends three such slow
  requests one after the other, then key B (same primary, same fallback) one ordinary
  request. Printed: the target that served B, and the primary's breaker state in /health.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from harness import ROOT, Processes, free_port, healthy, wait_until

sys.path.insert(0, str(ROOT))
from tests.support.fake_provider import FAKE_STATE, build_fake_provider, credential  # noqa: E402

KEY_A, KEY_B = "vk_bench_timeouts_a_0123456789", "vk_bench_timeouts_b_0123456789"
PRIMARY = "sk-bench-primary-0000000000"
POOL = ("sk-bench-pool-1111111111", "sk-bench-pool-2222222222", "sk-bench-pool-3333333333")
BODY = {
    "model": "gpt-4o-mini",
    "max_tokens": 1000,
    "messages": [{"role": "user", "content": "Write a long essay about the sea."}],
}
PRICES = {"*": {"input_mtok": 1.0, "output_mtok": 4.0}}
SLOW = {"x-fake-think-ms": "5000"}


def keys_document(upstream: str) -> dict[str, Any]:
    def key(name: str) -> dict[str, Any]:
        return {
            "name": name,
            "provider": "openai",
            "api_key": PRIMARY,
            "fallbacks": [{"provider": "backup", "api_keys": [{"api_key": k} for k in POOL]}],
            "quota": {"requests": 1000, "tokens": 1_000_000, "window_seconds": 3600},
            "budget": {"usd": 100, "window_seconds": 3600},
        }

    return {
        "providers": {
            "openai": {"base_url": f"{upstream}/v1"},
            "backup": {"base_url": f"{upstream}/v1"},
        },
        "virtual_keys": {KEY_A: key("a"), KEY_B: key("b")},
    }


async def start_fake() -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(build_fake_provider(), handler_cancellation=True, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


def start_gateway(
    procs: Processes, checkout: Path, tmp: Path, upstream: str, **env: str
) -> tuple[int, Path]:
    (tmp / "keys.json").write_text(json.dumps(keys_document(upstream)))
    (tmp / "prices.json").write_text(json.dumps({"openai": PRICES, "backup": PRICES}))
    port = free_port()
    argv = [
        sys.executable, str(checkout / "gateway.py"), "--server-host", "127.0.0.1",
        "--server-port", str(port), "--keys-file-path", str(tmp / "keys.json"),
        "--prices-file", str(tmp / "prices.json"), "--log-to-file", "true",
        "--log-file-path", str(tmp / "log.jsonl"),
    ]  # fmt: skip
    for name, value in env.items():
        argv += [f"--{name.lower().replace('_', '-')}", value]
    log = tmp / "gateway.log"
    gateway = procs.start(argv, None, log)
    wait_until(lambda: healthy(port), "the gateway", gateway, log)
    return port, log


async def usage_of(session: aiohttp.ClientSession, base: str, key: str) -> tuple[int, float]:
    async with session.get(f"{base}/usage", headers={"Authorization": f"Bearer {key}"}) as got:
        report = await got.json()
    return report["totals"]["tokens"], report["totals"]["spent_usd"]


async def slow(checkout: Path, tmp: Path, procs: Processes) -> dict[str, Any]:
    runner, upstream = await start_fake()
    try:
        port, _ = start_gateway(
            procs, checkout, tmp, upstream, REQUEST_TIMEOUT="2", RETRY_ATTEMPTS="2"
        )
        base = f"http://127.0.0.1:{port}"
        state = runner.app[FAKE_STATE]
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            headers = {"Authorization": f"Bearer {KEY_A}", **SLOW}
            async with session.post(
                f"{base}/v1/chat/completions", json=BODY, headers=headers
            ) as response:
                await response.read()
                status = response.status
            seconds = time.monotonic() - started
            await asyncio.sleep(0.5)  # the settle runs after the answer went out
            tokens, usd = await usage_of(session, base, KEY_A)
        generated = sum(1 for seen in state.requests if seen.method == "POST")
        return {"status": status, "generated": generated, "seconds": seconds, "tokens": tokens,
                "usd": usd}  # fmt: skip
    finally:
        await runner.cleanup()


async def breaker(checkout: Path, tmp: Path, procs: Processes) -> dict[str, Any]:
    runner, upstream = await start_fake()
    try:
        port, _ = start_gateway(
            procs, checkout, tmp, upstream, REQUEST_TIMEOUT="1", RETRY_DEADLINE_SECONDS="0.5"
        )
        base = f"http://127.0.0.1:{port}"
        state = runner.app[FAKE_STATE]
        async with aiohttp.ClientSession() as session:
            statuses = []
            for _ in range(3):
                headers = {"Authorization": f"Bearer {KEY_A}", **SLOW}
                async with session.post(
                    f"{base}/v1/chat/completions", json=BODY, headers=headers
                ) as response:
                    await response.read()
                    statuses.append(response.status)
            state.requests.clear()
            headers = {"Authorization": f"Bearer {KEY_B}"}
            async with session.post(
                f"{base}/v1/chat/completions", json=BODY, headers=headers
            ) as response:
                await response.read()
                b_status = response.status
            served = [credential(seen.headers) for seen in state.requests]
            async with session.get(f"{base}/health") as got:
                health = await got.json()
        return {
            "a_statuses": statuses,
            "b_status": b_status,
            "b_served_by": "primary" if served == [PRIMARY] else f"fallback {served}",
            "primary_breaker": health["targets"]["openai"]["state"],
        }
    finally:
        await runner.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", type=Path, default=ROOT, help="the gateway to run")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    for _ in range(args.runs):
        for scenario in (slow, breaker):
            procs = Processes()
            with tempfile.TemporaryDirectory() as directory:
                try:
                    result = asyncio.run(scenario(args.checkout, Path(directory), procs))
                finally:
                    procs.stop_all()
            print(f"{scenario.__name__}: {result}", flush=True)
            if scenario is slow:
                runs.append(result)
    print(
        f"slow, median of {len(runs)}: {statistics.median(r['generated'] for r in runs)} "
        f"answers generated, 504 after {statistics.median(r['seconds'] for r in runs):.1f} s, "
        f"charged {statistics.median(r['tokens'] for r in runs)} tokens, "
        f"${statistics.median(r['usd'] for r in runs)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
