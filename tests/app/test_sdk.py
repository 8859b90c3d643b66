"""The official SDKs, pointed at the gateway, work unchanged and get the provider's exact bytes.

Each test sends a known `x-request-id`; the fake provider files what it sent under that id
(`fake.sent[id]`), so a test compares it with the raw body the client received. The real
key must reach the fake in the provider's own header, and the virtual key must not.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anthropic
import httpx2
import openai
import pytest
from aiohttp.test_utils import TestClient
from anthropic import AsyncAnthropic
from openai import AsyncOpenAI

from tests.conftest import (
    ANTHROPIC_REAL,
    ANTHROPIC_VK,
    LIMITED_VK,
    OPENAI_REAL,
    OPENAI_VK,
    RESTRICTED_REAL,
    RESTRICTED_VK,
    assert_anthropic_error,
    assert_openai_error,
    auth,
)
from tests.support.fake_provider import TOOL_ARGUMENTS, FakeState, Seen

MESSAGES = [{"role": "user", "content": "say hello please"}]
TEXT = "tok0 tok1 tok2 "
TOOLS = [
    {
        "type": "function",
        "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}},
    }
]
CLAUDE = "claude-sonnet-4-6"
_ids = itertools.count()


def request_id(what: str) -> str:
    """A fresh x-request-id, under which the fake files the bytes it sent."""
    return f"req_sdk_{what}_{next(_ids)}"


def tagged(rid: str) -> dict[str, dict[str, str]]:
    return {"extra_headers": {"x-request-id": rid}}


def assert_openai_key_swapped(
    seen: Seen, real: str = OPENAI_REAL, virtual: str = OPENAI_VK
) -> None:
    """The real key went up as a Bearer token; the virtual key went nowhere."""
    assert seen.headers["Authorization"] == f"Bearer {real}"
    assert not any(virtual in value for value in seen.headers.values()), seen.headers


def assert_anthropic_key_swapped(
    seen: Seen, real: str = ANTHROPIC_REAL, virtual: str = ANTHROPIC_VK
) -> None:
    """The real key went up in x-api-key; no Authorization; the virtual key went nowhere."""
    assert seen.headers.getall("x-api-key") == [real]
    assert "Authorization" not in seen.headers
    assert not any(virtual in value for value in seen.headers.values()), seen.headers


def sse_data(raw: bytes) -> list[dict]:
    """The JSON payloads of an SSE body (skipping [DONE])."""
    payloads = []
    for event in raw.decode().split("\n\n"):
        for line in event.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                payloads.append(json.loads(line[len("data: ") :]))
    return payloads


@pytest.fixture
async def openai_sdk(gateway: TestClient) -> AsyncIterator[Callable[..., AsyncOpenAI]]:
    """A factory: an AsyncOpenAI client on the gateway's /v1 (or `root`), closed at teardown."""
    clients: list[AsyncOpenAI] = []

    def make(key: str = OPENAI_VK, root: str = "/v1", max_retries: int = 0) -> AsyncOpenAI:
        client = AsyncOpenAI(
            base_url=str(gateway.make_url(root)), api_key=key, max_retries=max_retries
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
async def anthropic_sdk(gateway: TestClient) -> AsyncIterator[Callable[..., AsyncAnthropic]]:
    """A factory: an AsyncAnthropic client on the gateway's root, closed at teardown."""
    clients: list[AsyncAnthropic] = []

    def make(key: str = ANTHROPIC_VK) -> AsyncAnthropic:
        client = AsyncAnthropic(base_url=str(gateway.make_url("")), api_key=key, max_retries=0)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


# --- OpenAI: chat completions ----------------------------------------------------------


async def test_async_chat_completion_gets_the_providers_exact_bytes(
    openai_sdk, fake: FakeState
) -> None:
    rid = request_id("chat")
    raw = await openai_sdk().chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, **tagged(rid)
    )
    assert raw.status_code == 200
    assert raw.content == fake.sent[rid]
    assert raw.headers["x-request-id"] == rid
    completion = raw.parse()
    assert completion.choices[0].message.content == TEXT
    assert completion.usage.prompt_tokens == 3
    seen = fake.requests[-1]
    assert (seen.method, seen.path) == ("POST", "/v1/chat/completions")
    assert_openai_key_swapped(seen)


