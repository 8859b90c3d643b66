"""What gateway processes show a test from outside, once it has come: their log lines and a
key's `/usage`, read again (`until`) until what the test waits for is there.

A settle another process charged reaches Redis within 50 ms, and a log line is written off
the request path, so a test that has its answers may still have to wait for these.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from tests.conftest import auth
from tests.support.polling import until


async def log_lines(logs: list[Path], count: int, within: float = 10.0) -> list[dict[str, Any]]:
    """Every line of the gateways' log files, once there are at least `count` of them."""
    found: list[dict[str, Any]] = []

    def enough() -> bool:
        nonlocal found
        found = [
            json.loads(line)
            for log in logs
            if log.exists()
            for line in log.read_text().splitlines()
        ]
        return len(found) >= count

    await until(enough, within, f"{count} log lines")
    return found


async def key_usage(
    gateway: TestClient | str, key: str, at_least: int = 0, within: float = 10.0
) -> dict[str, Any]:
    """The key's `GET /usage` at `gateway` (a test client, or a process's URL), once its total tokens reach `at_least`
    (0: at once, for a read after the one charge there is was seen)."""
    url = gateway if isinstance(gateway, str) else str(gateway.make_url(""))
    found: dict[str, Any] = {}
    async with aiohttp.ClientSession() as session:

        async def reached() -> bool:
            nonlocal found
            async with session.get(f"{url.rstrip('/')}/usage", headers=auth(key)) as response:
                found = await response.json()
            return bool(found["totals"]["tokens"] >= at_least)

        await until(reached, within, f"{at_least} tokens on the key's /usage", every=0.02)
    return found
