"""Azure OpenAI through the gateway, with the clients Azure's own docs give developers: the
openai SDK's AzureOpenAI (`azure_endpoint`, `api_version`, deployments in the path, the key in
`api-key`) and the plain OpenAI client at Azure's v1 API (`…/openai/v1/`). The azure provider's
base_url is the resource's endpoint, as the Azure portal shows it; the fake provider stands in.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient

from tests.app.test_model_check import REFUSED
from tests.conftest import keys_document
from tests.support.fake_provider import AZURE_MODEL, FakeState, Fault

API_VERSION = "2024-10-21"
AZURE_VK = "vk_test_azure_resource_4d6f8b0a2c"
ONE_DEPLOYMENT_VK = "vk_test_azure_one_model_7e9a1c3b5d"
CACHED_VK = "vk_test_azure_cached_2b4d6f8a0c"
AZURE_REAL = "azure-real-resource-key-8888888888"
KEYS = {
    CACHED_VK: {
        "provider": "azure",
        "api_key": AZURE_REAL,
        "name": "azure-cached",
        "cache": {"ttl_seconds": 300},
    },
    AZURE_VK: {"provider": "azure", "api_key": AZURE_REAL, "name": "azure-resource"},
    ONE_DEPLOYMENT_VK: {
        "provider": "azure",
        "api_key": AZURE_REAL,
        "name": "azure-one-model",
        "allowed_models": ["gpt-4o-mini", "gpt-realtime"],
    },
}


@pytest.fixture
async def gateway(
    tmp_path: Path, fake_base: str, make_gateway: Callable[..., Awaitable[TestClient]]
) -> TestClient:
    """The azure provider at the resource's endpoint (the fake's root), as the portal names it."""
    document = keys_document(fake_base)
    document["providers"]["azure"] = {"base_url": fake_base}
    document["virtual_keys"].update(KEYS)
    path = tmp_path / "azure-keys.json"
    path.write_text(json.dumps(document))
    return await make_gateway(KEYS_FILE_PATH=str(path))


def azure_sdk(endpoint: str, key: str) -> openai.AsyncAzureOpenAI:
    return openai.AsyncAzureOpenAI(
        azure_endpoint=endpoint, api_key=key, api_version=API_VERSION, max_retries=0
    )


def v1_sdk(base_url: str, key: str) -> openai.AsyncOpenAI:
    """Azure's v1 API: the plain client at `<endpoint>/openai/v1/`."""
    return openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)


# The gateway's address in place of the resource's endpoint: `/openai/...` at its root.
CLIENTS: dict[str, Callable[[TestClient, str], openai.AsyncOpenAI]] = {
    "AzureOpenAI": lambda gateway, key: azure_sdk(str(gateway.make_url("")), key),
    "v1 API": lambda gateway, key: v1_sdk(str(gateway.make_url("/openai/v1/")), key),
}


@pytest.mark.parametrize("client", CLIENTS.values(), ids=CLIENTS.keys())
@pytest.mark.parametrize("call", REFUSED.values(), ids=REFUSED.keys())
async def test_a_restricted_azure_key_is_refused_what_it_cannot_see_under_azures_roots(
    gateway: TestClient,
    fake: FakeState,
    client: Callable[[TestClient, str], openai.AsyncOpenAI],
    call: Callable[[openai.AsyncOpenAI], Awaitable[object]],
) -> None:
    # Azure serves batches, runs, stored prompts and ephemeral keys under openai/ and
    # openai/v1/: the gateway's checks must see the endpoint behind them.
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await call(client(gateway, ONE_DEPLOYMENT_VK))
    assert refused.value.code in ("model_not_allowed", "client_secrets_not_allowed")
    assert fake.requests == []


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/openai/batches", {"input_file_id": "file-1", "endpoint": "/chat/completions"}),
        ("/v1/openai/v1/batches", {"input_file_id": "file-1", "endpoint": "/chat/completions"}),
        ("/v1/openai/threads/runs", {"assistant_id": "asst_1"}),
        ("/v1/openai/realtimeapi/sessions", {"model": "gpt-4o-mini"}),
        ("/v1/openai/v1/realtime/client_secrets", {"session": {"type": "realtime"}}),
    ],
)
async def test_azure_paths_the_gateway_cannot_check_are_refused(
    gateway: TestClient, fake: FakeState, path: str, body: dict[str, Any]
) -> None:
    response = await gateway.post(
        f"{path}?api-version=2025-04-01-preview", json=body, headers={"api-key": ONE_DEPLOYMENT_VK}
    )
    assert response.status == 403, await response.text()
    assert fake.requests == []


