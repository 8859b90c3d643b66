"""Teams, requests in flight and per-model windows, as clients see them through a gateway.

Every limit that applies to a request (its key's, its team's, its model group's) admits
it at once or not at all; a refusal names the limit in the endpoint's dialect.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from proxy.app import QUOTA, build_app
from proxy.settings import Settings
from tests.conftest import assert_anthropic_error, assert_openai_error, auth, keys_document
from tests.support.bodies import MESSAGES, chat
from tests.support.polling import until

CHAT = chat("hello")
STREAM = {**CHAT, "stream": True}
MEMBERS = [f"vk_test_member_{n}_0a1b2c3d" for n in range(3)]
CLAUDE_MEMBER = "vk_test_member_claude_4e5f6a"
LONER = "vk_test_loner_7b8c9d0e1f"
ADMIN = "admin-token-for-teams-tests"


@pytest.fixture
def teams_gateway(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    tmp_path: Path,
    fake_base: str,
    log_path: Path,
) -> Callable[..., Awaitable[TestClient]]:
    """A gateway whose team 'research' has `team` limits; MEMBERS (OpenAI) and CLAUDE_MEMBER
    (Anthropic) are in it with `member` fields each, LONER is in no team."""

    async def make(team: dict[str, Any], member: dict[str, Any] | None = None) -> TestClient:
        document = keys_document(fake_base)
        document["teams"] = {"research": team}
        for n, secret in enumerate(MEMBERS):
            document["virtual_keys"][secret] = {
                "provider": "openai",
                "api_key": f"sk-member-real-{n}-123456",
                "name": f"member-{n}",
                "team": "research",
                **(member or {}),
            }
        document["virtual_keys"][CLAUDE_MEMBER] = {
            "provider": "anthropic",
            "api_key": "sk-ant-member-real-9876",
            "name": "member-claude",
            "team": "research",
        }
        document["virtual_keys"][LONER] = {
            "provider": "openai",
            "api_key": "sk-loner-real-5555555",
            "name": "loner",
        }
        path = tmp_path / "teams-keys.json"
        path.write_text(json.dumps(document))
        settings = Settings.from_env(
            {
                "KEYS_FILE_PATH": str(path),
                "LOG_TO_FILE": "true",
                "LOG_FILE_PATH": str(log_path),
                "ADMIN_TOKEN": ADMIN,
            }
        )
        return await aiohttp_client(
            build_app(settings), server_kwargs={"handler_cancellation": True}
        )

    return make


async def hold(gateway: TestClient, secret: str) -> aiohttp.ClientResponse:
    """A stream the fake provider leaves hanging mid-way: its slot is held until it closes."""
    return await gateway.post(
        "/v1/chat/completions", json=STREAM, headers={**auth(secret), "x-fake-hang": "midstream"}
    )


async def chat(gateway: TestClient, secret: str, body: Any = CHAT, **headers: str) -> int:
    response = await gateway.post(
        "/v1/chat/completions", json=body, headers={**auth(secret), **headers}
    )
    await response.read()
    return response.status


async def test_a_team_window_holds_across_its_members_and_names_the_team(
    teams_gateway: Any, fake: Any
) -> None:
    gateway = await teams_gateway({"quota": {"requests": 5, "window_seconds": 3600}})
    statuses = await asyncio.gather(*(chat(gateway, MEMBERS[n % 3]) for n in range(30)))
    assert statuses.count(200) == 5 and statuses.count(429) == 25
    assert len(fake.requests) == 5
    refused = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(MEMBERS[0]))
    body = await refused.json()
    assert_openai_error(body, "rate_limit_exceeded")
    assert "team 'research': 5 requests per hour" in body["error"]["message"]
    assert 3500 < int(refused.headers["retry-after"]) <= 3600
    # The Anthropic member is refused by the same team window, in its own dialect.
    answer = await gateway.post(
        "/v1/messages",
        json=MESSAGES,
        headers={"x-api-key": CLAUDE_MEMBER, "anthropic-version": "2023-06-01"},
    )
    assert answer.status == 429
    message = await answer.json()
    assert_anthropic_error(message, "rate_limit_error")
    assert "team 'research': 5 requests per hour" in message["error"]["message"]
    # A key outside the team is not counted there, whatever header it sends.
    assert await chat(gateway, LONER, **{"x-team": "research"}) == 200


async def test_a_request_refused_by_its_team_is_not_counted_in_its_key_window(
    teams_gateway: Any,
) -> None:
    gateway = await teams_gateway(
        {"quota": {"requests": 2, "window_seconds": 3600}},
        {"quota": {"requests": 10, "window_seconds": 3600}},
    )
    assert [await chat(gateway, MEMBERS[0]) for _ in range(4)] == [200, 200, 429, 429]
    usage = await (await gateway.get("/usage", headers=auth(MEMBERS[0]))).json()
    assert usage["requests"]["used"] == 2  # not 4: refused in one scope, counted in none
    assert usage["team"]["name"] == "research"
    assert usage["team"]["requests"] == {
        "used": 2,
        "limit": 2,
        "remaining": 0,
        "reset_seconds": usage["team"]["requests"]["reset_seconds"],
    }


async def test_max_in_flight_caps_the_streams_at_the_provider(
    teams_gateway: Any, fake: Any
) -> None:
    gateway = await teams_gateway({"max_in_flight": 3})
    slow = {"x-fake-chunks": "5", "x-fake-delay-ms": "40"}
    statuses = await asyncio.gather(
        *(chat(gateway, MEMBERS[n % 3], STREAM, **slow) for n in range(12))
    )
    assert fake.open_peak <= 3
    assert statuses.count(200) >= 3 and statuses.count(200) + statuses.count(429) == 12
    refused = await hold(gateway, MEMBERS[0])
    assert refused.status == 200  # every slot is free again once the streams ended
    refused.close()


async def test_a_full_max_in_flight_answers_429_with_retry_after_1_in_both_dialects(
    teams_gateway: Any, fake: Any
) -> None:
    gateway = await teams_gateway({"max_in_flight": 1})
    holder = await hold(gateway, MEMBERS[0])
    assert holder.status == 200
    refused = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(MEMBERS[1]))
    assert refused.status == 429 and refused.headers["retry-after"] == "1"
    body = await refused.json()
    assert_openai_error(body, "concurrency_limit_exceeded")
    assert "team 'research': 1 at once" in body["error"]["message"]
    answer = await gateway.post(
        "/v1/messages",
        json=MESSAGES,
        headers={"x-api-key": CLAUDE_MEMBER, "anthropic-version": "2023-06-01"},
    )
    assert answer.status == 429 and answer.headers["retry-after"] == "1"
    assert_anthropic_error(await answer.json(), "rate_limit_error")
    metrics = await (await gateway.get("/metrics")).text()
    assert (
        'llm_gateway_limit_refusals_total{limit="in_flight",scope="team",team="research"} 2.0'
        in metrics
    )
    assert 'llm_gateway_team_requests_in_flight{team="research"} 1.0' in metrics
    holder.close()  # the client leaves: its slot is free at once
    deadline = asyncio.get_running_loop().time() + 5
    while await chat(gateway, MEMBERS[1]) != 200:
        assert asyncio.get_running_loop().time() < deadline, "the slot never came back"


async def test_queue_seconds_serves_the_waiting_requests_in_order(
    teams_gateway: Any, fake: Any
) -> None:
    gateway = await teams_gateway({"max_in_flight": 1, "queue_seconds": 30})
    quota = gateway.app[QUOTA]
    holder = await hold(gateway, MEMBERS[0])
    waiting = []
    for n in range(5):  # each one in line before the next asks
        body = {**CHAT, "messages": [{"role": "user", "content": f"number {n}"}]}
        waiting.append(asyncio.create_task(chat(gateway, MEMBERS[n % 3], body)))
        await until(lambda n=n: quota.queued == n + 1)
    holder.close()
    assert await asyncio.gather(*waiting) == [200] * 5
    served = [json.loads(seen.body)["messages"][0]["content"] for seen in fake.requests[1:]]
    assert served == [f"number {n}" for n in range(5)]


async def test_a_per_model_window_refuses_gpt_4o_while_gpt_4o_mini_goes_on(
    teams_gateway: Any,
) -> None:
    groups = [
        {"models": ["gpt-4o-mini*"], "requests": 100},  # first match counts: not gpt-4o*
        {"models": ["gpt-4o*", "o3*"], "requests": 2, "window_seconds": 60},
    ]
    gateway = await teams_gateway({}, {"model_quotas": groups})
    big = {**CHAT, "model": "gpt-4o"}
    assert [await chat(gateway, MEMBERS[0], big) for _ in range(3)] == [200, 200, 429]
    assert await chat(gateway, MEMBERS[0], {**CHAT, "model": "o3-mini"}) == 429  # same group
    assert [await chat(gateway, MEMBERS[0]) for _ in range(3)] == [200, 200, 200]
    assert await chat(gateway, MEMBERS[1], big) == 200  # each key has its own model windows
    refused = await gateway.post("/v1/chat/completions", json=big, headers=auth(MEMBERS[0]))
    message = (await refused.json())["error"]["message"]
    assert "key 'member-0' for models gpt-4o*, o3*: 2 requests per minute" in message
    usage = await (await gateway.get("/usage", headers=auth(MEMBERS[0]))).json()
    assert [group["requests"]["used"] for group in usage["model_quotas"]] == [3, 2]


async def test_admin_teams_shows_members_limits_and_usage(teams_gateway: Any) -> None:
    gateway = await teams_gateway(
        {"quota": {"requests": 50}, "budget": {"usd": 20}, "max_in_flight": 8}
    )
    assert await chat(gateway, MEMBERS[2]) == 200
    admin = {"Authorization": f"Bearer {ADMIN}"}
    teams = (await (await gateway.get("/admin/teams", headers=admin)).json())["teams"]
    assert len(teams) == 1
    team = teams[0]
    assert team["name"] == "research"
    assert team["members"] == ["member-0", "member-1", "member-2", "member-claude"]
    assert team["limits"]["requests"] == 50 and team["budget"]["usd"] == 20
    assert team["max_in_flight"] == 8
    assert team["usage"]["requests"]["used"] == 1 and team["usage"]["in_flight"]["used"] == 0
    keys = (await (await gateway.get("/admin/keys", headers=admin)).json())["keys"]
    assert {key["name"]: key["team"] for key in keys}["member-2"] == "research"


async def test_a_team_budget_holds_across_its_members_within_one_reservation(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    tmp_path: Path,
    fake_base: str,
    log_path: Path,
) -> None:
    document = keys_document(fake_base)
    document["teams"] = {"research": {"budget": {"usd": 0.01, "window_seconds": 3600}}}
    for n, secret in enumerate(MEMBERS):
        document["virtual_keys"][secret] = {
            "provider": "openai",
            "api_key": f"sk-member-real-{n}-123456",
            "name": f"member-{n}",
            "team": "research",
        }
    keys, prices = tmp_path / "keys.json", tmp_path / "prices.json"
    keys.write_text(json.dumps(document))
    prices.write_text(json.dumps({"openai": {"*": {"input_mtok": 100, "output_mtok": 100}}}))
    settings = Settings.from_env(
        {"KEYS_FILE_PATH": str(keys), "PRICES_FILE": str(prices), "LOG_FILE_PATH": str(log_path)}
    )
    gateway = await aiohttp_client(build_app(settings))
    body = {**CHAT, "max_tokens": 10}  # reserves 2 + 10 tokens, $0.0012; costs 1 + 8
    statuses = await asyncio.gather(
        *(chat(gateway, MEMBERS[n % 3], body, **{"x-fake-chunks": "8"}) for n in range(200))
    )
    usage = await (await gateway.get("/usage", headers=auth(MEMBERS[0]))).json()
    spent = usage["team"]["budget"]["spent_usd"]
    assert spent == pytest.approx(statuses.count(200) * 9 * 0.0001)
    assert 0.01 - 0.0012 < spent <= 0.01 + 0.0012
    for _ in range(3):  # what is left may still admit one or two (reservations are gone)
        refused = await gateway.post("/v1/chat/completions", json=body, headers=auth(MEMBERS[1]))
        if refused.status == 429:
            break
    assert_openai_error(await refused.json(), "insufficient_quota")
    message = (await refused.json())["error"]["message"]
    assert message.startswith("Budget exhausted for team 'research': $0.01 per hour")


async def test_a_reload_keeps_the_team_window_and_a_key_taken_out_is_not_counted(
    teams_gateway: Any, tmp_path: Path
) -> None:
    gateway = await teams_gateway({"quota": {"requests": 3, "window_seconds": 3600}})
    assert [await chat(gateway, MEMBERS[0]) for _ in range(2)] == [200, 200]
    path = tmp_path / "teams-keys.json"
    document = json.loads(path.read_text())
    del document["virtual_keys"][MEMBERS[0]]["team"]
    path.write_text(json.dumps(document))
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert (await gateway.post("/admin/reload", headers=admin)).status == 200
    # The team's window kept its two requests: one more, then the team is full...
    assert [await chat(gateway, MEMBERS[1]) for _ in range(2)] == [200, 429]
    # ...but the key taken out of it is not counted there (nor refused by it) any more.
    assert [await chat(gateway, MEMBERS[0]) for _ in range(3)] == [200, 200, 200]
    team = (await (await gateway.get("/admin/teams", headers=admin)).json())["teams"][0]
    assert "member-0" not in team["members"] and team["usage"]["requests"]["used"] == 3
    usage = await (await gateway.get("/usage", headers=auth(MEMBERS[0]))).json()
    assert "team" not in usage


async def test_the_log_line_names_the_limit_that_refused(
    teams_gateway: Any, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    gateway = await teams_gateway({"quota": {"requests": 1, "window_seconds": 60}})
    assert [await chat(gateway, MEMBERS[0]) for _ in range(2)] == [200, 429]
    lines = await records(2)
    assert lines[1]["status"] == 429
    assert "team 'research': 1 request per minute" in lines[1]["error"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"team": "nobody"}, "team must name a team of 'teams' (known: research)"),
        ({"queue_seconds": 5}, "queue_seconds needs max_in_flight"),
        ({"max_in_flight": 0}, "max_in_flight must be a positive integer"),
        ({"model_quotas": [{"models": "gpt-4o"}]}, "model_quotas[0].models must be a list"),
        ({"model_quotas": [{"models": ["gpt-4o"]}]}, "model_quotas[0] needs requests, tokens"),
        (
            {"model_quotas": [{"models": ["x"], "request": 1}]},
            "did you mean 'model_quotas[0].requests'",
        ),
    ],
)
def test_a_bad_team_field_is_refused_naming_the_key_and_the_field(
    tmp_path: Path, fake_base: str, change: dict[str, Any], message: str
) -> None:
    from proxy.keys.fields import Defaults, KeysFileError
    from proxy.keys.keys import KeyRing

    document = keys_document(fake_base)
    document["teams"] = {"research": {"max_in_flight": 2}}
    document["virtual_keys"][MEMBERS[0]] = {
        "provider": "openai",
        "api_key": "sk-member-real-0-123456",
        "name": "member-0",
        **change,
    }
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(document))
    with pytest.raises(KeysFileError) as refused:
        KeyRing.load(str(path), {}, Defaults(True, 100, None, 3600.0))
    assert "key 'member-0'" in str(refused.value) and message in str(refused.value)


async def test_a_websocket_session_holds_a_slot_until_it_closes(teams_gateway: Any) -> None:
    gateway = await teams_gateway({"max_in_flight": 1})
    path = "/v1/realtime?model=gpt-realtime"
    options = {"headers": auth(MEMBERS[0]), "protocols": ["realtime"], "autoclose": False}
    session = await gateway.ws_connect(path, **options)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await gateway.ws_connect(path, **{**options, "headers": auth(MEMBERS[1])})
    assert refused.value.status == 429
    assert await chat(gateway, MEMBERS[2]) == 429  # the session's slot is the team's only one
    await session.close()
    deadline = asyncio.get_running_loop().time() + 5
    while await chat(gateway, MEMBERS[2]) != 200:
        assert asyncio.get_running_loop().time() < deadline, "the session kept its slot"


@pytest.mark.parametrize(
    ("team", "key", "message"),
    [
        ({"max_in_flight": 4}, {}, "team 'research': max_in_flight with WORKERS other than 1"),
        ({"quota": {"requests": 9}}, {}, "need REDIS_URL"),
        ({}, {"max_in_flight": 2}, "key 'member-0': max_in_flight with WORKERS other than 1"),
        # budgets stay with QUOTA_ENABLED=false: WORKERS=2 let the key spend twice its budget
        ({}, {"budget": {"usd": 5}}, "key 'member-0': a budget with WORKERS other than 1"),
    ],
)
def test_shared_limits_with_workers_counting_on_their_own_are_refused(
    tmp_path: Path, fake_base: str, team: dict[str, Any], key: dict[str, Any], message: str
) -> None:
    from proxy.keys.fields import Defaults, KeysFileError
    from proxy.keys.keys import KeyRing

    document = keys_document(fake_base)
    document["teams"] = {"research": team}
    document["virtual_keys"][MEMBERS[0]] = {
        "provider": "openai",
        "api_key": "sk-member-real-0-123456",
        "name": "member-0",
        "team": "research",
        **key,
    }
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(document))
    per_worker = Defaults(False, 100, None, 3600.0, unshared_workers=4)
    with pytest.raises(KeysFileError) as refused:
        KeyRing.load(str(path), {}, per_worker)
    assert message in str(refused.value)
    shared = Defaults(False, 100, None, 3600.0)  # one process, or Redis: fine
    assert KeyRing.load(str(path), {}, shared).teams["research"].scope.max_in_flight == team.get(
        "max_in_flight"
    )


def test_quota_enabled_false_turns_team_and_model_windows_off(
    tmp_path: Path, fake_base: str
) -> None:
    from proxy.keys.fields import Defaults
    from proxy.keys.keys import KeyRing

    document = keys_document(fake_base)
    document["teams"] = {"research": {"quota": {"requests": 5}, "budget": {"usd": 3}}}
    document["virtual_keys"][MEMBERS[0]] = {
        "provider": "openai",
        "api_key": "sk-member-real-0-123456",
        "name": "member-0",
        "team": "research",
        "model_quotas": [{"models": ["gpt-4o"], "requests": 1}],
    }
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(document))
    ring = KeyRing.load(str(path), {}, Defaults(False, 100, None, 3600.0))
    team = ring.teams["research"].scope
    assert team.limits is None and team.budget is not None  # budgets stay, as a key's do
    key = next(key for key in ring if key.name == "member-0")
    assert key.model_quotas == ()


def limit_headers(response: aiohttp.ClientResponse) -> dict[str, str]:
    return {
        name[len("x-ratelimit-") :]: value
        for name, value in response.headers.items()
        if name.startswith("x-ratelimit-")
    }


async def test_the_ratelimit_headers_tell_the_tightest_window_a_request_passed(
    teams_gateway: Any,
) -> None:
    # Each member's own window is QUOTA_LIMIT's 100 requests; the team's, 3 and 1,000 tokens.
    # Before: every answer said 'limit 100, remaining 99' and no tokens, then came the 429.
    gateway = await teams_gateway({"quota": {"requests": 3, "tokens": 1000}})
    seen = []
    for secret in MEMBERS:
        response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(secret))
        assert response.status == 200
        await response.read()
        seen.append(limit_headers(response))
    assert [h["limit-requests"] for h in seen] == ["3", "3", "3"]
    assert [h["remaining-requests"] for h in seen] == ["2", "1", "0"]
    assert all(h["limit-tokens"] == "1000" and int(h["remaining-tokens"]) < 1000 for h in seen)
    refused = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(MEMBERS[0]))
    assert refused.status == 429
    assert limit_headers(refused)["remaining-requests"] == "0"


async def test_the_ratelimit_headers_tell_a_model_groups_window_when_it_is_the_tightest(
    teams_gateway: Any,
) -> None:
    member = {"model_quotas": [{"models": ["gpt-4o*"], "requests": 2}]}
    gateway = await teams_gateway({"max_in_flight": 10}, member)
    remaining = []
    for model in ("gpt-4o", "gpt-4o", "gpt-3.5-turbo"):
        body = {**CHAT, "model": model}
        response = await gateway.post("/v1/chat/completions", json=body, headers=auth(MEMBERS[0]))
        assert response.status == 200
        await response.read()
        headers = limit_headers(response)
        remaining.append((headers["limit-requests"], headers["remaining-requests"]))
    # The group's 2 while it is the tightest; a model outside it, the key's own 100.
    assert remaining == [("2", "1"), ("2", "0"), ("100", "97")]


async def test_a_request_waiting_for_a_slot_takes_a_cap_raised_meanwhile(
    teams_gateway: Any, fake: Any
) -> None:
    # An operator raises the team's max_in_flight because requests queue: the one already
    # waiting was asked about at the old cap every poll and got its 429 after queue_seconds.
    gateway = await teams_gateway({"max_in_flight": 1, "queue_seconds": 30})
    quota = gateway.app[QUOTA]
    holder = await hold(gateway, MEMBERS[0])
    waiting = asyncio.create_task(chat(gateway, MEMBERS[1]))
    await until(lambda: quota.queued == 1)
    raised = await gateway.patch(
        "/admin/teams/research",
        json={"max_in_flight": 2},
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    assert raised.status == 200, await raised.text()
    await until(lambda: waiting.done(), what="the waiting request admitted at the raised cap")
    assert waiting.result() == 200 and len(fake.requests) == 2
    holder.close()


@pytest.mark.parametrize(("change", "status"), [("deleted", 401), ("restricted", 403)])
async def test_a_request_waiting_for_a_slot_of_a_key_changed_meanwhile_is_refused(
    teams_gateway: Any,
    fake: Any,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    change: str,
    status: int,
) -> None:
    # Its key deleted (401) or its allowed_models narrowed (403) while it waited, it was
    # served once the slot came back: a revoked key, or the model the operator had just
    # taken away, reached the provider after the admin API's answer.
    gateway = await teams_gateway({"max_in_flight": 1, "queue_seconds": 30})
    quota = gateway.app[QUOTA]
    holder = await hold(gateway, MEMBERS[0])
    waiting = asyncio.create_task(chat(gateway, MEMBERS[1], **{"x-request-id": "waiting"}))
    await until(lambda: quota.queued == 1)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    if change == "deleted":
        changed = await gateway.delete("/admin/keys/member-1", headers=admin)
    else:
        narrowed = {"allowed_models": ["claude-*"]}
        changed = await gateway.patch("/admin/keys/member-1", json=narrowed, headers=admin)
    assert changed.status in (200, 204), await changed.text()
    holder.close()  # the slot comes back
    assert await waiting == status
    assert len(fake.requests) == 1
    lines = {line.get("request_id"): line for line in await records(2)}
    assert lines["waiting"]["status"] == status and lines["waiting"]["key"] == "member-1"
    # The refused request gave its slot back: the next one of the team is served.
    assert await chat(gateway, MEMBERS[2]) == 200


async def test_a_realtime_session_waiting_for_a_slot_of_a_key_restricted_meanwhile_is_refused(
    teams_gateway: Any,
) -> None:
    # A session that waited for its slot opened under the key as it was when it arrived: a
    # model taken away meanwhile was connected, and a key restricted meanwhile had its
    # session updates unchecked (their gate is set for a restricted key only).
    gateway = await teams_gateway({"max_in_flight": 1, "queue_seconds": 30})
    quota = gateway.app[QUOTA]
    admin = {"Authorization": f"Bearer {ADMIN}"}
    options = {"headers": auth(MEMBERS[1]), "protocols": ["realtime"], "autoclose": False}
    holder = await hold(gateway, MEMBERS[0])
    waiting = asyncio.create_task(gateway.ws_connect("/v1/realtime?model=gpt-realtime", **options))
    await until(lambda: quota.queued == 1)
    narrowed = await gateway.patch(
        "/admin/keys/member-1", json={"allowed_models": ["claude-*"]}, headers=admin
    )
    assert narrowed.status == 200, await narrowed.text()
    holder.close()  # the slot comes back
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await waiting
    assert refused.value.status == 403

    # Unrestricted when the next session arrives, the key may use gpt-realtime only after.
    await gateway.patch("/admin/keys/member-1", json={"allowed_models": None}, headers=admin)
    holder = await hold(gateway, MEMBERS[0])
    waiting = asyncio.create_task(gateway.ws_connect("/v1/realtime?model=gpt-realtime", **options))
    await until(lambda: quota.queued == 1)
    narrowed = await gateway.patch(
        "/admin/keys/member-1", json={"allowed_models": ["gpt-realtime"]}, headers=admin
    )
    assert narrowed.status == 200, await narrowed.text()
    holder.close()
    session = await waiting
    await session.receive(timeout=5)  # session.created
    update = {"input_audio_transcription": {"model": "gpt-4o-transcribe"}}
    await session.send_json({"type": "session.update", "session": update})
    answer = json.loads((await session.receive(timeout=5)).data)
    assert answer["type"] == "error" and answer["error"]["code"] == "model_not_allowed"
    await session.close()


async def test_a_request_waiting_for_its_own_keys_slot_does_not_hold_up_its_teams_line(
    teams_gateway: Any, fake: Any
) -> None:
    # Each member may have one request in flight; the team two. member-0's second request
    # stood first in the team's line, waiting for member-0's own slot: a team slot freed
    # woke only it, and member-1 behind it waited out the team's 30 s with the slot free.
    gateway = await teams_gateway(
        {"max_in_flight": 2, "queue_seconds": 30}, {"max_in_flight": 1, "queue_seconds": 30}
    )
    quota = gateway.app[QUOTA]

    first = await hold(gateway, MEMBERS[0])  # member-0's only slot, one of the team's two
    second = await hold(gateway, MEMBERS[1])  # the team's last slot
    assert first.status == second.status == 200
    third = asyncio.create_task(hold(gateway, MEMBERS[2]))  # waits for a team slot
    await until(lambda: quota.queued == 1)
    again = asyncio.create_task(chat(gateway, MEMBERS[0]))  # behind it, in the team's line
    await until(lambda: quota.queued == 2)
    second.close()  # the third takes that slot; member-0's second is first in line now
    third_response = await third
    assert third_response.status == 200
    await until(lambda: quota.queued == 1)
    behind = asyncio.create_task(chat(gateway, MEMBERS[1]))  # member-1 is free again
    await until(lambda: quota.queued == 2)
    third_response.close()  # a team slot is free: member-1's request takes it
    await until(lambda: behind.done(), within=10, what="member-1 admitted to the free team slot")
    assert behind.result() == 200 and not again.done()  # member-0 still waits for its own
    first.close()
    assert await again == 200


async def test_a_realtime_sessions_usage_is_charged_to_its_team_too(teams_gateway: Any) -> None:
    # A session's each response is charged as it completes; a member's went to its own
    # window only, so a team of 1,000 tokens saw none of it and admitted session after session.
    from tests.support.fake_realtime import INPUT_TOKENS, OUTPUT_TOKENS

    gateway = await teams_gateway({"quota": {"tokens": 1000}})
    options = {"headers": auth(MEMBERS[0]), "protocols": ["realtime"], "autoclose": False}
    session = await gateway.ws_connect("/v1/realtime?model=gpt-realtime", **options)
    await session.receive(timeout=5)  # session.created
    await session.send_str('{"type": "response.create"}')
    for _ in range(2):  # response.created, response.done
        await session.receive(timeout=5)
    await session.close()

    async def usage() -> dict[str, Any]:
        return await (await gateway.get("/usage", headers=auth(MEMBERS[0]))).json()

    async def charged() -> bool:
        return (await usage())["tokens"]["used"] > 0

    await until(charged, what="the session's response charged")  # off the session's path
    report = await usage()
    assert report["tokens"]["used"] == INPUT_TOKENS + OUTPUT_TOKENS
    assert report["team"]["tokens"]["used"] == INPUT_TOKENS + OUTPUT_TOKENS
