"""The SDKs' newer resources through the gateway, as their users call them: binary downloads,
streams of a GET, answers without a body, cursors over pages, multipart uploads. A small
provider of its own answers each the way the real one does; the test holds what it received
and compares what the SDK got with what it sent."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

OPENAI_VK = "vk_test_resources_openai_5d1f3b"
ANTHROPIC_VK = "vk_test_resources_anthropic_7e2c4a"
OPENAI_REAL = "sk-real-resources-openai-1111"
ANTHROPIC_REAL = "sk-ant-real-resources-2222"
# Every byte value, so that a re-encoding (text, newline, charset) would show.
BINARY = bytes(range(256)) * 64
DECISION_INPUT, DECISION_OUTPUT = 40, 3
DISPOSITION = 'attachment; filename="call.mp4"'


@dataclass
class Provider:
    """What the provider received (method, raw path, query string, headers, body), in order;
    and the event that lets a held stream send its last event."""

    received: list[tuple[str, str, str, dict[str, str], bytes]] = field(default_factory=list)
    go_on: asyncio.Event = field(default_factory=asyncio.Event)


def provider_app(provider: Provider) -> web.Application:
    async def note(request: web.Request) -> None:
        body = await request.read()
        headers = {name.lower(): value for name, value in request.headers.items()}
        provider.received.append(
            (request.method, request.rel_url.raw_path, request.query_string, headers, body)
        )

    async def binary(request: web.Request) -> web.Response:
        await note(request)
        headers = {"Content-Disposition": DISPOSITION, "x-request-id": "req_provider_1"}
        return web.Response(body=BINARY, content_type="video/mp4", headers=headers)

    async def held_stream(request: web.Request) -> web.StreamResponse:
        """Two events; the second only once the test has seen the first."""
        await note(request)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        first = {"type": "user.message", "id": "sevt_1", "content": []}
        await response.write(f"event: message\ndata: {json.dumps(first)}\n\n".encode())
        await provider.go_on.wait()
        last = {"type": "session.status_idle", "id": "sevt_2"}
        await response.write(f"event: message\ndata: {json.dumps(last)}\n\n".encode())
        await response.write_eof()
        return response

    async def accepted(request: web.Request) -> web.Response:
        await note(request)
        return web.Response(status=202)

    async def items(request: web.Request) -> web.Response:
        """A conversation's items, two pages: the cursor is the last id of the page before."""
        await note(request)
        after = request.query.get("after")
        ids = ["msg_3"] if after == "msg_2" else ["msg_1", "msg_2"]
        page = {
            "object": "list",
            "data": [
                {
                    "type": "message",
                    "id": item,
                    "role": "user",
                    "status": "completed",
                    "content": [],
                }
                for item in ids
            ],
            "first_id": ids[0],
            "last_id": ids[-1],
            "has_more": after != "msg_2",
        }
        return web.json_response(page)

    async def skills(request: web.Request) -> web.Response:
        """Anthropic's skills, two pages: `next_page` names the one after."""
        await note(request)
        second = request.query.get("page") == "page_2"
        page = {
            "data": [
                {
                    "id": "skill_2" if second else "skill_1",
                    "type": "skill",
                    "created_at": "2026-01-01T00:00:00Z",
                    "updated_at": "2026-01-01T00:00:00Z",
                    "display_title": "t",
                    "latest_version": "1",
                    "source": "custom",
                }
            ],
            "has_more": not second,
            "next_page": None if second else "page_2",
        }
        return web.json_response(page)

    async def uploaded(request: web.Request) -> web.Response:
        await note(request)
        return web.json_response(
            {"id": "part_1", "object": "upload.part", "created_at": 1, "upload_id": "upload_1"}
        )

    async def decided(request: web.Request) -> web.Response:
        """A decision (POST /v1/decisions): the model's answers, and the tokens it took."""
        await note(request)
        usage = {
            "input_tokens": DECISION_INPUT,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": DECISION_OUTPUT,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": DECISION_INPUT + DECISION_OUTPUT,
        }
        decision = {
            "id": "dec_1",
            "object": "decision",
            "created_at": 1,
            "model": "gpt-6-luna",
            "answers": [],
            "usage": usage,
        }
        return web.json_response(decision)

    app = web.Application(client_max_size=32 << 20)
    app.router.add_post("/v1/decisions", decided)
    app.router.add_get("/v1/live/sessions/{session_id}/content", binary)
    app.router.add_get("/v1/containers/{container_id}/files/{file_id}/content", binary)
    app.router.add_get("/v1/skills/{skill_id}/versions/{version}/content", binary)
    app.router.add_get("/v1/sessions/{session_id}/events/stream", held_stream)
    app.router.add_post("/v1/agents/sessions/{session_id}/events", accepted)
    app.router.add_get("/v1/conversations/{conversation_id}/items", items)
    app.router.add_get("/v1/skills", skills)
    app.router.add_post("/v1/uploads/{upload_id}/parts", uploaded)
    return app


@pytest.fixture
def provider() -> Provider:
    return Provider()


@pytest.fixture
async def gateway(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    make_gateway: Callable[..., Awaitable[TestClient]],
    provider: Provider,
    tmp_path: Path,
) -> TestClient:
    upstream = await aiohttp_server(provider_app(provider))
    base = str(upstream.make_url("/v1"))
    keys = {
        "providers": {"openai": {"base_url": base}, "anthropic": {"base_url": base}},
        "virtual_keys": {
            OPENAI_VK: {"provider": "openai", "api_key": OPENAI_REAL, "name": "openai"},
            ANTHROPIC_VK: {"provider": "anthropic", "api_key": ANTHROPIC_REAL, "name": "claude"},
        },
    }
    path = tmp_path / "resources-keys.json"
    path.write_text(json.dumps(keys))
    return await make_gateway(KEYS_FILE_PATH=str(path))


