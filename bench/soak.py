"""A long mixed run: does the gateway's memory stay flat under every kind of traffic at once?

Run from the repository root: `.venv/bin/python bench/soak.py [--seconds 240] [--kinds a,b]
[--checkout DIR]`. A real gateway (quotas in memory, the log to a file, the admin API on) in
front of the fake provider (tests/support/fake_provider.py) gets rounds of 700 requests, 64
at a time, each of a kind picked at random (`--kinds`, default all):

    json, stream        an answer read whole, a stream of 20 events read whole
    abandon             a stream of which the client reads one chunk, then leaves
    leave               a client that leaves before the head (the provider holds it)
    hang, hangend       a stream whose provider stops mid-way, or before its end (client
                        leaves after 0.3 s)
    drop                a stream the provider cuts mid-way
    failover            a key whose first target refuses connections, its fallback answers
    cache               a key with a cache, 50 distinct questions (hits and misses)
    anthropic           Messages, half of them streams, a key with a quota of its own
    refuse, badjson     an unknown key (401, then the lockout's 429), a body that is not JSON
    ws                  a Realtime session: one response, then closed
    admin               a key created, used once, deleted (each a keys.json rewrite + reload)
    reload              POST /admin/reload

After each round: the gateway's RSS, anonymous RSS, threads, open files and mappings; at the
end, the same after the traffic stopped, and the growth from the first round to the end
(the first round warms caches and pools). Memory that grows with time and stays after the
traffic stops is a leak (bench/README.md: a reload froze what requests in flight left in
cycles, 62 -> 227 MB in 240 s before 2026-12-07).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from harness import ROOT, Processes, free_port, healthy, rss_mb, wait_until

KINDS = (
    "json,stream,abandon,leave,hang,hangend,drop,failover,cache,anthropic,refuse,badjson,"
    "ws,admin,reload"
).split(",")
ADMIN = "bench-soak-admin-token-0123456789"
PLAIN, FAILING, CACHED, CLAUDE = (
    "vk_soak_plain_0123456789",
    "vk_soak_failing_0123456789",
    "vk_soak_cached_0123456789",
    "vk_soak_claude_0123456789",
)
ROUND, AT_ONCE = 700, 64


def state(pid: int) -> str:
    status = Path(f"/proc/{pid}/status").read_text()
    threads = re.search(r"^Threads:\s+(\d+)", status, re.M)
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    maps = len(Path(f"/proc/{pid}/maps").read_text().splitlines())
    return (
        f"RSS {rss_mb(pid):6.1f} MB (anonymous {rss_mb(pid, 'RssAnon'):6.1f}), "
        f"threads {threads.group(1) if threads else '?'}, open files {fds}, mappings {maps}"
    )


async def one(session: aiohttp.ClientSession, base: str, kind: str) -> None:
    headers = {"Authorization": f"Bearer {PLAIN}"}
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": str(random.random())}]}
    stream = {**body, "stream": True}
    chat = base + "/v1/chat/completions"
    short = aiohttp.ClientTimeout(total=0.3)
    try:
        if kind == "json":
            async with session.post(chat, json=body, headers=headers) as r:
                await r.read()
        elif kind == "stream":
            async with session.post(
                chat, json=stream, headers={**headers, "x-fake-chunks": "20"}
            ) as r:
                await r.read()
        elif kind == "abandon":
            slow = {**headers, "x-fake-chunks": "50", "x-fake-delay-ms": "5"}
            async with session.post(chat, json=stream, headers=slow) as r:
                await r.content.readany()
        elif kind == "leave":
            held = {**headers, "x-fake-hang": "headers"}
            async with session.post(
                chat, json=body, headers=held, timeout=aiohttp.ClientTimeout(total=0.05)
            ) as r:
                await r.read()
        elif kind in ("hang", "hangend"):
            hung = {**headers, "x-fake-hang": "midstream" if kind == "hang" else "end"}
            async with session.post(chat, json=stream, headers=hung, timeout=short) as r:
                await r.read()
        elif kind == "drop":
            cut = {**headers, "x-fake-drop": "midstream", "x-fake-chunks": "10"}
            async with session.post(chat, json=stream, headers=cut) as r:
                await r.read()
        elif kind in ("failover", "refuse"):
            key = FAILING if kind == "failover" else "vk_soak_unknown_0123456789"
            async with session.post(
                chat, json=body, headers={"Authorization": f"Bearer {key}"}
            ) as r:
                await r.read()
        elif kind == "cache":
            asked = {**body, "messages": [{"role": "user", "content": f"q{random.randrange(50)}"}]}
            async with session.post(
                chat, json=asked, headers={"Authorization": f"Bearer {CACHED}"}
            ) as r:
                await r.read()
        elif kind == "anthropic":
            claude = {"x-api-key": CLAUDE, "anthropic-version": "2023-06-01"}
            message = {
                "model": "claude-haiku-4-5",
                "max_tokens": 50,
                "messages": [{"role": "user", "content": "hi"}],
                "stream": random.random() < 0.5,
            }
            async with session.post(base + "/v1/messages", json=message, headers=claude) as r:
                await r.read()
        elif kind == "badjson":
            async with session.post(chat, data=b"{nope", headers=headers) as r:
                await r.read()
        elif kind == "ws":
            url = base.replace("http", "ws", 1) + "/v1/realtime?model=gpt-realtime"
            async with session.ws_connect(url, headers=headers, protocols=("realtime",)) as ws:
                await ws.send_str('{"type":"response.create"}')
                async for message in ws:
                    if '"response.done"' in message.data:
                        break
        elif kind == "admin":
            admin = {"Authorization": f"Bearer {ADMIN}"}
            name = f"soak-{random.randrange(10**9)}"
            created = {"name": name, "provider": "openai", "api_key": "sk-soak-created"}
            async with session.post(base + "/admin/keys", json=created, headers=admin) as r:
                key = (await r.json())["key"]
            async with session.post(
                chat, json=body, headers={"Authorization": f"Bearer {key}"}
            ) as r:
                await r.read()
            async with session.delete(f"{base}/admin/keys/{name}", headers=admin) as r:
                await r.read()
        elif kind == "reload":
            async with session.post(
                base + "/admin/reload", headers={"Authorization": f"Bearer {ADMIN}"}
            ) as r:
                await r.read()
    except (TimeoutError, aiohttp.ClientError):
        pass  # the client's own leaving, or the provider's cut reaching it


async def drive(base: str, pid: int, seconds: float, kinds: list[str]) -> None:
    began, done, first = time.monotonic(), 0, None
    while time.monotonic() - began < seconds:
        connector = aiohttp.TCPConnector(limit=AT_ONCE)
        async with aiohttp.ClientSession(connector=connector) as session:
            await asyncio.gather(*(one(session, base, random.choice(kinds)) for _ in range(ROUND)))
        done += ROUND
        first = first if first is not None else rss_mb(pid)
        print(
            f"soak: {time.monotonic() - began:5.0f} s, {done:6d} requests: {state(pid)}", flush=True
        )
    await asyncio.sleep(3)
    print(f"soak: the traffic stopped 3 s ago: {state(pid)}")
    end = rss_mb(pid)
    rate = (end - (first or end)) / max(done - ROUND, 1) * 1000
    print(
        f"soak: RSS {first:.1f} MB after the first round, {end:.1f} MB at the end: "
        f"{end - (first or end):+.1f} MB over {done - ROUND:,} requests ({rate:+.2f} MB a thousand)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=240)
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"of {','.join(KINDS)}")
    parser.add_argument("--checkout", default=str(ROOT), help="whose gateway.py to run")
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    if unknown := set(kinds) - set(KINDS):
        parser.error(f"unknown kinds: {', '.join(sorted(unknown))}")
    procs = Processes()
    with tempfile.TemporaryDirectory(prefix="soak-") as where:
        tmp = Path(where)
        try:
            fake_log = tmp / "fake.log"
            fake_port, dead_port = free_port(), free_port()
            fake = procs.start(
                [sys.executable, "-m", "tests.support.fake_provider", "--port", str(fake_port)],
                None,
                fake_log,
            )
            wait_until(
                lambda: "http://" in fake_log.read_text(), "the fake provider", fake, fake_log
            )
            upstream = f"http://127.0.0.1:{fake_port}/v1"
            keys = {
                "providers": {
                    "openai": {"base_url": upstream},
                    "anthropic": {"base_url": upstream},
                    "refusing": {"base_url": f"http://127.0.0.1:{dead_port}/v1", "api": "openai"},
                },
                "virtual_keys": {
                    PLAIN: {"provider": "openai", "api_key": "sk-soak-1", "name": "plain"},
                    FAILING: {
                        "provider": "refusing",
                        "api_key": "sk-soak-2",
                        "name": "failing",
                        "fallbacks": [{"provider": "openai", "api_key": "sk-soak-3"}],
                    },
                    CACHED: {
                        "provider": "openai",
                        "api_key": "sk-soak-4",
                        "name": "cached",
                        "cache": {"ttl_seconds": 600},
                    },
                    CLAUDE: {
                        "provider": "anthropic",
                        "api_key": "sk-ant-soak-5",
                        "name": "claude",
                        "quota": {"requests": 10**9, "tokens": 10**12, "window_seconds": 60},
                    },
                },
            }
            (tmp / "keys.json").write_text(json.dumps(keys))
            port = free_port()
            env = {
                **os.environ,
                "KEYS_FILE_PATH": str(tmp / "keys.json"),
                "SERVER_HOST": "127.0.0.1",
                "SERVER_PORT": str(port),
                "LOG_TO_FILE": "true",
                "LOG_FILE_PATH": str(tmp / "log.jsonl"),
                "QUOTA_LIMIT": "1000000000",
                "QUOTA_WINDOW_SECONDS": "60",
                "ADMIN_TOKEN": ADMIN,
            }
            log = tmp / "gateway.log"
            gateway_py = str(Path(args.checkout) / "gateway.py")
            gateway = procs.start([sys.executable, gateway_py], None, log, env)
            wait_until(lambda: healthy(port), "the gateway", gateway, log, timeout=60)
            print(
                f"soak: {args.checkout}, kinds {','.join(kinds)}; at the start: {state(gateway.pid)}"
            )
            asyncio.run(drive(f"http://127.0.0.1:{port}", gateway.pid, args.seconds, kinds))
        finally:
            procs.stop_all()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.SubprocessError as error:
        sys.exit(f"soak: {error}")
