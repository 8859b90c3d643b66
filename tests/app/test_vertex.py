"""Vertex AI through the gateway: the client speaks native Vertex with its virtual key, the
gateway sends an access token minted from the target's service account (cached, refreshed
before it expires), in the target's project and region, and meters the answer.

The fake Vertex (tests/support/fake_vertex.py) mints tokens only for a JWT signed by the
service account's key and accepts only tokens it minted.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from anthropic import AsyncAnthropicVertex, PermissionDeniedError

from proxy.keys.fields import Defaults
from proxy.keys.keys import KeyRing, KeysFileError
from proxy.upstream.signing import GoogleToken, SigningFailed
from tests.conftest import auth
from tests.support.connect_proxy import ConnectProxy
from tests.support.fake_vertex import (
    GEMINI_CALL,
    GEMINI_PROMPT,
    GEMINI_THOUGHT,
    GEMINI_THOUGHTS,
    INPUT_TOKENS,
    VERTEX_STATE,
    VertexState,
    service_account,
    vertex_app,
)
from tests.support.observed import assert_views_agree
from tests.support.polling import until

VERTEX_VK = "vk_test_vertex_3e9a1c7d5b"
SMALL_VK = "vk_test_vertex_small_8c2e4a6f0d"  # a window of 1,000 tokens
NARROW_VK = "vk_test_vertex_narrow_5b7d9f1a3c"  # allowed_models: claude-*
PROJECT, REGION = "gateway-project", "us-east5"
CLAUDE = "claude-sonnet-4@20250514"
GEMINI = "gemini-2.5-flash"
GEMINI_PATH = f"/v1/projects/p/locations/r/publishers/google/models/{GEMINI}"
MESSAGES = [{"role": "user", "content": "say hello please"}]


@pytest.fixture
async def account() -> tuple[dict[str, Any], bytes]:
    return service_account("http://unset.invalid/token", PROJECT)


@pytest.fixture
async def fake_vertex(
    aiohttp_server: Callable[..., Awaitable[TestServer]], account: tuple[dict[str, Any], bytes]
) -> TestServer:
    info, public = account
    server = await aiohttp_server(vertex_app(VertexState(public, PROJECT, REGION)))
    info["token_uri"] = str(server.make_url("/token"))
    return server


@pytest.fixture
def vertex(fake_vertex: TestServer) -> VertexState:
    return fake_vertex.app[VERTEX_STATE]


def vertex_keys(base: str, account_file: Path) -> dict[str, Any]:
    target = {
        "provider": "vertex",
        "service_account_file": str(account_file),
        "project": PROJECT,
        "region": REGION,
    }
    return {
        "providers": {"vertex": {"base_url": f"{base}/v1"}},
        "virtual_keys": {
            VERTEX_VK: {"name": "vertex", **target},
            SMALL_VK: {"name": "small", "quota": {"requests": 100, "tokens": 1000}, **target},
            NARROW_VK: {"name": "narrow", "allowed_models": ["claude-*"], **target},
        },
    }


async def vertex_gateway(
    tmp_path: Path,
    fake_vertex: TestServer,
    account: tuple[dict[str, Any], bytes],
    make_gateway: Callable[..., Awaitable[TestClient]],
    **env: str,
) -> TestClient:
    account_file = tmp_path / "service-account.json"
    account_file.write_text(json.dumps(account[0]))
    path = tmp_path / "keys-vertex.json"
    base = str(fake_vertex.make_url("")).rstrip("/")
    path.write_text(json.dumps(vertex_keys(base, account_file)))
    return await make_gateway(KEYS_FILE_PATH=str(path), **env)


@pytest.fixture
async def gateway(
    tmp_path: Path,
    fake_vertex: TestServer,
    account: tuple[dict[str, Any], bytes],
    make_gateway: Callable[..., Awaitable[TestClient]],
) -> TestClient:
    return await vertex_gateway(tmp_path, fake_vertex, account, make_gateway)


def vertex_sdk(gateway: TestClient, virtual_key: str) -> AsyncAnthropicVertex:
    """The anthropic SDK's Vertex client in gateway mode: the virtual key as its token, and a
    project and region of its own (the gateway's target decides where it goes)."""
    return AsyncAnthropicVertex(
        access_token=virtual_key,
        project_id="clients-project",
        region="europe-west1",
        base_url=str(gateway.make_url("/v1")),
        max_retries=0,
    )


@pytest.fixture
async def sdk(gateway: TestClient) -> AsyncIterator[AsyncAnthropicVertex]:
    """The anthropic SDK's Vertex client in gateway mode: the virtual key as its token, and a
    project and region of its own (the gateway's target decides where it goes)."""
    client = vertex_sdk(gateway, VERTEX_VK)
    yield client
    await client.close()


async def test_the_sdk_gets_an_answer_with_a_minted_token(
    sdk: AsyncAnthropicVertex, vertex: VertexState, records
) -> None:
    message = await sdk.messages.create(model=CLAUDE, max_tokens=50, messages=MESSAGES)
    assert message.content[0].text == "tok0 tok1 tok2 "  # type: ignore[union-attr]
    assert vertex.refused == []
    path, headers, _ = vertex.seen[0]
    assert path.startswith(f"/v1/projects/{PROJECT}/locations/{REGION}/publishers/anthropic/")
    assert headers["Authorization"] == "Bearer ya29.fake-access-token-1"
    assert VERTEX_VK not in str(dict(headers))
    line = (await records(1))[0]
    assert line["model"] == CLAUDE and line["provider"] == "vertex"
    usage = line["usage"]
    assert usage["prompt_tokens"] == INPUT_TOKENS and usage["completion_tokens"] == 3
    assert usage["estimated"] is False


async def test_a_stream_is_relayed_and_metered(
    sdk: AsyncAnthropicVertex, vertex: VertexState, records
) -> None:
    async with sdk.messages.stream(model=CLAUDE, max_tokens=50, messages=MESSAGES) as stream:
        text = "".join([piece async for piece in stream.text_stream])
    assert text == "tok0 tok1 tok2 "
    assert vertex.seen[0][0].endswith(":streamRawPredict")
    usage = (await records(1))[0]["usage"]
    assert usage["prompt_tokens"] == INPUT_TOKENS and usage["completion_tokens"] == 3


async def test_one_token_serves_many_requests(
    sdk: AsyncAnthropicVertex, vertex: VertexState
) -> None:
    for _ in range(3):
        await sdk.messages.create(model=CLAUDE, max_tokens=5, messages=MESSAGES)
    assert vertex.minted == ["ya29.fake-access-token-1"]
    assert len(vertex.seen) == 3


async def test_a_token_about_to_expire_is_refreshed_before_use(
    sdk: AsyncAnthropicVertex, vertex: VertexState
) -> None:
    vertex.expires_in = 60  # inside google-auth's refresh margin: never used again
    for _ in range(2):
        await sdk.messages.create(model=CLAUDE, max_tokens=5, messages=MESSAGES)
    assert vertex.minted == ["ya29.fake-access-token-1", "ya29.fake-access-token-2"]
    assert [seen[1]["Authorization"] for seen in vertex.seen] == [
        "Bearer ya29.fake-access-token-1",
        "Bearer ya29.fake-access-token-2",
    ]


async def refused_token_answer(gateway: TestClient, vertex: VertexState) -> str:
    """The body of a Claude call whose token request the endpoint refuses (it no longer knows
    the account's key): a 502."""
    _, other_public = service_account("http://unset.invalid/token", PROJECT)
    vertex.public_pem = other_public
    response = await gateway.post(
        f"/v1/projects/p/locations/r/publishers/anthropic/models/{CLAUDE}:rawPredict",
        json={"anthropic_version": "vertex-2023-10-16", "max_tokens": 5, "messages": MESSAGES},
        headers={"Authorization": f"Bearer {VERTEX_VK}"},
    )
    assert response.status == 502
    return await response.text()


async def test_a_refused_token_request_is_a_clear_502(
    gateway: TestClient, vertex: VertexState
) -> None:
    body = await refused_token_answer(gateway, vertex)
    assert "no access token" in body and "PRIVATE KEY" not in body
    assert "invalid_grant" in body
    assert vertex.seen == []


async def test_a_token_endpoint_quoting_the_assertion_it_refused_hands_it_to_no_client(
    gateway: TestClient, vertex: VertexState, records
) -> None:
    """The signed assertion buys an access token for its hour: the 502 names the OAuth error
    code, never the endpoint's text."""
    vertex.echoes = True
    body = await refused_token_answer(gateway, vertex)
    assert "invalid_grant" in body and "eyJ" not in body and "Invalid JWT" not in body
    (line,) = await records(1)
    assert "eyJ" not in str(line)


async def test_a_restricted_key_counts_tokens_of_its_models(
    gateway: TestClient, vertex: VertexState
) -> None:
    """The SDK's count_tokens goes to `models/count-tokens:rawPredict`, the model in the body:
    'count-tokens' is no model, and the body's is the one checked."""
    client = vertex_sdk(gateway, NARROW_VK)
    async with client:
        counted = await client.messages.count_tokens(model=CLAUDE, messages=MESSAGES)
        assert counted.input_tokens == INPUT_TOKENS
        with pytest.raises(PermissionDeniedError, match="gemini-2.5-flash"):
            await client.messages.count_tokens(model=GEMINI, messages=MESSAGES)
    assert [seen[0].rpartition("/")[2] for seen in vertex.seen] == ["count-tokens:rawPredict"]


async def test_a_token_count_is_charged_nothing(gateway: TestClient, records) -> None:
    """Counting generates nothing and costs nothing, as Anthropic's /v1/messages/count_tokens:
    a prompt as large as the key's window of 1,000 tokens is counted, and the window stays
    empty (it was charged as a generation: its prompt's estimate, or refused 429)."""
    client = vertex_sdk(gateway, SMALL_VK)
    large = [{"role": "user", "content": "x" * 3600}]
    async with client:
        for _ in range(2):
            counted = await client.messages.count_tokens(model=CLAUDE, messages=large)
            assert counted.input_tokens == INPUT_TOKENS
    lines = await records(2)
    assert [(line["status"], line["usage"], line["cost_usd"]) for line in lines] == [
        (200, None, None)
    ] * 2
    async with gateway.get("/usage", headers=auth(SMALL_VK)) as usage:
        assert (await usage.json())["tokens"]["used"] == 0


def gemini_body(text: str, **extra: Any) -> dict[str, Any]:
    """A generateContent request, as the google-genai SDK sends it."""
    return {
        "contents": [{"role": "user", "parts": [{"text": text}]}],
        "generationConfig": {"maxOutputTokens": 50},
        **extra,
    }


@pytest.mark.parametrize(
    "call", [":generateContent", ":streamGenerateContent?alt=sse", ":streamGenerateContent"]
)
async def test_a_gemini_answer_is_charged_its_usage_metadata(
    gateway: TestClient, vertex: VertexState, records, call: str
) -> None:
    response = await gateway.post(
        GEMINI_PATH + call, json=gemini_body("say hello please"), headers=auth(VERTEX_VK)
    )
    assert response.status == 200, await response.text()
    assert b"tok2" in await response.read()
    assert vertex.seen[0][0].startswith(f"/v1/projects/{PROJECT}/locations/{REGION}/")
    line = (await records(1))[0]
    assert line["model"] == GEMINI and line["provider"] == "vertex"
    assert line["stream"] is call.startswith(":stream")  # the path says it, not the body
    usage = line["usage"]
    assert usage["estimated"] is False
    assert usage["prompt_tokens"] == GEMINI_PROMPT
    # Gemini counts thoughts beside the candidates: both are the completion.
    assert usage["completion_tokens"] == 3 + GEMINI_THOUGHTS
    assert usage["reasoning_tokens"] == GEMINI_THOUGHTS


@pytest.mark.parametrize(
    ("call", "last"),
    [(":streamGenerateContent?alt=sse", b"\r\n\r\n"), (":streamGenerateContent", b"]")],
)
async def test_a_gemini_client_that_leaves_at_the_last_event_was_answered_not_cut(
    gateway: TestClient, records, call: str, last: bytes
) -> None:
    # A client that stops reading at the event with the finishReason and the whole
    # usageMetadata (the array's last one, and its `]`) has the whole answer, also when the
    # provider's body end comes after it.
    headers = {**auth(VERTEX_VK), "x-fake-hang": "end"}
    response = await gateway.post(GEMINI_PATH + call, json=gemini_body("hi"), headers=headers)
    received = b""
    while not (b'"finishReason"' in received and received.endswith(last)):
        chunk = await response.content.readany()
        assert chunk, f"the stream ended before its last event: {received!r}"
        received += chunk
    response.close()
    (line,) = await records(1)
    assert line["status"] == 200 and "error" not in line, line
    usage = line["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (
        GEMINI_PROMPT,
        3 + GEMINI_THOUGHTS,
    )
    assert usage["estimated"] is False
    await assert_views_agree(gateway, VERTEX_VK, line)


@pytest.mark.parametrize("call", [":generateContent", ":streamGenerateContent?alt=sse"])
async def test_a_gemini_answer_without_usage_is_charged_every_string_it_generated(
    gateway: TestClient, records, call: str
) -> None:
    body = gemini_body(
        "x" * 400,
        systemInstruction={"parts": [{"text": "s" * 200}]},
        tools=[{"functionDeclarations": [{"name": "lookup", "description": "d" * 100}]}],
    )
    headers = {**auth(VERTEX_VK), "x-fake-no-usage": "1", "x-fake-chunks": "40"}
    response = await gateway.post(GEMINI_PATH + call, json=body, headers=headers)
    assert response.status == 200, await response.text()
    await response.read()
    usage = (await records(1))[0]["usage"]
    assert usage["estimated"] is True
    tools = len(json.dumps(body["tools"], separators=(",", ":")))
    assert usage["prompt_tokens"] == math.ceil((400 + 200 + tools) / 4)
    text = sum(len(f"tok{i} ") for i in range(40))
    call_chars = len(GEMINI_CALL["name"]) + len(
        json.dumps(GEMINI_CALL["args"], separators=(",", ":"))
    )
    generated = len(GEMINI_THOUGHT) + text + call_chars
    assert usage["completion_tokens"] == math.ceil(generated / 4)


async def test_a_small_token_window_refuses_beside_a_large_gemini_prompt(
    gateway: TestClient, vertex: VertexState
) -> None:
    """4,400 characters of contents, system instruction and tools reserve about 1,100
    tokens (and the 50 of the cap): while that request runs, the key's window of 1,000 is
    full, and its next request is refused. Read as 0 tokens, it let the next one in."""
    body = gemini_body(
        "x" * 2000,
        systemInstruction={"parts": [{"text": "s" * 1200}]},
        tools=[{"functionDeclarations": [{"name": "lookup", "description": "d" * 1200}]}],
    )
    headers = {**auth(SMALL_VK), "x-fake-hold": "1"}
    large = asyncio.create_task(
        gateway.post(GEMINI_PATH + ":generateContent", json=body, headers=headers)
    )
    await until(lambda: len(vertex.seen) == 1)
    async with gateway.get("/usage", headers=auth(SMALL_VK)) as usage:
        reserved = (await usage.json())["tokens"]["reserved"]
    tools = len(json.dumps(body["tools"], separators=(",", ":")))
    assert reserved == math.ceil((2000 + 1200 + tools) / 4) + 50
    small = await gateway.post(
        GEMINI_PATH + ":generateContent", json=gemini_body("hi"), headers=auth(SMALL_VK)
    )
    assert small.status == 429, await small.text()
    vertex.release.set()
    async with await large as answered:
        assert answered.status == 200
    assert len(vertex.seen) == 1  # the refused one never went upstream


def test_the_account_may_come_from_an_environment_variable(
    tmp_path: Path, account: tuple[dict[str, Any], bytes]
) -> None:
    document = vertex_keys("http://127.0.0.1:1", tmp_path / "unused.json")
    del document["virtual_keys"][SMALL_VK], document["virtual_keys"][NARROW_VK]
    entry = document["virtual_keys"][VERTEX_VK]
    del entry["service_account_file"]
    entry["service_account_json_env"] = "T_VERTEX_SA"
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(document))
    defaults = Defaults(quota_enabled=False, requests=0, tokens=None, window_seconds=60.0)
    ring = KeyRing.load(str(path), {"T_VERTEX_SA": json.dumps(account[0])}, defaults)
    assert len(ring) == 1
    with pytest.raises(KeysFileError, match="T_VERTEX_SA is not set"):
        KeyRing.load(str(path), {}, defaults)
    with pytest.raises(KeysFileError, match="not a service account"):
        KeyRing.load(str(path), {"T_VERTEX_SA": '{"type": "user"}'}, defaults)
    # bytes that are not UTF-8 (os.environ's lone surrogates) were a traceback at start
    with pytest.raises(KeysFileError, match="T_VERTEX_SA does not hold JSON"):
        KeyRing.load(str(path), {"T_VERTEX_SA": '{"type": "\udcff"}'}, defaults)


