"""Gemini through its OpenAI-compatible API, as Google's docs tell developers to call it: the
openai SDK with the gateway as its base URL and a virtual key of a `gemini` key (chat, streams,
embeddings, `reasoning_effort`, `extra_body={"google": ...}`). The built-in gemini's base URL
is `https://generativelanguage.googleapis.com/v1beta/openai`: here the fake's `/v1beta/openai`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import keys_document
from tests.support.fake_provider import GEMINI_OPENAI, FakeState

GEMINI_VK = "vk_test_gemini_openai_5c7e9a1b3d"
GEMINI_REAL = "AIzaSy-real-gemini-key-0123456789"
MESSAGES = [{"role": "user", "content": "hello there"}]


@pytest.fixture
async def gateway(
    tmp_path: Path, fake_base: str, make_gateway: Callable[..., Awaitable[TestClient]]
) -> TestClient:
    document = keys_document(fake_base)
    document["providers"]["gemini"] = {"base_url": fake_base + GEMINI_OPENAI}
    document["virtual_keys"][GEMINI_VK] = {
        "provider": "gemini",
        "api_key": GEMINI_REAL,
        "name": "gemini",
        "quota": {"tokens": 100000},
    }
    path = tmp_path / "gemini-keys.json"
    path.write_text(json.dumps(document))
    return await make_gateway(KEYS_FILE_PATH=str(path))


def sdk(gateway: TestClient) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=str(gateway.make_url("/v1")), api_key=GEMINI_VK, max_retries=0
    )


async def test_chat_with_googles_own_fields_reaches_gemini_as_sent(
    gateway: TestClient, fake: FakeState, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    answer = await sdk(gateway).chat.completions.create(
        model="gemini-2.5-flash",
        messages=MESSAGES,
        reasoning_effort="low",
        extra_body={"google": {"thinking_config": {"include_thoughts": True}}},
        extra_headers={"x-fake-thoughts-beside": "40"},
    )
    seen = fake.requests[-1]
    assert seen.path == GEMINI_OPENAI + "/chat/completions"
    assert seen.headers["Authorization"] == f"Bearer {GEMINI_REAL}"
    sent = json.loads(seen.body)
    assert sent["reasoning_effort"] == "low" and sent["google"]["thinking_config"]
    assert answer.usage is not None
    (line,) = await records(1)
    # The thoughts counted in total_tokens only are charged as completion.
    assert line["usage"]["total_tokens"] == answer.usage.total_tokens
    assert line["usage"]["completion_tokens"] == answer.usage.completion_tokens + 40
    assert line["cost_usd"] > 0


async def test_a_stream_and_embeddings_are_metered(
    gateway: TestClient, fake: FakeState, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    client = sdk(gateway)
    stream = await client.chat.completions.create(
        model="gemini-2.5-flash",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].usage is not None
    embedded = await client.embeddings.create(model="gemini-embedding-001", input="hello")
    assert len(embedded.data) == 1
    assert fake.requests[-1].path == GEMINI_OPENAI + "/embeddings"
    streamed, embedding = await records(2)
    assert streamed["stream"] is True and streamed["usage"]["estimated"] is False
    assert embedding["status"] == 200 and embedding["usage"]["prompt_tokens"] > 0


@pytest.mark.parametrize(
    ("status", "error", "kind"),
    [
        (400, openai.BadRequestError, "INVALID_ARGUMENT"),
        (429, openai.RateLimitError, "RESOURCE_EXHAUSTED"),
        (503, openai.InternalServerError, "UNAVAILABLE"),
    ],
)
async def test_googles_errors_pass_through_and_the_log_names_them(
    gateway: TestClient,
    fake: FakeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    status: int,
    error: type[openai.APIStatusError],
    kind: str,
) -> None:
    with pytest.raises(error) as raised:
        await sdk(gateway).chat.completions.create(
            model="gemini-2.5-flash",
            messages=MESSAGES,
            extra_headers={"x-fake-status": str(status), "x-request-id": f"req_gem_{status}"},
        )
    assert raised.value.response.content == fake.sent[f"req_gem_{status}"]
    (line,) = await records(1)
    assert line["status"] == status
    assert line["error"] == f"the provider sent an error in its answer ({kind})"
