"""What gateway processes show a test from outside, once it has come: their log lines and a
key's `/usage`, read again (`until`) until what the test waits for is there; and whether a
gateway's `/usage` and `/metrics` agree with its log line (`assert_views_agree`).

A settle another process charged reaches Redis within 50 ms, and a log line is written off
the request path, so a test that has its answers may still have to wait for these.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

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


async def assert_views_agree(gateway: TestClient, key: str, line: dict[str, Any]) -> None:
    """The key's `/usage` and the gateway's `/metrics` say what its one log line says: one
    request, of that status, charged that usage."""
    totals = (await key_usage(gateway, key))["totals"]
    usage = line["usage"]
    assert (totals["requests"], totals["prompt_tokens"], totals["completion_tokens"]) == (
        1,
        usage["prompt_tokens"],
        usage["completion_tokens"],
    ), totals
    text = await (await gateway.get("/metrics")).text()
    by_status = {
        sample.labels["status"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "llm_gateway_requests"
        for sample in family.samples
        if sample.name == "llm_gateway_requests_total"
    }
    assert by_status == {str(line["status"]): 1.0}, by_status
