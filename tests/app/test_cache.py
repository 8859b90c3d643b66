"""The response cache, as a client sees it, in front of the fake provider.

A hit is the provider's first answer byte for byte and never goes upstream (the fake counts
what reached it); JSON and stream requests, keys without a shared scope, and the client's
no-cache / no-store are kept apart; errors and cut streams are never stored; identical
requests in flight go upstream once; entries expire and are evicted; the SDKs read a hit
as they read the original.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient
from anthropic import AsyncAnthropic
from openai import AsyncOpenAI

from proxy.app import CACHE, build_app
from proxy.settings import Settings
from tests.conftest import OPENAI_REAL, OPENAI_VK, assert_openai_error, auth, keys_document
from tests.support.bodies import chat
from tests.support.fake_provider import FakeState, Fault
from tests.support.polling import until

CACHED_VK = "vk_test_cached_1a2b3c4d5e6f"
OTHER_VK = "vk_test_cached_other_7a8b9c0d"
SHARED_A_VK = "vk_test_shared_a_2b4d6f8a0c"
SHARED_B_VK = "vk_test_shared_b_3c5e7a9b1d"
SHARED_OTHER_MODEL_VK = "vk_test_shared_gpt4o_5e7a9c1b3d"
SHARED_OTHER_ACCOUNT_VK = "vk_test_shared_account_6f8b0d2e4a"
CLAUDE_VK = "vk_test_cached_claude_4d6f8b0c2e"
COUNTED_VK = "vk_test_cached_counted_5e7a9c1d3f"
ROUTED_VK = "vk_test_cached_routed_7b9d1f3a5c"
ROUTED_REAL = "sk-real-cached-routed-0000000000"
TTL = 300
CHAT = chat("say hello please")
STREAM = {**CHAT, "stream": True}
CHAT_PATH = "/v1/chat/completions"
MESSAGES = {
    "model": "claude-3-5-haiku-20241022",
    "max_tokens": 20,
    "messages": [{"role": "user", "content": "hi"}],
}


def body(document: dict[str, Any]) -> bytes:
    return orjson.dumps(document)


@pytest.fixture
def cached_keys(keys_file: Path, fake_base: str) -> Path:
    """The test keys, plus keys with a cache: two private, two sharing a scope, one Anthropic,
    one with a quota of 3 requests, one with a fallback and a route to Anthropic."""
    document = keys_document(fake_base)
    cache = {"ttl_seconds": TTL}
    document["virtual_keys"].update(
        {
            CACHED_VK: {
                "provider": "openai",
                "api_key": OPENAI_REAL,
                "name": "cached",
                "cache": cache,
            },
            OTHER_VK: {
                "provider": "openai",
                "api_key": OPENAI_REAL,
                "name": "other",
                "cache": cache,
            },
            SHARED_A_VK: {
                "provider": "openai",
                "api_key": OPENAI_REAL,
                "name": "shared-a",
                "cache": {"ttl_seconds": TTL, "scope": "docs-bot"},
            },
            SHARED_B_VK: {
                "provider": "openai",
                "api_key": OPENAI_REAL,
                "name": "shared-b",
                "cache": {"ttl_seconds": TTL, "scope": "docs-bot"},
            },
            SHARED_OTHER_MODEL_VK: {
                "provider": "openai",
                "api_key": OPENAI_REAL,
                "model": "gpt-4o",
                "name": "shared-gpt-4o",
                "cache": {"ttl_seconds": TTL, "scope": "docs-bot"},
            },
            SHARED_OTHER_ACCOUNT_VK: {
                "provider": "openai",
                "api_key": "sk-real-another-project-0000000000",
                "name": "shared-other-account",
                "cache": {"ttl_seconds": TTL, "scope": "docs-bot"},
            },
            CLAUDE_VK: {
                "provider": "anthropic",
                "api_key": "sk-ant-real-cached-0000000000",
                "name": "cached-claude",
                "cache": cache,
            },
            COUNTED_VK: {
                "provider": "openai",
                "api_key": OPENAI_REAL,
                "name": "counted",
                "quota": {"requests": 3, "window_seconds": 3600},
                "cache": cache,
            },
            ROUTED_VK: {
                "provider": "openai",
                "api_key": ROUTED_REAL,
                "fallbacks": [{"provider": "azure", "api_key": "azure-real-cached-0000000000"}],
                "routes": [
                    {
                        "models": ["claude-*"],
                        "provider": "anthropic",
                        "api_key": "sk-ant-real-cached-routed-000000",
                    }
                ],
                "name": "cached-routed",
                "cache": cache,
            },
        }
    )
    keys_file.write_text(json.dumps(document))
    return keys_file


@pytest.fixture
def make_cached(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    settings: Callable[..., Settings],
    cached_keys: Path,
) -> Callable[..., Awaitable[TestClient]]:
    async def make(clock: Callable[[], float] | None = None, **env: str) -> TestClient:
        extra = {} if clock is None else {"cache_clock": clock}
        app = build_app(settings(**env), **extra)
        return await aiohttp_client(app, server_kwargs={"handler_cancellation": True})

    return make


@pytest.fixture
async def gateway(make_cached: Callable[..., Awaitable[TestClient]]) -> TestClient:
    return await make_cached()


async def post(
    gateway: TestClient,
    key: str = CACHED_VK,
    document: dict[str, Any] = CHAT,
    path: str = CHAT_PATH,
    **headers: str,
) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and the exact body bytes of one request."""
    response = await gateway.post(path, data=body(document), headers={**auth(key), **headers})
    return response.status, dict(response.headers), await response.read()


