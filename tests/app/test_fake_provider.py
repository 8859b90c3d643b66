"""The fake provider speaks well enough for the real SDKs, and misbehaves when asked.

Each test talks to the fake directly (`fake_provider` and `fake` come from conftest).
"""

import asyncio
import gzip
import time

import aiohttp
import anthropic
import openai
import orjson
import pytest
from anthropic import AsyncAnthropic
from anthropic.types import Message, RawMessageStreamEvent
from openai import AsyncOpenAI
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from tests.support.fake_provider import (
    MODEL_IDS,
    TOOL_ARGUMENTS,
    FakeState,
)
from tests.support.polling import until

MESSAGES = [{"role": "user", "content": "say hello please"}]  # 3 prompt tokens
TEXT = "tok0 tok1 tok2 "
TOOLS = [
    {
        "type": "function",
        "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}},
    }
]
CHAT = {"model": "gpt-4o-mini", "messages": MESSAGES}
STREAM = {**CHAT, "stream": True}


@pytest.fixture
async def openai_client(fake_provider):
    async with AsyncOpenAI(
        base_url=str(fake_provider.make_url("/v1")), api_key="sk-test", max_retries=0
    ) as client:
        yield client


@pytest.fixture
async def anthropic_client(fake_provider):
    async with AsyncAnthropic(
        base_url=str(fake_provider.make_url("")), api_key="sk-test", max_retries=0
    ) as client:
        yield client


@pytest.fixture
async def http(fake_provider, aiohttp_client):
    return await aiohttp_client(fake_provider)


def only_sent(fake: FakeState) -> bytes:
    (body,) = fake.sent.values()
    return body


def sse_events(raw: bytes) -> list[tuple[str | None, bytes]]:
    """(event name, data) for each SSE event in a body."""
    events = []
    for block in raw.split(b"\n\n"):
        if block:
            lines = dict(line.split(b": ", 1) for line in block.split(b"\n"))
            events.append((lines[b"event"].decode() if b"event" in lines else None, lines[b"data"]))
    return events


# --- the SDKs parse every shape ------------------------------------------------------


async def test_chat_completion_parses_and_validates(openai_client, fake):
    completion = await openai_client.chat.completions.create(**CHAT)

    assert completion.choices[0].message.content == TEXT
    assert completion.choices[0].finish_reason == "stop"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3, 3)
    ChatCompletion.model_validate_json(only_sent(fake))
    assert fake.requests[-1].headers["authorization"] == "Bearer sk-test"
    assert orjson.loads(fake.requests[-1].body)["messages"] == MESSAGES