@pytest.fixture
async def clients(
    gateway: TestClient,
) -> AsyncIterator[tuple[openai.AsyncOpenAI, anthropic.AsyncAnthropic]]:
    chat = openai.AsyncOpenAI(
        base_url=str(gateway.make_url("/v1")), api_key=OPENAI_VK, max_retries=0
    )
    claude = anthropic.AsyncAnthropic(
        base_url=str(gateway.make_url("")), api_key=ANTHROPIC_VK, max_retries=0
    )
    async with chat, claude:
        yield chat, claude


async def test_binary_downloads_arrive_as_the_provider_sent_them(
    clients: tuple[openai.AsyncOpenAI, anthropic.AsyncAnthropic], provider: Provider
) -> None:
    chat, claude = clients
    recording = await chat.live.sessions.download_recording("live_1", extra_query={"part": "2"})
    assert recording.content == BINARY
    assert recording.response.headers["content-type"] == "video/mp4"
    assert recording.response.headers["content-disposition"] == DISPOSITION
    container_file = await chat.containers.files.content.retrieve("cfile_1", container_id="cntr_1")
    assert container_file.content == BINARY
    skill = await claude.beta.skills.versions.download(
        "1", skill_id="skill_1", betas=["skills-2025-10-02"]
    )
    assert await skill.read() == BINARY
    assert [(method, path, query) for method, path, query, _, _ in provider.received] == [
        ("GET", "/v1/live/sessions/live_1/content", "part=2"),
        ("GET", "/v1/containers/cntr_1/files/cfile_1/content", ""),
        ("GET", "/v1/skills/skill_1/versions/1/content", ""),
    ]
    openai_headers, anthropic_headers = provider.received[0][3], provider.received[2][3]
    assert openai_headers["authorization"] == f"Bearer {OPENAI_REAL}"
    assert anthropic_headers["x-api-key"] == ANTHROPIC_REAL
    assert anthropic_headers["anthropic-beta"] == "skills-2025-10-02"
    assert not any(OPENAI_VK in value or ANTHROPIC_VK in value for value in openai_headers.values())


async def test_a_streamed_get_reaches_the_sdk_event_by_event(
    clients: tuple[openai.AsyncOpenAI, anthropic.AsyncAnthropic], provider: Provider
) -> None:
    _, claude = clients
    stream = await claude.beta.sessions.events.stream("sesn_1")
    events = stream.__aiter__()
    first = await asyncio.wait_for(events.__anext__(), 5)  # before the provider's second
    assert first.type == "user.message"
    provider.go_on.set()
    rest = [event async for event in events]
    assert [event.type for event in rest] == ["session.status_idle"]
    ((method, path, _, _, body),) = provider.received
    assert (method, path, body) == ("GET", "/v1/sessions/sesn_1/events/stream", b"")


async def test_an_answer_without_a_body_reaches_the_sdk(
    clients: tuple[openai.AsyncOpenAI, anthropic.AsyncAnthropic], provider: Provider
) -> None:
    chat, _ = clients
    events = [{"type": "message", "role": "user", "content": "hello"}]
    answer = await chat.beta.agents.sessions.events.with_raw_response.create(
        "sess_1", events=events
    )
    assert answer.status_code == 202
    assert answer.parse() is None
    ((method, path, _, headers, body),) = provider.received
    assert (method, path) == ("POST", "/v1/agents/sessions/sess_1/events")
    assert json.loads(body) == {"events": events}
    assert headers["openai-beta"] == "agents=v1"


async def test_cursors_page_through_both_sdks(
    clients: tuple[openai.AsyncOpenAI, anthropic.AsyncAnthropic], provider: Provider
) -> None:
    chat, claude = clients
    items = [item.id async for item in chat.conversations.items.list("conv_1", limit=2)]
    assert items == ["msg_1", "msg_2", "msg_3"]
    skills = [skill.id async for skill in claude.beta.skills.list(limit=1)]
    assert skills == ["skill_1", "skill_2"]
    assert [(path, query) for _, path, query, _, _ in provider.received] == [
        ("/v1/conversations/conv_1/items", "limit=2"),
        ("/v1/conversations/conv_1/items", "limit=2&after=msg_2"),
        ("/v1/skills", "limit=1"),
        ("/v1/skills", "limit=1&page=page_2"),
    ]


async def test_a_multipart_upload_part_reaches_the_provider_byte_for_byte(
    clients: tuple[openai.AsyncOpenAI, anthropic.AsyncAnthropic], provider: Provider
) -> None:
    chat, _ = clients
    part = await chat.uploads.parts.create("upload_1", data=BINARY)
    assert part.id == "part_1"
    ((_, path, _, headers, body),) = provider.received
    assert path == "/v1/uploads/upload_1/parts"
    assert headers["content-type"].startswith("multipart/form-data; boundary=")
    assert BINARY in body
    assert int(headers["content-length"]) == len(body)


async def test_a_decision_is_charged_the_tokens_it_reports(
    clients: tuple[openai.AsyncOpenAI, anthropic.AsyncAnthropic],
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    chat, _ = clients
    questions: Any = [{"type": "predicate", "id": "q1", "question": "Is it polite?"}]
    decision = await chat.decisions.with_raw_response.create(
        input="thanks!", model="gpt-6-luna", questions=questions
    )
    assert json.loads(await decision.http_response.aread())["usage"]["output_tokens"] == 3
    [line] = await records(1)
    assert (line["path"], line["model"]) == ("/v1/decisions", "gpt-6-luna")
    assert line["usage"]["prompt_tokens"] == DECISION_INPUT
    assert line["usage"]["completion_tokens"] == DECISION_OUTPUT
    assert line["usage"]["estimated"] is False
