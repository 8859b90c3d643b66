"""An upgrade in place from the previous version (d7c5557) with KEYS_STORE=redis: keys its
admin API made, holding values this version refuses, do not stop this one; they are left
out, said, shown on /health, and repaired through the admin API."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
import redis

from proxy.keys.redis_store import DOCUMENT, VERSION, fernet
from tests.conftest import OPENAI_VK, auth, keys_document
from tests.process.test_admin_keys_process import ADMIN, CHAT, HEADERS, REAL
from tests.support.bodies import chat
from tests.support.polling import until
from tests.support.processes import (
    ROOT,
    Processes,
    free_port,
    refused,
    start_fake_provider,
    start_gateway,
)

pytestmark = pytest.mark.process

PREVIOUS = "d7c5557"  # the version an operator upgrades from
STORE_SECRET = "keys-store-secret-for-upgrades-7c2e"


@pytest.fixture
def previous(tmp_path: Path) -> Path:
    """The previous version's tree, from this repository's history."""
    folder = tmp_path / "previous"
    folder.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", PREVIOUS], capture_output=True, check=False
    )
    if archive.returncode != 0:
        pytest.skip(f"the previous version {PREVIOUS} is not in this clone's history")
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def start_previous(
    processes: Processes, folder: Path, keys: Path, log: Path, **env: str
) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    process = processes.start(
        [sys.executable, str(folder / "gateway.py")],
        env={
            "PYTHONPATH": str(folder),
            "KEYS_FILE_PATH": str(keys),
            "SERVER_HOST": "127.0.0.1",
            "SERVER_PORT": str(port),
            "LOG_TO_FILE": "true",
            "LOG_FILE_PATH": str(log),
            **env,
        },
        ready="listening on",
        cwd=folder,
    )
    return process, f"http://127.0.0.1:{port}"


@pytest.fixture
def store_env(redis_url: str) -> Iterator[dict[str, str]]:
    yield {
        "ADMIN_TOKEN": ADMIN,
        "REDIS_URL": redis_url,
        "KEYS_STORE": "redis",
        "KEYS_STORE_SECRET": STORE_SECRET,
        "AUTH_FAILURE_LIMIT": "100000",
    }


# What the previous version's admin API took and this one refuses (each its own line).
REFUSED_NOW = {
    "alice ": {"provider": "openai", "api_key": f"{REAL}-alice"},
    "regioned": {"provider": "openai", "api_key": f"{REAL}-region", "region": "us-east-1"},
    "opsy": {"provider": "openai", "api_key": f"{REAL}-opsy", "team": "ops "},
}


async def made(session: aiohttp.ClientSession, url: str, path: str, body: Any) -> Any:
    async with session.post(f"{url}{path}", json=body) as response:
        assert response.status == 201, await response.text()
        return await response.json()


async def test_keys_the_previous_admin_api_made_leave_the_new_gateway_serving_the_rest(
    processes: Processes, tmp_path: Path, previous: Path, store_env: dict[str, str]
) -> None:
    base = start_fake_provider(processes)
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(keys_document(base)))
    old, old_url = start_previous(processes, previous, keys, tmp_path / "old.jsonl", **store_env)
    secrets = {}
    async with aiohttp.ClientSession(headers=HEADERS) as admin:
        await made(admin, old_url, "/admin/teams", {"name": "ops "})
        for name, entry in REFUSED_NOW.items():
            secrets[name] = (await made(admin, old_url, "/admin/keys", {"name": name, **entry}))[
                "key"
            ]
        bob = await made(
            admin, old_url, "/admin/keys", {"name": "bob", "provider": "openai", "api_key": REAL}
        )
    new, new_url = start_gateway(processes, keys, tmp_path / "new.jsonl", **store_env)
    async with aiohttp.ClientSession(headers=HEADERS) as admin:
        for key in (bob["key"], OPENAI_VK):  # every valid key serves
            async with admin.post(
                f"{new_url}/v1/chat/completions", json=CHAT, headers=auth(key)
            ) as response:
                assert response.status == 200
        async with admin.post(
            f"{new_url}/v1/chat/completions", json=CHAT, headers=auth(secrets["regioned"])
        ) as response:
            assert response.status == 401  # left out
        async with admin.get(f"{new_url}/health") as response:
            left_out = (await response.json())["config"]["keys_left_out"]
        assert len(left_out) == 4, left_out  # the team, and each of the three keys
        assert any("region does not apply" in line for line in left_out)
        # Named as the admin API addresses it (a digest would not say what to DELETE).
        assert any("name 'alice ' has a space at an end" in line for line in left_out)
        # Still rolling: the previous version stores a bad key, then a good one; this one
        # leaves the first out and serves the second (it took neither, keeping the old set).
        await made(admin, old_url, "/admin/keys", {"name": "dave ", **REFUSED_NOW["alice "]})
        erin = await made(
            admin, old_url, "/admin/keys", {"name": "erin", "provider": "openai", "api_key": REAL}
        )

        async def served() -> bool:
            async with admin.post(
                f"{new_url}/v1/chat/completions", json=CHAT, headers=auth(erin["key"])
            ) as response:
                return response.status == 200

        await until(served, 15.0, "the key the previous version made, served by this one")
        async with admin.delete(f"{new_url}/admin/keys/{quote('dave ')}") as r:
            assert r.status == 204, await r.text()
        # A new change is checked whole, as ever: the store does not take a new bad value.
        body = {"name": "carol", "provider": "openai", "api_key": REAL, "region": "eu-west-1"}
        async with admin.post(f"{new_url}/admin/keys", json=body) as response:
            assert response.status == 422
        # The store repaired through the admin API, key by key.
        async with admin.patch(f"{new_url}/admin/keys/regioned", json={"region": None}) as r:
            assert r.status == 200, await r.text()
        async with admin.patch(f"{new_url}/admin/keys/opsy", json={"team": None}) as r:
            assert r.status == 200, await r.text()
        async with admin.delete(f"{new_url}/admin/teams/{quote('ops ')}") as r:
            assert r.status == 204, await r.text()
        async with admin.delete(f"{new_url}/admin/keys/{quote('alice ')}") as r:
            assert r.status == 204, await r.text()
        for name in ("regioned", "opsy"):
            async with admin.post(
                f"{new_url}/v1/chat/completions", json=CHAT, headers=auth(secrets[name])
            ) as response:
                assert response.status == 200
        async with admin.get(f"{new_url}/health") as response:
            assert (await response.json())["config"]["keys_left_out"] == []
    new.send_signal(signal.SIGTERM)
    _, said = new.communicate(timeout=20)
    lines = [line for line in said.splitlines() if "left out" in line]
    assert len(lines) == 5, said  # one line each, at start, and dave's when it came
    assert REAL not in said and all(secret not in said for secret in secrets.values())
    assert old.poll() is None and os.path.exists(previous / "gateway.py")


def stored(redis_url: str, document: dict[str, Any], secret: str = STORE_SECRET) -> None:
    """The store filled as an instance with `secret` fills it."""
    client = redis.Redis.from_url(redis_url)
    try:
        client.set(DOCUMENT, fernet(secret).encrypt(json.dumps(document).encode()))
        client.incr(VERSION)
    finally:
        client.close()


def test_check_lists_what_the_redis_store_holds_that_this_version_leaves_out(
    tmp_path: Path,
    redis_url: str,
    store_env: dict[str, str],
) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(keys_document("http://127.0.0.1:9")))
    document = keys_document("http://127.0.0.1:9")
    document["teams"] = {"ops ": {}}
    document["virtual_keys"].update(
        {
            "vk-made-by-the-previous-one-1": {"name": "alice ", **REFUSED_NOW["alice "]},
            "vk-made-by-the-previous-one-2": {"name": "regioned", **REFUSED_NOW["regioned"]},
        }
    )
    stored(redis_url, document)
    result = refused({**store_env, "KEYS_FILE_PATH": str(keys)}, "--check")
    assert result.returncode == 0, result.stderr
    left_out = [line for line in result.stderr.splitlines() if "left out" in line]
    assert len(left_out) == 3, result.stderr  # the team and the two keys, one line each
    assert any("region does not apply to provider 'openai'" in line for line in left_out)
    assert "vk-made-by" not in result.stderr


def test_check_says_the_start_fails_on_a_store_under_another_secret(
    tmp_path: Path,
    redis_url: str,
    store_env: dict[str, str],
) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(keys_document("http://127.0.0.1:9")))
    stored(redis_url, keys_document("http://127.0.0.1:9"), "another-store-secret-0123456789")
    result = refused({**store_env, "KEYS_FILE_PATH": str(keys)}, "--check")
    assert result.returncode == 2, result.stderr
    assert "cannot be decrypted with this KEYS_STORE_SECRET" in result.stderr


# A rolling deploy: quotas in one Redis, counted by the previous version and this one at
# once. "hello" is 2 tokens by the estimate; with max_tokens 10 a request reserves 12 tokens
# and the fake answers 1 + 8 = 9; every token costs $0.0001 (PRICES).
ROLLING_CHAT = chat("hello", max_tokens=10)
ROLLING_ANSWER = {"x-fake-chunks": "8"}
ROLLING_PRICES = {"openai": {"*": {"input_mtok": 100, "output_mtok": 100}}}
ROLLING_LIMITS = {
    "windowed": {"quota": {"requests": 40, "window_seconds": 3600}},
    "tokens": {"quota": {"requests": 1000, "tokens": 100, "window_seconds": 3600}},
    "budgeted": {"budget": {"usd": 0.01, "window_seconds": 3600}},
}


def rolling_secret(name: str) -> str:
    return f"vk_test_rolling_{name}_5e6f7a8b"


async def test_the_previous_and_this_version_share_quotas_exactly_during_a_rolling_deploy(
    processes: Processes, tmp_path: Path, previous: Path, fake_base: str, redis_url: str
) -> None:
    document = keys_document(fake_base)
    document["teams"] = {"crew": {"quota": {"requests": 30, "window_seconds": 3600}}}
    for name, limits in {**ROLLING_LIMITS, "crew-member": {"team": "crew"}}.items():
        for copy in ("", "-alone"):  # the copy alone: the same limits counted by this version only
            document["virtual_keys"][rolling_secret(name + copy)] = {
                "provider": "openai",
                "api_key": f"sk-rolling-{name}{copy}-123456",
                "name": name + copy,
                **limits,
            }
    document["teams"]["crew-alone"] = document["teams"]["crew"]
    document["virtual_keys"][rolling_secret("crew-member-alone")]["team"] = "crew-alone"
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(document))
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps(ROLLING_PRICES))
    env = {"REDIS_URL": redis_url, "PRICES_FILE": str(prices), "ADMIN_TOKEN": ADMIN}
    old, old_url = start_previous(processes, previous, keys, tmp_path / "old.jsonl", **env)
    new, new_url = start_gateway(processes, keys, tmp_path / "new.jsonl", **env)
    async with aiohttp.ClientSession() as session:

        async def one(name: str, url: str) -> int:
            headers = {**auth(rolling_secret(name)), **ROLLING_ANSWER}
            async with session.post(
                f"{url}/v1/chat/completions", json=ROLLING_CHAT, headers=headers
            ) as response:
                await response.read()
                return response.status

        # At once, alternating: the request windows (key and team) hold exactly.
        for name, limit in (("windowed", 40), ("crew-member", 30)):
            statuses = await asyncio.gather(
                *(one(name, (old_url, new_url)[n % 2]) for n in range(limit + 20))
            )
            assert statuses.count(200) == limit and statuses.count(429) == 20, (name, statuses)

        async def usage(name: str, url: str) -> dict[str, Any]:
            async with session.get(f"{url}/usage", headers=auth(rolling_secret(name))) as r:
                return await r.json()  # type: ignore[no-any-return]

        async def settled(name: str) -> bool:  # its answer charged: nothing reserved
            view = await usage(name, new_url)
            return not view["tokens"]["reserved"] and not view.get("budget", {}).get("reserved_usd")

        async def one_settled(name: str, url: str) -> int:
            status = await one(name, url)
            await until(lambda: settled(name), 15.0, f"{name}'s answer charged")
            return status

        flushed = redis.Redis.from_url(redis_url)  # both scripts forgotten: each loads its own
        try:
            flushed.script_flush()
        finally:
            flushed.close()
        # One at a time, alternating: tokens and budget admit as many as this version alone.
        for name in ("tokens", "budgeted"):
            shared = [await one_settled(name, (old_url, new_url)[n % 2]) for n in range(20)]
            alone = [await one_settled(f"{name}-alone", new_url) for n in range(20)]
            assert shared == alone and 200 in shared and 429 in shared, (name, f"{shared} {alone}")
        for name in ("windowed", "tokens", "budgeted"):  # both read the same windows
            views = [await usage(name, url) for url in (old_url, new_url)]
            read = [
                (v["requests"]["used"], v["tokens"]["used"], v.get("budget", {}).get("spent_usd"))
                for v in views
            ]
            assert read[0] == read[1], (name, read)
    said = []
    for process in (old, new):
        process.send_signal(signal.SIGTERM)
        said.append(process.communicate(timeout=20)[1])
    for log in said:
        assert "Traceback" not in log and "NOSCRIPT" not in log and "ERROR" not in log, log
