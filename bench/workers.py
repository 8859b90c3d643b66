"""Throughput with WORKERS=2 against WORKERS=1, quotas shared through Redis, on this machine.

Run from the repository root with the project's venv:
`.venv/bin/python bench/workers.py [--quick]`. Needs `wrk` and `redis-server` (Debian:
`apt-get install -y wrk redis-server`). Installs nothing itself.

It starts its own `redis-server` (no persistence, loopback, a free port), the mock provider
(`bench/mock_provider.py`, answering after 20 ms, as in `bench/run.py`'s throughput test)
and, one configuration at a time, the gateway with quotas on (one key, a limit it never
reaches) and the interaction log to a file:

- WORKERS=1 with the in-memory tracker (no REDIS_URL): the baseline;
- WORKERS=1 with REDIS_URL;
- WORKERS=2 with REDIS_URL (two forked workers on one port, SO_REUSEPORT);
- the floor (`bench/passthrough.py`, the bare aiohttp passthrough) as one process, and as
  two processes sharing the port (SO_REUSEPORT, as the workers do): how far two processes
  of a bare Python proxy scale on this machine, beside the same mock and wrk. That ratio
  is the ceiling the gateway's WORKERS=2 is read against.

Each gets a 1 s warm-up, then wrk with 256 connections for 10 s (3 s with --quick). The
configurations alternate (rotating which goes first), 3 repetitions each, and every figure
is the median of those repetitions. Redis is flushed before each measured run, so the
sorted sets do not grow from run to run, and after it the admissions Redis counted are
checked against the requests wrk saw (so a Redis that silently failed, and let requests
through under QUOTA_ON_REDIS_ERROR=allow, would show).

Nothing is pinned to a core: the machine's cores are shared by the gateway worker(s), the
mock, redis-server and wrk, so 2 workers cannot have 2 cores to themselves; the table
says where the CPU went. Every process it starts is stopped at the end, also on failure
and on Ctrl-C. The summary line:
`workers: 1 worker X rps (memory Y rps), 2 workers Z rps, ratio R` (R = Z / X), then the
floor's: `floor: 1 process X rps, 2 processes Z rps, ratio F`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import redis

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

import run  # noqa: E402  (bench/run.py: processes, wrk, /proc readings, medians)

from tests.support.redis_server import RedisServer  # noqa: E402

CONNECTIONS = 256
DELAY_MS = 20  # the mock's answer delay, as run.py's throughput test
WARM_UP_SECONDS = 1
TARGET_RATIO = 1.9  # issue 30: WORKERS=2 against one worker
WORKER_LINE = re.compile(rb"listening on \S+ \(worker (\d+)\)")


@dataclass(frozen=True)
class Config:
    label: str
    workers: int  # the gateway's WORKERS, or how many floor processes share the port
    redis: bool
    floor: bool = False


CONFIGS = (
    Config("1 worker, memory tracker", 1, False),
    Config("1 worker, Redis", 1, True),
    Config("2 workers, Redis", 2, True),
)
FLOORS = (
    Config("floor, 1 process", 1, False, floor=True),
    Config("floor, 2 processes", 2, False, floor=True),
)
EVERY = CONFIGS + FLOORS


@dataclass
class Result:
    rps: float
    p99_ms: float
    errors: float  # wrk's socket errors + non-2xx answers
    requests: float
    gateway_cores: float  # CPU over the run, in cores (all workers and the parent)
    worker_cores: list[float]
    redis_cores: float
    mock_cores: float
    wrk_cores: float
    busy_cores: float  # the whole machine
    cpu_us_per_request: float  # the gateway's
    admissions: int | None = None  # counted in Redis during the run
    redis_errors: float | None = None  # the gateway's llm_gateway_redis_errors_total


@dataclass
class Gateway:
    children: list[subprocess.Popen[bytes]]  # the gateway's parent, or each floor process
    port: int
    pids: list[int] = field(default_factory=list)  # the processes that serve (workers, or the one)


def said_started(log: Path) -> bool:
    """The floor process writing to `log` serves (its own line: the port may already answer
    from the process started before it)."""
    return b"passthrough on" in log.read_bytes()


def alive(pid: int) -> bool:
    """A live (not zombie) gateway process with this pid."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return False
    return state != "Z" and b"gateway.py" in command


