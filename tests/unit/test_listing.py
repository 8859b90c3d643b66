"""A restricted key's model list, filtered to its models (proxy/relay/listing.py)."""

from __future__ import annotations

import gzip
from typing import Any

import orjson
import pytest
from multidict import CIMultiDict

from proxy.keys.keys import Defaults, KeyRing, VirtualKey
from proxy.relay.listing import ModelList

DEFAULTS = Defaults(quota_enabled=True, requests=100, tokens=None, window_seconds=3600.0)
ANTHROPIC_PAGE = {
    "data": [
        {"id": "claude-opus-4-1", "type": "model"},
        {"id": "claude-sonnet-4-5", "type": "model"},
        {"id": "claude-3-5-haiku-latest", "type": "model"},
        {"id": "claude-3-haiku-20240307", "type": "model"},
    ],
    "has_more": True,
    "first_id": "claude-opus-4-1",
    "last_id": "claude-3-haiku-20240307",
}


def key(entry: dict[str, Any], providers: dict[str, Any] | None = None) -> VirtualKey:
    document: dict[str, Any] = {"virtual_keys": {"vk_test_listing_0a1b2c3d4e": entry}}
    if providers is not None:
        document["providers"] = providers
    ring = KeyRing.from_document("keys.json", document, "digest", {}, DEFAULTS)
    return ring.key_for("vk_test_listing_0a1b2c3d4e")


RESTRICTED = key(
    {
        "provider": "anthropic",
        "api_key": "sk-ant-real-listing-1111111111",
        "allowed_models": ["claude-sonnet-4-*", "claude-3-5-haiku-*"],
    }
)


GEMINI = key(
    {"provider": "google-ai", "api_key": "real-google-listing-1", "allowed_models": ["gemini-*"]},
    {
        "google-ai": {
            "base_url": "https://generativelanguage.googleapis.com/v1beta",
            "auth": "x-goog-api-key",
        }
    },
)


def listing(of: VirtualKey = RESTRICTED, tail: str = "models", query: str = "") -> ModelList:
    found = of_list(of, "GET", tail, query)
    assert found is not None
    return found


def of_list(of: VirtualKey, method: str, tail: str, query: str = "") -> ModelList | None:
    return ModelList.of(of, method, tail, query, of.plans.choose(None))


def test_the_cursors_name_the_first_and_last_model_kept_and_has_more_stays() -> None:
    headers = CIMultiDict({"content-length": "1", "etag": '"abc"'})
    filtered = orjson.loads(listing()(orjson.dumps(ANTHROPIC_PAGE), headers))
    assert [model["id"] for model in filtered["data"]] == [
        "claude-sonnet-4-5",
        "claude-3-5-haiku-latest",
    ]
    assert (filtered["first_id"], filtered["last_id"], filtered["has_more"]) == (
        "claude-sonnet-4-5",
        "claude-3-5-haiku-latest",
        True,
    )
    assert "content-length" not in headers and "etag" not in headers


def test_a_list_with_nothing_to_leave_out_goes_as_it_came() -> None:
    everything = key(
        {"provider": "openai", "api_key": "sk-real-listing-2", "allowed_models": ["*"]}
    )
    page = gzip.compress(orjson.dumps({"object": "list", "data": [{"id": "gpt-4o"}]}))
    headers = CIMultiDict({"content-encoding": "gzip"})
    assert listing(everything)(page, headers) == page
    assert headers["content-encoding"] == "gzip"


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'["claude-opus-4-1"]',
        b'{"object": "model", "id": "claude-opus-4-1"}',
        gzip.compress(b'{"data": []}', mtime=0)[:-4],  # a cut gzip body: corrupt
    ],
    ids=["not-json", "an-array", "one-model", "corrupt-gzip"],
)
def test_what_is_no_model_list_goes_as_it_came(body: bytes) -> None:
    headers = CIMultiDict({"content-encoding": "gzip"} if body[:2] == b"\x1f\x8b" else {})
    assert listing()(body, headers) == body


def test_an_entry_without_a_string_id_is_left_out() -> None:
    page = {"data": [{"id": "claude-sonnet-4-5"}, {"id": 7}, "claude-3-5-haiku-latest"]}
    filtered = orjson.loads(listing()(orjson.dumps(page), CIMultiDict()))
    assert filtered == {"data": [{"id": "claude-sonnet-4-5"}]}


