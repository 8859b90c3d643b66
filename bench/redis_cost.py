"""What the Redis tracker costs a gateway: one worker with REDIS_URL against one with quotas in memory.

    .venv/bin/python bench/redis_cost.py [--rounds 5] [memory=. redis=. redis-before=../old]

Each contender is `name=checkout`; a name starting with `redis` runs that checkout's gateway
with REDIS_URL (a `redis-server` this script starts on a free loopback port, no
persistence), a name starting with `ping` runs it with quotas in memory but each admission
after one PING to that Redis (`bench/ping_gateway.py`: what one more round trip costs a
request, before any script), any other name with quotas in memory; the default is
`memory=.`, `ping=.` and `redis=.`. Every gateway runs as in run.py (quotas on, one key with a limit it never
reaches, the log to a file), one worker each, on core 0; the mock provider, redis-server and
the load generators share core 1. The contenders take turns, in an order that reverses
every round, and each figure is the median over rounds:

- concurrency 1: `probes.sequential_latencies` (one keep-alive connection, requests one after
  another, the mock answering at once): the p50 and the gateway's CPU per request;
- under load: wrk with 256 connections, the mock answering after 20 ms (the CPU-bound case:
  the gateway's core is saturated, so its throughput is the inverse of its CPU per request).

The summary gives each Redis contender against the first memory one: the p50 added at c=1
(target <= +0.3 ms) and the throughput ratio under load (target >= 0.9x), with the Redis
round trips per request (scripts Redis ran over requests answered) and the microseconds
Redis itself spent in each, from INFO commandstats.

Each round also runs `bench/redis_floor.py` on the gateways' core against the same Redis
(`--floor 0`: not): the p50 of a bare PING, of the admit script alone and of the tracker's
admit + settle, over the tracker's own connection at c=1, so the gateway's added p50
stands beside the round trip it cannot go under.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import redis
from ab import KEY, LOAD_CORE, SERVER_CORE, command
from harness import (
    ROOT,
    Processes,
    busy_cpu_seconds,
    free_port,
    healthy,
    listening,
    process_cpu_seconds,
    wait_until,
    wrk,
)
from probes import CHAT, request_bytes, sequential_latencies

sys.path.insert(0, str(ROOT))

from tests.support.redis_server import RedisServer  # noqa: E402

TARGET_ADDED_MS = 0.3
TARGET_RATIO = 0.9
CONNECTIONS, DELAY_MS = 256, 20


@dataclass
class Runs:
    """One contender's figures, one per round."""

    p50_ms: list[float] = field(default_factory=list)
    c1_cpu_us: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    timeouts: list[int] = field(default_factory=list)


def floor(procs: Processes, tmp: Path, url: str, count: int) -> dict[str, float]:
    """bench/redis_floor.py's figures, run on the gateways' core while they idle."""
    argv = [sys.executable, str(ROOT / "bench/redis_floor.py"), "--url", f"{url}/0"]
    out = tmp / "floor.out"
    child = procs.start([*argv, "--count", str(count)], SERVER_CORE, out)
    child.wait()
    procs.stop(child)
    lines = out.read_text().strip().splitlines()
    if child.returncode != 0 or not lines:
        raise RuntimeError(f"redis_floor.py failed: {out.read_text()[-2000:]}")
    figures: dict[str, float] = json.loads(lines[-1])
    return figures