class WorkersBench:
    def __init__(
        self, seconds: int, procs: run.Processes, tmp: Path, redis_server: RedisServer
    ) -> None:
        self.seconds, self.procs, self.tmp, self.redis_server = seconds, procs, tmp, redis_server
        # Only for its wrk(): chat.lua, the BENCHJSON summary, errors summed.
        self.loader = run.Bench(run.Plan(), procs, tmp, run.BEST_FOUNDATION)
        self.mock_port = run.free_port()
        self.worker_pids: set[int] = set()  # every worker forked, to be sure none outlives us
        self.keys_path = tmp / "keys.json"
        self.runs = 0
        self.mock: subprocess.Popen[bytes] | None = None

    def start_mock(self) -> None:
        log = self.tmp / "mock.log"
        argv = [sys.executable, str(BENCH / "mock_provider.py"), "--port", str(self.mock_port)]
        self.mock = self.procs.start(argv, None, log)
        run.wait_until(lambda: run.listening(self.mock_port), "the mock provider", self.mock, log)
        quota = {"requests": 100_000_000, "window_seconds": 3600}  # never reached
        keys = {
            "providers": {"openai": {"base_url": f"http://127.0.0.1:{self.mock_port}/v1"}},
            "virtual_keys": {
                run.KEY: {"provider": "openai", "api_key": "sk-bench", "quota": quota}
            },
        }
        self.keys_path.write_text(json.dumps(keys))

    def start_gateway(self, config: Config) -> Gateway:
        self.runs += 1
        tag = f"{self.runs}-{config.workers}{'r' if config.redis else 'm'}"
        port = run.free_port()
        log = self.tmp / f"gateway-{tag}.log"
        argv = [
            sys.executable,
            str(ROOT / "gateway.py"),
            "--server-host",
            "127.0.0.1",
            "--server-port",
            str(port),
            "--keys-file-path",
            str(self.keys_path),
            "--quota-enabled",
            "true",
            "--log-to-file",
            "true",
            "--log-file-path",
            str(self.tmp / f"interactions-{tag}.jsonl"),
            "--shutdown-grace-seconds",
            "2",
            "--workers",
            str(config.workers),
        ]
        if config.redis:
            argv += ["--redis-url", f"{self.redis_server.url}/0"]
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("REDIS_URL", "WORKERS", "PROMETHEUS_MULTIPROC_DIR")
        }
        if (
            config.workers > 1
        ):  # the metrics files in our temp dir, so they go with it even if a worker is killed
            env["PROMETHEUS_MULTIPROC_DIR"] = str(self.tmp / f"metrics-{tag}")
        child = self.procs.start(argv, None, log, env=env)
        gateway = Gateway([child], port)

        def up() -> bool:
            if config.workers > 1:
                gateway.pids = [int(pid) for pid in WORKER_LINE.findall(log.read_bytes())]
                self.worker_pids.update(gateway.pids)
                if len(gateway.pids) < config.workers:
                    return False
            return run.healthy(port)

        run.wait_until(up, f"the gateway ({config.label})", child, log)
        if config.workers == 1:
            gateway.pids = [child.pid]
        return gateway

    def start_floor(self, config: Config) -> Gateway:
        """`config.workers` floor processes on one port (SO_REUSEPORT), each on its own."""
        self.runs += 1
        port = run.free_port()
        upstream = f"http://127.0.0.1:{self.mock_port}"
        argv = [sys.executable, str(BENCH / "passthrough.py"), "--port", str(port)]
        argv += ["--upstream", upstream, "--reuse-port"]
        floor = Gateway([], port)
        for n in range(config.workers):
            log = self.tmp / f"floor-{self.runs}-{n}.log"
            child = self.procs.start(argv, None, log)
            floor.children.append(child)
            started = functools.partial(said_started, log)
            run.wait_until(started, "the floor", child, log)
        floor.pids = [child.pid for child in floor.children]
        return floor

    def stop_gateway(self, gateway: Gateway) -> None:
        for child in gateway.children:
            self.procs.stop(child)  # SIGTERM: a gateway's parent drains its workers
        self.reap_workers(gateway.pids)

    def reap_workers(self, pids: list[int] | set[int], grace: float = 5.0) -> None:
        """Workers live in their own process groups: make sure each one is gone."""
        deadline = time.monotonic() + grace
        for pid in pids:
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def admissions(self) -> int:
        client = redis.Redis.from_url(self.redis_server.url)
        try:
            return sum(
                int(client.zcard(key)) for key in client.scan_iter(match="llm-gateway:*:admissions")
            )
        finally:
            client.close()

    def flush_redis(self) -> None:
        client = redis.Redis.from_url(self.redis_server.url)
        try:
            client.flushall()
        finally:
            client.close()

    def measure(self, config: Config) -> Result:
        gateway = self.start_floor(config) if config.floor else self.start_gateway(config)
        try:
            self.loader.wrk(gateway.port, None, CONNECTIONS, WARM_UP_SECONDS, DELAY_MS)  # type: ignore[arg-type]
            if config.redis:
                self.flush_redis()
            assert self.mock is not None and self.redis_server.process is not None
            redis_pid, mock_pid = self.redis_server.process.pid, self.mock.pid
            gateway_pids = sorted(
                set(gateway.pids) | {child.pid for child in gateway.children}
            )  # workers and their parent
            watched = [*gateway_pids, redis_pid, mock_pid]
            before = {pid: run.process_cpu_seconds(pid) for pid in watched}
            busy_before, own_before, started = (
                run.busy_cpu_seconds(),
                run.own_cpu_seconds(),
                time.monotonic(),
            )
            data = self.loader.wrk(gateway.port, None, CONNECTIONS, self.seconds, DELAY_MS)  # type: ignore[arg-type]
            elapsed = time.monotonic() - started
            cores = {pid: (run.process_cpu_seconds(pid) - before[pid]) / elapsed for pid in watched}
            busy = (run.busy_cpu_seconds() - busy_before) / elapsed
            wrk = (
                run.own_cpu_seconds() - own_before
            ) / elapsed  # wrk was reaped in between: its CPU is ours
            gateway_cores = sum(cores[pid] for pid in gateway_pids)
            result = Result(
                rps=data["rps"],
                p99_ms=data["p99_us"] / 1000,
                errors=data["errors"] + data["status"],
                requests=data["requests"],
                gateway_cores=gateway_cores,
                worker_cores=[cores[pid] for pid in gateway.pids],
                redis_cores=cores[redis_pid],
                mock_cores=cores[mock_pid],
                wrk_cores=wrk,
                busy_cores=busy,
                cpu_us_per_request=gateway_cores * elapsed / max(1, data["requests"]) * 1e6,
            )
            if config.redis:
                result.admissions = self.admissions()
                result.redis_errors = redis_errors(gateway.port)
            return result
        finally:
            self.stop_gateway(gateway)