def provider_headers(headers: dict[str, str]) -> dict[str, str]:
    """The headers that came from the provider (the gateway's own are per request)."""
    # Set-Cookie is the first client's: never replayed to another.
    own = {"x-request-id", "x-llm-gateway-cache", "server", "set-cookie"}
    return {
        name: value
        for name, value in headers.items()
        if name.lower() not in own and not name.lower().startswith("x-ratelimit-")
    }


async def test_the_same_chat_body_twice_goes_upstream_once_with_identical_bytes(
    gateway: TestClient, fake: FakeState, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    first = await post(gateway)
    second = await post(gateway)
    assert first[0] == second[0] == 200
    assert second[2] == first[2]  # the fake makes a fresh id per answer: only a replay repeats it
    assert provider_headers(second[1]) == provider_headers(first[1])
    assert (first[1]["x-llm-gateway-cache"], second[1]["x-llm-gateway-cache"]) == ("miss", "hit")
    assert second[1]["X-Request-ID"] != first[1]["X-Request-ID"]
    assert len(fake.requests) == 1
    miss, hit = await records(2)
    assert (miss["cache"], hit["cache"]) == ("miss", "hit")
    assert hit["usage"] == miss["usage"] and hit["usage"]["total_tokens"] > 0
    assert hit["cost_usd"] == miss["cost_usd"]  # what it would have cost
    assert "attempts" not in hit


async def test_a_stream_twice_replays_the_same_events_in_order_never_upstream(
    gateway: TestClient, fake: FakeState
) -> None:
    first = await post(gateway, document=STREAM, **{"x-fake-chunks": "5"})
    second = await post(gateway, document=STREAM, **{"x-fake-chunks": "5"})
    assert first[1]["Content-Type"].startswith("text/event-stream")
    assert second[1]["Content-Type"] == first[1]["Content-Type"]
    assert second[2] == first[2]
    events = [line for line in second[2].split(b"\n\n") if line]
    assert events[-1] == b"data: [DONE]" and len(events) >= 7
    assert second[1]["x-llm-gateway-cache"] == "hit"
    assert len(fake.requests) == 1


async def test_a_replayed_stream_is_not_held_back_by_nginx_in_front(
    gateway: TestClient, fake: FakeState
) -> None:
    """A streamed answer carries X-Accel-Buffering: no (docs/reverse-proxies.md), a hit too."""
    first = await post(gateway, document=STREAM, **{"x-fake-chunks": "5"})
    second = await post(gateway, document=STREAM, **{"x-fake-chunks": "5"})
    assert second[1]["x-llm-gateway-cache"] == "hit"
    assert first[1]["X-Accel-Buffering"] == second[1].get("X-Accel-Buffering") == "no"


async def test_json_and_stream_requests_never_cross(gateway: TestClient, fake: FakeState) -> None:
    json_first = await post(gateway)
    stream_first = await post(gateway, document=STREAM)
    assert stream_first[1]["x-llm-gateway-cache"] == "miss"
    json_again = await post(gateway)
    stream_again = await post(gateway, document=STREAM)
    assert json_again[1]["Content-Type"].startswith("application/json")
    assert (
        json_again[2] == json_first[2]
        and orjson.loads(json_again[2])["object"] == "chat.completion"
    )
    assert stream_again[1]["Content-Type"].startswith("text/event-stream")
    assert stream_again[2] == stream_first[2]
    assert len(fake.requests) == 2


async def test_keys_without_a_shared_scope_never_share_and_keys_with_one_do(
    gateway: TestClient, fake: FakeState
) -> None:
    await post(gateway, CACHED_VK)
    other = await post(gateway, OTHER_VK)
    assert other[1]["x-llm-gateway-cache"] == "miss"
    assert len(fake.requests) == 2
    shared = await post(gateway, SHARED_A_VK)
    assert shared[1]["x-llm-gateway-cache"] == "miss"  # a scope is not any key's own entries
    from_b = await post(gateway, SHARED_B_VK)
    assert from_b[1]["x-llm-gateway-cache"] == "hit" and from_b[2] == shared[2]
    assert len(fake.requests) == 3
    # The same scope and request, but the key's target answers with another model: its own.
    other_model = await post(gateway, SHARED_OTHER_MODEL_VK)
    assert other_model[1]["x-llm-gateway-cache"] == "miss"
    assert len(fake.requests) == 4 and orjson.loads(fake.requests[-1].body)["model"] == "gpt-4o"


async def test_keys_sharing_a_scope_on_another_account_never_share(
    gateway: TestClient, fake: FakeState
) -> None:
    """A real key names its account and project, whose files, stored prompts and previous
    responses a request reads (as OpenAI-Organization and OpenAI-Project do): a key of the
    scope on another account never reads the first one's answer to the same body."""
    part = {"type": "file", "file": {"file_id": "file-of-the-first-account"}}
    document = {**CHAT, "messages": [{"role": "user", "content": [part]}]}
    first = await post(gateway, SHARED_A_VK, document)
    other = await post(gateway, SHARED_OTHER_ACCOUNT_VK, document)
    assert (first[1]["x-llm-gateway-cache"], other[1]["x-llm-gateway-cache"]) == ("miss", "miss")
    assert len(fake.requests) == 2
    same_account = await post(gateway, SHARED_B_VK, document)
    assert same_account[1]["x-llm-gateway-cache"] == "hit" and same_account[2] == first[2]


async def test_a_key_without_a_cache_is_untouched(
    gateway: TestClient, fake: FakeState, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    first = await post(gateway, OPENAI_VK)
    second = await post(gateway, OPENAI_VK)
    assert "x-llm-gateway-cache" not in first[1] and second[2] != first[2]
    assert len(fake.requests) == 2
    assert [line["cache"] for line in await records(2)] == [None, None]


async def test_a_refused_request_of_a_key_with_a_cache_logs_bypass(
    gateway: TestClient, fake: FakeState, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    """SPEC: the log's `cache` is null only for a key without a cache; a request refused
    before the lookup neither read nor wrote the cache."""
    for _ in range(3):
        assert (await post(gateway, COUNTED_VK, document={**CHAT, "n": 1}))[0] == 200
    refused = await post(gateway, COUNTED_VK)
    assert refused[0] == 429
    bad = await gateway.post(
        CHAT_PATH,
        data=b"{not json",
        headers={**auth(CACHED_VK), "Content-Type": "application/json"},
    )
    assert bad.status == 400
    lines = await records(5)
    assert [line["status"] for line in lines] == [200, 200, 200, 429, 400]
    assert [line["cache"] for line in lines[3:]] == ["bypass", "bypass"]
    assert len(fake.requests) == 1  # the three same bodies: one miss, then hits


async def test_the_gateways_own_errors_to_a_key_with_a_cache_say_what_the_cache_did(
    gateway: TestClient, fake: FakeState, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    """SPEC: x-llm-gateway-cache is on the requests of keys with a cache, as the log's
    `cache` is: the gateway's own refusals and failures too, not only provider answers."""
    unread = await gateway.post(
        CHAT_PATH,
        data=b"{not json",
        headers={**auth(CACHED_VK), "Content-Type": "application/json"},
    )
    unreached = await post(gateway, CACHED_VK, **{"x-fake-drop": "headers"})
    assert (unread.status, unreached[0]) == (400, 502)
    said = [unread.headers.get("x-llm-gateway-cache"), unreached[1].get("x-llm-gateway-cache")]
    assert said == [line["cache"] for line in await records(2)] == ["bypass", "miss"]
    without = await gateway.post(
        CHAT_PATH,
        data=b"{not json",
        headers={**auth(OPENAI_VK), "Content-Type": "application/json"},
    )
    assert without.status == 400 and "x-llm-gateway-cache" not in without.headers


async def test_no_cache_goes_upstream_and_refreshes_the_entry(
    gateway: TestClient, fake: FakeState
) -> None:
    first = await post(gateway)
    fresh = await post(gateway, **{"Cache-Control": "no-cache"})
    assert fresh[1]["x-llm-gateway-cache"] == "bypass" and fresh[2] != first[2]
    await gateway.app[CACHE].settled()
    after = await post(gateway)
    assert after[1]["x-llm-gateway-cache"] == "hit" and after[2] == fresh[2]
    assert len(fake.requests) == 2


async def test_max_age_0_goes_upstream_and_refreshes_the_entry(
    gateway: TestClient, fake: FakeState
) -> None:
    # What fetch() sends for `cache: "no-cache"` and a browser's reload: revalidate, never an
    # answer from the cache (RFC 9111 §5.2.1.1).
    first = await post(gateway)
    fresh = await post(gateway, **{"Cache-Control": "max-age=0"})
    assert fresh[1]["x-llm-gateway-cache"] == "bypass" and fresh[2] != first[2]
    await gateway.app[CACHE].settled()
    after = await post(gateway)
    assert after[1]["x-llm-gateway-cache"] == "hit" and after[2] == fresh[2]
    assert len(fake.requests) == 2


async def test_max_age_takes_no_answer_older_than_it_says(
    make_cached: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    now = [1000.0]
    gateway = await make_cached(clock=lambda: now[0])
    await post(gateway)
    await gateway.app[CACHE].settled()
    now[0] += 30
    young = await post(gateway, **{"Cache-Control": "max-age=60"})
    assert young[1]["x-llm-gateway-cache"] == "hit"
    old = await post(gateway, **{"Cache-Control": "max-age=10"})
    assert old[1]["x-llm-gateway-cache"] == "miss"  # too old for it: asked again, and stored
    await gateway.app[CACHE].settled()
    assert (await post(gateway, **{"Cache-Control": "max-age=10"}))[1][
        "x-llm-gateway-cache"
    ] == "hit"
    assert len(fake.requests) == 2


async def test_no_store_neither_reads_nor_writes(gateway: TestClient, fake: FakeState) -> None:
    unstored = await post(gateway, **{"Cache-Control": "no-store"})
    assert unstored[1]["x-llm-gateway-cache"] == "bypass"
    first = await post(gateway)
    assert first[1]["x-llm-gateway-cache"] == "miss" and first[2] != unstored[2]
    skipped = await post(gateway, **{"Cache-Control": "no-store"})
    assert skipped[1]["x-llm-gateway-cache"] == "bypass" and skipped[2] != first[2]
    assert len(fake.requests) == 3


async def test_an_error_is_never_stored(gateway: TestClient, fake: FakeState) -> None:
    error = await post(gateway, **{"x-fake-status": "500"})
    assert error[0] == 500 and error[1]["x-llm-gateway-cache"] == "miss"
    answer = await post(gateway)
    assert answer[0] == 200 and answer[1]["x-llm-gateway-cache"] == "miss"
    assert (await post(gateway))[1]["x-llm-gateway-cache"] == "hit"
    assert len(fake.requests) == 2


@pytest.mark.parametrize("key", [CACHED_VK, CLAUDE_VK])
async def test_an_error_answered_under_a_200_is_never_stored(
    gateway: TestClient, fake: FakeState, key: str
) -> None:
    # Some OpenAI-compatible servers answer an error with status 200: replaying it for the
    # TTL would serve every identical request that error.
    path, document = (CHAT_PATH, CHAT) if key == CACHED_VK else ("/v1/messages", MESSAGES)
    error = await post(
        gateway, key, document, path, **{"x-fake-status": "429", "x-fake-error-under": "200"}
    )
    assert error[0] == 200 and b'"error"' in error[2]
    again = await post(gateway, key, document, path)
    assert again[1]["x-llm-gateway-cache"] == "miss" and b'"error"' not in again[2]
    assert len(fake.requests) == 2


async def test_a_cut_stream_is_never_stored(gateway: TestClient, fake: FakeState) -> None:
    response = await gateway.post(
        CHAT_PATH, data=body(STREAM), headers={**auth(CACHED_VK), "x-fake-drop": "midstream"}
    )
    with pytest.raises(Exception):  # noqa: B017 - the client sees the stream cut, as it was
        await response.read()
    await gateway.app[CACHE].settled()
    whole = await post(gateway, document=STREAM)
    assert whole[1]["x-llm-gateway-cache"] == "miss" and whole[2].endswith(b"data: [DONE]\n\n")
    assert len(fake.requests) == 2


async def test_an_answer_over_cache_max_entry_bytes_is_not_stored(
    make_cached: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    gateway = await make_cached(CACHE_MAX_ENTRY_BYTES="100")
    await post(gateway)
    assert (await post(gateway))[1]["x-llm-gateway-cache"] == "miss"
    assert len(fake.requests) == 2


async def test_requests_that_are_not_cacheable_bypass(gateway: TestClient, fake: FakeState) -> None:
    models = await gateway.get("/v1/models", headers=auth(CACHED_VK))
    assert models.headers["x-llm-gateway-cache"] == "bypass"
    stored = {"model": "gpt-4o-mini", "input": "hi", "store": True}
    for _ in range(2):
        response = await post(gateway, document=stored, path="/v1/responses")
        assert response[1]["x-llm-gateway-cache"] == "bypass"
    unstored = {**stored, "store": False}
    assert (await post(gateway, document=unstored, path="/v1/responses"))[1][
        "x-llm-gateway-cache"
    ] == "miss"
    assert (await post(gateway, document=unstored, path="/v1/responses"))[1][
        "x-llm-gateway-cache"
    ] == "hit"
    assert len(fake.requests) == 4


async def test_a_turn_of_a_conversation_is_never_answered_from_the_cache(
    gateway: TestClient, fake: FakeState
) -> None:
    """A Responses turn in a conversation reads the conversation's items and appends to
    them: the same body sent again ("continue", twice) is a new turn with more context, and
    a replay would hand back the first answer and leave the conversation without the turn."""
    client = AsyncOpenAI(base_url=str(gateway.make_url("/v1")), api_key=CACHED_VK, max_retries=0)
    turn = {"model": "gpt-4o-mini", "conversation": "conv_abc123", "input": "continue"}
    try:
        replies = [await client.responses.with_raw_response.create(**turn) for _ in range(2)]
    finally:
        await client.close()
    assert [reply.headers["x-llm-gateway-cache"] for reply in replies] == ["bypass", "bypass"]
    assert replies[0].parse().id != replies[1].parse().id
    assert len(fake.requests) == 2


async def test_a_chat_completion_the_provider_stores_is_never_answered_from_the_cache(
    gateway: TestClient, fake: FakeState
) -> None:
    """`store=True` asks the provider to keep each completion (listed, fetched, updated by
    id later): a replay would hand back the first one's id and keep nothing new."""
    client = AsyncOpenAI(base_url=str(gateway.make_url("/v1")), api_key=CACHED_VK, max_retries=0)
    request = {**CHAT, "store": True, "metadata": {"run": "7"}}
    try:
        replies = [await client.chat.completions.with_raw_response.create(**request) for _ in "ab"]
        listed = await client.chat.completions.list(metadata={"run": "7"})
    finally:
        await client.close()
    assert [reply.headers["x-llm-gateway-cache"] for reply in replies] == ["bypass", "bypass"]
    made = [reply.parse().id for reply in replies]
    assert made[0] != made[1]
    assert [completion.id for completion in listed.data] == made


async def held_flight(
    gateway: TestClient, fake: FakeState, count: int, upstream: int
) -> list[tuple[int, dict[str, str], bytes]]:
    """`count` identical streams at once, answered once `upstream` requests reached the fake
    and the rest wait for the one in flight: their statuses, headers and bodies."""
    cache = gateway.app[CACHE]
    answers = [
        asyncio.create_task(post(gateway, document=STREAM, **{"x-fake-hold": "1"}))
        for _ in range(count)
    ]
    await until(lambda: len(fake.requests) == upstream and cache.waiting() == count - 1)
    fake.release.set()
    return await asyncio.gather(*answers)


async def test_fifty_identical_requests_in_flight_go_upstream_once(
    gateway: TestClient, fake: FakeState
) -> None:
    done = await held_flight(gateway, fake, 50, upstream=1)
    assert {status for status, _, _ in done} == {200}
    assert len({raw for _, _, raw in done}) == 1
    assert sorted(headers["x-llm-gateway-cache"] for _, headers, _ in done) == ["hit"] * 49 + [
        "miss"
    ]
    assert len(fake.requests) == 1  # 49 upstream calls saved


async def test_when_the_request_in_flight_fails_the_waiters_go_upstream_themselves(
    gateway: TestClient, fake: FakeState
) -> None:
    cache = gateway.app[CACHE]
    answers = [asyncio.create_task(post(gateway, **{"x-fake-hold": "1"})) for _ in range(5)]
    await until(lambda: len(fake.requests) == 1 and cache.waiting() == 4)
    fake.faults[OPENAI_REAL] = Fault(500, times=1)
    fake.release.set()
    done = await asyncio.gather(*answers)
    assert sorted(status for status, _, _ in done) == [200] * 4 + [500]
    assert len(fake.requests) == 5


async def test_a_waiter_whose_leaders_client_left_mid_stream_is_served_whole(
    gateway: TestClient, fake: FakeState, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    """The first client leaves while its stream runs and an identical request waits for it:
    the second is not failed with it, nor given the first's cut answer; it asks upstream."""
    cache = gateway.app[CACHE]
    slow = {"x-fake-delay-ms": "100", "x-fake-chunks": "20"}
    first = await gateway.post(CHAT_PATH, data=body(STREAM), headers={**auth(CACHED_VK), **slow})
    await first.content.readany()  # its answer has begun
    second = asyncio.create_task(post(gateway, document=STREAM))
    await until(lambda: cache.waiting() == 1, what="the second waiting for the first")
    first.close()
    status, headers, raw = await second
    assert status == 200 and headers["x-llm-gateway-cache"] == "miss"
    assert raw.endswith(b"data: [DONE]\n\n")
    assert len(fake.requests) == 2
    lines = await records(2)
    assert sorted(line["status"] for line in lines) == [200, 499]


# How a request leading a flight may end without an answer to store: the provider's error,
# the gateway's timeout, the provider's cut, the client leaving before the answer or in it.
LEADER_ENDINGS = {
    "provider error": ({"x-fake-status": "500"}, "reads"),
    "gateway timeout": ({"x-fake-hang": "headers"}, "reads"),
    "provider cut": ({"x-fake-drop": "midstream"}, "reads"),
    "client left waiting": ({"x-fake-hang": "headers"}, "leaves waiting"),
    "client left midstream": ({"x-fake-delay-ms": "200", "x-fake-chunks": "20"}, "leaves"),
}


@pytest.mark.parametrize("ending", LEADER_ENDINGS)
async def test_a_flight_whose_leader_ended_without_an_answer_is_no_longer_listed(
    make_cached: Callable[..., Awaitable[TestClient]],
    fake: FakeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    ending: str,
) -> None:
    """Whatever way a leader ends, its flight leaves the list: the next identical requests
    lead a flight of their own and go upstream once together (a flight left listed would
    send each of them upstream, and stay in memory for the process's life)."""
    # A short REQUEST_TIMEOUT only where the timeout is the ending; 1 s, as the held flight's
    # ordinary answers after it must come within it too, on a loaded machine.
    gateway = await make_cached(**({"REQUEST_TIMEOUT": "1"} if ending == "gateway timeout" else {}))
    knobs, client = LEADER_ENDINGS[ending]
    request = gateway.post(CHAT_PATH, data=body(STREAM), headers={**auth(CACHED_VK), **knobs})
    if client == "leaves waiting":  # before the provider's headers
        leaving = asyncio.ensure_future(request)
        await until(lambda: fake.requests, what="the leader reaching the provider")
        leaving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await leaving
    elif client == "leaves":
        response = await request
        await response.content.readany()  # the first chunk: the answer has begun
        response.close()
    else:
        response = await request
        with contextlib.suppress(aiohttp.ClientPayloadError):
            await response.read()
    [line] = await records(1)  # the leader settled
    assert line["cache"] == "miss", line
    done = await held_flight(gateway, fake, 2, upstream=2)
    assert sorted(headers["x-llm-gateway-cache"] for _, headers, _ in done) == ["hit", "miss"]
    assert len(fake.requests) == 2


async def test_an_entry_expires_after_its_ttl(
    make_cached: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    now = [1000.0]
    gateway = await make_cached(clock=lambda: now[0])
    await post(gateway)
    now[0] += TTL - 1
    assert (await post(gateway))[1]["x-llm-gateway-cache"] == "hit"
    now[0] += 1
    assert (await post(gateway))[1]["x-llm-gateway-cache"] == "miss"
    assert len(fake.requests) == 2


async def test_a_key_reads_no_answer_older_than_its_ttl_after_a_reload_shortened_it(
    make_cached: Callable[..., Awaitable[TestClient]], fake: FakeState, cached_keys: Path
) -> None:
    """An operator lowers a key's ttl_seconds because its answers go stale: entries stored
    under the old ttl were served until it ran out (an hour-old answer for a 60 s ttl)."""
    now = [1000.0]
    gateway = await make_cached(clock=lambda: now[0], ADMIN_TOKEN="admin-token-for-tests")
    await post(gateway)
    await gateway.app[CACHE].settled()
    document = json.loads(cached_keys.read_text())
    document["virtual_keys"][CACHED_VK]["cache"] = {"ttl_seconds": 60}
    cached_keys.write_text(json.dumps(document))
    reload = await gateway.post("/admin/reload", headers=auth("admin-token-for-tests"))
    assert reload.status == 200
    now[0] += 59
    assert (await post(gateway))[1]["x-llm-gateway-cache"] == "hit"
    now[0] += 1
    assert (await post(gateway))[1]["x-llm-gateway-cache"] == "miss"
    assert len(fake.requests) == 2


async def test_cache_max_bytes_evicts_the_least_recently_used(
    make_cached: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    gateway = await make_cached(CACHE_MAX_BYTES="6000")
    prompts = [
        {**CHAT, "messages": [{"role": "user", "content": f"prompt {index}"}]}
        for index in range(12)
    ]
    for prompt in prompts:
        await post(gateway, document=prompt)
        await gateway.app[CACHE].settled()
    assert (await post(gateway, document=prompts[-1]))[1]["x-llm-gateway-cache"] == "hit"
    assert (await post(gateway, document=prompts[0]))[1]["x-llm-gateway-cache"] == "miss"
    metrics = await (await gateway.get("/metrics")).text()
    held = next(
        line for line in metrics.splitlines() if line.startswith("llm_gateway_cache_bytes ")
    )
    assert 0 < float(held.split()[1]) <= 6000


async def test_a_hit_counts_one_request_and_charges_nothing(
    gateway: TestClient, fake: FakeState
) -> None:
    statuses = [(await post(gateway, COUNTED_VK))[0] for _ in range(4)]
    assert statuses == [200, 200, 200, 429]  # one miss, two hits, then the window is full
    usage = await (await gateway.get("/usage", headers=auth(COUNTED_VK))).json()
    assert usage["requests"]["used"] == 3
    one_answer = fake.usage[next(iter(fake.usage))]
    assert usage["totals"]["tokens"] == one_answer["total_tokens"]  # the miss's only
    assert usage["cache"] == {"ttl_seconds": TTL, "scope": None, "hits": 2}
    metrics = await (await gateway.get("/metrics")).text()
    assert 'llm_gateway_cache_hits_total{model="gpt-4o-mini",provider="openai"} 2.0' in metrics
    assert 'llm_gateway_cache_misses_total{model="gpt-4o-mini",provider="openai"} 1.0' in metrics
    assert len(fake.requests) == 1


# A stored answer another provider than the key's first gave, or at another tier's rates.
ANSWERED_ELSEWHERE = {
    "a route's provider": ("/v1/messages", MESSAGES, {}, "anthropic"),
    "a fallback's provider": (CHAT_PATH, CHAT, {"fault": "503"}, "azure"),
    "the priority tier": (CHAT_PATH, {**CHAT, "service_tier": "priority"}, {}, "openai"),
}


@pytest.mark.parametrize("case", ANSWERED_ELSEWHERE)
async def test_a_hit_is_logged_and_counted_as_the_provider_and_price_of_its_answer(
    gateway: TestClient,
    fake: FakeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    case: str,
) -> None:
    """A hit's `cost_usd` is what its answer would have cost: the miss's. A hit of a route to
    Anthropic was logged as the key's first provider (openai) and unpriced; one a fallback
    had answered, priced at the primary's rates; one at the priority tier, at the default's."""
    path, document, how, provider = ANSWERED_ELSEWHERE[case]
    if how:
        fake.faults[ROUTED_REAL] = Fault(int(how["fault"]), times=1)
    for _ in range(2):
        await post(gateway, ROUTED_VK, document, path)
    miss, hit = await records(2)
    assert (miss["cache"], hit["cache"]) == ("miss", "hit")
    assert miss["provider"] == hit["provider"] == provider
    assert hit["cost_usd"] == miss["cost_usd"] and miss["cost_usd"] is not None
    metrics = await (await gateway.get("/metrics")).text()
    labels = f'model="{document["model"]}",provider="{provider}"'
    assert f"llm_gateway_cache_hits_total{{{labels}}} 1.0" in metrics


async def test_the_admin_api_drops_a_keys_and_a_scopes_entries(
    make_cached: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    gateway = await make_cached(ADMIN_TOKEN="admin-token-for-tests")
    admin = auth("admin-token-for-tests")
    await post(gateway, CACHED_VK)
    await post(gateway, SHARED_A_VK)
    await gateway.app[CACHE].settled()
    keys = (await (await gateway.get("/admin/keys", headers=admin)).json())["keys"]
    policies = {key["name"]: key["cache"] for key in keys}
    assert policies["shared-a"] == {"ttl_seconds": TTL, "scope": "docs-bot"}
    assert policies["team-anthropic"] is None
    unknown = await gateway.delete("/admin/cache?key=nobody", headers=admin)
    assert unknown.status == 404
    assert (await gateway.delete("/admin/cache", headers=admin)).status == 400
    assert (await gateway.delete("/admin/cache?key=cached")).status == 401
    dropped = await gateway.delete("/admin/cache?key=cached", headers=admin)
    assert await dropped.json() == {"dropped": 1}
    assert (await post(gateway, CACHED_VK))[1]["x-llm-gateway-cache"] == "miss"
    assert (await post(gateway, SHARED_B_VK))[1]["x-llm-gateway-cache"] == "hit"
    scope = await gateway.delete("/admin/cache?scope=docs-bot", headers=admin)
    assert await scope.json() == {"dropped": 1}
    assert (await post(gateway, SHARED_B_VK))[1]["x-llm-gateway-cache"] == "miss"


async def test_an_answer_in_flight_while_its_entries_are_dropped_is_not_kept_after(
    make_cached: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    # A miss upstream while the operator dropped the key's entries stored its answer right
    # after the drop's 200 (over a newer one), and a request arriving after the drop waited
    # for that answer in its flight: the drop seemed not to have happened for that prompt.
    gateway = await make_cached(ADMIN_TOKEN="admin-token-for-tests")
    before = asyncio.create_task(post(gateway, **{"x-fake-hold": "1"}))  # held upstream
    await until(lambda: len(fake.requests) == 1, what="the miss upstream")
    dropped = await gateway.delete("/admin/cache?key=cached", headers=auth("admin-token-for-tests"))
    assert await dropped.json() == {"dropped": 0}
    after = asyncio.create_task(post(gateway))
    await until(lambda: len(fake.requests) == 2, what="the request after the drop upstream")
    _, after_headers, after_body = await after
    await gateway.app[CACHE].settled()
    fake.release.set()  # the answer begun before the drop ends last
    _, before_headers, before_body = await before
    await gateway.app[CACHE].settled()
    assert before_headers["x-llm-gateway-cache"] == after_headers["x-llm-gateway-cache"] == "miss"
    _, headers, body = await post(gateway)
    assert headers["x-llm-gateway-cache"] == "hit"
    assert body == after_body != before_body  # kept: the answer asked for after the drop
    assert len(fake.requests) == 2


async def test_redis_lost_sends_requests_upstream_counted_never_an_error(
    make_cached: Callable[..., Awaitable[TestClient]], fake: FakeState, unused_tcp_port: int
) -> None:
    gateway = await make_cached(REDIS_URL=f"redis://127.0.0.1:{unused_tcp_port}/0")
    for _ in range(2):
        status, headers, _ = await post(gateway)
        assert status == 200 and headers["x-llm-gateway-cache"] == "miss"
    await gateway.app[CACHE].settled()
    assert len(fake.requests) == 2
    metrics = await (await gateway.get("/metrics")).text()
    counted = next(
        line for line in metrics.splitlines() if 'decision="uncached"' in line and "_total" in line
    )
    assert float(counted.split()[-1]) >= 2


async def test_the_openai_sdk_reads_a_hit_exactly_as_the_original(
    gateway: TestClient, fake: FakeState
) -> None:
    client = AsyncOpenAI(base_url=str(gateway.make_url("/v1")), api_key=CACHED_VK, max_retries=0)
    chat = client.chat.completions
    try:
        replies = [await chat.with_raw_response.create(**CHAT) for _ in range(2)]
        assert [reply.headers["x-llm-gateway-cache"] for reply in replies] == ["miss", "hit"]
        assert replies[1].parse().model_dump() == replies[0].parse().model_dump()
        streams = []
        for _ in range(2):
            stream = await chat.create(**CHAT, stream=True)
            streams.append([chunk.model_dump() async for chunk in stream])
        assert streams[1] == streams[0] and len(streams[0]) > 3
        vectors = [await client.embeddings.create(model="text-embedding-3-small", input="hi")]
        vectors.append(await client.embeddings.create(model="text-embedding-3-small", input="hi"))
        assert vectors[1].model_dump() == vectors[0].model_dump()
    finally:
        await client.close()
    assert len(fake.requests) == 3


async def test_the_anthropic_sdk_reads_a_hit_exactly_as_the_original(
    gateway: TestClient, fake: FakeState
) -> None:
    client = AsyncAnthropic(base_url=str(gateway.make_url("")), api_key=CLAUDE_VK, max_retries=0)
    ask = {"model": "claude-sonnet-4-6", "max_tokens": 64, "messages": CHAT["messages"]}
    try:
        replies = [await client.messages.with_raw_response.create(**ask) for _ in range(2)]
        assert [reply.headers["x-llm-gateway-cache"] for reply in replies] == ["miss", "hit"]
        parsed = [(await reply.parse()).model_dump() for reply in replies]
        assert parsed[1] == parsed[0]
        finals, events = [], []
        for _ in range(2):
            async with client.messages.stream(**ask) as stream:
                events.append([event.model_dump() async for event in stream])
                finals.append((await stream.get_final_message()).model_dump())
        assert finals[1] == finals[0] and events[1] == events[0]
    finally:
        await client.close()
    assert len(fake.requests) == 2


async def test_a_hit_is_not_counted_as_the_providers_time_to_first_byte(
    gateway: TestClient,
) -> None:
    """llm_gateway_time_to_first_byte_seconds is the provider's: a hit, answered from memory
    in well under a millisecond, made a provider that takes 300 ms look twice as fast at the
    median with one hit a miss (as the overhead histogram, which leaves hits out)."""
    for _ in range(2):
        await post(gateway, **{"x-fake-think-ms": "300"})
    text = await (await gateway.get("/metrics")).text()
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("llm_gateway_time_to_first_byte_seconds_")
        or line.startswith("llm_gateway_cache_hits_total")
    }
    assert samples['llm_gateway_cache_hits_total{model="gpt-4o-mini",provider="openai"}'] == 1
    assert samples['llm_gateway_time_to_first_byte_seconds_count{provider="openai"}'] == 1
    assert samples['llm_gateway_time_to_first_byte_seconds_sum{provider="openai"}'] >= 0.3


async def test_a_hits_log_line_has_no_time_to_first_byte(
    gateway: TestClient, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    """`ttft_ms` is the provider's first body byte (SPEC): a hit has none. It logged the
    replay's, well under a millisecond, and percentiles of the log's ttft_ms read a provider
    taking 300 ms as twice as fast with one request in two a hit."""
    for _ in range(2):
        await post(gateway, **{"x-fake-think-ms": "300"})
    miss, hit = await records(2)
    assert (miss["cache"], hit["cache"]) == ("miss", "hit")
    assert miss["ttft_ms"] >= 300 and hit["ttft_ms"] is None


@pytest.mark.parametrize(
    "query",
    ["key=cached&key=shared-a", "scope=docs-bot&scope=other", "scope=", "key=cached&ttl=0"],
)
async def test_a_cache_drop_asked_for_in_words_it_does_not_read_is_refused(
    make_cached: Callable[..., Awaitable[TestClient]], fake: FakeState, query: str
) -> None:
    # `?key=a&key=b` dropped a's entries only and answered 200 (b's kept serving), `?scope=`
    # dropped the entries of a scope named '' (none), an unknown parameter was ignored: the
    # operator was told a drop was made that was not the one asked for. Now 400, nothing
    # dropped.
    gateway = await make_cached(ADMIN_TOKEN="admin-token-for-tests")
    admin = auth("admin-token-for-tests")
    await post(gateway, CACHED_VK)
    await gateway.app[CACHE].settled()
    response = await gateway.delete(f"/admin/cache?{query}", headers=admin)
    assert response.status == 400, await response.text()
    assert_openai_error(await response.json(), "invalid_request")
    assert (await post(gateway, CACHED_VK))[1]["x-llm-gateway-cache"] == "hit"