async def test_an_azure_key_mints_no_ephemeral_key_unless_keys_json_allows_it(
    gateway: TestClient, fake: FakeState
) -> None:
    for path in ("/v1/openai/realtimeapi/sessions", "/v1/openai/v1/realtime/client_secrets"):
        response = await gateway.post(path, json={"model": "x"}, headers={"api-key": AZURE_VK})
        assert response.status == 403, await response.text()
        assert (await response.json())["error"]["code"] == "client_secrets_not_allowed"
    assert fake.requests == []


def tagged(request_id: str) -> dict[str, Any]:
    return {"extra_headers": {"x-request-id": request_id}}


async def test_azure_openai_with_the_gateway_as_its_endpoint_reaches_the_deployment(
    gateway: TestClient, fake: FakeState, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    client = azure_sdk(str(gateway.make_url("")), AZURE_VK)
    raw = await client.chat.completions.with_raw_response.create(
        model="prod-mini", messages=[{"role": "user", "content": "hello"}], **tagged("req_az_1")
    )
    answer = raw.parse()
    assert answer.model == AZURE_MODEL and answer.choices[0].message.content == "tok0 tok1 tok2 "
    assert raw.http_response.content == fake.sent["req_az_1"]  # filter results and all
    assert raw.headers["apim-request-id"] and raw.headers["x-ms-region"] == "East US"
    seen = fake.requests[-1]
    assert seen.path == "/openai/deployments/prod-mini/chat/completions"
    assert seen.query_string == f"api-version={API_VERSION}"
    assert seen.headers.getall("api-key") == [AZURE_REAL]
    assert AZURE_VK not in str(list(seen.headers.items()))
    (line,) = await records(1)
    assert line["key"] == "azure-resource" and line["status"] == 200
    assert line["model"] == "prod-mini"  # the deployment the client named
    assert line["cost_usd"] > 0  # priced as the model Azure says answered
    assert line["path"] == "/openai/deployments/prod-mini/chat/completions"
    assert line["usage"]["estimated"] is False


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_restricted_key_serves_a_deployment_whose_body_model_is_null(
    gateway: TestClient,
    fake: FakeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    stream: bool,
) -> None:
    # LangChain's AzureChatOpenAI(azure_deployment=...) sends `"model": null`: the deployment
    # in the path is the model, and Azure serves it; null names no model, as an absent one.
    client = openai.AsyncAzureOpenAI(
        azure_endpoint=str(gateway.make_url("")),
        azure_deployment="gpt-4o-mini",
        api_key=ONE_DEPLOYMENT_VK,
        api_version=API_VERSION,
        max_retries=0,
    )
    raw = await client.chat.completions.with_raw_response.create(
        model=None,  # type: ignore[arg-type]  # as LangChain passes it
        messages=[{"role": "user", "content": "hello"}],
        stream=stream,
    )
    assert raw.status_code == 200
    seen = fake.requests[-1]
    assert seen.path == "/openai/deployments/gpt-4o-mini/chat/completions"
    assert json.loads(seen.body)["model"] is None  # passed as sent
    (line,) = await records(1)
    assert line["model"] == "gpt-4o-mini" and line["status"] == 200
    with pytest.raises(openai.PermissionDeniedError):  # the path is still checked
        await azure_sdk(str(gateway.make_url("")), ONE_DEPLOYMENT_VK).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hello"}]
        )


async def test_an_azure_stream_opening_with_empty_choices_is_passed_and_metered(
    gateway: TestClient, fake: FakeState, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    client = azure_sdk(str(gateway.make_url("")), AZURE_VK)
    raw = await client.chat.completions.with_raw_response.create(
        model="prod-mini",
        messages=[{"role": "user", "content": "hello"}],
        stream=True,
        stream_options={"include_usage": True},
        **tagged("req_az_2"),
    )
    chunks = [chunk async for chunk in raw.parse()]
    assert chunks[0].choices == [] and chunks[0].model == ""  # Azure's prompt filter chunk
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "tok0 tok1 tok2 "
    )
    assert chunks[-1].usage is not None
    (line,) = await records(1)
    assert line["stream"] is True and line["usage"]["estimated"] is False
    assert line["usage"]["completion_tokens"] == chunks[-1].usage.completion_tokens
    assert line["cost_usd"] > 0  # the answered model, from the chunks after the empty one