def redis_errors(port: int) -> float:
    """The sum of llm_gateway_redis_errors_total over its decisions (all workers)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("llm_gateway_redis_errors_total")
    )


def describe(config: Config, rep: int, r: Result) -> str:
    split = (
        "+".join(f"{c:.2f}" for c in r.worker_cores)
        if config.workers > 1
        else f"{r.gateway_cores:.2f}"
    )
    line = (
        f"  rep {rep} {config.label:<25} {r.rps:8,.0f} rps  p99 {r.p99_ms:6.1f} ms  errors {r.errors:.0f}  "
        f"cores: gateway {split}, redis {r.redis_cores:.2f}, mock {r.mock_cores:.2f}, wrk {r.wrk_cores:.2f}, "
        f"machine {r.busy_cores:.2f}"
    )
    if r.admissions is not None:
        line += f"; redis counted {r.admissions:,} admissions for {r.requests:,.0f} answers, {r.redis_errors:.0f} redis errors"
    return line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 s per run instead of 10")
    parser.add_argument(
        "--reps", type=int, default=3, help="repetitions of each configuration (default 3)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temp dir (logs, interaction logs)"
    )
    parser.add_argument(
        "--normal-priority",
        action="store_true",
        help="do not raise the bench processes to nice -20",
    )
    args = parser.parse_args()
    run.check_tools()
    if shutil.which("redis-server") is None:
        raise SystemExit(
            "bench: redis-server is not installed. On Debian/Ubuntu: `apt-get install -y redis-server`."
        )
    seconds = 3 if args.quick else 10
    ncpu = os.cpu_count() or 1
    priority = "normal (nice 0)"
    if not args.normal_priority:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, -20)  # inherited by everything started below
            priority = "nice -20 for every bench process"
        except PermissionError:
            priority = "normal (nice -20 needs root)"
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, run._raise_interrupt)

    procs = run.Processes()
    tmp = Path(tempfile.mkdtemp(prefix="llm-gateway-bench-workers-"))
    redis_server = RedisServer(tmp)
    bench: WorkersBench | None = None
    try:
        busy_before, before = run.busy_cpu_seconds(), time.monotonic()
        time.sleep(1.0)
        background = (run.busy_cpu_seconds() - busy_before) / (time.monotonic() - before)
        print(
            f"bench workers: {'quick' if args.quick else 'full'} run, {args.reps} repetitions x {len(EVERY)} "
            f"configurations, wrk c={CONNECTIONS} for {seconds} s each (after {WARM_UP_SECONDS} s warm-up), "
            f"mock delay {DELAY_MS} ms; temp dir {tmp}",
            flush=True,
        )
        redis_server.start()
        bench = WorkersBench(seconds, procs, tmp, redis_server)
        bench.start_mock()
        results: dict[Config, list[Result]] = {config: [] for config in EVERY}
        started = time.monotonic()
        for rep in range(args.reps):
            order = EVERY[rep % len(EVERY) :] + EVERY[: rep % len(EVERY)]
            for config in order:
                result = bench.measure(config)
                results[config].append(result)
                print(describe(config, rep + 1, result), flush=True)
        report(
            results, ncpu, priority, background, args.quick, args.reps, time.monotonic() - started
        )
        return 0
    except KeyboardInterrupt:
        print("\nbench: interrupted", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        if bench is not None:
            bench.reap_workers(bench.worker_pids)
        if redis_server.process is not None:
            redis_server.kill()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def report(
    results: dict[Config, list[Result]],
    ncpu: int,
    priority: str,
    background: float,
    quick: bool,
    reps: int,
    elapsed: float,
) -> None:
    med = run.med
    print()
    print(
        f"machine: {run.cpu_model()}, {ncpu} cores; {priority}; the rest of the machine used "
        f"{background:.2f} cores before the run; {'--quick' if quick else 'full'} run, median of {reps} each, {elapsed:.0f} s"
    )
    print(
        f"no CPU pinning: the {ncpu} cores are shared by the gateway worker(s), the mock provider, redis-server and wrk,"
    )
    print(
        "so 2 workers never get 2 cores to themselves; the 'cores' columns say where the CPU went (medians)."
    )
    print()
    headers = (
        "configuration",
        "rps",
        "p99 ms",
        "errors",
        "CPU/req us",
        "served by",
        "redis",
        "mock",
        "wrk",
        "machine",
    )
    rows = []
    for config, rs in results.items():
        rows.append(
            (
                config.label,
                f"{med([r.rps for r in rs]):,.0f}",
                f"{med([r.p99_ms for r in rs]):.1f}",
                f"{med([r.errors for r in rs]):.0f}",
                f"{med([r.cpu_us_per_request for r in rs]):.0f}",
                f"{med([r.gateway_cores for r in rs]):.2f}",
                f"{med([r.redis_cores for r in rs]):.2f}" if config.redis else "-",
                f"{med([r.mock_cores for r in rs]):.2f}",
                f"{med([r.wrk_cores for r in rs]):.2f}",
                f"{med([r.busy_cores for r in rs]):.2f}/{ncpu}",
            )
        )
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    line = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    print(line.format(*headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line.format(*row))
    print()
    total_errors = sum(r.errors for rs in results.values() for r in rs)
    redis_failed = sum(r.redis_errors or 0 for rs in results.values() for r in rs)
    uncounted = sum(
        1
        for rs in results.values()
        for r in rs
        if r.admissions is not None and r.admissions < r.requests
    )
    print(
        f"errors over every run: {total_errors:.0f}; redis errors: {redis_failed:.0f}; "
        f"runs where Redis counted fewer admissions than answers: {uncounted}"
    )
    memory, one, two = (med([r.rps for r in results[c]]) for c in CONFIGS)
    print(
        f"workers: 1 worker {one:.0f} rps (memory {memory:.0f} rps), 2 workers {two:.0f} rps, ratio {two / one:.2f}"
    )
    floor_one, floor_two = (med([r.rps for r in results[c]]) for c in FLOORS)
    print(
        f"floor: 1 process {floor_one:.0f} rps, 2 processes {floor_two:.0f} rps, "
        f"ratio {floor_two / floor_one:.2f}"
    )
    # What this machine can show: the gateway's cores are what the mock, Redis and wrk leave.
    cores = {c: med([r.gateway_cores for r in results[c]]) for c in CONFIGS}
    others = med([r.busy_cores - r.gateway_cores for r in results[CONFIGS[2]]])
    per_core = {c: med([r.rps for r in results[c]]) / cores[c] for c in CONFIGS if cores[c]}
    efficiency = per_core[CONFIGS[2]] / per_core[CONFIGS[1]]
    print(
        f"  {'HOLDS ' if two / one >= TARGET_RATIO else 'MISSES'}  WORKERS=2 against 1 (Redis): "
        f"{two / one:.2f}x (target >= {TARGET_RATIO}x). The gateway used {cores[CONFIGS[1]]:.2f} "
        f"cores with 1 worker, {cores[CONFIGS[2]]:.2f} with 2, while the mock, Redis, wrk and "
        f"the rest of the machine used {others:.2f} of its {ncpu}: no more than "
        f"{max(0.0, ncpu - others) / max(cores[CONFIGS[1]], 1e-9):.2f}x one worker's cores was "
        f"there to take. Per gateway core, 2 workers pass {efficiency:.2f}x what 1 does "
        f"({per_core[CONFIGS[2]]:,.0f} against {per_core[CONFIGS[1]]:,.0f} rps a core): on 2 "
        f"cores of their own they would reach about {2 * efficiency:.2f}x."
    )
    print(
        f"  The floor measured here: two processes of the bare passthrough on one port pass "
        f"{floor_two / floor_one:.2f}x one, beside the same mock and wrk; the gateway's "
        f"{two / one:.2f}x is {two / one / (floor_two / floor_one):.2f} of that ratio. Where the "
        f"floor's own ratio is under {TARGET_RATIO}x, so is any Python server's on this machine."
    )
    print(
        f"  Redis against memory, 1 worker, unpinned: {one / memory:.2f}x the throughput "
        f"(bench/scale.py --only redis pins it: the gateway on a core of its own)"
    )


if __name__ == "__main__":
    sys.exit(main())
