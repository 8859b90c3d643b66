"""A stream the provider answers 200 and whose first event is an error: failed over.

Anthropic answers an overloaded model with a 200 stream whose first event is
`event: error` (`overloaded_error`); OpenRouter and OpenAI-compatible servers send a 200,
then a chunk holding `{"error": {...}}`. Nothing of it has reached the client when that
first event is read (the head waits for the first chunk), so a key with somewhere else to
go (a pool's other key, a fallback) tries it, and the client's SDK sees one clean stream.
Without anywhere else to go, or when content came first, the stream goes on byte for byte.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from aiohttp.test_utils import TestClient

from proxy.app import build_app
from proxy.settings import Settings
from tests.app.test_failover import keys_seen
from tests.conftest import auth
from tests.support.bodies import chat, messages
from tests.support.fake_provider import FakeState, Fault
from tests.support.polling import until

CHAT = chat("hello")
MESSAGES = messages(model="claude-haiku-4-5")
VK = "vk_test_stream_failover_7e1"
PRIMARY = "sk-primary-real-1111111111"
BACKUP = "sk-backup-real-2222222222"
POOL = ("sk-pool-real-aaaaaaaaaa", "sk-pool-real-bbbbbbbbbb")
ANT_PRIMARY = "sk-ant-primary-3333333333"
ANT_BACKUP = "sk-ant-backup-4444444444"
ANT_POOL = ("sk-ant-pool-aaaaaaaaaa", "sk-ant-pool-bbbbbbbbbb")
WITH_FALLBACK = {
    "provider": "openai",
    "api_key": PRIMARY,
    "fallbacks": [{"provider": "backup", "api_key": BACKUP}],
}
ANT_WITH_FALLBACK = {
    "provider": "anthropic",
    "api_key": ANT_PRIMARY,
    "fallbacks": [{"provider": "ant-backup", "api_key": ANT_BACKUP}],
}
Records = Callable[..., Awaitable[list[dict[str, Any]]]]


@pytest.fixture
def gateway_for(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    tmp_path: Path,
    fake_base: str,
    log_path: Path,
) -> Callable[..., Awaitable[TestClient]]:
    """A gateway whose one key is `key` (openai, backup, anthropic, ant-backup on the fake)."""

    async def make(
        key: dict[str, Any], others: dict[str, Any] | None = None, **env: str
    ) -> TestClient:
        base = fake_base
        document = {
            "providers": {
                "openai": {"base_url": f"{base}/v1"},
                "backup": {"base_url": f"{base}/v1"},
                "anthropic": {"base_url": f"{base}/v1"},
                "ant-backup": {"base_url": f"{base}/v1", "auth": "x-api-key", "api": "anthropic"},
            },
            "virtual_keys": {VK: {"name": "stream-failover", **key}, **(others or {})},
        }
        path = tmp_path / "keys.json"
        path.write_text(json.dumps(document))
        settings = Settings.from_env(
            {"KEYS_FILE_PATH": str(path), "LOG_TO_FILE": "true", "LOG_FILE_PATH": str(log_path)}
            | env
        )
        return await aiohttp_client(
            build_app(settings), server_kwargs={"handler_cancellation": True}
        )

    return make


def openai_client(gateway: TestClient) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=VK, base_url=str(gateway.make_url("/v1")), max_retries=0)


def anthropic_client(gateway: TestClient) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(api_key=VK, base_url=str(gateway.make_url("")), max_retries=0)


async def streamed_text(client: openai.AsyncOpenAI) -> str:
    stream = await client.chat.completions.create(**CHAT, stream=True)
    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


async def served_by_backup(records: Records) -> dict[str, Any]:
    """The one log line, of a request the fallback served after the primary's 200 failed."""
    [line] = await records(1)
    assert line["status"] == 200 and line["target"] == "backup"
    assert [(a["target"], a["status"]) for a in line["attempts"]] == [
        ("openai", 200),
        ("backup", 200),
    ]
    return line


