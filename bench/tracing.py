"""The cost of tracing: the gateway with OpenTelemetry traces on against the same gateway off.

Run from the repository root with the project's venv (`make bench-tracing`, or
`.venv/bin/python bench/tracing.py [--quick]`). Installs nothing itself.

Two gateway processes serve the same mock provider (`bench/mock_provider.py`, no delay):
"off" without any OTEL_* variable, and "on" with `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at a
sink collector (this script, `--sink`: answers every OTLP/HTTP export 200 and throws it
away), so every span is built, batched, encoded and sent. Both gateways run on core 0 (one
under load at a time); the mock, the sink and the client on core 1. Each round sends the
same requests one after another on one keep-alive connection to each gateway in turn, in
an order that alternates (off-on, on-off, ...), and measures:

- CPU µs per request: the gateway process's CPU time (every thread: the span export runs
  on the SDK's own thread, and is counted) over the round, divided by its requests;
- latency p50 at concurrency 1, in µs (the client's view: what tracing adds on the path).

Each figure is the median over the rounds; "cost" is on minus off. The SDK's defaults stand
(a batch of 512 spans, or every 5 s): a batch still queued when a round ends is exported,
and counted, in the next round of "on"; only the last round's remainder goes uncounted.
Every process started is stopped at the end, on failure and on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from harness import (  # noqa: E402
    Processes,
    free_port,
    healthy,
    listening,
    med,
    pct,
    process_cpu_seconds,
    raise_interrupt,
    wait_until,
)
from probes import CHAT, request_bytes, sequential_latencies  # noqa: E402

KEY = "vk_bench_tracing_0123456789"
GATEWAY_CORE, LOAD_CORE = 0, 1
SIDES = ("off", "on")


def serve_sink(port: int) -> None:
    """A collector that takes every export and keeps nothing (runs as `--sink PORT`)."""
    from aiohttp import web

    async def take(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(content_type="application/x-protobuf")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", take)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def main() -> int:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--quick", action="store_true", help="fewer, shorter rounds (about 20 s)")
    cli.add_argument("--sink", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = cli.parse_args()
    if args.sink:
        serve_sink(args.sink)
        return 0
    rounds, requests = (3, 1000) if args.quick else (7, 3000)
    signal.signal(signal.SIGTERM, raise_interrupt)
    procs = Processes()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-tracing-") as tmp:
            ports = start(procs, Path(tmp))
            figures = measure(ports, rounds, requests)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
    report(figures, rounds, requests)
    return 0


def start(procs: Processes, tmp: Path) -> dict[str, tuple[int, int]]:
    """The mock, the sink and both gateways: side → (port, pid)."""
    mock_port, sink_port = free_port(), free_port()
    log = tmp / "mock.log"
    mock = procs.start(
        [
            sys.executable,
            str(BENCH / "mock_provider.py"),
            "--port",
            str(mock_port),
            "--delay-ms",
            "0",
        ],
        LOAD_CORE,
        log,
    )
    wait_until(lambda: listening(mock_port), "the mock provider", mock, log)
    log = tmp / "sink.log"
    sink = procs.start(
        [sys.executable, str(BENCH / "tracing.py"), "--sink", str(sink_port)], LOAD_CORE, log
    )
    wait_until(lambda: listening(sink_port), "the sink collector", sink, log)
    keys = {
        "providers": {"openai": {"base_url": f"http://127.0.0.1:{mock_port}/v1"}},
        "virtual_keys": {
            KEY: {"provider": "openai", "api_key": "sk-bench", "quota": {"requests": 100_000_000}}
        },
    }
    keys_path = tmp / "keys.json"
    keys_path.write_text(json.dumps(keys))
    base = {name: value for name, value in os.environ.items() if not name.startswith("OTEL_")}
    sides: dict[str, tuple[int, int]] = {}
    for side in SIDES:
        port, log = free_port(), tmp / f"gateway-{side}.log"
        env = dict(base)
        if side == "on":
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{sink_port}"
        argv = [
            sys.executable,
            str(ROOT / "gateway.py"),
            "--server-host",
            "127.0.0.1",
            "--server-port",
            str(port),
            "--keys-file-path",
            str(keys_path),
            "--log-to-file",
            "true",
            "--log-file-path",
            str(tmp / f"interactions-{side}.jsonl"),
            "--workers",
            "1",
        ]
        child = procs.start(argv, GATEWAY_CORE, log, env=env)
        wait_until(lambda port=port: healthy(port), f"the gateway (tracing {side})", child, log)
        sides[side] = (port, child.pid)
    return sides


def measure(
    sides: dict[str, tuple[int, int]], rounds: int, requests: int
) -> dict[str, dict[str, list[float]]]:
    figures: dict[str, dict[str, list[float]]] = {
        side: {"cpu_us": [], "p50_us": []} for side in SIDES
    }
    for port, _ in sides.values():  # warm up: imports, connections, caches
        sequential_latencies(port, request_bytes(port, KEY, CHAT), 200)
    for number in range(rounds):
        for side in SIDES if number % 2 == 0 else tuple(reversed(SIDES)):
            port, pid = sides[side]
            before = process_cpu_seconds(pid)
            latencies, bad = sequential_latencies(port, request_bytes(port, KEY, CHAT), requests)
            spent = process_cpu_seconds(pid) - before
            if bad:
                raise SystemExit(f"bench: {bad} non-2xx answers from the gateway (tracing {side})")
            figures[side]["cpu_us"].append(spent / requests * 1e6)
            figures[side]["p50_us"].append(pct(latencies, 50) * 1000)
    return figures


def report(figures: dict[str, dict[str, list[float]]], rounds: int, requests: int) -> None:
    cpu = {side: med(figures[side]["cpu_us"]) for side in SIDES}
    p50 = {side: med(figures[side]["p50_us"]) for side in SIDES}
    print(f"Tracing on vs off: {rounds} rounds of {requests} sequential requests each, medians")
    print()
    print("| | tracing off | tracing on | cost of tracing |")
    print("| --- | --- | --- | --- |")
    print(
        f"| gateway CPU per request (µs) | {cpu['off']:.0f} | {cpu['on']:.0f} | {cpu['on'] - cpu['off']:+.0f} |"
    )
    print(
        f"| latency p50 at c=1 (µs) | {p50['off']:.0f} | {p50['on']:.0f} | {p50['on'] - p50['off']:+.0f} |"
    )


if __name__ == "__main__":
    sys.exit(main())
