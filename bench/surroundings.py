"""The gateway when its surroundings fail: figures for each scenario, before and after.

Run from the repository root with the project's venv:
`.venv/bin/python bench/surroundings.py SCENARIO`, SCENARIO one of:

- `stuck-stdout`: the log goes to stdout (the default), a pipe nobody reads; LOG_BODIES on;
  `--requests` chat requests with a `--body-kb` prompt, 50 at a time. Prints the gateway's
  RSS before and after, how many requests were answered, then SIGTERM with a 3 s grace:
  the seconds until the process ended (30 s at most; then it is killed).
- `rotate`: the log in a file; for each of logrotate's `create` (mv), `copytruncate` and a
  plain `rm`, requests before and after, then SIGHUP and more requests: how many lines the
  file at LOG_FILE_PATH holds of those sent after the rotation.
- `deaf-websocket`: a Realtime client that asks for 400 frames of 64 KiB and reads none,
  REALTIME_IDLE_TIMEOUT=2: when its session ended (30 s at most); then another such
  session and SIGTERM with a 3 s grace: the seconds until the process ended.
- `hung-collector`: traces sent to a collector that accepts and never answers, 40
  requests, then SIGTERM with a 1 s grace: the seconds until the process ended.

It starts the fake provider (tests/support/fake_provider.py) and one gateway per scenario,
and stops every process it started, on failure too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import OPENAI_VK, keys_document  # noqa: E402
from tests.support.processes import Processes, start_gateway  # noqa: E402

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def fake_provider(processes: Processes) -> str:
    process = processes.start(
        [sys.executable, "-m", "tests.support.fake_provider", "--host", "127.0.0.1", "--port", "0"]
    )
    assert process.stdout is not None
    return process.stdout.readline().strip().rsplit(" ", 1)[1]


async def send(url: str, count: int, body_kb: int, concurrency: int = 50) -> int:
    """`count` chat requests, `concurrency` at a time; how many were answered 200."""
    prompt = "x" * (body_kb * 1024)
    chat = {**CHAT, "messages": [{"role": "user", "content": prompt}]}
    semaphore = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {OPENAI_VK}"}
    timeout = aiohttp.ClientTimeout(total=30)

    async def one(session: aiohttp.ClientSession) -> bool:
        async with semaphore:
            try:
                async with session.post(
                    f"{url}/v1/chat/completions", json=chat, headers=headers
                ) as response:
                    await response.read()
                    return response.status == 200
            except (TimeoutError, aiohttp.ClientError):
                return False

    async with aiohttp.ClientSession(timeout=timeout) as session:
        answered = await asyncio.gather(*(one(session) for _ in range(count)))
    return sum(answered)


def ended_within(process: subprocess.Popen[str], limit: float) -> float | None:
    """Seconds until `process` exits, or None if it outlived `limit`."""
    started = time.monotonic()
    try:
        process.wait(limit)
    except subprocess.TimeoutExpired:
        return None
    return time.monotonic() - started


async def stuck_stdout(args: argparse.Namespace, processes: Processes, keys: Path) -> None:
    process, url = start_gateway(
        processes,
        keys,
        Path(os.devnull),
        LOG_TO_FILE="false",
        LOG_BODIES="true",
        QUOTA_ENABLED="false",
        SHUTDOWN_GRACE_SECONDS="3",
    )
    before = rss_mb(process.pid)
    answered = await send(url, args.requests, args.body_kb)
    after = rss_mb(process.pid)
    process.send_signal(signal.SIGTERM)
    took = await asyncio.to_thread(ended_within, process, 30)
    print(f"stuck stdout: {answered}/{args.requests} answered, RSS {before:.0f} -> {after:.0f} MB")
    print(
        "  SIGTERM (grace 3 s): "
        + (f"exited in {took:.1f} s" if took is not None else "still running after 30 s")
    )


async def rotate(args: argparse.Namespace, processes: Processes, keys: Path, tmp: Path) -> None:
    for mode in ("create", "copytruncate", "rm"):
        log = tmp / f"{mode}.jsonl"
        process, url = start_gateway(processes, keys, log, QUOTA_ENABLED="false")
        await send(url, 10, 0)
        await asyncio.sleep(0.3)  # the writer hands lines over within 10 ms
        if mode == "create":
            log.rename(tmp / f"{mode}.jsonl.1")
            log.touch()
        elif mode == "copytruncate":
            (tmp / f"{mode}.jsonl.1").write_bytes(log.read_bytes())
            os.truncate(log, 0)
        else:
            log.unlink()
        await send(url, 10, 0)
        process.send_signal(signal.SIGHUP)
        await asyncio.sleep(1.5)
        await send(url, 10, 0)
        process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(process.wait, 15)
        lines = log.read_bytes().splitlines() if log.exists() else []
        whole = sum(1 for line in lines if line.startswith(b"{"))
        print(f"rotate ({mode}): {whole} of the 20 lines after the rotation in {log.name}")


async def deaf_websocket(processes: Processes, keys: Path, tmp: Path) -> None:
    from tests.process.test_realtime_process import FLOOD, deaf_session

    log = tmp / "ws.jsonl"
    process, url = start_gateway(
        processes, keys, log, REALTIME_IDLE_TIMEOUT="2", SHUTDOWN_GRACE_SECONDS="3"
    )
    _, writer = await deaf_session(url, FLOOD)
    started = time.monotonic()
    while not log.read_text() and time.monotonic() - started < 30:
        await asyncio.sleep(0.05)
    ended = f"ended after {time.monotonic() - started:.1f} s" if log.read_text() else "still open"
    print(f"deaf websocket, REALTIME_IDLE_TIMEOUT=2: session {ended} (30 s watched)")
    _, second = await deaf_session(url, FLOOD)
    await asyncio.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    took = await asyncio.to_thread(ended_within, process, 30)
    said = f"exited in {took:.1f} s" if took is not None else "still running after 30 s"
    print(f"  SIGTERM (grace 3 s) with a deaf session open: {said}, code {process.poll()}")
    for open_writer in (writer, second):
        open_writer.close()


async def hung_collector(processes: Processes, keys: Path, tmp: Path) -> None:
    held: list[asyncio.StreamWriter] = []

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    collector = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = collector.sockets[0].getsockname()[1]
    process, url = start_gateway(
        processes,
        keys,
        tmp / "log.jsonl",
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
        OTEL_BSP_SCHEDULE_DELAY="50",
        SHUTDOWN_GRACE_SECONDS="1",
        QUOTA_ENABLED="false",
    )
    answered = await send(url, 40, 0, concurrency=1)
    process.send_signal(signal.SIGTERM)
    took = await asyncio.to_thread(ended_within, process, 60)
    said = f"exited in {took:.1f} s" if took is not None else "still running after 60 s"
    print(f"hung collector: {answered}/40 answered; SIGTERM (grace 1 s): {said}")
    collector.close()
    for writer in held:
        writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "scenario", choices=["stuck-stdout", "rotate", "deaf-websocket", "hung-collector"]
    )
    parser.add_argument("--requests", type=int, default=1200)
    parser.add_argument("--body-kb", type=int, default=64)
    args = parser.parse_args()
    processes = Processes()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            keys = Path(tmp) / "keys.json"
            keys.write_text(json.dumps(keys_document(fake_provider(processes))))
            if args.scenario == "stuck-stdout":
                await stuck_stdout(args, processes, keys)
            elif args.scenario == "rotate":
                await rotate(args, processes, keys, Path(tmp))
            elif args.scenario == "deaf-websocket":
                await deaf_websocket(processes, keys, Path(tmp))
            else:
                await hung_collector(processes, keys, Path(tmp))
    finally:
        processes.stop()


if __name__ == "__main__":
    asyncio.run(main())
