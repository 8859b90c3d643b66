"""What a request reserves counts every string of its prompt, in every shape of its dialect:
tool definitions, earlier tool calls and their results, instructions, token arrays. Each
body here holds about 1,100 tokens of prompt in a shape the estimate read as 0 before: while
it runs (held at the fake), the key's window of 1,000 is full and its next request refused.
Gemini on Vertex and Bedrock's Converse and invoke are in test_vertex.py and test_bedrock.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import auth
from tests.support.fake_provider import FakeState
from tests.support.polling import until

VK = "vk_test_prompt_estimate_3b5d7f9a1c"
ANTHROPIC_VK = "vk_test_prompt_estimate_ant_2c4e6a8b0d"
WINDOW = {"requests": 100, "tokens": 1000}
LONG = "w" * 4400  # 1,100 tokens at 4 characters a token
TOKENS = list(range(1100))  # 1,100 tokens, as a token array
FUNCTION = {"name": "search", "description": LONG, "parameters": {"type": "object"}}
USER = {"role": "user", "content": "hi"}

SHAPES = [
    ("chat tools", "chat/completions", {
        "model": "gpt-4o-mini", "messages": [USER], "max_tokens": 50,
        "tools": [{"type": "function", "function": FUNCTION}]}),
    ("chat functions", "chat/completions", {
        "model": "gpt-4o-mini", "messages": [USER], "max_tokens": 50, "functions": [FUNCTION]}),
    ("chat earlier tool call's arguments", "chat/completions", {
        "model": "gpt-4o-mini", "max_tokens": 50, "messages": [
            USER,
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
             "function": {"name": "search", "arguments": LONG}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "ok"}]}),
    ("chat earlier custom tool call's input", "chat/completions", {
        "model": "gpt-5", "max_tokens": 50, "messages": [
            USER,
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "custom",
             "custom": {"name": "apply_patch", "input": LONG}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "ok"}]}),
    ("completions token array", "completions", {
        "model": "gpt-3.5-turbo-instruct", "prompt": TOKENS, "max_tokens": 50}),
    ("embeddings token arrays", "embeddings", {
        "model": "text-embedding-3-small", "input": [TOKENS[:600], TOKENS[600:]]}),
    ("responses instructions", "responses", {
        "model": "gpt-4o-mini", "instructions": LONG, "input": "hi", "max_output_tokens": 50}),
    ("responses function call output", "responses", {
        "model": "gpt-4o-mini", "max_output_tokens": 50, "input": [
            {"role": "user", "content": "hi"},
            {"type": "function_call", "call_id": "c1", "name": "search", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": LONG}]}),
    ("responses tools", "responses", {
        "model": "gpt-4o-mini", "input": "hi", "max_output_tokens": 50,
        "tools": [{"type": "function", **FUNCTION}]}),
    ("anthropic tools", "messages", {
        "model": "claude-sonnet-4-5", "max_tokens": 50, "messages": [USER],
        "tools": [{"name": "search", "description": LONG, "input_schema": {"type": "object"}}]}),
    ("anthropic earlier tool use's input", "messages", {
        "model": "claude-sonnet-4-5", "max_tokens": 50, "messages": [
            USER,
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "t1", "name": "search", "input": {"q": LONG}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]}]}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body"), [pytest.param(path, body, id=name) for name, path, body in SHAPES]
)
async def test_a_small_window_is_full_beside_a_large_prompt_in_any_shape(
    gateway_with_keys: Callable[..., Awaitable[TestClient]],
    fake: FakeState,
    path: str,
    body: dict[str, Any],
) -> None:
    is_anthropic = path == "messages"
    key = ANTHROPIC_VK if is_anthropic else VK
    gateway = await gateway_with_keys(
        {
            key: {
                "provider": "anthropic" if is_anthropic else "openai",
                "api_key": "sk-prompt-estimate-real-1234",
                "quota": WINDOW,
            }
        }
    )
    headers = {**auth(key), "x-fake-hold": "1"}
    large = asyncio.create_task(gateway.post(f"/v1/{path}", json=body, headers=headers))
    await until(lambda: len(fake.requests) == 1)
    async with gateway.get("/usage", headers=auth(key)) as usage:
        reserved = (await usage.json())["tokens"]["reserved"]
    assert reserved >= 1100, reserved
    small = await gateway.post(f"/v1/{path}", json={**body, **SMALL[path]}, headers=auth(key))
    assert small.status == 429, await small.text()
    fake.release.set()
    async with await large as answered:
        assert answered.status == 200
    assert len(fake.requests) == 1


# The small request beside it: the same endpoint, a prompt of a few tokens.
SMALL: dict[str, dict[str, Any]] = {
    "chat/completions": {"messages": [USER], "tools": None, "functions": None},
    "completions": {"prompt": "hi"},
    "embeddings": {"input": "hi"},
    "responses": {"input": "hi", "instructions": None, "tools": None},
    "messages": {"messages": [USER], "tools": None},
}
