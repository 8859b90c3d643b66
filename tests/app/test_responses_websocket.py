"""The Responses API's WebSocket mode through the gateway: relayed like Realtime, each
`response.create` admitted when the client sends it, each turn charged from its usage.

The fake provider's WebSocket at /v1/responses answers each `response.create` with
response.created, two deltas and response.completed (tests/support/fake_realtime.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient, TestServer
from openai import AsyncOpenAI

from proxy.app import QUOTA
from tests.conftest import OPENAI_REAL, OPENAI_VK, auth
from tests.support.fake_realtime import (
    HANDSHAKE_HEADERS,
    INPUT_TOKENS,
    OUTPUT_TOKENS,
    REALTIME_STATE,
    FakeSocket,
    RealtimeState,
)
from tests.support.polling import until

TURN_VK = "vk_test_turns_5d2c8a1e9f"
LIMITED_TURN_VK = "vk_test_turns_limited_7b3e0c4a2d"
ADMIN = "admin-token-for-turn-tests-0123"
WAIT_SECONDS = 5.0
CREATE = orjson.dumps({"type": "response.create", "model": "gpt-4o-mini", "input": "hi"})


@pytest.fixture
def sockets(fake_provider: TestServer) -> RealtimeState:
    return fake_provider.app[REALTIME_STATE]


async def open_session(gateway: TestClient, key: str) -> aiohttp.ClientWebSocketResponse:
    ws = await gateway.ws_connect("/v1/responses", headers=auth(key), autoping=False)
    await receive(ws)  # the fake's session.created
    return ws


async def receive(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    message = await asyncio.wait_for(ws.receive(), WAIT_SECONDS)
    assert message.type is WSMsgType.TEXT, message
    return orjson.loads(message.data)


async def turn(ws: aiohttp.ClientWebSocketResponse) -> list[dict[str, Any]]:
    """Send a response.create; the events up to its end (or the refusal)."""
    await ws.send_str(CREATE.decode())
    events = []
    while True:
        event = await receive(ws)
        events.append(event)
        if event["type"] in ("response.completed", "error"):
            return events


# A key of one slot in flight, whose requests wait for it up to 30 s.
ONE_SLOT = {
    "provider": "openai",
    "api_key": OPENAI_REAL,
    "name": "turns",
    "max_in_flight": 1,
    "queue_seconds": 30,
}


async def turn_in_line(
    gateway: TestClient,
) -> tuple[aiohttp.ClientResponse, aiohttp.ClientWebSocketResponse]:
    """ONE_SLOT's slot held by a stream hung mid-body (close it to give the slot back), and a
    session whose turn waits in line for it."""
    holder = await gateway.post(
        "/v1/chat/completions",
        json={
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
        },
        headers={**auth(TURN_VK), "x-fake-hang": "midstream"},
    )
    assert holder.status == 200
    ws = await open_session(gateway, TURN_VK)
    await ws.send_str(CREATE.decode())
    await until(lambda: gateway.app[QUOTA].queued == 1)
    return holder, ws


def creates(socket: FakeSocket) -> int:
    """How many response.create frames reached the provider."""
    return sum(
        1 for kind, data in socket.received if kind is WSMsgType.TEXT and "response.create" in data
    )


async def test_the_openai_sdk_connects_and_each_turn_is_charged(
    gateway: TestClient, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    client = AsyncOpenAI(base_url=str(gateway.make_url("/v1")), api_key=OPENAI_VK, max_retries=0)
    texts = []
    async with client.responses.connect() as connection:
        for _ in range(2):
            await connection.response.create(model="gpt-4o-mini", input="hi")
            async for event in connection:
                if event.type == "response.output_text.delta":
                    texts.append(event.delta)
                if event.type == "response.completed":
                    break
    await client.close()
    assert "".join(texts) == "Hello, worldHello, world"
    [line] = await records(1)
    assert line["status"] == 101
    assert line["model"] == "gpt-4o-mini"  # the upgrade names none: its first turn's
    usage = line["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (
        2 * INPUT_TOKENS,
        2 * OUTPUT_TOKENS,
    )
    metrics = await (await gateway.get("/metrics")).text()
    assert 'llm_gateway_cost_usd_total{model="gpt-4o-mini",provider="openai"}' in metrics


async def test_a_turn_served_at_the_priority_tier_is_priced_at_it_as_over_http(
    gateway: TestClient, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    # Codex's fast mode asks for the priority tier, which OpenAI bills at about twice the
    # usual rates; a turn's response.completed says which tier served it. An HTTP answer was
    # priced at that tier, a turn at the usual one: budgets and cost_usd took half.
    costs = []
    for tier in ("default", "priority"):
        ws = await open_session(gateway, OPENAI_VK)
        turn = {"type": "response.create", "model": "gpt-5", "input": "hi", "service_tier": tier}
        await ws.send_str(orjson.dumps(turn).decode())
        assert (await until_end(ws))[-1]["type"] == "response.completed"
        await ws.close()
        costs.append((await records(len(costs) + 1))[-1]["cost_usd"])
    usual, priority = costs
    assert usual > 0 and priority > 1.5 * usual, costs  # as the library prices the tiers


async def test_a_turn_past_the_keys_quota_is_refused_when_sent(
    gateway_with_keys: Callable[..., Awaitable[TestClient]], sockets: RealtimeState
) -> None:
    limited = {"provider": "openai", "api_key": OPENAI_REAL, "name": "turns"}
    limited["quota"] = {"requests": 2, "window_seconds": 3600}
    gateway = await gateway_with_keys({TURN_VK: limited})
    ws = await open_session(gateway, TURN_VK)
    for _ in range(2):
        assert (await turn(ws))[-1]["type"] == "response.completed"
    [refused] = await turn(ws)
    assert refused["type"] == "error" and refused["status"] == 429
    assert refused["error"]["type"] == "rate_limit_error"
    assert creates(sockets.sockets[-1]) == 2  # the refused turn never went upstream
    # The session stays open: the client may try again when its window allows.
    await ws.send_str(json.dumps({"type": "fake.ping", "data": "still-open"}))
    await ws.close()


async def test_a_turn_past_the_keys_budget_is_typed_insufficient_quota_as_over_http(
    gateway_with_keys: Callable[..., Awaitable[TestClient]], sockets: RealtimeState
) -> None:
    spender = {"provider": "openai", "api_key": OPENAI_REAL, "name": "turns"}
    spender["budget"] = {"usd": 0.01, "window_seconds": 3600}
    prices = {"openai": {"*": {"input_mtok": 1_000_000, "output_mtok": 1_000_000}}}
    gateway = await gateway_with_keys({TURN_VK: spender}, prices=prices)
    ws = await open_session(gateway, TURN_VK)
    assert (await turn(ws))[-1]["type"] == "response.completed"  # $1 a token: spent
    [refused] = await turn(ws)
    assert refused["status"] == 429 and refused["error"]["code"] == "insufficient_quota"
    assert refused["error"]["type"] == "insufficient_quota"  # as the HTTP 429's body says
    assert creates(sockets.sockets[-1]) == 1
    await ws.close()


async def test_a_key_revoked_midsession_gets_a_refusal_for_its_next_turn(
    gateway_with_keys: Callable[..., Awaitable[TestClient]],
    sockets: RealtimeState,
    tmp_path: Path,
) -> None:
    entry = {"provider": "openai", "api_key": OPENAI_REAL, "name": "turns"}
    gateway = await gateway_with_keys({TURN_VK: entry}, ADMIN_TOKEN=ADMIN)
    ws = await open_session(gateway, TURN_VK)
    assert (await turn(ws))[-1]["type"] == "response.completed"
    keys_file = tmp_path / "keys-0.json"
    document = json.loads(keys_file.read_text())
    del document["virtual_keys"][TURN_VK]
    keys_file.write_text(json.dumps(document))
    reload = await gateway.post("/admin/reload", headers={"Authorization": f"Bearer {ADMIN}"})
    assert reload.status == 200, await reload.text()
    [refused] = await turn(ws)
    assert refused["type"] == "error" and refused["status"] == 401
    assert refused["error"]["code"] == "invalid_api_key"
    assert creates(sockets.sockets[-1]) == 1
    await ws.close()


async def session_of_one_request(
    gateway_with_keys: Callable[..., Awaitable[TestClient]],
) -> tuple[TestClient, aiohttp.ClientWebSocketResponse]:
    """A gateway whose key allows one request an hour, and a session of it whose first turn
    took that one (completed): the next turn is over the quota."""
    limited = {"provider": "openai", "api_key": OPENAI_REAL, "name": "turns"}
    limited["quota"] = {"requests": 1, "window_seconds": 3600}
    gateway = await gateway_with_keys({TURN_VK: limited})
    ws = await open_session(gateway, TURN_VK)
    assert (await turn(ws))[-1]["type"] == "response.completed"
    return gateway, ws


async def test_a_key_over_its_quota_is_refused_at_the_upgrade(
    gateway_with_keys: Callable[..., Awaitable[TestClient]],
) -> None:
    gateway, ws = await session_of_one_request(gateway_with_keys)
    assert (await turn(ws))[-1]["status"] == 429  # the refusal the gateway now remembers
    await ws.close()
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await gateway.ws_connect("/v1/responses", headers=auth(TURN_VK))
    assert refused.value.status == 429


async def test_a_turn_naming_a_model_the_key_may_not_use_is_refused(
    gateway_with_keys: Callable[..., Awaitable[TestClient]], sockets: RealtimeState
) -> None:
    narrow = {"provider": "openai", "api_key": OPENAI_REAL, "allowed_models": ["gpt-4o-*"]}
    gateway = await gateway_with_keys({TURN_VK: narrow})
    ws = await open_session(gateway, TURN_VK)
    await ws.send_str(orjson.dumps({"type": "response.create", "model": "o3-pro"}).decode())
    refused = await receive(ws)
    assert refused["type"] == "error" and refused["status"] == 403
    # A stored prompt's model is out of the gateway's sight: a turn naming none is refused.
    prompt = {"type": "response.create", "prompt": {"id": "pmpt_123"}}
    await ws.send_str(orjson.dumps(prompt).decode())
    unnamed = await receive(ws)
    assert unnamed["status"] == 403 and "names none" in unnamed["error"]["message"]
    assert (await turn(ws))[-1]["type"] == "response.completed"  # gpt-4o-mini is allowed
    assert creates(sockets.sockets[-1]) == 1
    await ws.close()


async def test_a_turn_naming_its_model_twice_or_in_another_case_is_refused_as_over_http(
    gateway_with_keys: Callable[..., Awaitable[TestClient]], sockets: RealtimeState
) -> None:
    # An HTTP body naming `model` twice (or `Model`, which Go's encoding/json reads as
    # `model`) gets 400 duplicate_field / 403 for a restricted key, since parsers disagree on
    # which copy counts; a turn went upstream with the allowed copy checked and the other
    # one for a first-reading (or case-folding) server to run.
    narrow = {"provider": "openai", "api_key": OPENAI_REAL, "allowed_models": ["gpt-4o-*"]}
    narrow["quota"] = {"requests": 100, "tokens": 100_000, "window_seconds": 3600}
    gateway = await gateway_with_keys({TURN_VK: narrow})
    ws = await open_session(gateway, TURN_VK)
    twice = '{"type": "response.create", "model": "o3-pro", "model": "gpt-4o-mini"}'
    await ws.send_str(twice)
    refused = await receive(ws)
    assert refused["type"] == "error" and refused["status"] == 400, refused
    assert refused["error"]["code"] == "duplicate_field"
    folded = '{"type": "response.create", "model": "gpt-4o-mini", "Model": "o3-pro"}'
    await ws.send_str(folded)
    refused = await receive(ws)
    assert refused["type"] == "error" and refused["status"] == 403, refused
    capped = (
        '{"type": "response.create", "model": "gpt-4o-mini", "max_output_tokens": 5,'
        ' "max_output_tokens": 90000}'
    )
    await ws.send_str(capped)  # reserved 5 tokens, while the provider may read 90000
    refused = await receive(ws)
    assert refused["type"] == "error" and refused["error"]["code"] == "duplicate_field"
    assert sockets.sockets[-1].received == []  # none went upstream
    assert (await turn(ws))[-1]["type"] == "response.completed"  # a plain one still runs
    await ws.close()


async def test_a_turn_spelled_with_json_escapes_is_admitted_like_any_other(
    gateway_with_keys: Callable[..., Awaitable[TestClient]], sockets: RealtimeState
) -> None:
    """The provider reads `response\\u002ecreate` as `response.create`: so must the gate, else
    such a turn ran past the quota and `allowed_models` unseen. A possible turn the gateway
    cannot read (a lone surrogate, which other JSON readers take) is refused, not let through."""
    narrow = {"provider": "openai", "api_key": OPENAI_REAL, "allowed_models": ["gpt-4o-*"]}
    limited = {"provider": "openai", "api_key": OPENAI_REAL}
    limited["quota"] = {"requests": 1, "window_seconds": 3600}
    gateway = await gateway_with_keys({TURN_VK: narrow, LIMITED_TURN_VK: limited})
    escaped = '{"type": "response\\u002ecreate", "model": "%s", "input": "hi"}'
    ws = await open_session(gateway, TURN_VK)
    await ws.send_str(escaped % "o3-pro")
    assert (await receive(ws))["status"] == 403
    await ws.send_str('{"type": "response.create", "model": "gpt-4o-mini", "input": "\\ud800"}')
    unreadable = await receive(ws)
    assert unreadable["type"] == "error" and unreadable["status"] == 400
    assert sockets.sockets[-1].received == []  # neither went upstream
    await ws.close()
    ws = await open_session(gateway, LIMITED_TURN_VK)
    await ws.send_str(escaped % "gpt-4o-mini")
    events = await until_end(ws)
    assert events[-1]["type"] == "response.completed", events
    await ws.send_str(escaped % "gpt-4o-mini")
    assert (await receive(ws))["status"] == 429
    assert len(sockets.sockets[-1].received) == 1  # only the admitted turn went upstream
    await ws.close()


async def test_a_turn_sent_as_a_binary_frame_is_admitted_like_a_text_one(
    gateway_with_keys: Callable[..., Awaitable[TestClient]], sockets: RealtimeState
) -> None:
    """A JSON reader takes the bytes of a binary frame as readily as a text frame's (Python's
    json.loads, the JS SDK's JSON.parse of a Buffer): a `response.create` sent as binary went
    upstream past `allowed_models` and the quota unseen. It is gated as a text one is."""
    narrow = {"provider": "openai", "api_key": OPENAI_REAL, "allowed_models": ["gpt-4o-*"]}
    limited = {"provider": "openai", "api_key": OPENAI_REAL}
    limited["quota"] = {"requests": 1, "window_seconds": 3600}
    gateway = await gateway_with_keys({TURN_VK: narrow, LIMITED_TURN_VK: limited})
    ws = await open_session(gateway, TURN_VK)
    await ws.send_bytes(orjson.dumps({"type": "response.create", "model": "o3-pro"}))
    refused = await receive(ws)
    assert refused["type"] == "error" and refused["status"] == 403
    assert sockets.sockets[-1].received == []  # it never went upstream
    await ws.close()
    ws = await open_session(gateway, LIMITED_TURN_VK)
    await ws.send_bytes(CREATE)
    events = await until_end(ws)
    assert events[-1]["type"] == "response.completed", events
    await ws.send_bytes(CREATE)
    assert (await receive(ws))["status"] == 429
    assert len(sockets.sockets[-1].received) == 1  # only the admitted turn went upstream
    await ws.send_bytes(b"\x00\x01 not an event")  # no turn: goes on as sent, binary
    await until(lambda: len(sockets.sockets[-1].received) == 2)
    assert sockets.sockets[-1].received[-1][0] is WSMsgType.BINARY
    await ws.close()


async def until_end(ws: aiohttp.ClientWebSocketResponse) -> list[dict[str, Any]]:
    """The events up to a turn's end or its refusal."""
    events = [await receive(ws)]
    while events[-1]["type"] not in ("response.completed", "error"):
        events.append(await receive(ws))
    return events


