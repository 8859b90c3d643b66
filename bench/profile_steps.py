"""Where the gateway's CPU goes, per request, beside the floor's: py-spy on the real processes under load.

Run from the repository root with the project's venv (`make bench-profile`, or
`.venv/bin/python bench/profile_steps.py [--quick] [--seconds N]`). Needs `wrk` and py-spy
(pinned in requirements-dev.txt; it reads the target's memory, so it needs root or
ptrace rights).

It starts the mock provider, the floor (`bench/passthrough.py`) and the gateway as
`bench/run.py` does (floor and gateway pinned to core 0; the mock, wrk and py-spy to core 1),
then, alternating floor and gateway for several rounds, drives each with wrk (256
connections, the mock answering after 20 ms: the CPU-bound case of the throughput test)
while py-spy samples it (`--nonblocking`: the target is never paused; idle samples, the
loop waiting in epoll, are left out). CPU per request is the process's own CPU time (from
/proc) over the requests wrk completed in the same window.

Each sample is put under one step by its innermost frame in the gateway's own code (the
module says which step: keys.py is authentication, peek.py the body read and peek, ...);
a sample whose innermost own frame is relay.py (or the floor's handler) goes by what it
called into: aiohttp's client (send the request, wait for headers), the upstream body
read, or the response's prepare and write. Samples with no frame of ours are aiohttp's
server and the event loop: HTTP parsing, the transport, task scheduling. A step's cost per
request is its share of its thread's samples times that thread's CPU per request (the
event loop's thread and the others, such as the logbook's writer, are counted apart from
/proc, since py-spy may count a thread waiting for the GIL as busy). Then the top frames by
self time, for each process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import probes  # noqa: E402
import run  # noqa: E402  (the contenders, wrk)
from harness import Processes, med, process_cpu_seconds, raise_interrupt, run_async  # noqa: E402

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?):\d+\)$")
# The gateway's own modules, by the step of a request they do (module, or module:function).
STEPS = {
    "keys.py": "authentication",
    "lockout.py": "authentication",
    "credentials.py": "authentication",
    "peek.py": "body read and peek",
    "routing.py": "body read and peek",
    "expect.py": "body read and peek",
    "named.py": "body read and peek",
    "encodings.py": "body read and peek",
    "outbound.py": "header building",
    "targets.py": "failover: targets, breakers",
    "breaker.py": "failover: targets, breakers",
    "tracing.py": "tracing",
    "openai_chat.py": "usage tap",
    "responses.py": "usage tap",
    "anthropic.py": "usage tap",
    "reading.py": "usage tap",
    "sse_lines.py": "usage tap",
    "provider_usage.py": "usage tap",
    "estimate.py": "usage tap",
    "cors.py": "app hooks (CORS, Server header, own endpoints)",
    "dispatch.py": "app hooks (CORS, Server header, own endpoints)",
    "quota.py:stamp": "header building",
    "quota.py:ratelimit_headers": "header building",
    "quota.py:duration": "header building",
    "quota.py": "admission and charge",
    "tracker.py": "admission and charge",
    "memory_tracker.py": "admission and charge",
    "window.py": "admission and charge",
    "refusals.py": "admission and charge",
    "ratelimit.py": "header building",
    "redis_tracker.py": "admission and charge",
    "providers.py": "header building",
    "usage.py": "usage tap",
    "pricing.py": "usage tap",
    "metrics.py": "metrics",
    "logbook.py": "log record",
    "record.py:own_request_id": "request id",
    "record.py:begin": "request id",
    "record.py": "record bookkeeping",
    "health.py": "health",
    "errors.py": "errors",
    "app.py": "app hooks (CORS, Server header, own endpoints)",
    "server.py": "connections (accept, the connection limit)",
    "wire.py": "send the request, read the answer (the wire, proxy/upstream/wire.py)",
    "exchange.py": "exchange: admit, settle, the ending",
    "logfile.py": "log record",
}
OWN_FILES = ("proxy/", "passthrough.py", "foundations.py", "duties.py")
# Under every sample of the loop's thread: the frames that start the process and run the loop.
ENTRY = {
    ("gateway.py", "*"),
    ("workers.py", "*"),
    ("server.py", "serve"),
    ("server.py", "_serve"),
    ("passthrough.py", "<module>"),
    ("foundations.py", "<module>"),
    ("foundations.py", "main"),
    ("foundations.py", "serve"),
    ("duties.py", "<module>"),
    ("duties.py", "main"),
    ("duties.py", "serve"),
}
# They call the upstream client (the gateway's wire, or aiohttp's in the floor).
HANDLERS = (
    "proxy/relay/relay.py",
    "proxy/upstream/failover.py",
    "passthrough.py",
    "foundations.py",
    "duties.py",
)


def own(func: str, file: str) -> bool:
    name = file.rsplit("/", 1)[-1]
    is_entry = (name, "*") in ENTRY or (name, func.rsplit(".", 1)[-1]) in ENTRY
    return (any(part in file for part in OWN_FILES) or name == "gateway.py") and not is_entry


def frames(stack: str) -> list[tuple[str, str]]:
    """(function, file) for each frame of a py-spy raw line, outermost first."""
    out = []
    for frame in stack.split(";"):
        match = FRAME.match(frame)
        out.append((match["func"], match["file"]) if match else (frame, ""))
    return out


CLIENT_FILES = (
    "aiohttp/client.py",
    "aiohttp/connector.py",
    "aiohttp/client_reqrep.py",
    "aiohttp/client_proto.py",
    "aiohappyeyeballs/",
)
RESPONSE_FILES = ("aiohttp/web_response.py", "aiohttp/http_writer.py")
SERVER_FILES = (
    "aiohttp/web_protocol.py",
    "aiohttp/web_app.py",
    "aiohttp/web_urldispatcher.py",
    "aiohttp/web_request.py",
    "aiohttp/http_parser.py",
    "aiohttp/streams.py",
)
CLIENT = "send the request, await headers (aiohttp client)"
RESPONSE = "response prepare and write (aiohttp)"
SERVER = "parse, route, dispatch (aiohttp server)"
LOOP = "event loop: callbacks, timers, task steps (uvloop, C)"


def outside_step(stack: list[tuple[str, str]]) -> str:
    """A sample with no frame of ours: which part of aiohttp (or the loop) it is in."""
    files = [file for _, file in stack]
    if any(part in file for file in files for part in CLIENT_FILES):
        return CLIENT
    if any(func.endswith("finish_response") for func, _ in stack) or any(
        part in file for file in files for part in RESPONSE_FILES
    ):
        return RESPONSE
    if any(part in file for file in files for part in SERVER_FILES):
        return SERVER
    return LOOP


def callee_step(stack: list[tuple[str, str]], handler: str) -> str:
    """A sample whose innermost frame of ours is the handler: by what the handler called into."""
    inner = stack[1:]
    if not inner:
        return f"{handler}: its own code"
    func, file = inner[0]
    func = func.rsplit(".", 1)[-1]  # py-spy names a method Class.method
    if "streams.py" in file or (
        "client_reqrep.py" in file and func in ("read", "text", "json", "release")
    ):
        return "upstream body read (aiohttp client)"
    if "web_request.py" in file and func in ("read", "text", "json", "post"):
        return "request body read (aiohttp server)"
    if "aiohttp/" in file or "aiohappyeyeballs/" in file:
        return outside_step(inner)
    return f"{handler}: its own code"


def step_of(stack: list[tuple[str, str]]) -> str:
    """The step one sample belongs to: its innermost frame of ours decides."""
    for depth in range(len(stack) - 1, -1, -1):
        func, file = stack[depth]
        if not own(func, file):
            continue
        if file.endswith(HANDLERS):
            return callee_step(stack[depth:], file.rsplit("/", 1)[-1])
        name = file.rsplit("/", 1)[-1]
        return STEPS.get(f"{name}:{func}") or STEPS.get(name) or f"other: {name}"
    return outside_step(stack)


def thread_kind(stack: list[tuple[str, str]]) -> str:
    """ "main" for the event loop's thread, "threads" for any other (the logbook's writer)."""
    return "threads" if stack and stack[0][0].startswith("Thread._bootstrap") else "main"


@dataclass
class Round:
    """One contender's py-spy samples and CPU over one round, by thread kind."""

    cpu: dict[str, float]  # us of CPU per request, by thread kind (from /proc)
    rps: float
    steps: dict[str, Counter[str]] = field(
        default_factory=lambda: {"main": Counter(), "threads": Counter()}
    )
    leaves: dict[str, Counter[str]] = field(
        default_factory=lambda: {"main": Counter(), "threads": Counter()}
    )

    def add(self, raw: Path) -> None:
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack:
                continue
            parsed = frames(stack)
            kind = thread_kind(parsed)
            self.steps[kind][step_of(parsed)] += int(count)
            func, file = parsed[-1]
            short = "/".join(file.split("/")[-2:]) if file else "?"
            self.leaves[kind][f"{func} ({short})"] += int(count)

    def us(self, name: str, table: str = "steps") -> float:
        """CPU us per request of a step (or a leaf): its share of each thread's samples times that thread's CPU."""
        counters = self.steps if table == "steps" else self.leaves
        return sum(
            c[name] / total * self.cpu[kind]
            for kind, c in counters.items()
            if (total := sum(c.values()))
        )

    @property
    def samples(self) -> int:
        return sum(sum(c.values()) for c in self.steps.values())