async def test_sync_chat_completion_works_from_a_thread(
    gateway: TestClient, fake: FakeState
) -> None:
    rid = request_id("sync")

    def call() -> tuple[bytes, str | None]:
        with openai.OpenAI(
            base_url=str(gateway.make_url("/v1")), api_key=OPENAI_VK, max_retries=0
        ) as client:
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=MESSAGES, **tagged(rid)
            )
            return raw.content, raw.parse().choices[0].message.content

    content, text = await asyncio.to_thread(call)
    assert content == fake.sent[rid]
    assert text == TEXT
    assert_openai_key_swapped(fake.requests[-1])


async def test_sync_streaming_works_from_a_thread(gateway: TestClient, fake: FakeState) -> None:
    rid = request_id("sync_stream")

    def call() -> str:
        with openai.OpenAI(
            base_url=str(gateway.make_url("/v1")), api_key=OPENAI_VK, max_retries=0
        ) as client:
            stream = client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, stream=True, **tagged(rid)
            )
            return "".join(
                chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices
            )

    assert await asyncio.to_thread(call) == TEXT
    assert fake.sent[rid].endswith(b"data: [DONE]\n\n")


async def test_streaming_chat_completion_yields_each_chunk(openai_sdk, fake: FakeState) -> None:
    rid = request_id("stream")
    stream = await openai_sdk().chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, **tagged(rid)
    )
    texts = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices]
    assert "".join(text or "" for text in texts) == TEXT
    assert len(texts) == 5  # role chunk, three deltas, finish chunk
    assert_openai_key_swapped(fake.requests[-1])


async def test_streaming_chat_completion_bytes_are_the_providers(
    openai_sdk, fake: FakeState
) -> None:
    rid = request_id("stream_raw")
    async with openai_sdk().chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, **tagged(rid)
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        received = b"".join([chunk async for chunk in response.iter_bytes()])
    assert received == fake.sent[rid]


async def test_stream_options_include_usage_delivers_the_usage_chunk(
    openai_sdk, fake: FakeState
) -> None:
    rid = request_id("usage")
    stream = await openai_sdk().chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        **tagged(rid),
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 3
    assert chunks[-1].usage.prompt_tokens == 3
    assert json.loads(fake.requests[-1].body)["stream_options"] == {"include_usage": True}
    assert b'"usage":{"prompt_tokens":3' in fake.sent[rid]


async def test_tool_calls_arrive_parsed(openai_sdk, fake: FakeState) -> None:
    rid = request_id("tools")
    raw = await openai_sdk().chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, tools=TOOLS, **tagged(rid)
    )
    assert raw.content == fake.sent[rid]
    choice = raw.parse().choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert (call.function.name, call.function.arguments) == ("lookup", TOOL_ARGUMENTS)
    assert json.loads(fake.requests[-1].body)["tools"] == TOOLS


async def test_streamed_tool_call_arguments_reassemble(openai_sdk, fake: FakeState) -> None:
    stream = await openai_sdk().chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        tools=TOOLS,
        stream=True,
        **tagged(request_id("tool_stream")),
    )
    arguments, names = "", []
    async for chunk in stream:
        for call in chunk.choices[0].delta.tool_calls or []:
            names += [call.function.name] if call.function.name else []
            arguments += call.function.arguments or ""
    assert (names, arguments) == (["lookup"], TOOL_ARGUMENTS)


# --- OpenAI: Responses, embeddings, models, legacy completions ----------------------------


