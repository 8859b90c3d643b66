"""The interaction log as a platform team loads it: data with one schema, one line a request.

A consumer (DuckDB, BigQuery, pandas, Loki) infers each field's type from the first lines and
sums `cost_usd` and `usage` per key and day: a field whose JSON type changes from one line to
the next (an integer here, a float there) breaks the load or the sum. So every kind of
ending and dialect is driven through a gateway, the log is read after the gateway closed (all
of it written), and each line is held to SPEC's list of fields: each always there, with one
JSON type (or null where it may be), and exactly one line per request.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.app import METRICS
from tests.app.test_background import PRICES, background_keys, client, create
from tests.app.test_realtime import connect, next_data, no_session_left
from tests.app.test_responses_websocket import open_session, turn
from tests.app.test_teams import LONER, MEMBERS, teams_gateway  # noqa: F401 (a fixture)
from tests.conftest import ANTHROPIC_VK, LIMITED_VK, OPENAI_VK, RESTRICTED_VK, auth
from tests.support.fake_provider import FakeState
from tests.support.polling import until

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {
    "model": "claude-3-5-haiku-latest",
    "max_tokens": 10,
    "messages": [{"role": "user", "content": "hi"}],
}
CACHED_VK = "vk_test_cached_7d1e3a5c9b"

# SPEC's log line: each field every line has, and the JSON types it may take (Python's, as
# json.loads reads them: 0 is an int, 0.0 a float). `cost_usd` and `cache` are in SPEC's
# tables of names; the rest in its log line section.
ALWAYS = {
    "timestamp": (str,),
    "request_id": (str,),
    "key": (str, type(None)),  # null when no key authenticated
    "team": (str, type(None)),  # null for a key in no team
    "provider": (str, type(None)),
    "method": (str,),
    "path": (str,),
    "model": (str, type(None)),
    "stream": (bool,),
    "status": (int,),
    "duration_ms": (float,),
    "ttft_ms": (float, type(None)),
    "usage": (dict, type(None)),
    "cost_usd": (float, type(None)),
    "cache": (str, type(None)),
}
# Fields a line has only when they apply, each with its one type.
SOMETIMES = {
    "error": (str,),
    "provider_request_id": (str,),
    "target": (str,),
    "attempts": (list,),
    "websocket": (dict,),
}
USAGE_ALWAYS = {
    "prompt_tokens": int,
    "completion_tokens": int,
    "total_tokens": int,
    "cache_read_tokens": int,
    "cache_write_tokens": int,
    "input_audio_tokens": int,
    "reasoning_tokens": int,
    "output_audio_tokens": int,
    "estimated": bool,
}


def schema_errors(line: dict[str, Any]) -> list[str]:
    """What in one log line breaks the schema: missing or unknown fields, wrong types."""
    errors = [f"missing {name}" for name in ALWAYS if name not in line]
    for name, value in line.items():
        allowed = ALWAYS.get(name) or SOMETIMES.get(name)
        if allowed is None:
            errors.append(f"unknown field {name}")
        elif type(value) not in allowed:
            errors.append(f"{name} is {type(value).__name__} {value!r}")
    usage = line.get("usage")
    if isinstance(usage, dict):
        for name, kind in USAGE_ALWAYS.items():
            if type(usage.get(name)) is not kind:
                errors.append(f"usage.{name} is {usage.get(name)!r}")
        for name, value in usage.items():
            if name not in USAGE_ALWAYS and type(value) is not (
                float if name == "input_audio_seconds" else int
            ):
                errors.append(f"usage.{name} is {value!r}")
    for attempt in line.get("attempts", ()):
        if set(attempt) != {"target", "key", "status", "error", "ms"}:
            errors.append(f"attempt {attempt!r}")
        elif type(attempt["ms"]) is not float or type(attempt["status"]) not in (int, type(None)):
            errors.append(f"attempt {attempt!r}")
    return errors


def read_log(path: Path) -> list[dict[str, Any]]:
    lines = path.read_bytes().splitlines()
    assert all(line.startswith(b"{") and line.endswith(b"}") for line in lines), lines
    return [json.loads(line) for line in lines]


@pytest.fixture
def cached_keys() -> dict[str, dict[str, Any]]:
    return {
        CACHED_VK: {
            "provider": "openai",
            "api_key": "sk-real-cached-1212121212",
            "name": "cached",
            "cache": {"ttl_seconds": 60},
        }
    }


async def test_every_ending_writes_one_line_with_the_spec_fields_and_their_one_type(
    gateway_with_keys: Callable[..., Awaitable[TestClient]],
    cached_keys: dict[str, dict[str, Any]],
    fake: FakeState,
    log_path: Path,
) -> None:
    # REQUEST_TIMEOUT for the one 504; 1 s, as each ordinary answer must come within it too.
    gateway = await gateway_with_keys(cached_keys, REQUEST_TIMEOUT="1", MAX_BODY_BYTES="4096")
    statuses: list[int] = []

    async def send(method: str, path: str, **options: Any) -> None:
        async with gateway.request(method, path, **options) as response:
            try:
                await response.read()
            except Exception:  # a cut stream: its status is what counts here
                pass
            statuses.append(response.status)

    openai, anthropic = auth(OPENAI_VK), auth(ANTHROPIC_VK)
    await send("POST", "/v1/chat/completions", json=CHAT, headers=openai)
    await send("POST", "/v1/chat/completions", json={**CHAT, "stream": True}, headers=openai)
    await send("POST", "/v1/messages", json=MESSAGES, headers=anthropic)
    await send("POST", "/v1/messages", json={**MESSAGES, "stream": True}, headers=anthropic)
    await send("POST", "/v1/messages/count_tokens", json=MESSAGES, headers=anthropic)
    await send("GET", "/v1/models", headers=openai)
    await send("POST", "/v1/responses", json={"model": "gpt-4o-mini", "input": "x"}, headers=openai)
    await send("POST", "/v1/embeddings", json={"model": "text-embedding-3-small", "input": "x"}, headers=openai)  # fmt: skip
    await send("POST", "/v1/chat/completions", json=CHAT)  # 401: no key
    await send("POST", "/v1/chat/completions", json=CHAT, headers=auth("vk_unknown_0000000000"))
    await send("POST", "/v1/chat/completions", data=b"{", headers=openai)  # 400
    await send("POST", "/v1/chat/completions", json={"model": "x"}, headers=openai)  # 400
    await send("POST", "/v1/messages", json={**MESSAGES, "model": "gpt-4o"}, headers=auth(RESTRICTED_VK))  # fmt: skip
    await send("POST", "/v1/chat/completions", data=b"x" * 5000, headers=openai)  # 413
    await send("GET", "/v1/%2e%2e/etc", headers=openai)  # 400, path
    await send("HEAD", "/", headers=openai)  # 404
    for _ in range(4):  # the 4th: 429
        await send("POST", "/v1/chat/completions", json=CHAT, headers=auth(LIMITED_VK))
    await send("POST", "/v1/chat/completions", json=CHAT, headers={**openai, "x-fake-status": "500"})  # fmt: skip
    await send("POST", "/v1/messages", json=MESSAGES, headers={**anthropic, "x-fake-status": "529"})  # fmt: skip
    await send("POST", "/v1/chat/completions", json=CHAT, headers={**openai, "x-fake-drop": "headers"})  # fmt: skip
    await send("POST", "/v1/chat/completions", json=CHAT, headers={**openai, "x-fake-hang": "headers"})  # fmt: skip
    await send("POST", "/v1/chat/completions", json={**CHAT, "stream": True}, headers={**openai, "x-fake-drop": "midstream"})  # fmt: skip
    for _ in range(2):  # a miss, then a hit
        await send("POST", "/v1/chat/completions", json=CHAT, headers=auth(CACHED_VK))
    # 499: the client leaves while the provider holds its headers.
    seen = len(fake.requests)
    leaving = asyncio.ensure_future(
        send(
            "POST",
            "/v1/chat/completions",
            json=CHAT,
            headers={**openai, "x-fake-hang": "headers", "x-fake-chunks": "1"},
        )  # fmt: skip
    )
    await until(lambda: len(fake.requests) > seen, what="the provider saw the request")
    leaving.cancel()
    # A Realtime WebSocket session, with one response.
    socket = await connect(gateway)
    await next_data(socket)
    await socket.send_str('{"type": "response.create"}')
    await next_data(socket)
    await next_data(socket)
    await socket.close()
    await no_session_left(gateway)
    requests = len(statuses) + 2  # the one that left, the session
    await gateway.close()  # the log is flushed: every line is written

    lines = read_log(log_path)
    assert len(lines) == requests, [(line["status"], line["path"]) for line in lines]
    assert len({line["request_id"] for line in lines}) == requests
    assert {line["status"] for line in lines} >= {
        101, 200, 400, 401, 403, 404, 413, 429, 499, 500, 502, 504, 529
    }  # fmt: skip
    for line in lines:
        assert not schema_errors(line), (schema_errors(line), line)


@pytest.mark.parametrize(
    ("rate", "cost"),
    [(0, 0.0), (250_000, 1.0)],  # free (a self-hosted server, as docs say), exactly $1
    ids=["free", "whole-dollar"],
)
async def test_cost_usd_is_a_float_even_when_it_is_a_whole_number(
    gateway_with_keys: Callable[..., Awaitable[TestClient]],
    log_path: Path,
    rate: int,
    cost: float,
) -> None:
    """`"cost_usd": 0` beside `"cost_usd": 0.0000195` makes a column an integer for a loader
    that infers it from the first lines (BigQuery, DuckDB), and the next line fails to load."""
    prices = {"openai": {"*": {"input_mtok": rate, "output_mtok": rate}}}
    gateway = await gateway_with_keys({}, prices=prices)
    response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(OPENAI_VK))
    assert response.status == 200
    await response.read()
    await gateway.close()

    [line] = read_log(log_path)
    assert line["usage"]["total_tokens"] == 4  # 1 prompt, 3 completion: 4 tokens at the rate
    assert type(line["cost_usd"]) is float and line["cost_usd"] == cost, line["cost_usd"]
    assert not schema_errors(line)


async def one_route_provider(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    chat: Callable[[web.Request], Awaitable[web.Response]],
    key: str,
    tmp_path: Path,
) -> Path:
    """A provider answering chat completions with `chat`, and a keys file whose one key `key`
    reaches it (an OpenAI-compatible server that needs no real key)."""
    provider = web.Application()
    provider.router.add_post("/v1/chat/completions", chat)
    server = await aiohttp_server(provider)
    keys = {
        "providers": {"vllm": {"base_url": str(server.make_url("/v1"))}},
        "virtual_keys": {key: {"provider": "vllm", "api_key": "none-needed-00"}},
    }
    path = tmp_path / "one-route.json"
    path.write_text(json.dumps(keys))
    return path


async def test_a_provider_reporting_an_absurd_count_still_gets_its_line_with_counts_a_loader_holds(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    make_gateway: Callable[..., Awaitable[TestClient]],
    tmp_path: Path,
    log_path: Path,
) -> None:
    """An OpenAI-compatible server whose count wrapped around (-1 as an unsigned 64-bit
    integer) made total_tokens larger than JSON encoders and INT64 columns hold: the line
    could not be written, and the request left no line at all. Counts are written at most
    2**53 (what the tracker charges, the largest integer every JSON reader keeps exact)."""
    wrapped = 2**64 - 1

    async def chat(request: web.Request) -> web.Response:
        usage = {"prompt_tokens": 5, "completion_tokens": wrapped, "total_tokens": 4}
        return web.json_response({"object": "chat.completion", "choices": [], "usage": usage})

    keys = await one_route_provider(aiohttp_server, chat, "vk_test_wrapped_0a1b2c3d4e", tmp_path)
    gateway = await make_gateway(KEYS_FILE_PATH=str(keys))
    response = await gateway.post(
        "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        headers=auth("vk_test_wrapped_0a1b2c3d4e"),
    )
    assert response.status == 200
    await response.read()
    await gateway.close()

    [line] = read_log(log_path)
    assert line["usage"]["prompt_tokens"] == 5
    assert line["usage"]["completion_tokens"] == 2**53
    assert line["usage"]["total_tokens"] == 2**53
    assert not schema_errors(line)


async def test_each_line_names_the_team_its_key_was_in_when_it_ran(
    teams_gateway: Callable[..., Awaitable[TestClient]],  # noqa: F811
    log_path: Path,
) -> None:
    """Spend summed per team and day from the log needs the team on the line: keys.json (or
    the admin API) can move a key to another team later, so a join on today's keys file would
    put yesterday's spend on today's team."""
    gateway = await teams_gateway({})
    for secret in (MEMBERS[0], LONER, "vk_unknown_0000000000"):
        response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(secret))
        await response.read()
    await gateway.close()

    member, loner, stranger = read_log(log_path)
    assert (member["key"], member["team"]) == ("member-0", "research")
    assert (loner["key"], loner["team"]) == ("loner", None)
    assert (stranger["status"], stranger["team"]) == (401, None)
    for line in (member, loner, stranger):
        assert not schema_errors(line)


async def test_deferred_charges_turns_and_refusals_of_other_kinds_keep_the_schema_too(
    gateway_with_keys: Callable[..., Awaitable[TestClient]], log_path: Path
) -> None:
    """A background response made and claimed, a Responses WebSocket session with a turn, a
    budget's 429, a concurrency 429 and a lockout's 429: one line each, of the same schema."""
    keys = {
        **background_keys(),
        "vk_test_broke_5a6b7c8d9e": {
            "provider": "openai",
            "api_key": "sk-real-broke-1029384756",
            "name": "broke",
            "budget": {"usd": 0.000001, "window_seconds": 3600},
        },
        "vk_test_single_1f2e3d4c5b": {
            "provider": "openai",
            "api_key": "sk-real-single-5647382910",
            "name": "single",
            "max_in_flight": 1,
        },
    }
    gateway = await gateway_with_keys(keys, prices=PRICES, AUTH_FAILURE_LIMIT="1")
    statuses: list[int] = []

    async def send(key: str, **headers: str) -> None:
        async with gateway.post(
            "/v1/chat/completions", json=CHAT, headers={**auth(key), **headers}
        ) as response:
            await response.read()
            statuses.append(response.status)

    response_id = await create(gateway)
    await client(gateway).responses.retrieve(response_id)  # finished: the claim
    session = await open_session(gateway, OPENAI_VK)
    assert [event["type"] for event in await turn(session)][-1] == "response.completed"
    await session.close()
    await send("vk_test_broke_5a6b7c8d9e")  # spends its budget
    await send("vk_test_broke_5a6b7c8d9e")  # 429: the budget is spent
    holding = asyncio.ensure_future(send("vk_test_single_1f2e3d4c5b", **{"x-fake-think-ms": "60000"}))  # fmt: skip
    await until(lambda: gateway.app[METRICS].requests_in_flight >= 1, what="one in flight")
    await send("vk_test_single_1f2e3d4c5b")  # 429: its one slot is taken
    holding.cancel()  # 499
    await send("vk_test_anthropic_0000000000")  # 401
    await send(ANTHROPIC_VK)  # 429: keys beginning alike (not yet seen here) are locked out
    await gateway.close()

    lines = read_log(log_path)
    assert len(lines) == 3 + len(statuses) + 1, [(line["status"], line["path"]) for line in lines]
    assert sorted(statuses) == [200, 401, 429, 429, 429]
    for line in lines:
        assert not schema_errors(line), (schema_errors(line), line)


@pytest.mark.parametrize(
    ("status", "body", "content_type"),
    [
        (502, "<html><body>502 Bad Gateway</body></html>", "text/html"),  # a proxy in front
        (503, "", "text/plain"),
        (422, '{"detail": [{"msg": "field required"}]}', "application/json"),  # vLLM, FastAPI
    ],
    ids=["html", "empty", "fastapi"],
)
async def test_an_error_the_provider_answers_without_a_typed_body_still_has_its_error(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    make_gateway: Callable[..., Awaitable[TestClient]],
    tmp_path: Path,
    log_path: Path,
    status: int,
    body: str,
    content_type: str,
) -> None:
    """SPEC: `error` when there is one. A provider's error answer was logged with an `error`
    only when its body was an error object: `{"error": {"message": ...}}` gave `(unknown)`,
    while an HTML page, an empty body or FastAPI's `detail` gave none, so an alert counting
    lines with an error missed them."""

    async def chat(request: web.Request) -> web.Response:
        return web.Response(status=status, text=body, content_type=content_type)

    keys = await one_route_provider(aiohttp_server, chat, "vk_test_untyped_5e4d3c2b1a", tmp_path)
    gateway = await make_gateway(KEYS_FILE_PATH=str(keys))
    response = await gateway.post(
        "/v1/chat/completions", json=CHAT, headers=auth("vk_test_untyped_5e4d3c2b1a")
    )
    assert response.status == status
    assert await response.text() == body  # passed through unchanged
    await gateway.close()

    [line] = read_log(log_path)
    assert line["status"] == status
    assert line["error"] == "the provider sent an error in its answer (unknown)"
    assert not schema_errors(line)


async def test_unicode_line_breaks_a_client_sends_stay_inside_their_line(
    make_gateway: Callable[..., Awaitable[TestClient]], log_path: Path
) -> None:
    """NEL, U+2028 and U+2029 are legal raw in JSON, and orjson writes them so: a reader
    splitting lines as Node's readline or Python's str.splitlines() does cut such a line in
    two halves that do not parse. Any client could send one (in a path, a prompt)."""
    gateway = await make_gateway(LOG_BODIES="true")
    paths = ["/v1/models/a%E2%80%A8b", "/v1/models/a%C2%85b"]
    for path in paths:
        assert (await gateway.get(path, headers=auth(OPENAI_VK))).status == 200
    prompt = {**CHAT, "messages": [{"role": "user", "content": "one\u2029two\u2028three"}]}
    response = await gateway.post("/v1/chat/completions", json=prompt, headers=auth(OPENAI_VK))
    assert response.status == 200
    await gateway.close()  # every line written

    text = log_path.read_text()
    assert not any(separator in text for separator in ("\x85", "\u2028", "\u2029"))
    lines = [json.loads(line) for line in text.splitlines()]
    assert [line["path"] for line in lines] == [
        "/v1/models/a\u2028b",
        "/v1/models/a\x85b",
        "/v1/chat/completions",
    ]
    assert lines[2]["request"]["messages"][0]["content"] == "one\u2029two\u2028three"


async def test_with_log_bodies_a_refused_request_logs_the_body_it_was_refused_for(
    make_gateway: Callable[..., Awaitable[TestClient]], log_path: Path
) -> None:
    """LOG_BODIES is how an operator sees why a client's request got its 400 or 403: the body
    was read, yet its line said `"request": null` (only a request refused later, by the
    quota, had its body), so the one body worth seeing was the one missing."""
    gateway = await make_gateway(LOG_BODIES="true")
    openai, restricted = auth(OPENAI_VK), auth(RESTRICTED_VK)
    refused = [
        ("/v1/chat/completions", b'{"model": "gpt-4o-mini", "messages": [', openai),  # 400
        ("/v1/chat/completions", b'{"messages": []}', openai),  # 400: no model
        ("/v1/messages", json.dumps({**MESSAGES, "model": "gpt-4o"}).encode(), restricted),  # 403
    ]
    for path, body, headers in refused:
        response = await gateway.post(
            path, data=body, headers={**headers, "Content-Type": "application/json"}
        )
        assert response.status in (400, 403), await response.text()
    await gateway.close()

    lines = read_log(log_path)
    assert [line["status"] for line in lines] == [400, 400, 403]
    assert lines[0]["request"] == '{"model": "gpt-4o-mini", "messages": ['  # as text
    assert lines[1]["request"] == {"messages": []}
    assert lines[2]["request"] == {**MESSAGES, "model": "gpt-4o"}


async def test_with_log_bodies_a_compressed_upload_is_logged_as_the_json_it_holds(
    make_gateway: Callable[..., Awaitable[TestClient]], log_path: Path
) -> None:
    """A client that gzips its request (Content-Encoding: gzip, which the gateway reads and
    checks) had the compressed bytes logged as text: a line of replacement characters."""
    gateway = await make_gateway(LOG_BODIES="true")
    headers = {**auth(OPENAI_VK), "Content-Type": "application/json", "Content-Encoding": "gzip"}
    body = gzip.compress(json.dumps(CHAT).encode())
    response = await gateway.post("/v1/chat/completions", data=body, headers=headers)
    assert response.status == 200, await response.text()
    await response.read()
    await gateway.close()

    [line] = read_log(log_path)
    assert line["request"] == CHAT