@pytest.mark.parametrize(
    ("path", "says"), [("/nowhere/sa.json", "No such file"), ("sa\u0000.json", "null byte")]
)
def test_an_account_file_that_cannot_be_opened_is_refused_in_one_line(
    tmp_path: Path, path: str, says: str
) -> None:
    # A path holding a NUL (an escape left in keys.json) ended the start in a traceback.
    document = vertex_keys("http://127.0.0.1:1", tmp_path / "unused.json")
    del document["virtual_keys"][SMALL_VK], document["virtual_keys"][NARROW_VK]
    document["virtual_keys"][VERTEX_VK]["service_account_file"] = path
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(document))
    defaults = Defaults(quota_enabled=False, requests=0, tokens=None, window_seconds=60.0)
    with pytest.raises(KeysFileError, match=f"service_account_file cannot be read.*{says}"):
        KeyRing.load(str(keys), {}, defaults)


async def test_a_path_naming_a_project_goes_to_the_targets_project_however_short(
    gateway: TestClient, vertex: VertexState
) -> None:
    """A client's project never chooses where the gateway's token goes: `projects/<p>` and
    `projects/<p>/locations/<r>` (location metadata, operations) are the target's too."""
    for tail in (
        "projects/elsewhere",
        "projects/elsewhere/operations",
        "projects/elsewhere/locations",
        "projects/elsewhere/locations/europe-west1",
        "projects/elsewhere/locations/europe-west1/operations",
    ):
        response = await gateway.get(
            f"/v1/{tail}", headers={"Authorization": f"Bearer {VERTEX_VK}"}
        )
        assert response.status == 404  # the fake's: it went upstream
    assert vertex.other == [
        f"/v1/projects/{PROJECT}",
        f"/v1/projects/{PROJECT}/operations",
        f"/v1/projects/{PROJECT}/locations",
        f"/v1/projects/{PROJECT}/locations/{REGION}",
        f"/v1/projects/{PROJECT}/locations/{REGION}/operations",
    ]


