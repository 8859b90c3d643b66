"""What each answer is charged, through a real gateway in front of the fake provider.

An answer the tap cannot read is still charged (an estimate, never nothing); a models list
or a token count is not charged as if it produced tokens; every token kind is read through
the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import brotli
import orjson
import pytest
import zstandard
from aiohttp.test_utils import TestClient

from proxy.app import TAP_MEMORY
from proxy.record import Usage
from tests.conftest import ANTHROPIC_VK, OPENAI_VK, auth
from tests.support.bodies import chat, messages
from tests.support.fake_provider import FakeState
from tests.unit.test_pricing import library_cost

Records = Callable[..., Awaitable[list[dict[str, Any]]]]
CHAT = chat("one two three")
MESSAGES = messages("one two three", max_tokens=50)


def decoded(body: bytes, coding: str) -> bytes:
    if coding == "br":
        return brotli.decompress(body)
    if coding == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(body)
    return zlib.decompress(body, 31 if coding == "gzip" else zlib.MAX_WBITS)


async def tokens_used(gateway: TestClient, key: str, expected: int) -> int:
    """The key's tokens in the window, once the background charge for `expected` landed."""
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        document = await (await gateway.get("/usage", headers=auth(key))).json()
        used = document["tokens"]["used"]
        if used >= expected or asyncio.get_running_loop().time() > deadline:
            return used
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
@pytest.mark.parametrize("is_stream", [False, True])
async def test_an_answer_in_any_coding_is_read_and_reaches_the_client_as_sent(
    gateway: TestClient, fake: FakeState, records: Records, coding: str, is_stream: bool
) -> None:
    body = {**CHAT, "stream": is_stream, "stream_options": {"include_usage": True}}
    headers = {
        **auth(OPENAI_VK),
        "Accept-Encoding": coding,
        "x-fake-encoding": coding,
        "x-fake-cached-tokens": "4",
        "x-fake-reasoning-tokens": "5",
        "x-request-id": f"coded-{coding}-{is_stream}",
    }
    async with aiohttp.ClientSession(auto_decompress=False) as raw:  # bytes as they arrive
        url = gateway.make_url("/v1/chat/completions")
        async with raw.post(url, json=body, headers=headers) as response:
            assert response.status == 200
            assert response.headers["Content-Encoding"] == coding
            received = await response.read()
    assert received == fake.sent[f"coded-{coding}-{is_stream}"]
    assert b"chat.completion" in decoded(received, coding)
    (line,) = await records(1)
    assert line["usage"]["estimated"] is False
    # 3 words + 4 cached; 3 chunks + 5 reasoning: what the fake reported, every kind.
    assert line["usage"]["prompt_tokens"] == 7 and line["usage"]["cache_read_tokens"] == 4
    assert line["usage"]["completion_tokens"] == 8 and line["usage"]["reasoning_tokens"] == 5
    assert line["cost_usd"] > 0


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
async def test_a_large_compressed_answer_is_read_to_its_end_for_its_usage(
    gateway: TestClient, fake: FakeState, records: Records, coding: str
) -> None:
    """Before, the tap's brotli decoder stopped handing out what it decoded once a piece
    filled its output step and the input was used up: of a 1 MB embeddings answer in br
    (OpenAI answers br to the SDKs' Accept-Encoding) only the first half-megabyte was read,
    and the provider's usage, at the end, never: the key was charged an estimate instead."""
    inputs = [f"input number {n}" for n in range(20)]  # 60 prompt words
    body = {"model": "text-embedding-3-large", "input": inputs, "dimensions": 3072}
    headers = {**auth(OPENAI_VK), "Accept-Encoding": coding, "x-fake-encoding": coding}
    async with aiohttp.ClientSession(auto_decompress=False) as raw:
        url = gateway.make_url("/v1/embeddings")
        async with raw.post(url, json=body, headers={**headers, "x-request-id": "big"}) as response:
            assert response.status == 200
            received = await response.read()
    assert received == fake.sent["big"]
    assert len(decoded(received, coding)) > 1_000_000
    (line,) = await records(1)
    assert line["usage"]["estimated"] is False
    assert line["usage"]["prompt_tokens"] == 60