async def test_responses_api_gets_the_providers_exact_bytes(openai_sdk, fake: FakeState) -> None:
    rid = request_id("responses")
    raw = await openai_sdk().responses.with_raw_response.create(
        model="gpt-4o-mini", input="say hello", **tagged(rid)
    )
    assert raw.content == fake.sent[rid]
    assert raw.parse().output_text == TEXT
    seen = fake.requests[-1]
    assert seen.path == "/v1/responses"
    assert_openai_key_swapped(seen)


async def test_responses_api_stream_yields_every_event(openai_sdk, fake: FakeState) -> None:
    rid = request_id("responses_stream")
    stream = await openai_sdk().responses.create(
        model="gpt-4o-mini", input="say hello", stream=True, **tagged(rid)
    )
    events = [event async for event in stream]
    assert [event.type for event in events][:2] == ["response.created", "response.in_progress"]
    assert (
        "".join(event.delta for event in events if event.type == "response.output_text.delta")
        == TEXT
    )
    assert events[-1].type == "response.completed"
    assert [event.sequence_number for event in events] == [
        payload["sequence_number"] for payload in sse_data(fake.sent[rid])
    ]


async def test_responses_api_stream_bytes_are_the_providers(openai_sdk, fake: FakeState) -> None:
    rid = request_id("responses_raw")
    async with openai_sdk().responses.with_streaming_response.create(
        model="gpt-4o-mini", input="say hello", stream=True, **tagged(rid)
    ) as response:
        received = b"".join([chunk async for chunk in response.iter_bytes()])
    assert received == fake.sent[rid]


async def test_a_stored_response_fetched_as_a_stream_is_logged_as_a_stream(
    openai_sdk, records
) -> None:
    # The SDK asks for this stream in the query (GET /v1/responses/{id}?stream=true), and a
    # streamed transcription in a form field: no JSON body says "stream": true.
    client = openai_sdk()
    created = await client.responses.create(model="gpt-4o-mini", input="hi", background=True)
    events = [event async for event in await client.responses.retrieve(created.id, stream=True)]
    assert events[-1].type == "response.completed"
    made, fetched = await records(2)
    assert (made["method"], made["stream"]) == ("POST", False)
    assert (fetched["method"], fetched["stream"]) == ("GET", True)


async def test_embeddings_get_the_providers_exact_bytes(openai_sdk, fake: FakeState) -> None:
    rid = request_id("embeddings")
    raw = await openai_sdk().embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=["one", "two"], **tagged(rid)
    )
    assert raw.content == fake.sent[rid]
    result = raw.parse()
    assert [item.index for item in result.data] == [0, 1]
    assert len(result.data[0].embedding) == 8
    seen = fake.requests[-1]
    assert seen.path == "/v1/embeddings"
    assert_openai_key_swapped(seen)


async def test_embeddings_in_the_sdks_default_base64_decode(openai_sdk, fake: FakeState) -> None:
    # The SDK asks for base64 and decodes it itself when no encoding_format is given.
    result = await openai_sdk().embeddings.create(model="text-embedding-3-small", input="one")
    assert result.data[0].embedding == pytest.approx([position / 8 for position in range(8)])


async def test_models_list_gets_the_providers_exact_bytes(openai_sdk, fake: FakeState) -> None:
    rid = request_id("models")
    raw = await openai_sdk().models.with_raw_response.list(**tagged(rid))
    assert raw.content == fake.sent[rid]
    page = raw.parse()
    assert "gpt-4o-mini" in [model.id async for model in page]
    seen = fake.requests[-1]
    assert (seen.method, seen.path) == ("GET", "/v1/models")
    assert_openai_key_swapped(seen)


async def test_models_retrieve_keeps_the_model_in_the_path(openai_sdk, fake: FakeState) -> None:
    model = await openai_sdk().models.retrieve("gpt-4o-mini")
    assert model.id == "gpt-4o-mini"
    assert fake.requests[-1].path == "/v1/models/gpt-4o-mini"


