"""TLS to providers: whom the gateway trusts, and what its 502 says when it does not.

An internal provider with a private CA is trusted through SSL_CERT_FILE, as OpenSSL (and so
Python's ssl, curl) reads it. A certificate refused, or TLS that fails, is a 502 in the
client's dialect that says which: a name the certificate is not for, an authority nobody
trusts, a server that does not speak TLS at all, one that requires a client certificate.
Real TLS servers on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from proxy.app import build_app
from proxy.settings import Settings
from proxy.upstream.described import described
from proxy.upstream.wire import Wire
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


@pytest.mark.parametrize(
    ("version", "says"),
    [
        # TLS 1.3: the client's side ends before the server reads its (empty) certificate,
        # so the refusal came where the answer should: "closed the connection before
        # answering", as if the provider had dropped the request.
        (
            ssl.TLSVersion.TLSv1_3,
            "TLS failed: the provider requires a client certificate, which the gateway "
            "does not present (TLSV13_ALERT_CERTIFICATE_REQUIRED)",
        ),
        (
            ssl.TLSVersion.TLSv1_2,
            "TLS failed: the provider refused the handshake (SSLV3_ALERT_HANDSHAKE_FAILURE: "
            "it may require a client certificate, which the gateway does not present)",
        ),
    ],
)
async def test_a_provider_requiring_a_client_certificate_is_said_to_refuse_the_handshake(
    gateway: Gateway,
    authority: Authority,
    monkeypatch: pytest.MonkeyPatch,
    version: ssl.TLSVersion,
    says: str,
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(authority.path))
    context = authority.serve("127.0.0.1")
    context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: the gateway presents no certificate
    context.load_verify_locations(authority.path)
    context.minimum_version = context.maximum_version = version
    with MutualTLS(context) as provider:
        client = await gateway(f"https://127.0.0.1:{provider.port}")
        message = await _refusal(client)
        assert message == f"Provider 'openai' at 127.0.0.1:{provider.port}: {says}."
        records = await client.get("/health")
        health = await records.json()
        assert health["providers"]["openai"]["last_error"].endswith(says)
    assert provider.refused, "the provider refused the handshake itself"


async def test_a_post_refused_by_mutual_tls_goes_on_to_the_fallback_uncharged(
    aiohttp_server: Serve,
    tmp_path: Path,
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    authority: Authority,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The request was written before TLS 1.3's refusal came: taken for a POST the provider
    # may be running, it was never sent to the fallback, and was charged its reservation.
    monkeypatch.setenv("SSL_CERT_FILE", str(authority.path))
    context = authority.serve("127.0.0.1")
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(authority.path)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    fallback = await aiohttp_server(build_fake_provider())
    with MutualTLS(context) as provider:
        keys = tmp_path / "keys.json"
        keys.write_text(
            json.dumps(
                {
                    "providers": {
                        "mtls": {"base_url": f"https://127.0.0.1:{provider.port}/v1"},
                        "backup": {"base_url": str(fallback.make_url("/v1"))},
                    },
                    "virtual_keys": {
                        OPENAI_VK: {
                            "provider": "mtls",
                            "api_key": "sk-mtls",
                            "fallbacks": [{"provider": "backup", "api_key": "sk-backup"}],
                        }
                    },
                }
            )
        )
        settings = Settings.from_env({"KEYS_FILE_PATH": str(keys)})
        client = await aiohttp_client(build_app(settings))
        response = await client.post("/v1/chat/completions", json=CHAT, headers=auth(OPENAI_VK))
        assert response.status == 200, await response.text()
        assert response.headers["x-ratelimit-remaining-requests"] == "99"  # counted once
        usage = await (await client.get("/usage", headers=auth(OPENAI_VK))).json()
        assert usage["totals"]["tokens"] == (await response.json())["usage"]["total_tokens"]


def test_mutual_tls_refused_under_uvloop_as_the_gateway_runs_it(
    authority: Authority, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvloop's TLS transport, as in production: the alert in place of the answer is TLS's."""
    import uvloop

    monkeypatch.setenv("SSL_CERT_FILE", str(authority.path))
    context = authority.serve("127.0.0.1")
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(authority.path)
    context.minimum_version = ssl.TLSVersion.TLSv1_3

    async def scenario(port: int) -> aiohttp.ClientError:
        wire = Wire(connect_timeout=2.0)
        try:
            with pytest.raises(aiohttp.ClientSSLError) as refused:
                await wire.request("POST", URL(f"https://127.0.0.1:{port}/v1/chat"), {}, b"{}")
            return refused.value
        finally:
            await wire.close()

    with MutualTLS(context) as provider, asyncio.Runner(loop_factory=uvloop.new_event_loop) as run:
        error = run.run(scenario(provider.port))
    assert "requires a client certificate" in described(error), described(error)


class MutualTLS:
    """A TLS server that requires a client certificate, as a provider behind mutual TLS does:
    blocking `ssl` in a thread, so its refusal (an alert) is written before it closes (an
    asyncio server drops the alert with the connection). It half-closes after the alert and
    reads what comes until the client closes, so the client reads the alert, not a reset."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.refused: list[str] = []  # OpenSSL's reason on the server's side, per connection
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> MutualTLS:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._listener.close()
        self._thread.join(5)

    def _serve(self) -> None:
        while True:
            try:
                accepted, _ = self._listener.accept()
            except OSError:
                return  # closed: the test is over
            with self._context.wrap_socket(
                accepted, server_side=True, do_handshake_on_connect=False
            ) as tls:
                tls.settimeout(5)
                try:
                    tls.do_handshake()
                    tls.recv(1)  # TLS 1.3: the client's certificate is read with its data
                except ssl.SSLError as error:
                    self.refused.append(str(error.reason))
                except OSError:
                    continue
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(tls, socket.SHUT_WR)
                    while socket.socket.recv(tls, 65536):
                        pass
