"""Who may read the interaction log file the gateway creates.

With LOG_BODIES the log holds every prompt and answer: the gateway creates it readable by its
owner and group (0640, a log shipper in the gateway's group reads it), never by every local
user; without bodies as nginx's access log (0644). The umask narrows either; a file that
already exists keeps its mode (the operator's, or logrotate's `create`).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import OPENAI_VK, auth
from tests.support.bodies import chat

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def umask_022() -> Iterator[None]:
    before = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(before)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("umask_022")
@pytest.mark.parametrize(("bodies", "expected"), [("true", 0o640), ("false", 0o644)])
async def test_the_log_file_with_bodies_is_not_readable_by_every_local_user(
    make_gateway: Callable[..., Awaitable[TestClient]], log_path: Path, bodies: str, expected: int
) -> None:
    gateway = await make_gateway(LOG_BODIES=bodies)
    assert (await gateway.post("/v1/chat/completions", json=chat(), headers=auth(OPENAI_VK))).ok
    assert mode(log_path) == expected


@pytest.mark.usefixtures("umask_022")
async def test_a_log_file_that_exists_keeps_its_mode(
    make_gateway: Callable[..., Awaitable[TestClient]], log_path: Path
) -> None:
    log_path.touch(mode=0o600)
    await make_gateway(LOG_BODIES="false")
    assert mode(log_path) == 0o600


@pytest.mark.usefixtures("umask_022")
def test_the_start_creates_the_log_file_with_bodies_so_too(keys_file: Path, tmp_path: Path) -> None:
    # gateway.py opens the file before serving (a path it cannot open stops the start),
    # and --check does the same: the file is created there, first.
    path = tmp_path / "checked.jsonl"
    environ = {
        **os.environ,
        "KEYS_FILE_PATH": str(keys_file),
        "LOG_TO_FILE": "true",
        "LOG_BODIES": "true",
        "LOG_FILE_PATH": str(path),
    }
    result = subprocess.run(
        [sys.executable, str(ROOT / "gateway.py"), "--check"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert mode(path) == 0o640
