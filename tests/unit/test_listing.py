"""A restricted key's model list, filtered to its models (proxy/relay/listing.py)."""

from __future__ import annotations

import gzip
from typing import Any

import orjson
import pytest
from multidict import CIMultiDict

from proxy.keys.keys import Defaults, KeyRing, VirtualKey
from proxy.relay.listing import MOST_PAGES, ModelList

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


async def test_the_cursors_name_the_first_and_last_model_kept_and_has_more_stays() -> None:
    headers = CIMultiDict({"content-length": "1", "etag": '"abc"'})
    filtered = orjson.loads(await listing()(orjson.dumps(ANTHROPIC_PAGE), headers))
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


async def test_a_list_with_nothing_to_leave_out_goes_as_it_came() -> None:
    everything = key(
        {"provider": "openai", "api_key": "sk-real-listing-2", "allowed_models": ["*"]}
    )
    page = gzip.compress(orjson.dumps({"object": "list", "data": [{"id": "gpt-4o"}]}))
    headers = CIMultiDict({"content-encoding": "gzip"})
    assert await listing(everything)(page, headers) == page
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
async def test_what_is_no_model_list_goes_as_it_came(body: bytes) -> None:
    headers = CIMultiDict({"content-encoding": "gzip"} if body[:2] == b"\x1f\x8b" else {})
    assert await listing()(body, headers) == body


async def test_an_entry_without_a_string_id_is_left_out() -> None:
    page = {"data": [{"id": "claude-sonnet-4-5"}, {"id": 7}, "claude-3-5-haiku-latest"]}
    filtered = orjson.loads(await listing()(orjson.dumps(page), CIMultiDict()))
    assert filtered == {"data": [{"id": "claude-sonnet-4-5"}]}


def test_only_a_restricted_keys_get_of_the_model_list_is_filtered() -> None:
    anyone = key({"provider": "openai", "api_key": "sk-real-listing-3"})
    assert of_list(anyone, "GET", "models") is None
    assert of_list(RESTRICTED, "GET", "models/claude-sonnet-4-5") is None
    assert of_list(RESTRICTED, "POST", "models") is None
    assert of_list(RESTRICTED, "HEAD", "models") is not None  # asked as its GET
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


async def test_an_anthropic_page_is_cut_to_the_clients_limit_and_says_there_is_more() -> None:
    page = {**ANTHROPIC_PAGE, "has_more": False}
    forward = orjson.loads(await listing(query="limit=1")(orjson.dumps(page), CIMultiDict()))
    assert [model["id"] for model in forward["data"]] == ["claude-sonnet-4-5"]
    assert (forward["first_id"], forward["last_id"], forward["has_more"]) == (
        "claude-sonnet-4-5",
        "claude-sonnet-4-5",
        True,
    )
    backward = listing(query="limit=1&before_id=claude-3-haiku-20240307")
    cut = orjson.loads(await backward(orjson.dumps(page), CIMultiDict()))
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
    assert await listing(everything, query="limit=4")(whole, CIMultiDict()) == whole  # as it came
    cut = orjson.loads(await listing(everything, query="limit=3")(whole, CIMultiDict()))
    assert (len(cut["data"]), cut["last_id"], cut["has_more"]) == (
        3,
        "claude-3-5-haiku-latest",
        True,
    )


class AnthropicPages:
    """A provider listing `ids` in pages of `size` whatever `limit` it is asked (an
    Anthropic-compatible server's own page), by after_id or before_id; `unread`: the
    follow-up of that number (from 1) is not read; `stuck`: every page is the first."""

    def __init__(self, ids: list[str], size: int, unread: int = 0, stuck: bool = False) -> None:
        self.ids, self.size, self.unread, self.stuck = ids, size, unread, stuck
        self.asked: list[str] = []

    def page(self, after: str | None = None, before: str | None = None) -> dict[str, Any]:
        ids, size = self.ids, self.size
        if before is not None:
            ahead = ids[: ids.index(before)]
            shown, has_more = ahead[-size:], len(ahead) > size
        else:
            rest = ids if after is None or self.stuck else ids[ids.index(after) + 1 :]
            shown, has_more = rest[:size], len(rest) > size
        return {
            "data": [{"id": model, "type": "model"} for model in shown],
            "has_more": has_more,
            "first_id": shown[0] if shown else None,
            "last_id": shown[-1] if shown else None,
        }

    async def __call__(self, query: str) -> dict[str, Any] | None:
        self.asked.append(query)
        if len(self.asked) == self.unread:
            return None
        asked = dict(item.partition("=")[::2] for item in query.split("&"))
        return self.page(asked.get("after_id"), asked.get("before_id"))


OLDER = [f"claude-2-{index:02d}" for index in range(40)]  # none the key's
NEWER = ["claude-sonnet-4-5", "claude-3-5-haiku-latest"]


async def test_the_providers_pages_are_gathered_until_the_clients_page_is_full() -> None:
    provider = AnthropicPages([*OLDER[:7], "claude-sonnet-4-5", *OLDER[7:20], *NEWER[1:]], 3)
    answer = await listing(query="limit=2")(orjson.dumps(provider.page()), CIMultiDict(), provider)
    filtered = orjson.loads(answer)
    assert [model["id"] for model in filtered["data"]] == NEWER
    assert (filtered["first_id"], filtered["last_id"], filtered["has_more"]) == (
        "claude-sonnet-4-5",
        "claude-3-5-haiku-latest",
        False,
    )
    # each page asked on from the last model of the one before, with the first's query
    assert provider.asked[:2] == [
        "limit=1000&after_id=claude-2-02",
        "limit=1000&after_id=claude-2-05",
    ]
    assert len(provider.asked) == 8 - 1  # 22 models in pages of 3, the first asked by the relay


