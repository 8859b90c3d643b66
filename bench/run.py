"""The gateway against the floor and a direct call, in one run: latency, throughput, streams, memory.

Run from the repository root with the project's venv (`make bench`, or
`.venv/bin/python bench/run.py [--quick]`). Needs `wrk` (Debian: `apt-get install -y wrk`;
`make bench` installs it). Installs nothing itself.

Three contenders serve the same requests from one mock provider (`bench/mock_provider.py`):

- direct: the mock itself, no proxy (what the client would see without one);
- floor: `bench/passthrough.py`, a bare aiohttp passthrough on uvloop (read the body, forward
  it, stream the answer back; no keys, quotas, usage, log or metrics): no Python proxy on
  aiohttp costs less, so the gateway's cost is shown as a ratio to it, which carries from
  one machine to another where absolute figures do not;
- gateway: `gateway.py` with every feature on: quotas in memory, the interaction log to a
  file in a temp dir, metrics and the usage tap (both always on);
- best: the best bare foundation (`bench/foundations.py`, `--best`, by default aiohttp's
  low-level web.Server, the gateway's own upstream client `proxy/upstream/wire.py` and the
  gateway's GC setting), in the throughput test only;
- duties: `bench/duties.py`, the least SPEC asks of each request (key swap, validation, a
  sliding window, rate-limit headers, usage, the log line, metrics) on that foundation,
  in the throughput test only: what the best-foundation target is reachable by.

At the end, issue 30's targets, each as a measured ratio with HOLDS or MISSES.

The floor and the gateway are pinned to core 0 (only one of them is under load at a time),
the mock, wrk and this script's own clients to core 1, all at nice -20 when allowed (so a
shared machine's other processes do not preempt them; `--normal-priority` to skip). Each
measurement visits the contenders in turn, direct first and then floor and gateway in an
order that alternates (A-B, B-A, ...), for several rounds; each figure is the median of the
rounds, so a machine that slows down slows every contender alike. The table also says how
busy the rest of the machine was. Every process it starts is stopped at the end, on
failure and on Ctrl-C too. Exit code 0 once the run completes (`--strict`: 1 when a
target is missed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import harness  # noqa: E402
import probes  # noqa: E402
from harness import (  # noqa: E402,F401  (bench/workers.py reaches these through run)
    Processes,
    busy_cpu_seconds,
    cpu_model,
    free_port,
    healthy,
    listening,
    med,
    own_cpu_seconds,
    pct,
    process_cpu_seconds,
    raise_interrupt,
    rss_mb,
    run_async,
    uses_uvloop,
    wait_until,
)
from probes import CHAT, CHAT_STREAM, Reply  # noqa: E402

_raise_interrupt = raise_interrupt  # the name bench/workers.py uses

KEY = "vk_bench_0123456789"
# The soak's own key, with a short window: the sliding log keeps every admission of the
# window (24 bytes each), so only once a whole window has passed does a steady rate give a
# steady memory, and growth beyond that point would be a leak.
SOAK_KEY = "vk_soak_0123456789"
GATEWAY_CORE, LOAD_CORE = 0, 1
T = TypeVar("T")
SIDES = ("direct", "floor", "gateway")
BEST_FOUNDATION = "lowlevel+wire+gc"  # bench/foundations.py's fastest on 2026-12-03


@dataclass(frozen=True)
class Plan:
    """How long and how often: the full run, or --quick."""

    reps: int = 3
    sequential: int = 2000  # requests per latency repetition
    wrk_seconds: int = 10
    wrk_connections: int = 256
    wrk_timeout_s: int = 2  # a client that waited this long gives up (counted as a timeout)
    throughput_delay_ms: int = 20
    stream_workers: int = 10
    streams_per_worker: int = 10
    chunks: int = 20
    chunk_gap_ms: int = 20
    many: int = 1000
    many_chunks: int = 20
    many_gap_ms: int = 100
    many_spread_s: float = 1.0  # the streams start over this long, then all are open at once
    soak_seconds: int = 60
    soak_warmup_seconds: int = 15  # longer than the soak key's window
    soak_window_seconds: int = 10
    soak_rate: int = 500
    ceiling_seconds: int = 5


QUICK = Plan(
    reps=2,
    sequential=200,
    wrk_seconds=2,
    stream_workers=4,
    streams_per_worker=3,
    chunks=10,
    many=300,
    many_chunks=5,
    many_spread_s=0.3,
    soak_seconds=4,
    soak_warmup_seconds=2,
    soak_window_seconds=1,
    ceiling_seconds=1,
)

# The whole run on tiny settings, to check it runs end to end (tests/process/test_bench.py).
SMOKE = Plan(
    reps=1,
    sequential=20,
    wrk_seconds=1,
    wrk_connections=16,
    stream_workers=2,
    streams_per_worker=1,
    chunks=3,
    chunk_gap_ms=5,
    many=20,
    many_chunks=2,
    many_gap_ms=20,
    many_spread_s=0.05,
    soak_seconds=1,
    soak_warmup_seconds=0,
    soak_window_seconds=1,
    soak_rate=50,
    ceiling_seconds=1,
)

# Issue 30's targets: the gateway, every feature on, against the floor (and the best bare
# foundation) in the same run.
TARGET_RPS_RATIO = 1.0
TARGET_RPS_BEST_RATIO = 0.8
TARGET_ADDED_P50_RATIO = 1.25
TARGET_TTFB_OVER_FLOOR_MS = 0.3
TARGET_IDLE_RSS_MB = 50
TARGET_STREAMS_RSS_MB = 120  # while `many` (1,000 in a full run) streams are open
# Absolute bounds that hold on any machine.
TARGET_ADDED_P99_MS = 1.5
TARGET_THROUGHPUT_P99_MS = 150
TARGET_CHUNK_EXTRA_MS = 2.0
SOAK_GROWTH_TOLERANCE_MB = 1.0  # allocator noise; anything above counts as growth
STALL_MS = 1000  # a chunk later than this (mock's write → client) is a stall


def ratio(gateway: float, floor: float) -> str:
    return f"{gateway / floor:.2f}x" if floor else "n/a"


def per_round(values: list[float]) -> str:
    return "/".join(f"{v:.0f}" for v in values)


class Bench:
    """The contenders, their processes, and one method per measurement, each adding rows."""

    def __init__(self, plan: Plan, procs: Processes, tmp: Path, best: str) -> None:
        self.plan, self.procs, self.tmp, self.best = plan, procs, tmp, best
        self.ports = {s: free_port() for s in (*SIDES, "best", "duties")}
        self.mock_port = self.ports["direct"]
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.rows: list[tuple[str, ...]] = []
        self.passed: dict[str, bool] = {}
        self.summary: dict[str, float] = {}
        self.headline: dict[str, dict[str, str]] = {"floor": {}, "gateway": {}}
        # Issue 30's targets: (what, measured, target, holds)
        self.targets: list[tuple[str, str, str, bool]] = []

    # start

    def start_mock(self) -> None:
        log = self.tmp / "mock.log"
        argv = [
            sys.executable,
            str(BENCH / "mock_provider.py"),
            "--port",
            str(self.mock_port),
            "--chunks",
            str(self.plan.chunks),
            "--chunk-gap-ms",
            str(self.plan.chunk_gap_ms),
        ]
        self.mock = self.children["direct"] = self.procs.start(argv, LOAD_CORE, log)
        wait_until(lambda: listening(self.mock_port), "the mock provider", self.mock, log)

    def start_floor(self) -> None:
        log = self.tmp / "floor.log"
        argv = [
            sys.executable,
            str(BENCH / "passthrough.py"),
            "--port",
            str(self.ports["floor"]),
            "--upstream",
            f"http://127.0.0.1:{self.mock_port}",
        ]
        self.children["floor"] = self.procs.start(argv, GATEWAY_CORE, log)
        wait_until(
            lambda: listening(self.ports["floor"]),
            "the floor (bench/passthrough.py)",
            self.children["floor"],
            log,
        )

    def start_best(self) -> None:
        """The best bare foundation (bench/foundations.py), beside the floor on its core."""
        server, client, *gc = self.best.split("+")
        log = self.tmp / "best.log"
        argv = [sys.executable, str(BENCH / "foundations.py"), "--port", str(self.ports["best"])]
        argv += ["--upstream", f"http://127.0.0.1:{self.mock_port}", "--server", server]
        argv += ["--client", client, *(["--gc"] if gc == ["gc"] else [])]
        self.children["best"] = self.procs.start(argv, GATEWAY_CORE, log)
        wait_until(lambda: listening(self.ports["best"]), f"foundation {self.best}",
                   self.children["best"], log)  # fmt: skip

    def start_duties(self) -> None:
        """The duties floor (bench/duties.py): SPEC's duties on the best bare foundation."""
        log, port = self.tmp / "duties.log", self.ports["duties"]
        argv = [sys.executable, str(BENCH / "duties.py"), "--port", str(port)]
        argv += ["--keys", str(self.tmp / "keys.json"), "--log", str(self.tmp / "duties.jsonl")]
        self.children["duties"] = self.procs.start(argv, GATEWAY_CORE, log)
        wait_until(lambda: listening(port), "the duties floor", self.children["duties"], log)

    def target(self, what: str, measured: str, target: str, holds: bool) -> None:
        self.targets.append((what, measured, target, holds))

    def start_gateway(self) -> None:
        keys = {
            "providers": {"openai": {"base_url": f"http://127.0.0.1:{self.mock_port}/v1"}},
            "virtual_keys": {
                key: {
                    "provider": "openai",
                    "api_key": "sk-bench",
                    "quota": {"requests": 100_000_000, "window_seconds": window},
                }
                for key, window in ((KEY, 3600), (SOAK_KEY, self.plan.soak_window_seconds))
            },
        }
        keys_path = self.tmp / "keys.json"
        keys_path.write_text(json.dumps(keys))
        self.interactions = self.tmp / "interactions.jsonl"
        log = self.tmp / "gateway.log"
        argv = [
            sys.executable,
            str(ROOT / "gateway.py"),
            "--server-host",
            "127.0.0.1",
            "--server-port",
            str(self.ports["gateway"]),
            "--keys-file-path",
            str(keys_path),
            "--quota-enabled",
            "true",
            "--log-to-file",
            "true",
            "--log-file-path",
            str(self.interactions),
            "--shutdown-grace-seconds",
            "2",
            "--workers",
            "1",
        ]
        self.gateway = self.children["gateway"] = self.procs.start(argv, GATEWAY_CORE, log)
        wait_until(lambda: healthy(self.ports["gateway"]), "the gateway", self.gateway, log)

    @property
    def gw_pid(self) -> int:
        """The gateway's own pid: the child of taskset's exec is the same process."""
        return self.children["gateway"].pid

    def pid(self, side: str) -> int:
        return self.children[side].pid

    def rounds(self, proxies: tuple[str, ...] = SIDES[1:]) -> Iterator[tuple[int, str, int]]:
        """(round, side, port): direct first, then the proxies in an order reversed each round."""
        for rep in range(self.plan.reps):
            for side in ("direct", *(proxies if rep % 2 == 0 else proxies[::-1])):
                yield rep, side, self.ports[side]

    def row(
        self,
        name: str,
        direct: str = "",
        floor: str = "",
        gateway: str = "",
        floor_added: str = "",
        gateway_added: str = "",
        vs_floor: str = "",
        target: str = "",
        verdict: bool | None = None,
    ) -> None:
        mark = "" if verdict is None else ("PASS" if verdict else "FAIL")
        self.rows.append(
            (name, direct, floor, gateway, floor_added, gateway_added, vs_floor, target, mark)
        )
        if verdict is not None:
            self.passed[name] = verdict
        print(
            f"  {name:<40} {direct:>9} {floor:>10} {gateway:>10} {floor_added:>8} {gateway_added:>8} {vs_floor:>7}  {mark}",
            flush=True,
        )

    # wrk

    def wrk(
        self,
        port: int,
        core: int | None,
        connections: int,
        seconds: int,
        delay_ms: int,
        timeout_s: int = 5,
    ) -> dict[str, float]:
        return harness.wrk(
            self.procs,
            self.tmp / "wrk.out",
            KEY,
            port,
            core,
            connections,
            seconds,
            delay_ms,
            timeout_s,
        )

    def mock_ceiling(self) -> None:
        result = self.wrk(self.mock_port, GATEWAY_CORE, 64, self.plan.ceiling_seconds, 0)
        self.ceiling = result["rps"]
        print(
            f"  mock provider ceiling: {self.ceiling:,.0f} rps (mock on core {LOAD_CORE}, wrk on core {GATEWAY_CORE}, no delay)",
            flush=True,
        )

    def cpu(self, side: str) -> float:
        return process_cpu_seconds(self.pid(side)) if side != "direct" else 0.0

    # 1. latency at concurrency 1

    def latency(self) -> None:
        plan = self.plan
        p50: dict[str, list[float]] = {s: [] for s in SIDES}
        p99: dict[str, list[float]] = {s: [] for s in SIDES}
        cpu = {s: 0.0 for s in SIDES}
        bad = 0
        for _, side, port in self.rounds():
            raw = probes.request_bytes(port, KEY, CHAT)
            before = self.cpu(side)
            latencies, non2xx = probes.sequential_latencies(port, raw, plan.sequential)
            cpu[side] += self.cpu(side) - before
            p50[side].append(pct(latencies, 50))
            p99[side].append(pct(latencies, 99))
            bad += non2xx
        added50 = {
            s: med([a - d for a, d in zip(p50[s], p50["direct"], strict=True)]) for s in SIDES
        }
        added99 = {
            s: med([a - d for a, d in zip(p99[s], p99["direct"], strict=True)]) for s in SIDES
        }
        self.summary.update(added_p50=added50["gateway"], added_p99=added99["gateway"])
        g50, f50 = added50["gateway"], added50["floor"]
        self.row(
            "latency c=1 p50 (ms)",
            *(f"{med(p50[s]):.3f}" for s in SIDES),
            f"{f50:+.3f}",
            f"{g50:+.3f}",
            ratio(g50, f50),
            f"added <= {TARGET_ADDED_P50_RATIO}x floor's",
            g50 <= TARGET_ADDED_P50_RATIO * f50,
        )
        self.row(
            "latency c=1 p99 (ms)",
            *(f"{med(p99[s]):.3f}" for s in SIDES),
            f"{added99['floor']:+.3f}",
            f"{added99['gateway']:+.3f}",
            ratio(added99["gateway"], added99["floor"]),
            f"added <= +{TARGET_ADDED_P99_MS}",
            added99["gateway"] <= TARGET_ADDED_P99_MS,
        )
        n = plan.reps * plan.sequential
        self.row(
            "  CPU per request at c=1 (us)",
            "",
            f"{cpu['floor'] / n * 1e6:.0f}",
            f"{cpu['gateway'] / n * 1e6:.0f}",
            vs_floor=ratio(cpu["gateway"], cpu["floor"]),
        )
        self.target(
            "added p50 at c=1 against the floor's",
            f"{ratio(g50, f50)} (+{g50:.3f} against +{f50:.3f} ms)",
            f"<= {TARGET_ADDED_P50_RATIO}x",
            g50 <= TARGET_ADDED_P50_RATIO * f50,
        )
        self.headline["floor"]["added p50 at c=1"] = f"+{f50:.2f} ms"
        self.headline["gateway"]["added p50 at c=1"] = f"+{g50:.2f} ms ({ratio(g50, f50)})"
        if bad:
            self.row("latency c=1 non-2xx", gateway=str(bad), target="0", verdict=False)

    # 2. throughput

    def throughput(self) -> None:
        plan = self.plan
        sides = (*SIDES, "best", "duties")
        runs: dict[str, list[dict[str, float]]] = {s: [] for s in sides}
        cpu: dict[str, list[float]] = {s: [] for s in sides}
        for _, side, port in self.rounds(("floor", "gateway", "best", "duties")):
            before = self.cpu(side)
            result = self.wrk(
                port,
                LOAD_CORE,
                plan.wrk_connections,
                plan.wrk_seconds,
                plan.throughput_delay_ms,
                plan.wrk_timeout_s,
            )
            runs[side].append(result)
            if side != "direct" and result["requests"]:
                cpu[side].append((self.cpu(side) - before) / result["requests"] * 1e6)
        fig = {s: {k: med([r[k] for r in runs[s]]) for k in ("rps", "p99_us")} for s in sides}
        timeouts = {s: [r["timeout"] for r in runs[s]] for s in sides}
        other = {s: sum(r["status"] + r["errors"] - r["timeout"] for r in runs[s]) for s in SIDES}
        d, f, g, b, duties = (fig[s] for s in sides)
        self.summary["rps"] = g["rps"]
        label = f"c={plan.wrk_connections}, mock {plan.throughput_delay_ms} ms"
        self.row(
            f"throughput rps ({label})",
            f"{d['rps']:,.0f}",
            f"{f['rps']:,.0f}",
            f"{g['rps']:,.0f}",
            vs_floor=ratio(g["rps"], f["rps"]),
            target=f">= {TARGET_RPS_RATIO}x floor",
            verdict=g["rps"] >= TARGET_RPS_RATIO * f["rps"],
        )
        self.row(
            f"  best bare foundation ({self.best}) rps",
            floor=f"{b['rps']:,.0f}",
            vs_floor=ratio(g["rps"], b["rps"]),
            target=f">= {TARGET_RPS_BEST_RATIO}x best",
            verdict=g["rps"] >= TARGET_RPS_BEST_RATIO * b["rps"],
        )
        self.row(
            f"  timeouts (client gave up after {plan.wrk_timeout_s} s), per round",
            *(per_round(timeouts[s]) for s in SIDES),
            target="none",
            verdict=sum(timeouts["gateway"]) == 0,
        )
        self.row(
            "  throughput p99 (ms)",
            *(f"{fig[s]['p99_us'] / 1000:.1f}" for s in SIDES),
            vs_floor=ratio(g["p99_us"], f["p99_us"]),
            target=f"< {TARGET_THROUGHPUT_P99_MS}",
            verdict=g["p99_us"] / 1000 < TARGET_THROUGHPUT_P99_MS,
        )
        self.row(
            "  non-2xx and other errors (all rounds)",
            *(f"{other[s]:.0f}" for s in SIDES),
            target="0",
            verdict=other["gateway"] == 0,
        )
        self.row(
            "  duties floor (bench/duties.py) rps",
            floor=f"{duties['rps']:,.0f} ({ratio(duties['rps'], b['rps'])} best)",
            vs_floor=ratio(g["rps"], duties["rps"]),
        )
        fc, gc, bc = med(cpu["floor"]), med(cpu["gateway"]), med(cpu["best"])
        self.row(
            "  CPU per request under load (us)",
            "",
            f"{fc:.0f}",
            f"{gc:.0f}",
            vs_floor=ratio(gc, fc),
        )
        self.row("  best foundation's CPU per request (us)", floor=f"{bc:.0f}")
        self.row("  duties floor's CPU per request (us)", floor=f"{med(cpu['duties']):.0f}")
        self.target(
            "throughput against the floor's",
            f"{ratio(g['rps'], f['rps'])} ({g['rps']:,.0f} against {f['rps']:,.0f} rps)",
            f">= {TARGET_RPS_RATIO}x",
            g["rps"] >= TARGET_RPS_RATIO * f["rps"],
        )
        self.target(
            f"throughput against the best bare foundation's ({self.best})",
            f"{ratio(g['rps'], b['rps'])} ({b['rps']:,.0f} rps at {bc:.0f} us a request; "
            f"SPEC's duties on it, bench/duties.py: {ratio(duties['rps'], b['rps'])})",
            f">= {TARGET_RPS_BEST_RATIO}x",
            g["rps"] >= TARGET_RPS_BEST_RATIO * b["rps"],
        )
        self.target(
            f"client timeouts at {plan.wrk_connections} connections ({plan.wrk_timeout_s} s)",
            f"{sum(timeouts['gateway']):.0f} ({per_round(timeouts['gateway'])} a round; "
            f"floor {per_round(timeouts['floor'])}, best {per_round(timeouts['best'])})",
            "none",
            sum(timeouts["gateway"]) == 0,
        )
        self.row(
            "  CPU-bound ceiling (rps)",
            "",
            f"{1e6 / fc:,.0f}" if fc else "n/a",
            f"{1e6 / gc:,.0f}" if gc else "n/a",
        )
        self.summary.update(cpu_floor=fc, cpu_gateway=gc)
        self.headline["floor"]["throughput"] = f"{f['rps']:,.0f} rps"
        self.headline["gateway"]["throughput"] = (
            f"{g['rps']:,.0f} rps ({ratio(g['rps'], f['rps'])})"
        )
        for side in ("floor", "gateway"):
            self.headline[side]["timeouts at 256 conns"] = (
                f"{sum(timeouts[side]):.0f} ({per_round(timeouts[side])} a round)"
            )
            self.headline[side]["CPU per request"] = f"{med(cpu[side]):.0f} us"

    # 3. streaming

    def streaming(self) -> None:
        plan = self.plan
        stagger = plan.chunks * plan.chunk_gap_ms / 1000 / plan.stream_workers
        keys = ("ttfb50", "ttfb99", "delay50", "delaymax", "gap")
        figs: dict[str, dict[str, list[float]]] = {s: {k: [] for k in keys} for s in SIDES}
        cpu = {s: 0.0 for s in SIDES}
        incomplete, streams = 0, 0
        for _, side, port in self.rounds():
            raw = probes.request_bytes(port, KEY, CHAT_STREAM)
            before = self.cpu(side)
            replies: list[Reply] = run_async(
                probes.stream_workers(
                    port, raw, plan.stream_workers, plan.streams_per_worker, stagger
                )
            )
            cpu[side] += self.cpu(side) - before
            if side == "gateway":
                streams += len(replies)
            incomplete += sum(
                1 for r in replies if r.error or not r.saw_done or r.stamped != plan.chunks
            )
            ttfb = [r.ttfb_ms for r in replies if r.first_event_at]
            delays = [d for r in replies for d in r.chunk_delays_ms()]
            gaps = [g for r in replies for g in r.extra_gaps_ms()]
            f = figs[side]
            f["ttfb50"].append(pct(ttfb, 50))
            f["ttfb99"].append(pct(ttfb, 99))
            f["delay50"].append(pct(delays, 50))
            f["delaymax"].append(max(delays, default=float("nan")))
            f["gap"].append(max(gaps, default=float("nan")))
        m = {s: {k: med(v) for k, v in figs[s].items()} for s in SIDES}

        def added(key: str, base: str = "") -> dict[str, float]:
            return {
                s: med(
                    [a - b for a, b in zip(figs[s][key], figs["direct"][base or key], strict=True)]
                )
                for s in SIDES
            }

        t50, t99 = added("ttfb50"), added("ttfb99")
        # A chunk "delayed" by a proxy: its delay beyond what a direct chunk typically takes.
        extra = added("delaymax", "delay50")
        self.summary["ttft_added"] = t50["gateway"]
        n = plan.stream_workers * plan.streams_per_worker
        self.row(
            f"stream ttfb p50 (ms, {n} a round)",
            *(f"{m[s]['ttfb50']:.3f}" for s in SIDES),
            f"{t50['floor']:+.3f}",
            f"{t50['gateway']:+.3f}",
            f"{t50['gateway'] - t50['floor']:+.2f}",
            f"<= floor's +{TARGET_TTFB_OVER_FLOOR_MS}",
            t50["gateway"] - t50["floor"] <= TARGET_TTFB_OVER_FLOOR_MS,
        )
        self.row(
            "stream ttfb p99 (ms)",
            *(f"{m[s]['ttfb99']:.3f}" for s in SIDES),
            f"{t99['floor']:+.3f}",
            f"{t99['gateway']:+.3f}",
            f"{t99['gateway'] - t99['floor']:+.2f}",
        )
        self.row("chunk delay p50 (ms)", *(f"{m[s]['delay50']:.3f}" for s in SIDES))
        self.row(
            "chunk delay max (ms)",
            *(f"{m[s]['delaymax']:.3f}" for s in SIDES),
            f"{extra['floor']:+.3f}",
            f"{extra['gateway']:+.3f}",
            target=f"<= +{TARGET_CHUNK_EXTRA_MS}",
            verdict=extra["gateway"] <= TARGET_CHUNK_EXTRA_MS,
        )
        self.row("largest extra gap (ms)", *(f"{m[s]['gap']:.3f}" for s in SIDES))
        per = {s: cpu[s] / max(1, streams) * 1e6 for s in SIDES}
        self.row(
            f"  CPU per stream (us, {plan.chunks} chunks)",
            "",
            f"{per['floor']:.0f}",
            f"{per['gateway']:.0f}",
            vs_floor=ratio(per["gateway"], per["floor"]),
        )
        self.target(
            "stream time to first byte over the floor's (p50)",
            f"{t50['gateway'] - t50['floor']:+.3f} ms (+{t50['gateway']:.3f} against "
            f"+{t50['floor']:.3f} ms)",
            f"<= +{TARGET_TTFB_OVER_FLOOR_MS} ms",
            t50["gateway"] - t50["floor"] <= TARGET_TTFB_OVER_FLOOR_MS,
        )
        self.headline["floor"]["stream TTFB added"] = f"+{t50['floor']:.2f} ms"
        self.headline["gateway"]["stream TTFB added"] = (
            f"+{t50['gateway']:.2f} ms ({t50['gateway'] - t50['floor']:+.2f})"
        )
        if incomplete:
            self.row("streams incomplete", gateway=str(incomplete), target="0", verdict=False)

    # 4. many simultaneous streams

    def many_streams(self) -> None:
        plan = self.plan
        extra = {"x-mock-chunks": str(plan.many_chunks), "x-mock-gap-ms": str(plan.many_gap_ms)}
        keys = ("done", "delay99", "delaymax", "stalls", "rss", "cpu")
        figs: dict[str, dict[str, list[float]]] = {s: {k: [] for k in keys} for s in SIDES}
        for _, side, port in self.rounds():
            raw = probes.request_bytes(port, KEY, CHAT_STREAM, extra)
            timeout = plan.many_chunks * plan.many_gap_ms / 1000 + 30
            pid = self.pid(side)
            before = self.cpu(side)
            (replies, _), peak = run_async(
                sampling_rss(
                    pid, probes.many_streams(port, raw, plan.many, plan.many_spread_s, timeout)
                )
            )
            figs[side]["rss"].append(peak)
            figs[side]["cpu"].append(self.cpu(side) - before)
            done = sum(
                1 for r in replies if not r.error and r.saw_done and r.stamped == plan.many_chunks
            )
            delays = [d for r in replies for d in r.chunk_delays_ms()]
            stalls = sum(1 for r in replies if any(d > STALL_MS for d in r.chunk_delays_ms()))
            f = figs[side]
            f["done"].append(done)
            f["delay99"].append(pct(delays, 99))
            f["delaymax"].append(max(delays, default=float("nan")))
            f["stalls"].append(stalls + (plan.many - done))
        m = {s: {k: med(v) for k, v in figs[s].items()} for s in SIDES}
        worst_done, worst_stalls = min(figs["gateway"]["done"]), max(figs["gateway"]["stalls"])
        label = f"{plan.many} streams x {plan.many_chunks} chunks, {plan.many_gap_ms} ms"
        self.row(
            f"completed ({label})",
            *(f"{m[s]['done']:.0f}" for s in SIDES),
            target=f"{plan.many}",
            verdict=worst_done == plan.many,
        )
        self.row("  chunk delay p99 (ms)", *(f"{m[s]['delay99']:.2f}" for s in SIDES))
        self.row("  chunk delay max (ms)", *(f"{m[s]['delaymax']:.2f}" for s in SIDES))
        self.row(
            f"  stalled streams (> {STALL_MS} ms)",
            *(f"{max(figs[s]['stalls']):.0f}" for s in SIDES),
            target="0",
            verdict=worst_stalls == 0,
        )
        chunks = plan.many * plan.many_chunks
        per_chunk = {s: med(figs[s]["cpu"]) / chunks * 1e6 for s in ("floor", "gateway")}
        self.row(
            "  CPU per chunk (us)",
            "",
            f"{per_chunk['floor']:.1f}",
            f"{per_chunk['gateway']:.1f}",
            vs_floor=ratio(per_chunk["gateway"], per_chunk["floor"]),
        )
        self.summary["cpu_per_chunk"] = per_chunk["gateway"]
        self.summary["cpu_per_chunk_floor"] = per_chunk["floor"]
        rss = {s: max(figs[s]["rss"]) for s in ("floor", "gateway")}
        self.row(
            f"  RSS with {plan.many} streams open, highest (MB)",
            "",
            f"{rss['floor']:.1f}",
            f"{rss['gateway']:.1f}",
            vs_floor=ratio(rss["gateway"], rss["floor"]),
            target=f"<= {TARGET_STREAMS_RSS_MB}",
            verdict=rss["gateway"] <= TARGET_STREAMS_RSS_MB,
        )
        self.target(
            f"RSS under {plan.many:,} open streams",
            f"{rss['gateway']:.1f} MB (floor {rss['floor']:.1f} MB)",
            f"<= {TARGET_STREAMS_RSS_MB} MB",
            rss["gateway"] <= TARGET_STREAMS_RSS_MB,
        )

    # 5. memory

    def soak(self) -> None:
        plan = self.plan
        samples: list[float] = []
        port = self.ports["gateway"]
        raw = probes.request_bytes(port, SOAK_KEY, CHAT)

        async def soak_and_sample() -> tuple[int, int]:
            await probes.steady_rate(port, raw, plan.soak_rate, plan.soak_warmup_seconds)
            task = asyncio.create_task(
                probes.steady_rate(port, raw, plan.soak_rate, plan.soak_seconds)
            )
            while not task.done():
                samples.append(rss_mb(self.gw_pid))
                await asyncio.sleep(1)
            samples.append(rss_mb(self.gw_pid))
            return await task

        sent, failed = run_async(soak_and_sample())
        growth = samples[-1] - samples[0]
        self.summary["soak_growth"] = growth
        self.row(
            f"gateway soak {plan.soak_seconds} s at {plan.soak_rate} rps: sent/failed",
            gateway=f"{sent}/{failed}",
            target="0 failed",
            verdict=failed == 0,
        )
        self.row(
            "  gateway RSS growth (MB)",
            gateway=f"{samples[0]:.1f}->{samples[-1]:.1f}",
            gateway_added=f"{growth:+.2f}",
            target=f"<= +{SOAK_GROWTH_TOLERANCE_MB}",
            verdict=growth <= SOAK_GROWTH_TOLERANCE_MB,
        )

    def memory_rows(self, idle: dict[str, float]) -> None:
        peak = {s: rss_mb(self.pid(s), "VmHWM") for s in ("floor", "gateway")}
        self.summary["rss_idle"], self.summary["rss_peak"] = idle["gateway"], peak["gateway"]
        self.row(
            "RSS idle (MB)",
            "",
            f"{idle['floor']:.1f}",
            f"{idle['gateway']:.1f}",
            vs_floor=ratio(idle["gateway"], idle["floor"]),
            target=f"<= {TARGET_IDLE_RSS_MB}",
            verdict=idle["gateway"] <= TARGET_IDLE_RSS_MB,
        )
        self.target(
            "RSS idle (started, no request yet)",
            f"{idle['gateway']:.1f} MB (floor {idle['floor']:.1f}, best {idle['best']:.1f} MB)",
            f"<= {TARGET_IDLE_RSS_MB} MB",
            idle["gateway"] <= TARGET_IDLE_RSS_MB,
        )
        self.row(
            "RSS peak (MB)",
            "",
            f"{peak['floor']:.1f}",
            f"{peak['gateway']:.1f}",
            vs_floor=ratio(peak["gateway"], peak["floor"]),
        )
        self.row(
            "RSS at the end (MB)",
            "",
            f"{rss_mb(self.pid('floor')):.1f}",
            f"{rss_mb(self.gw_pid):.1f}",
        )
        for side in ("floor", "gateway"):
            self.headline[side]["RSS idle / peak"] = f"{idle[side]:.0f} / {peak[side]:.0f} MB"

    def warm_up(self) -> None:
        for side in SIDES:
            port = self.ports[side]
            probes.sequential_latencies(port, probes.request_bytes(port, KEY, CHAT), 200)
            run_async(
                probes.stream_workers(
                    port,
                    probes.request_bytes(port, KEY, CHAT_STREAM, {"x-mock-gap-ms": "1"}),
                    4,
                    2,
                    0,
                )
            )