@pytest.mark.parametrize("coding", ["gzip", "br"])
async def test_a_compressed_upload_streamed_without_usage_is_charged_its_prompt(
    gateway: TestClient, records: Records, coding: str
) -> None:
    """Before, the estimate read the prompt from the bytes as uploaded: 0 prompt tokens for
    any compressed upload (and the gateway does not ask such a stream for its usage)."""
    raw = orjson.dumps({**chat("one two three four five six seven eight"), "stream": True})
    upload = gzip.compress(raw) if coding == "gzip" else brotli.compress(raw)
    headers = {**auth(OPENAI_VK), "Content-Type": "application/json", "Content-Encoding": coding}
    response = await gateway.post("/v1/chat/completions", data=upload, headers=headers)
    assert response.status == 200
    await response.read()
    (line,) = await records(1)
    assert line["usage"]["estimated"] is True
    assert line["usage"]["prompt_tokens"] > 0


async def test_brotli_answers_can_no_longer_escape_the_token_quota(
    make_gateway: Callable[..., Awaitable[TestClient]],
) -> None:
    gateway = await make_gateway(QUOTA_TOKENS="1000")
    headers = {**auth(OPENAI_VK), "Accept-Encoding": "br", "x-fake-encoding": "br"}
    statuses = []
    for _ in range(20):
        response = await gateway.post(
            "/v1/chat/completions", json=CHAT, headers={**headers, "x-fake-chunks": "97"}
        )
        statuses.append(response.status)
        await response.read()
        if response.status == 200:  # 3 prompt + 97 completion tokens each
            assert await tokens_used(gateway, OPENAI_VK, 100 * statuses.count(200)) == (
                100 * statuses.count(200)
            )
    # Admitted while under 1,000 tokens: ten, then refused (before: 20 × 200, 0 charged).
    assert statuses.count(200) == 10 and statuses[10:] == [429] * 10


async def test_an_answer_in_a_coding_nobody_decodes_is_charged_an_estimate(
    gateway: TestClient, records: Records
) -> None:
    response = await gateway.post(
        "/v1/chat/completions",
        json=CHAT,
        headers={**auth(OPENAI_VK), "x-fake-encoding": "compress", "x-fake-chunks": "40"},
    )
    assert response.status == 200
    await response.read()
    (line,) = await records(1)
    usage = line["usage"]
    assert usage is not None and usage["estimated"] is True
    # 13 characters of prompt; the 500-odd bytes received stand for the completion.
    assert usage["prompt_tokens"] == 4 and usage["completion_tokens"] > 40
    assert line["cost_usd"] > 0


@pytest.mark.parametrize("is_stream", [False, True])
async def test_an_answer_cut_short_is_charged_an_estimate_never_nothing(
    gateway: TestClient, records: Records, is_stream: bool
) -> None:
    response = await gateway.post(
        "/v1/chat/completions",
        json={**CHAT, "stream": is_stream},
        headers={**auth(OPENAI_VK), "x-fake-drop": "midstream", "x-fake-chunks": "40"},
    )
    with contextlib.suppress(aiohttp.ClientPayloadError):  # the stream is cut for the client too
        await response.read()
    (line,) = await records(1)
    usage = line["usage"]
    assert usage is not None and usage["estimated"] is True and usage["prompt_tokens"] == 4
    if is_stream:  # what reached the client was produced
        assert usage["completion_tokens"] > 0