async def test_azure_v1_api_with_the_gateway_as_its_endpoint(
    gateway: TestClient, fake: FakeState
) -> None:
    client = v1_sdk(str(gateway.make_url("/openai/v1/")), AZURE_VK)
    answer = await client.chat.completions.create(
        model="prod-mini", messages=[{"role": "user", "content": "hello"}]
    )
    assert answer.model == AZURE_MODEL
    embedded = await client.embeddings.create(model="embed-small", input="hello")
    assert len(embedded.data) == 1
    seen = fake.requests[-1]
    assert seen.path == "/openai/v1/embeddings" and seen.headers["api-key"] == AZURE_REAL


async def test_a_client_built_for_entra_id_sends_its_virtual_key_as_the_token(
    gateway: TestClient, fake: FakeState
) -> None:
    # Code written for Entra ID (azure_ad_token or a token provider) sends a Bearer token:
    # the virtual key there is read as any other; the resource gets its api-key.
    client = openai.AsyncAzureOpenAI(
        azure_endpoint=str(gateway.make_url("")),
        azure_ad_token_provider=lambda: AZURE_VK,
        api_version=API_VERSION,
        max_retries=0,
    )
    answer = await client.chat.completions.create(
        model="prod-mini", messages=[{"role": "user", "content": "hello"}]
    )
    assert answer.model == AZURE_MODEL
    seen = fake.requests[-1]
    assert seen.headers.getall("api-key") == [AZURE_REAL] and "Authorization" not in seen.headers