async def sampling_rss(pid: int, work: Coroutine[Any, Any, T]) -> tuple[T, float]:
    """`work`'s result, and the highest RSS (MB) of process `pid` while it ran (every 50 ms)."""
    task = asyncio.ensure_future(work)
    peak = rss_mb(pid)
    while not task.done():
        await asyncio.wait((task,), timeout=0.05)
        peak = max(peak, rss_mb(pid))
    return task.result(), peak


def load_average() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores"


def check_tools() -> None:
    if shutil.which("wrk") is None:
        raise SystemExit(
            "bench: wrk is not installed. On Debian/Ubuntu: `apt-get update && apt-get install -y wrk` "
            "(`make bench` does this), elsewhere see https://github.com/wg/wrk."
        )
    if shutil.which("taskset") is None:
        print(
            "bench: taskset not found (util-linux): processes will not be pinned", file=sys.stderr
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Benchmark the gateway against a bare passthrough and direct calls to a mock provider."
    )
    parser.add_argument(
        "--quick", action="store_true", help="shorter runs: the whole thing in under a minute"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temp dir (logs, interaction log)"
    )
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 when a target is missed (else 0 once the run completes)",
    )
    parser.add_argument(
        "--normal-priority",
        action="store_true",
        help="do not raise the bench processes to nice -20 (they are by default, when allowed, so "
        "that other processes on a shared machine do not preempt the gateway mid-request)",
    )
    parser.add_argument(
        "--best",
        default=BEST_FOUNDATION,
        help=f"the best bare foundation, SERVER+CLIENT[+gc] of bench/foundations.py "
        f"(default {BEST_FOUNDATION})",
    )
    args = parser.parse_args()
    check_tools()
    plan = SMOKE if args.smoke else QUICK if args.quick else Plan()
    if (os.cpu_count() or 1) < 2:
        raise SystemExit(
            "bench: needs 2 cores (floor and gateway on one, load and mock on the other)"
        )
    os.sched_setaffinity(0, {LOAD_CORE})  # this script's own clients run beside the mock
    priority = "normal (nice 0)"
    if not args.normal_priority:
        try:
            os.setpriority(
                os.PRIO_PROCESS, 0, -20
            )  # inherited by the mock, the floor, the gateway and wrk
            priority = "nice -20 for every bench process, every contender alike"
        except PermissionError:
            priority = "normal (nice -20 needs root)"
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, raise_interrupt)
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="llm-gateway-bench-"))
    load_before = load_average()
    busy_before, before = busy_cpu_seconds(), time.monotonic()
    time.sleep(1.0)
    background = (
        (busy_cpu_seconds() - busy_before) / (time.monotonic() - before) / (os.cpu_count() or 1)
    )
    if background > 0.05:
        print(
            f"bench: warning: the machine is {background:.0%} busy before the run: other processes will add noise",
            file=sys.stderr,
        )
    started, busy_start, own_start = time.monotonic(), busy_cpu_seconds(), own_cpu_seconds()
    try:
        bench = Bench(plan, procs, tmp, args.best)
        print(
            f"bench: {'quick' if args.quick else 'full'} run, {plan.reps} rounds per figure, temp dir {tmp}",
            flush=True,
        )
        print(
            f"  {'':<40} {'direct':>9} {'floor':>10} {'gateway':>10} {'+floor':>8} {'+gateway':>8} {'g/floor':>7}",
            flush=True,
        )
        bench.start_mock()
        bench.mock_ceiling()
        bench.start_floor()
        bench.start_gateway()
        bench.start_best()
        bench.start_duties()
        time.sleep(0.5)
        idle = {s: rss_mb(bench.pid(s)) for s in ("floor", "gateway", "best")}
        uvloop = {s: uses_uvloop(bench.pid(s)) for s in SIDES}
        bench.warm_up()
        bench.latency()
        bench.streaming()
        bench.throughput()
        bench.many_streams()
        bench.soak()
        bench.memory_rows(idle)
        log_lines = sum(1 for _ in open(bench.interactions, "rb"))
        ours = own_cpu_seconds() - own_start + sum(process_cpu_seconds(bench.pid(s)) for s in SIDES)
        elapsed = time.monotonic() - started
        foreign = max(0.0, busy_cpu_seconds() - busy_start - ours) / elapsed / (os.cpu_count() or 1)
        noise = (
            f"priority: {priority}; other processes on the machine: {background:.0%} of its CPU "
            f"before the run, {foreign:.0%} during it; load average {load_before} before, "
            f"{load_average()} after"
        )
        report(bench, plan, args.quick, uvloop, log_lines, elapsed, noise)
        return 1 if args.strict and not all(bench.passed.values()) else 0
    except KeyboardInterrupt:
        print("\nbench: interrupted", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def report(
    bench: Bench,
    plan: Plan,
    quick: bool,
    uvloop: dict[str, bool],
    log_lines: int,
    elapsed: float,
    noise: str,
) -> None:
    s = bench.summary
    print()
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cores ({platform.machine()}, Linux {platform.release()})"
    )
    print(
        f"python {platform.python_version()}; uvloop: "
        + ", ".join(f"{side} {'yes' if on else 'no'}" for side, on in uvloop.items())
        + f"; floor and gateway on core {GATEWAY_CORE}, mock + load on core {LOAD_CORE}; gateway: quotas on, "
        f"interaction log to a file ({log_lines:,} lines)"
    )
    print(
        f"mock ceiling: {bench.ceiling:,.0f} rps (its own core, no delay); run: {'--quick' if quick else 'full'}, "
        f"median of {plan.reps} interleaved rounds each, {elapsed:.0f} s"
    )
    print(noise)
    print()
    headers = (
        "measure",
        "direct",
        "floor",
        "gateway",
        "floor added",
        "gateway added",
        "gateway/floor",
        "target",
        "",
    )
    widths = [max(len(str(r[i])) for r in [headers, *bench.rows]) for i in range(len(headers))]
    line = "  ".join(
        f"{{:<{widths[0]}}}" if i == 0 else f"{{:>{widths[i]}}}" for i in range(len(headers))
    )
    print(line.format(*headers))
    print("  ".join("-" * w for w in widths))
    for row in bench.rows:
        print(line.format(*row))
    print()
    print(
        "issue 30's targets (the gateway with every feature on: quotas in memory, the log to a "
        "file, metrics, usage tap):"
    )
    width = max(len(what) for what, *_ in bench.targets)
    for what, measured, target, holds in bench.targets:
        print(
            f"  {'HOLDS ' if holds else 'MISSES'}  {what:<{width}}  {measured}  (target {target})"
        )
    held = sum(1 for *_, holds in bench.targets if holds)
    print(f"  {held} of {len(bench.targets)} hold")
    print()
    failed = [name for name, ok in bench.passed.items() if not ok]
    print(
        f"targets: {len(bench.passed) - len(failed)}/{len(bench.passed)} met"
        + (f"; missed: {', '.join(failed)}" if failed else "")
    )
    print()
    order = (
        "throughput",
        "timeouts at 256 conns",
        "added p50 at c=1",
        "stream TTFB added",
        "RSS idle / peak",
        "CPU per request",
    )
    columns = [c for c in order if c in bench.headline["gateway"]]
    print("| | " + " | ".join(columns) + " |")
    print("| --- " * (len(columns) + 1) + "|")
    for side, name in (("floor", "bare passthrough"), ("gateway", "llm-gateway")):
        print(f"| {name} | " + " | ".join(bench.headline[side].get(c, "") for c in columns) + " |")
    print()
    print(
        f"bench: added p50 {s['added_p50']:.2f} ms, p99 {s['added_p99']:.2f} ms, {s['rps']:.0f} rps/core, "
        f"stream ttft {s['ttft_added']:+.2f} ms, rss {s['rss_idle']:.0f} MB"
    )


if __name__ == "__main__":
    sys.exit(main())