@pytest.mark.parametrize("cut", ["provider", "client"])
async def test_an_anthropic_stream_cut_short_is_charged_what_it_delivered_not_one_token(
    gateway: TestClient, records: Records, cut: str
) -> None:
    """message_start reports output_tokens 1 before any text; the total comes in
    message_delta, which a cut stream never gets. Before: charged 1 completion token, as
    exact, however much text the client had received."""
    fault = {"x-fake-drop": "midstream"} if cut == "provider" else {"x-fake-hang": "midstream"}
    response = await gateway.post(
        "/v1/messages",
        json={**MESSAGES, "stream": True},
        headers={**auth(ANTHROPIC_VK), "x-fake-chunks": "40", **fault},
    )
    assert response.status == 200
    received = b""
    with contextlib.suppress(aiohttp.ClientPayloadError):  # the provider's cut reaches it too
        while b"tok19 " not in received:  # half of the 40 deltas, then the fault
            chunk = await response.content.readany()
            if not chunk:
                break
            received += chunk
    response.close()
    (line,) = await records(1)
    assert line["status"] == (200 if cut == "provider" else 499)
    usage = line["usage"]
    assert usage["prompt_tokens"] == 3  # the provider's count, from message_start
    # "tok0 " … "tok19 ": 110 characters, 28 tokens, all delivered.
    assert usage["completion_tokens"] >= 28 and usage["estimated"] is True
    assert await tokens_used(gateway, ANTHROPIC_VK, usage["total_tokens"]) == usage["total_tokens"]


async def test_a_non_json_answer_to_a_generation_is_estimated(
    gateway: TestClient, records: Records
) -> None:
    response = await gateway.post(
        "/v1/chat/completions", json=CHAT, headers={**auth(OPENAI_VK), "x-fake-raw-chunks": "50"}
    )
    assert response.status == 200
    await response.read()
    (line,) = await records(1)
    assert line["usage"]["estimated"] is True and line["usage"]["completion_tokens"] > 0


async def test_a_models_list_and_a_token_count_are_not_charged(
    make_gateway: Callable[..., Awaitable[TestClient]], records: Records
) -> None:
    gateway = await make_gateway(QUOTA_TOKENS="1000")
    models = await gateway.get("/v1/models", headers=auth(OPENAI_VK))
    assert models.status == 200
    await models.read()
    count = await gateway.post(
        "/v1/messages/count_tokens",
        json={"model": MESSAGES["model"], "messages": MESSAGES["messages"]},
        headers=auth(ANTHROPIC_VK),
    )
    assert count.status == 200 and (await count.json())["input_tokens"] == 3
    lines = await records(2)
    assert [line["usage"] for line in lines] == [None, None]
    assert [line["cost_usd"] for line in lines] == [None, None]
    # A generation afterwards is charged: the key's window holds its tokens only.
    chat = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(OPENAI_VK))
    await chat.read()
    assert await tokens_used(gateway, OPENAI_VK, 6) == 6
    usage = await (await gateway.get("/usage", headers=auth(ANTHROPIC_VK))).json()
    assert usage["tokens"]["used"] == 0


async def test_anthropic_cache_reads_and_writes_reach_the_log_line(
    gateway: TestClient, records: Records
) -> None:
    for is_stream in (False, True):
        response = await gateway.post(
            "/v1/messages",
            json={**MESSAGES, "stream": is_stream},
            headers={
                **auth(ANTHROPIC_VK),
                "x-fake-cached-tokens": "1000",
                "x-fake-cache-write-tokens": "200",
                "x-fake-encoding": "br",
            },
        )
        assert response.status == 200
        await response.read()
    for line in await records(2):
        assert line["usage"] == {
            "prompt_tokens": 1203,
            "completion_tokens": 3,
            "total_tokens": 1206,
            "cache_read_tokens": 1000,
            "cache_write_tokens": 200,
            "input_audio_tokens": 0,
            "reasoning_tokens": 0,
            "output_audio_tokens": 0,
            "estimated": False,
        }, line


