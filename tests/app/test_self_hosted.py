"""Self-hosted model servers behind the gateway: Ollama, vLLM, llama.cpp's server, TGI.

A platform team declares them in keys.json (`"auth": "none"`, http:// base URLs); their
answers are OpenAI's shapes with each server's flavour, or their own native APIs. Driven
through a gateway against `tests/support/fake_selfhosted.py`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import auth
from tests.support.fake_selfhosted import (
    PROMPT_TOKENS,
    SELFHOSTED_STATE,
    SelfHostedState,
    build_fake_selfhosted,
)
from tests.support.observed import assert_views_agree

NATIVE_VK = "vk_test_ollama_native_0a1b2c"
LLAMA_VK = "vk_test_llamacpp_native_9f8e7d"
TGI_VK = "vk_test_tgi_native_5c4b3a2d"
OPENAI_MODE_VK = "vk_test_ollama_openai_3d4e5f"
METERED_VK = "vk_test_ollama_metered_6a7b8c"
CACHED_VK = "vk_test_llamacpp_cached_1f2e3d"
FALLING_VK = "vk_test_llamacpp_falling_4a5b6c"


@pytest.fixture
async def server(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> TestServer:
    return await aiohttp_server(build_fake_selfhosted())


@pytest.fixture
def state(server: TestServer) -> SelfHostedState:
    return server.app[SELFHOSTED_STATE]


@pytest.fixture
def self_hosted(
    server: TestServer, tmp_path: Path, make_gateway: Callable[..., Awaitable[TestClient]]
) -> Callable[..., Awaitable[TestClient]]:
    """A gateway whose keys reach the server: its native API and its OpenAI one."""
    root = str(server.make_url("")).rstrip("/")

    async def make(**env: str) -> TestClient:
        keys: dict[str, Any] = {
            "providers": {
                "ollama-native": {"base_url": root, "auth": "none"},
                "ollama": {"base_url": f"{root}/v1", "auth": "none"},
                "llamacpp": {"base_url": root, "auth": "none"},
                "llamacpp-openai": {"base_url": f"{root}/v1", "auth": "none"},
                "tgi": {"base_url": root, "auth": "none"},
            },
            "virtual_keys": {
                NATIVE_VK: {"provider": "ollama-native", "api_key": "none", "name": "native"},
                OPENAI_MODE_VK: {"provider": "ollama", "api_key": "none", "name": "openai-mode"},
                FALLING_VK: {
                    "provider": "ollama",
                    "api_key": "none",
                    "name": "falling",
                    "fallbacks": [{"provider": "llamacpp-openai", "api_key": "none"}],
                },
                CACHED_VK: {
                    "provider": "ollama",
                    "api_key": "none",
                    "name": "cached",
                    "cache": {"ttl_seconds": 300},
                },
                LLAMA_VK: {
                    "provider": "llamacpp",
                    "api_key": "none",
                    "name": "llamacpp",
                    "quota": {"tokens": 1000},
                },
                TGI_VK: {
                    "provider": "tgi",
                    "api_key": "none",
                    "name": "tgi",
                    "quota": {"tokens": 1000},
                },
                METERED_VK: {
                    "provider": "ollama-native",
                    "api_key": "none",
                    "name": "metered",
                    "quota": {"tokens": 1000},
                },
            },
        }
        path = tmp_path / "self-hosted.json"
        path.write_text(json.dumps(keys))
        return await make_gateway(KEYS_FILE_PATH=str(path), **env)

    return make


async def generated(gateway: TestClient, key: str, path: str, body: Any) -> int:
    """Ask `path` for five chunks with `key`, read the answer through, close the gateway
    (its log line written); the tokens the key's window counts then."""
    response = await gateway.post(path, json=body, headers={**auth(key), "x-fake-chunks": "5"})
    assert response.status == 200
    await response.read()
    usage = await gateway.get("/usage", headers=auth(key))
    tokens = (await usage.json())["tokens"]
    await gateway.close()
    return int(tokens["used"])


def assert_reported(line: dict[str, Any]) -> None:
    """The log line charged the counts the fake server reported: its prompt and 5 tokens."""
    assert line["usage"]["prompt_tokens"] == PROMPT_TOKENS
    assert line["usage"]["completion_tokens"] == 5
    assert line["usage"]["estimated"] is False


