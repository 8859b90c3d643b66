"""Anthropic's managed agents on Bedrock through the gateway: `AnthropicBedrock(...).beta.agents`,
`.beta.sessions` (and `.memory_stores`) are served by Bedrock's control plane,
`bedrock.<region>.amazonaws.com/anthropic/v1/...`, not by the runtime the messages go to.

The SDK, given the gateway's `/v1` as its base URL, sends them as `/v1/v1/agents`, ... (its
own `/v1/...` under its base URL); the gateway sends each to the target's region's control
plane, signed with SigV4 for `bedrock` as the SDK signs them itself. The fake Bedrock
(tests/support/fake_bedrock.py) stands in for both real hosts, reached by their names through
a CONNECT proxy with TLS from a private authority: each serves only its own paths, and every
signature is recomputed with botocore.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from anthropic import AsyncAnthropicBedrock, InternalServerError, PermissionDeniedError
from multidict import CIMultiDict

from proxy.keys.fields import Defaults
from proxy.keys.keys import KeyRing
from proxy.relay.links import pointed_back
from proxy.upstream.providers import BUILTINS
from tests.app.test_bedrock import (
    ACCESS_KEY,
    BEDROCK_VK,
    CLAUDE,
    MESSAGES,
    NARROW_VK,
    REGION,
    SECRET_KEY,
    SESSION_TOKEN,
    bedrock_keys,
)
from tests.support.certificates import Authority
from tests.support.connect_proxy import ConnectProxy
from tests.support.fake_bedrock import (
    BEDROCK_STATE,
    CLAUDE_PROFILE,
    BedrockState,
    bedrock_app,
    signed_region,
)

RUNTIME = f"bedrock-runtime.{REGION}.amazonaws.com"
CONTROL_PLANE = f"bedrock.{REGION}.amazonaws.com"
ROLE = {"type": "aws_role", "role_arn": "arn:aws:iam::123456789012:role/agents"}
BETA = "managed-agents-2026-04-01"

Serve = Callable[..., Awaitable[TestServer]]


@pytest.fixture
async def real_hosts(
    aiohttp_server: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[TestServer, ConnectProxy]]:
    """The fake Bedrock at both of the region's real host names: TLS for those names from a
    private authority (trusted through SSL_CERT_FILE), each tunnel to either sent to it."""
    authority = Authority(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(authority.path))  # read by each new default context
    app = bedrock_app(ACCESS_KEY, SECRET_KEY, SESSION_TOKEN, REGION)
    server = await aiohttp_server(app, ssl=authority.serve(RUNTIME, CONTROL_PLANE))
    hosts = {f"{name}:443": f"127.0.0.1:{server.port}" for name in (RUNTIME, CONTROL_PLANE)}
    async with ConnectProxy(hosts=hosts) as proxy:
        yield server, proxy


@pytest.fixture
async def gateway(
    tmp_path: Path,
    real_hosts: tuple[TestServer, ConnectProxy],
    make_gateway: Callable[..., Awaitable[TestClient]],
) -> TestClient:
    """A gateway whose Bedrock keys use the region's own endpoints (no base_url of their own),
    behind an outbound proxy."""
    document = bedrock_keys("http://unused.invalid")
    del document["providers"]
    path = tmp_path / "keys-bedrock-regional.json"
    path.write_text(json.dumps(document))
    _, proxy = real_hosts
    return await make_gateway(KEYS_FILE_PATH=str(path), HTTPS_PROXY=proxy.url())


@pytest.fixture
def bedrock(real_hosts: tuple[TestServer, ConnectProxy]) -> BedrockState:
    return real_hosts[0].app[BEDROCK_STATE]


def sdk(gateway: TestClient, key: str = BEDROCK_VK) -> AsyncAnthropicBedrock:
    """The SDK's Bedrock client in gateway mode (its virtual key as the API key)."""
    return AsyncAnthropicBedrock(
        api_key=key, aws_region="us-east-1", base_url=str(gateway.make_url("/v1")), max_retries=0
    )


@pytest.fixture
async def client(gateway: TestClient) -> AsyncIterator[AsyncAnthropicBedrock]:
    bedrock = sdk(gateway)
    yield bedrock
    await bedrock.close()


def seen_at(bedrock: BedrockState) -> list[tuple[str, str]]:
    """(host, path) of each request the fake served."""
    return [(headers["Host"].partition(":")[0], path) for path, headers, _ in bedrock.seen]


