"""Real processes for tests: the gateway and the fake provider started as users start them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A loopback port free now (the kernel's choice), for a server started next."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def gateway_command(*flags: str) -> list[str]:
    return [sys.executable, str(ROOT / "gateway.py"), *flags]


def gateway_command_on_asyncio(*flags: str) -> list[str]:
    """`gateway_command`, whose event loop is asyncio's own: uvloop cannot be imported, as
    where it is not installed (`runtime.server.new_event_loop`)."""
    script = str(ROOT / "gateway.py")
    run = (
        f"import runpy, sys; sys.modules['uvloop'] = None; sys.argv[0] = {script!r}; "
        f"runpy.run_path({script!r}, run_name='__main__')"
    )
    return [sys.executable, "-c", run, *flags]


def refused(env: dict[str, str], *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        gateway_command(*flags),
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )


class Processes:
    """Processes a test started; all are killed at its end, also on failure."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[str]] = []

    def start(
        self,
        command: list[str],
        env: dict[str, str] | None = None,
        ready: str = "",
        cwd: Path = ROOT,
        ready_on: str = "stdout",
        preexec_fn: Callable[[], None] | None = None,
    ) -> subprocess.Popen[str]:
        """`command` started; with `ready`, once a line of its `ready_on` (stdout or stderr)
        holds that text. `preexec_fn`: run in the child before it starts (a lowered limit)."""
        process = subprocess.Popen(
            command,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            start_new_session=True,  # its own process group: stop() also reaches its children
            preexec_fn=preexec_fn,
        )
        self.started.append(process)
        if ready:
            deadline = time.monotonic() + 20
            said = process.stdout if ready_on == "stdout" else process.stderr
            assert said is not None
            while time.monotonic() < deadline:
                line = said.readline()
                if ready in line:
                    return process
                if not line and process.poll() is not None:
                    break
            raise AssertionError(
                f"{command} did not start: {process.stderr.read() if process.stderr else ''}"
            )
        return process

    def stop(self) -> None:
        """SIGTERM first, so a gateway cleans up after itself (its workers, their metrics
        directory); SIGKILL to the process group for whatever is still there."""
        for process in self.started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.communicate(timeout=10)
                except subprocess.TimeoutExpired:
                    pass  # killed below
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # the group is gone already
            process.communicate(timeout=10)  # reaps it and closes its pipes


def start_fake_provider(processes: Processes) -> str:
    """The fake provider as a process of its own, on a port it chose; its base URL."""
    process = processes.start(
        [sys.executable, "-m", "tests.support.fake_provider", "--host", "127.0.0.1", "--port", "0"]
    )
    assert process.stdout is not None
    return process.stdout.readline().strip().rsplit(" ", 1)[1]  # "fake provider on <url>"


def start_gateway(
    processes: Processes,
    keys: Path,
    log: Path,
    preexec_fn: Callable[[], None] | None = None,
    command: list[str] | None = None,
    **env: str,
) -> tuple[subprocess.Popen[str], str]:
    """`gateway.py` on a free loopback port with this keys file, logging to `log`, plus `env`;
    once it listens: the process and its base URL. `preexec_fn`: as `Processes.start`'s;
    `command`: in place of `gateway_command()`."""
    port = free_port()
    process = processes.start(
        command or gateway_command(),
        env={
            "KEYS_FILE_PATH": str(keys),
            "SERVER_HOST": "127.0.0.1",
            "SERVER_PORT": str(port),
            "LOG_TO_FILE": "true",
            "LOG_FILE_PATH": str(log),
            **env,
        },
        ready="listening on",
        # The status lines leave stdout to the interaction log when it is written there.
        ready_on="stdout" if env.get("LOG_TO_FILE", "true") == "true" else "stderr",
        preexec_fn=preexec_fn,
    )
    return process, f"http://127.0.0.1:{port}"


def serving_pid(server_port: int, client_port: int, pids: set[int]) -> int | None:
    """Which of `pids` holds the server side of the loopback connection from `client_port`."""
    local, remote = f"0100007F:{server_port:04X}", f"0100007F:{client_port:04X}"
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[2] == remote:
            inode = fields[9]
    for pid in pids:
        try:
            descriptors = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue  # that process is gone
        for fd in descriptors:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
            except FileNotFoundError:
                pass  # closed meanwhile
    return None


def listening_sockets(port: int) -> set[str]:
    """The inodes of the sockets listening on `port` of loopback (one per worker: SO_REUSEPORT)."""
    wanted = f":{port:04X}"
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            fields = row.split()
            if fields[1].endswith(wanted) and fields[3] == "0A":  # 0A: LISTEN
                inodes.add(fields[9])
    return inodes


def wait_listening(
    port: int, count: int, changed_from: set[str] | None = None, within: float = 20.0
) -> set[str]:
    """Wait (bounded) until `count` sockets listen on `port`, and not just `changed_from`.

    Reading the workers' "listening on" lines instead can block for ever on a line that
    never comes; the kernel's table of listening sockets is the fact the tests need.
    """
    deadline = time.monotonic() + within
    while True:
        sockets = listening_sockets(port)
        if len(sockets) == count and sockets != changed_from:
            return sockets
        assert time.monotonic() < deadline, f"{len(sockets)} sockets listen on {port}, not {count}"
        time.sleep(0.05)