def script_stats(url: str) -> tuple[int, int]:
    """Scripts Redis has run since it started, and the microseconds it spent in them."""
    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    names = ("cmdstat_evalsha", "cmdstat_eval")
    calls = sum(stats.get(name, {}).get("calls", 0) for name in names)
    return calls, sum(stats.get(name, {}).get("usec", 0) for name in names)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("contenders", nargs="*", default=["memory=.", "ping=.", "redis=."])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5, help="of wrk per contender a round")
    parser.add_argument("--sequential", type=int, default=2000, help="requests at c=1 a round")
    parser.add_argument("--floor", type=int, default=2000, help="redis_floor.py calls a round")
    args = parser.parse_args()
    procs = Processes()
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        server = RedisServer(tmp)
        try:
            server.start()
            assert server.process is not None
            os.sched_setaffinity(server.process.pid, {LOAD_CORE})
            mock_port = free_port()
            mock_argv = [sys.executable, str(ROOT / "bench/mock_provider.py")]
            mock = procs.start([*mock_argv, "--port", str(mock_port)], LOAD_CORE, tmp / "mock.log")
            wait_until(lambda: listening(mock_port), "the mock", mock, tmp / "mock.log")
            upstream = f"http://127.0.0.1:{mock_port}"
            quota = {"requests": 100_000_000, "window_seconds": 3600}
            keys = {
                "providers": {"openai": {"base_url": f"{upstream}/v1"}},
                "virtual_keys": {
                    KEY: {"provider": "openai", "api_key": "sk-bench", "quota": quota}
                },
            }
            (tmp / "keys.json").write_text(json.dumps(keys))
            contenders: dict[str, tuple[int, int]] = {}
            for spec in args.contenders:
                port = free_port()
                name, argv, _ = command(spec, port, upstream, tmp)
                env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "WORKERS")}
                env["PYTHONPATH"] = str(Path(argv[1]).parent)
                if name.startswith("redis"):
                    argv += ["--redis-url", f"{server.url}/0"]
                if name.startswith("ping"):
                    ping = [str(ROOT / "bench/ping_gateway.py"), f"{server.url}/0"]
                    argv = [argv[0], *ping, *argv[1:]]
                log = tmp / f"{name}.log"
                child = procs.start(argv, SERVER_CORE, log, env=env)
                wait_until(lambda p=port: healthy(p), name, child, log)
                contenders[name] = (port, child.pid)
            results = race(procs, contenders, tmp, args, server.url)
        finally:
            procs.stop_all()
            server.kill()
    report(*results)
    return 0


def race(
    procs: Processes,
    contenders: dict[str, tuple[int, int]],
    tmp: Path,
    args: argparse.Namespace,
    url: str,
) -> tuple[dict[str, Runs], list[dict[str, float]]]:
    results = {name: Runs() for name in contenders}
    floors: list[dict[str, float]] = []
    names = list(contenders)
    busy, elapsed = busy_cpu_seconds(), os.times().elapsed
    for name in names:  # warm up: the upstream pools grow to 256 connections
        wrk(
            procs, tmp / "wrk.out", KEY, contenders[name][0], LOAD_CORE, CONNECTIONS, 1, DELAY_MS, 2
        )
    scripts, requests, redis_us = 0, 0, 0
    for turn in range(args.rounds):
        if args.floor:
            floors.append(floor(procs, tmp, url, args.floor))
            f = floors[-1]
            print(
                f"round {turn + 1} {'floor':>14}: c=1 p50 PING {f['ping_p50_ms']:.3f} ms, "
                f"admit script {f['script_p50_ms']:.3f} ms ({f['script_redis_us']:.0f} us in "
                f"Redis), tracker admit+settle {f['tracker_p50_ms']:.3f} ms; client CPU "
                f"{f['ping_cpu_us']:.0f} / {f['script_cpu_us']:.0f} / {f['tracker_cpu_us']:.0f} us",
                flush=True,
            )
        for name in names if turn % 2 == 0 else names[::-1]:
            port, pid = contenders[name]
            runs = results[name]
            stats = script_stats(url)
            raw = request_bytes(port, KEY, CHAT)
            before = process_cpu_seconds(pid)
            latencies, bad = sequential_latencies(port, raw, args.sequential)
            runs.c1_cpu_us.append((process_cpu_seconds(pid) - before) / args.sequential * 1e6)
            runs.p50_ms.append(statistics.median(latencies))
            before = process_cpu_seconds(pid)
            summary = wrk(
                procs, tmp / "wrk.out", KEY, port, LOAD_CORE, CONNECTIONS, args.seconds, DELAY_MS, 2
            )
            runs.cpu_us.append(
                (process_cpu_seconds(pid) - before) / max(1, summary["requests"]) * 1e6
            )
            runs.rps.append(summary["rps"])
            runs.timeouts.append(int(summary["timeout"]))
            if name.startswith("redis"):
                after = script_stats(url)
                scripts += after[0] - stats[0]
                redis_us += after[1] - stats[1]
                requests += args.sequential + int(summary["requests"])
            print(
                f"round {turn + 1} {name:>14}: c=1 p50 {runs.p50_ms[-1]:.3f} ms "
                f"{runs.c1_cpu_us[-1]:4.0f} us CPU; {runs.rps[-1]:7,.0f} rps "
                f"{runs.cpu_us[-1]:4.0f} us CPU per request{'' if not bad else f'; {bad} non-2xx'}",
                flush=True,
            )
    load = (busy_cpu_seconds() - busy) / (os.times().elapsed - elapsed)
    print(f"\nthe machine was busy {load:.2f} cores on average over the run (this bench included)")
    if requests:
        print(
            f"redis: {scripts / requests:.3f} scripts per request, "
            f"{redis_us / max(1, scripts):.0f} us in Redis per script"
        )
    return results, floors