async def test_an_openai_stream_whose_first_event_is_a_server_error_is_served_by_the_fallback(
    gateway_for: Callable[..., Awaitable[TestClient]], fake: FakeState, records: Records
) -> None:
    gateway = await gateway_for(WITH_FALLBACK)
    fake.faults[PRIMARY] = Fault(500, in_stream="first")
    assert await streamed_text(openai_client(gateway)) == "tok0 tok1 tok2 "
    assert keys_seen(fake) == [PRIMARY, BACKUP]
    line = await served_by_backup(records)
    assert "server_error" in line["attempts"][0]["error"]
    assert line["attempts"][1]["error"] is None
    health = await (await gateway.get("/health")).json()
    assert "server_error" in health["targets"]["openai"]["last_error"]  # the breaker heard
    text = await (await gateway.get("/metrics")).text()
    assert 'llm_gateway_failovers_total{provider="openai",reason="500"} 1.0' in text
    fake.faults.clear()
    assert await streamed_text(openai_client(gateway)) == "tok0 tok1 tok2 "
    alone = (await records(2))[1]
    assert len(alone["attempts"]) == 1
    assert line["usage"] == alone["usage"]  # the answering attempt's usage, alone


async def test_an_openrouter_error_chunk_after_a_comment_moves_to_the_pools_other_key(
    gateway_for: Callable[..., Awaitable[TestClient]], fake: FakeState, records: Records
) -> None:
    gateway = await gateway_for({"provider": "openai", "api_keys": [{"api_key": k} for k in POOL]})
    fake.faults[POOL[0]] = Fault(502, in_stream="openrouter")
    client = openai_client(gateway)
    for _ in range(2):  # whichever key the pool picks first
        assert await streamed_text(client) == "tok0 tok1 tok2 "
    seen = keys_seen(fake)
    assert POOL[0] in seen and seen[-1] == POOL[1]
    assert seen.count(POOL[0]) == 1 and seen[seen.index(POOL[0]) + 1] == POOL[1]


async def test_an_anthropic_overloaded_error_first_is_served_by_the_fallback(
    gateway_for: Callable[..., Awaitable[TestClient]], fake: FakeState, records: Records
) -> None:
    gateway = await gateway_for(ANT_WITH_FALLBACK)
    fake.faults[ANT_PRIMARY] = Fault(529, in_stream="first")
    async with anthropic_client(gateway).messages.stream(**MESSAGES) as stream:
        text = "".join([piece async for piece in stream.text_stream])
    assert text
    assert keys_seen(fake) == [ANT_PRIMARY, ANT_BACKUP]
    [line] = await records(1)
    assert line["provider"] == "ant-backup"
    assert "overloaded_error" in line["attempts"][0]["error"]


async def test_an_anthropic_overloaded_error_after_the_messages_start_is_served_by_the_fallback(
    gateway_for: Callable[..., Awaitable[TestClient]], fake: FakeState, records: Records
) -> None:
    """Anthropic starts a stream (`message_start`, `ping`) before an overload is known: the
    start says nothing of the answer yet, so it is held, and the fallback's stream is the
    one the client gets, with one start."""
    gateway = await gateway_for(ANT_WITH_FALLBACK)
    fake.faults[ANT_PRIMARY] = Fault(529, in_stream="started")
    headers = {
        **auth(VK),
        "anthropic-version": "2023-06-01",
        "x-request-id": "req_sf_started",
    }
    response = await gateway.post(
        "/v1/messages", json={**MESSAGES, "stream": True}, headers=headers
    )
    assert response.status == 200
    body = await response.read()
    assert body.count(b"event: message_start") == 1
    assert b"overloaded_error" not in body and b"content_block_delta" in body
    assert keys_seen(fake) == [ANT_PRIMARY, ANT_BACKUP]
    async with anthropic_client(gateway).messages.stream(**MESSAGES) as stream:
        assert "".join([piece async for piece in stream.text_stream])
    lines = await records(2)
    assert [line["provider"] for line in lines] == ["ant-backup", "ant-backup"]
    assert "overloaded_error" in lines[0]["attempts"][0]["error"]


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br"])
async def test_a_compressed_stream_whose_first_event_is_an_error_is_served_by_the_fallback(
    gateway_for: Callable[..., Awaitable[TestClient]],
    fake: FakeState,
    records: Records,
    coding: str,
) -> None:
    """The Anthropic SDK asks for compressed answers (`Accept-Encoding: gzip, deflate, br`),
    and Anthropic compresses its streams so: an overload after `message_start` in a gzip
    stream is the same failure of the moment as in a plain one."""
    gateway = await gateway_for(ANT_WITH_FALLBACK)
    fake.faults[ANT_PRIMARY] = Fault(529, in_stream="started")
    client = anthropic_client(gateway).with_options(default_headers={"x-fake-encoding": coding})
    async with client.messages.stream(**MESSAGES) as stream:
        text = "".join([piece async for piece in stream.text_stream])
    assert text
    assert keys_seen(fake) == [ANT_PRIMARY, ANT_BACKUP]
    [line] = await records(1)
    assert line["provider"] == "ant-backup"
    assert "overloaded_error" in line["attempts"][0]["error"]
    # Content first, compressed: the stream is the answer, never failed over, and goes on
    # as the provider coded it.
    fake.faults[ANT_PRIMARY] = Fault(529, in_stream="after")
    headers = {
        **auth(VK),
        "anthropic-version": "2023-06-01",
        "x-request-id": f"req_sf_coded_{coding}",
        "x-fake-encoding": coding,
    }
    response = await gateway.post(
        "/v1/messages", json={**MESSAGES, "stream": True}, headers=headers, auto_decompress=False
    )
    assert response.headers["Content-Encoding"] == coding
    assert await response.read() == fake.sent[f"req_sf_coded_{coding}"]
    assert keys_seen(fake)[2:] == [ANT_PRIMARY]


