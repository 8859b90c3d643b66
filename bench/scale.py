"""Costs that stay flat as the work grows (issue 30, point 3), each figure beside its target.

Run from the repository root: `.venv/bin/python bench/scale.py [--quick] [--only keys,redis]`
(`make bench` runs it; 1,000 open streams' CPU per chunk is `bench/run.py`'s, `WORKERS=2`
is `bench/workers.py`'s). Needs `wrk`, and `redis-server` for the Redis part.

One mock provider (answering after 20 ms under load) on core 1 with the load generators;
every gateway (quotas in memory and the log to a file, as in run.py) on core 0, one under
load at a time. The contenders take turns in an order reversed every round; each figure is
the median over rounds. Parts (`--only`, comma-separated):

- keys: a gateway whose keys.json holds 10 keys against one holding 10,000 (each with a
  name and a quota): time from the process's start to its first `/health` answer and RSS
  then (each started `--starts` times, alternating), and the CPU per request under load of
  the same key (wrk, 256 connections) on each;
- choice: on the 10-key gateway, a key with 100 routes (the request matches the last)
  and a key with a pool of 20 real keys, against the plain key: CPU per request, and the
  difference as the cost of choosing;
- reload: the 10,000-key gateway under a steady load of 32 connections (each request
  timed), reloaded by SIGHUP `--reloads` times: how long each reload took (SIGHUP to its
  "keys reloaded" line) and the slowest request that overlapped a reload, against the
  slowest that did not;
- redis: the 10-key gateway against the same with `REDIS_URL` (a redis-server of its own on
  core 1, or `--redis-url`): admission and settle added at concurrency 1 (p50), and
  throughput and CPU per request under load. `--checkout DIR` runs gateway.py from another
  checkout, so a change to the Redis client can be raced before and after
  (`--only redis --checkout ../before`, then again without).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

import harness  # noqa: E402
import probes  # noqa: E402
from harness import (  # noqa: E402
    Processes,
    free_port,
    healthy,
    listening,
    med,
    pct,
    process_cpu_seconds,
    rss_mb,
    run_async,
    wait_until,
)
from run import load_average  # noqa: E402

GATEWAY_CORE, LOAD_CORE = 0, 1
KEY = "vk_bench_0123456789"
ROUTES_KEY = "vk_routes_0123456789"
POOL_KEY = "vk_pool_0123456789"
ROUTES, POOL = 100, 20
PARTS = ("keys", "choice", "reload", "redis")

TARGET_KEYS_RATIO = 1.05  # CPU per request, 10,000 keys against 10: within noise
TARGET_RELOAD_SLOWEST_MS = 50.0
TARGET_REDIS_ADDED_MS = 0.3
TARGET_REDIS_RPS_RATIO = 0.9


@dataclass(frozen=True)
class Plan:
    rounds: int = 3
    seconds: int = 5  # of wrk per contender a round
    starts: int = 3
    sequential: int = 2000  # requests a round at concurrency 1
    reloads: int = 3
    reload_connections: int = 32
    many_keys: int = 10_000
    warm_up: int = 1  # seconds of wrk before the rounds (0: none)
    settle_s: float = 1.0  # of load before the first reload and after each


QUICK = Plan(rounds=2, seconds=2, starts=1, sequential=300, reloads=2, many_keys=2_000)
# Tiny: that it runs end to end (tests/process/test_bench.py).
SMOKE = Plan(
    rounds=1, seconds=1, starts=1, sequential=20, reloads=1, reload_connections=4,
    many_keys=200, warm_up=0, settle_s=0.2,
)  # fmt: skip


def keys_document(upstream: str, count: int) -> dict[str, object]:
    """`count` keys: the bench key, a key with 100 routes, a key with a pool of 20, the rest
    named keys with quotas of their own."""
    quota = {"requests": 100_000_000, "window_seconds": 3600}
    plain = {"provider": "openai", "api_key": "sk-bench", "quota": quota}
    routes = [
        {"models": [f"other-model-{n}-*"], "provider": "openai", "api_key": f"sk-route-{n}"}
        for n in range(ROUTES - 1)
    ]
    routes.append({"models": ["gpt-bench*"], "provider": "openai", "api_key": "sk-route-last"})
    keys: dict[str, object] = {
        KEY: plain,
        ROUTES_KEY: {**plain, "name": "routes", "routes": routes},
        POOL_KEY: {
            "provider": "openai",
            "api_keys": [{"api_key": f"sk-pool-{n}"} for n in range(POOL)],
            "name": "pool",
            "quota": quota,
        },
    }
    for n in range(count - len(keys)):
        keys[f"vk_scale_{n:08d}_0123456789"] = {
            **plain,
            "name": f"user-{n}",
            "quota": {"requests": 1000 + n % 7, "window_seconds": 60},
        }
    return {"providers": {"openai": {"base_url": f"{upstream}/v1"}}, "virtual_keys": keys}


@dataclass
class Gateway:
    name: str
    port: int
    child: subprocess.Popen[bytes]
    log: Path
    start_s: float  # from the process's start to its first /health answer
    rss_start_mb: float


class Scale:
    def __init__(self, plan: Plan, procs: Processes, tmp: Path, checkout: Path) -> None:
        self.plan, self.procs, self.tmp, self.checkout = plan, procs, tmp, checkout
        self.mock_port = free_port()
        self.upstream = f"http://127.0.0.1:{self.mock_port}"
        self.lines: list[str] = []  # the summary, printed at the end
        self.started = 0
        self.load_s = 1.0  # how long the reloads' load ran

    def say(self, line: str) -> None:
        print(line, flush=True)

    def verdict(self, what: str, measured: str, target: str, holds: bool | None) -> None:
        mark = "      " if holds is None else ("HOLDS " if holds else "MISSES")
        self.lines.append(
            f"  {mark}  {what}: {measured}" + (f"  (target {target})" if target else "")
        )

    def start_mock(self) -> None:
        log = self.tmp / "mock.log"
        argv = [sys.executable, str(BENCH / "mock_provider.py"), "--port", str(self.mock_port)]
        mock = self.procs.start(argv, LOAD_CORE, log)
        wait_until(lambda: listening(self.mock_port), "the mock provider", mock, log)

    def keys_file(self, count: int) -> Path:
        path = self.tmp / f"keys-{count}.json"
        if not path.exists():
            path.write_text(json.dumps(keys_document(self.upstream, count)))
        return path

    def gateway(self, name: str, keys: Path, *flags: str) -> Gateway:
        self.started += 1
        port, log = free_port(), self.tmp / f"gateway-{self.started}.log"
        argv = [
            sys.executable, str(self.checkout / "gateway.py"), "--server-host", "127.0.0.1",
            "--server-port", str(port), "--keys-file-path", str(keys),
            "--quota-enabled", "true", "--log-to-file", "true",
            "--log-file-path", str(self.tmp / f"interactions-{self.started}.jsonl"),
            "--shutdown-grace-seconds", "1", "--workers", "1", *flags,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "WORKERS")}
        env["PYTHONPATH"] = str(self.checkout)
        started = time.monotonic()
        child = self.procs.start(argv, GATEWAY_CORE, log, env=env)
        deadline = started + 60
        while True:
            if child.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"bench: gateway {name} did not start:\n{log.read_text()[-2000:]}")
            try:
                if healthy(port):
                    break
            except OSError:
                pass
            time.sleep(0.01)
        return Gateway(name, port, child, log, time.monotonic() - started, rss_mb(child.pid))

    def wrk(self, gateway: Gateway, key: str, seconds: int) -> tuple[float, float, float]:
        """(rps, CPU us per request, timeouts) of wrk -c256 against the mock answering in 20 ms."""
        pid = gateway.child.pid
        before = process_cpu_seconds(pid)
        result = harness.wrk(
            self.procs, self.tmp / "wrk.out", key, gateway.port, LOAD_CORE, 256, seconds, 20, 2
        )
        cpu = (process_cpu_seconds(pid) - before) / max(1, result["requests"]) * 1e6
        if result["status"] or result["errors"] - result["timeout"]:
            raise SystemExit(f"bench: {gateway.name} with {key[:9]}…: errors {result}")
        return result["rps"], cpu, result["timeout"]

    def race(
        self, contenders: list[tuple[str, Gateway, str]]
    ) -> dict[str, list[tuple[float, float, float]]]:
        """wrk on each (label, gateway, key) in turn, order reversed every round."""
        for _, gateway, key in contenders if self.plan.warm_up else ():  # pools grown, code warm
            self.wrk(gateway, key, self.plan.warm_up)
        runs: dict[str, list[tuple[float, float, float]]] = {label: [] for label, *_ in contenders}
        for turn in range(self.plan.rounds):
            for label, gateway, key in contenders if turn % 2 == 0 else contenders[::-1]:
                rps, cpu, timeouts = self.wrk(gateway, key, self.plan.seconds)
                runs[label].append((rps, cpu, timeouts))
                self.say(f"  round {turn + 1} {label:>24}: {rps:7,.0f} rps {cpu:6.0f} us/request")
        return runs

    # keys and choice

    def keys_and_choice(self, parts: set[str]) -> tuple[Gateway, Gateway | None]:
        """The 10-key gateway (kept for the other parts) and, for 'keys', the many-key one."""
        plan, few_keys, many_keys = self.plan, self.keys_file(10), None
        few = many = None
        starts: dict[str, list[tuple[float, float]]] = {"10": [], "many": []}
        for turn in range(plan.starts if "keys" in parts else 1):
            order = ["10", "many"] if "keys" in parts else ["10"]
            for which in order if turn % 2 == 0 else order[::-1]:
                for old in (few, many):
                    if old is not None and old.name == which:
                        self.procs.stop(old.child)
                if which == "10":
                    few = self.gateway("10", few_keys)
                    starts["10"].append((few.start_s, few.rss_start_mb))
                else:
                    many_keys = many_keys or self.keys_file(plan.many_keys)
                    many = self.gateway("many", many_keys)
                    starts["many"].append((many.start_s, many.rss_start_mb))
        assert few is not None
        contenders = [("10 keys", few, KEY)]
        if "keys" in parts:
            assert many is not None
            contenders.append((f"{plan.many_keys:,} keys", many, KEY))
        if "choice" in parts:
            contenders += [
                (f"{ROUTES} routes", few, ROUTES_KEY),
                (f"pool of {POOL}", few, POOL_KEY),
            ]
        self.say(f"scale: keys and choice, {plan.rounds} rounds of {plan.seconds} s, wrk -c256")
        runs = self.race(contenders)
        cpu = {label: med([r[1] for r in rounds]) for label, rounds in runs.items()}
        rps = {label: med([r[0] for r in rounds]) for label, rounds in runs.items()}
        base = cpu["10 keys"]
        spread = max(r[1] for r in runs["10 keys"]) / min(r[1] for r in runs["10 keys"])
        if "keys" in parts:
            label = f"{plan.many_keys:,} keys"
            for which, name in (("10", "10 keys"), ("many", label)):
                start = med([s for s, _ in starts[which]])
                rss = med([r for _, r in starts[which]])
                self.verdict(f"{name}: start to first /health answer, RSS then",
                             f"{start:.2f} s, {rss:.1f} MB", "", None)  # fmt: skip
            ratio = cpu[label] / base
            self.verdict(
                f"{label}: CPU per request against 10 keys",
                f"{ratio:.2f}x ({cpu[label]:.0f} against {base:.0f} us; {rps[label]:,.0f} against "
                f"{rps['10 keys']:,.0f} rps; the 10-key rounds spread {spread:.2f}x)",
                f"<= {max(TARGET_KEYS_RATIO, spread):.2f}x (noise)",
                ratio <= max(TARGET_KEYS_RATIO, spread),
            )
        if "choice" in parts:
            for label in (f"{ROUTES} routes", f"pool of {POOL}"):
                self.verdict(
                    f"choice, {label} (the last route matches)" if "routes" in label else
                    f"choice, a {label}",
                    f"{cpu[label] - base:+.0f} us CPU per request ({cpu[label]:.0f} against "
                    f"{base:.0f} us for a plain key)",
                    "", None,
                )  # fmt: skip
        if many is not None and "reload" not in parts:
            self.procs.stop(many.child)
            many = None
        return few, many

    # reload

    def reload(self, gateway: Gateway | None) -> None:
        plan = self.plan
        if gateway is None:
            gateway = self.gateway("many", self.keys_file(plan.many_keys))
        self.say(f"scale: {plan.reloads} reloads of {plan.many_keys:,} keys under load")
        raw = probes.request_bytes(gateway.port, KEY, probes.CHAT, {"x-mock-delay-ms": "20"})
        timed, windows = run_async(self.reloads_under_load(gateway, raw))
        if not windows:
            raise SystemExit("bench: no reload finished")

        def overlaps(start: float, end: float) -> bool:
            return any(s < end and start < e for s, e in windows)

        slowest_each = [
            max((ms for start, end, ms in timed if s < end and start < e), default=float("nan"))
            for s, e in windows
        ]
        outside = [ms for start, end, ms in timed if not overlaps(start, end)]
        slowest = max(slowest_each)
        took = [(e - s) * 1000 for s, e in windows]
        self.verdict(
            f"reload of {plan.many_keys:,} keys under load ({len(timed) / self.load_s:,.0f} rps, "
            f"mock answering in 20 ms)",
            f"slowest request during a reload {slowest:.1f} ms (each reload's slowest "
            + "/".join(f"{t:.0f}" for t in slowest_each)
            + f"; outside reloads p50 {pct(outside, 50):.1f}, p99 {pct(outside, 99):.1f}, max "
            f"{max(outside, default=float('nan')):.1f} ms); each reload took "
            + "/".join(f"{t:.0f}" for t in took) + " ms",
            f"<= {TARGET_RELOAD_SLOWEST_MS:.0f} ms",
            slowest <= TARGET_RELOAD_SLOWEST_MS,
        )  # fmt: skip

    async def reloads_under_load(
        self, gateway: Gateway, raw: bytes
    ) -> tuple[list[tuple[float, float, float]], list[tuple[float, float]]]:
        """Requests (start, end, ms) under a steady load, and each reload's (SIGHUP, done)."""
        timed: list[tuple[float, float, float]] = []
        windows: list[tuple[float, float]] = []
        stop = asyncio.Event()

        async def client() -> None:
            conn = await probes.Conn.open(gateway.port)
            try:
                while not stop.is_set():
                    start = time.monotonic()
                    reply = await conn.send(raw)
                    end = time.monotonic()
                    if reply.error or reply.status != 200:
                        raise SystemExit(f"bench: a request failed during the reloads: {reply}")
                    timed.append((start, end, (end - start) * 1000))
            finally:
                conn.close()

        def reloads_done() -> int:
            return gateway.log.read_text().count("keys reloaded")

        started = time.monotonic()
        clients = [asyncio.create_task(client()) for _ in range(self.plan.reload_connections)]
        await asyncio.sleep(self.plan.settle_s)
        for _ in range(self.plan.reloads):
            seen = reloads_done()
            sent = time.monotonic()
            os.kill(gateway.child.pid, signal.SIGHUP)
            while reloads_done() == seen and time.monotonic() - sent < 30:
                await asyncio.sleep(0.002)
            windows.append((sent, time.monotonic()))
            await asyncio.sleep(self.plan.settle_s)
        stop.set()
        await asyncio.gather(*clients)
        self.load_s = time.monotonic() - started
        return timed, windows

    # redis

    def redis(self, few: Gateway | None, url: str) -> None:
        plan = self.plan
        few = few or self.gateway("10", self.keys_file(10))
        on_redis = self.gateway("redis", self.keys_file(10), "--redis-url", url)
        self.say(f"scale: Redis against memory, {plan.rounds} rounds")
        sides = [("memory", few), ("Redis", on_redis)]
        p50: dict[str, list[float]] = {"memory": [], "Redis": []}
        cpu1: dict[str, list[float]] = {"memory": [], "Redis": []}
        for _, gateway in sides:  # warm up
            probes.sequential_latencies(
                gateway.port, probes.request_bytes(gateway.port, KEY, probes.CHAT), 200
            )
        for turn in range(plan.rounds):
            for name, gateway in sides if turn % 2 == 0 else sides[::-1]:
                raw = probes.request_bytes(gateway.port, KEY, probes.CHAT)
                before = process_cpu_seconds(gateway.child.pid)
                latencies, bad = probes.sequential_latencies(gateway.port, raw, plan.sequential)
                cpu1[name].append(
                    (process_cpu_seconds(gateway.child.pid) - before) / plan.sequential * 1e6
                )
                if bad:
                    raise SystemExit(f"bench: {bad} non-2xx answers from the {name} gateway")
                p50[name].append(pct(latencies, 50))
                self.say(f"  round {turn + 1} {name:>8} c=1: p50 {p50[name][-1]:.3f} ms")
        added = med([r - m for r, m in zip(p50["Redis"], p50["memory"], strict=True)])
        self.verdict(
            "Redis admission + settle at concurrency 1, p50 over memory",
            f"{added:+.3f} ms ({med(p50['Redis']):.3f} against {med(p50['memory']):.3f} ms; CPU per "
            f"request {med(cpu1['Redis']):.0f} against {med(cpu1['memory']):.0f} us)",
            f"<= +{TARGET_REDIS_ADDED_MS} ms",
            added <= TARGET_REDIS_ADDED_MS,
        )  # fmt: skip
        runs = self.race([("memory", few, KEY), ("Redis", on_redis, KEY)])
        rps = {name: med([r[0] for r in rounds]) for name, rounds in runs.items()}
        cpu = {name: med([r[1] for r in rounds]) for name, rounds in runs.items()}
        # Each round's pair (run one after the other) as a ratio, then their median; and the
        # CPU-bound ratio (memory's CPU per request over Redis's), which a shared machine
        # moves far less than the rates (another process's load takes from both alike).
        pairs = list(zip(runs["Redis"], runs["memory"], strict=True))
        ratio = med([redis[0] / memory[0] for redis, memory in pairs])
        by_cpu = med([memory[1] / redis[1] for redis, memory in pairs])
        self.verdict(
            "Redis under load (wrk -c256), throughput against memory",
            f"{ratio:.2f}x ({rps['Redis']:,.0f} against {rps['memory']:,.0f} rps; CPU per request "
            f"{cpu['Redis']:.0f} against {cpu['memory']:.0f} us, +{cpu['Redis'] - cpu['memory']:.0f}: "
            f"{by_cpu:.2f}x by CPU)",
            f">= {TARGET_REDIS_RPS_RATIO}x",
            ratio >= TARGET_REDIS_RPS_RATIO,
        )  # fmt: skip
        self.procs.stop(on_redis.child)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 s, 2,000 keys")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--only", default=",".join(PARTS), help=f"of {', '.join(PARTS)}")
    parser.add_argument("--checkout", default=str(ROOT), help="whose gateway.py to run")
    parser.add_argument("--redis-url", help="a Redis to use (default: a redis-server of its own)")
    parser.add_argument("--rounds", type=int, help="rounds per figure (default 3; --quick 2)")
    parser.add_argument("--reloads", type=int, help="reloads under load (default 3)")
    parser.add_argument("--keys", type=int, help="the many keys (default 10,000; --quick 2,000)")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    if unknown := parts - set(PARTS):
        raise SystemExit(
            f"bench: unknown parts {', '.join(sorted(unknown))} (of {', '.join(PARTS)})"
        )
    plan = SMOKE if args.smoke else QUICK if args.quick else Plan()
    if args.rounds:
        plan = Plan(**{**plan.__dict__, "rounds": args.rounds})
    if args.reloads:
        plan = Plan(**{**plan.__dict__, "reloads": args.reloads})
    if args.keys:
        plan = Plan(**{**plan.__dict__, "many_keys": args.keys})
    if shutil.which("wrk") is None:
        raise SystemExit("bench: wrk is not installed (apt-get install -y wrk)")
    os.sched_setaffinity(0, {LOAD_CORE})
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, harness.raise_interrupt)
    procs = Processes()
    load = load_average()
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llm-gateway-scale-") as directory:
        tmp = Path(directory)
        scale = Scale(plan, procs, tmp, Path(args.checkout).resolve())
        redis_server = None
        try:
            scale.start_mock()
            few = many = None
            if parts & {"keys", "choice"}:
                few, many = scale.keys_and_choice(parts)
            if "reload" in parts:
                scale.reload(many)
            if "redis" in parts and args.redis_url is None and not shutil.which("redis-server"):
                scale.verdict("Redis", "skipped: redis-server is not installed", "", None)
            elif "redis" in parts:
                url = args.redis_url
                if url is None:
                    from tests.support.redis_server import RedisServer

                    redis_server = RedisServer(tmp)
                    redis_server.start()
                    assert redis_server.process is not None
                    os.sched_setaffinity(redis_server.process.pid, {LOAD_CORE})
                    url = f"{redis_server.url}/0"
                scale.redis(few, url)
        except KeyboardInterrupt:
            print("\nbench: interrupted", file=sys.stderr)
            return 130
        finally:
            procs.stop_all()
            if redis_server is not None:
                redis_server.kill()
    print()
    print(
        f"scale (issue 30, point 3): {'smoke' if args.smoke else 'quick' if args.quick else 'full'} run, median of "
        f"{plan.rounds} interleaved rounds, {time.monotonic() - began:.0f} s; gateway "
        f"{Path(args.checkout).resolve()} on core {GATEWAY_CORE}, mock, load and Redis on core "
        f"{LOAD_CORE}; load average {load} before, {load_average()} after"
    )
    for line in scale.lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
