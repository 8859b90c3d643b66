"""Reloading keys.json while serving, in one process: what a reload changes and what it keeps.

The triggers as a real process sees them (SIGHUP, POST /admin/reload, a watched file)
under 200 streams, and every worker of WORKERS=2, are in tests/process/test_reload_process.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import os
import sys
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from proxy.app import KEYS_FILE, build_app, load_keys
from proxy.keys import reload as reload_module
from proxy.settings import Settings
from tests.conftest import LIMITED_VK, OPENAI_VK, auth, keys_document
from tests.support.bodies import CHAT

TOKEN = "admin-token-for-tests-0123456789"
NEW_VK = "vk_test_new_after_reload_7c1d"
ROTATED_VK = "vk_test_limited_rotated_3e8a"
NEW_ENTRY = {"provider": "openai", "api_key": "sk-new-0000", "name": "new"}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def rewrite(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


async def config(gateway: TestClient) -> dict[str, Any]:
    return (await (await gateway.get("/health")).json())["config"]


async def status(gateway: TestClient, key: str) -> int:
    response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    await response.read()
    return response.status


async def metric(gateway: TestClient, line_start: str) -> float:
    text = await (await gateway.get("/metrics")).text()
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_a_reload_swaps_the_keys_and_the_next_request_sees_them(
    make_gateway: Callable[..., Awaitable[TestClient]], keys_file: Path
) -> None:
    gateway = await make_gateway(ADMIN_TOKEN=TOKEN)
    before = await config(gateway)
    assert before["hash"] == digest(keys_file) and before["loaded_at"].endswith("Z")
    assert await status(gateway, OPENAI_VK) == 200

    def revoke_and_add(document: dict[str, Any]) -> None:
        del document["virtual_keys"][OPENAI_VK]
        document["virtual_keys"][NEW_VK] = {"provider": "openai", "api_key": "sk-new-0000"}

    rewrite(keys_file, revoke_and_add)
    response = await gateway.post("/admin/reload", headers=admin())
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["reloaded"] is True and body["config"]["hash"] == digest(keys_file)
    assert await status(gateway, OPENAI_VK) == 401
    assert await status(gateway, NEW_VK) == 200
    assert (await config(gateway))["hash"] == digest(keys_file) != before["hash"]
    assert await metric(gateway, 'llm_gateway_config_reloads_total{result="ok"}') == 1.0


async def test_a_reload_gives_back_the_switch_interval_and_the_collector_it_borrowed(
    make_gateway: Callable[..., Awaitable[TestClient]], keys_file: Path
) -> None:
    """While a reload's thread loads, the loop comes first (a shorter switch interval, no
    cyclic collection): both are as they were once it is done, loaded or refused; /health
    counts the new file's keys."""
    gateway = await make_gateway(ADMIN_TOKEN=TOKEN)
    interval = sys.getswitchinterval()
    health = await (await gateway.get("/health")).json()
    openai_keys = health["providers"]["openai"]["keys"]

    def add(document: dict[str, Any]) -> None:
        document["virtual_keys"][NEW_VK] = {"provider": "openai", "api_key": "sk-new-0000"}

    rewrite(keys_file, add)
    assert (await gateway.post("/admin/reload", headers=admin())).status == 200
    assert sys.getswitchinterval() == interval and gc.isenabled()
    health = await (await gateway.get("/health")).json()
    assert health["providers"]["openai"]["keys"] == openai_keys + 1
    keys_file.write_text("{ nope")
    assert (await gateway.post("/admin/reload", headers=admin())).status == 422
    assert sys.getswitchinterval() == interval and gc.isenabled()


class Node:
    """A cycle's link, seen leaving through a weak reference."""

    __slots__ = ("other", "__weakref__")

    def __init__(self) -> None:
        self.other: object = self


@contextlib.contextmanager
def frozen_as_at_the_start() -> Iterator[None]:
    """The process as `server.tune_gc` leaves it: what exists frozen, young garbage
    collected seldom (here: not before the test says)."""
    thresholds = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(10**9)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
        gc.collect()


async def test_garbage_waiting_for_its_collection_at_a_reload_is_collected_not_frozen(
    make_gateway: Callable[..., Awaitable[TestClient]], keys_file: Path
) -> None:
    """A reload freezes what it loaded, and with it every object then tracked: garbage in a
    cycle (a cut stream's, a closed connection's) that no collection had found yet was
    frozen, never to be collected."""
    gateway = await make_gateway(ADMIN_TOKEN=TOKEN)
    with frozen_as_at_the_start():
        left = weakref.ref(Node())  # garbage, in a cycle
        assert left() is not None
        assert (await gateway.post("/admin/reload", headers=admin())).status == 200
        gc.collect()
        assert left() is None