async def test_a_responses_stream_of_a_key_whose_quota_is_spent_is_served_by_the_fallback(
    gateway_for: Callable[..., Awaitable[TestClient]], fake: FakeState, records: Records
) -> None:
    """OpenAI answers a request not streamed of a key whose quota is spent 429
    `insufficient_quota`, which the fallback answers; streamed on the Responses API, the
    same failure comes as a 200: `response.created`, `response.in_progress`, then an `error`
    event `insufficient_quota` (Bifrost's #5395, #5040). It is that 429, here too."""
    gateway = await gateway_for(WITH_FALLBACK)
    fake.faults[PRIMARY] = Fault(429, in_stream="started", code="insufficient_quota")
    client = openai_client(gateway)
    stream = await client.responses.create(model="gpt-4o-mini", input="hi", stream=True)
    kinds = [event.type async for event in stream]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert keys_seen(fake) == [PRIMARY, BACKUP]
    [line] = await records(1)
    assert line["target"] == "backup"
    assert "insufficient_quota" in line["attempts"][0]["error"]


async def test_an_openai_server_error_after_the_role_chunk_is_served_by_the_fallback(
    gateway_for: Callable[..., Awaitable[TestClient]], fake: FakeState, records: Records
) -> None:
    gateway = await gateway_for(WITH_FALLBACK)
    fake.faults[PRIMARY] = Fault(500, in_stream="started")
    assert await streamed_text(openai_client(gateway)) == "tok0 tok1 tok2 "
    assert keys_seen(fake) == [PRIMARY, BACKUP]
    [line] = await records(1)
    assert line["target"] == "backup" and "server_error" in line["attempts"][0]["error"]


