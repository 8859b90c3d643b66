"""Loading keys.json, A/B across checkouts: CPU per key of `KeyRing.load` for 10,000 keys.

    .venv/bin/python bench/keys_load.py before=/path/to/checkout after=. [--rounds 25]

What the start with 10,000 keys spends, and what a reload's thread takes from the event
loop (`keys/reload.py`: it loads with the cyclic collector off, as here). The document is
`bench/scale.py`'s (the bench key, a key with 100 routes, a pool of 20, named keys with
quotas of their own); `--real-key-chars 164` makes each real key as long as an OpenAI
project key (scale.py's are 8 characters). Every contender's `proxy` package is imported
side by side in this one process, and the loads take turns in an order that reverses every
round, so a machine shared with other work slows them alike. Printed: the median and the
least of the rounds, in microseconds per key, and the ratio of the medians to the first
contender's.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import checkout_proxy  # noqa: E402
from scale import keys_document  # noqa: E402

KEYS = 10_000


def loader(checkout: str, path: str) -> Callable[[], object]:
    """`checkout`'s KeyRing.load of `path`, with its own defaults (its own `proxy` package)."""
    with checkout_proxy(checkout):
        from proxy.app import key_defaults
        from proxy.keys.keys import KeyRing
        from proxy.settings import Settings
    defaults = key_defaults(Settings.from_env({"KEYS_FILE_PATH": path}))
    return lambda: KeyRing.load(path, os.environ, defaults)


def long_real_keys(value: object, chars: int) -> object:
    """The document with each `api_key` `chars` characters long (each one different)."""
    if isinstance(value, dict):
        return {
            name: f"sk-{id(field):x}".ljust(chars, "x")
            if name == "api_key"
            else long_real_keys(field, chars)
            for name, field in value.items()
        }
    if isinstance(value, list):
        return [long_real_keys(item, chars) for item in value]
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("contenders", nargs="+", help="name=checkout directory")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--real-key-chars", type=int, default=0, help="0: scale.py's own")
    args = parser.parse_args()
    document: object = keys_document("http://127.0.0.1:9", KEYS)
    if args.real_key_chars:
        document = long_real_keys(document, args.real_key_chars)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "keys.json")
        Path(path).write_text(json.dumps(document))
        loads = {}
        for spec in args.contenders:
            name, _, directory = spec.partition("=")
            loads[name] = loader(str(Path(directory or ".").resolve()), path)
        names = list(loads)
        seconds: dict[str, list[float]] = {name: [] for name in names}
        gc.collect()
        gc.disable()
        for turn in range(args.rounds):
            for name in names if turn % 2 == 0 else names[::-1]:
                started = time.perf_counter()
                loads[name]()
                seconds[name].append(time.perf_counter() - started)
                gc.collect()  # what this load left, outside the timing
        gc.enable()
    base = statistics.median(seconds[names[0]])
    for name in names:
        median = statistics.median(seconds[name])
        print(
            f"{name:>10}: {median / KEYS * 1e6:6.2f} us a key (least {min(seconds[name]) / KEYS * 1e6:.2f}),"
            f" {median / base:.2f}x, {args.rounds} rounds"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