async def test_legacy_completions_get_the_providers_exact_bytes(
    openai_sdk, fake: FakeState
) -> None:
    rid = request_id("completions")
    raw = await openai_sdk().completions.with_raw_response.create(
        model="gpt-3.5-turbo-instruct", prompt="say hello", **tagged(rid)
    )
    assert raw.content == fake.sent[rid]
    assert raw.parse().choices[0].text == TEXT
    assert fake.requests[-1].path == "/v1/completions"
    assert_openai_key_swapped(fake.requests[-1])


async def test_legacy_completions_stream(openai_sdk, fake: FakeState) -> None:
    stream = await openai_sdk().completions.create(
        model="gpt-3.5-turbo-instruct",
        prompt="say hello",
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == TEXT
    assert chunks[-1].usage.completion_tokens == 3


# --- OpenAI: files and uploads (multipart up, bytes down) --------------------------------


async def test_a_file_goes_up_as_a_form_and_comes_back_as_its_bytes(
    openai_sdk, fake: FakeState, tmp_path: Path
) -> None:
    sent = tmp_path / "requests.jsonl"
    sent.write_bytes(b'{"custom_id": "a"}\n' * 150_000)  # 2.85 MB: read whole, not peeked
    client = openai_sdk()
    raw = await client.files.with_raw_response.create(file=sent, purpose="batch")
    made = raw.parse()
    assert made.bytes == sent.stat().st_size
    assert made._request_id == raw.headers["x-request-id"]  # the gateway's, as SPEC says
    content = await client.files.content(made.id)
    assert content.content == sent.read_bytes()
    assert_openai_key_swapped(fake.requests[0])


async def test_a_chunked_upload_sends_each_part_and_completes(
    openai_sdk, fake: FakeState, tmp_path: Path
) -> None:
    sent = tmp_path / "big.jsonl"
    sent.write_bytes(bytes(range(256)) * 12_000)  # 3 MB in three parts of 1 MiB
    upload = await openai_sdk().uploads.upload_file_chunked(
        file=sent, mime_type="text/jsonl", purpose="batch", part_size=1 << 20
    )
    assert upload.status == "completed" and upload.file is not None
    assert upload.file.bytes == sent.stat().st_size
    assert [seen.path.rsplit("/", 1)[-1] for seen in fake.requests] == [
        "uploads",
        "parts",
        "parts",
        "parts",
        "complete",
    ]


# --- Anthropic ---------------------------------------------------------------------------


async def test_anthropic_message_gets_the_providers_exact_bytes(
    anthropic_sdk, fake: FakeState
) -> None:
    rid = request_id("message")
    raw = await anthropic_sdk().messages.with_raw_response.create(
        model=CLAUDE, max_tokens=64, messages=MESSAGES, **tagged(rid)
    )
    assert raw.status_code == 200
    assert await raw.read() == fake.sent[rid]
    assert raw.headers["x-request-id"] == rid
    message = await raw.parse()
    assert message.content[0].text == TEXT
    assert message.usage.input_tokens == 3
    seen = fake.requests[-1]
    assert (seen.method, seen.path) == ("POST", "/v1/messages")
    # The SDK's own anthropic-version passes through; the provider default is only a fallback.
    assert seen.headers.getall("anthropic-version") == [
        raw.http_request.headers["anthropic-version"]
    ]
    assert_anthropic_key_swapped(seen)


async def test_anthropic_messages_stream_helper_assembles_the_message(
    anthropic_sdk, fake: FakeState
) -> None:
    rid = request_id("message_stream")
    async with anthropic_sdk().messages.stream(
        model=CLAUDE, max_tokens=64, messages=MESSAGES, **tagged(rid)
    ) as stream:
        texts = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert texts == ["tok0 ", "tok1 ", "tok2 "]
    assert final.content[0].text == TEXT
    assert final.usage.output_tokens == 3
    assert fake.sent[rid].startswith(b"event: message_start\n")
    assert_anthropic_key_swapped(fake.requests[-1])


async def test_anthropic_stream_bytes_are_the_providers(anthropic_sdk, fake: FakeState) -> None:
    rid = request_id("message_raw")
    async with anthropic_sdk().messages.with_streaming_response.create(
        model=CLAUDE, max_tokens=64, messages=MESSAGES, stream=True, **tagged(rid)
    ) as response:
        received = b"".join([chunk async for chunk in response.iter_bytes()])
    assert received == fake.sent[rid]


async def test_anthropic_count_tokens_gets_the_providers_exact_bytes(
    anthropic_sdk, fake: FakeState
) -> None:
    rid = request_id("count")
    raw = await anthropic_sdk().messages.with_raw_response.count_tokens(
        model=CLAUDE, messages=MESSAGES, **tagged(rid)
    )
    assert await raw.read() == fake.sent[rid]
    assert (await raw.parse()).input_tokens == 3
    seen = fake.requests[-1]
    assert seen.path == "/v1/messages/count_tokens"
    assert_anthropic_key_swapped(seen)


async def test_anthropic_files_go_up_as_a_form_and_come_back_as_their_bytes(
    anthropic_sdk, fake: FakeState, records
) -> None:
    # The Files API (beta): upload, list, metadata, download, delete; a restricted key too,
    # as none of them runs a model. None is charged a token.
    client = anthropic_sdk(RESTRICTED_VK)
    content = bytes(range(256)) * 8
    uploaded = await client.beta.files.upload(
        file=("notes.bin", content, "application/pdf"), betas=["files-api-2025-04-14"]
    )
    assert (uploaded.filename, uploaded.size_bytes) == ("notes.bin", len(content))
    seen = fake.requests[-1]
    assert seen.headers["anthropic-beta"] == "files-api-2025-04-14"
    assert seen.headers.getall("x-api-key") == [RESTRICTED_REAL]
    page = await client.beta.files.list(limit=5)
    assert [file.id for file in page.data] == [uploaded.id]
    metadata = await client.beta.files.retrieve_metadata(uploaded.id)
    assert metadata.mime_type == "application/pdf"
    download = await client.beta.files.download(uploaded.id)
    assert await download.read() == content
    deleted = await client.beta.files.delete(uploaded.id)
    assert deleted.type == "file_deleted"
    lines = await records(5)
    assert [(line["method"], line["status"], line["usage"]) for line in lines] == [
        ("POST", 200, None),
        ("GET", 200, None),
        ("GET", 200, None),
        ("GET", 200, None),
        ("DELETE", 200, None),
    ]


async def test_restricted_key_may_use_an_allowed_model(anthropic_sdk, fake: FakeState) -> None:
    message = await anthropic_sdk(RESTRICTED_VK).messages.create(
        model="claude-sonnet-4-6-20260101", max_tokens=64, messages=MESSAGES
    )
    assert message.content[0].text == TEXT


# --- seed paths without /v1 ----------------------------------------------------------------


async def test_openai_sdk_on_the_root_uses_the_seed_paths(openai_sdk, fake: FakeState) -> None:
    client = openai_sdk(root="")
    rid = request_id("seed_sdk")
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, **tagged(rid)
    )
    assert raw.content == fake.sent[rid]
    assert fake.requests[-1].path == "/v1/chat/completions"
    await client.embeddings.create(model="text-embedding-3-small", input="one")
    await client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi")
    assert [model.id async for model in await client.models.list()]
    assert [seen.path for seen in fake.requests[-3:]] == [
        "/v1/embeddings",
        "/v1/completions",
        "/v1/models",
    ]