def report(results: dict[str, Runs], floors: list[dict[str, float]]) -> None:
    med = statistics.median
    print(f"{'':>14}  c=1 p50   CPU/req c=1   throughput  CPU/req  timeouts")
    for name, runs in results.items():
        print(
            f"{name:>14}  {med(runs.p50_ms):.3f} ms  {med(runs.c1_cpu_us):6.0f} us  "
            f"{med(runs.rps):8,.0f} rps  {med(runs.cpu_us):5.0f} us  "
            f"{'/'.join(map(str, runs.timeouts))}"
        )
    memory = next((n for n in results if not n.startswith(("redis", "ping"))), None)
    if memory is None:
        return
    base = results[memory]
    for name, runs in results.items():
        if not name.startswith(("redis", "ping")):
            continue
        added = med([r - m for r, m in zip(runs.p50_ms, base.p50_ms, strict=True)])
        ratio = med([r / m for r, m in zip(runs.rps, base.rps, strict=True)])
        cpu = med([r - m for r, m in zip(runs.cpu_us, base.cpu_us, strict=True)])
        # The CPU-bound throughput ratio: the inverse ratio of CPU per request under load,
        # steadier than the rates on a shared machine (another process's load moves both).
        by_cpu = med([m / r for r, m in zip(runs.cpu_us, base.cpu_us, strict=True)])
        if name.startswith("ping"):
            print(
                f"{name}: c=1 p50 {added:+.3f} ms over {memory} (one more round trip, no "
                f"script: the floor of any admission through Redis); throughput {ratio:.2f}x, "
                f"{cpu:+.0f} us CPU per request under load"
            )
            continue
        ok_added = "ok" if added <= TARGET_ADDED_MS else "OVER"
        ok_ratio = "ok" if ratio >= TARGET_RATIO else "UNDER"
        print(
            f"{name}: c=1 p50 {added:+.3f} ms over {memory} (target <= +{TARGET_ADDED_MS}) "
            f"{ok_added}; throughput {ratio:.2f}x {memory}'s (target >= {TARGET_RATIO}x) "
            f"{ok_ratio}; {cpu:+.0f} us CPU per request under load ({by_cpu:.2f}x by CPU)"
        )
    if floors:
        f = {name: med([one[name] for one in floors]) for name in floors[0]}
        print(
            f"floor (redis_floor.py, c=1, medians of rounds): PING {f['ping_p50_ms']:.3f} ms, "
            f"the admit script {f['script_p50_ms']:.3f} ms ({f['script_redis_us']:.0f} us of "
            f"it in Redis), the tracker's admit + settle {f['tracker_p50_ms']:.3f} ms; the "
            f"client's CPU per call {f['ping_cpu_us']:.0f} / {f['script_cpu_us']:.0f} / "
            f"{f['tracker_cpu_us']:.0f} us"
        )


if __name__ == "__main__":
    sys.exit(main())