async def test_a_turn_refused_for_its_model_does_not_count_against_the_quota(
    gateway_with_keys: Callable[..., Awaitable[TestClient]],
) -> None:
    """As an HTTP request refused with 403 is not counted, nor is such a turn."""
    narrow = {"provider": "openai", "api_key": OPENAI_REAL, "allowed_models": ["gpt-4o-*"]}
    narrow["quota"] = {"requests": 1, "window_seconds": 3600}
    gateway = await gateway_with_keys({TURN_VK: narrow})
    ws = await open_session(gateway, TURN_VK)
    for _ in range(2):
        await ws.send_str(orjson.dumps({"type": "response.create", "model": "o3-pro"}).decode())
        assert (await receive(ws))["status"] == 403
    assert (await turn(ws))[-1]["type"] == "response.completed"  # its one request
    await ws.close()


async def test_a_turns_image_tool_is_checked_against_allowed_models_as_over_http(
    gateway_with_keys: Callable[..., Awaitable[TestClient]], sockets: RealtimeState
) -> None:
    """An image_generation tool runs a model of its own: a turn naming one the key may not use,
    or none (the tool's default), is refused, as the same body over HTTP gets 403."""
    narrow = {"provider": "openai", "api_key": OPENAI_REAL, "allowed_models": ["gpt-4o-*"]}
    gateway = await gateway_with_keys({TURN_VK: narrow})
    body = {"model": "gpt-4o-mini", "input": "draw", "tools": [{"type": "image_generation"}]}
    over_http = await gateway.post("/v1/responses", json=body, headers=auth(TURN_VK))
    assert over_http.status == 403
    ws = await open_session(gateway, TURN_VK)
    for tool in (
        {"type": "image_generation"},
        {"type": "image_generation", "model": "gpt-image-1"},
    ):
        event = {"type": "response.create", **body, "tools": [tool]}
        await ws.send_str(orjson.dumps(event).decode())
        refused = await receive(ws)
        assert refused["type"] == "error" and refused["status"] == 403, refused
    assert sockets.sockets[-1].received == []  # neither turn went upstream
    await ws.close()