RAW_CALLS = [
    # the seed paths without /v1
    ("POST", "/chat/completions", OPENAI_VK, {"model": "gpt-4o-mini", "messages": MESSAGES}),
    (
        "POST",
        "/chat/completions",
        OPENAI_VK,
        {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True},
    ),
    ("POST", "/completions", OPENAI_VK, {"model": "gpt-3.5-turbo-instruct", "prompt": "hi"}),
    (
        "POST",
        "/completions",
        OPENAI_VK,
        {"model": "gpt-3.5-turbo-instruct", "prompt": "hi", "stream": True},
    ),
    ("POST", "/embeddings", OPENAI_VK, {"model": "text-embedding-3-small", "input": "hi"}),
    ("GET", "/models", OPENAI_VK, None),
    ("POST", "/messages", ANTHROPIC_VK, {"model": CLAUDE, "max_tokens": 9, "messages": MESSAGES}),
    (
        "POST",
        "/messages",
        ANTHROPIC_VK,
        {"model": CLAUDE, "max_tokens": 9, "messages": MESSAGES, "stream": True},
    ),
    # the streams the SDK tests parse, read here as raw bytes
    (
        "POST",
        "/v1/chat/completions",
        OPENAI_VK,
        {
            "model": "gpt-4o-mini",
            "messages": MESSAGES,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ),
    (
        "POST",
        "/v1/chat/completions",
        OPENAI_VK,
        {"model": "gpt-4o-mini", "messages": MESSAGES, "tools": TOOLS, "stream": True},
    ),
    ("POST", "/v1/responses", OPENAI_VK, {"model": "gpt-4o-mini", "input": "hi", "stream": True}),
    (
        "POST",
        "/v1/messages",
        ANTHROPIC_VK,
        {"model": CLAUDE, "max_tokens": 9, "messages": MESSAGES, "stream": True},
    ),
]


@pytest.mark.parametrize(("method", "path", "key", "payload"), RAW_CALLS)
async def test_raw_request_gets_the_providers_exact_bytes(
    gateway: TestClient, fake: FakeState, method: str, path: str, key: str, payload: dict | None
) -> None:
    rid = request_id("raw")
    headers = {**auth(key), "x-request-id": rid}
    body = json.dumps(payload).encode() if payload is not None else None
    if body is not None:
        headers["Content-Type"] = "application/json"
    async with gateway.request(method, path, data=body, headers=headers) as response:
        received = await response.read()
        assert response.status == 200, received
        assert response.headers["x-request-id"] == rid
    assert received == fake.sent[rid]
    seen = fake.requests[-1]
    # A seed path maps to the same provider path as its /v1 twin.
    assert (seen.method, seen.path) == (method, path if path.startswith("/v1/") else "/v1" + path)
    assert seen.body == (body or b"")
    if key == OPENAI_VK:
        assert_openai_key_swapped(seen)
    else:
        assert_anthropic_key_swapped(seen)


# --- the gateway's own refusals raise each SDK's usual exception ----------------------------


async def test_unknown_key_raises_openai_authentication_error(openai_sdk, fake: FakeState) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        await openai_sdk("vk_not_a_key").chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES
        )
    assert caught.value.status_code == 401
    assert_openai_error(caught.value.response.json(), "invalid_api_key")
    assert fake.requests == []


