"""Gemini's native API on Google AI (generativelanguage.googleapis.com) through a declared
provider (`auth: x-goog-api-key`): the key where Google's clients put it, and the metering.

Google's own curl examples (and older SDKs) send the API key as `?key=<key>` in the query
string; the google-genai SDK sends `x-goog-api-key`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import CUSTOM_REAL, CUSTOM_VK
from tests.support.fake_provider import FakeState

GENERATE = "/v1/models/gemini-2.5-flash:generateContent"
CONTENTS = {"contents": [{"role": "user", "parts": [{"text": "hello there"}]}]}


async def test_a_virtual_key_in_the_query_string_is_swapped_and_never_forwarded(
    gateway: TestClient, fake: FakeState, log_path: Path
) -> None:
    response = await gateway.post(
        f"{GENERATE}?alt=sse&key={CUSTOM_VK}&$fields=candidates", json=CONTENTS
    )
    assert response.status == 200, await response.text()
    seen = fake.requests[-1]
    assert seen.headers.getall("x-goog-api-key") == [CUSTOM_REAL]
    assert seen.query_string == "alt=sse&$fields=candidates"
    assert CUSTOM_VK not in seen.path + seen.query_string + str(list(seen.headers.items()))
    metrics = await (await gateway.get("/metrics")).text()
    assert CUSTOM_VK not in metrics
    assert CUSTOM_VK not in log_path.read_text()


async def test_a_key_parameter_beside_a_key_header_is_not_forwarded_either(
    gateway: TestClient, fake: FakeState
) -> None:
    response = await gateway.post(
        f"{GENERATE}?key={CUSTOM_VK}", json=CONTENTS, headers={"x-goog-api-key": CUSTOM_VK}
    )
    assert response.status == 200, await response.text()
    seen = fake.requests[-1]
    assert seen.headers.getall("x-goog-api-key") == [CUSTOM_REAL]
    assert seen.query_string == ""
    assert CUSTOM_VK not in seen.path


async def test_a_key_in_the_query_string_gets_100_continue(gateway: TestClient) -> None:
    # curl sends `Expect: 100-continue` for a body over 1 KiB and waits a second without it.
    reader, writer = await asyncio.open_connection(gateway.server.host, gateway.server.port)
    try:
        head = f"POST {GENERATE}?key={CUSTOM_VK} HTTP/1.1\r\nHost: gateway\r\n"
        head += "Content-Length: 100\r\nExpect: 100-continue\r\n\r\n"
        writer.write(head.encode())
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
    assert line.startswith(b"HTTP/1.1 100 Continue"), line


TEXT = "x" * 400  # 100 tokens at four characters a token


@pytest.mark.parametrize(
    ("call", "body"),
    [
        ("gemini-embedding-001:embedContent", {"content": {"parts": [{"text": TEXT}]}}),
        (
            "gemini-embedding-001:batchEmbedContents",
            {
                "requests": [
                    {
                        "model": "models/gemini-embedding-001",
                        "content": {"parts": [{"text": TEXT[:200]}]},
                    },
                    {
                        "model": "models/gemini-embedding-001",
                        "content": {"parts": [{"text": TEXT[200:]}]},
                    },
                ]
            },
        ),
    ],
)
async def test_an_embedding_answered_without_usage_is_charged_its_prompt_estimated(
    gateway: TestClient,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    call: str,
    body: dict[str, Any],
) -> None:
    # Google AI answers embedContent and batchEmbedContents with the vectors alone: no usage.
    response = await gateway.post(
        f"/v1/models/{call}", json=body, headers={"x-goog-api-key": CUSTOM_VK}
    )
    assert response.status == 200, await response.text()
    (line,) = await records(1)
    assert line["model"] == "gemini-embedding-001"
    assert line["usage"] is not None, line
    assert line["usage"]["prompt_tokens"] == 100
    assert line["usage"]["completion_tokens"] == 0
    assert line["usage"]["estimated"] is True


async def test_a_route_model_is_put_in_the_path_that_names_the_model(
    gateway_with_keys: Callable[..., Awaitable[TestClient]],
    fake: FakeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    """Gemini's native API names the model in the path (`models/<model>:generateContent`),
    none in the body: a route pinning its model (chosen by the path's) swapped a body
    `model` there was none of, and the provider ran the client's model."""
    vk = "vk_test_gemini_routed_6a8c0e2b4d"
    route = {"models": ["gemini-*"], "provider": "local", "api_key": CUSTOM_REAL}
    key = {"name": "gemini-routed", "routes": [{**route, "model": "gemini-2.5-flash-lite"}]}
    gateway = await gateway_with_keys({vk: key})
    for model in ("gemini-2.5-pro", "gemini-2.5-flash"):
        response = await gateway.post(
            f"/v1/models/{model}:streamGenerateContent?alt=sse",
            json=CONTENTS,
            headers={"x-goog-api-key": vk},
        )
        assert response.status == 200, await response.text()
        await response.read()
    paths = [seen.path for seen in fake.requests]
    assert paths == ["/v1/models/gemini-2.5-flash-lite:streamGenerateContent"] * 2
    assert [seen.query_string for seen in fake.requests] == ["alt=sse"] * 2
    lines = await records(2)
    assert [line["model"] for line in lines] == ["gemini-2.5-pro", "gemini-2.5-flash"]


async def test_a_route_model_is_put_in_each_request_of_a_batch_embedding(
    gateway_with_keys: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    """batchEmbedContents names the model in the path and again in each request, which must
    match the path's (Google refuses the batch otherwise): the path naming the route's model,
    each request's `model` names it too, as Google spells a model there (`models/<model>`)."""
    vk = "vk_test_gemini_batched_8c0e2a4b6d"
    route = {"models": ["gemini-*"], "provider": "local", "api_key": CUSTOM_REAL}
    key = {"name": "gemini-batched", "routes": [{**route, "model": "gemini-embedding-2"}]}
    gateway = await gateway_with_keys({vk: key})
    item = {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "hi"}]}}
    response = await gateway.post(
        "/v1/models/gemini-embedding-001:batchEmbedContents",
        json={"requests": [item, {**item, "model": "gemini-embedding-001"}]},
        headers={"x-goog-api-key": vk},
    )
    assert response.status == 200, await response.text()
    (seen,) = fake.requests
    assert seen.path == "/v1/models/gemini-embedding-2:batchEmbedContents"
    models = [request["model"] for request in json.loads(seen.body)["requests"]]
    assert models == ["models/gemini-embedding-2", "gemini-embedding-2"]
