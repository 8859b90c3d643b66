"""The admin API's writes with KEYS_STORE=file: keys and teams created, changed, rotated and
deleted at run time, keys.json rewritten atomically, every change checked as at start."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from proxy.app import CACHE, KEY_RING, QUOTA, build_app, load_keys
from proxy.settings import Settings
from tests.conftest import LIMITED_VK, OPENAI_VK, SECRETS, assert_openai_error, auth
from tests.support.clock import Clock
from tests.support.fake_provider import FakeState
from tests.support.polling import until

TOKEN = "admin-token-for-writes-0123456789"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
REAL = "sk-real-created-through-the-api-42"

Make = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def clock() -> Clock:
    return Clock(1_800_000_000.0)  # Unix seconds: a grace ends at a wall-clock time


@pytest.fixture
def admin_gateway(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    settings: Callable[..., Settings],
    clock: Clock,
) -> Make:
    async def make(**env: str) -> TestClient:
        app = build_app(settings(ADMIN_TOKEN=TOKEN, **env), key_clock=clock)
        return await aiohttp_client(app)

    return make


async def create(gateway: TestClient, **fields: Any) -> dict[str, Any]:
    body = {"provider": "openai", "api_key": REAL, **fields}
    response = await gateway.post("/admin/keys", json=body, headers=ADMIN)
    assert response.status == 201, await response.text()
    return dict(await response.json())


async def chat(gateway: TestClient, key: str) -> int:
    return (await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(key))).status


async def test_create_use_rotate_with_grace_then_revoke(
    admin_gateway: Make, keys_file: Path, clock: Clock, records: Callable[..., Any]
) -> None:
    gateway = await admin_gateway()
    made = await create(gateway, name="alice", quota={"requests": 5})
    first = made["key"]
    assert made["name"] == "alice" and first.startswith("vk-") and len(first) >= 40
    assert await chat(gateway, first) == 200
    written = keys_file.read_text()
    assert first not in written and REAL in written  # keys.json keeps the key as its digest
    rotated = await gateway.post(
        "/admin/keys/alice/rotate", json={"grace_seconds": 60}, headers=ADMIN
    )
    assert rotated.status == 201
    second = (await rotated.json())["key"]
    assert second != first
    assert await chat(gateway, first) == 200  # in its grace
    assert await chat(gateway, second) == 200
    clock.advance(61)
    assert await chat(gateway, first) == 401  # grace over
    assert await chat(gateway, second) == 200
    deleted = await gateway.delete("/admin/keys/alice", headers=ADMIN)
    assert deleted.status == 204
    assert await chat(gateway, second) == 401
    lines = await records(9)
    audits = [line["audit"] for line in lines if "audit" in line]
    assert [a["action"] for a in audits] == ["key.create", "key.rotate", "key.delete"]
    assert audits[0]["fields"] == ["api_key", "provider", "quota"]
    assert all(a["who"].startswith("admin-token:") and a["name"] == "alice" for a in audits)
    text = json.dumps(lines)
    for secret in (first, second, REAL, TOKEN):
        assert secret not in text


async def test_a_rotation_ends_the_grace_of_the_one_before(admin_gateway: Make) -> None:
    gateway = await admin_gateway()
    first = (await create(gateway, name="bob"))["key"]
    keys = [first]
    for _ in range(2):
        response = await gateway.post(
            "/admin/keys/bob/rotate", json={"grace_seconds": 600}, headers=ADMIN
        )
        keys.append((await response.json())["key"])
    assert [await chat(gateway, key) for key in keys] == [401, 200, 200]


async def test_a_rotation_without_grace_revokes_the_old_key_at_once(admin_gateway: Make) -> None:
    gateway = await admin_gateway()
    first = (await create(gateway, name="carol"))["key"]
    response = await gateway.post(
        "/admin/keys/carol/rotate", json={"grace_seconds": 0}, headers=ADMIN
    )
    assert response.status == 201 and (await response.json())["previous_key_expires_at"] is None
    assert await chat(gateway, first) == 401
    missing = await gateway.post("/admin/keys/carol/rotate", json={}, headers=ADMIN)
    assert missing.status == 400 and "grace_seconds" in (await missing.json())["error"]["message"]


async def test_a_digest_presented_as_a_key_opens_nothing(
    admin_gateway: Make, keys_file: Path
) -> None:
    gateway = await admin_gateway()
    await create(gateway, name="dave")
    document = json.loads(keys_file.read_text())
    written = next(k for k, v in document["virtual_keys"].items() if v.get("name") == "dave")
    assert written.startswith("sha256:")
    for presented in (written, written.removeprefix("sha256:")):
        assert await chat(gateway, presented) == 401


async def test_a_given_key_must_be_long_enough_and_unused(admin_gateway: Make) -> None:
    gateway = await admin_gateway()
    weak = await gateway.post(
        "/admin/keys",
        json={"name": "e", "key": "short-key", "provider": "openai", "api_key": REAL},
        headers=ADMIN,
    )
    assert weak.status == 400
    assert_openai_error(await weak.json(), "weak_key")
    for unprintable in ("vk-given\u2028by-the-operator-01", "vk-given by-the-operator-0001"):
        refused = await gateway.post(
            "/admin/keys",
            json={"name": "e", "key": unprintable, "provider": "openai", "api_key": REAL},
            headers=ADMIN,
        )
        assert_openai_error(await refused.json(), "weak_key")
    given = "vk-given-by-the-operator-000001"
    assert (await create(gateway, name="erin", key=given))["key"] == given
    assert await chat(gateway, given) == 200
    taken = await gateway.post(
        "/admin/keys",
        json={"name": "frank", "key": OPENAI_VK, "provider": "openai", "api_key": REAL},
        headers=ADMIN,
    )
    assert taken.status == 409


async def test_a_key_still_in_its_grace_cannot_be_given_to_another_key(
    admin_gateway: Make, keys_file: Path
) -> None:
    gateway = await admin_gateway()
    given = "vk-given-then-rotated-00000001"
    await create(gateway, name="grace", key=given)
    rotated = await gateway.post(
        "/admin/keys/grace/rotate", json={"grace_seconds": 600}, headers=ADMIN
    )
    assert rotated.status == 201
    taken = await gateway.post(
        "/admin/keys",
        json={"name": "thief", "key": given, "provider": "openai", "api_key": REAL},
        headers=ADMIN,
    )
    assert taken.status == 409
    assert_openai_error(await taken.json(), "key_exists")
    other = (await create(gateway, name="other"))["key"]
    rotate_onto = await gateway.post(
        "/admin/keys/other/rotate", json={"grace_seconds": 0, "key": given}, headers=ADMIN
    )
    assert rotate_onto.status == 409
    assert await chat(gateway, other) == 200
    document = json.loads(keys_file.read_text())
    assert "thief" not in {entry.get("name") for entry in document["virtual_keys"].values()}


async def test_changes_are_checked_as_at_start(admin_gateway: Make, keys_file: Path) -> None:
    gateway = await admin_gateway()
    before = keys_file.read_bytes()
    cases = [
        (
            {"name": "g", "provider": "openai", "api_key": REAL, "qouta": {}},
            400,
            "'qouta' is not a key field",
        ),
        (
            {"name": "g", "provider": "openai", "api_key": REAL, "quota": {"requests": 0}},
            422,
            "quota.requests must be a positive integer",
        ),
        ({"name": "g", "provider": "nowhere", "api_key": REAL}, 422, "nowhere"),
        ({"name": "limited", "provider": "openai", "api_key": REAL}, 409, "exists"),
        ({"provider": "openai", "api_key": REAL}, 400, "name"),
        (
            {"name": "g", "provider": "openai", "api_key": REAL, "created_at": "x"},
            400,
            "set by the gateway",
        ),
    ]
    for body, status, words in cases:
        response = await gateway.post("/admin/keys", json=body, headers=ADMIN)
        assert response.status == status, (body, await response.text())
        message = (await response.json())["error"]["message"]
        assert words in message and "\n" not in message and REAL not in message
    patched = await gateway.patch(
        "/admin/keys/limited", json={"quota": {"reqests": 3}}, headers=ADMIN
    )
    assert patched.status == 400
    assert "'quota.reqests'" in (await patched.json())["error"]["message"]
    renamed = await gateway.patch("/admin/keys/limited", json={"name": "x"}, headers=ADMIN)
    assert renamed.status == 400
    missing = await gateway.patch("/admin/keys/nobody", json={"quota": None}, headers=ADMIN)
    assert missing.status == 404
    assert (await gateway.delete("/admin/keys/nobody", headers=ADMIN)).status == 404
    assert keys_file.read_bytes() == before


async def test_a_name_with_a_control_character_is_refused_with_400_naming_the_field(
    admin_gateway: Make, keys_file: Path
) -> None:
    """A NUL, line break, tab, escape or DEL in a key's or a team's name is refused, by the
    rule that keeps them out of a real key; the file is not touched."""
    gateway = await admin_gateway()
    before = keys_file.read_bytes()
    names = ("nul\x00byte", "two\nlines", "a\ttab", "\x1b[31mred", "del\x7f", "a\u2028b", "c\x85d")
    for name in names:
        for path, body in (
            ("/admin/keys", {"name": name, "provider": "openai", "api_key": REAL}),
            ("/admin/teams", {"name": name}),
        ):
            response = await gateway.post(path, json=body, headers=ADMIN)
            assert response.status == 400, (path, name, await response.text())
            error = await response.json()
            assert_openai_error(error, "invalid_name")
            message = error["error"]["message"]
            assert "'name'" in message and "control character" in message
            assert name not in message and "\n" not in message
    assert keys_file.read_bytes() == before
    listed = await (await gateway.get("/admin/keys", headers=ADMIN)).json()
    assert not {key["name"] for key in listed["keys"]} & set(names)
    assert (await create(gateway, name="plain name, é and all"))["name"] == "plain name, é and all"
    for padded in ("alice ", " bob"):  # another name than alice's, shown alike
        for path, body in (
            ("/admin/keys", {"name": padded, "provider": "openai", "api_key": REAL}),
            ("/admin/teams", {"name": padded}),
        ):
            response = await gateway.post(path, json=body, headers=ADMIN)
            assert_openai_error(await response.json(), "invalid_name")
            assert "space at an end" in (await response.json())["error"]["message"]


async def test_a_team_named_with_a_key_is_refused_not_echoing_it(
    admin_gateway: Make, keys_file: Path
) -> None:
    """A team created with a virtual or a real key of the file as its name (pasted into the
    wrong field) was taken: its keys' log lines and the team label of its metrics showed the
    key whole. Refused (422, as a key so named), the key masked in the message; the file is
    not touched."""
    from tests.conftest import OPENAI_REAL

    gateway = await admin_gateway()
    before = keys_file.read_bytes()
    for name in (OPENAI_VK, OPENAI_REAL):
        response = await gateway.post("/admin/teams", json={"name": name}, headers=ADMIN)
        assert response.status == 422, await response.text()
        text = await response.text()
        assert_openai_error(await response.json(), "invalid_key_settings")
        assert "name is a key of the file" in text
        assert not [secret for secret in SECRETS if secret in text]
    assert keys_file.read_bytes() == before
    metrics = await (await gateway.get("/metrics")).text()
    assert not [secret for secret in SECRETS if secret in metrics]


async def test_a_cache_scope_that_is_a_key_is_refused_not_shown(
    admin_gateway: Make, keys_file: Path
) -> None:
    """A key created with a virtual or a real key of the file as its cache scope (pasted
    into the wrong field, or 'the key' taken literally) was taken, and the scope is shown
    whole: GET /admin/keys and the /usage of every key of that scope showed another key's
    virtual key (or a real key). Refused (422), the scope not quoted; the file is not
    touched."""
    from tests.conftest import OPENAI_REAL

    gateway = await admin_gateway()
    before = keys_file.read_bytes()
    for scope in (OPENAI_VK, OPENAI_REAL):
        body = {"name": "scoped", "provider": "openai", "api_key": REAL}
        body["cache"] = {"ttl_seconds": 60, "scope": scope}
        response = await gateway.post("/admin/keys", json=body, headers=ADMIN)
        assert response.status == 422, await response.text()
        text = await response.text()
        assert_openai_error(await response.json(), "invalid_key_settings")
        assert "cache.scope is a key of the file" in text
        assert not [secret for secret in SECRETS if secret in text]
    assert keys_file.read_bytes() == before
    listing = await (await gateway.get("/admin/keys", headers=ADMIN)).text()
    assert not [secret for secret in SECRETS if secret in listing]


@pytest.mark.parametrize(
    "field",
    ["model", "fallbacks", "routes", "allowed_models", "model_quotas"],
)
async def test_a_model_that_is_a_key_is_refused_not_shown(
    admin_gateway: Make, keys_file: Path, field: str
) -> None:
    """A key created with a virtual or a real key of the file as a model or a model pattern
    (pasted into the wrong field) was taken: a target's model is in its name, which the
    unauthenticated /health lists (and the log's attempts and the metrics carry); the
    patterns are shown by GET /admin/keys, a model quota's on /usage too. Refused (422),
    the value not quoted; the file is not touched."""
    from tests.conftest import OPENAI_REAL

    gateway = await admin_gateway()
    before = keys_file.read_bytes()
    for secret in (OPENAI_VK, OPENAI_REAL):
        body: dict[str, Any] = {"name": "modelled", "provider": "openai", "api_key": REAL}
        body.update(
            {
                "model": {"model": secret},
                "fallbacks": {
                    "fallbacks": [{"provider": "openai", "api_key": REAL, "model": secret}]
                },
                "routes": {"routes": [{"models": [secret], "provider": "openai", "api_key": REAL}]},
                "allowed_models": {"allowed_models": ["gpt-*", secret]},
                "model_quotas": {"model_quotas": [{"models": [secret], "requests": 5}]},
            }[field]
        )
        response = await gateway.post("/admin/keys", json=body, headers=ADMIN)
        assert response.status == 422, await response.text()
        text = await response.text()
        assert_openai_error(await response.json(), "invalid_key_settings")
        assert "is a key of the file" in text
        assert not [secret for secret in SECRETS if secret in text]
    assert keys_file.read_bytes() == before
    for path in ("/health", "/admin/keys"):
        shown = await (await gateway.get(path, headers=ADMIN)).text()
        assert not [secret for secret in SECRETS if secret in shown]


async def test_a_changed_key_keeps_its_window_a_recreated_one_starts_fresh(
    admin_gateway: Make, clock: Clock
) -> None:
    gateway = await admin_gateway()
    key = (await create(gateway, name="hank", quota={"requests": 2}))["key"]
    assert [await chat(gateway, key) for _ in range(2)] == [200, 200]
    assert await chat(gateway, key) == 429
    patched = await gateway.patch(
        "/admin/keys/hank", json={"quota": {"requests": 3}}, headers=ADMIN
    )
    assert patched.status == 200
    assert [await chat(gateway, key) for _ in range(2)] == [200, 429]  # 2 of 3 were used
    rotated = await gateway.post(
        "/admin/keys/hank/rotate", json={"grace_seconds": 0}, headers=ADMIN
    )
    assert await chat(gateway, (await rotated.json())["key"]) == 429  # the same window
    assert (await gateway.delete("/admin/keys/hank", headers=ADMIN)).status == 204
    clock.advance(0.001)  # created_at (part of the windows' id) is another instant
    again = (await create(gateway, name="hank", quota={"requests": 2}))["key"]
    assert await chat(gateway, again) == 200  # a new key of an old name: a new window


async def test_a_quota_lowered_then_raised_again_forgets_no_request_of_its_window(
    admin_gateway: Make,
) -> None:
    """An operator lowers a key's quota (an incident), then puts it back: the requests the
    key made in the window stay counted through both changes, in /usage and in admission."""
    gateway = await admin_gateway()
    key = (await create(gateway, name="ivy", quota={"requests": 5}))["key"]
    assert [await chat(gateway, key) for _ in range(4)] == [200] * 4

    async def quota(requests: int) -> dict[str, Any]:
        change = {"quota": {"requests": requests}}
        response = await gateway.patch("/admin/keys/ivy", json=change, headers=ADMIN)
        assert response.status == 200
        usage = await (await gateway.get("/usage", headers=auth(key))).json()
        return dict(usage["requests"])

    lowered = await quota(2)
    assert (lowered["used"], lowered["remaining"]) == (4, 0), "requests forgotten at a lower quota"
    assert await chat(gateway, key) == 429
    raised = await quota(6)
    assert (raised["used"], raised["remaining"]) == (4, 2), "requests forgotten at a lower quota"
    assert [await chat(gateway, key) for _ in range(3)] == [200, 200, 429]


async def test_patch_changes_limits_and_models_idempotently(
    admin_gateway: Make, keys_file: Path
) -> None:
    gateway = await admin_gateway()
    change = {"allowed_models": ["gpt-4o"], "quota": None}
    for _ in range(2):
        response = await gateway.patch("/admin/keys/limited", json=change, headers=ADMIN)
        assert response.status == 200
    written = keys_file.read_bytes()
    again = await gateway.patch("/admin/keys/limited", json=change, headers=ADMIN)
    assert again.status == 200 and keys_file.read_bytes() == written
    response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(LIMITED_VK))
    assert response.status == 403  # gpt-4o-mini is no longer allowed


async def test_teams_are_created_changed_and_deleted(admin_gateway: Make) -> None:
    gateway = await admin_gateway()
    made = await gateway.post(
        "/admin/teams", json={"name": "research", "quota": {"requests": 1}}, headers=ADMIN
    )
    assert made.status == 201
    assert (
        await gateway.post("/admin/teams", json={"name": "research"}, headers=ADMIN)
    ).status == 409
    key = (await create(gateway, name="ivy", team="research"))["key"]
    assert [await chat(gateway, key) for _ in range(2)] == [200, 429]
    changed = await gateway.patch(
        "/admin/teams/research", json={"quota": {"requests": 3}}, headers=ADMIN
    )
    assert changed.status == 200 and await chat(gateway, key) == 200
    busy = await gateway.delete("/admin/teams/research", headers=ADMIN)
    assert busy.status == 409 and "ivy" in (await busy.json())["error"]["message"]
    bad = await gateway.patch(
        "/admin/teams/research", json={"quota": {"requests": -1}}, headers=ADMIN
    )
    assert bad.status == 422
    unknown = await gateway.patch("/admin/teams/research", json={"members": []}, headers=ADMIN)
    assert unknown.status == 400 and "'members'" in (await unknown.json())["error"]["message"]
    assert (await gateway.delete("/admin/keys/ivy", headers=ADMIN)).status == 204
    assert (await gateway.delete("/admin/teams/research", headers=ADMIN)).status == 204
    teams = await (await gateway.get("/admin/teams", headers=ADMIN)).json()
    assert teams["teams"] == []


async def read_only_refusal(gateway: TestClient, name: str) -> str:
    """The message of the 409 keys_store_read_only that creating key `name` gets."""
    response = await gateway.post(
        "/admin/keys", json={"name": name, "provider": "openai", "api_key": REAL}, headers=ADMIN
    )
    assert response.status == 409
    body = await response.json()
    assert_openai_error(body, "keys_store_read_only")
    message: str = body["error"]["message"]
    return message


async def test_a_read_only_keys_file_gives_409_and_changes_nothing(
    admin_gateway: Make, keys_file: Path
) -> None:
    gateway = await admin_gateway()
    before = keys_file.read_bytes()
    keys_file.chmod(0o444)
    assert "KEYS_STORE=redis" in await read_only_refusal(gateway, "j")
    assert (await gateway.delete("/admin/keys/limited", headers=ADMIN)).status == 409
    assert keys_file.read_bytes() == before and await chat(gateway, LIMITED_VK) == 200


async def test_the_file_keeps_its_mode_and_is_valid_after_200_concurrent_creates(
    admin_gateway: Make, keys_file: Path
) -> None:
    keys_file.chmod(0o640)
    gateway = await admin_gateway()
    made = await asyncio.gather(*(create(gateway, name=f"user-{n:03d}") for n in range(200)))
    document = json.loads(keys_file.read_text())
    names = {entry.get("name") for entry in document["virtual_keys"].values()}
    assert {f"user-{n:03d}" for n in range(200)} <= names
    assert stat.S_IMODE(os.stat(keys_file).st_mode) == 0o640
    assert not [p for p in keys_file.parent.iterdir() if p.name.endswith(".tmp")]
    assert [await chat(gateway, m["key"]) for m in made[::40]] == [200] * 5


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
async def test_a_gateway_run_as_root_leaves_keys_json_to_its_owner(
    admin_gateway: Make, keys_file: Path
) -> None:
    # keys.json of alice (0600), a gateway run as root (sudo make run, a container's root):
    # the first change left a root-owned 0600 file that alice could no longer read or edit.
    os.chown(keys_file, 4242, 4343)
    keys_file.chmod(0o600)
    gateway = await admin_gateway()
    await create(gateway, name="kim")
    written = os.stat(keys_file)
    assert (written.st_uid, written.st_gid) == (4242, 4343)
    assert stat.S_IMODE(written.st_mode) == 0o600


async def test_a_body_arriving_in_pieces_is_read_whole(admin_gateway: Make) -> None:
    # A body that came in several reads (chunked, or segments over a real network) was cut
    # to its first read: 400 invalid_json for a good key entry.
    gateway = await admin_gateway()
    body = json.dumps({"name": "pieces", "provider": "openai", "api_key": REAL}).encode()

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 8):
            yield body[start : start + 8]
            await asyncio.sleep(0)  # each piece its own write

    response = await gateway.post("/admin/keys", data=pieces(), headers=ADMIN)
    assert response.status == 201, await response.text()
    assert await chat(gateway, (await response.json())["key"]) == 200


@pytest.mark.parametrize(
    ("method", "path", "body", "named"),
    [
        # The second quota, null, would have silently given the key the default one.
        (
            "POST",
            "/admin/keys",
            b'{"name": "twice", "provider": "openai", "api_key": "sk-real-twice-0123456789",'
            b' "quota": {"requests": 5}, "quota": null}',
            "'quota'",
        ),
        (
            "PATCH",
            "/admin/keys/limited",
            b'{"quota": {"requests": 5, "requests": 500}}',
            "'requests'",
        ),
        ("POST", "/admin/teams", b'{"name": "t", "name": "u"}', "'name'"),
    ],
)
async def test_a_field_written_twice_in_a_body_is_refused_as_in_keys_json(
    admin_gateway: Make, keys_file: Path, method: str, path: str, body: bytes, named: str
) -> None:
    # JSON keeps the last one silently, so the key was made with a limit other than the one
    # its operator read in the request; keys.json refuses a name written twice (482f997).
    gateway = await admin_gateway()
    before = keys_file.read_bytes()
    response = await gateway.request(method, path, data=body, headers=ADMIN)
    assert response.status == 400, await response.text()
    error = await response.json()
    assert_openai_error(error, "invalid_json")
    assert named in error["error"]["message"] and "twice" in error["error"]["message"]
    assert keys_file.read_bytes() == before
    empty = await gateway.post("/admin/keys/limited/rotate", headers=ADMIN)  # no body: {}
    assert_openai_error(await empty.json(), "invalid_grace")


async def test_a_provider_that_is_not_a_name_is_refused_not_a_500(
    admin_gateway: Make, keys_file: Path
) -> None:
    # An object or a list as provider (or a fallback's) answered 500 with a TypeError
    # traceback on stderr: the loader looked it up as a name.
    gateway = await admin_gateway()
    before = keys_file.read_bytes()
    for provider in (["openai"], {"name": "openai"}):
        for body in (
            {"name": "p", "provider": provider, "api_key": REAL},
            {"provider": "openai", "api_key": REAL, "fallbacks": [{"provider": provider}]},
        ):
            body = {"name": "p", **body}
            response = await gateway.post("/admin/keys", json=body, headers=ADMIN)
            assert response.status == 422, await response.text()
            error = await response.json()
            assert_openai_error(error, "invalid_key_settings")
            assert "provider must be a provider's name" in error["error"]["message"]
    assert keys_file.read_bytes() == before


async def test_a_value_nested_deeper_than_keys_json_is_written_is_refused_not_a_500(
    admin_gateway: Make, keys_file: Path
) -> None:
    # A quota nested 300 levels reads (orjson reads 1024) but cannot be written into
    # keys.json (orjson writes 255, and the file adds three): the change answered aiohttp's
    # plain-text 500, no request id, with a traceback in the log.
    gateway = await admin_gateway()
    before = keys_file.read_bytes()
    deep = b'{"a":' * 300 + b"1" + b"}" * 300
    for method, path, body in (
        ("PATCH", "/admin/keys/limited", b'{"quota": ' + deep + b"}"),
        ("POST", "/admin/keys", b'{"name": "d", "provider": "openai", "quota": ' + deep + b"}"),
        ("POST", "/admin/teams", b'{"name": "t", "quota": ' + deep + b"}"),
    ):
        response = await gateway.request(method, path, data=body, headers=ADMIN)
        assert response.status == 422, await response.text()
        error = await response.json()
        assert_openai_error(error, "invalid_key_settings")
        assert "nested too deeply" in error["error"]["message"]
    assert keys_file.read_bytes() == before


@pytest.fixture
def mounted_alone(keys_file: Path, tmp_path: Path) -> Iterator[Path]:
    """keys.json bind-mounted on its own, as `docker run -v $PWD/keys.json:/app/keys.json`
    mounts it (root and mount(8) only)."""
    source = tmp_path / "host-keys.json"
    source.write_bytes(keys_file.read_bytes())
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8)")
    mounted = subprocess.run(["mount", "--bind", str(source), str(keys_file)], check=False)
    if mounted.returncode != 0:
        pytest.skip("bind mounts are not allowed here")
    try:
        yield keys_file
    finally:
        subprocess.run(["umount", str(keys_file)], check=True)


async def test_a_keys_file_mounted_on_its_own_says_to_mount_its_folder(
    admin_gateway: Make, mounted_alone: Path
) -> None:
    # A file bind-mount cannot be renamed over (EBUSY): every change answered 409 with
    # "(Device or resource busy; a Kubernetes Secret or ConfigMap mount?)", which told a
    # Docker user neither the cause nor the way out.
    gateway = await admin_gateway()
    before = mounted_alone.read_bytes()
    assert "mount its folder" in await read_only_refusal(gateway, "m")
    assert mounted_alone.read_bytes() == before
    assert not [p for p in mounted_alone.parent.iterdir() if p.name.endswith(".tmp")]


async def test_bodies_over_the_limit_are_413_and_not_json_is_400(admin_gateway: Make) -> None:
    gateway = await admin_gateway()
    big = {"name": "k", "provider": "openai", "api_key": REAL, "pad": "x" * 70_000}
    assert (await gateway.post("/admin/keys", json=big, headers=ADMIN)).status == 413
    broken = await gateway.post("/admin/keys", data=b"{not json", headers=ADMIN)
    assert broken.status == 400
    listed = await gateway.post("/admin/keys", json=[1], headers=ADMIN)
    assert listed.status == 400


async def test_write_endpoints_need_the_token_and_failures_count_toward_the_lockout(
    admin_gateway: Make,
) -> None:
    gateway = await admin_gateway(AUTH_FAILURE_LIMIT="3")
    wrong = {"Authorization": "Bearer guess"}
    statuses = [
        (await gateway.post("/admin/keys", json={"name": "x"}, headers=wrong)).status,
        (await gateway.delete("/admin/keys/limited", headers=wrong)).status,
        (await gateway.post("/admin/keys/limited/rotate", json={}, headers=wrong)).status,
        (await gateway.get("/admin/export", headers=wrong)).status,
    ]
    assert statuses == [401, 401, 401, 429]


async def test_export_gives_keys_json_without_secrets_unless_asked(
    admin_gateway: Make, tmp_path: Path, settings: Callable[..., Settings]
) -> None:
    gateway = await admin_gateway()
    await create(gateway, name="lee")
    response = await gateway.get("/admin/export", headers=ADMIN)
    text = await response.text()
    for secret in (*SECRETS, REAL):
        assert secret not in text
    document = json.loads(text)
    assert all(k.startswith("sha256:") for k in document["virtual_keys"])
    full = await (await gateway.get("/admin/export?include_real_keys=true", headers=ADMIN)).text()
    assert REAL in full and OPENAI_VK not in full
    exported = tmp_path / "exported.json"
    exported.write_text(full)
    ring = load_keys(settings(KEYS_FILE_PATH=str(exported)), {})  # loads as keys.json does
    assert len(ring) == 7


async def test_export_redacts_a_bedrock_keys_aws_secret_and_session_token(
    admin_gateway: Make,
) -> None:
    gateway = await admin_gateway()
    secret, token = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "FwoGZXIvYXdzEXAMPLESESSIONTOKEN"
    cloud = {"provider": "bedrock", "region": "us-east-1", "aws_access_key_id": "AKIAEXAMPLE12345"}
    aws = {"aws_secret_access_key": secret, "aws_session_token": token}
    body = {"name": "bed", **cloud, **aws, "fallbacks": [{**cloud, **aws}]}
    assert (await gateway.post("/admin/keys", json=body, headers=ADMIN)).status == 201
    text = await (await gateway.get("/admin/export", headers=ADMIN)).text()
    assert secret not in text and token not in text
    (entry,) = [e for e in json.loads(text)["virtual_keys"].values() if e.get("name") == "bed"]
    assert entry["aws_secret_access_key"] == entry["fallbacks"][0]["aws_session_token"]
    assert entry["aws_secret_access_key"] == "[redacted]"
    full = await (await gateway.get("/admin/export?include_real_keys=true", headers=ADMIN)).text()
    assert secret in full and token in full


async def test_a_revoked_key_is_refused_before_the_cache_could_answer(
    admin_gateway: Make, clock: Clock
) -> None:
    gateway = await admin_gateway()
    key = (await create(gateway, name="mia", cache={"ttl_seconds": 600}))["key"]
    answers = []
    for _ in range(2):
        response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(key))
        answers.append(response.headers.get("x-llm-gateway-cache"))
    assert answers == ["miss", "hit"]
    assert (await gateway.delete("/admin/keys/mia", headers=ADMIN)).status == 204
    response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(key))
    assert response.status == 401 and "x-llm-gateway-cache" not in response.headers
    clock.advance(1)
    again = (await create(gateway, name="mia", cache={"ttl_seconds": 600}))["key"]
    response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(again))
    assert response.headers["x-llm-gateway-cache"] == "miss"  # not the deleted key's answers


async def test_a_key_written_in_keys_json_rotates_with_its_grace(
    admin_gateway: Make, keys_file: Path, clock: Clock
) -> None:
    gateway = await admin_gateway()
    response = await gateway.post(
        "/admin/keys/limited/rotate", json={"grace_seconds": 30}, headers=ADMIN
    )
    assert response.status == 201
    new = (await response.json())["key"]
    assert LIMITED_VK not in keys_file.read_text()  # the old key stays only as a digest
    assert [await chat(gateway, LIMITED_VK), await chat(gateway, new)] == [200, 200]
    clock.advance(30)
    assert [await chat(gateway, LIMITED_VK), await chat(gateway, new)] == [401, 200]
    assert await chat(gateway, new) == 429  # 3 of 3 in the window, old key and new together


async def test_a_wrong_method_names_every_method_the_path_answers(
    admin_gateway: Make,
) -> None:
    # PATCH /admin/keys said "answers GET only" with `Allow: GET`, though POST creates a key;
    # PUT /admin/keys/{name} was a 404 "No such endpoint".
    gateway = await admin_gateway()
    await create(gateway, name="alice")
    listing = await gateway.patch("/admin/keys", json={}, headers=ADMIN)
    assert listing.status == 405 and listing.headers["allow"] == "GET, HEAD, POST"
    body = await listing.json()
    assert_openai_error(body, "method_not_allowed")
    assert "GET, HEAD, POST" in body["error"]["message"]
    named = await gateway.put("/admin/teams/ml", json={}, headers=ADMIN)
    assert named.status == 405 and named.headers["allow"] == "DELETE, PATCH"
    rotate = await gateway.get("/admin/keys/alice/rotate", headers=ADMIN)
    assert rotate.status == 405 and rotate.headers["allow"] == "POST"
    assert (await gateway.get("/admin/nothing", headers=ADMIN)).status == 404


class HeldClock(Clock):
    """A clock that, once `hold` is set, stops the first thread that asks it (the store's
    write, under its lock: keys.json read, not yet written) until `go` is set."""

    def __init__(self, now: float) -> None:
        super().__init__(now)
        self.hold, self.entered, self.go = False, threading.Event(), threading.Event()

    def __call__(self) -> float:
        if self.hold and threading.current_thread() is not threading.main_thread():
            self.hold = False
            self.entered.set()
            self.go.wait(10)
        return self.now


async def test_a_change_whose_client_leaves_mid_write_still_takes_and_is_audited(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    settings: Callable[..., Settings],
    keys_file: Path,
    records: Callable[..., Any],
) -> None:
    # A DELETE whose client gave up (a timeout, Ctrl-C) while keys.json was being written:
    # the file lost the key, but aiohttp cancelled the handler before the keys were swapped
    # in, so the revoked key kept being served, no worker was told, and no audit line said so.
    clock = HeldClock(1_800_000_000.0)
    app = build_app(settings(ADMIN_TOKEN=TOKEN), key_clock=clock)
    gateway = await aiohttp_client(app, server_kwargs={"handler_cancellation": True})
    clock.hold = True
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    writer.write(
        f"DELETE /admin/keys/limited HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {TOKEN}"
        "\r\nContent-Length: 0\r\n\r\n".encode()
    )
    await writer.drain()
    assert await asyncio.to_thread(clock.entered.wait, 10)
    (connection,) = gateway.server.runner.server.connections  # type: ignore[union-attr]
    writer.close()
    await until(lambda: connection.transport is None, what="the server saw the client leave")
    clock.go.set()
    await until(lambda: LIMITED_VK not in keys_file.read_text(), what="keys.json written")

    async def refused() -> bool:
        return await chat(gateway, LIMITED_VK) == 401

    await until(refused, what="the deleted key refused")
    audits = [line["audit"] for line in await records(1) if "audit" in line]
    assert [(a["action"], a["name"]) for a in audits] == [("key.delete", "limited")]


async def test_a_key_addressed_by_its_virtual_key_is_not_echoed_but_named(
    admin_gateway: Make,
) -> None:
    # An operator revoking a leaked key knows the key, not its name: DELETE
    # /admin/keys/<the key> answered 404 "No key is named 'vk_…'" with the whole key in the
    # error body (and a bad field's 400 quoted it too).
    gateway = await admin_gateway()
    made = await create(gateway, name="leaky")
    calls = [
        ("DELETE", f"/admin/keys/{LIMITED_VK}", None),
        ("PATCH", f"/admin/keys/{LIMITED_VK}", {"grace_seconds": 1}),
        ("POST", f"/admin/keys/{made['key']}/rotate", {"grace_seconds": 0}),
        ("DELETE", f"/admin/cache?key={OPENAI_VK}", None),
    ]
    for method, path, body in calls:
        response = await gateway.request(method, path, json=body, headers=ADMIN)
        text = await response.text()
        assert response.status == 404, (path, text)
        assert_openai_error(await response.json(), "unknown_key")
        assert "virtual key" in text and not any(s in text for s in (*SECRETS, made["key"]))
    # A wrong method on such a path (GET, PUT) is a 405, whose message quoted the path, the
    # whole key in it: it names the route instead.
    for method in ("GET", "PUT"):
        wrong = await gateway.request(method, f"/admin/keys/{LIMITED_VK}/rotate", headers=ADMIN)
        text = await wrong.text()
        assert wrong.status == 405 and "/admin/keys/{name}/rotate answers POST" in text, text
        wrong = await gateway.request(method, f"/admin/keys/{LIMITED_VK}", headers=ADMIN)
        text = await wrong.text()
        assert wrong.status == 405 and "/admin/keys/{name} answers DELETE, PATCH" in text, text
        assert not any(s in text for s in SECRETS)
    listing = await gateway.get(f"/admin/keys?key={OPENAI_VK}", headers=ADMIN)
    assert listing.status == 200  # ?key= is read by /admin/cache only
    named = await gateway.delete(f"/admin/keys/{made['key']}", headers=ADMIN)
    assert "'leaky'" in (await named.json())["error"]["message"]  # the name to address
    assert await chat(gateway, made["key"]) == 200 and await chat(gateway, LIMITED_VK) == 200


async def test_answers_carrying_a_key_tell_every_cache_not_to_store_them(
    admin_gateway: Make,
) -> None:
    # The new virtual key (create, rotate) and the real keys of an export were answered
    # without Cache-Control: a browser or an intercepting proxy was free to keep them on disk.
    gateway = await admin_gateway()
    answers = [
        await gateway.post(
            "/admin/keys",
            json={"name": "kim", "provider": "openai", "api_key": REAL},
            headers=ADMIN,
        ),
        await gateway.post("/admin/keys/kim/rotate", json={"grace_seconds": 0}, headers=ADMIN),
        await gateway.get("/admin/export?include_real_keys=true", headers=ADMIN),
        await gateway.get("/admin/export", headers=ADMIN),
    ]
    for answer in answers:
        assert answer.status in (200, 201), await answer.text()
        assert answer.headers.get("cache-control") == "no-store", answer.url


async def test_a_deleted_key_leaves_no_series_and_no_totals_behind(admin_gateway: Make) -> None:
    # CI making a key per run and deleting it after: each deleted key kept its refusal
    # series on /metrics and its totals in memory for the life of the process, unreachable
    # (its /usage answers 401) and growing with every run.
    gateway = await admin_gateway()
    kept = (await create(gateway, name="kept", quota={"requests": 1}))["key"]
    gone = (await create(gateway, name="ci-run-1", quota={"requests": 1}))["key"]
    for key in (kept, gone):
        assert [await chat(gateway, key), await chat(gateway, key)] == [200, 429]
    key_id = next(key.id for key in gateway.app[KEY_RING] if key.name == "ci-run-1")
    deleted = await gateway.delete("/admin/keys/ci-run-1", headers=ADMIN)
    assert deleted.status == 204
    text = await (await gateway.get("/metrics")).text()
    assert 'llm_gateway_quota_rejections_total{key="kept"} 1.0' in text
    assert 'key="ci-run-1"' not in text
    tracker = gateway.app[QUOTA].tracker
    totals = (await tracker.report(key_id, None))["totals"]
    assert totals["requests"] == 0
    assert (await (await gateway.get("/usage", headers=auth(kept))).json())["totals"][
        "requests"
    ] == 1


async def test_a_key_deleted_while_its_request_runs_leaves_nothing_once_that_request_ends(
    admin_gateway: Make, fake: FakeState, records: Callable[..., Any]
) -> None:
    # The delete dropped the key's windows and totals, then its request still running
    # settled: that opened its window again, kept once idle as retired totals (and its
    # micro-dollar fraction) for the life of the process, unreachable (/usage 401).
    gateway = await admin_gateway()
    made = (await create(gateway, name="ci-run-2", budget={"usd": 5}))["key"]
    key_id = next(key.id for key in gateway.app[KEY_RING] if key.name == "ci-run-2")
    tracker = gateway.app[QUOTA].tracker
    nothing = await tracker.report("never-seen", None)
    running = asyncio.ensure_future(
        gateway.post("/v1/chat/completions", json=CHAT, headers={**auth(made), "x-fake-hold": "1"})
    )
    await until(lambda: len(fake.requests) == 1, what="the request at the provider")
    assert (await gateway.delete("/admin/keys/ci-run-2", headers=ADMIN)).status == 204
    fake.release.set()
    response = await running
    assert response.status == 200
    await response.read()
    lines = await records(3)  # the create, the delete, and the request once settled
    (line,) = [line for line in lines if line.get("path") == "/v1/chat/completions"]
    assert line["key"] == "ci-run-2" and line["usage"]["total_tokens"] > 0  # charged, then
    assert await tracker.report(key_id, None) == nothing  # nothing of it is kept


async def test_deleted_keys_leave_no_cache_hit_counts_behind(admin_gateway: Make) -> None:
    # Each key with a cache had its hit count kept for the life of the process, also once
    # deleted (its /usage answers 401): CI making and deleting a cached key per run grew
    # the in-memory store by an entry a run, never read again.
    gateway = await admin_gateway()
    cache = gateway.app[CACHE]
    gone = []
    for run in range(20):
        made = await create(gateway, name=f"ci-run-{run}", cache={"ttl_seconds": 600})
        for _ in range(2):  # a miss, then a hit
            assert await chat(gateway, made["key"]) == 200
            await cache.settled()  # the miss's answer is stored before the next asks
        key = next(key for key in gateway.app[KEY_RING] if key.name == f"ci-run-{run}")
        assert await cache.hits(key) == 1
        assert (await gateway.delete(f"/admin/keys/ci-run-{run}", headers=ADMIN)).status == 204
        gone.append(key)
    kept = (await create(gateway, name="kept", cache={"ttl_seconds": 600}))["key"]
    for _ in range(2):
        assert await chat(gateway, kept) == 200
        await cache.settled()
    assert [await cache.hits(key) for key in gone] == [0] * 20
    usage = await (await gateway.get("/usage", headers=auth(kept))).json()
    assert usage["cache"]["hits"] == 1


async def test_deleted_teams_leave_no_series_behind(admin_gateway: Make) -> None:
    # A team made per project and deleted after kept its in-flight gauge and its refusal
    # series on /metrics for the life of the process, as a deleted key's did before.
    gateway = await admin_gateway()
    for run in range(5):
        team = {"name": f"proj-{run}", "quota": {"requests": 1}, "max_in_flight": 4}
        assert (await gateway.post("/admin/teams", json=team, headers=ADMIN)).status == 201
        key = (await create(gateway, name=f"member-{run}", team=f"proj-{run}"))["key"]
        assert [await chat(gateway, key) for _ in range(2)] == [200, 429]
        text = await (await gateway.get("/metrics")).text()
        assert f'llm_gateway_team_requests_in_flight{{team="proj-{run}"}} 0.0' in text
        assert f'team="proj-{run}"}} 1.0' in text  # its refusal
        assert (await gateway.delete(f"/admin/keys/member-{run}", headers=ADMIN)).status == 204
        assert (await gateway.delete(f"/admin/teams/proj-{run}", headers=ADMIN)).status == 204
    text = await (await gateway.get("/metrics")).text()
    assert [line for line in text.splitlines() if 'team="proj-' in line] == []


@pytest.mark.parametrize(
    ("body", "said"),
    [
        (b'{"name": "comma", "provider": "openai",}', "trailing comma"),
        (b'{"name": "huge", "grace_seconds": 1e400}', "line 1 column"),
        (b'{"name": "nan", "quota": {"requests": NaN}}', "line 1 column"),
        (b'{"name": "cut", "provider": "openai"', "line 1 column"),
    ],
)
async def test_a_body_that_is_not_json_is_told_where_it_breaks(
    admin_gateway: Make, keys_file: Path, body: bytes, said: str
) -> None:
    # An object written by hand with a trailing comma (or a number JSON cannot hold) was
    # told 'The body must be a JSON object.': the operator had sent an object, and was not
    # told what was wrong nor where. Said as keys.json's own refusal says it.
    gateway = await admin_gateway()
    before = keys_file.read_bytes()
    response = await gateway.post("/admin/keys", data=body, headers=ADMIN)
    assert response.status == 400, await response.text()
    error = await response.json()
    assert_openai_error(error, "invalid_json")
    assert error["error"]["message"].startswith("The body is not valid JSON"), error
    assert said in error["error"]["message"], error
    assert keys_file.read_bytes() == before


async def test_a_compressed_body_is_read_as_the_proxied_ones_are(
    admin_gateway: Make, keys_file: Path
) -> None:
    # A body sent with Content-Encoding (gzip, as a client compressing its requests sends
    # it) was read as its compressed bytes: 400 'The body must be a JSON object.' for a good
    # key entry. It is decoded as a proxied body is (bounded), or refused saying why.
    import gzip

    gateway = await admin_gateway()
    body = {"name": "zipped", "provider": "openai", "api_key": REAL}
    headers = {**ADMIN, "Content-Type": "application/json", "Content-Encoding": "gzip"}
    compressed = gzip.compress(json.dumps(body).encode())
    response = await gateway.post("/admin/keys", data=compressed, headers=headers)
    assert response.status == 201, await response.text()
    assert await chat(gateway, (await response.json())["key"]) == 200
    # A bomb: small compressed, past the admin limit decoded.
    bomb = gzip.compress(b'{"name": "' + b"a" * 200_000 + b'"}')
    response = await gateway.post("/admin/keys", data=bomb, headers=headers)
    assert response.status == 413, await response.text()
    unknown = {**headers, "Content-Encoding": "lzma"}
    response = await gateway.post("/admin/keys", data=compressed, headers=unknown)
    assert response.status == 415, await response.text()
    before = keys_file.read_bytes()
    response = await gateway.post("/admin/keys", data=b"not gzip", headers=headers)
    assert response.status == 400, await response.text()
    assert_openai_error(await response.json(), "invalid_body")
    assert keys_file.read_bytes() == before


@pytest.mark.parametrize(
    "query", ["include_real_keys=yes", "include_real_keys=on", "include_real_key=true"]
)
async def test_an_export_asked_for_in_words_it_does_not_read_is_refused(
    admin_gateway: Make, query: str
) -> None:
    # `?include_real_keys=yes` (or a misspelt parameter) answered 200 with every real key
    # '[redacted]', taken for the backup it was asked for; restored, every key's requests
    # went to the provider with '[redacted]' as the key. Now 400 naming what it reads.
    gateway = await admin_gateway()
    response = await gateway.get(f"/admin/export?{query}", headers=ADMIN)
    assert response.status == 400, await response.text()
    error = await response.json()
    assert_openai_error(error, "invalid_request")
    assert "include_real_keys" in error["error"]["message"]
    for said in ("true", "false", "1", "0", ""):
        answered = await gateway.get(f"/admin/export?include_real_keys={said}", headers=ADMIN)
        assert answered.status == 200, (said, await answered.text())


async def test_a_redacted_export_restored_as_keys_json_is_refused_naming_the_field(
    admin_gateway: Make, tmp_path: Path, settings: Callable[..., Settings]
) -> None:
    # The export without include_real_keys=true loads as keys.json, and was taken as one: a
    # gateway restored from it started, and sent '[redacted]' to each provider as the real
    # key (every request a provider's 401). Refused at load, naming the key and the field.
    from proxy.keys.fields import KeysFileError

    gateway = await admin_gateway()
    await create(gateway, name="lee")
    cloud = {"provider": "bedrock", "region": "us-east-1", "aws_access_key_id": "AKIAEXAMPLE12345"}
    bed = {"name": "bed", **cloud, "aws_secret_access_key": "wJalrXUtnFEMI/K7MDENG/bPxRfiCY"}
    assert (await gateway.post("/admin/keys", json=bed, headers=ADMIN)).status == 201
    redacted = tmp_path / "redacted.json"
    redacted.write_text(await (await gateway.get("/admin/export", headers=ADMIN)).text())
    with pytest.raises(KeysFileError) as refused:
        load_keys(settings(KEYS_FILE_PATH=str(redacted)), {})
    said = refused.value.problems
    assert any("key 'lee': api_key is '[redacted]'" in line for line in said), said
    assert any("key 'bed': aws_secret_access_key is '[redacted]'" in line for line in said), said
    assert all("include_real_keys=true" in line for line in said if "[redacted]" in line), said
    # Nor can the admin API be given one.
    body = {"name": "again", "provider": "openai", "api_key": "[redacted]"}
    response = await gateway.post("/admin/keys", json=body, headers=ADMIN)
    assert response.status == 422, await response.text()
    assert "[redacted]" in (await response.json())["error"]["message"]