@dataclass
class Profile:
    """One contender's rounds; each figure is the median over them."""

    rounds: list[Round] = field(default_factory=list)

    def us(self, name: str, table: str = "steps") -> float:
        return med([r.us(name, table) for r in self.rounds])

    def names(self, table: str = "steps") -> set[str]:
        return {
            n
            for r in self.rounds
            for c in (r.steps if table == "steps" else r.leaves).values()
            for n in c
            if c[n]
        }

    @property
    def cpu(self) -> float:
        return med([sum(r.cpu.values()) for r in self.rounds])

    @property
    def samples(self) -> int:
        return sum(r.samples for r in self.rounds)


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of the process's main thread and of all its other threads, from /proc."""
    total = process_cpu_seconds(pid)
    try:
        fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        main_thread = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        main_thread = total
    return {"main": main_thread, "threads": max(0.0, total - main_thread)}


async def fill_pools(port: int, connections: int) -> None:
    """`connections` requests at once, each on its own connection, all answered."""
    raw = probes.request_bytes(port, run.KEY, probes.CHAT, {"x-mock-delay-ms": "20"})
    gate = asyncio.Semaphore(64)  # do not overflow the listen backlog

    async def opened() -> probes.Conn:
        async with gate:
            return await probes.Conn.open(port)

    conns = await asyncio.gather(*(opened() for _ in range(connections)))
    try:
        await asyncio.gather(*(conn.send(raw) for conn in conns))
    finally:
        for conn in conns:
            conn.close()


