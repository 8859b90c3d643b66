"""What failover costs: the no-failure path against a failover, in one gateway, one run.

One gateway (quotas on, log to a file) in front of `mock_provider.py`, with three keys:

- **plain**: the seed format, one target: what every key without failover pays;
- **fallback, unused**: a target with a pool of two keys and a fallback, the primary healthy:
  the cost of having failover configured when nothing fails;
- **failover**: the primary refuses at once (nothing listens on its port), the fallback is
  the mock; with a breaker that never opens (BREAKER_FAILURES huge, BREAKER_ERROR_RATIO 0),
  every request pays the refused attempt and the move;
- **breaker open**: the same key after its breaker opened (a second gateway with the
  default BREAKER_FAILURES=3): the primary is skipped.

Requests go one after another on one keep-alive connection (concurrency 1), the keys taking
turns round by round (A-B-C-D, then D-C-B-A, ...), so a machine that slows down slows each
alike; each figure is the median over the rounds of each round's median latency. Printed:
each key's p50 and its difference to plain.

    .venv/bin/python bench/failover.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import BENCH, ROOT, Processes, free_port, healthy, listening, wait_until  # noqa: E402
from probes import CHAT, request_bytes, sequential_latencies  # noqa: E402

KEYS = {
    "plain": "vk_bench_plain",
    "fallback, unused": "vk_bench_unused",
    "failover": "vk_bench_failover",
    "breaker open": "vk_bench_failover",
}


def keys_document(mock: int, dead: int) -> dict[str, object]:
    quota = {"requests": 100_000_000, "window_seconds": 3600}
    return {
        "providers": {
            "openai": {"base_url": f"http://127.0.0.1:{mock}/v1"},
            "dead": {"base_url": f"http://127.0.0.1:{dead}/v1"},
            "backup": {"base_url": f"http://127.0.0.1:{mock}/v1"},
        },
        "virtual_keys": {
            KEYS["plain"]: {
                "name": "plain",
                "provider": "openai",
                "api_key": "sk-bench",
                "quota": quota,
            },
            KEYS["fallback, unused"]: {
                "name": "unused",
                "provider": "openai",
                "api_keys": [{"api_key": "sk-bench-a"}, {"api_key": "sk-bench-b"}],
                "fallbacks": [{"provider": "backup", "api_key": "sk-bench-c"}],
                "quota": quota,
            },
            KEYS["failover"]: {
                "name": "failover",
                "provider": "dead",
                "api_key": "sk-bench-dead",
                "fallbacks": [{"provider": "backup", "api_key": "sk-bench-c"}],
                "quota": quota,
            },
        },
    }


def start_gateway(procs: Processes, tmp: Path, keys: Path, port: int, *extra: str) -> None:
    log = tmp / f"gateway-{port}.log"
    argv = [
        sys.executable, str(ROOT / "gateway.py"), "--server-host", "127.0.0.1",
        "--server-port", str(port), "--keys-file-path", str(keys), "--log-to-file", "true",
        "--log-file-path", str(tmp / f"interactions-{port}.jsonl"), *extra,
    ]  # fmt: skip
    child = procs.start(argv, None, log)
    wait_until(lambda: healthy(port), "the gateway", child, log)


def main() -> int:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--quick", action="store_true", help="3 rounds of 200 (else 7 of 500)")
    args = cli.parse_args()
    rounds, per_round = (3, 200) if args.quick else (7, 500)
    procs = Processes()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-failover-") as name:
            tmp = Path(name)
            mock, dead = free_port(), free_port()  # nothing listens on `dead`
            child = procs.start(
                [sys.executable, str(BENCH / "mock_provider.py"), "--port", str(mock)], None
            )
            wait_until(lambda: listening(mock), "the mock", child, tmp / "none.log")
            keys = tmp / "keys.json"
            keys.write_text(json.dumps(keys_document(mock, dead)))
            always, opens = free_port(), free_port()
            start_gateway(
                procs, tmp, keys, always, "--breaker-failures", "1000000000",
                "--breaker-error-ratio", "0",
            )  # fmt: skip
            start_gateway(procs, tmp, keys, opens)
            ports = {"plain": always, "fallback, unused": always, "failover": always}
            ports["breaker open"] = opens
            raw = {name: request_bytes(ports[name], key, CHAT) for name, key in KEYS.items()}
            for name in KEYS:  # warm up, and open the second gateway's breaker
                sequential_latencies(ports[name], raw[name], 50)
            medians: dict[str, list[float]] = {name: [] for name in KEYS}
            names = list(KEYS)
            for index in range(rounds):
                for name in names if index % 2 == 0 else reversed(names):
                    latencies, bad = sequential_latencies(ports[name], raw[name], per_round)
                    if bad:
                        print(f"bench: {bad} non-2xx answers for {name}", file=sys.stderr)
                        return 1
                    medians[name].append(statistics.median(latencies))
            attempts = attempts_per_request(tmp / f"interactions-{always}.jsonl")
            attempts_open = attempts_per_request(tmp / f"interactions-{opens}.jsonl")
    finally:
        procs.stop_all()
    plain = statistics.median(medians["plain"])
    print(f"failover at concurrency 1: median of {rounds} rounds x {per_round} requests")
    print(f"{'key':<18} {'p50 ms':>8} {'vs plain':>10}   per-round p50s")
    for name in KEYS:
        figure = statistics.median(medians[name])
        rounds_text = " ".join(f"{value:.3f}" for value in medians[name])
        print(f"{name:<18} {figure:>8.3f} {figure - plain:>+9.3f}ms   {rounds_text}")
    print(
        "attempts per request (from the log): "
        + ", ".join(f"{name} {value:.2f}" for name, value in attempts.items())
        + f"; with the breaker open: failover {attempts_open.get('failover', 0):.2f}"
    )
    return 0


def attempts_per_request(log: Path) -> dict[str, float]:
    """Each key's mean number of upstream attempts, read from the interaction log."""
    counts: dict[str, list[int]] = {}
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        counts.setdefault(entry["key"], []).append(len(entry.get("attempts", [])))
    return {name: statistics.fmean(values) for name, values in counts.items()}


if __name__ == "__main__":
    sys.exit(main())