CHAT = {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "hello there"}]}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/api/chat", CHAT),  # a stream: Ollama streams unless told not to
        ("/v1/api/chat", {**CHAT, "stream": False}),
        ("/v1/api/generate", {"model": "llama3.2:1b", "prompt": "hello there"}),
        ("/v1/api/generate", {"model": "llama3.2:1b", "prompt": "hello there", "stream": False}),
    ],
)
async def test_ollamas_native_generations_are_charged_the_counts_ollama_reports(
    self_hosted: Callable[..., Awaitable[TestClient]],
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    path: str,
    body: dict[str, Any],
) -> None:
    """Ollama's own API (its Python and JS clients, Open WebUI) reports a generation's counts
    in its last line (`prompt_eval_count`, `eval_count`): a key with a token limit was charged
    nothing for it, so its limit never closed."""
    assert await generated(await self_hosted(), METERED_VK, path, body) == PROMPT_TOKENS + 5
    [line] = await records(1)
    assert_reported(line)
    assert line["model"] == "llama3.2:1b"


async def test_ollamas_native_embeddings_are_charged_their_prompt(
    self_hosted: Callable[..., Awaitable[TestClient]],
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    gateway = await self_hosted()
    body = {"model": "all-minilm", "input": "hello there"}
    response = await gateway.post("/v1/api/embed", json=body, headers=auth(METERED_VK))
    assert response.status == 200
    await response.read()
    await gateway.close()

    [line] = await records(1)
    assert line["usage"]["prompt_tokens"] == PROMPT_TOKENS
    assert line["usage"]["completion_tokens"] == 0
    assert line["usage"]["estimated"] is False


async def test_an_ollama_stream_cut_by_its_error_line_is_logged_with_that_error(
    self_hosted: Callable[..., Awaitable[TestClient]],
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    """Ollama ends a failing stream with `{"error": "<a sentence>"}` under its 200: the log says
    the provider sent an error, and what came before it is charged, estimated."""
    gateway = await self_hosted()
    headers = {**auth(NATIVE_VK), "x-fake-error-midstream": "1"}
    response = await gateway.post("/v1/api/chat", json=CHAT, headers=headers)
    body = await response.read()
    await gateway.close()

    assert body.endswith(
        b'{"error":"an error was encountered while running the model: unexpected EOF"}\n'
    )
    [line] = await records(1)
    assert line["error"] == "the provider sent an error in its answer (unknown)"
    assert line["usage"]["estimated"] is True
    assert line["usage"]["completion_tokens"] == 2  # "tok0 ": 5 characters


async def test_an_ollama_stream_reaches_the_client_line_by_line_and_is_logged_as_a_stream(
    self_hosted: Callable[..., Awaitable[TestClient]],
    state: SelfHostedState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    """Ollama streams unless the body says `"stream": false`: each line reaches the client
    when Ollama writes it (the next one is not written before the test lets it), and the
    log line says it was a stream, though no body said `"stream": true`."""
    gateway = await self_hosted()
    headers = {**auth(NATIVE_VK), "x-fake-hold": "1", "x-fake-chunks": "2"}
    response = await gateway.post("/v1/api/chat", json=CHAT, headers=headers)
    assert response.status == 200
    for index in range(3):  # two tokens, then the counts
        state.step.set()
        line = await asyncio.wait_for(response.content.readline(), 5)
        assert state.lines_sent == index + 1  # this line came before the next was written
        assert json.loads(line)["done"] is (index == 2)
    await response.read()
    await gateway.close()

    [line] = await records(1)
    assert line["stream"] is True


@pytest.mark.parametrize("path", ["/v1/api/chat", "/v1/api/generate"])
async def test_an_ollama_client_that_leaves_at_the_done_line_was_answered_not_cut(
    self_hosted: Callable[..., Awaitable[TestClient]],
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    path: str,
) -> None:
    """A client that stops reading at the last line (`"done": true`, with the counts) has
    the whole answer, also when Ollama's body end comes after it."""
    gateway = await self_hosted()
    body = {"model": "llama3.2:1b", "prompt": "hello there"} if "generate" in path else CHAT
    headers = {**auth(METERED_VK), "x-fake-chunks": "5", "x-fake-hang": "end"}
    response = await gateway.post(path, json=body, headers=headers)
    assert response.status == 200
    while not json.loads(await asyncio.wait_for(response.content.readline(), 5))["done"]:
        pass
    response.close()
    [line] = await records(1)
    assert line["status"] == 200 and "error" not in line, line
    assert_reported(line)
    await assert_views_agree(gateway, METERED_VK, line)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completion", {"prompt": "Building a website can be done in", "n_predict": 5}),
        ("/v1/completion", {"prompt": "Building a website can be", "stream": True}),
        ("/v1/infill", {"input_prefix": "def f(", "input_suffix": ")", "prompt": ""}),
    ],
)
async def test_llamacpps_native_completions_are_charged_the_counts_it_reports(
    self_hosted: Callable[..., Awaitable[TestClient]],
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    path: str,
    body: dict[str, Any],
) -> None:
    """llama.cpp's server answers its own /completion (and /infill) with `tokens_evaluated`
    and `tokens_predicted` (a stream: running counts in every event): a key with a token limit
    was charged nothing for them."""
    assert await generated(await self_hosted(), LLAMA_VK, path, body) == PROMPT_TOKENS + 5
    [line] = await records(1)
    assert_reported(line)


async def test_llamacpps_tokenizer_is_charged_nothing(
    self_hosted: Callable[..., Awaitable[TestClient]],
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    gateway = await self_hosted()
    response = await gateway.post("/v1/tokenize", json={"content": "a b c"}, headers=auth(LLAMA_VK))
    assert response.status == 200
    await response.read()
    await gateway.close()

    [line] = await records(1)
    assert line["usage"] is None


TGI_PROMPT = "What is Deep Learning?"  # 22 characters: 6 tokens estimated


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/generate_stream"])
@pytest.mark.parametrize("details", [True, False])
async def test_tgis_native_generations_are_charged(
    self_hosted: Callable[..., Awaitable[TestClient]],
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    path: str,
    details: bool,
) -> None:
    """TGI's own /generate and /generate_stream report counts only when asked for `details`
    (`input_length`, `generated_tokens`): with them the answer is charged those, without
    them an estimate from its `inputs` and the text it generated. It was charged nothing."""
    body = {"inputs": TGI_PROMPT, "parameters": {"max_new_tokens": 20, "details": details}}
    await generated(await self_hosted(), TGI_VK, path, body)
    [line] = await records(1)
    if details:
        assert_reported(line)
    else:
        assert line["usage"]["prompt_tokens"] == 6
        assert line["usage"]["completion_tokens"] == 7  # "tok0 " .. "tok4 ": 25 characters
        assert line["usage"]["estimated"] is True


async def test_a_llamacpp_stream_ended_by_its_error_line_is_logged_with_that_error(
    self_hosted: Callable[..., Awaitable[TestClient]],
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    """llama.cpp's server ends a failing stream with a line of its own field, `error: {...}`
    (not `data:`), then `data: [DONE]`: the stream went through as a 200 logged with no error,
    as if it had answered."""
    gateway = await self_hosted()
    headers = {**auth(OPENAI_MODE_VK), "x-fake-flavour": "llamacpp", "x-fake-error-midstream": "1"}
    response = await gateway.post(
        "/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers
    )
    body = await response.read()
    await gateway.close()

    assert b'error: {"code":500' in body  # passed through as it came
    [line] = await records(1)
    assert line["status"] == 200
    assert line["error"] == "the provider sent an error in its answer (server_error)"


async def test_a_llamacpp_stream_ended_by_its_error_line_is_not_cached(
    self_hosted: Callable[..., Awaitable[TestClient]],
    state: SelfHostedState,
) -> None:
    """Its `data: [DONE]` after the `error:` line looked like a stream that ended well: a key
    with a cache must not replay the failure to the next identical request."""
    gateway = await self_hosted()
    headers = {**auth(CACHED_VK), "x-fake-flavour": "llamacpp", "x-fake-error-midstream": "1"}
    body = {**CHAT, "stream": True}
    for _ in range(2):
        response = await gateway.post("/v1/chat/completions", json=body, headers=headers)
        await response.read()
        assert response.headers["x-llm-gateway-cache"] == "miss"
    await gateway.close()

    assert len(state.requests) == 2


async def test_a_llamacpp_stream_failing_at_once_by_its_error_line_fails_over(
    self_hosted: Callable[..., Awaitable[TestClient]],
    state: SelfHostedState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    """A stream whose first event past its start is llama.cpp's `error:` line of a failure of
    the moment (503 `unavailable_error`, a model still loading) is that attempt's failure, as
    a `data:` error object is: the fallback answers, and the client never sees the error."""
    gateway = await self_hosted()
    headers = {**auth(FALLING_VK), "x-fake-flavour": "llamacpp", "x-fake-error-first": "1"}
    response = await gateway.post(
        "/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers
    )
    body = await response.read()
    await gateway.close()

    assert response.status == 200
    assert b"error" not in body and body.endswith(b"data: [DONE]\n\n")
    assert state.failed_first == 1 and len(state.requests) == 2
    [line] = await records(1)
    assert [attempt["target"] for attempt in line["attempts"]] == ["ollama", "llamacpp-openai"]
    assert "error" not in line