async def test_a_turn_the_provider_refuses_gives_back_its_reservation_at_once(
    gateway_with_keys: Callable[..., Awaitable[TestClient]], sockets: RealtimeState
) -> None:
    """The provider refuses a turn with an `error` event alone (no response follows: a
    previous_response_id it lost, say). Its reservation goes back then, not at the session's
    end: three such turns do not hold the key's token window shut for the turns after them."""
    limited = {"provider": "openai", "api_key": OPENAI_REAL, "name": "turns"}
    limited["quota"] = {"requests": 100, "tokens": 1000, "window_seconds": 3600}
    gateway = await gateway_with_keys({TURN_VK: limited})
    ws = await open_session(gateway, TURN_VK)
    create = {"type": "response.create", "model": "gpt-4o-mini", "input": "hi"}
    create["max_output_tokens"] = 400  # each turn reserves about 400 of the 1000 tokens
    for _ in range(3):
        await ws.send_str(orjson.dumps({**create, "fake_refuse": True}).decode())
        refused = await receive(ws)
        assert refused["type"] == "error" and refused["status"] == 400, refused
    await ws.send_str(orjson.dumps(create).decode())
    events = await until_end(ws)
    assert events[-1]["type"] == "response.completed", events
    assert creates(sockets.sockets[-1]) == 4
    await ws.close()


