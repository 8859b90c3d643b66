"""Per request: the event loop's handles and the syscalls, the gateway against the best bare foundation.

    .venv/bin/python bench/census.py [--requests 2000]

Each contender (the gateway with every feature on, as in ab.py; the best bare foundation,
bench/foundations.py's low-level server with the wire) serves N sequential requests from one
aiohttp client, after 100 to warm up, against the mock provider answering at once. Two counts,
each from a run of its own:
- handles: the contender on asyncio's own loop, subclassed to count what it is asked to
  schedule (call_soon, call_at, create_future, create_task), with where the most come from;
- syscalls: the contender on uvloop, as it serves, under `strace -c -f` (apt-get install strace).
A count is what the process did, so it does not depend on how busy the machine is.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp
from harness import (
    BENCH,
    ROOT,
    Processes,
    free_port,
    listening,
    mock_and_keys,
    run_async,
    wait_until,
)

KEY = "vk_bench_0123456789"
# Run inside the contender (argv: its script, then its arguments): asyncio's own loop, counting;
# SIGUSR2 prints the counts since the last SIGUSR2 and their busiest call sites to stderr.
COUNTING = """
import asyncio, collections, json, os, runpy, signal, sys
sys.path.insert(0, os.getcwd())
counts, sites, last = collections.Counter(), collections.Counter(), {}

def site(kind):
    frame, chain = sys._getframe(2), []
    while frame is not None and len(chain) < 3:
        if "/asyncio/" not in frame.f_code.co_filename:
            chain.append(os.path.basename(frame.f_code.co_filename) + ":" + frame.f_code.co_name)
        frame = frame.f_back
    counts[kind] += 1
    sites[kind + " " + " < ".join(chain)] += 1

class Counting(asyncio.SelectorEventLoop):
    def call_soon(self, *a, **k):
        site("call_soon"); return super().call_soon(*a, **k)
    def call_at(self, *a, **k):
        site("call_at"); return super().call_at(*a, **k)
    def create_future(self):
        site("create_future"); return super().create_future()
    def create_task(self, *a, **k):
        site("create_task"); return super().create_task(*a, **k)

def dump(*_):
    global last
    now = dict(counts)
    delta = {k: v - last.get(k, 0) for k, v in now.items()}
    print("CENSUS", json.dumps([delta, dict(sites.most_common(12))]), file=sys.stderr, flush=True)
    last = now
    sites.clear()

signal.signal(signal.SIGUSR2, dump)
import uvloop
import proxy.runtime.server
proxy.runtime.server.new_event_loop = Counting
uvloop.run = lambda coro: asyncio.Runner(loop_factory=Counting).run(coro)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def contenders(port: int, upstream: str, tmp: Path) -> dict[str, list[str]]:
    gateway = [
        str(ROOT / "gateway.py"), "--server-host", "127.0.0.1", "--server-port", str(port),
        "--keys-file-path", str(tmp / "keys.json"), "--quota-enabled", "true",
        "--log-to-file", "true", "--log-file-path", str(tmp / "gateway.jsonl"), "--workers", "1",
    ]  # fmt: skip
    best = [str(BENCH / "foundations.py"), "--port", str(port), "--upstream", upstream]
    best += ["--server", "lowlevel", "--client", "wire", "--gc"]
    return {"gateway": gateway, "best": best}


async def requests(port: int, count: int) -> None:
    body = {"model": "gpt-bench", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {KEY}", "x-mock-delay-ms": "0"}
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            async with session.post(url, json=body, headers=headers) as reply:
                await reply.read()
                if reply.status != 200:
                    raise SystemExit(f"the contender answered {reply.status}")


def handles(procs: Processes, argv: list[str], port: int, log: Path, count: int) -> list[str]:
    child = procs.start([sys.executable, "-c", COUNTING, *argv], None, log)
    wait_until(lambda: listening(port), "the contender", child, log)
    run_async(requests(port, 100))
    os.kill(child.pid, signal.SIGUSR2)
    run_async(requests(port, count))
    os.kill(child.pid, signal.SIGUSR2)

    def dumps() -> list[str]:
        return [line for line in log.read_text().splitlines() if line.startswith("CENSUS")]

    wait_until(lambda: len(dumps()) >= 2, "the counts", child, log)
    procs.stop(child)
    counts, sites = json.loads(dumps()[1].removeprefix("CENSUS "))
    lines = [
        f"  {kind:14s} {n / count:5.2f}" for kind, n in sorted(counts.items()) if n >= count / 100
    ]
    lines += [f"    {n / count:5.2f}  {where}" for where, n in sites.items() if n >= count / 2]
    return lines


def syscalls(procs: Processes, argv: list[str], port: int, tmp: Path, count: int) -> list[str]:
    child = procs.start([sys.executable, *argv], None, tmp / "uvloop.log")
    wait_until(lambda: listening(port), "the contender", child, tmp / "uvloop.log")
    run_async(requests(port, 100))
    table, err = tmp / "strace.txt", tmp / "strace.err"
    with open(err, "wb") as errors:
        tracer = subprocess.Popen(
            ["strace", "-c", "-f", "-p", str(child.pid), "-o", str(table)], stderr=errors
        )
    wait_until(lambda: "attached" in err.read_text(), "strace", tracer, err)
    run_async(requests(port, count))
    tracer.send_signal(signal.SIGINT)
    tracer.wait()
    procs.stop(child)
    rows = re.findall(
        r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", table.read_text(), re.M
    )
    each = [(name, int(calls) / count) for calls, name in rows if name != "total"]
    return [f"  {name:14s} {per:5.2f}" for name, per in each if per >= 0.01]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    if not shutil.which("strace"):
        raise SystemExit("bench/census.py needs strace: apt-get install strace")
    procs = Processes()
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        try:
            upstream = mock_and_keys(procs, tmp, KEY, None)
            for name in ("gateway", "best"):
                port = free_port()
                argv = contenders(port, upstream, tmp)[name]
                print(f"{name}: loop handles per request (asyncio's loop, counting)")
                print("\n".join(handles(procs, argv, port, tmp / f"{name}.log", args.requests)))
                port = free_port()
                argv = contenders(port, upstream, tmp)[name]
                print(f"{name}: syscalls per request (uvloop, strace -c -f)")
                print("\n".join(syscalls(procs, argv, port, tmp, args.requests)))
        finally:
            procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