async def test_azures_content_filter_refusal_and_missing_api_version_pass_through(
    gateway: TestClient, fake: FakeState, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    client = azure_sdk(str(gateway.make_url("")), AZURE_VK)
    with pytest.raises(openai.BadRequestError) as filtered:
        await client.chat.completions.create(
            model="prod-mini",
            messages=[{"role": "user", "content": "hello"}],
            extra_headers={"x-fake-content-filter": "prompt", "x-request-id": "req_az_cf"},
        )
    assert filtered.value.code == "content_filter"
    assert filtered.value.response.content == fake.sent["req_az_cf"]
    assert filtered.value.response.headers["apim-request-id"]
    response = await gateway.post(
        "/openai/deployments/prod-mini/chat/completions",
        json={"messages": [{"role": "user", "content": "hello"}]},
        headers={"api-key": AZURE_VK},
    )
    assert response.status == 404
    assert await response.json() == {"error": {"code": "404", "message": "Resource not found"}}
    lines = await records(2)
    assert [line["status"] for line in lines] == [400, 404]
    assert lines[0]["error"] and lines[1]["error"]


@pytest.mark.parametrize("client", CLIENTS.values(), ids=CLIENTS.keys())
async def test_a_key_with_a_cache_replays_azures_answer(
    gateway: TestClient, fake: FakeState, client: Callable[[TestClient, str], openai.AsyncOpenAI]
) -> None:
    sdk = client(gateway, CACHED_VK)
    caches = []
    for _ in range(2):
        raw = await sdk.chat.completions.with_raw_response.create(
            model="prod-mini", messages=[{"role": "user", "content": "hello"}]
        )
        caches.append(raw.headers["x-llm-gateway-cache"])
    assert caches == ["miss", "hit"]
    assert len(fake.requests) == 1


async def test_a_metered_keys_stream_on_an_older_api_version_is_not_refused(
    tmp_path: Path,
    fake_base: str,
    make_gateway: Callable[..., Awaitable[TestClient]],
    fake: FakeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    # A token limit asks OpenAI streams for their usage chunk; Azure's api-versions before
    # 2024-09-01-preview (GA 2024-06-01, 2024-02-01) refuse stream_options with a 400.
    document = keys_document(fake_base)
    document["providers"]["azure"] = {"base_url": fake_base}
    document["virtual_keys"][AZURE_VK] = {**KEYS[AZURE_VK], "quota": {"tokens": 100000}}
    path = tmp_path / "metered-azure-keys.json"
    path.write_text(json.dumps(document))
    gateway = await make_gateway(KEYS_FILE_PATH=str(path))
    for version in ("2024-06-01", "2024-10-21"):
        client = openai.AsyncAzureOpenAI(
            azure_endpoint=str(gateway.make_url("")),
            api_key=AZURE_VK,
            api_version=version,
            max_retries=0,
        )
        stream = await client.chat.completions.create(
            model="prod-mini", messages=[{"role": "user", "content": "hello"}], stream=True
        )
        chunks = [chunk async for chunk in stream]
        assert all(chunk.usage is None for chunk in chunks)  # the client asked for none
    old, new = await records(2)
    assert old["status"] == 200 and old["usage"]["estimated"] is True
    assert new["status"] == 200 and new["usage"]["estimated"] is False


async def test_azure_realtime_names_its_deployment_in_the_query_and_is_checked(
    gateway: TestClient, fake: FakeState, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    # AzureOpenAI's realtime.connect(model=...) opens /openai/realtime?deployment=<model>.
    def client(key: str) -> openai.AsyncAzureOpenAI:
        return openai.AsyncAzureOpenAI(
            azure_endpoint=str(gateway.make_url("")),
            websocket_base_url=str(gateway.make_url("/openai")).replace("http", "ws", 1),
            api_key=key,
            api_version="2025-04-01-preview",
            max_retries=0,
        )

    async with client(ONE_DEPLOYMENT_VK).realtime.connect(model="gpt-realtime") as connection:
        assert (await connection.recv()).type == "session.created"
    seen = fake.requests[-1]
    assert seen.path == "/openai/realtime" and "deployment=gpt-realtime" in seen.query_string
    with pytest.raises(Exception, match="403"):
        async with client(ONE_DEPLOYMENT_VK).realtime.connect(model="gpt-4o-realtime-other"):
            pass
    lines = await records(2)
    assert [(line["model"], line["status"]) for line in lines] == [
        ("gpt-realtime", 101),
        ("gpt-4o-realtime-other", 403),
    ]


async def test_azures_responses_websocket_mode_admits_each_turn_as_at_v1_responses(
    tmp_path: Path, fake_base: str, make_gateway: Callable[..., Awaitable[TestClient]]
) -> None:
    # Azure serves the Responses API's WebSocket mode at `/openai/v1/responses`. Only
    # `/v1/responses` was taken for it: an Azure session was admitted once at its upgrade,
    # then ran every turn past the key's quota unchecked, and a key with allowed_models
    # could not open one at all (403: the upgrade names no model, its turns do).
    limited = {"provider": "azure", "api_key": AZURE_REAL, "name": "azure-turns"}
    limited["quota"] = {"requests": 2, "window_seconds": 3600}
    restricted = {**limited, "name": "azure-turns-narrow", "allowed_models": ["gpt-4o-mini"]}
    document = keys_document(fake_base)
    document["providers"]["azure"] = {"base_url": fake_base}
    document["virtual_keys"].update({AZURE_VK: limited, ONE_DEPLOYMENT_VK: restricted})
    path = tmp_path / "azure-turn-keys.json"
    path.write_text(json.dumps(document))
    gateway = await make_gateway(KEYS_FILE_PATH=str(path))

    async def turns(key: str, model: str, count: int) -> list[str]:
        ends = []
        client = v1_sdk(str(gateway.make_url("/openai/v1/")), key)
        async with client.responses.connect() as connection:
            for _ in range(count):
                await connection.response.create(model=model, input="hi")
                async for event in connection:
                    if event.type in ("response.completed", "error"):
                        ends.append(event.type)
                        break
        await client.close()
        return ends

    assert await turns(AZURE_VK, "gpt-4o-mini", 3) == [
        "response.completed",
        "response.completed",
        "error",  # the third turn is past the quota of two requests
    ]
    assert await turns(ONE_DEPLOYMENT_VK, "gpt-4o-mini", 1) == ["response.completed"]
    assert await turns(ONE_DEPLOYMENT_VK, "gpt-4o-other", 1) == ["error"]


async def test_azure_v1_requests_are_read_as_their_endpoints(
    gateway: TestClient, fake: FakeState, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    client = v1_sdk(str(gateway.make_url("/openai/v1/")), AZURE_VK)
    # A transcription names its model in its form: read for the log, the metrics and the price.
    await client.audio.transcriptions.with_raw_response.create(
        model="whisper-1", file=("a.wav", b"RIFF....WAVEfmt ", "audio/wav")
    )
    # A chat without messages is refused naming the field, as on /v1/chat/completions.
    with pytest.raises(openai.BadRequestError, match="messages"):
        await client.chat.completions.create(model="prod-mini", messages=[])
    transcription, chat = await records(2)
    assert transcription["model"] == "whisper-1"
    assert chat["status"] == 400 and len(fake.requests) == 1


async def test_azure_v1_api_as_the_fallback_of_an_openai_key(
    tmp_path: Path,
    fake_base: str,
    make_gateway: Callable[..., Awaitable[TestClient]],
    fake: FakeState,
) -> None:
    # docs/keys.md: behind OpenAI's paths, Azure's base_url is its v1 API's root.
    document = keys_document(fake_base)
    document["providers"]["azure"] = {"base_url": f"{fake_base}/openai/v1"}
    document["virtual_keys"][AZURE_VK] = {
        "provider": "openai",
        "api_key": "sk-real-primary-1234567890",
        "name": "resilient",
        "fallbacks": [{"provider": "azure", "api_key": AZURE_REAL, "model": "prod-mini"}],
    }
    path = tmp_path / "fallback-keys.json"
    path.write_text(json.dumps(document))
    gateway = await make_gateway(KEYS_FILE_PATH=str(path))
    fake.faults["sk-real-primary-1234567890"] = Fault(503)
    client = openai.AsyncOpenAI(
        base_url=str(gateway.make_url("/v1")), api_key=AZURE_VK, max_retries=0
    )
    answer = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
    )
    assert answer.model == AZURE_MODEL
    seen = fake.requests[-1]
    assert seen.path == "/openai/v1/chat/completions" and seen.headers["api-key"] == AZURE_REAL
    assert json.loads(seen.body)["model"] == "prod-mini"


async def test_a_fallback_resources_deployment_is_put_in_the_path(
    tmp_path: Path,
    fake_base: str,
    make_gateway: Callable[..., Awaitable[TestClient]],
    fake: FakeState,
) -> None:
    """Azure's deployments API names the model in the path (the body's `model` is not read):
    a fallback to a second resource whose target names its own deployment got the body's
    `model` swapped and the client's deployment in the path, so it ran a deployment that
    resource may not have (404, sent to the client), or one the target does not pin."""
    document = keys_document(fake_base)
    document["providers"]["azure"] = {"base_url": fake_base}
    document["providers"]["azure-eu"] = {"base_url": fake_base, "auth": "api-key"}
    fallback = {"provider": "azure-eu", "api_key": "azure-eu-real-5555555555", "model": "eu-mini"}
    document["virtual_keys"][AZURE_VK] = {
        "provider": "azure",
        "api_key": AZURE_REAL,
        "name": "two-resources",
        "fallbacks": [fallback],
    }
    path = tmp_path / "fallback-keys.json"
    path.write_text(json.dumps(document))
    gateway = await make_gateway(KEYS_FILE_PATH=str(path))
    fake.faults[AZURE_REAL] = Fault(503)
    client = azure_sdk(str(gateway.make_url("")), AZURE_VK)
    await client.chat.completions.create(
        model="prod-mini", messages=[{"role": "user", "content": "hello"}]
    )
    primary, backup = fake.requests
    assert primary.path == "/openai/deployments/prod-mini/chat/completions"
    assert backup.path == "/openai/deployments/eu-mini/chat/completions"
    assert backup.query_string == f"api-version={API_VERSION}"
    assert json.loads(backup.body)["model"] == "eu-mini"


async def test_an_azure_realtime_session_of_a_pinned_target_opens_its_deployment(
    tmp_path: Path,
    fake_base: str,
    make_gateway: Callable[..., Awaitable[TestClient]],
    fake: FakeState,
) -> None:
    """AzureOpenAI's realtime.connect(model=...) names the deployment as `?deployment=`: the
    swap of a target's model looked for `?model=` only, so the session opened the client's
    deployment, not the one the target pins."""
    document = keys_document(fake_base)
    document["providers"]["azure"] = {"base_url": fake_base}
    document["virtual_keys"][AZURE_VK] = {
        "provider": "azure",
        "api_key": AZURE_REAL,
        "name": "azure-pinned",
        "model": "realtime-mini",
    }
    path = tmp_path / "pinned-keys.json"
    path.write_text(json.dumps(document))
    gateway = await make_gateway(KEYS_FILE_PATH=str(path))
    client = openai.AsyncAzureOpenAI(
        azure_endpoint=str(gateway.make_url("")),
        websocket_base_url=str(gateway.make_url("/openai")).replace("http", "ws", 1),
        api_key=AZURE_VK,
        api_version="2025-04-01-preview",
        max_retries=0,
    )
    async with client.realtime.connect(model="gpt-realtime") as connection:
        assert (await connection.recv()).type == "session.created"
    seen = fake.requests[-1]
    assert seen.path == "/openai/realtime"
    assert "deployment=realtime-mini" in seen.query_string
    assert "gpt-realtime" not in seen.query_string
