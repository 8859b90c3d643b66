"""Every token the provider produced is counted: when it reports no usage, the estimate reads
every string it generated (tool-call arguments, reasoning, thinking), not only the text.

Through a real gateway in front of the fake provider, with the official SDKs; the fake
streams x-fake-tool-chars characters of tool-call arguments, or x-fake-reasoning-chars of
reasoning, and (x-fake-no-usage) reports no usage, as a provider that sends none does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from anthropic import AsyncAnthropic
from openai import AsyncOpenAI, RateLimitError

from tests.conftest import auth

Records = Callable[..., Awaitable[list[dict[str, Any]]]]
GatewayWithKeys = Callable[..., Awaitable[TestClient]]
AGENT_VK = "vk_test_agent_tool_streams_01"
CLAUDE_VK = "vk_test_agent_claude_stream_02"
CHARS = 40_000
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the web.",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        },
    }
]
CLAUDE_TOOLS = [
    {
        "name": "search",
        "description": "Search the web.",
        "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}},
    }
]
MESSAGES = [{"role": "user", "content": "find it"}]


def knobs(**headers: int | str) -> dict[str, str]:
    """The fake's headers: no usage reported, 20 pieces, and these."""
    fake = {"x-fake-no-usage": "1", "x-fake-chunks": "20"}
    return {**fake, **{f"x-fake-{name.replace('_', '-')}": str(v) for name, v in headers.items()}}


@pytest.fixture
async def gateway(gateway_with_keys: GatewayWithKeys) -> TestClient:
    keys = {
        AGENT_VK: {
            "provider": "openai",
            "api_key": "sk-real-agent-0000000000",
            "name": "agent",
            "quota": {"requests": 100, "tokens": 1000, "window_seconds": 3600},
        },
        CLAUDE_VK: {"provider": "anthropic", "api_key": "sk-ant-real-agent", "name": "claude"},
    }
    return await gateway_with_keys(keys)


@pytest.fixture
async def openai_client(gateway: TestClient) -> AsyncIterator[AsyncOpenAI]:
    base = str(gateway.make_url("/v1"))
    async with AsyncOpenAI(base_url=base, api_key=AGENT_VK, max_retries=0) as client:
        yield client


@pytest.fixture
async def claude(gateway: TestClient) -> AsyncIterator[AsyncAnthropic]:
    base = str(gateway.make_url(""))
    async with AsyncAnthropic(base_url=base, api_key=CLAUDE_VK, max_retries=0) as client:
        yield client


async def tokens_used(gateway: TestClient, key: str, at_least: int) -> int:
    """The key's tokens in the window, once the charge of at least `at_least` landed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while True:
        document = await (await gateway.get("/usage", headers=auth(key))).json()
        used: int = document["tokens"]["used"]
        if used >= at_least or loop.time() > deadline:
            return used
        await asyncio.sleep(0.01)


def about(tokens: int, chars: int) -> bool:
    """`tokens` is about chars/4 (the estimate's rate), a few tokens of text or names aside."""
    return chars // 4 <= tokens <= chars // 4 + 50


async def test_a_stream_of_tool_call_arguments_is_charged_about_its_characters(
    openai_client: AsyncOpenAI, records: Records
) -> None:
    stream = await openai_client.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="required",
        stream=True,
        extra_headers=knobs(tool_chars=CHARS),
    )
    arguments = "".join(
        [
            call.function.arguments or ""
            async for chunk in stream
            for choice in chunk.choices
            for call in choice.delta.tool_calls or ()
            if call.function is not None
        ]
    )
    assert len(arguments) == CHARS
    [line] = await records(1)
    assert line["usage"]["estimated"] is True
    assert about(line["usage"]["completion_tokens"], CHARS), line["usage"]


async def test_a_stream_of_reasoning_content_is_charged_about_its_characters(
    gateway: TestClient, records: Records
) -> None:
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    headers = {**auth(AGENT_VK), **knobs(reasoning_chars=CHARS)}
    async with gateway.post("/v1/chat/completions", json=body, headers=headers) as response:
        sent = await response.read()
    assert sent.count(b'"reasoning_content"') == 20
    [line] = await records(1)
    assert line["usage"]["estimated"] is True
    assert about(line["usage"]["completion_tokens"], CHARS), line["usage"]


async def test_an_anthropic_stream_of_tool_input_is_charged_about_its_characters(
    claude: AsyncAnthropic, records: Records
) -> None:
    # The raw events: the SDK's stream helper needs the usage this provider does not send.
    stream = await claude.messages.create(
        model="claude-3-5-haiku-latest",
        max_tokens=50_000,
        messages=MESSAGES,  # type: ignore[arg-type]
        tools=CLAUDE_TOOLS,  # type: ignore[arg-type]
        stream=True,
        extra_headers=knobs(tool_chars=CHARS),
    )
    pieces = [
        event.delta.partial_json
        async for event in stream
        if event.type == "content_block_delta" and event.delta.type == "input_json_delta"
    ]
    assert len("".join(pieces)) == CHARS
    [line] = await records(1)
    assert line["usage"]["estimated"] is True
    assert about(line["usage"]["completion_tokens"], CHARS), line["usage"]


async def test_an_anthropic_stream_of_thinking_is_charged_about_its_characters(
    gateway: TestClient, records: Records
) -> None:
    body = {"model": "claude-3-5-haiku-latest", "max_tokens": 50_000, "messages": MESSAGES}
    headers = {"x-api-key": CLAUDE_VK, **knobs(reasoning_chars=CHARS)}
    async with gateway.post("/v1/messages", json={**body, "stream": True}, headers=headers) as r:
        sent = await r.read()
    assert sent.count(b'"thinking_delta"') == 20
    [line] = await records(1)
    assert line["usage"]["estimated"] is True
    assert about(line["usage"]["completion_tokens"], CHARS), line["usage"]


async def test_tool_call_streams_fill_the_token_window_and_the_next_is_refused(
    gateway: TestClient, openai_client: AsyncOpenAI
) -> None:
    """Four agent streams of 400,000 characters of arguments against 1,000 tokens."""
    refused = 0
    for _ in range(4):
        try:
            stream = await openai_client.chat.completions.create(
                model="gpt-4o-mini",
                messages=MESSAGES,  # type: ignore[arg-type]
                tools=TOOLS,  # type: ignore[arg-type]
                tool_choice="required",
                stream=True,
                extra_headers=knobs(tool_chars=400_000),
            )
            [chunk async for chunk in stream]
        except RateLimitError:
            refused += 1
        await tokens_used(gateway, AGENT_VK, 100_000)  # the charge lands after the stream
    used = await tokens_used(gateway, AGENT_VK, 100_000)
    assert used >= 100_000  # one stream's ~100,000 tokens: it was not charged ~1
    assert refused == 3
