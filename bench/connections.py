"""Memory and latency while many connections dribble request heads.

Run from the repository root with the project's venv:
`.venv/bin/python bench/connections.py [--connections 300] [--headers 64] [--header-bytes 4000]`
(`make bench-connections`). Installs nothing; needs no tool beyond Python.

It starts the mock provider (`bench/mock_provider.py`) and the gateway (quotas off, the
interaction log to a file in a temp dir), reads the gateway's RSS idle, then opens
`--connections` connections that each send a request line and then `--headers` headers of
`--header-bytes` bytes, one every `--pause-ms`, and then hold on without finishing the head.
Meanwhile a normal chat request goes through the gateway every 100 ms on a connection of
its own. After `--seconds`, it prints the gateway's RSS (idle, peak), what became of the
dribblers (answered 431 for a head too large, refused 503 over MAX_CONNECTIONS, cut by the
head deadline, still open), and the normal requests' latency. Every process it starts is
stopped at the end, on failure and on Ctrl-C too.

Flags after `--` go to the gateway (`-- --client-header-timeout 5`). The target:
with 300 connections, RSS under 150 MB and a normal request under 100 ms. The default head
is the largest the gateway accepts (64 headers of 4,000 bytes); aiohttp's former limits let
a head hold 128 headers of 64 KiB (`--headers 128 --header-bytes 65000` shows it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import run  # noqa: E402  (bench/run.py: processes, readiness, /proc readings)

KEY = "vk_bench_0123456789"
CHAT = {"model": "gpt-bench", "messages": [{"role": "user", "content": "hi"}]}


async def dribble(port: int, headers: int, header_bytes: int, pause: float, end: float) -> str:
    """One slow client: a request line, then headers one by one, then silence. Its fate."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return "not connected"
    answer = asyncio.ensure_future(reader.read(64))
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\n")
        for index in range(headers):
            writer.write(b"x-pad-%d: " % index + b"a" * header_bytes + b"\r\n")
            await writer.drain()
            done, _ = await asyncio.wait({answer}, timeout=pause)
            if done:
                break
        await asyncio.wait({answer}, timeout=max(0.0, end - time.monotonic()))
    except ConnectionError:
        pass
    finally:
        writer.transport.abort()
    if not answer.done():
        answer.cancel()
        return "still open at the end"
    if answer.exception() is not None:
        return "reset"
    first = answer.result()
    if not first:
        return "cut (closed by the gateway)"
    return "answered " + first.split(b" ", 2)[1].decode()


async def probe(port: int, end: float) -> list[float]:
    """Normal chat requests, one every 100 ms; their latencies in ms."""
    latencies = []
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < end:
            started = time.perf_counter()
            async with session.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json=CHAT,
                headers={"Authorization": f"Bearer {KEY}"},
            ) as response:
                await response.read()
                assert response.status == 200, response.status
            latencies.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.1)
    return latencies


async def sample_rss(pid: int, end: float) -> float:
    peak = 0.0
    while time.monotonic() < end:
        peak = max(peak, run.rss_mb(pid))
        await asyncio.sleep(0.2)
    return peak


async def attack(args: argparse.Namespace, port: int, pid: int) -> None:
    end = time.monotonic() + args.seconds
    pause = args.pause_ms / 1000
    slots = asyncio.Semaphore(100)  # open connections 100 at a time, as a real flood would

    async def one() -> str:
        async with slots:
            opened = asyncio.ensure_future(
                dribble(port, args.headers, args.header_bytes, pause, end)
            )
            await asyncio.sleep(0.005)
        return await opened

    fates, latencies, peak = await asyncio.gather(
        asyncio.gather(*(one() for _ in range(args.connections))),
        probe(port, end),
        sample_rss(pid, end),
    )
    latencies.sort()
    print(
        f"dribbling connections: {args.connections} x {args.headers} headers of {args.header_bytes} bytes, {args.pause_ms} ms apart, for {args.seconds} s"
    )
    for fate, count in sorted(Counter(fates).items()):
        print(f"  {fate}: {count}")
    print(f"gateway RSS peak (MB): {peak:.1f}")
    print(
        f"normal requests meanwhile: {len(latencies)}, latency p50 {latencies[len(latencies) // 2]:.1f} ms, "
        f"max {latencies[-1]:.1f} ms"
    )


def main() -> int:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--connections", type=int, default=300)
    cli.add_argument("--headers", type=int, default=64)
    cli.add_argument("--header-bytes", type=int, default=4000)
    cli.add_argument("--pause-ms", type=int, default=50)
    cli.add_argument("--seconds", type=float, default=10.0)
    cli.add_argument("gateway_flags", nargs="*", help="after --: flags for gateway.py")
    args = cli.parse_args()
    procs = run.Processes()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-connections-") as tmp:
            temp = Path(tmp)
            mock_port, port = run.free_port(), run.free_port()
            mock_log = temp / "mock.log"
            mock = procs.start(
                [sys.executable, str(BENCH / "mock_provider.py"), "--port", str(mock_port)],
                None,
                mock_log,
            )
            run.wait_until(lambda: run.listening(mock_port), "the mock provider", mock, mock_log)
            keys = temp / "keys.json"
            keys.write_text(
                json.dumps(
                    {
                        "providers": {"openai": {"base_url": f"http://127.0.0.1:{mock_port}/v1"}},
                        "virtual_keys": {KEY: {"provider": "openai", "api_key": "sk-bench"}},
                    }
                )
            )
            log = temp / "gateway.log"
            gateway = procs.start(
                [
                    sys.executable,
                    str(ROOT / "gateway.py"),
                    "--server-host",
                    "127.0.0.1",
                    "--server-port",
                    str(port),
                    "--keys-file-path",
                    str(keys),
                    "--quota-enabled",
                    "false",
                    "--log-to-file",
                    "true",
                    "--log-file-path",
                    str(temp / "interactions.jsonl"),
                    "--shutdown-grace-seconds",
                    "1",
                    *args.gateway_flags,
                ],
                None,
                log,
            )
            run.wait_until(lambda: run.healthy(port), "the gateway", gateway, log)
            print(f"gateway RSS idle (MB): {run.rss_mb(gateway.pid):.1f}")
            asyncio.run(attack(args, port, gateway.pid))
    finally:
        procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