async def test_the_taps_hold_nothing_once_their_requests_ended(
    gateway: TestClient, records: Records
) -> None:
    """Answered, cut (JSON and stream), left by the client, an error status."""
    memory = gateway.server.app[TAP_MEMORY]
    big = {**auth(OPENAI_VK), "x-fake-chunks": "200000"}  # a 1.4 MB JSON answer
    asks = [
        ({**CHAT, "stream": True}, {**auth(OPENAI_VK), "x-fake-chunks": "50"}),
        (CHAT, big),
        (CHAT, {**big, "x-fake-drop": "midstream"}),
        ({**CHAT, "stream": True}, {**auth(OPENAI_VK), "x-fake-drop": "midstream"}),
        (CHAT, {**auth(OPENAI_VK), "x-fake-status": "500"}),
    ]
    for body, headers in asks:
        response = await gateway.post("/v1/chat/completions", json=body, headers=headers)
        with contextlib.suppress(aiohttp.ClientPayloadError):
            await response.read()
    # A client that leaves in the middle of a stream.
    response = await gateway.post(
        "/v1/chat/completions",
        json={**CHAT, "stream": True},
        headers={**auth(OPENAI_VK), "x-fake-chunks": "8", "x-fake-hang": "midstream"},
    )
    await response.content.readany()
    response.close()
    await records(len(asks) + 1)
    assert memory.held_bytes == 0


@pytest.mark.parametrize("is_stream", [False, True])
async def test_thinking_counted_only_in_total_tokens_is_charged_as_completion(
    gateway: TestClient, records: Records, is_stream: bool
) -> None:
    # Gemini's OpenAI-compatible API has reported a thinking model's thoughts in
    # total_tokens and not in completion_tokens; they are output all the same, and billed.
    body = {**CHAT, "stream": is_stream, "stream_options": {"include_usage": True}}
    headers = {**auth(OPENAI_VK), "x-fake-thoughts-beside": "500"}
    response = await gateway.post("/v1/chat/completions", json=body, headers=headers)
    assert response.status == 200
    received = await response.read()
    assert b'"completion_tokens":3,' in received  # the client gets the provider's figures
    (line,) = await records(1)
    assert (line["usage"]["prompt_tokens"], line["usage"]["completion_tokens"]) == (3, 503)
    assert await tokens_used(gateway, OPENAI_VK, 506) == 506


async def whole_and_streamed(
    gateway: TestClient, records: Records, body: dict[str, Any], headers: dict[str, str]
) -> list[dict[str, Any]]:
    """The log lines of the message `body` asked once whole, then streamed."""
    for is_stream in (False, True):
        response = await gateway.post(
            "/v1/messages", json={**body, "stream": is_stream}, headers=headers
        )
        assert response.status == 200
        await response.read()
    return await records(2)


async def test_a_server_side_compaction_is_charged_with_the_message_it_preceded(
    gateway: TestClient, records: Records
) -> None:
    # A long agent session (Claude Code, the Agent SDK) with context_management's
    # compact_20260112: Anthropic summarizes the conversation first, a sampling of its own,
    # billed, that the usage's top-level counts leave out; only `iterations` says it.
    body = {
        **MESSAGES,
        "context_management": {"edits": [{"type": "compact_20260112"}]},
    }
    headers = {
        **auth(ANTHROPIC_VK),
        "anthropic-beta": "compact-2026-01-12",
        "x-fake-compaction-tokens": "150000",
    }
    for line in await whole_and_streamed(gateway, records, body, headers):
        usage = line["usage"]
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (3 + 150000, 3 + 15000)
        assert usage["estimated"] is False
    assert await tokens_used(gateway, ANTHROPIC_VK, 2 * 165006) == 2 * 165006


async def test_the_thinking_anthropic_counts_in_its_output_reaches_the_log_line_as_reasoning(
    gateway: TestClient, records: Records
) -> None:
    # Claude Code thinks (adaptive thinking); Anthropic says how much of output_tokens was
    # thinking in usage.output_tokens_details.thinking_tokens, as OpenAI says its reasoning.
    body = {**MESSAGES, "thinking": {"type": "adaptive"}}
    headers = {**auth(ANTHROPIC_VK), "x-fake-reasoning-chars": "400"}
    for line in await whole_and_streamed(gateway, records, body, headers):
        usage = line["usage"]
        assert (usage["completion_tokens"], usage["reasoning_tokens"]) == (3 + 100, 100), line