def profile_round(
    bench: run.Bench,
    side: str,
    seconds: int,
    rate: int,
    out: Path,
    pyspy: str,
    connections: int = 256,
    delay_ms: int = 20,
) -> Round:
    """wrk on one contender while py-spy samples it."""
    pid = bench.pid(side)
    bench.wrk(bench.ports[side], run.LOAD_CORE, 256, 1, 20, 2)  # warm up
    # wrk ends by dropping 256 requests mid-way, and the gateway closes their upstream
    # connections (a client that leaves cancels its request): refill the pool with 256
    # requests that complete, so that the sampled run does not pay for reconnecting.
    run_async(fill_pools(bench.ports[side], 256))
    spy = bench.procs.start(
        [
            pyspy,
            "record",
            "--pid",
            str(pid),
            "--rate",
            str(rate),
            "--duration",
            str(seconds),
            "--nonblocking",
            "--format",
            "raw",
            "--output",
            str(out),
        ],
        run.LOAD_CORE,
        bench.tmp / "py-spy.log",
    )
    before = thread_cpu_seconds(pid)
    result = bench.wrk(bench.ports[side], run.LOAD_CORE, connections, seconds, delay_ms, 2)
    after = thread_cpu_seconds(pid)
    spy.wait(timeout=seconds + 30)
    if not out.exists():
        raise SystemExit(
            f"bench: py-spy wrote nothing:\n{(bench.tmp / 'py-spy.log').read_text()[-2000:]}"
        )
    requests = max(1, result["requests"])
    one = Round(
        {kind: max(0.0, after[kind] - before[kind]) / requests * 1e6 for kind in after},
        result["rps"],
    )
    one.add(out)
    return one


