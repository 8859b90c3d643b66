"""Real processes for tests: the gateway and the fake provider started as users start them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def gateway_command(*flags: str) -> list[str]:
    return [sys.executable, str(ROOT / "gateway.py"), *flags]


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
    ) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            command,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            start_new_session=True,  # its own process group: stop() also reaches its children
        )
        self.started.append(process)
        if ready:
            deadline = time.monotonic() + 20
            assert process.stdout is not None
            while time.monotonic() < deadline:
                line = process.stdout.readline()
                if ready in line:
                    return process
                if not line and process.poll() is not None:
                    break
            raise AssertionError(
                f"{command} did not start: {process.stderr.read() if process.stderr else ''}"
            )
        return process

    def stop(self) -> None:
        for process in self.started:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # the group is gone already
            process.communicate(timeout=10)  # reaps it and closes its pipes


def start_gateway(
    processes: Processes, keys: Path, log: Path, **env: str
) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    process = processes.start(
        gateway_command(),
        env={
            "KEYS_FILE_PATH": str(keys),
            "SERVER_HOST": "127.0.0.1",
            "SERVER_PORT": str(port),
            "LOG_TO_FILE": "true",
            "LOG_FILE_PATH": str(log),
            **env,
        },
        ready="listening on",
    )
    return process, f"http://127.0.0.1:{port}"