async def test_gathering_stops_at_most_pages_and_the_cursor_names_where_it_stopped() -> None:
    provider = AnthropicPages([*OLDER, *NEWER], 3)
    first = orjson.dumps(provider.page())
    filtered = orjson.loads(await listing()(first, CIMultiDict(), provider))
    assert len(provider.asked) == MOST_PAGES - 1
    # Nothing of the key's in the 30 models read; paging on from claude-2-29 skips nothing.
    assert filtered["data"] == []
    assert (filtered["first_id"], filtered["last_id"], filtered["has_more"]) == (
        None,
        "claude-2-29",
        True,
    )
    following = listing(query="after_id=claude-2-29")
    filtered = orjson.loads(
        await following(orjson.dumps(provider.page("claude-2-29")), CIMultiDict(), provider)
    )
    assert [model["id"] for model in filtered["data"]] == NEWER


async def test_gathering_backwards_stops_with_first_id_where_it_stopped() -> None:
    provider = AnthropicPages([*NEWER, *OLDER, "claude-opus-4-1"], 3)
    backward = listing(query="before_id=claude-opus-4-1")
    first = orjson.dumps(provider.page(before="claude-opus-4-1"))
    filtered = orjson.loads(await backward(first, CIMultiDict(), provider))
    assert (filtered["data"], filtered["first_id"], filtered["has_more"]) == (
        [],
        "claude-2-10",
        True,
    )
    assert provider.asked[0] == "before_id=claude-2-37&limit=1000"


async def test_a_page_not_read_ends_the_gathering_where_the_last_read_one_ended() -> None:
    provider = AnthropicPages(
        [*OLDER[:4], "claude-sonnet-4-5", *OLDER[4:], *NEWER[1:]], 3, unread=2
    )
    filtered = orjson.loads(await listing()(orjson.dumps(provider.page()), CIMultiDict(), provider))
    assert [model["id"] for model in filtered["data"]] == ["claude-sonnet-4-5"]
    assert (filtered["first_id"], filtered["last_id"], filtered["has_more"]) == (
        "claude-sonnet-4-5",
        "claude-2-04",  # the page read last ended there: paging on from it skips nothing
        True,
    )


async def test_a_provider_whose_pages_do_not_step_on_is_not_listed_twice() -> None:
    provider = AnthropicPages(["claude-sonnet-4-5", *OLDER, *NEWER[1:]], 3, stuck=True)
    filtered = orjson.loads(await listing()(orjson.dumps(provider.page()), CIMultiDict(), provider))
    assert [model["id"] for model in filtered["data"]] == ["claude-sonnet-4-5"]
    assert len(provider.asked) == 1


class GeminiPages:
    """Gemini's native list of `ids`, in pages of `size`; its tokens the offsets."""

    def __init__(self, ids: list[str], size: int, stuck: bool = False) -> None:
        self.ids, self.size, self.stuck = ids, size, stuck
        self.asked: list[str] = []

    def page(self, token: str = "") -> dict[str, Any]:
        start = 0 if self.stuck or not token else int(token.removeprefix("at/"))
        page: dict[str, Any] = {
            "models": [{"name": f"models/{i}"} for i in self.ids[start : start + self.size]]
        }
        if start + self.size < len(self.ids):
            page["nextPageToken"] = f"at/{start + self.size}"
        return page

    async def __call__(self, query: str) -> dict[str, Any] | None:
        self.asked.append(query)
        asked = dict(item.partition("=")[::2] for item in query.split("&"))
        return self.page(asked.get("pageToken", "").replace("%2F", "/"))


async def test_a_gemini_page_gathers_until_the_clients_page_size_and_ends_on_the_last_token() -> (
    None
):
    ids = [f"older-{index:02d}" for index in range(40)]
    provider = GeminiPages([*ids[:5], "gemini-2.5-pro", *ids[5:], "gemini-2.5-flash"], 4)
    gemini = listing(GEMINI, query="pageSize=2")
    filtered = orjson.loads(await gemini(orjson.dumps(provider.page()), CIMultiDict(), provider))
    # Two models asked: the page stops short after ten of the provider's, its token theirs.
    assert filtered["models"] == [{"name": "models/gemini-2.5-pro"}]
    assert filtered["nextPageToken"] == f"at/{4 * MOST_PAGES}"
    assert provider.asked[0] == "pageSize=1000&pageToken=at%2F4"
    provider = GeminiPages(["gemini-2.5-pro", *ids], 4, stuck=True)
    filtered = orjson.loads(await gemini(orjson.dumps(provider.page()), CIMultiDict(), provider))
    assert filtered["models"] == [{"name": "models/gemini-2.5-pro"}]
    assert len(provider.asked) == 1


def test_a_refused_larger_page_is_asked_again_as_the_client_asked_it_once() -> None:
    anthropic = listing(query="limit=5&after_id=claude-opus-4-1")
    assert anthropic.is_refused(400) and anthropic.is_refused(422)
    assert not anthropic.is_refused(404) and not anthropic.is_refused(500)
    own = anthropic.as_asked()
    assert own.query == "limit=5&after_id=claude-opus-4-1"
    assert not own.is_refused(400)  # its refusal is the client's answer
    assert not listing(query="limit=1000").is_refused(400)  # the client asked that itself
    gemini = listing(GEMINI)
    assert gemini.is_refused(400) and gemini.as_asked().query == ""
    openai_style = key(
        {"provider": "openai", "api_key": "sk-real-listing-6", "allowed_models": ["gpt-*"]}
    )
    assert not listing(openai_style).is_refused(400)  # asked as the client asked
