"""Throughput A/B: gateways from several checkouts, and floors, interleaved under one load.

    .venv/bin/python bench/ab.py floor floor-gc HEAD=. before=/path/to/other/checkout

Each contender is `floor` (bench/passthrough.py as it is), `floor:BACKLOG` (the same
listening with another backlog: `floor:1024` as the gateway), `floor-gc` (the same with the
garbage collector set as the gateway sets it, `server.tune_gc`: what the floor gains from
that setting alone), or `name=directory`, a checkout whose gateway.py runs (with quotas on
and the log to a file, as in run.py). All serve one mock provider answering after 20 ms,
on core 0 one at a time, while wrk drives 256 connections from core 1; the contenders take
turns, in an order that reverses every round, and each figure is the median over rounds.
Printed: throughput, ratio to the first contender, CPU per request (the process's own, from
/proc), client timeouts (2 s), RSS idle (once it serves, before any request) and at the end. For "did my change make it faster?" and for the floor with
the gateway's GC setting, which `run.py` leaves as it is
(the bare passthrough, with CPython's default collector). `--hogs N` races them on a core
N busy processes share, as on a loaded machine: `floor floor:1024 now=. --hogs 2` shows
where client timeouts at 256 connections come from.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import (
    BENCH,
    Processes,
    free_port,
    healthy,
    listening,
    mock_and_keys,
    process_cpu_seconds,
    rss_mb,
    run_async,
    wait_until,
    wrk,
)

KEY = "vk_bench_0123456789"
SERVER_CORE, LOAD_CORE = 0, 1
# `floor-gc`: the floor started after the gateway's GC setting (proxy/server.py, tune_gc).
GC_LIKE_THE_GATEWAY = (
    "import runpy, sys; sys.path.insert(0, sys.argv[1]); sys.argv = sys.argv[2:];"
    "from proxy.runtime.server import tune_gc; tune_gc(); runpy.run_path(sys.argv[0], run_name='__main__')"
)

# `--hogs`: a process that only burns CPU.
HOG = [sys.executable, "-c", "while True: pass"]


def command(spec: str, port: int, upstream: str, tmp: Path) -> tuple[str, list[str], bool]:
    """(name, argv, is_gateway) of one contender."""
    floor = [str(BENCH / "passthrough.py"), "--port", str(port), "--upstream", upstream]
    if spec == "floor":
        return spec, [sys.executable, *floor], False
    if spec.startswith("floor:"):  # floor:BACKLOG, the floor listening with another backlog
        return spec, [sys.executable, *floor, "--backlog", spec.partition(":")[2]], False
    if spec == "floor-gc":
        return spec, [sys.executable, "-c", GC_LIKE_THE_GATEWAY, str(BENCH.parent), *floor], False
    if spec == "duties":  # bench/duties.py: SPEC's duties on the best bare foundation
        argv = [sys.executable, str(BENCH / "duties.py"), "--port", str(port), "--keys"]
        return spec, argv + [str(tmp / "keys.json"), "--log", str(tmp / "duties.jsonl")], False
    if spec.startswith("foundation:"):  # foundation:SERVER+CLIENT[+gc], bench/foundations.py
        server, client, *gc = spec.partition(":")[2].split("+")
        argv = [sys.executable, str(BENCH / "foundations.py"), "--port", str(port)]
        argv += ["--upstream", upstream, "--server", server, "--client", client]
        return spec.partition(":")[2], argv + (["--gc"] if gc == ["gc"] else []), False
    name, _, directory = spec.partition("=")
    checkout = Path(directory or ".").resolve()
    argv = [
        sys.executable, str(checkout / "gateway.py"), "--server-host", "127.0.0.1",
        "--server-port", str(port), "--keys-file-path", str(tmp / "keys.json"),
        "--quota-enabled", "true", "--log-to-file", "true",
        "--log-file-path", str(tmp / f"{name}.jsonl"), "--workers", "1",
    ]  # fmt: skip
    return name, argv, True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "contenders",
        nargs="+",
        help="floor, floor-gc, duties, foundation:SERVER+CLIENT[+gc] or name=checkout",
    )
    parser.add_argument(
        "--check-stream",
        action="store_true",
        help="first check each passes a stream chunk by chunk",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5, help="of wrk per contender a round")
    parser.add_argument(
        "--hogs",
        type=int,
        default=0,
        help="busy processes on the contenders' core during the race: a machine whose core "
        "they share (client timeouts at 256 connections come from that, floors alike)",
    )
    args = parser.parse_args()
    procs = Processes()
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        try:
            upstream = mock_and_keys(procs, tmp, KEY, LOAD_CORE)
            contenders, idle = {}, {}
            for spec in args.contenders:
                port = free_port()
                name, argv, is_gateway = command(spec, port, upstream, tmp)
                env = dict(os.environ, PYTHONPATH=str(Path(argv[1]).parent) if is_gateway else "")
                child = procs.start(argv, SERVER_CORE, tmp / f"{name}.log", env=env)
                ready = healthy if is_gateway else listening
                wait_until(lambda p=port, r=ready: r(p), name, child, tmp / f"{name}.log")
                contenders[name] = (port, child)
                time.sleep(0.3)  # the start's last allocations settled
                idle[name] = rss_mb(child.pid)
            if args.check_stream:
                for name, (port, _) in contenders.items():
                    reads = run_async(stream_reads(port))
                    print(f"{name:>10}: a stream of 10 chunks 30 ms apart arrived in {reads} reads")
                    if reads < 10:
                        raise SystemExit(f"{name} batches a stream: {reads} reads for 10 chunks")
            for number in range(args.hogs):
                procs.start(HOG, SERVER_CORE, tmp / f"hog{number}.log")
            results = race(procs, contenders, tmp, args.rounds, args.seconds)
        finally:
            procs.stop_all()
    first = statistics.median(run[0] for run in results[next(iter(results))])
    for name, runs in results.items():
        rps = statistics.median(run[0] for run in runs)
        cpu = statistics.median(run[1] for run in runs)
        timeouts = "/".join(str(run[2]) for run in runs)
        print(
            f"{name:>10}: {rps:7,.0f} rps ({rps / first:.2f}x)  {cpu:6.0f} us CPU per request  "
            f"timeouts {timeouts}  RSS idle {idle[name]:.1f} MB, at the end {runs[-1][3]:.0f} MB"
        )
    return 0


async def stream_reads(port: int) -> int:
    """In how many reads a stream of 10 chunks 30 ms apart reaches a client through `port`."""
    import aiohttp

    headers = {"Authorization": f"Bearer {KEY}", "x-mock-chunks": "10", "x-mock-gap-ms": "30"}
    body = {"model": "gpt-bench", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        async with session.post(url, json=body, headers=headers) as reply:
            return len([chunk async for chunk in reply.content.iter_any()])


def race(
    procs: Processes,
    contenders: dict[str, tuple[int, subprocess.Popen[bytes]]],
    tmp: Path,
    rounds: int,
    seconds: int,
) -> dict[str, list[tuple[float, float, int, float]]]:
    """(rps, CPU µs per request, timeouts, RSS MB) per contender per round."""
    results: dict[str, list[tuple[float, float, int, float]]] = {name: [] for name in contenders}
    names = list(contenders)
    for name in names:  # warm up: each pool grows to 256 connections
        wrk(procs, tmp / "wrk.out", KEY, contenders[name][0], LOAD_CORE, 256, 1, 20, 2)
    for turn in range(rounds):
        for name in names if turn % 2 == 0 else names[::-1]:
            port, child = contenders[name]
            pid = child.pid
            before = process_cpu_seconds(pid)
            summary = wrk(procs, tmp / "wrk.out", KEY, port, LOAD_CORE, 256, seconds, 20, 2)
            cpu_us = (process_cpu_seconds(pid) - before) / max(1, summary["requests"]) * 1e6
            rps = summary["rps"]
            results[name].append((rps, cpu_us, int(summary["timeout"]), rss_mb(pid)))
            print(f"round {turn + 1} {name:>10}: {rps:7,.0f} rps  {cpu_us:6.0f} us", flush=True)
    return results


if __name__ == "__main__":
    sys.exit(main())
