"""Through an outbound proxy (HTTPS_PROXY, HTTP_PROXY, NO_PROXY): the wire, then the gateway.

A real forward proxy on loopback (tests/support/connect_proxy.py) between the wire and real
servers: https origins over a CONNECT tunnel with TLS verified inside it (a self-signed
certificate trusted through SSL_CERT_FILE, as a corporate CA is), http origins forwarded in
absolute form.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import aiohttp.web
import pytest
from aiohappyeyeballs import AddrInfoType
from aiohttp.test_utils import TestClient, TestServer
from openai import AsyncOpenAI
from yarl import URL

from proxy.app import build_app
from proxy.settings import Settings
from proxy.upstream.egress import Egress
from proxy.upstream.wire import Wire
from tests.app.test_wire import GATE, app
from tests.conftest import OPENAI_REAL, OPENAI_VK, auth, keys_document
from tests.support.certificates import self_signed
from tests.support.connect_proxy import ConnectProxy
from tests.support.fake_provider import build_fake_provider
from tests.support.processes import free_port
from tests.support.raw_servers import RawServer

Serve = Callable[..., Awaitable[TestServer]]
PASSWORD = "s3cr@t:pw"  # percent-encoded in the URL: s3cr%40t%3Apw
USERINFO = "egress:s3cr%40t%3Apw@"


@pytest.fixture
def certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    """A server context for 127.0.0.1, its certificate trusted as SSL_CERT_FILE makes it."""
    cert, context = self_signed(tmp_path, "cert", "IP:127.0.0.1,DNS:localhost")
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # read by each new default context
    return context


@pytest.fixture
async def proxy() -> AsyncIterator[ConnectProxy]:
    async with ConnectProxy() as started:
        yield started


@pytest.fixture
async def guarded() -> AsyncIterator[ConnectProxy]:
    """A proxy that asks for credentials."""
    async with ConnectProxy(credentials=f"egress:{PASSWORD}") as started:
        yield started


async def _read(reply: object) -> dict[str, object]:
    data: dict[str, object] = json.loads(await reply.read())  # type: ignore[attr-defined]
    return data


# --- https: a CONNECT tunnel, TLS to the origin inside it ---


async def test_https_goes_through_a_connect_tunnel_with_tls_verified_inside(
    aiohttp_server: Serve, certificate: ssl.SSLContext, proxy: ConnectProxy
) -> None:
    server = await aiohttp_server(app(), ssl=certificate)
    wire = Wire(connect_timeout=2.0, egress=Egress.of({"https": proxy.url()}))
    try:
        reply = await wire.request("POST", server.make_url("/echo"), {"X-A": "1"}, b"hi")
        seen = await _read(reply)
    finally:
        await wire.close()
    assert reply.status == 200 and seen["body"] == "hi"
    assert proxy.connects == [f"127.0.0.1:{server.port}"]
    assert proxy.authorizations == [None]  # no credentials in the URL: none sent


async def test_the_tunnel_carries_a_stream_chunk_by_chunk(
    aiohttp_server: Serve, certificate: ssl.SSLContext, proxy: ConnectProxy
) -> None:
    application = app()
    server = await aiohttp_server(application, ssl=certificate)
    wire = Wire(connect_timeout=2.0, egress=Egress.of({"https": proxy.url()}))
    try:
        reply = await wire.request("GET", server.make_url("/stream"), {}, None)
        events = []
        for _ in range(5):  # the server writes the next event only after we read this one
            events.append(await asyncio.wait_for(reply.content.readany(), 5))
            await application[GATE].put(None)
        assert await reply.content.readany() == b""
    finally:
        await wire.close()
    assert events == [f"data: {n}\n\n".encode() for n in range(5)]


async def test_a_tunnel_is_kept_alive_and_reused(
    aiohttp_server: Serve, certificate: ssl.SSLContext, proxy: ConnectProxy
) -> None:
    server = await aiohttp_server(app(), ssl=certificate)
    wire = Wire(connect_timeout=2.0, egress=Egress.of({"https": proxy.url()}))
    try:
        ports = []
        for _ in range(3):
            reply = await wire.request("GET", server.make_url("/peer"), {}, None)
            ports.append(await reply.read())
    finally:
        await wire.close()
    assert len(proxy.connects) == 1 and proxy.connections == 1
    assert len(set(ports)) == 1


async def test_credentials_in_the_proxy_url_are_sent_percent_decoded(
    aiohttp_server: Serve, certificate: ssl.SSLContext, guarded: ConnectProxy
) -> None:
    server = await aiohttp_server(app(), ssl=certificate)
    wire = Wire(connect_timeout=2.0, egress=Egress.of({"https": guarded.url(USERINFO)}))
    try:
        reply = await wire.request("GET", server.make_url("/echo"), {}, None)
        seen = await _read(reply)
    finally:
        await wire.close()
    assert reply.status == 200
    assert "Proxy-Authorization" not in seen["headers"]  # type: ignore[operator]
    assert guarded.connects == [f"127.0.0.1:{server.port}"]


async def test_a_proxy_refusing_the_tunnel_fails_the_connect_naming_its_status(
    aiohttp_server: Serve, certificate: ssl.SSLContext, guarded: ConnectProxy
) -> None:
    server = await aiohttp_server(app(), ssl=certificate)
    wrong = Wire(connect_timeout=2.0, egress=Egress.of({"https": guarded.url("egress:nope@")}))
    try:
        with pytest.raises(aiohttp.ClientProxyConnectionError) as refused:
            await wrong.request("GET", server.make_url("/echo"), {}, None)
    finally:
        await wrong.close()
    assert "407 Proxy Authentication Required" in refused.value.os_error.strerror
    assert "nope" not in str(refused.value) and "egress" not in str(refused.value)


SQUID_PAGE = b"<html><body>ERR_CACHE_ACCESS_DENIED: Cache Access Denied.</body></html>"


@pytest.mark.parametrize(
    ("status", "said"),
    [
        (b"407 Proxy Authentication Required", "407 Proxy Authentication Required"),
        (b"403 Forbidden", "403 Forbidden"),
    ],
)
async def test_a_proxy_refusing_the_tunnel_with_an_error_page_is_named_by_its_status(
    status: bytes, said: str
) -> None:
    """Squid (and tinyproxy) refuse a CONNECT with an HTML page after the head, in one
    write: before, that page was taken for bytes past a tunnel, and the error said so, not
    that the proxy refused (its credentials, its rules)."""

    async def refusing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 " + status + b"\r\nServer: squid\r\nContent-Type: text/html\r\n"
            b"Content-Length: " + str(len(SQUID_PAGE)).encode() + b"\r\n\r\n" + SQUID_PAGE
        )
        await reader.read()

    async with await RawServer.start(refusing, "127.0.0.1", 0) as squid:
        port = squid.sockets[0].getsockname()[1]
        wire = Wire(connect_timeout=2.0, egress=Egress.of({"https": f"http://127.0.0.1:{port}"}))
        try:
            with pytest.raises(aiohttp.ClientProxyConnectionError) as refused:
                await wire.request("GET", URL("https://127.0.0.1:9/v1/models"), {}, None)
        finally:
            await wire.close()
    assert f"it refused the tunnel ({said})" in refused.value.os_error.strerror


async def test_no_proxy_names_the_hosts_reached_directly(
    aiohttp_server: Serve, certificate: ssl.SSLContext, proxy: ConnectProxy
) -> None:
    server = await aiohttp_server(app(), ssl=certificate)
    for no_proxy in ("127.0.0.1", "example.com, 127.0.0.0/8", "*", f"127.0.0.1:{server.port}"):
        wire = Wire(connect_timeout=2.0, egress=Egress.of({"https": proxy.url(), "no": no_proxy}))
        try:
            reply = await wire.request("GET", server.make_url("/echo"), {}, None)
            assert reply.status == 200
            await reply.read()
        finally:
            await wire.close()
    assert proxy.connections == 0


async def test_a_proxy_that_is_down_fails_the_connect(
    aiohttp_server: Serve, certificate: ssl.SSLContext
) -> None:
    server = await aiohttp_server(app(), ssl=certificate)
    down = f"http://127.0.0.1:{free_port()}"
    wire = Wire(connect_timeout=2.0, egress=Egress.of({"https": down}))
    try:
        with pytest.raises(aiohttp.ClientProxyConnectionError) as failed:
            await wire.request("GET", server.make_url("/echo"), {}, None)
    finally:
        await wire.close()
    assert "could not connect" in failed.value.os_error.strerror


@pytest.mark.parametrize(
    ("code", "said"),
    [
        (socket.EAI_NONAME, "its host name was not found"),
        # the resolver down, not the name unknown: said so (before: "not found" for both)
        (socket.EAI_AGAIN, "the DNS lookup of its host name failed (Temporary failure"),
    ],
)
async def test_a_proxy_whose_name_does_not_resolve_says_why(code: int, said: str) -> None:
    async def resolve(host: str, port: int) -> list[AddrInfoType]:
        assert host == "proxy.corp"
        words = "Temporary failure in name resolution" if code == socket.EAI_AGAIN else "no"
        raise socket.gaierror(code, words)

    wire = Wire(
        connect_timeout=2.0, egress=Egress.of({"https": "http://proxy.corp:3128"}), resolve=resolve
    )
    try:
        with pytest.raises(aiohttp.ClientProxyConnectionError) as failed:
            await wire.request("GET", URL("https://api.example.com/v1/models"), {}, None)
    finally:
        await wire.close()
    assert said in failed.value.os_error.strerror


# --- http: absolute-form requests to the proxy ---


async def test_http_is_forwarded_in_absolute_form_on_a_kept_connection(
    aiohttp_server: Serve, guarded: ConnectProxy
) -> None:
    application = app()
    server = await aiohttp_server(application)
    wire = Wire(connect_timeout=2.0, egress=Egress.of({"http": guarded.url(USERINFO)}))
    try:
        first = await _read(await wire.request("POST", server.make_url("/echo"), {}, b"one"))
        reply = await wire.request("GET", server.make_url("/stream"), {}, None)
        events = []
        for _ in range(5):
            events.append(await asyncio.wait_for(reply.content.readany(), 5))
            await application[GATE].put(None)
        assert await reply.content.readany() == b""
    finally:
        await wire.close()
    assert first["body"] == "one"
    assert "Proxy-Authorization" not in first["headers"]  # type: ignore[operator]
    assert events == [f"data: {n}\n\n".encode() for n in range(5)]
    origin = f"http://127.0.0.1:{server.port}"
    assert guarded.forwarded == [f"{origin}/echo", f"{origin}/stream"]
    assert guarded.connections == 1 and guarded.connects == []


async def test_an_https_proxy_only_leaves_http_origins_direct(
    aiohttp_server: Serve, proxy: ConnectProxy
) -> None:
    server = await aiohttp_server(app())
    wire = Wire(connect_timeout=2.0, egress=Egress.of({"https": proxy.url()}))
    try:
        reply = await wire.request("GET", server.make_url("/echo"), {}, None)
        await reply.read()
    finally:
        await wire.close()
    assert reply.status == 200 and proxy.connections == 0


# --- the gateway ---


@pytest.fixture
async def tls_provider(aiohttp_server: Serve, certificate: ssl.SSLContext) -> TestServer:
    return await aiohttp_server(build_fake_provider(), ssl=certificate)


@pytest.fixture
def gateway_via(
    tmp_path: Path,
    tls_provider: TestServer,
    aiohttp_client: Callable[..., Awaitable[TestClient]],
) -> Callable[..., Awaitable[TestClient]]:
    """A gateway whose providers are the TLS fake provider, with these settings."""

    async def make(**env: str) -> TestClient:
        keys = tmp_path / "keys.json"
        keys.write_text(json.dumps(keys_document(str(tls_provider.make_url("")).rstrip("/"))))
        log = tmp_path / "interactions.jsonl"
        base = {"KEYS_FILE_PATH": str(keys), "LOG_TO_FILE": "true", "LOG_FILE_PATH": str(log)}
        settings = Settings.from_env({**base, **env})
        return await aiohttp_client(build_app(settings))

    return make


async def test_the_openai_sdk_through_the_gateway_and_the_proxy(
    gateway_via: Callable[..., Awaitable[TestClient]], guarded: ConnectProxy
) -> None:
    gateway = await gateway_via(HTTPS_PROXY=guarded.url(USERINFO))
    client = AsyncOpenAI(base_url=str(gateway.make_url("/v1")), api_key=OPENAI_VK, max_retries=0)
    try:
        answer = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        texts = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices]
    finally:
        await client.close()
    assert answer.choices[0].message.content
    assert "".join(text or "" for text in texts)
    assert len(guarded.connects) == 1  # both requests on one tunnel


async def test_a_refusing_proxy_is_a_502_that_names_it_without_its_credentials(
    gateway_via: Callable[..., Awaitable[TestClient]],
    guarded: ConnectProxy,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.DEBUG)
    gateway = await gateway_via(HTTPS_PROXY=guarded.url("egress:wrong-pass-42@"))
    response = await gateway.post(
        "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        headers=auth(OPENAI_VK),
    )
    text = await response.text()
    assert response.status == 502, text
    body = json.loads(text)
    assert body["error"]["code"] == "upstream_unreachable"
    assert f"127.0.0.1:{guarded.port}" in body["error"]["message"]
    assert "407" in body["error"]["message"]
    await gateway.close()  # the interaction log written whole
    said = text + caplog.text + (tmp_path / "interactions.jsonl").read_text()
    for secret in ("wrong-pass-42", "ZWdyZXNz", "egress:", OPENAI_REAL):
        assert secret not in said


async def test_a_proxy_that_is_down_is_a_502(
    gateway_via: Callable[..., Awaitable[TestClient]],
) -> None:
    gateway = await gateway_via(HTTPS_PROXY=f"http://127.0.0.1:{free_port()}")
    response = await gateway.post(
        "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        headers=auth(OPENAI_VK),
    )
    body = await response.json()
    assert response.status == 502
    assert body["error"]["code"] == "upstream_unreachable"
    assert "outbound proxy" in body["error"]["message"]


async def test_the_gateway_forwards_http_providers_through_http_proxy(
    gateway_with_keys: Callable[..., Awaitable[TestClient]], proxy: ConnectProxy, fake_base: str
) -> None:
    gateway = await gateway_with_keys({}, HTTP_PROXY=proxy.url())
    response = await gateway.post(
        "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        headers=auth(OPENAI_VK),
    )
    assert response.status == 200, await response.text()
    assert proxy.forwarded == [f"{fake_base}/v1/chat/completions"]


def test_an_https_proxy_url_is_refused_at_start() -> None:
    from proxy.settings import SettingError

    with pytest.raises(SettingError, match="HTTPS_PROXY: .*plain HTTP only") as refused:
        Settings.from_env({"HTTPS_PROXY": "https://user:hunter2@proxy.corp:3128"})
    assert "hunter2" not in str(refused.value)


async def test_a_realtime_session_goes_through_the_proxy_too(
    gateway_with_keys: Callable[..., Awaitable[TestClient]], guarded: ConnectProxy, fake_base: str
) -> None:
    gateway = await gateway_with_keys({}, HTTP_PROXY=guarded.url(USERINFO))
    ws = await gateway.ws_connect(
        "/v1/realtime?model=gpt-realtime", headers=auth(OPENAI_VK), protocols=["realtime"]
    )
    try:
        created = await asyncio.wait_for(ws.receive_json(), 5)
        await ws.send_str("through the proxy")
        echoed = await asyncio.wait_for(ws.receive_str(), 5)
    finally:
        await ws.close()
    assert created["type"] == "session.created" and echoed == "through the proxy"
    assert guarded.forwarded == [f"{fake_base}/v1/realtime?model=gpt-realtime"]


async def test_a_realtime_session_no_proxy_names_goes_directly(
    gateway_with_keys: Callable[..., Awaitable[TestClient]], proxy: ConnectProxy
) -> None:
    gateway = await gateway_with_keys({}, HTTP_PROXY=proxy.url(), NO_PROXY="127.0.0.1")
    ws = await gateway.ws_connect(
        "/v1/realtime?model=gpt-realtime", headers=auth(OPENAI_VK), protocols=["realtime"]
    )
    try:
        created = await asyncio.wait_for(ws.receive_json(), 5)
    finally:
        await ws.close()
    assert created["type"] == "session.created" and proxy.connections == 0


async def test_a_realtime_session_refused_by_the_proxy_is_a_502_not_its_407(
    gateway_with_keys: Callable[..., Awaitable[TestClient]], guarded: ConnectProxy
) -> None:
    gateway = await gateway_with_keys({}, HTTP_PROXY=guarded.url("egress:wrong-pass-42@"))
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await gateway.ws_connect(
            "/v1/realtime?model=gpt-realtime", headers=auth(OPENAI_VK), protocols=["realtime"]
        )
    assert refused.value.status == 502  # a 407 would ask the client for its own proxy's login


async def test_a_wss_session_asks_the_proxy_for_a_tunnel_with_its_credentials(
    gateway_via: Callable[..., Awaitable[TestClient]], guarded: ConnectProxy
) -> None:
    """aiohttp's TLS context is made at its import, before the test trusts its certificate:
    the session fails after the tunnel, which is what this looks at."""
    for userinfo, tunnels in ((USERINFO, 1), ("egress:wrong-pass-42@", 1)):  # (no new one)
        gateway = await gateway_via(HTTPS_PROXY=guarded.url(userinfo))
        with pytest.raises(aiohttp.WSServerHandshakeError) as failed:
            await gateway.ws_connect(
                "/v1/realtime?model=gpt-realtime", headers=auth(OPENAI_VK), protocols=["realtime"]
            )
        assert failed.value.status == 502
        assert len(guarded.connects) == tunnels
        await gateway.close()
    assert guarded.authorizations[0] == guarded._expected()


def test_a_tunnel_under_uvloop_as_the_gateway_runs_it(certificate: ssl.SSLContext) -> None:
    """uvloop's start_tls and transports, as in production: two requests on one tunnel, and
    a refusal."""
    import uvloop

    async def scenario() -> tuple[list[bytes], ConnectProxy, str]:
        runner = aiohttp.web.AppRunner(app())
        await runner.setup()
        site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0, ssl_context=certificate)
        await site.start()
        url = URL(f"https://127.0.0.1:{runner.addresses[0][1]}/echo")
        async with ConnectProxy(credentials="egress:pw") as proxy:
            wire = Wire(connect_timeout=2.0, egress=Egress.of({"https": proxy.url("egress:pw@")}))
            wrong = Wire(connect_timeout=2.0, egress=Egress.of({"https": proxy.url("egress:x@")}))
            try:
                bodies = []
                for _ in range(2):
                    reply = await wire.request("POST", url, {}, b"hi")
                    bodies.append(await reply.read())
                with pytest.raises(aiohttp.ClientProxyConnectionError) as refused:
                    await wrong.request("GET", url, {}, None)
                return bodies, proxy, refused.value.os_error.strerror
            finally:
                await wire.close()
                await wrong.close()
                await runner.cleanup()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        bodies, proxy, refusal = runner.run(scenario())
    assert all(b'"body": "hi"' in body for body in bodies), bodies
    assert len(proxy.connects) == 1 and "407" in refusal


async def test_an_http_proxy_asking_for_credentials_is_a_502_not_its_407(
    gateway_with_keys: Callable[..., Awaitable[TestClient]], guarded: ConnectProxy
) -> None:
    """Forwarded in absolute form, the proxy's 407 comes as an answer: it is the proxy's, not
    the provider's, and would ask the client for a login to its own proxy."""
    gateway = await gateway_with_keys({}, HTTP_PROXY=guarded.url("egress:wrong-pass-42@"))
    response = await gateway.post(
        "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        headers=auth(OPENAI_VK),
    )
    text = await response.text()
    assert response.status == 502, text
    assert "Proxy-Authenticate" not in response.headers
    body = json.loads(text)
    assert body["error"]["code"] == "upstream_unreachable"
    assert "407" in body["error"]["message"] and "wrong-pass-42" not in text


