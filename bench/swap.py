"""A route's model swapped into a request body, A/B across checkouts, by the body's size.

    .venv/bin/python bench/swap.py before=/path/to/checkout after=. [--rounds 15]

Every routed POST pays `outbound.swap_model` once, on the event loop, before it goes upstream:
the body's top-level `model` is replaced in place and every other byte kept, so the body is
scanned, not parsed. Two kinds of chat body at 10 KB, 100 KB and 1 MB: prose (this project's
README: a quote or a line break every few dozen bytes) and code (an escape every few bytes),
the model last, as SDKs send it after the messages. Every contender's `proxy` package is
imported side by side in this one process, and the swaps take turns in an order that reverses
every round. Printed: each contender's median in milliseconds and its ratio to the first's,
and orjson parsing the same body whole (a floor no byte-keeping rewrite reaches).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import checkout_proxy  # noqa: E402

PROSE = (Path(__file__).resolve().parents[1] / "README.md").read_text()
CODE = 'if (s[i] == "\\\\") { out += "\\"\\n"; }\t' * 40
SIZES = (10_000, 100_000, 1_000_000)


def swapper(checkout: str) -> Callable[[bytes, str], bytes]:
    """`checkout`'s `swap_model` (its own `proxy` package)."""
    with checkout_proxy(checkout):
        from proxy.upstream.outbound import swap_model
    return swap_model


def chat(size: int, text: str) -> bytes:
    """A chat body of about `size` bytes: turns of `text`, then the model."""
    messages: list[dict[str, str]] = []
    total = 0
    while total < size:
        content = text[:4000]
        messages.append({"role": "user" if len(messages) % 2 else "assistant", "content": content})
        total += len(orjson.dumps(content)) + 30
    return orjson.dumps({"messages": messages, "model": "gpt-4o"})


def timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("contenders", nargs="+", help="name=checkout")
    parser.add_argument("--rounds", type=int, default=15)
    arguments = parser.parse_args()
    names = [contender.partition("=")[0] for contender in arguments.contenders]
    swaps = {
        name: swapper(str(Path(checkout).resolve()))
        for name, _, checkout in (c.partition("=") for c in arguments.contenders)
    }
    print("body            bytes    " + "".join(f"{name:>20}" for name in names) + "  orjson.loads")
    for size in SIZES:
        for kind, text in (("prose", PROSE), ("code", CODE)):
            body = chat(size, text)
            for name, swap in swaps.items():
                assert orjson.loads(swap(body, "gpt-4o-mini"))["model"] == "gpt-4o-mini", name
            times: dict[str, list[float]] = {name: [] for name in [*names, "orjson"]}
            order = [*names, "orjson"]
            for _ in range(arguments.rounds):
                for name in order:
                    if name == "orjson":
                        times[name].append(timed(lambda body=body: orjson.loads(body)))
                    else:
                        swap = swaps[name]
                        times[name].append(timed(lambda s=swap, b=body: s(b, "gpt-4o-mini")))
                order.reverse()
            medians = {name: statistics.median(spent) * 1000 for name, spent in times.items()}
            first = medians[names[0]]
            cells = "".join(
                f"{medians[name]:>9.3f} ms ({first / medians[name]:.2f}x)" for name in names
            )
            print(
                f"{kind} {size // 1000:>4} KB {len(body):>10,} {cells} {medians['orjson']:>9.3f} ms"
            )


if __name__ == "__main__":
    main()