async def test_an_advisor_consultation_is_counted_with_the_message_it_served(
    gateway: TestClient, records: Records
) -> None:
    # Claude Code's /advisor (the advisor_20260301 server tool): the executor consults a
    # stronger model on the whole transcript within the one request; that sub-inference is
    # billed, and only the usage's `iterations` (type "advisor_message") holds it.
    body = {**MESSAGES, "tools": [{"type": "advisor_20260301", "name": "advisor"}]}
    headers = {
        **auth(ANTHROPIC_VK),
        "anthropic-beta": "advisor-tool-2026-03-01",
        "x-fake-advisor-tokens": "40000",
    }
    for line in await whole_and_streamed(gateway, records, body, headers):
        usage = line["usage"]
        # The executor sampled twice, around the advisor's: the first read the prompt (P
        # tokens), the second the advice (4000) and, from the cache, the context (P + 1);
        # the top-level counts hold only the first's input (before: the second's was lost).
        context = usage["cache_read_tokens"]
        prompt = context - 1
        assert prompt > 0 and usage["estimated"] is False
        assert usage["prompt_tokens"] == prompt + 40000 + 4000 + context
        assert usage["completion_tokens"] == 3 + 4000
        # Each at its own model's rates, as Anthropic bills them: the executor's at the
        # request's model, the advisor's at claude-opus-4-8's (before: all at the executor's).
        executor = Usage(prompt + 4000 + context, 3, cache_read_tokens=context)
        assert line["cost_usd"] == pytest.approx(
            library_cost("anthropic", MESSAGES["model"], executor)
            + library_cost("anthropic", "claude-opus-4-8", Usage(40000, 4000))
        )


@pytest.mark.parametrize(
    ("declined", "billed"),
    [("20000,2000", (20000, 2000)), ("20000,0", (0, 0))],
    ids=["declined-after-output", "declined-before-output"],
)
async def test_an_attempt_declined_before_a_server_side_fallback_is_charged_when_billed(
    gateway: TestClient, records: Records, declined: str, billed: tuple[int, int]
) -> None:
    # Claude Fable 5 with `fallbacks` (server-side-fallback-2026-06-01): its safety classifier
    # declines, and claude-opus-4-8 answers within the one request. The usage's top-level
    # counts are the answer's; the declined attempt is only in `iterations` (type "message"),
    # billed when it wrote output before declining, waived when it wrote none (LiteLLM #39294).
    # Before: a declined attempt's tokens and spend were never counted.
    body = {**MESSAGES, "model": "claude-fable-5", "fallbacks": [{"model": "claude-opus-4-8"}]}
    headers = {
        **auth(ANTHROPIC_VK),
        "anthropic-beta": "server-side-fallback-2026-06-01",
        "x-fake-declined": declined,
    }
    charged = (3 + billed[0], 3 + billed[1])  # the answer's 3 and 3, and the attempt's
    for line in await whole_and_streamed(gateway, records, body, headers):
        usage = line["usage"]
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == charged, line
        assert usage["estimated"] is False
        # Each attempt at its own model's rates, as Anthropic bills them: the answer at the
        # model that answered (a stream's message_start names the requested model, its
        # `fallback` block the one that answered), the declined attempt at Claude Fable 5's,
        # twice Opus 4.8's (before: at Opus's).
        answer = library_cost("anthropic", "claude-opus-4-8", Usage(3, 3))
        attempt = library_cost("anthropic", "claude-fable-5", Usage(*billed)) if billed[0] else 0
        assert line["cost_usd"] == pytest.approx(answer + attempt)
    assert await tokens_used(gateway, ANTHROPIC_VK, 2 * sum(charged)) == 2 * sum(charged)