async def test_a_deployed_endpoint_is_a_model_allowed_models_checks(
    gateway: TestClient, vertex: VertexState, records
) -> None:
    """`endpoints/<id>:generateContent` (or :predict, :rawPredict) runs the model deployed at
    that endpoint (a tuned Gemini, a Model Garden model): it is named `endpoints/<id>`, so a
    key allowed only claude-* is refused it. It went up, past allowed_models."""
    path = "/v1/projects/p/locations/r/endpoints/1234567890"
    for method in (":generateContent", ":predict", ":rawPredict"):
        refused = await gateway.post(path + method, json=gemini_body("hi"), headers=auth(NARROW_VK))
        assert refused.status == 403, await refused.text()
        assert (await refused.json())["error"]["code"] == "model_not_allowed"
    assert vertex.other == []
    await gateway.post(path + ":generateContent", json=gemini_body("hi"), headers=auth(VERTEX_VK))
    lines = await records(4)
    assert {line["model"] for line in lines} == {"endpoints/1234567890"}
    assert vertex.other == [
        f"/v1/projects/{PROJECT}/locations/{REGION}/endpoints/1234567890:generateContent"
    ]


@pytest.mark.parametrize("log_bodies", ["false", "true"])
async def test_a_provider_echoing_the_access_token_hands_it_to_no_client(
    tmp_path: Path,
    fake_vertex: TestServer,
    account: tuple[dict[str, Any], bytes],
    make_gateway: Callable[..., Awaitable[TestClient]],
    vertex: VertexState,
    records,
    log_bodies: str,
) -> None:
    """The access token is the service account's for its hour, to anyone who holds it: a
    proxy in front of Vertex that echoes the request's Authorization has that header dropped
    and the token masked in the body, as a real key is: in what the client gets, and in the
    answer LOG_BODIES writes to the log."""
    gateway = await vertex_gateway(
        tmp_path, fake_vertex, account, make_gateway, LOG_BODIES=log_bodies
    )
    response = await gateway.post(
        f"/v1/projects/p/locations/r/publishers/anthropic/models/{CLAUDE}:rawPredict",
        json={"anthropic_version": "vertex-2023-10-16", "max_tokens": 5, "messages": MESSAGES},
        headers={**auth(VERTEX_VK), "x-fake-reflect": "1"},
    )
    assert response.status == 200
    body = await response.text()
    assert vertex.minted == ["ya29.fake-access-token-1"]
    assert "x-echo-authorization" not in response.headers
    assert "ya29.fake-access-token-1" not in body and '"sent"' in body
    (line,) = await records(1)
    assert ("response" in line) == (log_bodies == "true")
    assert "ya29.fake-access-token-1" not in json.dumps(line)


