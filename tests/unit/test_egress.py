"""Which origins go through the outbound proxy: NO_PROXY as curl, requests and httpx read it."""

from __future__ import annotations

import base64

import pytest
from yarl import URL

from proxy.upstream.egress import Egress, Hop, origin_of


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "direct"),
    [
        ("", "api.openai.com", 443, False),
        ("*", "api.openai.com", 443, True),
        ("openai.com", "api.openai.com", 443, True),  # a domain covers its subdomains
        (".openai.com", "api.openai.com", 443, True),  # a leading dot is ignored
        ("openai.com", "notopenai.com", 443, False),  # but not a longer name
        ("API.OpenAI.com", "api.openai.com", 443, True),  # case-blind
        ("example.com, api.openai.com ", "api.openai.com", 443, True),
        ("api.openai.com:8443", "api.openai.com", 443, False),  # another port
        ("api.openai.com:443", "api.openai.com", 443, True),
        ("10.0.0.0/8", "10.1.2.3", 80, True),
        ("10.0.0.0/8", "11.1.2.3", 80, False),
        ("127.0.0.1", "127.0.0.1", 8080, True),
        ("::1", "::1", 443, True),
        ("[::1]:443", "::1", 443, True),
        ("fd00::/8", "fd12::1", 443, True),
        ("10.0.0.0/8", "ten.example", 443, False),  # a range holds addresses, not names
        # Go's form (Docker, kubectl, Terraform write it; Java's nonProxyHosts too): as
        # .corp.internal, where it sent internal hosts to the proxy
        ("*.corp.internal", "llm.corp.internal", 443, True),
        ("*.corp.internal", "corp.internal", 443, True),
        ("*.corp.internal", "evilcorp.internal", 443, False),
    ],
)
def test_no_proxy(no_proxy: str, host: str, port: int, direct: bool) -> None:
    egress = Egress.of({"https": "http://proxy:3128", "http": "http://proxy:3128", "no": no_proxy})
    assert egress is not None
    assert (egress.hop(("https", host, port)) is None) is direct


def test_no_proxy_variable_means_no_egress() -> None:
    assert Egress.of({}) is None
    assert Egress.of({"no": "localhost"}) is None


def test_all_proxy_stands_for_either_scheme_the_own_one_first() -> None:
    egress = Egress.of({"all": "http://all:1", "https": "http://secure:2"})
    assert egress is not None
    assert repr(egress.hop(("http", "a", 80))) == "Hop(all:1)"
    assert repr(egress.hop(("https", "a", 443))) == "Hop(secure:2)"


def test_a_hop_shows_its_host_and_port_and_keeps_its_credentials_to_itself() -> None:
    hop = Hop("http://us%40er:p%3Ass@proxy.corp")  # percent-encoded, no port: 80
    assert hop.where == "proxy.corp:80" and "p:ss" not in repr(hop)
    assert hop.authorization == "Basic " + base64.b64encode(b"us@er:p:ss").decode()
    assert (hop.url.scheme, hop.url.host, hop.url.port) == ("http", "proxy.corp", 80)
    assert Hop("proxy.corp:3128").authorization is None  # no scheme: http, as curl reads it
    egress = Egress.of({"https": "http://u:secret@proxy.corp:3128", "no": "a,b"})
    assert (
        egress is not None and egress.describe() == "https via proxy.corp:3128, 2 NO_PROXY entries"
    )


def test_a_websocket_origin_is_its_http_one() -> None:
    assert origin_of(URL("wss://api.openai.com/v1/realtime")) == ("https", "api.openai.com", 443)
    assert origin_of(URL("ws://127.0.0.1:81/x")) == ("http", "127.0.0.1", 81)


def test_the_start_line_names_the_proxy_by_host_and_port_only() -> None:
    from proxy.runtime.start_line import start_line
    from proxy.settings import Settings

    environ = {"HTTPS_PROXY": "http://u:hunter2@proxy.corp:3128", "NO_PROXY": "10.0.0.0/8"}
    line = start_line(Settings.from_env(environ), [])  # type: ignore[arg-type]
    assert line.endswith("1 worker, outbound proxy: https via proxy.corp:3128, 1 NO_PROXY entry")
    assert "hunter2" not in line and "u:" not in line
    assert "proxy" not in start_line(Settings(), [])  # type: ignore[arg-type]