async def test_a_proxy_that_never_answers_connect_times_out_at_the_connect_timeout(
    aiohttp_server: Serve, certificate: ssl.SSLContext
) -> None:
    accepted = asyncio.Event()
    # Held until the end: Python 3.13 closes a connection whose StreamWriter is collected (the
    # gateway then saw a close, not silence), and 3.12's Server.wait_closed waits for it.
    held: list[asyncio.StreamWriter] = []

    def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        accepted.set()  # takes the connection, reads CONNECT, answers nothing

    mute = await asyncio.start_server(silent, "127.0.0.1", 0)
    server = await aiohttp_server(app(), ssl=certificate)
    proxy_url = f"http://127.0.0.1:{mute.sockets[0].getsockname()[1]}"
    wire = Wire(connect_timeout=0.2, egress=Egress.of({"https": proxy_url}))
    try:
        async with mute:
            try:
                with pytest.raises(aiohttp.ConnectionTimeoutError, match="through the outbound"):
                    request = wire.request("GET", server.make_url("/echo"), {}, None)
                    await asyncio.wait_for(request, 5)
            finally:
                for writer in held:
                    writer.close()
    finally:
        await wire.close()
    assert accepted.is_set()


async def test_the_origins_certificate_is_verified_inside_the_tunnel(
    aiohttp_server: Serve, tmp_path: Path, proxy: ConnectProxy
) -> None:
    """An origin whose certificate nobody trusts is refused through the tunnel as directly."""
    _, context = self_signed(tmp_path, "untrusted", "IP:127.0.0.1")
    server = await aiohttp_server(app(), ssl=context)
    wire = Wire(connect_timeout=2.0, egress=Egress.of({"https": proxy.url()}))
    try:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await wire.request("GET", server.make_url("/echo"), {}, None)
    finally:
        await wire.close()
    assert proxy.connects == [f"127.0.0.1:{server.port}"]
