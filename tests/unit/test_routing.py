"""Routing: /v1 and seed paths map to the provider path; nothing climbs out."""

from __future__ import annotations

import pytest

from proxy.errors import GatewayError
from proxy.upstream.routing import route


@pytest.mark.parametrize(
    ("target", "tail", "query"),
    [
        ("/v1/chat/completions", "chat/completions", ""),
        ("/v1/models/gpt-4o?x=1&y=a%20b", "models/gpt-4o", "x=1&y=a%20b"),
        ("/chat/completions", "chat/completions", ""),
        ("/completions", "completions", ""),
        ("/embeddings", "embeddings", ""),
        ("/messages", "messages", ""),
        ("/models", "models", ""),
        ("/v1/messages/count_tokens", "messages/count_tokens", ""),
        ("/v1/files/file-abc/content", "files/file-abc/content", ""),
        ("/v1/models/", "models/", ""),
    ],
)
def test_proxied_paths_keep_their_tail_and_raw_query(target: str, tail: str, query: str) -> None:
    assert route(target) == (tail, query)


@pytest.mark.parametrize(
    "target",
    [
        "/v1/../admin",
        "/v1/chat/../../x",
        "/v1/%2e%2e/x",
        "/v1/%2E%2E/x",
        "/v1/a%2Fb",
        "/v1/a%5cb",
        "/v1/a\\b",
        "/v1/./models",
        "/v1//evil.example/x",
        "/v1/http://evil.example/x",
        "http://evil.example/v1/models",
        "//evil.example/v1/models",
        "/v1/a%00b",
    ],
)
def test_paths_that_could_leave_the_base_url_get_400(target: str) -> None:
    with pytest.raises(GatewayError) as refused:
        route(target)
    assert refused.value.status == 400 and refused.value.code == "invalid_path"


@pytest.mark.parametrize("target", ["/", "/admin", "/v1", "/v1/", "/v2/chat/completions", "/chatx"])
def test_paths_that_are_not_proxied_get_404(target: str) -> None:
    with pytest.raises(GatewayError) as refused:
        route(target)
    assert refused.value.status == 404


@pytest.mark.parametrize(
    "target",
    ["/v1/http://evil.example/x", "/v1/models/https://evil.example", "/v1/a/ftp:%2f%2fevil"],
)
def test_an_absolute_url_in_the_path_is_called_one(target: str) -> None:
    with pytest.raises(GatewayError) as refused:
        route(target)
    assert "an absolute URL" in refused.value.message


@pytest.mark.parametrize(
    "target", ["/v1/chat%0a/completions", "/v1/a%0D%0Ab", "/v1/x%7f", "/v1/a\tb"]
)
def test_a_control_character_in_the_path_gets_400(target: str) -> None:
    with pytest.raises(GatewayError) as refused:
        route(target)
    assert refused.value.status == 400 and "control character" in refused.value.message


def test_a_path_starting_with_two_slashes_says_how_a_base_url_makes_one() -> None:
    # GATEWAY_URL=http://localhost:8080/ joined to /v1: refused (it names a host, "v1"),
    # with a message a newcomer can act on rather than "an absolute URL" alone
    with pytest.raises(GatewayError) as refused:
        route("//v1/chat/completions")
    assert refused.value.status == 400 and refused.value.code == "invalid_path"
    assert "'//'" in str(refused.value) and "ending in '/'" in str(refused.value)


@pytest.mark.parametrize(
    "target",
    ["/v1/..;/admin", "/v1/models/..;x/y", "/v1/%2e%2e;/x", "/v1/.;/models", "/v1/;x/models"],
)
def test_a_dot_segment_with_parameters_gets_400(target: str) -> None:
    # Servlet containers (Tomcat, Jetty, Spring) drop a segment's ';' parameters before they
    # resolve dot segments: '..;' climbs there as '..' does.
    with pytest.raises(GatewayError) as refused:
        route(target)
    assert refused.value.status == 400 and refused.value.code == "invalid_path"


def test_parameters_on_an_ordinary_segment_pass() -> None:
    assert route("/v1/models;v=2/gpt-4o") == ("models;v=2/gpt-4o", "")


@pytest.mark.parametrize(
    ("target", "tail"),
    [
        ("/v1/realtime/client_secret%73", "realtime/client_secrets"),
        ("/v1/%62atches?x=%61", "batches"),
        ("/v1/models/gpt-4o%2Dmini%7e1", "models/gpt-4o-mini~1"),
        ("/v1/files/a%2Fb%3Ac%25", None),  # reserved characters stay encoded (and %2F refused)
        ("/v1/models/a%3Ab%20c%25d", "models/a%3Ab%20c%25d"),
    ],
)
def test_percent_encoded_unreserved_characters_are_decoded(target: str, tail: str | None) -> None:
    # RFC 3986 §6.2.2.2: '%73' and 's' name the same path. The provider decodes them before
    # it routes; the gateway's checks by path (client secrets, batches, an endpoint's default
    # model) must read the path the provider will.
    if tail is None:
        with pytest.raises(GatewayError):
            route(target)
        return
    assert route(target)[0] == tail


@pytest.mark.parametrize(
    ("target", "prefix"),
    [
        ("/llm/v1/chat/completions", "/llm"),
        ("/api/gateway/v1/messages?beta=true", "/api/gateway"),
    ],
)
def test_a_path_prefix_a_proxy_left_on_is_named_in_the_404(target: str, prefix: str) -> None:
    # Behind a proxy that mounts the gateway under a prefix without stripping it, every
    # call is a 404: it names the prefix and what to do about it.
    with pytest.raises(GatewayError) as refused:
        route(target)
    assert refused.value.status == 404 and refused.value.code == "unknown_route"
    assert f"'{prefix}'" in refused.value.message and "strip" in refused.value.message


def test_a_404_without_a_proxied_path_inside_names_no_prefix() -> None:
    for target in ("/v2/chat/completions", "/llm/v1", "/llm/chat/completions"):
        with pytest.raises(GatewayError) as refused:
            route(target)
        assert "prefix" not in refused.value.message, target
