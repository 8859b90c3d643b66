"""The gateway against a direct call, in one run: latency, throughput, streams, memory.

Run from the repository root with the project's venv (`make bench`, or
`.venv/bin/python bench/run.py [--quick]`). Needs `wrk` (Debian: `apt-get install -y wrk`;
`make bench` installs it). Installs nothing itself.

It starts the mock provider (`bench/mock_provider.py`) and the gateway (`gateway.py`, with
quotas on and the interaction log to a file in a temp dir), the gateway pinned to core 0,
the mock, wrk and this script's own clients to core 1, all at nice -20 when allowed (so a
shared machine's other processes do not preempt them; `--normal-priority` to skip). Each
measurement is made direct to the mock and through the gateway, the two alternating,
several times; every figure in the table is the median of those repetitions. The table
also says how busy the rest of the machine was. Every process it starts is stopped at the
end, on failure and on Ctrl-C too. Exit code 0 once the run completes (`--strict`: 1 when
a target is missed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import probes  # noqa: E402
from probes import CHAT, CHAT_STREAM, Reply  # noqa: E402

KEY = "vk_bench_0123456789"
# The soak's own key, with a short window: the sliding log keeps every admission of the
# window (24 bytes each), so only once a whole window has passed does a steady rate give a
# steady memory, and growth beyond that point would be a leak.
SOAK_KEY = "vk_soak_0123456789"
GATEWAY_CORE, LOAD_CORE = 0, 1
MB = 1024 * 1024


@dataclass(frozen=True)
class Plan:
    """How long and how often: the full run, or --quick."""

    reps: int = 3
    sequential: int = 2000  # requests per latency repetition
    wrk_seconds: int = 15
    wrk_connections: int = 256
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
    sequential=500,
    wrk_seconds=2,
    stream_workers=4,
    streams_per_worker=4,
    many_chunks=8,
    many_spread_s=0.4,
    soak_seconds=8,
    soak_warmup_seconds=3,
    soak_window_seconds=2,
    ceiling_seconds=2,
)

# Targets from issue 6, for one gateway process on one core.
TARGET_ADDED_P50_MS = 0.5
TARGET_ADDED_P99_MS = 1.5
TARGET_RPS = 3000
TARGET_THROUGHPUT_P99_MS = 150
TARGET_TTFB_ADDED_P99_MS = 1.0
TARGET_CHUNK_EXTRA_MS = 2.0
TARGET_IDLE_RSS_MB = 60
SOAK_GROWTH_TOLERANCE_MB = 1.0  # allocator noise; anything above counts as growth
STALL_MS = 1000  # a chunk later than this (mock's write → client) is a stall


# --- processes ---------------------------------------------------------------------------


class Processes:
    """Every child this run starts, each in its own process group, all stopped at the end."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], core: int | None, log: Path | None = None, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        if core is not None and shutil.which("taskset"):
            argv = ["taskset", "-c", str(core), *argv]
        out = open(log, "wb") if log else subprocess.DEVNULL
        try:
            child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT if log else None, env=env, start_new_session=True, cwd=ROOT)
        finally:
            if log:
                out.close()  # type: ignore[union-attr]
        self.children.append(child)
        return child

    def stop(self, child: subprocess.Popen[bytes], grace: float = 5.0) -> None:
        if child.poll() is None:
            try:
                os.killpg(child.pid, signal.SIGTERM)
                child.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
            except ProcessLookupError:
                pass
        if child in self.children:
            self.children.remove(child)

    def stop_all(self) -> None:
        for child in reversed(list(self.children)):
            try:
                self.stop(child)
            except Exception as error:  # keep stopping the others
                print(f"bench: could not stop pid {child.pid}: {error}", file=sys.stderr)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check: Callable[[], bool], what: str, child: subprocess.Popen[bytes], log: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise SystemExit(f"bench: {what} exited with {child.returncode}:\n{log.read_text()[-2000:]}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"bench: {what} did not come up within {timeout:g} s:\n{log.read_text()[-2000:]}")


def listening(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True


def healthy(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as reply:
        return reply.status == 200


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def uses_uvloop(pid: int) -> bool:
    try:
        return "uvloop" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def busy_cpu_seconds() -> float:
    """CPU time the whole machine spent busy since boot (all cores), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of one live process, from /proc/PID/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """This script's CPU time plus that of its children already waited for (wrk)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# --- statistics --------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --- measurements ------------------------------------------------------------------------


class Bench:
    def __init__(self, plan: Plan, procs: Processes, tmp: Path) -> None:
        self.plan, self.procs, self.tmp = plan, procs, tmp
        self.mock_port = free_port()
        self.gw_port = free_port()
        self.gateway: subprocess.Popen[bytes] | None = None
        self.mock: subprocess.Popen[bytes] | None = None
        self.rows: list[tuple[str, str, str, str, str, str]] = []
        self.passed: dict[str, bool] = {}
        self.summary: dict[str, float] = {}

    # start

    def start_mock(self) -> None:
        log = self.tmp / "mock.log"
        argv = [sys.executable, str(BENCH / "mock_provider.py"), "--port", str(self.mock_port),
                "--chunks", str(self.plan.chunks), "--chunk-gap-ms", str(self.plan.chunk_gap_ms)]
        self.mock = self.procs.start(argv, LOAD_CORE, log)
        wait_until(lambda: listening(self.mock_port), "the mock provider", self.mock, log)

    def start_gateway(self) -> None:
        keys = {
            "providers": {"openai": {"base_url": f"http://127.0.0.1:{self.mock_port}/v1"}},
            "virtual_keys": {
                key: {"provider": "openai", "api_key": "sk-bench", "quota": {"requests": 100_000_000, "window_seconds": window}}
                for key, window in ((KEY, 3600), (SOAK_KEY, self.plan.soak_window_seconds))
            },
        }
        keys_path = self.tmp / "keys.json"
        keys_path.write_text(json.dumps(keys))
        self.interactions = self.tmp / "interactions.jsonl"
        log = self.tmp / "gateway.log"
        argv = [sys.executable, str(ROOT / "gateway.py"), "--server-host", "127.0.0.1", "--server-port", str(self.gw_port),
                "--keys-file-path", str(keys_path), "--quota-enabled", "true", "--log-to-file", "true",
                "--log-file-path", str(self.interactions), "--shutdown-grace-seconds", "2", "--workers", "1"]
        self.gateway = self.procs.start(argv, GATEWAY_CORE, log)
        wait_until(lambda: healthy(self.gw_port), "the gateway", self.gateway, log)

    @property
    def gw_pid(self) -> int:
        """The gateway's own pid: the child of taskset's exec is the same process."""
        assert self.gateway is not None
        return self.gateway.pid

    def targets(self) -> list[tuple[str, int]]:
        return [("direct", self.mock_port), ("gateway", self.gw_port)]

    def row(self, name: str, direct: str, gateway: str, added: str = "", target: str = "", verdict: bool | None = None) -> None:
        mark = "" if verdict is None else ("PASS" if verdict else "FAIL")
        self.rows.append((name, direct, gateway, added, target, mark))
        if verdict is not None:
            self.passed[name] = verdict
        print(f"  {name:<34} direct {direct:>12}  gateway {gateway:>12}  {added:>10}  {mark}", flush=True)

    # wrk

    def wrk(self, port: int, core: int, connections: int, seconds: int, delay_ms: int) -> dict[str, float]:
        env = dict(os.environ, BENCH_KEY=KEY, BENCH_DELAY_MS=str(delay_ms))
        log = self.tmp / "wrk.out"
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "-s", str(BENCH / "chat.lua"),
                f"http://127.0.0.1:{port}/v1/chat/completions"]
        child = self.procs.start(argv, core, log, env=env)
        try:
            child.wait(timeout=seconds + 30)
        finally:
            self.procs.stop(child)
        text = log.read_text()
        for line in text.splitlines():
            if line.startswith("BENCHJSON "):
                data = json.loads(line[len("BENCHJSON "):])
                data["rps"] = data["requests"] / (data["duration_us"] / 1e6)
                data["errors"] = data["connect"] + data["read"] + data["write"] + data["timeout"]
                return data
        raise SystemExit(f"bench: wrk gave no summary:\n{text[-2000:]}")

    def mock_ceiling(self) -> None:
        result = self.wrk(self.mock_port, GATEWAY_CORE, 64, self.plan.ceiling_seconds, 0)
        self.ceiling = result["rps"]
        print(f"  mock provider ceiling: {self.ceiling:,.0f} rps (mock on core {LOAD_CORE}, wrk on core {GATEWAY_CORE}, no delay)", flush=True)

    # 1. latency at concurrency 1

    def latency(self) -> None:
        plan = self.plan
        p50: dict[str, list[float]] = {"direct": [], "gateway": []}
        p99: dict[str, list[float]] = {"direct": [], "gateway": []}
        bad, cpu = 0, 0.0
        for _ in range(plan.reps):
            for side, port in self.targets():
                raw = probes.request_bytes(port, KEY, CHAT)
                cpu_before = process_cpu_seconds(self.gw_pid)
                latencies, non2xx = probes.sequential_latencies(port, raw, plan.sequential)
                if side == "gateway":
                    cpu += process_cpu_seconds(self.gw_pid) - cpu_before
                p50[side].append(pct(latencies, 50))
                p99[side].append(pct(latencies, 99))
                bad += non2xx
        d50, g50, d99, g99 = med(p50["direct"]), med(p50["gateway"]), med(p99["direct"]), med(p99["gateway"])
        added50 = med([g - d for g, d in zip(p50["gateway"], p50["direct"])])
        added99 = med([g - d for g, d in zip(p99["gateway"], p99["direct"])])
        self.summary.update(added_p50=added50, added_p99=added99)
        self.row("latency c=1 p50 (ms)", f"{d50:.3f}", f"{g50:.3f}", f"{added50:+.3f}", f"<= +{TARGET_ADDED_P50_MS}", added50 <= TARGET_ADDED_P50_MS)
        self.row("latency c=1 p99 (ms)", f"{d99:.3f}", f"{g99:.3f}", f"{added99:+.3f}", f"<= +{TARGET_ADDED_P99_MS}", added99 <= TARGET_ADDED_P99_MS)
        self.row("  gateway CPU per request (us)", "", f"{cpu / (plan.reps * plan.sequential) * 1e6:.0f}")
        if bad:
            self.row("latency c=1 non-2xx", "", str(bad), "", "0", False)

    # 2. throughput

    def throughput(self) -> None:
        plan = self.plan
        runs: dict[str, list[dict[str, float]]] = {"direct": [], "gateway": []}
        cpu = []
        for _ in range(plan.reps):
            for side, port in self.targets():
                cpu_before = process_cpu_seconds(self.gw_pid)
                result = self.wrk(port, LOAD_CORE, plan.wrk_connections, plan.wrk_seconds, plan.throughput_delay_ms)
                runs[side].append(result)
                if side == "gateway" and result["requests"]:
                    cpu.append((process_cpu_seconds(self.gw_pid) - cpu_before) / result["requests"] * 1e6)
        fig = {side: {name: med([r[name] for r in rs]) for name in ("rps", "p99_us", "status", "errors")} for side, rs in runs.items()}
        d, g = fig["direct"], fig["gateway"]
        bad_total = sum(r["status"] + r["errors"] for r in runs["gateway"])
        self.summary["rps"] = g["rps"]
        label = f"c={plan.wrk_connections}, mock {plan.throughput_delay_ms} ms"
        self.row(f"throughput rps ({label})", f"{d['rps']:,.0f}", f"{g['rps']:,.0f}", "", f">= {TARGET_RPS:,}", g["rps"] >= TARGET_RPS)
        self.row("  gateway CPU per request (us)", "", f"{med(cpu):.0f}", "", "", None)
        self.row("  gateway CPU-bound ceiling (rps)", "", f"{1e6 / med(cpu):,.0f}" if cpu else "n/a")
        self.row("throughput p99 (ms)", f"{d['p99_us'] / 1000:.1f}", f"{g['p99_us'] / 1000:.1f}", f"{(g['p99_us'] - d['p99_us']) / 1000:+.1f}",
                 f"< {TARGET_THROUGHPUT_P99_MS}", g["p99_us"] / 1000 < TARGET_THROUGHPUT_P99_MS)
        self.row("throughput non-2xx + errors (all)", f"{sum(r['status'] + r['errors'] for r in runs['direct']):.0f}",
                 f"{bad_total:.0f}", "", "0", bad_total == 0)

    # 3. streaming

    def streaming(self) -> None:
        plan = self.plan
        stagger = plan.chunks * plan.chunk_gap_ms / 1000 / plan.stream_workers
        figs: dict[str, dict[str, list[float]]] = {s: {"ttfb50": [], "ttfb99": [], "delay50": [], "delaymax": [], "gap": []} for s in ("direct", "gateway")}
        incomplete, cpu, streams = 0, 0.0, 0
        for _ in range(plan.reps):
            for side, port in self.targets():
                raw = probes.request_bytes(port, KEY, CHAT_STREAM)
                cpu_before = process_cpu_seconds(self.gw_pid)
                replies: list[Reply] = run_async(probes.stream_workers(port, raw, plan.stream_workers, plan.streams_per_worker, stagger))
                if side == "gateway":
                    cpu += process_cpu_seconds(self.gw_pid) - cpu_before
                    streams += len(replies)
                incomplete += sum(1 for r in replies if r.error or not r.saw_done or r.stamped != plan.chunks)
                ttfb = [r.ttfb_ms for r in replies if r.first_event_at]
                delays = [d for r in replies for d in r.chunk_delays_ms()]
                gaps = [g for r in replies for g in r.extra_gaps_ms()]
                f = figs[side]
                f["ttfb50"].append(pct(ttfb, 50))
                f["ttfb99"].append(pct(ttfb, 99))
                f["delay50"].append(pct(delays, 50))
                f["delaymax"].append(max(delays, default=float("nan")))
                f["gap"].append(max(gaps, default=float("nan")))
        d, g = ({k: med(v) for k, v in figs[s].items()} for s in ("direct", "gateway"))
        added50 = med([a - b for a, b in zip(figs["gateway"]["ttfb50"], figs["direct"]["ttfb50"])])
        added99 = med([a - b for a, b in zip(figs["gateway"]["ttfb99"], figs["direct"]["ttfb99"])])
        # A chunk "delayed" by the gateway: its delay beyond what a direct chunk typically takes.
        extra = med([a - b for a, b in zip(figs["gateway"]["delaymax"], figs["direct"]["delay50"])])
        self.summary["ttft_added"] = added99
        n = plan.stream_workers * plan.streams_per_worker
        self.row(f"stream ttfb p50 (ms, {n}/rep)", f"{d['ttfb50']:.3f}", f"{g['ttfb50']:.3f}", f"{added50:+.3f}")
        self.row("stream ttfb p99 (ms)", f"{d['ttfb99']:.3f}", f"{g['ttfb99']:.3f}", f"{added99:+.3f}", f"<= +{TARGET_TTFB_ADDED_P99_MS}", added99 <= TARGET_TTFB_ADDED_P99_MS)
        self.row("chunk delay p50 (ms)", f"{d['delay50']:.3f}", f"{g['delay50']:.3f}", f"{g['delay50'] - d['delay50']:+.3f}")
        self.row("chunk delay max (ms)", f"{d['delaymax']:.3f}", f"{g['delaymax']:.3f}", f"{extra:+.3f}", f"<= +{TARGET_CHUNK_EXTRA_MS}", extra <= TARGET_CHUNK_EXTRA_MS)
        self.row("largest extra gap (ms)", f"{d['gap']:.3f}", f"{g['gap']:.3f}", f"{g['gap'] - d['gap']:+.3f}")
        self.row(f"  gateway CPU per stream (us, {plan.chunks} chunks)", "", f"{cpu / max(1, streams) * 1e6:.0f}")
        if incomplete:
            self.row("streams incomplete", "", str(incomplete), "", "0", False)

    # 4. many simultaneous streams

    def many_streams(self) -> None:
        plan = self.plan
        extra = {"x-mock-chunks": str(plan.many_chunks), "x-mock-gap-ms": str(plan.many_gap_ms)}
        figs: dict[str, dict[str, list[float]]] = {s: {"done": [], "delay99": [], "delaymax": [], "stalls": [], "connect": []} for s in ("direct", "gateway")}
        for _ in range(plan.reps):
            for side, port in self.targets():
                raw = probes.request_bytes(port, KEY, CHAT_STREAM, extra)
                timeout = plan.many_chunks * plan.many_gap_ms / 1000 + 30
                replies, connect_s = run_async(probes.many_streams(port, raw, plan.many, plan.many_spread_s, timeout))
                done = sum(1 for r in replies if not r.error and r.saw_done and r.stamped == plan.many_chunks)
                delays = [d for r in replies for d in r.chunk_delays_ms()]
                stalls = sum(1 for r in replies if any(d > STALL_MS for d in r.chunk_delays_ms()))
                f = figs[side]
                f["done"].append(done)
                f["delay99"].append(pct(delays, 99))
                f["delaymax"].append(max(delays, default=float("nan")))
                f["stalls"].append(stalls + (plan.many - done))
                f["connect"].append(connect_s)
                if side == "gateway":
                    self.peak_during_many = max(getattr(self, "peak_during_many", 0.0), rss_mb(self.gw_pid))
        d, g = ({k: med(v) for k, v in figs[s].items()} for s in ("direct", "gateway"))
        worst_done = min(figs["gateway"]["done"])
        label = f"{plan.many} streams x {plan.many_chunks} chunks, {plan.many_gap_ms} ms"
        self.row(f"completed ({label})", f"{d['done']:.0f}", f"{g['done']:.0f}", "", f"{plan.many}", worst_done == plan.many)
        self.row("  chunk delay p99 (ms)", f"{d['delay99']:.2f}", f"{g['delay99']:.2f}", f"{g['delay99'] - d['delay99']:+.2f}")
        self.row("  chunk delay max (ms)", f"{d['delaymax']:.2f}", f"{g['delaymax']:.2f}", f"{g['delaymax'] - d['delaymax']:+.2f}")
        self.row(f"  stalled streams (> {STALL_MS} ms)", f"{d['stalls']:.0f}", f"{max(figs['gateway']['stalls']):.0f}", "", "0", max(figs["gateway"]["stalls"]) == 0)

    # 5. memory

    def soak(self) -> None:
        plan = self.plan
        samples: list[float] = []
        raw = probes.request_bytes(self.gw_port, SOAK_KEY, CHAT)

        async def soak_and_sample() -> tuple[int, int]:
            await probes.steady_rate(self.gw_port, raw, plan.soak_rate, plan.soak_warmup_seconds)
            task = asyncio.create_task(probes.steady_rate(self.gw_port, raw, plan.soak_rate, plan.soak_seconds))
            while not task.done():
                samples.append(rss_mb(self.gw_pid))
                await asyncio.sleep(1)
            samples.append(rss_mb(self.gw_pid))
            return await task

        sent, failed = run_async(soak_and_sample())
        growth = samples[-1] - samples[0]
        self.summary["soak_growth"] = growth
        self.row(f"soak {plan.soak_seconds} s at {plan.soak_rate} rps ({plan.soak_window_seconds} s window): sent/failed", "", f"{sent}/{failed}", "", "0 failed", failed == 0)
        self.row("  gateway RSS growth (MB)", "", f"{samples[0]:.1f}->{samples[-1]:.1f}", f"{growth:+.2f}",
                 f"<= +{SOAK_GROWTH_TOLERANCE_MB}", growth <= SOAK_GROWTH_TOLERANCE_MB)

    def memory_rows(self, idle: float) -> None:
        peak = rss_mb(self.gw_pid, "VmHWM")
        self.summary["rss_idle"], self.summary["rss_peak"] = idle, peak
        self.row("gateway RSS idle (MB)", "", f"{idle:.1f}", "", f"< {TARGET_IDLE_RSS_MB}", idle < TARGET_IDLE_RSS_MB)
        self.row("gateway RSS peak (MB)", "", f"{peak:.1f}")
        self.row("gateway RSS at the end (MB)", "", f"{rss_mb(self.gw_pid):.1f}")

    def warm_up(self) -> None:
        for _, port in self.targets():
            probes.sequential_latencies(port, probes.request_bytes(port, KEY, CHAT), 200)
            run_async(probes.stream_workers(port, probes.request_bytes(port, KEY, CHAT_STREAM, {"x-mock-gap-ms": "1"}), 4, 2, 0))


def check_tools() -> None:
    if shutil.which("wrk") is None:
        raise SystemExit(
            "bench: wrk is not installed. On Debian/Ubuntu: `apt-get update && apt-get install -y wrk` "
            "(`make bench` does this), elsewhere see https://github.com/wg/wrk."
        )
    if shutil.which("taskset") is None:
        print("bench: taskset not found (util-linux): processes will not be pinned", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description="Benchmark the gateway against direct calls to a mock provider.")
    parser.add_argument("--quick", action="store_true", help="shorter runs: the whole thing in under a minute")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, interaction log)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed (else 0 once the run completes)")
    parser.add_argument(
        "--normal-priority",
        action="store_true",
        help="do not raise the bench processes to nice -20 (they are by default, when allowed, so "
        "that other processes on a shared machine do not preempt the gateway mid-request)",
    )
    args = parser.parse_args()
    check_tools()
    plan = QUICK if args.quick else Plan()
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("bench: needs 2 cores (gateway on one, load and mock on the other)")
    os.sched_setaffinity(0, {LOAD_CORE})  # this script's own clients run beside the mock
    priority = "normal (nice 0)"
    if not args.normal_priority:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, -20)  # inherited by the mock, the gateway and wrk
            priority = "nice -20 for every bench process, direct and gateway alike"
        except PermissionError:
            priority = "normal (nice -20 needs root)"
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="llm-gateway-bench-"))
    busy_before, before = busy_cpu_seconds(), time.monotonic()
    time.sleep(1.0)
    background = (busy_cpu_seconds() - busy_before) / (time.monotonic() - before) / (os.cpu_count() or 1)
    if background > 0.05:
        print(f"bench: warning: the machine is {background:.0%} busy before the run: other processes will add noise", file=sys.stderr)
    started, busy_start, own_start = time.monotonic(), busy_cpu_seconds(), own_cpu_seconds()
    try:
        bench = Bench(plan, procs, tmp)
        print(f"bench: {'quick' if args.quick else 'full'} run, {plan.reps} repetitions per figure, temp dir {tmp}", flush=True)
        bench.start_mock()
        bench.mock_ceiling()
        bench.start_gateway()
        time.sleep(0.5)
        idle = rss_mb(bench.gw_pid)
        uvloop_gw, uvloop_mock = uses_uvloop(bench.gw_pid), uses_uvloop(bench.mock.pid)  # type: ignore[union-attr]
        bench.warm_up()
        bench.latency()
        bench.streaming()
        bench.throughput()
        bench.many_streams()
        bench.soak()
        bench.memory_rows(idle)
        log_lines = sum(1 for _ in open(bench.interactions, "rb"))
        ours = own_cpu_seconds() - own_start + process_cpu_seconds(bench.gw_pid) + process_cpu_seconds(bench.mock.pid)  # type: ignore[union-attr]
        elapsed = time.monotonic() - started
        foreign = max(0.0, busy_cpu_seconds() - busy_start - ours) / elapsed / (os.cpu_count() or 1)
        noise = (f"priority: {priority}; other processes on the machine: {background:.0%} of its CPU "
                 f"before the run, {foreign:.0%} during it")
        report(bench, plan, args.quick, uvloop_gw, uvloop_mock, log_lines, elapsed, noise)
        return 1 if args.strict and not all(bench.passed.values()) else 0
    except KeyboardInterrupt:
        print("\nbench: interrupted", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def report(bench: Bench, plan: Plan, quick: bool, uvloop_gw: bool, uvloop_mock: bool, log_lines: int, elapsed: float, noise: str) -> None:
    s = bench.summary
    print()
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores ({platform.machine()}, Linux {platform.release()})")
    print(f"python {platform.python_version()}; uvloop: gateway {'yes' if uvloop_gw else 'no'}, mock {'yes' if uvloop_mock else 'no'}; "
          f"gateway on core {GATEWAY_CORE}, mock + load on core {LOAD_CORE}; quotas on, interaction log to a file ({log_lines:,} lines)")
    print(f"mock ceiling: {bench.ceiling:,.0f} rps (its own core, no delay); run: {'--quick' if quick else 'full'}, "
          f"median of {plan.reps} repetitions each, {elapsed:.0f} s")
    print(noise)
    print()
    headers = ("measure", "direct", "gateway", "added", "target", "")
    widths = [max(len(str(r[i])) for r in [headers, *bench.rows]) for i in range(6)]
    line = "  ".join(f"{{:<{widths[0]}}}" if i == 0 else f"{{:>{widths[i]}}}" for i in range(6))
    print(line.format(*headers))
    print("  ".join("-" * w for w in widths))
    for row in bench.rows:
        print(line.format(*row))
    print()
    failed = [name for name, ok in bench.passed.items() if not ok]
    print(f"targets: {len(bench.passed) - len(failed)}/{len(bench.passed)} met" + (f"; missed: {', '.join(failed)}" if failed else ""))
    print(f"bench: added p50 {s['added_p50']:.2f} ms, p99 {s['added_p99']:.2f} ms, {s['rps']:.0f} rps/core, "
          f"stream ttft {s['ttft_added']:+.2f} ms, rss {s['rss_idle']:.0f} MB")


if __name__ == "__main__":
    sys.exit(main())