async def test_unknown_key_raises_anthropic_authentication_error(
    anthropic_sdk, fake: FakeState
) -> None:
    with pytest.raises(anthropic.AuthenticationError) as caught:
        await anthropic_sdk("vk_not_a_key").messages.create(
            model=CLAUDE, max_tokens=9, messages=MESSAGES
        )
    assert caught.value.status_code == 401
    assert_anthropic_error(caught.value.response.json(), "authentication_error")
    assert fake.requests == []
    # The SDK reads its error's request id from `request-id`, as Anthropic sends it.
    assert caught.value.request_id == caught.value.response.headers["x-request-id"]


async def test_an_anthropic_sdk_refused_on_a_shared_path_reads_the_request_id(
    anthropic_sdk, fake: FakeState
) -> None:
    # /v1/models is shared: its errors are OpenAI-shaped (SPEC), the SDK raises by status.
    with pytest.raises(anthropic.AuthenticationError) as caught:
        await anthropic_sdk("vk_not_a_key").models.list()
    assert caught.value.request_id == caught.value.response.headers["x-request-id"]
    assert fake.requests == []


async def test_unknown_key_on_count_tokens_is_anthropic_shaped(
    anthropic_sdk, fake: FakeState
) -> None:
    with pytest.raises(anthropic.AuthenticationError):
        await anthropic_sdk("vk_not_a_key").messages.count_tokens(model=CLAUDE, messages=MESSAGES)


