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


def key(entry: dict[str, Any]) -> VirtualKey:
    document = {"virtual_keys": {"vk_test_listing_0a1b2c3d4e": entry}}
    ring = KeyRing.from_document("keys.json", document, "digest", {}, DEFAULTS)
    return ring.key_for("vk_test_listing_0a1b2c3d4e")


RESTRICTED = key(
    {
        "provider": "anthropic",
        "api_key": "sk-ant-real-listing-1111111111",
        "allowed_models": ["claude-sonnet-4-*", "claude-3-5-haiku-*"],
    }
)


def listing(of: VirtualKey = RESTRICTED, tail: str = "models") -> ModelList:
    found = ModelList.of(of, "GET", tail)
    assert found is not None
    return found


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
    assert ModelList.of(anyone, "GET", "models") is None
    assert ModelList.of(RESTRICTED, "GET", "models/claude-sonnet-4-5") is None
    assert ModelList.of(RESTRICTED, "POST", "models") is None
    assert ModelList.of(RESTRICTED, "GET", "chat/completions") is None
    for tail in ("models", "models/", "openai/models", "openai/v1/models"):
        assert ModelList.of(RESTRICTED, "GET", tail) is not None
    assert ModelList.applies(200, "application/json; charset=utf-8")
    assert ModelList.applies(200, None)
    assert not ModelList.applies(500, "application/json")
    assert not ModelList.applies(200, "text/html")