def report(profiles: dict[str, Profile], seconds: int, rounds: int, rate: int, load: str) -> None:
    floor, gateway = profiles["floor"], profiles["gateway"]
    best = profiles.get("best")
    fc, gc = floor.cpu, gateway.cpu
    threads = med([r.cpu["threads"] for r in gateway.rounds])
    rps = {side: med([r.rps for r in profile.rounds]) for side, profile in profiles.items()}
    print()
    print(
        f"py-spy {rate} Hz, --nonblocking, {rounds} rounds x {seconds} s per contender under {load}; "
        + ", ".join(f"{p.samples:,} {side}" for side, p in profiles.items())
        + " samples"
    )
    print(
        f"CPU per request: floor {fc:.0f} us, gateway {gc:.0f} us ({gc / fc:.2f}x, +{gc - fc:.0f} us; of which the "
        f"gateway's other threads {threads:.0f} us)"
        + (f", best bare foundation {best.cpu:.0f} us ({gc / best.cpu:.2f}x)" if best else "")
        + "; throughput "
        + ", ".join(f"{side} {value:,.0f} rps" for side, value in rps.items())
    )
    print()
    sides = list(profiles)
    names = set().union(*(p.names() for p in profiles.values()))
    order = sorted(names, key=lambda s: -sum(p.us(s) for p in profiles.values()))
    print(
        "| step | "
        + " | ".join(f"{side} us/request" for side in sides)
        + " | share of the gateway's CPU |"
    )
    print("| --- | " + " | ".join("---:" for _ in sides) + " | ---: |")
    for name in order:
        cells = [f"{p.us(name):.1f}" if name in p.names() else "-" for p in profiles.values()]
        print(f"| {name} | " + " | ".join(cells) + f" | {gateway.us(name) / gc:.1%} |")
    totals = " | ".join(f"**{p.cpu:.0f}**" for p in profiles.values())
    print(f"| **total** (medians of rounds, so steps need not add up) | {totals} | |")
    for side, profile in profiles.items():
        print()
        print(f"top frames by self time, {side} (us per request, share of its CPU):")
        leaves = sorted(profile.names("leaves"), key=lambda n: -profile.us(n, "leaves"))
        for leaf in leaves[:15]:
            us = profile.us(leaf, "leaves")
            print(f"  {us:7.1f} us {us / profile.cpu:6.1%}  {leaf}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="2 rounds of 4 s (else 3 rounds of 10 s)"
    )
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples a second")
    parser.add_argument(
        "--keep", action="store_true", help="keep the temp dir (py-spy's raw stacks)"
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=256,
        help="wrk's connections (1: the latency case, with --delay-ms 0)",
    )
    parser.add_argument("--delay-ms", type=int, default=20, help="the mock's answer delay")
    parser.add_argument(
        "--best",
        default=run.BEST_FOUNDATION,
        help=f"the best bare foundation, SERVER+CLIENT[+gc] of foundations.py (default {run.BEST_FOUNDATION}; "
        "'' to leave it out)",
    )
    parser.add_argument(
        "--duties",
        action="store_true",
        help="also the duties floor (bench/duties.py: SPEC's duties on the best foundation)",
    )
    args = parser.parse_args()
    run.check_tools()
    pyspy = shutil.which(
        "py-spy", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    )
    if pyspy is None:
        raise SystemExit("bench: py-spy is not installed: pip install -r requirements-dev.txt")
    rounds, seconds = (2, 4) if args.quick else (3, 10)
    os.sched_setaffinity(0, {run.LOAD_CORE})
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, raise_interrupt)
    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="llm-gateway-profile-"))
    try:
        bench = run.Bench(run.QUICK if args.quick else run.Plan(), procs, tmp, args.best)
        bench.start_mock()
        bench.start_floor()
        if args.best:
            bench.start_best()
        bench.start_gateway()
        if args.duties:
            bench.start_duties()  # reads the keys.json start_gateway wrote
        bench.warm_up()
        sides = ("floor", "best", "gateway") if args.best else ("floor", "gateway")
        sides += ("duties",) if args.duties else ()
        profiles = {side: Profile() for side in sides}
        for rep in range(rounds):
            for side in sides if rep % 2 == 0 else sides[::-1]:
                out = tmp / f"{side}-{rep}.txt"
                one = profile_round(
                    bench, side, seconds, args.rate, out, pyspy, args.connections, args.delay_ms
                )
                profiles[side].rounds.append(one)
                print(
                    f"  round {rep + 1} {side:<8} {one.rps:8,.0f} rps  {sum(one.cpu.values()):6.0f} us CPU/request "
                    f"({one.cpu['threads']:.0f} in other threads)",
                    flush=True,
                )
                time.sleep(0.5)
        report(
            profiles,
            seconds,
            rounds,
            args.rate,
            f"wrk -c{args.connections} (mock {args.delay_ms} ms)",
        )
        return 0
    except KeyboardInterrupt:
        print("\nbench: interrupted", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        if args.keep:
            print(f"raw stacks kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