async def test_a_provider_silent_past_request_timeout_is_anthropics_timeout_error(
    make_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    # Anthropic's own 504 is typed timeout_error; the SDK exposes it as the error's `type`.
    gateway = await make_gateway(REQUEST_TIMEOUT="0.3")
    client = AsyncAnthropic(base_url=str(gateway.make_url("")), api_key=ANTHROPIC_VK, max_retries=0)
    with pytest.raises(anthropic.GatewayTimeoutError) as caught:
        await client.messages.create(
            model=CLAUDE, max_tokens=9, messages=MESSAGES, extra_headers={"x-fake-hang": "headers"}
        )
    await client.close()
    assert_anthropic_error(caught.value.response.json(), "timeout_error")
    assert caught.value.type == "timeout_error"


@pytest.mark.parametrize(
    ("field", "overrides"),
    [("model", {"model": ""}), ("messages", {"messages": []})],
)
async def test_openai_missing_field_raises_bad_request_naming_it(
    openai_sdk, fake: FakeState, field: str, overrides: dict
) -> None:
    arguments = {"model": "gpt-4o-mini", "messages": MESSAGES, **overrides}
    with pytest.raises(openai.BadRequestError) as caught:
        await openai_sdk().chat.completions.create(**arguments)
    assert caught.value.status_code == 400
    body = caught.value.response.json()
    assert_openai_error(body, "missing_field")
    assert body["error"]["param"] == field
    assert field in caught.value.message
    assert fake.requests == []


async def test_openai_body_without_model_key_raises_bad_request(
    openai_sdk, fake: FakeState
) -> None:
    # The typed SDK insists on model; a raw post through the same client omits it.
    with pytest.raises(openai.BadRequestError) as caught:
        await openai_sdk().post("/chat/completions", body={"messages": MESSAGES}, cast_to=object)
    assert "model" in caught.value.message
    assert fake.requests == []


@pytest.mark.parametrize(
    ("field", "overrides"),
    [("model", {"model": ""}), ("messages", {"messages": []})],
)
async def test_anthropic_missing_field_raises_bad_request_naming_it(
    anthropic_sdk, fake: FakeState, field: str, overrides: dict
) -> None:
    arguments = {"model": CLAUDE, "max_tokens": 9, "messages": MESSAGES, **overrides}
    with pytest.raises(anthropic.BadRequestError) as caught:
        await anthropic_sdk().messages.create(**arguments)
    assert caught.value.status_code == 400
    assert_anthropic_error(caught.value.response.json(), "invalid_request_error")
    assert f"'{field}'" in caught.value.message
    assert fake.requests == []


async def test_restricted_model_raises_anthropic_permission_denied(
    anthropic_sdk, fake: FakeState
) -> None:
    with pytest.raises(anthropic.PermissionDeniedError) as caught:
        await anthropic_sdk(RESTRICTED_VK).messages.create(
            model="claude-opus-4-1", max_tokens=9, messages=MESSAGES
        )
    assert caught.value.status_code == 403
    assert_anthropic_error(caught.value.response.json(), "permission_error")
    assert "claude-opus-4-1" in caught.value.message
    assert fake.requests == []


async def test_limited_key_raises_rate_limit_error_after_three(openai_sdk, fake: FakeState) -> None:
    client = openai_sdk(LIMITED_VK)
    for _ in range(3):
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert caught.value.status_code == 429
    assert_openai_error(caught.value.response.json(), "rate_limit_exceeded")
    assert int(caught.value.response.headers["retry-after"]) > 0
    assert len(fake.requests) == 3


async def test_rate_limited_sdk_with_retries_fails_fast(openai_sdk, fake: FakeState) -> None:
    # The window is an hour away: x-should-retry: false tells the SDK not to sleep into it.
    client = openai_sdk(LIMITED_VK, max_retries=2)
    for _ in range(3):
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    sent: list[httpx2.Request] = []  # what the SDK sent: a clock misread a loaded machine

    async def note(request: httpx2.Request) -> None:
        sent.append(request)

    async with httpx2.AsyncClient(event_hooks={"request": [note]}) as http:
        counted = client.with_options(http_client=http)
        with pytest.raises(openai.RateLimitError) as caught:
            await counted.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(sent) == 1  # not retried
    assert len(fake.requests) == 3


async def test_sdk_retry_reaches_the_provider_again(openai_sdk, fake: FakeState) -> None:
    # 409 carries no retry-after from the fake, so the SDK retries after its short backoff.
    client = openai_sdk(max_retries=1)
    with pytest.raises(openai.ConflictError):
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers={"x-fake-status": "409"}
        )
    assert len(fake.requests) == 2
    assert [seen.headers.get("x-stainless-retry-count") for seen in fake.requests] == ["0", "1"]
    assert fake.requests[0].body == fake.requests[1].body