async def test_agents_go_to_the_regions_control_plane_signed_as_the_sdk_signs_them(
    client: AsyncAnthropicBedrock, bedrock: BedrockState, real_hosts: tuple[TestServer, Any]
) -> None:
    """Before: the gateway sent `v1/agents` to the runtime's host, which serves no such path:
    every managed-agents call was a 404 (NotFoundError)."""
    made = await client.beta.agents.create(
        name="helper", model=CLAUDE_PROFILE, execution_identity=ROLE
    )
    again = await client.beta.agents.retrieve(made.id, version=1)
    listed = [agent.id async for agent in client.beta.agents.list(limit=5)]
    message = await client.messages.create(model=CLAUDE, max_tokens=50, messages=MESSAGES)
    assert made.id == again.id == "agent_bdrk_1" and made.name == "helper"
    assert listed == ["agent_bdrk_1"]
    assert message.content[0].text == "tok0 tok1 tok2 "  # type: ignore[union-attr]
    assert bedrock.refused == []
    assert seen_at(bedrock) == [
        (CONTROL_PLANE, "/anthropic/v1/agents"),
        (CONTROL_PLANE, "/anthropic/v1/agents/agent_bdrk_1?version=1"),
        (CONTROL_PLANE, "/anthropic/v1/agents?limit=5"),
        (RUNTIME, f"/model/{CLAUDE}/invoke"),
    ]
    for _, headers, _ in bedrock.seen[:3]:
        assert signed_region(headers) == REGION  # the target's, not the client's us-east-1
        assert headers["anthropic-beta"] == BETA and "anthropic-version" in headers
        assert BEDROCK_VK not in str(dict(headers))
    assert json.loads(bedrock.seen[0][2])["model"] == CLAUDE_PROFILE  # the body as sent


async def test_a_session_is_made_told_and_streamed_back_through_the_gateway(
    client: AsyncAnthropicBedrock, bedrock: BedrockState, records
) -> None:
    session = await client.beta.sessions.create(agent="agent_bdrk_1", environment_id="env_1")
    sent = await client.beta.sessions.events.send(
        session.id,
        events=[{"type": "user.message", "content": [{"type": "text", "text": "hello"}]}],
    )
    stream = await client.beta.sessions.events.stream(session.id)
    kinds = [event.type async for event in stream]
    assert session.id == "sesn_bdrk_1" and [event.type for event in sent.data] == ["user.message"]
    assert kinds == ["agent.message"] * 3 + ["session.status_idle"]
    assert bedrock.refused == []
    assert [path for _, path in seen_at(bedrock)] == [
        "/anthropic/v1/sessions",
        "/anthropic/v1/sessions/sesn_bdrk_1/events",
        "/anthropic/v1/sessions/sesn_bdrk_1/events/stream",
    ]
    lines = await records(3)
    assert [(line["method"], line["status"], line["provider"]) for line in lines] == [
        ("POST", 200, "bedrock"),
        ("POST", 200, "bedrock"),
        ("GET", 200, "bedrock"),
    ]
    assert lines[2]["path"] == "/v1/v1/sessions/sesn_bdrk_1/events/stream"


async def test_a_restricted_key_starts_no_session_and_makes_agents_of_its_models_only(
    gateway: TestClient, bedrock: BedrockState
) -> None:
    """A session runs the agent's models, stored at Bedrock: out of the gateway's sight, so a
    key with allowed_models may not start one; an agent's model is checked as any model."""
    narrow = sdk(gateway, NARROW_VK)
    try:
        with pytest.raises(PermissionDeniedError, match="managed agent"):
            await narrow.beta.sessions.create(agent="agent_bdrk_1", environment_id="env_1")
        with pytest.raises(PermissionDeniedError, match="may not use the model"):
            await narrow.beta.agents.create(
                name="helper", model=CLAUDE_PROFILE, execution_identity=ROLE
            )
    finally:
        await narrow.close()
    assert bedrock.seen == []


