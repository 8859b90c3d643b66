"""What choosing a pool's key costs a request, in microseconds (docs/choice.md).

    .venv/bin/python bench/choice.py [--members 10] [--runs 7] [--picks 20000]

Each line times one way of choosing, alone, in this process: a pool of `--members` keys
(weights 1, 2, …) picking by weight, by latency (every key measured, some in flight), and by
affinity (a conversation named: its hash and the rendezvous over every key); the bookkeeping
a choosing request adds around its attempt (the plan's order, in flight up and down, one
measurement); and what a key with one target and one key pays, which is the attempt loop's
test for its single-target path. Each figure is the median of `--runs` runs of `--picks`
picks (the runs interleaved, so a busy neighbour blurs them all alike), with the spread.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.upstream.providers import BUILTINS  # noqa: E402
from proxy.upstream.targets import (  # noqa: E402
    LATENCY,
    WEIGHTED,
    Credential,
    Plan,
    Pool,
    Target,
    affinity_of,
)


def pool(members: int, balance: str) -> Pool:
    credentials = [
        Credential(f"sk-bench-{index}", f"openai#{index + 1}", index + 1)
        for index in range(members)
    ]
    chosen = Pool(credentials, balance)
    for index, credential in enumerate(credentials):
        chosen.measured(credential, 0.2 + 0.01 * index, 0.0)
        for _ in range(index % 3):
            chosen.began(credential)
    return chosen


def contenders(members: int, picks: int) -> dict[str, Callable[[], None]]:
    """Each contender: `picks` choices, as a request makes them."""
    weighted, latency, affine = (
        pool(members, WEIGHTED),
        pool(members, LATENCY),
        pool(members, WEIGHTED),
    )
    names = [f"conversation-{index}" for index in range(1000)]
    target = Target("openai", BUILTINS["openai"], weighted)
    plan = Plan((target,))
    single = Plan((Target("openai", BUILTINS["openai"], Pool([Credential("sk", "openai#1")])),))
    closed: Callable[[str], bool] = lambda name: True  # noqa: E731

    def by_weight() -> None:
        for _ in range(picks):
            weighted.pick(1.0)

    def by_latency() -> None:
        for _ in range(picks):
            latency.pick(1.0)

    def by_affinity() -> None:
        for index in range(picks):
            affine.pick(1.0, affinity_of(names[index % 1000]))

    def bookkeeping() -> None:
        credential = weighted.credentials[0]
        for _ in range(picks):
            plan.in_order(1.0, None, closed)
            weighted.began(credential)
            weighted.measured(credential, 0.2, 1.0)
            weighted.ended(credential)

    def one_key() -> None:
        for _ in range(picks):
            if single.is_single:
                single.primary.pool.credentials[0]

    return {
        f"{members} keys, weighted": by_weight,
        f"{members} keys, latency": by_latency,
        f"{members} keys, affinity (hash included)": by_affinity,
        "a choosing request's bookkeeping": bookkeeping,
        "one target, one key": one_key,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--picks", type=int, default=20_000)
    args = parser.parse_args(argv)
    runs = contenders(args.members, args.picks)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.runs):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - started) / args.picks * 1e6)
    width = max(map(len, runs))
    print(f"{'choice':<{width}}  median us  (min-max)")
    for name, taken in times.items():
        print(
            f"{name:<{width}}  {statistics.median(taken):9.2f}  ({min(taken):.2f}-{max(taken):.2f})"
        )


if __name__ == "__main__":
    main()