async def test_the_token_endpoint_is_reached_through_the_outbound_proxy_too(
    tmp_path: Path,
    fake_vertex: TestServer,
    account: tuple[dict[str, Any], bytes],
    make_gateway: Callable[..., Awaitable[TestClient]],
    vertex: VertexState,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """google-auth's urllib3 reads no proxy variable: behind an egress proxy, no token."""
    async with ConnectProxy(credentials="egress:pw") as proxy:
        url = proxy.url("egress:pw@")
        monkeypatch.setenv("HTTP_PROXY", url)  # keys.json's environment: the service account's
        gateway = await vertex_gateway(tmp_path, fake_vertex, account, make_gateway, HTTP_PROXY=url)
        client = vertex_sdk(gateway, VERTEX_VK)
        try:
            message = await client.messages.create(model=CLAUDE, max_tokens=50, messages=MESSAGES)
        finally:
            await client.close()
    assert message.content[0].text == "tok0 tok1 tok2 "  # type: ignore[union-attr]
    base = str(fake_vertex.make_url("")).rstrip("/")
    # (the SDK's own httpx reads HTTP_PROXY too: its request to the gateway is there as well)
    assert f"{base}/token" in proxy.forwarded
    assert any(url.startswith(f"{base}/v1/projects/{PROJECT}/") for url in proxy.forwarded)


@pytest.mark.parametrize(
    ("region", "host"),
    [
        ("us-east5", "us-east5-aiplatform.googleapis.com"),
        ("global", "aiplatform.googleapis.com"),
        # The multi-region endpoints (the anthropic SDK's AnthropicVertex(region="us")): no
        # host `us-aiplatform.googleapis.com` exists, so every request of such a key failed.
        ("us", "aiplatform.us.rep.googleapis.com"),
        ("eu", "aiplatform.eu.rep.googleapis.com"),
    ],
)
def test_a_region_picks_the_endpoint_google_serves_it_at(
    tmp_path: Path, account: tuple[dict[str, Any], bytes], region: str, host: str
) -> None:
    account_file = tmp_path / "service-account.json"
    account_file.write_text(json.dumps(account[0]))
    document = vertex_keys("http://unused.invalid", account_file)
    del document["providers"], document["virtual_keys"][SMALL_VK]
    del document["virtual_keys"][NARROW_VK]
    document["virtual_keys"][VERTEX_VK]["region"] = region
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(document))
    defaults = Defaults(quota_enabled=False, requests=0, tokens=None, window_seconds=60.0)
    (target,) = KeyRing.load(str(path), {}, defaults).every_target()
    assert target.name == f"vertex/{region}"
    url = target.provider.url("projects/p/locations/r/publishers/google/models/m:x", "")
    assert (url.scheme, url.host, url.path) == (
        "https",
        host,
        "/v1/projects/p/locations/r/publishers/google/models/m:x",
    )


