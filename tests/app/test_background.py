"""Background Responses are charged their real usage once, when a poll finds them finished.

No class of requests may go uncharged: a POST /v1/responses with "background": true
answers queued with usage null, and the GET that returns it finished was charged nothing,
so a budget never saw its tokens. Through a real gateway in front of the fake provider,
with the official SDK; the Redis case with two gateways sharing one redis-server is in
tests/process/test_background_redis.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestClient

from proxy.app import QUOTA
from proxy.quota.tracker import Owed
from tests.conftest import SECRETS, auth, keys_document
from tests.support.fake_provider import FakeState

BUDGET_VK = "vk_test_background_3c5e7a9b1d"
BUDGET_REAL = "sk-background-real-2468013579"
OTHER_VK = "vk_test_background_other_8f6d4b2a0c"
OTHER_REAL = "sk-background-other-real-1357924680"
# A second virtual key of the same real key (one OpenAI project: it can fetch the response).
SHARED_VK = "vk_test_background_shared_5e1f9a7c3b"
# The operator's price list: every token of the fake's models costs $0.0001.
PRICES = {"openai": {"*": {"input_mtok": 100, "output_mtok": 100}}}
USD_PER_TOKEN = 0.0001
INPUT = "one two three"  # 3 prompt tokens at the fake
# The fake's answer: 40 content tokens plus 60 reasoning tokens; 3 + 100 = 103 tokens in all.
ANSWER = {"x-fake-chunks": "40", "x-fake-reasoning-tokens": "60"}
REAL_TOKENS = 3 + 40 + 60
ALL_SECRETS = (*SECRETS, BUDGET_VK, BUDGET_REAL, OTHER_VK, OTHER_REAL, SHARED_VK)

Records = Callable[..., Awaitable[list[dict[str, Any]]]]
MakeGateway = Callable[..., Awaitable[TestClient]]


def background_keys(budget_usd: float = 100.0) -> dict[str, dict[str, Any]]:
    """A budgeted key, another key of its real key, and a key of another real key."""
    return {
        BUDGET_VK: {
            "provider": "openai",
            "api_key": BUDGET_REAL,
            "name": "background",
            "budget": {"usd": budget_usd, "window_seconds": 3600},
        },
        OTHER_VK: {"provider": "openai", "api_key": OTHER_REAL, "name": "other"},
        SHARED_VK: {"provider": "openai", "api_key": BUDGET_REAL, "name": "shared"},
    }


@pytest.fixture
def background_gateway(gateway_with_keys: MakeGateway) -> MakeGateway:
    """A gateway with a budgeted key and another key of the same provider, priced by PRICES."""

    async def make(budget_usd: float = 100.0, **env: str) -> TestClient:
        return await gateway_with_keys(background_keys(budget_usd), prices=PRICES, **env)

    return make


def client(gateway: TestClient, key: str = BUDGET_VK, **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        api_key=key,
        base_url=str(gateway.make_url("/v1")),
        max_retries=0,
        default_headers={**ANSWER, **headers},
    )


async def create(gateway: TestClient, **headers: str) -> str:
    """A background response made through the gateway; its id."""
    made = await client(gateway, **headers).responses.create(
        model="gpt-4o-mini", input=INPUT, background=True
    )
    assert made.status == "queued" and made.usage is None
    return made.id


async def usage_of(
    gateway: TestClient, records: Records, lines: int, key: str = BUDGET_VK
) -> dict[str, Any]:
    """GET /usage once `lines` requests are settled (a request settles after its answer
    went out, and writes its log line then; a settle the Redis tracker still holds goes
    with the key's /usage read)."""
    assert len(await records(lines)) == lines
    return await (await gateway.get("/usage", headers=auth(key))).json()


async def test_the_poll_that_finds_it_finished_is_charged_its_real_usage_once(
    background_gateway: MakeGateway, records: Records, fake: FakeState
) -> None:
    gateway = await background_gateway()
    response_id = await create(gateway)
    assert (await usage_of(gateway, records, 1))["totals"]["tokens"] == 0  # queued: nothing yet
    polled = await client(gateway).responses.retrieve(response_id)
    assert polled.status == "completed" and polled.usage is not None
    assert polled.usage.total_tokens == REAL_TOKENS
    usage = await usage_of(gateway, records, 2)
    assert usage["totals"]["tokens"] == REAL_TOKENS
    assert usage["totals"]["reasoning_tokens"] == 60
    assert usage["budget"]["spent_usd"] == pytest.approx(REAL_TOKENS * USD_PER_TOKEN)
    assert usage["totals"]["spent_usd"] == pytest.approx(REAL_TOKENS * USD_PER_TOKEN)

    again = await client(gateway).responses.retrieve(response_id)  # polled again: nothing more
    assert again.usage is not None and again.usage.total_tokens == REAL_TOKENS
    assert (await usage_of(gateway, records, 3))["totals"]["tokens"] == REAL_TOKENS

    post, poll, second = await records(3)
    assert (post["method"], post["usage"], post["cost_usd"]) == ("POST", None, None)
    assert poll["method"] == "GET" and poll["model"] == "gpt-4o-mini"
    assert poll["usage"]["total_tokens"] == REAL_TOKENS and not poll["usage"]["estimated"]
    assert poll["cost_usd"] == pytest.approx(REAL_TOKENS * USD_PER_TOKEN)
    assert (second["usage"], second["cost_usd"]) == (None, None)
    # What the gateway charged is what the fake reported for that GET.
    reported = fake.usage[poll["request_id"]]
    assert poll["usage"]["prompt_tokens"] == reported["input_tokens"]
    assert poll["usage"]["completion_tokens"] == reported["output_tokens"]
    metrics = await (await gateway.get("/metrics")).text()
    assert 'llm_gateway_cost_usd_total{model="gpt-4o-mini",provider="openai"}' in metrics


@pytest.mark.parametrize("flag", [1, "true", "yes", "on"])
async def test_a_background_flag_a_lenient_server_reads_as_true_is_charged_when_polled(
    background_gateway: MakeGateway, records: Records, flag: object
) -> None:
    """vLLM's and SGLang's Responses read "background" as pydantic's lax booleans do: the
    gateway read only `true`, charged the queued answer an estimate of its prompt and the
    finished one, fetched later, nothing."""
    gateway = await background_gateway()
    headers = {**auth(BUDGET_VK), **ANSWER, "x-fake-lenient": "1"}
    body = {"model": "gpt-4o-mini", "input": INPUT, "background": flag}
    made = await (await gateway.post("/v1/responses", json=body, headers=headers)).json()
    assert made["status"] == "queued" and made["usage"] is None
    assert (await usage_of(gateway, records, 1))["totals"]["tokens"] == 0  # queued: nothing yet
    polled = await client(gateway).responses.retrieve(made["id"])
    assert polled.status == "completed"
    assert (await usage_of(gateway, records, 2))["totals"]["tokens"] == REAL_TOKENS


async def test_polls_that_find_it_running_charge_nothing_and_the_finished_one_charges_it(
    background_gateway: MakeGateway, records: Records
) -> None:
    gateway = await background_gateway()
    response_id = await create(gateway, **{"x-fake-polls": "2"})
    sdk = client(gateway)
    statuses = [(await sdk.responses.retrieve(response_id)).status for _ in range(3)]
    assert statuses == ["in_progress", "in_progress", "completed"]
    assert (await usage_of(gateway, records, 4))["totals"]["tokens"] == REAL_TOKENS
    lines = await records(4)
    assert [line["usage"] is None for line in lines] == [True, True, True, False]


async def test_the_streamed_form_of_the_poll_charges_it_once_too(
    background_gateway: MakeGateway, records: Records
) -> None:
    gateway = await background_gateway()
    response_id = await create(gateway)
    for _ in range(2):
        events = await client(gateway).responses.retrieve(response_id, stream=True)
        kinds = [event.type async for event in events]
        assert kinds[-1] == "response.completed"
    assert (await usage_of(gateway, records, 3))["totals"]["tokens"] == REAL_TOKENS
    _, first, second = await records(3)
    # ?stream=true: the answer is an event stream, and the line says so
    assert first["stream"] is True and first["usage"]["total_tokens"] == REAL_TOKENS
    assert second["usage"] is None


async def test_a_cancel_that_reports_the_usage_charges_it_and_later_polls_nothing(
    background_gateway: MakeGateway, records: Records
) -> None:
    gateway = await background_gateway()
    response_id = await create(gateway)
    cancelled = await client(gateway).responses.cancel(response_id)
    assert cancelled.status == "cancelled" and cancelled.usage is not None
    polled = await client(gateway).responses.retrieve(response_id)
    assert polled.status == "cancelled"
    assert (await usage_of(gateway, records, 3))["totals"]["tokens"] == REAL_TOKENS
    _, cancel, poll = await records(3)
    assert cancel["usage"]["total_tokens"] == REAL_TOKENS and poll["usage"] is None


async def test_a_poll_whose_client_leaves_as_soon_as_it_has_the_answer_still_charges_it(
    background_gateway: MakeGateway, records: Records
) -> None:
    """The claim runs after the answer went out; a client that then closes its connection
    makes aiohttp cancel the handler: the claim must still end in its charge."""
    gateway = await background_gateway()
    response_id = await create(gateway)
    server = gateway.server.runner.server
    assert server is not None
    before = set(server.connections)
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    tracker = gateway.app[QUOTA].tracker
    claim, answered = tracker.claim, asyncio.Event()

    async def claim_once_the_client_left(deferred_id: str) -> Owed | None:
        await answered.wait()
        (connection,) = set(server.connections) - before
        writer.close()
        deadline = asyncio.get_running_loop().time() + 5
        while connection.transport is not None:  # aiohttp saw it go, and cancelled the handler
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.001)
        return await claim(deferred_id)

    tracker.claim = claim_once_the_client_left  # type: ignore[method-assign]
    writer.write(
        f"GET /v1/responses/{response_id} HTTP/1.1\r\nHost: gateway\r\n"
        f"Authorization: Bearer {BUDGET_VK}\r\n\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    assert b'"completed"' in await reader.readexactly(length)
    answered.set()
    _, poll = await records(2)
    assert poll["usage"]["total_tokens"] == REAL_TOKENS
    assert (await usage_of(gateway, records, 2))["totals"]["tokens"] == REAL_TOKENS


async def test_a_key_whose_budget_background_responses_spent_is_refused(
    background_gateway: MakeGateway, records: Records
) -> None:
    # 103 tokens cost $0.0103: one finished background response spends a $0.01 budget.
    gateway = await background_gateway(budget_usd=0.01)
    response_id = await create(gateway)
    await client(gateway).responses.retrieve(response_id)
    assert (await usage_of(gateway, records, 2))["budget"]["remaining_usd"] == 0
    with pytest.raises(openai.RateLimitError) as refused:
        await create(gateway)
    assert refused.value.code == "insufficient_quota"
    assert refused.value.response.headers["x-should-retry"] == "false"


async def test_a_finished_response_over_a_megabyte_is_claimed_and_charged_too(
    background_gateway: MakeGateway, records: Records
) -> None:
    """Before, a finished answer too large to parse whole (over 1 MiB: a long output, or an
    image the response generated, in base64) was read for its usage but not for its id: it
    was never claimed, and the key that created it never charged, whatever it cost."""
    gateway = await background_gateway()
    big = client(gateway, **{"x-fake-chunks": "200000"})  # 1.4 MB of text once finished
    made = await big.responses.create(model="gpt-4o-mini", input=INPUT, background=True)
    polled = await big.responses.retrieve(made.id)
    assert polled.status == "completed" and polled.usage is not None
    tokens = polled.usage.total_tokens  # 3 + 200,000 + 60 reasoning
    usage = await usage_of(gateway, records, 2)
    assert usage["totals"]["tokens"] == tokens
    assert usage["budget"]["spent_usd"] == pytest.approx(tokens * USD_PER_TOKEN)
    assert (await records(2))[1]["usage"]["total_tokens"] == tokens
    await big.responses.retrieve(made.id)  # claimed once: polled again, nothing more
    assert (await usage_of(gateway, records, 3))["totals"]["tokens"] == tokens


async def test_a_poll_by_another_key_charges_the_key_that_created_it_and_not_itself(
    background_gateway: MakeGateway, records: Records, log_path: Path
) -> None:
    gateway = await background_gateway()
    response_id = await create(gateway)
    # Another virtual key of the same real key fetches it finished: the creator pays.
    polled = await client(gateway, SHARED_VK).responses.retrieve(response_id)
    assert polled.status == "completed"
    shared = await usage_of(gateway, records, 2, SHARED_VK)
    assert shared["totals"]["tokens"] == 0 and shared["totals"]["spent_usd"] == 0
    creator = await usage_of(gateway, records, 2)
    assert creator["totals"]["tokens"] == REAL_TOKENS
    assert creator["budget"]["spent_usd"] == pytest.approx(REAL_TOKENS * USD_PER_TOKEN)
    # Once: neither the creator's own poll nor a third key's charges it again.
    await client(gateway).responses.retrieve(response_id)
    await client(gateway, OTHER_VK).responses.retrieve(response_id)
    with pytest.raises(openai.NotFoundError):
        await client(gateway).responses.retrieve("resp_never_made_here")
    assert (await usage_of(gateway, records, 5))["totals"]["tokens"] == REAL_TOKENS
    for vk in (SHARED_VK, OTHER_VK):
        assert (await usage_of(gateway, records, 5, vk))["totals"]["tokens"] == 0
    post, poll, *rest = await records(5)
    # The claiming line shows what it claimed and its cost, under its own key's name only.
    assert poll["key"] == "shared" and poll["usage"]["total_tokens"] == REAL_TOKENS
    assert poll["cost_usd"] == pytest.approx(REAL_TOKENS * USD_PER_TOKEN)
    assert "background" not in json.dumps(poll)  # the creator's name
    assert [line["usage"] for line in rest] == [None, None, None]
    text = log_path.read_text()
    assert not any(secret in text for secret in ALL_SECRETS)


async def test_the_creators_team_pays_too_when_a_key_outside_it_fetches_the_response(
    make_gateway: MakeGateway, fake_base: str, tmp_path: Path, records: Records
) -> None:
    document = keys_document(fake_base)
    document["teams"] = {"research": {"quota": {"requests": 100, "tokens": 100_000}}}
    document["virtual_keys"].update(background_keys())
    document["virtual_keys"][BUDGET_VK]["team"] = "research"  # SHARED_VK is in no team
    path = tmp_path / "team-keys.json"
    path.write_text(json.dumps(document))
    gateway = await make_gateway(KEYS_FILE_PATH=str(path))
    response_id = await create(gateway)
    await client(gateway, SHARED_VK).responses.retrieve(response_id)
    creator = await usage_of(gateway, records, 2)
    assert creator["totals"]["tokens"] == REAL_TOKENS
    assert creator["team"]["tokens"]["used"] == REAL_TOKENS
    assert (await usage_of(gateway, records, 2, SHARED_VK))["totals"]["tokens"] == 0


async def test_a_streamed_background_request_is_charged_by_its_stream_and_owes_nothing(
    background_gateway: MakeGateway, records: Records
) -> None:
    gateway = await background_gateway()
    events = await client(gateway).responses.create(
        model="gpt-4o-mini", input=INPUT, background=True, stream=True
    )
    kinds, response_id = [], None
    async for event in events:
        kinds.append(event.type)
        if event.type == "response.created":
            response_id = event.response.id
    assert kinds[-1] == "response.completed" and response_id is not None
    (line,) = await records(1)
    assert line["usage"]["total_tokens"] == REAL_TOKENS and not line["usage"]["estimated"]
    await client(gateway).responses.retrieve(response_id)  # not owed: charged nothing more
    assert (await usage_of(gateway, records, 2))["totals"]["tokens"] == REAL_TOKENS


async def cut_at(gateway: TestClient, marker: bytes, **headers: str) -> tuple[str, bytes]:
    """A background stream by the creator, read until `marker` and then dropped (the client
    leaves): its response id, and what the client received."""
    body = {"model": "gpt-4o-mini", "input": INPUT, "background": True, "stream": True}
    sent = {**auth(BUDGET_VK), **ANSWER, "x-fake-delay-ms": "20", **headers}
    received = b""
    async with gateway.post("/v1/responses", json=body, headers=sent) as response:
        with contextlib.suppress(aiohttp.ClientPayloadError):  # cut for the client too
            async for chunk in response.content.iter_any():
                received += chunk
                if marker in received:
                    break
        response.close()
    created = json.loads(received.split(b"data: ", 1)[1].split(b"\n", 1)[0])
    assert created["type"] == "response.created"
    return created["response"]["id"], received


async def test_a_background_stream_cut_at_its_text_is_charged_it_and_its_creator_the_rest(
    background_gateway: MakeGateway, records: Records
) -> None:
    """Issue 22's case: read up to `response.output_text.done`, dropped, then fetched finished
    by a second key of the same real key. The cut is charged what it delivered; the fetch
    charges the creator the rest, once, whatever comes after (polls, a cancel, a resume)."""
    gateway = await background_gateway()
    response_id, received = await cut_at(gateway, b"response.output_text.done")
    assert b"response.completed" not in received
    (post,) = await records(1)
    assert post["status"] == 499 and post["usage"]["estimated"] is True
    delivered = post["usage"]["total_tokens"]
    assert 40 <= post["usage"]["completion_tokens"] and delivered < REAL_TOKENS
    assert (await usage_of(gateway, records, 1))["totals"]["tokens"] == delivered
    polled = await client(gateway, SHARED_VK).responses.retrieve(response_id)
    assert polled.status == "completed"
    creator = await usage_of(gateway, records, 2)
    assert creator["totals"]["tokens"] == REAL_TOKENS  # delivered, then the rest
    assert creator["budget"]["spent_usd"] == pytest.approx(REAL_TOKENS * USD_PER_TOKEN)
    assert (await usage_of(gateway, records, 2, SHARED_VK))["totals"]["tokens"] == 0
    (_, fetched) = await records(2)
    assert fetched["usage"]["total_tokens"] == REAL_TOKENS - delivered
    # Polled again, cancelled, resumed as a stream, by either key: nothing more.
    await client(gateway).responses.retrieve(response_id)
    await client(gateway, SHARED_VK).responses.cancel(response_id)
    events = await client(gateway).responses.retrieve(response_id, stream=True)
    assert [event.type async for event in events]
    assert (await usage_of(gateway, records, 5))["totals"]["tokens"] == REAL_TOKENS
    assert [line["usage"] for line in (await records(5))[2:]] == [None, None, None]


async def test_a_background_stream_cut_short_is_charged_what_it_delivered_and_then_the_rest(
    background_gateway: MakeGateway, records: Records
) -> None:
    """The provider's connection breaks mid-stream: the response runs on there (it may be
    resumed), so what streamed is charged now and the rest is owed, not forgotten."""
    gateway = await background_gateway()
    response_id, _ = await cut_at(gateway, b"\0", **{"x-fake-drop": "midstream"})
    (post,) = await records(1)
    delivered = post["usage"]["total_tokens"]
    assert post["usage"]["estimated"] is True and 0 < delivered < REAL_TOKENS
    assert (await usage_of(gateway, records, 1))["totals"]["tokens"] == delivered
    events = await client(gateway).responses.retrieve(response_id, stream=True)
    assert [event.type async for event in events][-1] == "response.completed"
    assert (await usage_of(gateway, records, 2))["totals"]["tokens"] == REAL_TOKENS
    _, resumed = await records(2)
    assert resumed["usage"]["total_tokens"] == REAL_TOKENS - delivered


async def test_a_background_stream_the_client_leaves_at_once_is_charged_its_prompt_and_owed(
    background_gateway: MakeGateway, records: Records
) -> None:
    gateway = await background_gateway()
    response_id, _ = await cut_at(gateway, b"\n\n", **{"x-fake-delay-ms": "50"})
    (post,) = await records(1)
    # Nothing generated yet: its prompt's estimate, not its reservation (it is owed).
    assert post["status"] == 499 and post["usage"]["completion_tokens"] == 0
    assert post["usage"]["prompt_tokens"] > 0
    events = await client(gateway).responses.retrieve(response_id, stream=True)
    assert [event.type async for event in events][-1] == "response.completed"
    assert (await usage_of(gateway, records, 2))["totals"]["tokens"] == REAL_TOKENS


async def test_a_background_answer_that_is_not_a_queued_response_is_still_estimated(
    background_gateway: MakeGateway, records: Records
) -> None:
    gateway = await background_gateway()
    response = await gateway.post(
        "/v1/responses",
        json={"model": "gpt-4o-mini", "input": INPUT, "background": True},
        headers={**auth(BUDGET_VK), "x-fake-raw-chunks": "3"},  # not JSON: unreadable
    )
    assert response.status == 200
    await response.read()
    (line,) = await records(1)
    assert line["usage"]["estimated"] is True  # never nothing


# --- the pieces, without a server -------------------------------------------------------
