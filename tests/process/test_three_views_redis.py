"""The day of tests/app/test_three_views.py through two workers sharing one redis-server:
the log lines both write, every worker's /usage and admin views (Redis) and /metrics (the
sum over the workers) add up, per key and per team, through a reload (every worker), an
admin change and a key moved to another team."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.observed import log_lines
from tests.support.polling import until
from tests.support.processes import Processes, free_port, start_gateway, wait_listening
from tests.support.three_views import (
    ADMIN,
    ADMIN_HEADERS,
    KEYS,
    disagreements,
    document,
    drive,
    more,
    totals,
    usages,
)

WORKERS = 2


async def added_up(root: str, log: Path, count: int) -> tuple[list[Any], dict[str, Any]]:
    """The log's lines and the views, once they agree: a worker sends a request's settle to
    Redis within 50 ms of its end, so a view read at once may miss the last one."""
    lines = await log_lines([log], count)
    seen: dict[str, Any] = {}

    async def agree() -> bool:
        nonlocal seen
        seen = await usages(root)
        return not disagreements(lines, seen, WORKERS)

    try:
        await until(agree, 10.0, "the three views to add up", every=0.05)
    except AssertionError:
        assert disagreements(lines, seen, WORKERS) == []
    assert len(lines) == count
    return lines, seen


async def test_two_workers_and_redis_add_up_in_the_log_the_usage_views_and_the_metrics(
    processes: Processes, fake_url: str, redis_url: str, tmp_path: Path
) -> None:
    # frank's primary refuses connections: its fallback answers.
    unreachable = {"base_url": f"http://127.0.0.1:{free_port()}/v1"}
    keys = tmp_path / "keys.json"
    day = document(fake_url, frank_provider="unreachable")
    day["providers"]["unreachable"] = unreachable
    keys.write_text(json.dumps(day))
    log = tmp_path / "log.jsonl"
    _, root = start_gateway(
        processes, keys, log, WORKERS=str(WORKERS), REDIS_URL=redis_url, ADMIN_TOKEN=ADMIN
    )
    await asyncio.to_thread(wait_listening, int(root.rsplit(":", 1)[1]), WORKERS)
    count = await drive(root)
    _, seen = await added_up(root, log, count)
    before = totals(seen)

    changed = json.loads(keys.read_text())
    changed["virtual_keys"][KEYS["alice"]]["budget"] = {"usd": 60}
    changed["teams"]["research"]["quota"] = {"requests": 1000}
    keys.write_text(json.dumps(changed))
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{root}/admin/reload", headers=ADMIN_HEADERS) as response:
            assert response.status == 200
        assert totals(await usages(root)) == before
        for name, change in (
            ("dave", {"quota": {"requests": 20, "window_seconds": 60}}),
            ("carol", {"team": "research"}),
        ):
            async with session.patch(
                f"{root}/admin/keys/{name}", headers=ADMIN_HEADERS, json=change
            ) as response:
                assert response.status == 200, await response.text()
    assert totals(await usages(root)) == before
    count += 2  # the changes' audit lines

    # Every worker has the changes (the one that wrote swapped them in, the others reload).
    async def everywhere() -> bool:
        teams = set()
        for _ in range(8):  # new connections, spread over the workers
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True)
            ) as session:
                async with session.get(f"{root}/admin/keys", headers=ADMIN_HEADERS) as response:
                    keys = (await response.json())["keys"]
            teams |= {key["team"] for key in keys if key["name"] == "carol"}
        return teams == {"research"}

    await until(everywhere, 10.0, "carol in research on every worker")
    count += await more(root)
    lines, seen = await added_up(root, log, count)
    after = totals(seen)
    assert after["teams"]["ops"]["requests"] == before["teams"]["ops"]["requests"] + 1  # dave
    assert after["teams"]["research"]["requests"] == before["teams"]["research"]["requests"] + 1
    assert [line["team"] for line in lines if line.get("key") == "carol"][-1] == "research"