@pytest.mark.parametrize(("change", "status"), [("deleted", 401), ("restricted", 403)])
async def test_a_turn_waiting_for_a_slot_of_a_key_changed_meanwhile_is_refused(
    gateway_with_keys: Callable[..., Awaitable[TestClient]],
    sockets: RealtimeState,
    change: str,
    status: int,
) -> None:
    # A turn queued for its key's one slot was asked about, when the slot came back, with
    # the key it was sent under: revoked meanwhile (401), or a model taken out of its
    # allowed_models (403), the turn still went upstream.
    gateway = await gateway_with_keys({TURN_VK: ONE_SLOT}, ADMIN_TOKEN=ADMIN)
    holder, ws = await turn_in_line(gateway)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    if change == "deleted":
        changed = await gateway.delete("/admin/keys/turns", headers=admin)
    else:
        narrowed = {"allowed_models": ["gpt-5*"]}
        changed = await gateway.patch("/admin/keys/turns", json=narrowed, headers=admin)
    assert changed.status in (200, 204), await changed.text()
    holder.close()  # the slot comes back
    refused = await receive(ws)
    assert refused["type"] == "error" and refused["status"] == status, refused
    assert creates(sockets.sockets[-1]) == 0
    await ws.close()


async def test_a_client_that_closes_while_its_turn_waits_for_a_slot_is_answered_at_once(
    gateway_with_keys: Callable[..., Awaitable[TestClient]], sockets: RealtimeState
) -> None:
    # The gate held the client's reading while a turn waited for its key's slot: a close
    # the client sent then went unanswered for the whole queue_seconds (the client's own
    # close timed out), and a slot coming back meanwhile sent the abandoned turn upstream,
    # where it ran and was charged.
    gateway = await gateway_with_keys({TURN_VK: ONE_SLOT})
    holder, ws = await turn_in_line(gateway)
    await asyncio.wait_for(ws.close(code=4000, message=b"gave up"), WAIT_SECONDS)
    assert ws.close_code == 4000  # the provider's answer to the close passed on, at once
    assert gateway.app[QUOTA].queued == 0  # the turn left the line
    socket = sockets.sockets[-1]
    await asyncio.wait_for(socket.ended.wait(), WAIT_SECONDS)
    assert socket.close == (4000, "gave up")
    holder.close()  # the slot comes back: nothing is waiting for it
    assert creates(socket) == 0
    usage = await (await gateway.get("/usage", headers=auth(TURN_VK))).json()
    assert usage["requests"]["used"] == 1  # the holder's only: the turn was never admitted
    assert usage["in_flight"]["used"] == 0


