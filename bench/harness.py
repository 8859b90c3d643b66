"""What every bench script needs: its children stopped at the end, ports, readiness, /proc figures.

`Processes` starts each child in its own process group (pinned to a core with taskset when
asked) and stops them all at the end, on failure and on Ctrl-C too. The rest read what the
kernel says about a process or the machine: RSS, CPU time, whether uvloop is loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


class Processes:
    """Every child this run starts, each in its own process group, all stopped at the end."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        argv: list[str],
        core: int | None,
        log: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        if core is not None and shutil.which("taskset"):
            argv = ["taskset", "-c", str(core), *argv]
        out = open(log, "wb") if log else subprocess.DEVNULL
        try:
            child = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT if log else None,
                env=env,
                start_new_session=True,
                cwd=ROOT,
            )
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


def start_mock(procs: Processes, tmp: Path, core: int | None) -> str:
    """The mock provider started (on `core`, its log in `tmp`); its base URL once it listens."""
    port = free_port()
    mock = procs.start(
        [sys.executable, str(BENCH / "mock_provider.py"), "--port", str(port)],
        core,
        tmp / "mock.log",
    )
    wait_until(lambda: listening(port), "the mock", mock, tmp / "mock.log")
    return f"http://127.0.0.1:{port}"


def mock_and_keys(procs: Processes, tmp: Path, key: str, core: int | None) -> str:
    """The mock provider started (on `core`), and `tmp`/keys.json holding `key` as one plain
    key with a quota that never binds; returns the mock's base URL."""
    upstream = start_mock(procs, tmp, core)
    keys = {
        "providers": {"openai": {"base_url": f"{upstream}/v1"}},
        "virtual_keys": {
            key: {
                "provider": "openai",
                "api_key": "sk-bench",
                "quota": {"requests": 100_000_000, "window_seconds": 3600},
            }
        },
    }
    (tmp / "keys.json").write_text(json.dumps(keys))
    return upstream


def wrk(
    procs: Processes,
    log: Path,
    key: str,
    port: int,
    core: int | None,
    connections: int,
    seconds: int,
    delay_ms: int,
    timeout_s: int = 5,
) -> dict[str, float]:
    """wrk with bench/chat.lua (POST a small chat as `key`, the mock answering after `delay_ms`):
    its summary line, with `rps` and `errors` (connect, read, write and timeouts) added."""
    env = dict(os.environ, BENCH_KEY=key, BENCH_DELAY_MS=str(delay_ms))
    wait_until_closed(port)
    argv = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        f"{timeout_s}s",
        "-s",
        str(BENCH / "chat.lua"),
        f"http://127.0.0.1:{port}/v1/chat/completions",
    ]
    child = procs.start(argv, core, log, env=env)
    try:
        child.wait(timeout=seconds + 30)
    finally:
        procs.stop(child)
    text = log.read_text()
    for line in text.splitlines():
        if line.startswith("BENCHJSON "):
            data = json.loads(line[len("BENCHJSON ") :])
            data["rps"] = data["requests"] / (data["duration_us"] / 1e6)
            data["errors"] = data["connect"] + data["read"] + data["write"] + data["timeout"]
            return data
    raise SystemExit(f"bench: wrk gave no summary:\n{text[-2000:]}")


# /proc/net/tcp's states of a connection on its way to closed, TIME-WAIT aside: FIN-WAIT-1,
# FIN-WAIT-2, CLOSE-WAIT, LAST-ACK, CLOSING.
CLOSING_STATES = {"04", "05", "08", "09", "0B"}


def closing_connections(port: int) -> int:
    """Connections to or from `port` on this machine still closing (TIME-WAIT aside)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            ends = (int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16))
            count += port in ends and fields[3] in CLOSING_STATES
    return count


def wait_until_closed(port: int, within: float = 5.0) -> None:
    """Until the last load's connections to `port` have closed (at most `within` seconds).

    wrk started while the previous run's 256 connections still close (the server finishing
    what they had in flight) reuses their ports, and some of its connections wait for a
    SYN retransmit: 1 s, then 2 s more. Two runs back to back on one server (the turn where
    the interleaved order reverses) gave the floor latencies of 1.0-1.2 s and the gateway
    3-35 client timeouts at 2 s in a round, none of them in the gateway's own log (its
    slowest request took 145 ms); waiting the ~60 ms the close took removed both."""
    deadline = time.monotonic() + within
    while closing_connections(port) and time.monotonic() < deadline:
        time.sleep(0.01)


def raise_interrupt(signum: int, frame: Any) -> None:
    """A signal handler: SIGTERM and SIGHUP end the run as Ctrl-C does (children stopped)."""
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def checkout_proxy(checkout: str) -> Iterator[None]:
    """Within the block, `import proxy...` imports `checkout`'s own `proxy` package (any one
    imported before is forgotten, not unloaded: what was taken from it stays usable), so
    several checkouts' functions can be measured side by side in one process."""
    for module in [name for name in sys.modules if name.split(".")[0] == "proxy"]:
        del sys.modules[module]
    sys.path.insert(0, checkout)
    try:
        yield
    finally:
        sys.path.remove(checkout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(
    check: Callable[[], bool],
    what: str,
    child: subprocess.Popen[bytes],
    log: Path,
    timeout: float = 15.0,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise SystemExit(
                f"bench: {what} exited with {child.returncode}:\n{log.read_text()[-2000:]}"
            )
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(
        f"bench: {what} did not come up within {timeout:g} s:\n{log.read_text()[-2000:]}"
    )


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