async def test_an_anthropic_rate_limit_error_first_rests_the_pool_key(
    gateway_for: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    key = {"provider": "anthropic", "api_keys": [{"api_key": k} for k in ANT_POOL]}
    gateway = await gateway_for(key, QUOTA_ENABLED="false")
    fake.faults[ANT_POOL[0]] = Fault(429, in_stream="first")
    client = anthropic_client(gateway)
    for _ in range(4):
        async with client.messages.stream(**MESSAGES) as stream:
            assert "".join([piece async for piece in stream.text_stream])
    # Asked once, its rate limit heard as a 429's: it rests, the other key serves.
    assert keys_seen(fake).count(ANT_POOL[0]) == 1


async def test_without_anywhere_else_to_go_the_error_stream_goes_on_byte_for_byte(
    gateway_for: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    gateway = await gateway_for({"provider": "anthropic", "api_key": ANT_PRIMARY})
    fake.faults[ANT_PRIMARY] = Fault(529, in_stream="first")
    with pytest.raises(anthropic.APIStatusError, match="fake provider error 529"):
        async with anthropic_client(gateway).messages.stream(**MESSAGES) as stream:
            async for _ in stream.text_stream:
                pass
    headers = {**auth(VK), "anthropic-version": "2023-06-01", "x-request-id": "req_sf_1"}
    response = await gateway.post(
        "/v1/messages", json={**MESSAGES, "stream": True}, headers=headers
    )
    assert response.status == 200
    assert await response.read() == fake.sent["req_sf_1"]


async def test_when_the_fallback_fails_too_the_client_gets_its_error_stream_unchanged(
    gateway_for: Callable[..., Awaitable[TestClient]], fake: FakeState, records: Records
) -> None:
    gateway = await gateway_for(WITH_FALLBACK)
    fake.faults[PRIMARY] = Fault(503, in_stream="first")
    fake.faults[BACKUP] = Fault(503, in_stream="first")
    with pytest.raises(openai.APIError, match="fake provider error 503"):
        await streamed_text(openai_client(gateway))
    assert keys_seen(fake) == [PRIMARY, BACKUP]
    headers = {**auth(VK), "x-request-id": "req_sf_2"}
    response = await gateway.post(
        "/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers
    )
    assert response.status == 200
    assert await response.read() == fake.sent["req_sf_2"]


@pytest.mark.parametrize(
    "fault",
    [Fault(400, in_stream="first"), Fault(400, in_stream="started"), Fault(503, in_stream="after")],
)
async def test_a_request_error_or_an_error_after_content_is_never_failed_over(
    gateway_for: Callable[..., Awaitable[TestClient]], fake: FakeState, fault: Fault
) -> None:
    """An invalid request fails the same everywhere; after content the stream is the answer."""
    gateway = await gateway_for(WITH_FALLBACK)
    fake.faults[PRIMARY] = fault
    headers = {**auth(VK), "x-request-id": "req_sf_3"}
    response = await gateway.post(
        "/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers
    )
    assert response.status == 200
    assert await response.read() == fake.sent["req_sf_3"]
    assert keys_seen(fake) == [PRIMARY]
    with pytest.raises(openai.APIError, match="fake provider error"):
        await streamed_text(openai_client(gateway))
    assert keys_seen(fake) == [PRIMARY, PRIMARY]


async def test_an_openrouter_answer_carrying_its_error_is_served_by_the_fallback(
    gateway_for: Callable[..., Awaitable[TestClient]], fake: FakeState, records: Records
) -> None:
    """OpenRouter answers a request not streamed whose provider failed after its 200 with a
    200 whose body's top-level `error` names the status (LiteLLM's #8448): with a fallback
    beside it, the fallback answers (the client's SDK got a completion with no content and
    `finish_reason` "error"); without one, it goes on as it came. An answer whose error
    is no failure of the moment (a 400) is not retried."""
    gateway = await gateway_for(WITH_FALLBACK)
    fake.faults[PRIMARY] = Fault(502, in_answer=True)
    client = openai_client(gateway)
    completion = await client.chat.completions.create(**CHAT)
    assert completion.choices[0].message.content == "tok0 tok1 tok2 "
    assert keys_seen(fake) == [PRIMARY, BACKUP]
    line = await served_by_backup(records)
    assert "error 502" in line["attempts"][0]["error"]
    fake.faults[PRIMARY] = Fault(400, in_answer=True)
    refused = await client.chat.completions.create(**CHAT)
    assert refused.choices[0].finish_reason == "error"
    assert keys_seen(fake)[2:] == [PRIMARY]
    alone = await gateway_for({"provider": "openai", "api_key": PRIMARY})
    fake.faults[PRIMARY] = Fault(502, in_answer=True)
    passed = await openai_client(alone).chat.completions.create(**CHAT)
    assert passed.choices[0].finish_reason == "error"
    assert keys_seen(fake)[3:] == [PRIMARY]


async def test_a_compressed_openrouter_answer_carrying_its_error_is_served_by_the_fallback(
    gateway_for: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    """The OpenAI SDK asks for compressed answers too (`Accept-Encoding: gzip, deflate`):
    OpenRouter's 200 carrying its provider's failure, gzipped, was passed on (an empty
    completion) where the same answer uncompressed went to the fallback."""
    gateway = await gateway_for(WITH_FALLBACK)
    fake.faults[PRIMARY] = Fault(502, in_answer=True)
    client = openai_client(gateway).with_options(default_headers={"x-fake-encoding": "gzip"})
    completion = await client.chat.completions.create(**CHAT)
    assert completion.choices[0].message.content == "tok0 tok1 tok2 "
    assert keys_seen(fake) == [PRIMARY, BACKUP]


async def test_a_first_event_slower_than_retry_max_wait_goes_on_as_it_comes(
    gateway_for: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    """The wait for the first event is bounded (RETRY_MAX_WAIT_SECONDS): past it, the stream
    goes on as today, whatever it turns out to hold."""
    gateway = await gateway_for(WITH_FALLBACK, RETRY_MAX_WAIT_SECONDS="0.05")
    fake.faults[PRIMARY] = Fault(502, in_stream="openrouter")
    headers = {**auth(VK), "x-request-id": "req_sf_4", "x-fake-delay-ms": "500"}
    response = await gateway.post(
        "/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers
    )
    assert response.status == 200
    assert await response.read() == fake.sent["req_sf_4"]
    assert keys_seen(fake) == [PRIMARY]


async def test_a_client_leaving_while_the_first_event_is_awaited_lets_the_provider_go(
    gateway_for: Callable[..., Awaitable[TestClient]], fake: FakeState, records: Records
) -> None:
    gateway = await gateway_for(WITH_FALLBACK)
    fake.faults[PRIMARY] = Fault(502, in_stream="openrouter")
    headers = {**auth(VK), "x-request-id": "req_sf_5", "x-fake-delay-ms": "5000"}
    asking = asyncio.create_task(
        gateway.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers)
    )
    await until(lambda: fake.sent.get("req_sf_5"))  # its comment came: the error is awaited
    asking.cancel()
    await until(lambda: fake.disconnects)  # the gateway closed the provider's connection
    [line] = await records(1)
    assert line["status"] == 499 and line["error"] == "client closed the connection"
    assert [a["error"] for a in line["attempts"]] == ["client closed the connection"]
    assert keys_seen(fake) == [PRIMARY]


async def test_a_stream_failed_for_its_first_event_whose_fallback_is_open_goes_on_whole(
    gateway_for: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    """Read for a fallback that turns out closed to it (its breaker opened by another key's
    request): the primary's stream, kept, is the answer, its bytes as they came."""
    backup_vk = "vk_test_stream_failover_backup_2f"
    others = {backup_vk: {"name": "backup-only", "provider": "backup", "api_key": BACKUP}}
    gateway = await gateway_for(WITH_FALLBACK, others, BREAKER_FAILURES="1")
    fake.faults[BACKUP] = Fault(503, times=1)
    opening = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(backup_vk))
    assert opening.status == 503  # the backup's breaker is open now
    fake.faults[PRIMARY] = Fault(529, in_stream="first")
    headers = {**auth(VK), "x-request-id": "req_sf_6"}
    response = await gateway.post(
        "/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers
    )
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert await response.read() == fake.sent["req_sf_6"]
    assert keys_seen(fake) == [BACKUP, PRIMARY]


async def test_a_held_starts_time_to_first_byte_is_when_the_provider_sent_it(
    gateway_for: Callable[..., Awaitable[TestClient]], records: Records
) -> None:
    """ttft_ms is the provider's first body byte: a stream's start (here OpenAI's role chunk)
    held while its first event past it is awaited came at once, though the content (a
    reasoning model's, minutes later) came after a wait."""
    gateway = await gateway_for(WITH_FALLBACK)
    wait_ms = 800
    headers = {
        **auth(VK),
        "x-request-id": "req_sf_ttft",
        "x-fake-delay-ms": str(wait_ms),
        "x-fake-chunks": "1",
    }
    response = await gateway.post(
        "/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers
    )
    assert response.status == 200
    await response.read()
    [line] = await records(1)
    assert line["ttft_ms"] < wait_ms / 2, line["ttft_ms"]  # the role chunk's, not the content's


async def test_a_last_targets_first_event_error_is_heard_by_its_breaker_once(
    gateway_for: Callable[..., Awaitable[TestClient]], fake: FakeState, records: Records
) -> None:
    # Every target fails so: the client gets the backup's stream as it came. The attempt loop
    # heard its first event as a 500 already; the end of that stream tells the breaker nothing
    # more (one failure, not two), and the upstream errors metric counts the answer once.
    gateway = await gateway_for(WITH_FALLBACK)
    fake.faults[PRIMARY] = fake.faults[BACKUP] = Fault(500, in_stream="first")
    async with gateway.post("/v1/chat/completions", json=chat(stream=True), headers=auth(VK)) as r:
        assert r.status == 200 and b"server_error" in await r.read()
    [line] = await records(1)
    assert [a["target"] for a in line["attempts"]] == ["openai", "backup"]
    targets = (await (await gateway.get("/health")).json())["targets"]
    assert targets["openai"]["failures_in_a_row"] == targets["backup"]["failures_in_a_row"] == 1
    text = await (await gateway.get("/metrics")).text()
    assert 'llm_gateway_upstream_errors_total{kind="error_event",provider="backup"} 1.0' in text