async def test_a_turn_waiting_for_a_slot_longer_than_the_idle_timeout_is_not_cut_as_idle(
    gateway_with_keys: Callable[..., Awaitable[TestClient]],
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    # The idle clock ran from the last frame that had passed, on through a turn's wait for a
    # slot: a session whose client had sent a turn, and was waiting on the gateway's line,
    # was closed as idle (1001) before its turn ran.
    gateway = await gateway_with_keys({TURN_VK: ONE_SLOT}, REALTIME_IDLE_TIMEOUT="0.3")
    holder, ws = await turn_in_line(gateway)
    await asyncio.sleep(0.6)  # twice the idle timeout, in the line (a wait, not an event)
    assert not ws.closed
    holder.close()  # the slot comes back
    events = await until_end(ws)
    assert events[-1]["type"] == "response.completed", events
    await ws.close()
    lines = await records(2)
    assert lines[-1]["websocket"]["ended_by"] == "client", lines[-1]


async def test_each_turn_of_a_key_pinning_a_model_runs_and_is_priced_at_that_model(
    gateway_with_keys: Callable[..., Awaitable[TestClient]],
    sockets: RealtimeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    """A target's `model` replaces the model a request names (docs/failover.md); each turn's
    `response.create` went upstream as the client sent it, so a key pinned to a cheap model
    (Codex through the gateway) ran, and was priced at, whichever model its client named."""
    pinned = {"provider": "openai", "api_key": OPENAI_REAL, "name": "turns"}
    pinned["model"] = "gpt-4o-mini"
    prices = {"openai": {"gpt-4o-mini": {"input_mtok": 1, "output_mtok": 2}}}
    gateway = await gateway_with_keys({TURN_VK: pinned}, prices=prices)
    ws = await open_session(gateway, TURN_VK)
    top = b'{"type": "response.create", "model" : "o1-pro", "input": "say \\"model\\""}'
    nested = {"type": "response.create", "response": {"model": "o1-pro", "input": "hi"}}
    unnamed = b'{"type": "response.create", "prompt": {"id": "pmpt_1"}}'  # its prompt's model
    for frame in (top, orjson.dumps(nested), unnamed):
        await ws.send_str(frame.decode())
        while (await receive(ws))["type"] != "response.completed":
            pass
    await ws.close()
    sent = [data for kind, data in sockets.sockets[-1].received if kind is WSMsgType.TEXT]
    assert sent[0] == top.replace(b'"o1-pro"', b'"gpt-4o-mini"').decode()
    assert orjson.loads(sent[1])["response"]["model"] == "gpt-4o-mini"
    assert sent[2] == unnamed.decode()
    [line] = await records(1)
    usage = line["usage"]
    # Two turns ran gpt-4o-mini; the third its prompt's model (priced as the session's, not
    # as the pinned one).
    turn = (usage["prompt_tokens"] * 1 + usage["completion_tokens"] * 2) / 1_000_000 / 3
    assert line["cost_usd"] > 2 * turn and line["cost_usd"] != pytest.approx(3 * turn)


async def test_the_providers_handshake_headers_reach_the_client_as_over_http(
    gateway_with_keys: Callable[..., Awaitable[TestClient]],
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    # Codex reads x-codex-turn-state (replayed on each request of a turn: sticky routing),
    # openai-model and x-reasoning-included from the handshake's answer, not from a frame.
    limited = {"provider": "openai", "api_key": OPENAI_REAL, "name": "turns"}
    limited["quota"] = {"requests": 5, "window_seconds": 3600}
    gateway = await gateway_with_keys({TURN_VK: limited})
    ws = await gateway.ws_connect("/v1/responses", headers=auth(TURN_VK), autoping=False)
    await receive(ws)
    answered = ws._response.headers
    for name in ("x-codex-turn-state", "openai-model", "x-reasoning-included"):
        assert answered[name] == HANDSHAKE_HEADERS[name]
    # As over HTTP: the gateway's request id and quota in place of the provider's.
    assert answered.getall("x-request-id") != [HANDSHAKE_HEADERS["x-request-id"]]
    assert len(answered.getall("x-request-id")) == 1
    assert "x-ratelimit-remaining-requests" not in answered  # admitted by turn, not here
    assert len(answered.getall("sec-websocket-accept")) == 1
    await ws.close()
    [line] = await records(1)
    assert line["provider_request_id"] == HANDSHAKE_HEADERS["x-request-id"]


async def test_a_refused_turn_carries_its_headers_as_the_providers_error_events_do(
    gateway_with_keys: Callable[..., Awaitable[TestClient]],
) -> None:
    # Codex reads a WebSocket error event's `headers` (its Retry-After) as it reads an HTTP
    # answer's: the gateway's 429 tells the same wait either way.
    gateway, ws = await session_of_one_request(gateway_with_keys)
    [refused] = await turn(ws)
    assert refused["status"] == 429
    headers = refused["headers"]
    assert 3500 <= int(headers["retry-after"]) <= 3600
    assert headers["x-should-retry"] == "false"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    await ws.close()
    over = await gateway.post(
        "/v1/responses", json={"model": "gpt-4o-mini", "input": "hi"}, headers=auth(TURN_VK)
    )
    assert over.status == 429
    assert {name.lower() for name in over.headers} >= set(headers)


async def test_a_key_with_only_routes_picks_its_sessions_route_by_the_upgrades_model(
    gateway_with_keys: Callable[..., Awaitable[TestClient]], fake: Any
) -> None:
    """The session's one upstream connection opens at the upgrade, before any turn names its
    model: the route is the upgrade's `?model=` one (docs/responses-websocket.md); without
    it, the key's first route, whatever its turns name."""
    first_real, second_real = "sk-real-first-route-1111111111", "sk-real-second-route-22222222"
    routed = "vk_test_turns_routed_4f8a2c6e1b"
    routes = [
        {"models": ["gpt-5*"], "provider": "openai", "api_key": first_real},
        {"models": ["gpt-4o*"], "provider": "openai", "api_key": second_real},
    ]
    gateway = await gateway_with_keys({routed: {"name": "routed", "routes": routes}})
    client = AsyncOpenAI(base_url=str(gateway.make_url("/v1")), api_key=routed, max_retries=0)
    for query, real in [({}, first_real), ({"model": "gpt-4o-mini"}, second_real)]:
        async with client.responses.connect(extra_query=query, max_retries=0) as connection:
            await connection.response.create(model="gpt-4o-mini", input="hi")
            async for event in connection:
                if event.type == "response.completed":
                    break
        assert fake.requests[-1].headers["Authorization"] == f"Bearer {real}", query
    await client.close()


async def test_a_session_naming_no_model_goes_to_the_first_route_speaking_openais_api(
    gateway_with_keys: Callable[..., Awaitable[TestClient]], fake: Any
) -> None:
    """Routes listed Anthropic first: a session without `?model=` opened on the Anthropic
    route, which serves no Responses WebSocket, with the Anthropic key."""
    openai_real = "sk-real-openai-route-3333333333"
    routed = "vk_test_turns_routed_9c1e3a5b7d"
    routes = [
        {"models": ["claude-*"], "provider": "anthropic", "api_key": "sk-ant-real-route-44444444"},
        {"models": ["gpt-*"], "provider": "openai", "api_key": openai_real},
    ]
    gateway = await gateway_with_keys({routed: {"name": "routed", "routes": routes}})
    client = AsyncOpenAI(base_url=str(gateway.make_url("/v1")), api_key=routed, max_retries=0)
    async with client.responses.connect(max_retries=0) as connection:
        await connection.response.create(model="gpt-4o-mini", input="hi")
        async for event in connection:
            if event.type == "response.completed":
                break
    await client.close()
    assert fake.requests[-1].headers["Authorization"] == f"Bearer {openai_real}"