def test_a_providers_entry_without_base_url_keeps_the_endpoint_of_each_region(
    tmp_path: Path, account: tuple[dict[str, Any], bytes]
) -> None:
    """`"providers": {"vertex": {"api": "vertex"}}` (no base_url of its own): before, a key in
    `global`, `us` or `eu` went to `<region>-aiplatform.googleapis.com`, a host that does
    not exist."""
    account_file = tmp_path / "service-account.json"
    account_file.write_text(json.dumps(account[0]))
    document = vertex_keys("http://unused.invalid", account_file)
    document["providers"] = {"vertex": {"api": "vertex"}}
    del document["virtual_keys"][SMALL_VK], document["virtual_keys"][NARROW_VK]
    document["virtual_keys"][VERTEX_VK]["region"] = "global"
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(document))
    defaults = Defaults(quota_enabled=False, requests=0, tokens=None, window_seconds=60.0)
    (target,) = KeyRing.load(str(path), {}, defaults).every_target()
    assert target.provider.url("projects/p", "").host == "aiplatform.googleapis.com"


async def test_requests_needing_a_token_at_once_share_the_refusal_of_one_token_request(
    account: tuple[dict[str, Any], bytes], vertex: VertexState
) -> None:
    """Requests that need the token while it is being asked for share that one request's
    outcome: a refusal (or a hang of 10 s) is each one's 502 at once. Queued one behind the
    other, each asked the endpoint again in turn after the one before was refused: the last
    of many waited for every refusal before its own, and the endpoint was asked by each."""
    _, other_public = service_account("http://unset.invalid/token", PROJECT)
    vertex.public_pem = other_public  # the endpoint no longer knows the account's key
    signer = GoogleToken(account[0])
    outcomes = await asyncio.gather(*(signer.token() for _ in range(3)), return_exceptions=True)
    assert all(isinstance(outcome, SigningFailed) for outcome in outcomes), outcomes
    assert len(vertex.refused) == 1, vertex.refused
    vertex.public_pem = account[1]  # known again: the next request asks anew, and has a token
    assert await signer.token() == "ya29.fake-access-token-1"


