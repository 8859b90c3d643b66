"""Stored chat completions (`store=True`) through the gateway, with the official SDK.

A completion is charged once, when it is made: listing, retrieving, reading its messages,
updating its metadata and deleting it generate nothing, though the provider answers most
of them with the stored completion, its `usage` included.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from openai import AsyncOpenAI

from tests.conftest import OPENAI_VK, auth
from tests.support.fake_provider import FakeState

Records = Callable[..., Awaitable[list[dict[str, Any]]]]
MESSAGES = [{"role": "user", "content": "say hello please"}]


@pytest.fixture
async def client(gateway: TestClient) -> AsyncIterator[AsyncOpenAI]:
    sdk = AsyncOpenAI(base_url=str(gateway.make_url("/v1")), api_key=OPENAI_VK, max_retries=0)
    yield sdk
    await sdk.close()


async def usage_of(gateway: TestClient) -> dict[str, Any]:
    return await (await gateway.get("/usage", headers=auth(OPENAI_VK))).json()


async def test_a_stored_completion_is_charged_once_whatever_is_done_with_it_later(
    gateway: TestClient, client: AsyncOpenAI, fake: FakeState, records: Records
) -> None:
    made = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, store=True, metadata={"run": "1"}
    )
    assert made.usage is not None
    (line,) = await records(1)
    assert line["usage"]["total_tokens"] == made.usage.total_tokens
    charged = (await usage_of(gateway))["tokens"]["used"]
    assert charged == made.usage.total_tokens

    listed = await client.chat.completions.list(metadata={"run": "1"})
    assert [item.id for item in listed.data] == [made.id]
    fetched = await client.chat.completions.retrieve(made.id)
    assert fetched.usage == made.usage  # the provider says it again: not used again
    messages = await client.chat.completions.messages.list(made.id)
    assert [message.content for message in messages.data] == ["say hello please"]
    updated = await client.chat.completions.update(made.id, metadata={"run": "2"})
    assert updated.id == made.id and updated.usage == made.usage
    deleted = await client.chat.completions.delete(made.id)
    assert deleted.deleted is True

    lines = await records(6)
    assert [(line["method"], line["status"]) for line in lines[1:]] == [
        ("GET", 200),
        ("GET", 200),
        ("GET", 200),
        ("POST", 200),
        ("DELETE", 200),
    ]
    assert [line["usage"] for line in lines[1:]] == [None] * 5
    assert [line["cost_usd"] for line in lines[1:]] == [None] * 5
    assert (await usage_of(gateway))["tokens"]["used"] == charged