async def test_what_requests_in_flight_at_a_reload_leave_in_cycles_is_collected_in_time(
    make_gateway: Callable[..., Awaitable[TestClient]], keys_file: Path
) -> None:
    """What is in flight at a reload is frozen with the keys; what of it later ends in a
    cycle stays. Once the frozen objects grew by a quarter since they were last walked, a
    reload walks them all: a gateway reloading under load grew without end before."""
    gateway = await make_gateway(ADMIN_TOKEN=TOKEN)
    with frozen_as_at_the_start():
        assert (await gateway.post("/admin/reload", headers=admin())).status == 200
        in_flight = [Node() for _ in range(gc.get_freeze_count() // 3 + 1000)]
        last = weakref.ref(in_flight[-1])
        assert (await gateway.post("/admin/reload", headers=admin())).status == 200
        del in_flight  # ended, each in its cycle, frozen by that reload
        gc.collect()
        assert last() is not None  # frozen: no collection reaches it
        assert (await gateway.post("/admin/reload", headers=admin())).status == 200
        gc.collect()
        assert last() is None


async def test_a_file_that_does_not_check_changes_nothing_and_says_why_once(
    make_gateway: Callable[..., Awaitable[TestClient]],
    keys_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gateway = await make_gateway(ADMIN_TOKEN=TOKEN)
    before = await config(gateway)
    caplog.clear()
    for broken, says in [
        ("{ nope", "not valid JSON"),
        (
            '{"virtual_keys": {"vk_x_123456789": {"provider": "nowhere", "api_key": "k"}}}',
            "provider 'nowhere' is unknown",
        ),
    ]:
        keys_file.write_text(broken)
        response = await gateway.post("/admin/reload", headers=admin())
        assert response.status == 422
        assert says in (await response.json())["error"]["message"]
        (said,) = [record.getMessage() for record in caplog.records]
        assert says in said and "previous keys stay" in said
        caplog.clear()
    assert await status(gateway, OPENAI_VK) == 200  # the old keys still serve
    after = await config(gateway)
    failed = after.pop("reload_failed")  # the last failure, its reason and time, until a good one
    assert before.pop("reload_failed") is None and after == before
    assert "provider 'nowhere' is unknown" in failed["reason"] and failed["at"].endswith("Z")
    assert await metric(gateway, 'llm_gateway_config_reloads_total{result="failed"}') == 2.0


async def test_a_rotated_key_keeps_its_window_under_its_name_and_a_raised_limit_applies_at_once(
    make_gateway: Callable[..., Awaitable[TestClient]], keys_file: Path
) -> None:
    await rotate_and_raise_the_limited_key(await make_gateway(ADMIN_TOKEN=TOKEN), keys_file)


async def rotate_and_raise_the_limited_key(gateway: TestClient, keys_file: Path) -> None:
    """The limited key spends 2 of 3, is rotated to ROTATED_VK under the same name with a
    limit of 4, and gets exactly 2 more: its window follows its name, on any tracker."""
    assert [await status(gateway, LIMITED_VK) for _ in range(2)] == [200, 200]  # 2 of 3

    def rotate_and_raise(document: dict[str, Any]) -> None:
        entry = document["virtual_keys"].pop(LIMITED_VK)
        entry["quota"]["requests"] = 4
        document["virtual_keys"][ROTATED_VK] = entry  # same name, "limited"

    rewrite(keys_file, rotate_and_raise)
    assert (await gateway.post("/admin/reload", headers=admin())).status == 200
    assert await status(gateway, LIMITED_VK) == 401
    # 2 already counted under the name, 4 allowed now: 2 more, then 429.
    assert [await status(gateway, ROTATED_VK) for _ in range(3)] == [200, 200, 429]


async def test_a_stream_in_flight_finishes_on_the_key_it_started_with(
    make_gateway: Callable[..., Awaitable[TestClient]],
    keys_file: Path,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    gateway = await make_gateway(ADMIN_TOKEN=TOKEN)
    stream = await gateway.post(
        "/v1/chat/completions",
        json={**CHAT, "stream": True},
        headers={
            **auth(OPENAI_VK),
            "x-fake-chunks": "10",
            "x-fake-delay-ms": "50",
            "x-request-id": "in-flight",
        },
    )
    first = await stream.content.readany()
    rewrite(keys_file, lambda document: document["virtual_keys"].pop(OPENAI_VK))
    assert (await gateway.post("/admin/reload", headers=admin())).status == 200
    assert await status(gateway, OPENAI_VK) == 401  # revoked for the next request
    rest = await stream.read()
    assert (first + rest).endswith(b"data: [DONE]\n\n")
    lines = {line["request_id"]: line for line in await records(2)}
    assert lines["in-flight"]["status"] == 200 and lines["in-flight"]["usage"] is not None


async def test_a_process_given_old_keys_catches_up_with_the_file_at_start(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    settings: Callable[..., Settings],
    keys_file: Path,
) -> None:
    # A worker that replaces a dead one is forked with the keys its parent loaded at start.
    current = settings()
    forked_with = load_keys(current, os.environ)
    rewrite(keys_file, lambda document: document["virtual_keys"].pop(OPENAI_VK))
    gateway = await aiohttp_client(build_app(current, forked_with))
    assert await status(gateway, OPENAI_VK) == 401
    assert (await config(gateway))["hash"] == digest(keys_file)


async def wait_for_hash(gateway: TestClient, expected: str, within: float = 5.0) -> float:
    """Seconds until /health names this config; fails past `within` (KEYS_FILE_WATCH promises seconds)."""
    started = time.monotonic()
    while (await config(gateway))["hash"] != expected:
        assert time.monotonic() - started < within, "the change was not picked up in time"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_a_watched_file_written_in_place_or_renamed_over_is_reloaded_within_5_s(
    make_gateway: Callable[..., Awaitable[TestClient]], keys_file: Path
) -> None:
    gateway = await make_gateway(KEYS_FILE_WATCH="true")
    rewrite(keys_file, lambda document: document["virtual_keys"].pop(OPENAI_VK))  # in place
    await wait_for_hash(gateway, digest(keys_file))
    assert await status(gateway, OPENAI_VK) == 401

    replacement = keys_file.with_name("keys.json.tmp")  # as editors save
    document = json.loads(keys_file.read_text())
    del document["virtual_keys"][LIMITED_VK]
    replacement.write_text(json.dumps(document))
    os.replace(replacement, keys_file)
    await wait_for_hash(gateway, digest(keys_file))
    assert await status(gateway, LIMITED_VK) == 401


async def test_a_watched_kubernetes_secret_volume_is_reloaded_when_its_links_swap(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    tmp_path: Path,
    fake_base: str,
    log_path: Path,
) -> None:
    # A Secret mounted as a directory: keys.json -> ..data/keys.json, ..data -> ..<timestamp>
    mount = tmp_path / "secret"
    (mount / "..2026_01").mkdir(parents=True)
    (mount / "..2026_01" / "keys.json").write_text(json.dumps(keys_document(fake_base)))
    (mount / "..data").symlink_to("..2026_01")
    (mount / "keys.json").symlink_to("..data/keys.json")
    current = Settings.from_env(
        {
            "KEYS_FILE_PATH": str(mount / "keys.json"),
            "KEYS_FILE_WATCH": "true",
            "LOG_TO_FILE": "true",
            "LOG_FILE_PATH": str(log_path),
        }
    )
    gateway = await aiohttp_client(build_app(current))
    assert await status(gateway, OPENAI_VK) == 200

    updated = keys_document(fake_base)
    del updated["virtual_keys"][OPENAI_VK]
    (mount / "..2026_02").mkdir()
    (mount / "..2026_02" / "keys.json").write_text(json.dumps(updated))
    (mount / "..data_tmp").symlink_to("..2026_02")
    os.replace(mount / "..data_tmp", mount / "..data")  # the kubelet's atomic swap
    await wait_for_hash(gateway, digest(mount / "keys.json"))
    assert await status(gateway, OPENAI_VK) == 401


async def test_a_key_presented_while_a_reload_is_under_way_waits_for_it_on_usage_too(
    make_gateway: Callable[..., Awaitable[TestClient]], keys_file: Path
) -> None:
    """A key made a moment ago through another worker's admin API, presented while this
    worker reloads keys.json: the request waits for the reload instead of its 401. So does
    GET /usage, which automation asks of a key it has just made; it was told 401, counted
    toward the lockout."""
    gateway = await make_gateway(ADMIN_TOKEN=TOKEN)
    keys = gateway.app[KEYS_FILE]
    rewrite(keys_file, lambda document: document["virtual_keys"].update({NEW_VK: NEW_ENTRY}))
    async with keys.changing():  # the reload under way, as after another worker's SIGHUP
        reload = asyncio.create_task(keys.reload("SIGHUP"))
        await asyncio.sleep(0)  # the reload first in line for the keys, as the signal's is
        chat = asyncio.create_task(status(gateway, NEW_VK))
        usage = asyncio.create_task(gateway.get("/usage", headers=auth(NEW_VK)))
        # Neither answers while the reload is held (each would answer 401 at once, here).
        done, _ = await asyncio.wait({chat, usage}, timeout=0.5)
        assert not done, [task.result() for task in done]
    assert await reload is None
    assert await chat == 200
    answered = await usage
    assert answered.status == 200, await answered.text()
    assert (await answered.json())["key"] == "new"


async def test_a_key_not_found_waits_for_a_stuck_reload_only_so_long(
    make_gateway: Callable[..., Awaitable[TestClient]],
    keys_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reload that never ends (a keys.json on a hung network mount) holds a key not found
    RELOADED_WITHIN_SECONDS at most: then it is refused as any unknown key, not held for ever."""
    monkeypatch.setattr(reload_module, "RELOADED_WITHIN_SECONDS", 0.05)
    gateway = await make_gateway()
    async with gateway.app[KEYS_FILE].changing():  # under way, and never ending meanwhile
        assert await status(gateway, NEW_VK) == 401
