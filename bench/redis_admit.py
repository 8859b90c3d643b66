"""What Redis adds to a request's quota work: admit, then settle, against the memory tracker.

Run from the repository root: `.venv/bin/python bench/redis_admit.py [--url redis://…]`.
Without --url it starts its own `redis-server` (no persistence, loopback, a free port) and
stops it at the end; on a machine with two cores or more, Redis runs on core 1 and this
script on core 0, as a gateway and a local Redis would share a host. Each admit is timed
through `await`, one at a time, on the same event loop the gateway uses (uvloop when
installed). Each request does what relay does: admit with a reservation (the prompt and
max_tokens) and settle to the real count when it ends; the settle rides along with the
next admission, so the round trips per request, counted by Redis itself
(INFO commandstats: scripts run per request), should be 1. The memory and Redis runs
alternate; each run's figure is the median per request, and the reported figure is the
median over runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.quota.memory_tracker import MemoryTracker  # noqa: E402
from proxy.quota.redis_tracker import RedisTracker  # noqa: E402
from proxy.quota.tracker import Charge, Limits, Tracker  # noqa: E402
from proxy.runtime.server import new_event_loop  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

TARGET_MS = 0.3
BENCH_CORE, REDIS_CORE = 0, 1


RESERVED, SPENT = Charge(tokens=60), Charge(tokens=45)  # a prompt plus max_tokens; the real count


async def time_admits(tracker: Tracker, limits: Limits, calls: int) -> list[float]:
    """Microseconds of each of `calls` admit-and-settle pairs, one at a time, on a fresh key."""
    key_id = uuid.uuid4().hex[:24]
    for _ in range(100):  # connections open, scripts loaded, code paths warm
        await tracker.admit("warm-up", limits)
    timings = []
    for _ in range(calls):
        started = time.perf_counter_ns()
        answer = await tracker.admit(key_id, limits, None, RESERVED)
        tracker.settle(key_id, limits, SPENT, answer.ticket)
        timings.append((time.perf_counter_ns() - started) / 1000)
        assert answer.admitted
    return timings


def script_stats(url: str) -> tuple[int, float]:
    """Scripts Redis has run since it started (one per round trip of the tracker), and the
    microseconds it spent in them: the server's own share of each round trip."""
    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    names = ("cmdstat_evalsha", "cmdstat_eval")
    calls = sum(stats.get(name, {}).get("calls", 0) for name in names)
    return calls, sum(stats.get(name, {}).get("usec", 0) for name in names)


def run(make: Callable[[], Tracker], limits: Limits, calls: int) -> list[float]:
    async def measure() -> list[float]:
        tracker = make()
        try:
            return await time_admits(tracker, limits, calls)
        finally:
            await tracker.close()

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(measure())


def compare(url: str, limits: Limits, calls: int, runs: int) -> tuple[float, float, float]:
    """(memory µs, Redis µs, Redis p99 µs): medians over alternating runs."""
    memory, shared, tails = [], [], []
    for _ in range(runs):
        memory.append(statistics.median(run(MemoryTracker, limits, calls)))
        timings = run(lambda: RedisTracker(url), limits, calls)
        shared.append(statistics.median(timings))
        tails.append(statistics.quantiles(timings, n=100)[98])
    return statistics.median(memory), statistics.median(shared), statistics.median(tails)


def pin(pid: int, core: int) -> None:
    if (os.cpu_count() or 1) > core:
        os.sched_setaffinity(pid, {core})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an existing Redis (default: start a redis-server)")
    parser.add_argument("--calls", type=int, default=5000, help="admits per run")
    parser.add_argument("--runs", type=int, default=7, help="runs per backend")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        server = None if args.url else RedisServer(Path(directory))
        try:
            if server is not None:
                server.start()
                assert server.process is not None
                pin(server.process.pid, REDIS_CORE)
                pin(0, BENCH_CORE)
            url = args.url or server.url  # type: ignore[union-attr]
            cases = {
                "requests only": Limits(requests=10**9, tokens=None, window_seconds=3600),
                "requests + tokens": Limits(requests=10**9, tokens=10**12, window_seconds=3600),
            }
            added = []
            scripts_before, usec_before = script_stats(url)
            requests = 0
            for label, limits in cases.items():
                memory_us, redis_us, p99_us = compare(url, limits, args.calls, args.runs)
                requests += args.runs * (args.calls + 100)
                added.append((redis_us - memory_us) / 1000)
                print(
                    f"{label + ':':19} memory {memory_us:6.1f} us, redis {redis_us:6.1f} us "
                    f"(p99 {p99_us:.1f} us), median of {args.runs} runs x {args.calls} requests"
                )
            scripts_after, usec_after = script_stats(url)
            round_trips = (scripts_after - scripts_before) / requests
            in_redis = (usec_after - usec_before) / max(1, scripts_after - scripts_before)
        finally:
            if server is not None:
                server.kill()
    worst = max(added)
    verdict = "ok" if worst <= TARGET_MS else "OVER"
    print(f"redis admit+settle: +{worst:.3f} ms over memory (target <= {TARGET_MS} ms) {verdict}")
    trips = "ok" if round_trips <= 1.01 else "OVER"
    print(f"redis round trips per request: {round_trips:.3f} (target 1) {trips}")
    print(f"of each round trip, in Redis running the script: {in_redis:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