async def test_chat_stream_without_include_usage_has_no_usage_chunk(openai_client, fake):
    chunks = [chunk async for chunk in await openai_client.chat.completions.create(**STREAM)]

    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == TEXT
    assert all(chunk.usage is None for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    events = sse_events(only_sent(fake))
    assert events[-1] == (None, b"[DONE]")
    for _, data in events[:-1]:
        ChatCompletionChunk.model_validate_json(data)


async def test_chat_stream_with_include_usage_ends_with_a_usage_chunk(openai_client, fake):
    stream = await openai_client.chat.completions.create(
        **STREAM, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]

    assert chunks[-1].choices == []
    assert chunks[-1].usage.total_tokens == 6
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert only_sent(fake).endswith(b"data: [DONE]\n\n")


async def test_chat_with_tools_answers_a_tool_call(openai_client, fake):
    completion = await openai_client.chat.completions.create(**CHAT, tools=TOOLS)

    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls[0].function.name == "lookup"
    assert choice.message.tool_calls[0].function.arguments == TOOL_ARGUMENTS
    ChatCompletion.model_validate_json(only_sent(fake))


async def test_chat_stream_with_tools_streams_tool_call_deltas(openai_client):
    async with openai_client.chat.completions.stream(**CHAT, tools=TOOLS) as stream:
        final = await stream.get_final_completion()

    call = final.choices[0].message.tool_calls[0]
    assert (call.function.name, call.function.arguments) == ("lookup", TOOL_ARGUMENTS)
    assert final.choices[0].finish_reason == "tool_calls"


async def test_legacy_completions_plain_and_streamed(openai_client, fake):
    completion = await openai_client.completions.create(
        model="m", prompt="say hello", extra_headers={"x-request-id": "a"}
    )
    chunks = [
        c async for c in await openai_client.completions.create(model="m", prompt="hi", stream=True)
    ]

    assert completion.choices[0].text == TEXT
    Completion.model_validate_json(fake.sent["a"])
    assert "".join(chunk.choices[0].text for chunk in chunks) == TEXT


async def test_responses_api_plain(openai_client, fake):
    response = await openai_client.responses.create(model="gpt-4o-mini", input="say hello please")

    assert response.output_text == TEXT
    assert (response.usage.input_tokens, response.usage.output_tokens) == (3, 3)
    Response.model_validate_json(only_sent(fake))


async def test_responses_api_stream(openai_client, fake):
    async with openai_client.responses.stream(
        model="gpt-4o-mini", input="say hello please"
    ) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_response()

    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == 3
    assert final.output_text == TEXT
    assert final.usage.total_tokens == 6
    adapter = TypeAdapter(ResponseStreamEvent)
    for name, data in sse_events(only_sent(fake)):
        assert adapter.validate_json(data).type == name


async def test_embeddings_decode_as_base64_and_as_floats(openai_client, fake):
    packed = await openai_client.embeddings.create(
        model="text-embedding-3-small", input=["a", "b c"]
    )
    floats = await openai_client.embeddings.create(
        model="m", input="a", encoding_format="float", extra_headers={"x-request-id": "floats"}
    )

    assert packed.data[1].embedding == [(1 + i) / 8 for i in range(8)]
    assert packed.usage.prompt_tokens == 3
    assert floats.data[0].embedding == [i / 8 for i in range(8)]
    CreateEmbeddingResponse.model_validate_json(
        fake.sent["floats"]
    )  # the type has no base64 variant


async def test_models_list_and_retrieve_in_both_dialects(openai_client, anthropic_client):
    assert [model.id async for model in openai_client.models.list()] == list(MODEL_IDS)
    assert (await openai_client.models.retrieve("gpt-x")).owned_by == "fake-provider"
    assert [model.id async for model in anthropic_client.models.list()] == list(MODEL_IDS)
    assert (await anthropic_client.models.retrieve("claude-x")).display_name == "claude-x"


async def test_anthropic_message_parses_and_validates(anthropic_client, fake):
    message = await anthropic_client.messages.create(
        model="claude-x", max_tokens=50, messages=MESSAGES
    )

    assert message.content[0].text == TEXT
    assert (message.usage.input_tokens, message.usage.output_tokens) == (3, 3)
    Message.model_validate_json(only_sent(fake))
    # anthropic 2.x sends its api_key as a Bearer token, not as x-api-key
    assert fake.requests[-1].headers["authorization"] == "Bearer sk-test"
    assert "anthropic-version" in fake.requests[-1].headers


async def test_anthropic_stream_parses_with_the_stream_helper(anthropic_client, fake):
    async with anthropic_client.messages.stream(
        model="claude-x", max_tokens=50, messages=MESSAGES
    ) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()

    assert text == TEXT
    assert final.usage.output_tokens == 3  # message_delta counts are cumulative, not added
    events = sse_events(only_sent(fake))
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 3,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    adapter = TypeAdapter(RawMessageStreamEvent)
    for name, data in events:
        if name != "ping":
            assert adapter.validate_json(data).type == name


async def test_anthropic_count_tokens(anthropic_client):
    counted = await anthropic_client.messages.count_tokens(model="claude-x", messages=MESSAGES)

    assert counted.input_tokens == 3


async def test_paths_without_v1_answer_the_same(http):
    response = await http.post("/chat/completions", json=CHAT)

    assert (await response.json())["object"] == "chat.completion"


# --- headers every answer carries ----------------------------------------------------


async def test_every_answer_carries_provider_headers_and_the_request_id(http, fake):
    echoed = await http.post(
        "/v1/embeddings", json={"input": "a"}, headers={"x-request-id": "mine"}
    )
    own = await http.get("/v1/models")

    assert echoed.headers["x-request-id"].startswith("req_fake_")  # its own, as OpenAI's
    assert fake.sent["mine"]  # what it sent, by the id the client gave
    assert echoed.headers["openai-processing-ms"] == "12"
    assert echoed.headers["x-ratelimit-remaining-requests"] == "4999"
    assert "__cf_bm" in echoed.headers["set-cookie"]
    assert await own.read() == fake.sent[own.headers["x-request-id"]]


async def test_catch_all_echoes_the_request_without_credentials(http, fake):
    headers = {"Authorization": "Bearer sk-secret", "anthropic-beta": "tools-1"}
    response = await http.put("/v1/files/f1?purpose=x", data=b"raw body", headers=headers)

    echo = await response.json()
    assert (echo["method"], echo["path"], echo["query_string"]) == (
        "PUT",
        "/v1/files/f1",
        "purpose=x",
    )
    assert echo["headers"]["anthropic-beta"] == "tools-1"
    assert echo["headers"]["authorization"] == "[redacted]"
    assert echo["body"] == "raw body"
    assert b"sk-secret" not in only_sent(fake)
    seen = fake.requests[-1]
    assert (seen.headers["authorization"], seen.body, seen.query_string) == (
        "Bearer sk-secret",
        b"raw body",
        "purpose=x",
    )


# --- misbehaving on request ----------------------------------------------------------


async def test_status_answers_in_the_openai_error_shape(openai_client):
    with pytest.raises(openai.RateLimitError) as caught:
        await openai_client.chat.completions.create(**CHAT, extra_headers={"x-fake-status": "429"})

    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.response.headers["retry-after"] == "7"
    assert caught.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert caught.value.response.headers["openai-processing-ms"] == "12"


async def test_status_answers_in_the_anthropic_error_shape(anthropic_client):
    with pytest.raises(anthropic.OverloadedError) as caught:
        await anthropic_client.messages.create(
            model="m", max_tokens=5, messages=MESSAGES, extra_headers={"x-fake-status": "529"}
        )
    with pytest.raises(anthropic.BadRequestError) as bad:
        await anthropic_client.messages.create(
            model="m", max_tokens=5, messages=MESSAGES, extra_headers={"x-fake-status": "400"}
        )

    assert caught.value.body["error"]["type"] == "overloaded_error"
    assert bad.value.body["type"] == "error"
    assert bad.value.body["error"]["type"] == "invalid_request_error"


async def test_delay_spaces_events_and_the_first_arrives_before_the_last_is_sent(http, fake):
    started = time.monotonic()
    response = await http.post(
        "/v1/chat/completions", json=STREAM, headers={"x-fake-delay-ms": "50"}
    )
    first = await response.content.readuntil(b"\n\n")

    assert b'"role":"assistant"' in first
    assert b"[DONE]" not in only_sent(fake)  # the first is here before the last was sent
    rest = await response.read()
    assert time.monotonic() - started >= 0.25  # 6 events, 5 gaps of 50 ms
    assert first + rest == only_sent(fake)


async def test_chunks_sets_the_number_of_deltas(openai_client):
    stream = await openai_client.chat.completions.create(
        **STREAM, extra_headers={"x-fake-chunks": "5"}
    )

    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    assert text == "tok0 tok1 tok2 tok3 tok4 "


async def test_piece_chars_streams_arguments_and_reasoning_in_pieces_of_that_size(openai_client):
    headers = {"x-fake-tool-chars": "1000", "x-fake-reasoning-chars": "450"}
    stream = await openai_client.chat.completions.create(
        **STREAM, tools=TOOLS, extra_headers={**headers, "x-fake-piece-chars": "200"}
    )

    arguments, thoughts = [], []
    async for chunk in stream:
        delta = chunk.choices[0].delta
        thoughts += [delta.reasoning_content] if getattr(delta, "reasoning_content", None) else []
        arguments += [call.function.arguments for call in delta.tool_calls or [] if call.index == 0]
    arguments = [piece for piece in arguments if piece]
    assert [len(piece) for piece in arguments] == [200] * 5
    assert orjson.loads("".join(arguments))["query"] == "x" * 987
    assert [len(piece) for piece in thoughts] == [200, 200, 50]


async def test_hang_headers_never_answers_and_notices_the_client_leaving(http, fake):
    with pytest.raises(asyncio.TimeoutError):
        await http.post(
            "/v1/chat/completions",
            json=CHAT,
            headers={"x-fake-hang": "headers"},
            timeout=aiohttp.ClientTimeout(total=0.2),
        )

    await until(lambda: fake.disconnects)
    assert fake.sent == {}


async def test_hang_midstream_sends_half_then_stalls(http, fake):
    response = await http.post(
        "/v1/chat/completions", json=STREAM, headers={"x-fake-hang": "midstream"}
    )
    # Half sent (an event, not a clock: a loaded machine may take 0.2 s to send it), then
    # nothing more: the body never ends.
    await until(lambda: only_sent(fake).count(b"data: ") >= 3, what="half the events sent")
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(response.read(), 0.2)
    sent = only_sent(fake)
    response.close()
    left_at = time.monotonic()

    assert sent.count(b"data: ") == 3 and b"[DONE]" not in sent  # half of the 6 events
    await until(lambda: fake.disconnects)
    # The hang never ends, so a disconnect seen at all was noticed while it hangs; 10 s
    # bounds how late, with room for two loaded cores (2 s left little).
    assert fake.disconnects[0] - left_at < 10.0


async def test_drop_midstream_cuts_the_body_without_the_terminating_chunk(
    http, fake, openai_client
):
    response = await http.post(
        "/v1/messages", json={**STREAM, "max_tokens": 5}, headers={"x-fake-drop": "midstream"}
    )
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    assert [name for name, _ in sse_events(only_sent(fake))][-1] == "content_block_delta"

    stream = await openai_client.chat.completions.create(
        **STREAM, extra_headers={"x-fake-drop": "midstream"}
    )
    with pytest.raises(openai.APIConnectionError):
        [chunk async for chunk in stream]


async def test_drop_midstream_cuts_a_json_body_short(http):
    response = await http.post(
        "/v1/chat/completions", json=CHAT, headers={"x-fake-drop": "midstream"}
    )

    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()


async def test_drop_headers_closes_the_connection_before_any_answer(http, fake):
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await http.post("/v1/chat/completions", json=CHAT, headers={"x-fake-drop": "headers"})

    assert len(fake.requests) == 1 and fake.sent == {}


async def test_client_leaving_mid_stream_is_recorded_at_once(http, fake):
    headers = {"x-fake-delay-ms": "100", "x-fake-chunks": "50"}
    response = await http.post("/v1/chat/completions", json=STREAM, headers=headers)
    await response.content.readuntil(b"\n\n")
    response.close()
    left_at = time.monotonic()

    await until(lambda: fake.disconnects)
    # the stream had about 5 s to go; 3 s leaves a loaded machine room to notice
    assert fake.disconnects[0] - left_at < 3.0
    assert b"[DONE]" not in only_sent(fake)


async def test_gzip_sends_fixed_compressed_bytes(fake_provider, fake, openai_client):
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        response = await session.post(
            fake_provider.make_url("/v1/chat/completions"), json=CHAT, headers={"x-fake-gzip": "1"}
        )
        body = await response.read()

    assert response.headers["content-encoding"] == "gzip"
    assert body == only_sent(fake)
    assert orjson.loads(gzip.decompress(body))["object"] == "chat.completion"
    completion = await openai_client.chat.completions.create(
        **CHAT, extra_headers={"x-fake-gzip": "1"}
    )
    assert completion.choices[0].message.content == TEXT


async def test_no_usage_omits_usage_even_when_asked_for(http, fake):
    headers = {"x-fake-no-usage": "1", "x-request-id": "plain"}
    await (await http.post("/v1/chat/completions", json=CHAT, headers=headers)).read()
    headers = {"x-fake-no-usage": "1", "x-request-id": "streamed"}
    body = {**STREAM, "stream_options": {"include_usage": True}}
    await (await http.post("/v1/chat/completions", json=body, headers=headers)).read()

    assert "usage" not in orjson.loads(fake.sent["plain"])
    assert b'"usage"' not in fake.sent["streamed"]


async def test_raw_chunks_stream_a_plain_chunked_body(http):
    response = await http.post(
        "/v1/anything", data=b"x", headers={"x-fake-raw-chunks": "4", "x-fake-delay-ms": "10"}
    )

    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["transfer-encoding"] == "chunked"
    assert await response.read() == b"raw0\nraw1\nraw2\nraw3\n"


# --- standalone ----------------------------------------------------------------------
