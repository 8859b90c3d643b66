"""A stream that ends with the provider's error event, under the 200 already sent.

Anthropic ends a stream with `event: error` (`overloaded_error`) after some content, OpenAI
chat sends a `data:` line holding an error object, the Responses API a `response.failed`.
The client gets the provider's bytes as sent; the log line's `error` names the provider's
error type (never its message, which may quote anything), and the usage is charged as for
any stream: reported where it came, else estimated.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ANTHROPIC_REAL, ANTHROPIC_VK, OPENAI_REAL, OPENAI_VK, auth
from tests.support.bodies import chat, messages

Records = Callable[..., Awaitable[list[dict[str, Any]]]]


def event(kind: str | None, data: dict[str, Any]) -> bytes:
    head = b"" if kind is None else f"event: {kind}\n".encode()
    return head + b"data: " + json.dumps(data).encode() + b"\n\n"


MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-3-5-haiku-latest",
    "content": [],
    "stop_reason": None,
    "usage": {"input_tokens": 13, "output_tokens": 1},
}
ANTHROPIC_OVERLOADED = [
    event("message_start", {"type": "message_start", "message": MESSAGE}),
    event(
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": "Hello"},
        },
    ),
    event(
        "error",
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
    ),
]
CHUNK = {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-mini"}
OPENAI_MID_STREAM_ERROR = [
    event(None, {**CHUNK, "choices": [{"index": 0, "delta": {"content": "Hello"}}]}),
    event(None, {"error": {"message": "The server had an error", "type": "server_error"}}),
]
# OpenRouter's mid-stream error: the error at the top level of a chunk whose one choice
# finishes with "error" (its code a string, or a number: the HTTP status it stands for).
OPENROUTER_MID_STREAM_ERROR = [
    b": OPENROUTER PROCESSING\n\n",
    event(None, {**CHUNK, "choices": [{"index": 0, "delta": {"content": "Hello"}}]}),
    event(
        None,
        {
            **CHUNK,
            "provider": "openai",
            "error": {"code": "server_error", "message": "Provider disconnected"},
            "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
        },
    ),
    b"data: [DONE]\n\n",
]
OPENAI_FINE = [
    event(None, {**CHUNK, "choices": [{"index": 0, "delta": {"content": "Hello"}}]}),
    b"data: [DONE]\n\n",
]


def response_ended(status: str, error: dict[str, Any] | None) -> list[bytes]:
    usage = {"input_tokens": 9, "output_tokens": 4, "total_tokens": 13}
    response = {"id": "resp_1", "object": "response", "status": status, "output": []}
    kind = f"response.{status}"
    return [
        event("response.output_text.delta", {"type": "response.output_text.delta", "delta": "Hi"}),
        event(kind, {"type": kind, "response": {**response, "usage": usage, "error": error}}),
    ]


RESPONSES_ERROR = event("error", {"type": "error", "code": "rate_limit_exceeded", "message": "x"})


@pytest.fixture
async def provider(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> TestServer:
    """Answers each request with the events the test put under its `x-events` name."""
    streams = {
        "anthropic": ANTHROPIC_OVERLOADED,
        "openai": OPENAI_MID_STREAM_ERROR,
        "openrouter": OPENROUTER_MID_STREAM_ERROR,
        "openrouter-502": [
            chunk.replace(b'"server_error"', b"502") for chunk in OPENROUTER_MID_STREAM_ERROR
        ],
        "fine": OPENAI_FINE,
        "failed": response_ended("failed", {"code": "server_error", "message": "boom"}),
        "incomplete": response_ended("incomplete", None),
        "error": [RESPONSES_ERROR],
        "anthropic-at-once": ANTHROPIC_OVERLOADED[-1:],
        "openai-at-once": OPENAI_MID_STREAM_ERROR[-1:],
    }

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for chunk in streams[request.headers["x-events"]]:
            await response.write(chunk)
        await response.write_eof()
        return response

    application = web.Application()
    application.router.add_post("/v1/{tail:.*}", answer)
    return await aiohttp_server(application)


@pytest.fixture
async def gateway(
    provider: TestServer, tmp_path: Path, make_gateway: Callable[..., Awaitable[TestClient]]
) -> TestClient:
    base = str(provider.make_url("/v1"))
    keys = {
        "providers": {"openai": {"base_url": base}, "anthropic": {"base_url": base}},
        "virtual_keys": {
            OPENAI_VK: {"provider": "openai", "api_key": OPENAI_REAL, "name": "o"},
            ANTHROPIC_VK: {"provider": "anthropic", "api_key": ANTHROPIC_REAL, "name": "a"},
        },
    }
    path = tmp_path / "stream-errors-keys.json"
    path.write_text(json.dumps(keys))
    return await make_gateway(KEYS_FILE_PATH=str(path))


async def relayed(gateway: TestClient, key: str, path: str, body: Any, events: str) -> bytes:
    headers = {**auth(key), "x-events": events}
    async with gateway.post(path, json=body, headers=headers) as response:
        assert response.status == 200
        return await response.read()


async def test_an_anthropic_stream_ending_with_an_error_event_logs_the_error(
    gateway: TestClient, records: Records
) -> None:
    body = messages("hello world", stream=True)
    got = await relayed(gateway, ANTHROPIC_VK, "/v1/messages", body, "anthropic")
    assert got == b"".join(ANTHROPIC_OVERLOADED)
    [line] = await records(1)
    assert line["status"] == 200
    assert "overloaded_error" in line["error"] and "Overloaded" not in line["error"]
    usage = line["usage"]  # its prompt reported, its completion at least what came
    assert usage["prompt_tokens"] == 13 and usage["completion_tokens"] >= 1
    assert usage["estimated"] is True


@pytest.mark.parametrize(
    ("key", "path", "body", "events"),
    [
        (ANTHROPIC_VK, "/v1/messages", messages("hello world", stream=True), "anthropic-at-once"),
        (OPENAI_VK, "/v1/chat/completions", chat("hello world", stream=True), "openai-at-once"),
    ],
)
async def test_a_stream_that_is_only_the_providers_error_is_charged_nothing(
    gateway: TestClient, records: Records, key: str, path: str, body: Any, events: str
) -> None:
    # An overloaded_error before message_start: the provider ran nothing and bills nothing,
    # as for its 529; the key was charged its prompt's estimate (and its price) all the same.
    await relayed(gateway, key, path, body, events)
    [line] = await records(1)
    assert line["status"] == 200 and line["error"] is not None
    assert line["usage"] is None and line["cost_usd"] is None


async def test_an_openai_error_object_mid_stream_logs_the_error(
    gateway: TestClient, records: Records
) -> None:
    body = chat("hello world", stream=True)
    got = await relayed(gateway, OPENAI_VK, "/v1/chat/completions", body, "openai")
    assert got == b"".join(OPENAI_MID_STREAM_ERROR)
    [line] = await records(1)
    assert line["status"] == 200 and "server_error" in line["error"]
    assert line["usage"]["estimated"] is True


async def test_an_openrouter_error_chunk_mid_stream_logs_the_error(
    gateway: TestClient, records: Records
) -> None:
    body = chat("hello world", stream=True)
    got = await relayed(gateway, OPENAI_VK, "/v1/chat/completions", body, "openrouter")
    assert got == b"".join(OPENROUTER_MID_STREAM_ERROR)
    await relayed(gateway, OPENAI_VK, "/v1/chat/completions", body, "openrouter-502")
    named, numbered = await records(2)
    assert named["status"] == 200 and "(server_error)" in named["error"]
    assert "Provider disconnected" not in named["error"]
    assert "(502)" in numbered["error"]


async def test_a_failed_response_or_an_error_event_logs_its_code_an_incomplete_one_none(
    gateway: TestClient, records: Records
) -> None:
    body = {"model": "gpt-4o-mini", "input": "hello world", "stream": True}
    await relayed(gateway, OPENAI_VK, "/v1/responses", body, "failed")
    await relayed(gateway, OPENAI_VK, "/v1/responses", body, "incomplete")
    await relayed(gateway, OPENAI_VK, "/v1/responses", body, "error")
    failed, incomplete, error = await records(3)
    assert "(rate_limit_exceeded)" in error["error"]  # the error event's code
    assert "server_error" in failed["error"] and "boom" not in failed["error"]
    assert incomplete.get("error") is None
    for line in (failed, incomplete):  # the provider's count, as reported
        assert (line["usage"]["prompt_tokens"], line["usage"]["completion_tokens"]) == (9, 4)
        assert line["usage"]["estimated"] is False


async def test_a_stream_without_an_error_event_logs_no_error(
    gateway: TestClient, records: Records
) -> None:
    await relayed(gateway, OPENAI_VK, "/v1/chat/completions", chat(stream=True), "fine")
    [line] = await records(1)
    assert line.get("error") is None


def upstream_errors(text: str, provider: str) -> dict[str, float]:
    return {
        sample.labels["kind"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "llm_gateway_upstream_errors_total"
        and sample.labels["provider"] == provider
    }


@pytest.mark.parametrize(
    ("key", "name", "path", "body", "events", "kind"),
    [
        (ANTHROPIC_VK, "anthropic", "/v1/messages", messages("hi", stream=True), "anthropic", "overloaded_error"),
        (OPENAI_VK, "openai", "/v1/chat/completions", chat("hi", stream=True), "openai", "server_error"),
        (OPENAI_VK, "openai", "/v1/chat/completions", chat("hi", stream=True), "openrouter-502", "502"),
    ],
)  # fmt: skip
async def test_a_providers_failure_mid_stream_counts_as_an_upstream_error_and_for_its_breaker(
    gateway: TestClient,
    records: Records,
    key: str,
    name: str,
    path: str,
    body: Any,
    events: str,
    kind: str,
) -> None:
    # Anthropic's overloaded_error after content, under the 200 already sent: the provider
    # failed that request as surely as with a 529, and a platform team watching the upstream
    # errors (or a breaker) must see it.
    await relayed(gateway, key, path, body, events)
    await records(1)
    metrics = await (await gateway.get("/metrics")).text()
    counted = upstream_errors(metrics, name)
    assert counted["error_event"] == 1
    assert sum(counted.values()) == 1
    target = (await (await gateway.get("/health")).json())["targets"][name]
    assert target["failures_in_a_row"] == 1 and kind in target["last_error"]


async def test_a_rate_limit_mid_stream_or_a_clean_stream_is_no_upstream_error(
    gateway: TestClient, records: Records
) -> None:
    # A rate limit is about the key, not the target (as a 429 is): no upstream error, no failure.
    body = {"model": "gpt-4o-mini", "input": "hello world", "stream": True}
    await relayed(gateway, OPENAI_VK, "/v1/responses", body, "error")  # rate_limit_exceeded
    await relayed(gateway, OPENAI_VK, "/v1/chat/completions", chat(stream=True), "fine")
    await records(2)
    metrics = await (await gateway.get("/metrics")).text()
    assert sum(upstream_errors(metrics, "openai").values()) == 0
    target = (await (await gateway.get("/health")).json())["targets"]["openai"]
    assert target["failures_in_a_row"] == 0