# --- provider errors pass through unchanged -------------------------------------------------

OPENAI_STATUS_ERRORS = [
    (400, openai.BadRequestError),
    (429, openai.RateLimitError),
    (500, openai.InternalServerError),
]
ANTHROPIC_STATUS_ERRORS = [
    (400, anthropic.BadRequestError),
    (429, anthropic.RateLimitError),
    (500, anthropic.InternalServerError),
]


@pytest.mark.parametrize(("status", "exception"), OPENAI_STATUS_ERRORS)
async def test_openai_provider_error_passes_through(
    openai_sdk, fake: FakeState, status: int, exception: type[openai.APIStatusError]
) -> None:
    rid = request_id(f"provider_{status}")
    with pytest.raises(exception) as caught:
        await openai_sdk().chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            extra_headers={"x-request-id": rid, "x-fake-status": str(status)},
        )
    response = caught.value.response
    assert response.status_code == status
    assert response.content == fake.sent[rid]
    assert response.json()["error"]["message"] == f"fake provider error {status}"
    assert response.headers.get("retry-after") == (None if status == 400 else "7")
    assert response.headers["openai-processing-ms"] == "12"
    assert response.headers["x-request-id"] == rid
    assert len(fake.requests) == 1


@pytest.mark.parametrize(("status", "exception"), ANTHROPIC_STATUS_ERRORS)
async def test_anthropic_provider_error_passes_through(
    anthropic_sdk, fake: FakeState, status: int, exception: type[anthropic.APIStatusError]
) -> None:
    rid = request_id(f"provider_anthropic_{status}")
    with pytest.raises(exception) as caught:
        await anthropic_sdk().messages.create(
            model=CLAUDE,
            max_tokens=9,
            messages=MESSAGES,
            extra_headers={"x-request-id": rid, "x-fake-status": str(status)},
        )
    response = caught.value.response
    assert response.status_code == status
    assert response.content == fake.sent[rid]
    assert response.json()["request_id"] == rid  # the provider's body, not one the gateway made
    assert response.headers.get("retry-after") == (None if status == 400 else "7")


@pytest.mark.parametrize("status", [400, 429, 500])
async def test_provider_error_bytes_and_headers_are_unchanged(
    gateway: TestClient, fake: FakeState, status: int
) -> None:
    rid = request_id(f"provider_raw_{status}")
    headers = {
        **auth(OPENAI_VK),
        "x-request-id": rid,
        "x-fake-status": str(status),
        "Content-Type": "application/json",
    }
    payload = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES})
    async with gateway.post("/v1/chat/completions", data=payload, headers=headers) as response:
        assert response.status == status
        assert await response.read() == fake.sent[rid]
        assert response.headers["Content-Type"] == "application/json"
        assert response.headers.get("retry-after") == (None if status == 400 else "7")
        assert response.headers["openai-processing-ms"] == "12"
        # x-ratelimit-* are the gateway's own (its quota), in place of the provider's.
        assert response.headers["x-ratelimit-limit-requests"] == "100"
