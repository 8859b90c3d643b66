"""After a day of mixed traffic, the interaction log, /usage with the admin views, and
/metrics add up to the same requests, tokens and dollars per key and per team; a reload, an
admin change of a key's limits, and a key moved to another team reset nothing and count
nothing twice (the same day through two workers and Redis: tests/process)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from proxy.app import build_app
from proxy.settings import Settings
from tests.support.fake_provider import FakeState, Fault
from tests.support.three_views import (
    ADMIN,
    ADMIN_HEADERS,
    FRANK_PRIMARY,
    KEYS,
    disagreements,
    document,
    drive,
    more,
    totals,
    usages,
)


async def test_the_log_the_usage_views_and_the_metrics_add_up_through_changes(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    tmp_path: Path,
    fake_base: str,
    fake: FakeState,
    log_path: Path,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(document(fake_base)))
    settings = Settings.from_env(
        {
            "KEYS_FILE_PATH": str(keys),
            "LOG_TO_FILE": "true",
            "LOG_FILE_PATH": str(log_path),
            "ADMIN_TOKEN": ADMIN,
        }
    )
    gateway = await aiohttp_client(
        build_app(settings), server_kwargs={"handler_cancellation": True}
    )
    root = str(gateway.make_url("")).rstrip("/")
    fake.faults[FRANK_PRIMARY] = Fault(500)  # frank's primary fails: its fallback answers
    count = await drive(root)
    lines = await records(count)
    assert len(lines) == count
    seen = await usages(root)
    assert disagreements(lines, seen) == []
    tampered = [{**line, "usage": None} if line["key"] == "bob" else line for line in lines]
    assert disagreements(tampered, seen)  # the comparison can fail
    before = totals(seen)

    # A reload changing limits (a key's budget and quota, a team's new quota) resets nothing.
    changed = document(fake_base)
    changed["virtual_keys"][KEYS["alice"]]["budget"] = {"usd": 60}
    changed["teams"]["research"]["quota"] = {"requests": 1000}
    keys.write_text(json.dumps(changed))
    assert (await gateway.post("/admin/reload", headers=ADMIN_HEADERS)).status == 200
    assert totals(await usages(root)) == before
    # Nor does the admin API changing a key's quota, or moving a key to another team.
    for name, change in (
        ("dave", {"quota": {"requests": 20, "window_seconds": 60}}),
        ("carol", {"team": "research"}),
    ):
        response = await gateway.patch(f"/admin/keys/{name}", headers=ADMIN_HEADERS, json=change)
        assert response.status == 200, await response.text()
    assert totals(await usages(root)) == before
    count += 2  # the changes' audit lines

    count += await more(root)
    lines = await records(count)
    assert len(lines) == count
    seen = await usages(root)
    assert disagreements(lines, seen) == []
    after = totals(seen)
    # carol's past spend stays with ops; her new request counts in research.
    assert after["teams"]["ops"]["requests"] == before["teams"]["ops"]["requests"] + 1  # dave
    assert after["teams"]["research"]["requests"] == before["teams"]["research"]["requests"] + 1
    assert after["keys"]["carol"]["requests"] == before["keys"]["carol"]["requests"] + 1
