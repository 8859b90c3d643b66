"""The floor under the Redis tracker at concurrency 1: what one round trip to Redis costs alone.

    .venv/bin/python bench/redis_floor.py --url redis://127.0.0.1:PORT/0 [--count 2000]

One process on uvloop (as the gateway runs), one operation at a time, each timed from the
call to its answer, `--count` of each after a warm-up, in three steps of the same path:

- ping: `PING` over the tracker's own connection (`proxy/quota/redis_wire.py`): the loopback
  round trip, Redis's smallest command and the client's least work;
- script: the admit script run by its SHA over that connection, with the arguments a
  gateway's request sends (one key scope, a request quota, the previous request's settle
  carried): the round trip plus what Redis spends running the script;
- tracker: `RedisTracker.admit_scopes` then `settle`, as the quota package calls them for
  a request (the next admission carries the settle): the script plus the tracker's own
  Python work on the way out and back.

It prints one JSON line: each step's p50 in ms and its CPU per operation in µs (this
process's, from /proc: the client side only), and Redis's own µs per script from INFO
commandstats. `--scripts` prints instead what Redis spends in each part of the scripts
(`--count` EVALSHA of each, from INFO commandstats): the shared prelude (the settle script
carrying nothing), a settle, an admission with and without a reservation, an admission
carrying a settle (what a request at c=1 sends). `bench/redis_cost.py` runs it in each round beside the gateways, pinned to
the gateways' core, so the gateway's added p50 stands beside the floor it cannot go under.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from proxy.quota.redis_scripts import SETTLE_FIELDS  # noqa: E402
from proxy.quota.redis_tracker import RedisTracker, policy_args, window_keys  # noqa: E402
from proxy.quota.redis_wire import pack  # noqa: E402
from proxy.quota.tracker import Charge, Limits, Scope  # noqa: E402

LIMITS = Limits(requests=100_000_000, tokens=None, window_seconds=3600)
CLAIM = Charge(tokens=120)
SPENT = Charge(tokens=95)


async def timed(count: int, call: Callable[[], Awaitable[None]]) -> tuple[float, float]:
    """p50 in ms and CPU µs per call, over `count` calls after 50 to warm up."""
    for _ in range(50):
        await call()
    latencies = []
    cpu = time.process_time()
    for _ in range(count):
        start = time.perf_counter()
        await call()
        latencies.append(time.perf_counter() - start)
    cpu = time.process_time() - cpu
    return statistics.median(latencies) * 1e3, cpu / count * 1e6


async def measure(url: str, count: int) -> dict[str, float]:
    tracker = RedisTracker(url)
    wire = tracker._wire  # noqa: SLF001  (the floor is the tracker's own connection)
    scope = Scope("bench-floor", "key", "", LIMITS, None)
    script = tracker._admit  # noqa: SLF001
    ticket = 0

    async def ping() -> None:
        await wire.call(pack("PING"))

    async def run_script() -> None:
        nonlocal ticket
        settle = [ticket, SPENT.tokens, 0, 100, *([0] * (SETTLE_FIELDS - 4))]
        args = [-1, 1, *policy_args(scope), 1, *settle, CLAIM.tokens, 0, "", 0]
        answer = await wire.run(script, window_keys(scope.id), args)
        ticket = answer[0][1]

    async def admit_settle() -> None:
        (admitted,) = await tracker.admit_scopes((scope,), CLAIM)
        tracker.settle(scope.id, LIMITS, SPENT, admitted.ticket)

    figures: dict[str, float] = {}
    for name, step in (("ping", ping), ("script", run_script), ("tracker", admit_settle)):
        before = await wire.call(pack("INFO", "commandstats"))
        figures[f"{name}_p50_ms"], figures[f"{name}_cpu_us"] = await timed(count, step)
        after = await wire.call(pack("INFO", "commandstats"))
        if name != "ping":
            figures[f"{name}_redis_us"] = script_us(after[0]) - script_us(before[0])
            figures[f"{name}_redis_us"] /= count + 50
    await tracker.close()
    return figures


async def script_parts(url: str, count: int) -> dict[str, float]:
    """µs Redis spends per call of each script shape (INFO commandstats)."""
    tracker = RedisTracker(url)
    wire = tracker._wire  # noqa: SLF001
    scope = Scope("bench-parts", "key", "", LIMITS, None)
    keys = window_keys(scope.id)
    policy = [-1, 1, *policy_args(scope)]
    settle = [1, SPENT.tokens, 0, 100, *([0] * (SETTLE_FIELDS - 4))]
    shapes = {
        "prelude (settle script, nothing carried)": (tracker._settle, [*policy, 0]),  # noqa: SLF001
        "settle script, one settle": (tracker._settle, [*policy, 1, *settle]),  # noqa: SLF001
        "admit, no reservation": (tracker._admit, [*policy, 0, 0, 0, "", 0]),  # noqa: SLF001
        "admit with a reservation": (tracker._admit, [*policy, 0, CLAIM.tokens, 0, "", 0]),  # noqa: SLF001
        "admit with a reservation, carrying a settle": (
            tracker._admit,  # noqa: SLF001
            [*policy, 1, *settle, CLAIM.tokens, 0, "", 0],
        ),
    }
    figures = {}
    for name, (script, args) in shapes.items():
        await wire.run(script, keys, args)  # loaded
        before = script_us((await wire.call(pack("INFO", "commandstats")))[0])
        for _ in range(count):
            await wire.run(script, keys, args)
        after = script_us((await wire.call(pack("INFO", "commandstats")))[0])
        figures[name] = (after - before) / count
    await tracker.close()
    return figures


def script_us(info: bytes) -> float:
    """µs Redis has spent in EVALSHA and EVAL since it started (INFO commandstats)."""
    total = 0.0
    for line in info.decode().splitlines():
        if line.startswith(("cmdstat_evalsha:", "cmdstat_eval:")):
            fields = dict(part.split("=") for part in line.split(":", 1)[1].split(","))
            total += float(fields["usec"])
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--scripts", action="store_true", help="Redis's time per script part")
    args = parser.parse_args()
    import uvloop

    if args.scripts:
        for name, us in uvloop.run(script_parts(args.url, args.count)).items():
            print(f"{name:45s} {us:6.1f} us in Redis a call")
        return 0
    print(json.dumps(uvloop.run(measure(args.url, args.count))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
