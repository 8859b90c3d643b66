"""Memory and speed of the memory tracker: 10,000 keys filled to a limit of 100, and admit().

Run from the repository root: `python bench/tracker_memory.py [--keys N]`. Each key gets
100 admissions and 100 token charges inside one window (a full window, as a busy key
would hold it). Memory is measured twice: with tracemalloc (Python allocations only) and
as the process RSS growth, in separate passes so tracemalloc's own overhead stays out of
RSS. admit() is timed through `await`, on the real clock, as relay calls it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing
import statistics
import sys
import time
import tracemalloc
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.quota.memory_tracker import MemoryTracker
from proxy.quota.tracker import Charge, Limits

LIMIT = 100
MB = 1024 * 1024


def rss_bytes() -> int:
    """The process's resident set size, from /proc (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


async def fill(keys: int, charge: bool) -> MemoryTracker:
    """A tracker holding `keys` keys, each with LIMIT admissions (and charges) in its window."""
    now = [0.0]
    tracker = MemoryTracker(lambda: now[0])
    limits = Limits(requests=LIMIT, tokens=1_000_000 if charge else None, window_seconds=3600)
    for index in range(keys):
        key_id = f"{index:064x}"  # the length of the sha256 digest relay uses as key_id
        for _ in range(LIMIT):
            now[0] += 0.001
            await tracker.admit(key_id, limits)
            if charge:
                tracker.settle(key_id, limits, Charge(1234))
    return tracker


def rss_growth(keys: int, charge: bool) -> float:
    """RSS growth in MB while filling a tracker; call it in a fresh process."""
    # In a used process, memory freed earlier would be reused and the growth would look smaller.
    gc.collect()
    before = rss_bytes()
    tracker = asyncio.run(fill(keys, charge))
    assert len(tracker) == keys
    return (rss_bytes() - before) / MB


def traced(keys: int, charge: bool) -> float:
    """Python memory in MB that a filled tracker holds, per tracemalloc."""
    tracemalloc.start()
    tracker = asyncio.run(fill(keys, charge))
    held = tracemalloc.get_traced_memory()[0] / MB
    tracemalloc.stop()
    del tracker
    return held


def measure_memory(keys: int, charge: bool) -> tuple[float, float]:
    """(tracemalloc MB, RSS growth MB) of a filled tracker."""
    with ProcessPoolExecutor(
        max_workers=1, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        rss = pool.submit(rss_growth, keys, charge).result()
    return traced(keys, charge), rss


async def time_admit(calls: int, admitted: bool) -> float:
    """Microseconds per admit(), admitted or refused, on the real clock."""
    tracker = MemoryTracker()
    limits = Limits(requests=LIMIT, tokens=None, window_seconds=3600)
    keys = [f"{index:064x}" for index in range(calls // LIMIT)]
    if not admitted:
        for key_id in keys:
            for _ in range(LIMIT):
                await tracker.admit(key_id, limits)
    start = time.perf_counter()
    for key_id in keys:
        for _ in range(LIMIT):
            await tracker.admit(key_id, limits)
    return (time.perf_counter() - start) / (len(keys) * LIMIT) * 1e6


def main() -> None:
    """Print the figures and the summary line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200_000)
    args = parser.parse_args()

    for label, charge in (("requests only", False), ("requests + charges", True)):
        traced, rss = measure_memory(args.keys, charge)
        figures = f"tracemalloc {traced:.1f} MB, RSS +{rss:.1f} MB"
        print(f"{label + ':':20}{args.keys} keys x {LIMIT}: {figures}")

    admitted = [asyncio.run(time_admit(args.calls, admitted=True)) for _ in range(args.runs)]
    refused = [asyncio.run(time_admit(args.calls, admitted=False)) for _ in range(args.runs)]
    admit_us = statistics.median(admitted)
    runs = ", ".join(f"{run:.2f}" for run in admitted)
    print(f"admit, admitted:    median {admit_us:.2f} us ({runs})")
    print(f"admit, refused:     median {statistics.median(refused):.2f} us")
    print(f"admissions/s:       {1e6 / admit_us:,.0f} (one core, tracker alone)")
    print(
        f"tracker: {args.keys} keys x {LIMIT} = {max(traced, rss):.1f} MB, admit {admit_us:.2f} us"
    )


if __name__ == "__main__":
    main()
