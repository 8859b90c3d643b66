"""TLS to providers: whom the gateway trusts, and what its 502 says when it does not.

An internal provider with a private CA is trusted through SSL_CERT_FILE, as OpenSSL (and so
Python's ssl, curl) reads it. A certificate refused, or TLS that fails, is a 502 in the
client's dialect that says which: a name the certificate is not for, an authority nobody
trusts, a server that does not speak TLS at all. Real TLS servers on loopback.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from proxy.app import build_app
from proxy.settings import Settings
from tests.conftest import ANTHROPIC_VK, OPENAI_VK, auth, keys_document
from tests.support.certificates import Authority
from tests.support.fake_provider import build_fake_provider

Serve = Callable[..., Awaitable[TestServer]]
Gateway = Callable[[str], Awaitable[TestClient]]
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    return Authority(tmp_path)


@pytest.fixture
def gateway(tmp_path: Path, aiohttp_client: Callable[..., Awaitable[TestClient]]) -> Gateway:
    """A gateway whose providers are all at `base` (https://127.0.0.1:port, say)."""

    async def make(base: str) -> TestClient:
        keys = tmp_path / "keys.json"
        keys.write_text(json.dumps(keys_document(base)))
        settings = Settings.from_env({"KEYS_FILE_PATH": str(keys), "REQUEST_TIMEOUT": "10"})
        return await aiohttp_client(build_app(settings))

    return make


async def _refusal(gateway: TestClient) -> str:
    response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(OPENAI_VK))
    body = await response.json()
    assert response.status == 502, body
    assert body["error"]["code"] == "upstream_unreachable"
    message: str = body["error"]["message"]
    return message


async def test_a_private_authority_in_ssl_cert_file_is_trusted(
    aiohttp_server: Serve, gateway: Gateway, authority: Authority, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(authority.path))
    provider = await aiohttp_server(build_fake_provider(), ssl=authority.serve("127.0.0.1"))
    client = await gateway(f"https://127.0.0.1:{provider.port}")
    response = await client.post("/v1/chat/completions", json=CHAT, headers=auth(OPENAI_VK))
    assert response.status == 200, await response.text()


async def test_a_certificate_for_another_name_is_refused_saying_so(
    aiohttp_server: Serve, gateway: Gateway, authority: Authority, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trusted authority, wrong name: the 502 says the certificate is not for this host
    (before: "TLS failed (certificate or handshake)", as for every TLS failure)."""
    monkeypatch.setenv("SSL_CERT_FILE", str(authority.path))
    provider = await aiohttp_server(build_fake_provider(), ssl=authority.serve("other.internal"))
    message = await _refusal(await gateway(f"https://127.0.0.1:{provider.port}"))
    assert "certificate" in message and "not valid for '127.0.0.1'" in message, message


async def test_an_untrusted_authority_is_refused_naming_where_to_trust_one(
    aiohttp_server: Serve, gateway: Gateway, authority: Authority, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    provider = await aiohttp_server(build_fake_provider(), ssl=authority.serve("127.0.0.1"))
    message = await _refusal(await gateway(f"https://127.0.0.1:{provider.port}"))
    assert "unable to get local issuer certificate" in message, message
    assert "SSL_CERT_FILE" in message


async def test_https_to_a_server_speaking_plain_http_says_so(
    aiohttp_server: Serve, gateway: Gateway
) -> None:
    """A base_url of https:// for a local model server that speaks plain HTTP (vLLM, Ollama)."""
    provider = await aiohttp_server(build_fake_provider())
    client = await gateway(f"https://127.0.0.1:{provider.port}")
    message = await _refusal(client)
    assert "plain HTTP" in message, message
    response = await client.post(  # the Anthropic dialect says the same
        "/v1/messages",
        json={"model": "claude-3-5-haiku-latest", "max_tokens": 5, **CHAT},
        headers={"x-api-key": ANTHROPIC_VK},
    )
    body = await response.json()
    assert response.status == 502 and body["type"] == "error"
    assert "plain HTTP" in body["error"]["message"]
