"""The cache drops workers tell each other (`Drops`), without processes: the ring in shared
memory, and a worker that missed more drops than it keeps."""

from __future__ import annotations

import multiprocessing

from proxy.runtime.workers import DROP_SLOTS, Drops


def test_a_worker_reads_the_drops_told_since_it_last_looked_in_order() -> None:
    drops = Drops(multiprocessing.get_context("fork"), 2)
    seen, found = drops.since(0)
    assert (seen, found) == (0, [])
    for n in range(3):
        drops.put(f"k:{n:024x}:")
    assert drops.since(seen) == (3, [f"k:{n:024x}:" for n in range(3)])
    drops.put("s:" + "f" * 24 + ":")
    assert drops.since(3) == (4, ["s:" + "f" * 24 + ":"])


def test_a_worker_that_missed_more_drops_than_are_kept_drops_everything() -> None:
    drops = Drops(multiprocessing.get_context("fork"), 2)
    for n in range(DROP_SLOTS + 1):
        drops.put(f"k:{n:024x}:")
    assert drops.since(0) == (DROP_SLOTS + 1, None)  # every entry: none kept is missed
    assert drops.since(1) == (DROP_SLOTS + 1, [f"k:{n:024x}:" for n in range(1, DROP_SLOTS + 1)])
