"""The gateway's memory while 40 answers of 15 MB pass at once, and after.

Run from the repository root: `python bench/tap_memory.py [--quick] [--log-bodies]`. It
starts an upstream that answers every chat completion with one 15 MB JSON body (usage at
the end, as OpenAI sends it) and a real gateway process in front of it (quotas off, the log
to a temporary file), then sends 40 requests at once, three rounds (one with --quick),
reading every answer to the end. It prints the gateway's RSS idle, its peak while the
answers pass (read from /proc every 20 ms) and after each round, and how many answers had
their usage read exactly (the log lines). Before the bound, 40 such answers held 690 MB
after they ended. Every process it starts is stopped at the end.
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
import orjson
from aiohttp import web

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from harness import ROOT, Processes, free_port, healthy, rss_mb, wait_until  # noqa: E402

ANSWERS = 40
ANSWER_BYTES = 15 * 1024 * 1024
KEY = "vk_bench_tap_memory_1"
USAGE = {"prompt_tokens": 12, "completion_tokens": 3_900_000, "total_tokens": 3_900_012}


def serve_upstream(port: int) -> None:
    """The upstream: one 15 MB answer, built once, for every request."""
    body = orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "model": "gpt-4o-mini",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "x" * ANSWER_BYTES}}
            ],
            "usage": USAGE,
        }
    )

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    web.run_app(app, host="127.0.0.1", port=port, print=None)


async def one_round(url: str, pid: int) -> tuple[float, float]:
    """Send ANSWERS requests at once; the peak RSS while they ran, and the RSS after."""
    peak = rss_mb(pid)
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_mb(pid))
            await asyncio.sleep(0.02)

    async def ask(session: aiohttp.ClientSession) -> None:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        async with session.post(
            url, json=body, headers={"Authorization": f"Bearer {KEY}"}
        ) as reply:
            async for _ in reply.content.iter_chunked(1 << 16):
                pass  # read to the end, keep nothing

    watcher = asyncio.create_task(watch())
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        await asyncio.gather(*(ask(session) for _ in range(ANSWERS)))
    done.set()
    await watcher
    await asyncio.sleep(1.0)  # let the gateway finish its log lines
    return peak, rss_mb(pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round instead of three")
    parser.add_argument("--log-bodies", action="store_true", help="with LOG_BODIES=true")
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.upstream:
        serve_upstream(options.upstream)
        return
    processes = Processes()
    with tempfile.TemporaryDirectory(prefix="bench-tap-memory-") as scratch:
        try:
            run(processes, Path(scratch), 1 if options.quick else 3, options.log_bodies)
        finally:
            processes.stop_all()


def run(processes: Processes, scratch: Path, rounds: int, log_bodies: bool) -> None:
    upstream_port, gateway_port = free_port(), free_port()
    upstream_log, gateway_log = scratch / "upstream.log", scratch / "gateway.log"
    upstream = processes.start(
        [sys.executable, __file__, "--upstream", str(upstream_port)], None, upstream_log
    )
    keys = scratch / "keys.json"
    keys.write_text(
        json.dumps(
            {
                "providers": {"openai": {"base_url": f"http://127.0.0.1:{upstream_port}/v1"}},
                "virtual_keys": {KEY: {"provider": "openai", "api_key": "sk-bench-upstream"}},
            }
        )
    )
    interactions = scratch / "interactions.jsonl"
    env = {
        **os.environ,
        "KEYS_FILE_PATH": str(keys),
        "QUOTA_ENABLED": "false",
        "LOG_TO_FILE": "true",
        "LOG_FILE_PATH": str(interactions),
        "LOG_BODIES": "true" if log_bodies else "false",
    }
    gateway = processes.start(
        [
            sys.executable,
            str(ROOT / "gateway.py"),
            "--server-host",
            "127.0.0.1",
            "--server-port",
            str(gateway_port),
        ],
        None,
        gateway_log,
        env,
    )
    wait_until(lambda: healthy(gateway_port), "the gateway", gateway, gateway_log)
    wait_until(lambda: upstream_log.exists(), "the upstream", upstream, upstream_log)
    time.sleep(0.5)
    url = f"http://127.0.0.1:{gateway_port}/v1/chat/completions"
    idle = rss_mb(gateway.pid)
    print(
        f"{ANSWERS} answers of {ANSWER_BYTES // (1024 * 1024)} MB at once, LOG_BODIES={str(log_bodies).lower()}"
    )
    print(f"gateway RSS idle {idle:.1f} MB")
    for number in range(1, rounds + 1):
        peak, after = asyncio.run(one_round(url, gateway.pid))
        print(f"round {number}: peak {peak:.1f} MB, after the answers ended {after:.1f} MB")
    deadline = time.monotonic() + 60  # with LOG_BODIES each line carries 15 MB
    while time.monotonic() < deadline:
        if interactions.read_bytes().count(b"\n") >= ANSWERS * rounds:
            break
        time.sleep(0.1)
    lines = [json.loads(line) for line in interactions.read_text().splitlines()]
    exact = sum(1 for line in lines if line["usage"] and not line["usage"]["estimated"])
    print(
        f"{len(lines)} answers logged: usage read exactly {exact}, estimated {len(lines) - exact}"
    )


if __name__ == "__main__":
    main()