async def test_a_token_refreshed_while_a_request_is_out_is_masked_in_its_echo_all_the_same(
    gateway: TestClient, vertex: VertexState
) -> None:
    """A request sent with one token, answered after another request had it refreshed (it
    was within its last minutes): the first token is still good until it expires, and a
    proxy in front of Vertex that echoes it has that header dropped and the token masked, as
    for the token in use. Only the token held now was searched for: the first went out."""
    vertex.expires_in = 60  # inside google-auth's refresh margin: each request mints one
    path = f"/v1/projects/p/locations/r/publishers/anthropic/models/{CLAUDE}:rawPredict"
    body = {"anthropic_version": "vertex-2023-10-16", "max_tokens": 5, "messages": MESSAGES}
    held = asyncio.create_task(
        gateway.post(
            path, json=body, headers={**auth(VERTEX_VK), "x-fake-hold": "1", "x-fake-reflect": "1"}
        )
    )
    await until(lambda: len(vertex.seen) == 1, what="the first request at Vertex")
    second = await gateway.post(path, json=body, headers=auth(VERTEX_VK))
    assert second.status == 200
    assert vertex.minted == ["ya29.fake-access-token-1", "ya29.fake-access-token-2"]
    vertex.release.set()
    response = await held
    text = await response.text()
    assert response.status == 200 and '"sent"' in text
    assert "x-echo-authorization" not in response.headers
    assert "ya29.fake-access-token-1" not in text


async def test_the_clients_quota_project_never_reaches_vertex(
    gateway: TestClient, vertex: VertexState
) -> None:
    # A Google client whose credentials name a quota project sends it beside its token: it
    # would pick which project the gateway's service account is billed and quota-checked in.
    client = AsyncAnthropicVertex(
        access_token=VERTEX_VK,
        project_id="clients-project",
        region="europe-west1",
        base_url=str(gateway.make_url("/v1")),
        max_retries=0,
        default_headers={"x-goog-user-project": "clients-billing-project"},
    )
    async with client:
        await client.messages.create(model=CLAUDE, max_tokens=5, messages=MESSAGES)
    _, headers, _ = vertex.seen[0]
    assert "x-goog-user-project" not in headers
    assert all("clients-billing-project" not in value for value in headers.values())