def test_only_a_restricted_keys_get_of_the_model_list_is_filtered() -> None:
    anyone = key({"provider": "openai", "api_key": "sk-real-listing-3"})
    assert of_list(anyone, "GET", "models") is None
    assert of_list(RESTRICTED, "GET", "models/claude-sonnet-4-5") is None
    assert of_list(RESTRICTED, "POST", "models") is None
    assert of_list(RESTRICTED, "GET", "chat/completions") is None
    for tail in ("models", "models/", "openai/models", "openai/v1/models"):
        assert of_list(RESTRICTED, "GET", tail) is not None
    assert ModelList.applies(200, "application/json; charset=utf-8")
    assert ModelList.applies(200, None)
    assert not ModelList.applies(500, "application/json")
    assert not ModelList.applies(200, "text/html")


@pytest.mark.parametrize(
    ("query", "sent"),
    [
        ("", "limit=1000"),
        ("limit=5&after_id=claude-opus-4-1", "limit=1000&after_id=claude-opus-4-1"),
        ("before_id=claude-3-haiku-20240307", "before_id=claude-3-haiku-20240307&limit=1000"),
        ("limit=1000", "limit=1000"),
        # what Anthropic refuses goes as it came, for it to refuse
        ("limit=0", "limit=0"),
        ("limit=5000", "limit=5000"),
        ("limit=five", "limit=five"),
        ("limit=%C2%B2", "limit=%C2%B2"),
        ("limit=1&limit=2", "limit=1&limit=2"),
    ],
)
def test_an_anthropic_list_asks_for_the_largest_page(query: str, sent: str) -> None:
    assert listing(query=query).query == sent


@pytest.mark.parametrize(
    ("query", "sent"),
    [
        ("", "pageSize=1000"),
        ("pageSize=5&pageToken=abc%3D", "pageSize=1000&pageToken=abc%3D"),
        ("page_size=5", "page_size=1000"),
        ("pageSize=0", "pageSize=1000"),  # Google's default page
        ("pageSize=5000", "pageSize=1000"),
        ("pageSize=-1", "pageSize=-1"),
        ("pageSize=1&page_size=2", "pageSize=1&page_size=2"),
    ],
)
def test_a_gemini_native_list_asks_for_the_largest_page(query: str, sent: str) -> None:
    assert listing(GEMINI, query=query).query == sent


def test_an_openai_list_is_asked_as_the_client_asked() -> None:
    openai_style = key(
        {"provider": "openai", "api_key": "sk-real-listing-4", "allowed_models": ["gpt-*"]}
    )
    assert listing(openai_style, query="limit=5").query == "limit=5"
    google_openai = key(
        {"provider": "google-openai", "api_key": "real-google-listing-2", "allowed_models": ["*"]},
        {
            "google-openai": {
                "base_url": "https://generativelanguage.googleapis.com/v1beta/openai/",
                "auth": "x-goog-api-key",
            }
        },
    )
    assert listing(google_openai).query == ""


def test_an_anthropic_page_is_cut_to_the_clients_limit_and_says_there_is_more() -> None:
    page = {**ANTHROPIC_PAGE, "has_more": False}
    forward = orjson.loads(listing(query="limit=1")(orjson.dumps(page), CIMultiDict()))
    assert [model["id"] for model in forward["data"]] == ["claude-sonnet-4-5"]
    assert (forward["first_id"], forward["last_id"], forward["has_more"]) == (
        "claude-sonnet-4-5",
        "claude-sonnet-4-5",
        True,
    )
    backward = listing(query="limit=1&before_id=claude-3-haiku-20240307")
    cut = orjson.loads(backward(orjson.dumps(page), CIMultiDict()))
    assert [model["id"] for model in cut["data"]] == ["claude-3-5-haiku-latest"]
    assert (cut["first_id"], cut["last_id"], cut["has_more"]) == (
        "claude-3-5-haiku-latest",
        "claude-3-5-haiku-latest",
        True,
    )
    everything = key(
        {"provider": "anthropic", "api_key": "sk-ant-real-listing-5", "allowed_models": ["*"]}
    )
    whole = orjson.dumps(page)
    assert listing(everything, query="limit=4")(whole, CIMultiDict()) == whole  # as it came
    cut = orjson.loads(listing(everything, query="limit=3")(whole, CIMultiDict()))
    assert (len(cut["data"]), cut["last_id"], cut["has_more"]) == (
        3,
        "claude-3-5-haiku-latest",
        True,
    )