async def test_a_restricted_key_makes_an_agent_whose_model_config_names_an_allowed_model(
    gateway: TestClient, bedrock: BedrockState
) -> None:
    """The SDK's model config object (`model={"id": ..., "effort": ...}`) is checked by its
    `id`. Before: 403 "'model' here is not a string" whatever the id."""
    narrow = sdk(gateway, NARROW_VK)
    try:
        made = await narrow.beta.agents.create(
            name="helper", model={"id": CLAUDE, "effort": "high"}, execution_identity=ROLE
        )
        with pytest.raises(PermissionDeniedError, match="may not use the model"):
            await narrow.beta.agents.create(
                name="helper",
                model={"id": CLAUDE_PROFILE, "effort": "high"},
                execution_identity=ROLE,
            )
    finally:
        await narrow.close()
    assert made.name == "helper" and bedrock.refused == []
    assert seen_at(bedrock) == [(CONTROL_PLANE, "/anthropic/v1/agents")]
    assert json.loads(bedrock.seen[0][2])["model"] == {"id": CLAUDE, "effort": "high"}


async def test_a_base_url_of_its_own_serves_the_agents_as_the_sdk_would_send_them(
    aiohttp_server: Serve, tmp_path: Path, make_gateway: Callable[..., Awaitable[TestClient]]
) -> None:
    """`providers.bedrock.base_url` replaces both endpoints, as the SDK's own base_url does:
    the agents go under it as `/v1/...`."""
    fake = await aiohttp_server(bedrock_app(ACCESS_KEY, SECRET_KEY, SESSION_TOKEN, REGION))
    path = tmp_path / "keys-bedrock.json"
    path.write_text(json.dumps(bedrock_keys(str(fake.make_url("")).rstrip("/"))))
    client = sdk(await make_gateway(KEYS_FILE_PATH=str(path)))
    try:
        agent = await client.beta.agents.retrieve("agent_bdrk_1")
    finally:
        await client.close()
    state = fake.app[BEDROCK_STATE]
    assert agent.id == "agent_bdrk_1" and state.refused == []
    assert [path for path, _, _ in state.seen] == ["/v1/agents/agent_bdrk_1"]


def test_each_region_has_its_control_plane_beside_its_runtime(tmp_path: Path) -> None:
    document = bedrock_keys("http://unused.invalid")
    del document["providers"]
    document["virtual_keys"] = {BEDROCK_VK: document["virtual_keys"][BEDROCK_VK]}
    document["virtual_keys"][BEDROCK_VK]["region"] = "eu-central-1"
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(document))
    defaults = Defaults(quota_enabled=False, requests=0, tokens=None, window_seconds=60.0)
    (target,) = KeyRing.load(str(path), {}, defaults).every_target()
    provider = target.provider
    assert str(provider.url("v1/sessions/s/events", "limit=2")) == (
        "https://bedrock.eu-central-1.amazonaws.com/anthropic/v1/sessions/s/events?limit=2"
    )
    assert str(provider.url(f"model/{CLAUDE}/converse", "")) == (
        f"https://bedrock-runtime.eu-central-1.amazonaws.com/model/{CLAUDE}/converse"
    )


def test_a_redirect_to_the_control_plane_points_back_at_the_gateway() -> None:
    """The SDK follows a redirect: one to Bedrock's own host would take the virtual key there."""
    provider = BUILTINS["bedrock"].in_region(REGION)
    location = f"https://{CONTROL_PLANE}/anthropic/v1/agents?page=2"
    headers = CIMultiDict({"Location": location})
    pointed_back(headers, provider, "/v1/v1/agents")
    assert headers["Location"] == "/v1/v1/agents?page=2"


async def test_a_control_plane_out_of_reach_is_a_502_naming_its_own_host(
    client: AsyncAnthropicBedrock, real_hosts: tuple[TestServer, ConnectProxy]
) -> None:
    """An egress that lets the runtime's host through and not the control plane's: the 502
    names the host that failed (before: the runtime's, which answers)."""
    _, proxy = real_hosts
    proxy.hosts[f"{CONTROL_PLANE}:443"] = "127.0.0.1:1"  # nothing listens there
    with pytest.raises(InternalServerError) as failed:
        await client.beta.agents.retrieve("agent_bdrk_1")
    assert failed.value.status_code == 502
    assert f"at {CONTROL_PLANE}:443" in str(failed.value) and RUNTIME not in str(failed.value)
    message = await client.messages.create(model=CLAUDE, max_tokens=50, messages=MESSAGES)
    assert message.content[0].text == "tok0 tok1 tok2 "  # type: ignore[union-attr]
