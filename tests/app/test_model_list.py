"""A restricted key's model list: `GET /v1/models` of a key with `allowed_models` lists only the
models the key may use, in the provider's own shape (OpenAI, Anthropic, Gemini native), as the
official SDKs' `client.models.list()` (and Open WebUI, LibreChat, Cursor...) read it; every other
key gets the provider's bytes as they came."""

from __future__ import annotations

import gzip
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import (
    ANTHROPIC_VK,
    OPENAI_VK,
    RESTRICTED_VK,
    auth,
    keys_document,
)
from tests.support.fake_provider import MODEL_IDS, FakeState, Fault

LISTED_VK = "vk_test_listed_models_1a2b3c4d5e"
ROUTED_VK = "vk_test_routed_models_6f7a8b9c0d"
GEMINI_VK = "vk_test_gemini_models_2b4d6f8a0c"
FALLING_VK = "vk_test_falling_models_3c5e7a9b1d"
NOTHING_VK = "vk_test_nothing_listed_4d6f8a0c2e"
PAGED_VK = "vk_test_paged_models_5e7a9c1b3d"
KEYS: dict[str, dict[str, Any]] = {
    LISTED_VK: {
        "provider": "openai",
        "api_key": "sk-real-listed-1212121212",
        "name": "listed",
        "allowed_models": ["gpt-4o-*", "fake-*"],
    },
    # Routes only: a model no route serves is refused (400), even when allowed_models allows it.
    ROUTED_VK: {
        "name": "routed",
        "allowed_models": ["gpt-*", "fake-*"],
        "routes": [
            {"models": ["gpt-*"], "provider": "openai", "api_key": "sk-real-routed-3434343434"}
        ],
    },
    # The primary refuses (a 503 from the fake for this real key), the fallback lists.
    FALLING_VK: {
        "name": "falling",
        "provider": "openai",
        "api_key": "sk-real-falling-5656565656",
        "fallbacks": [{"provider": "azure", "api_key": "azure-real-falling-7878787878"}],
        "allowed_models": ["gpt-4o-*"],
    },
    NOTHING_VK: {
        "provider": "anthropic",
        "api_key": "sk-ant-real-nothing-9090909090",
        "name": "nothing",
        "allowed_models": ["claude-opus-9-*"],
    },
    # With x-fake-older-models: 45, twelve of the 49 models listed: older-model-000 to -009
    # (the oldest), claude-3-5-haiku-latest and fake-model (the last).
    PAGED_VK: {
        "provider": "anthropic",
        "api_key": "sk-ant-real-paged-1414141414",
        "name": "paged",
        "allowed_models": ["older-model-00?", "claude-*", "fake-*"],
    },
}
# The fake lists this many older models first: three of Anthropic's pages of 20 (its default
# `limit`) and one of Gemini's pages of 50 hold none of a key's newer models.
OLDER = {"x-fake-older-models": "45"}
OLDER_PAGED = [f"older-model-00{index}" for index in range(10)]


@pytest.fixture
async def gateway(gateway_with_keys: Callable[..., Awaitable[TestClient]]) -> TestClient:
    return await gateway_with_keys(KEYS)


def openai_sdk(gateway: TestClient, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(gateway.make_url("/v1")), api_key=key, max_retries=0)


def anthropic_sdk(
    gateway: TestClient, key: str, headers: dict[str, str] | None = None
) -> anthropic.AsyncAnthropic:
    base = str(gateway.make_url(""))
    return anthropic.AsyncAnthropic(
        base_url=base, api_key=key, max_retries=0, default_headers=headers
    )


async def test_the_openai_sdk_lists_only_the_models_a_restricted_key_may_use(
    gateway: TestClient,
) -> None:
    async with openai_sdk(gateway, LISTED_VK) as client:
        listed = [model.id async for model in client.models.list()]
    assert listed == ["gpt-4o-mini", "fake-model"]  # the provider's order, the rest left out


async def test_the_anthropic_sdk_lists_only_the_models_a_restricted_key_may_use(
    gateway: TestClient,
) -> None:
    async with anthropic_sdk(gateway, RESTRICTED_VK) as client:
        page = await client.models.list()
        every = [model.id async for model in client.models.list()]
    assert [model.id for model in page.data] == every == ["claude-3-5-haiku-latest"]
    assert (page.first_id, page.last_id, page.has_more) == (
        "claude-3-5-haiku-latest",
        "claude-3-5-haiku-latest",
        False,
    )


async def test_a_page_left_empty_names_no_cursor(gateway: TestClient) -> None:
    response = await gateway.get(
        "/v1/models", headers={**auth(NOTHING_VK), "anthropic-version": "2023-06-01"}
    )
    assert response.status == 200
    assert await response.json() == {
        "data": [],
        "has_more": False,
        "first_id": None,
        "last_id": None,
    }


async def test_the_anthropic_sdk_finds_a_restricted_keys_models_past_the_providers_first_page(
    gateway: TestClient, fake: FakeState
) -> None:
    # The provider's first page (20, Anthropic's default) holds none of the key's models: an
    # empty page would end the SDK's auto-pager (BasePage.has_next_page: no items, no next).
    async with anthropic_sdk(gateway, RESTRICTED_VK, OLDER) as client:
        listed = [model.id async for model in client.models.list()]
    assert listed == ["claude-3-5-haiku-latest"]
    assert fake.requests[-1].query_string == "limit=1000"  # Anthropic's largest page


async def test_the_anthropic_sdk_pages_a_restricted_keys_models_by_its_own_limit(
    gateway: TestClient, fake: FakeState
) -> None:
    async with anthropic_sdk(gateway, PAGED_VK, OLDER) as client:
        first = await client.models.list(limit=5)
        pages = [[model.id for model in page.data] async for page in first.iter_pages()]
    assert pages == [OLDER_PAGED[:5], OLDER_PAGED[5:], ["claude-3-5-haiku-latest", "fake-model"]]
    assert (first.first_id, first.last_id, first.has_more) == (
        "older-model-000",
        "older-model-004",
        True,
    )
    assert [seen.query_string for seen in fake.requests[-3:]] == [
        "limit=1000",
        "limit=1000&after_id=older-model-004",
        "limit=1000&after_id=older-model-009",
    ]


async def test_the_anthropic_sdk_pages_a_restricted_keys_models_backwards_by_before_id(
    gateway: TestClient,
) -> None:
    async with anthropic_sdk(gateway, PAGED_VK, OLDER) as client:
        first = await client.models.list(before_id="fake-model", limit=5)
        pages = [[model.id for model in page.data] async for page in first.iter_pages()]
    # Each page the five kept models right before the cursor, in the provider's order.
    assert pages == [
        [*OLDER_PAGED[6:], "claude-3-5-haiku-latest"],
        OLDER_PAGED[1:6],
        OLDER_PAGED[:1],
    ]


# 1,010 older models: the provider's first page of 1,000 holds older-model-000 to -999, its
# second older-model-1000 to -1009 and the newer models.
PAST_LARGEST = {"x-fake-older-models": "1010"}


async def test_the_anthropic_sdk_finds_a_restricted_keys_models_past_the_providers_largest_page(
    gateway: TestClient, fake: FakeState
) -> None:
    # The provider's first page of 1,000 holds none of the key's models: the gateway asks for
    # the next one, and the client's first page holds them.
    async with anthropic_sdk(gateway, RESTRICTED_VK, PAST_LARGEST) as client:
        first = await client.models.list()
        listed = [model.id async for model in first]
    assert listed == [model.id for model in first.data] == ["claude-3-5-haiku-latest"]
    assert (first.first_id, first.last_id, first.has_more) == (
        "claude-3-5-haiku-latest",
        "claude-3-5-haiku-latest",
        False,
    )
    assert [seen.query_string for seen in fake.requests[-2:]] == [
        "limit=1000",
        "limit=1000&after_id=older-model-999",
    ]


async def test_a_restricted_keys_page_gathers_the_providers_pages_up_to_its_own_limit(
    gateway: TestClient,
) -> None:
    async with anthropic_sdk(gateway, PAGED_VK, PAST_LARGEST) as client:
        first = await client.models.list(limit=5)
        pages = [[model.id for model in page.data] async for page in first.iter_pages()]
        whole = await client.models.list()  # the default limit, 20: every model on one page
    assert pages == [OLDER_PAGED[:5], OLDER_PAGED[5:], ["claude-3-5-haiku-latest", "fake-model"]]
    assert [model.id for model in whole.data] == [
        *OLDER_PAGED,
        "claude-3-5-haiku-latest",
        "fake-model",
    ]
    assert (whole.last_id, whole.has_more) == ("fake-model", False)


async def test_a_real_key_echoed_in_a_gathered_page_is_masked(gateway: TestClient) -> None:
    response = await gateway.get(
        "/v1/models",
        headers={
            **auth(PAGED_VK),
            "anthropic-version": "2023-06-01",
            "x-fake-reflect": "body",
            **PAST_LARGEST,
        },
    )
    body = await response.read()
    names = [model["display_name"] for model in orjson.loads(body)["data"]]
    assert len(names) == 12  # ten of the first page, two of the second
    assert b"sk-ant-real-paged-1414141414" not in body
    assert all("[redacted]" in name for name in names)


async def test_a_restricted_keys_page_backwards_gathers_the_providers_pages_before_the_cursor(
    gateway: TestClient,
) -> None:
    async with anthropic_sdk(gateway, PAGED_VK, PAST_LARGEST) as client:
        first = await client.models.list(before_id="fake-model", limit=5)
        pages = [[model.id for model in page.data] async for page in first.iter_pages()]
    # The provider's 1,000 models before fake-model hold only claude-3-5-haiku-latest of the
    # key's: the page before that one gives the rest, the five nearest the cursor first.
    assert pages == [
        [*OLDER_PAGED[6:], "claude-3-5-haiku-latest"],
        OLDER_PAGED[1:6],
        OLDER_PAGED[:1],
    ]


async def test_a_provider_refusing_the_largest_page_is_asked_the_clients_own(
    gateway: TestClient, fake: FakeState
) -> None:
    # An Anthropic-compatible server whose pages are at most 100 refuses limit=1000 (400):
    # the list is asked again as the client asked it, and its pages gathered at that size.
    capped = {"x-fake-largest-page": "100", **OLDER}
    async with anthropic_sdk(gateway, RESTRICTED_VK, capped) as client:
        listed = [model.id async for model in client.models.list()]
    assert listed == ["claude-3-5-haiku-latest"]
    assert [seen.query_string for seen in fake.requests[-4:]] == [
        "limit=1000",  # refused: 400
        "",  # the server's own default page: 20
        "after_id=older-model-019",
        "after_id=older-model-039",
    ]
    async with anthropic_sdk(gateway, PAGED_VK, capped) as client:
        first = await client.models.list(limit=5)
        pages = [[model.id for model in page.data] async for page in first.iter_pages()]
    assert pages == [OLDER_PAGED[:5], OLDER_PAGED[5:], ["claude-3-5-haiku-latest", "fake-model"]]
    assert fake.requests[-1].query_string == "limit=5&after_id=older-model-044"


async def test_gemini_native_refusing_the_largest_page_is_asked_the_clients_own(
    gemini: TestClient, fake: FakeState
) -> None:
    capped = {"x-fake-largest-page": "100", "x-fake-older-models": "120"}
    pages = await gemini_pages(gemini, {}, capped, most=2)
    assert pages == [["gemini-2.5-flash", "gemini-2.5-pro"]]
    assert [seen.query_string for seen in fake.requests[-4:]] == [
        "pageSize=1000",
        "",
        "pageToken=fake-page-50-50",
        "pageToken=fake-page-100-50",
    ]


async def test_a_restricted_keys_limit_the_provider_refuses_goes_as_the_client_sent_it(
    gateway: TestClient, fake: FakeState
) -> None:
    response = await gateway.get(
        "/v1/models?limit=5000",
        headers={**auth(RESTRICTED_VK), "anthropic-version": "2023-06-01"},
    )
    assert response.status == 400
    assert fake.requests[-1].query_string == "limit=5000"


async def test_an_unrestricted_keys_page_and_query_are_the_providers(
    gateway: TestClient, fake: FakeState
) -> None:
    response = await gateway.get(
        "/v1/models?limit=5&after_id=older-model-001",
        headers={**auth(ANTHROPIC_VK), "anthropic-version": "2023-06-01", **OLDER},
    )
    assert response.status == 200
    assert await response.read() == fake.sent[response.headers["x-request-id"]]
    assert fake.requests[-1].query_string == "limit=5&after_id=older-model-001"
    assert len((await response.json())["data"]) == 5


@pytest.mark.parametrize(
    ("key", "headers"),
    [(OPENAI_VK, {}), (ANTHROPIC_VK, {"anthropic-version": "2023-06-01"})],
)
async def test_a_key_without_allowed_models_gets_the_providers_list_byte_for_byte(
    gateway: TestClient, fake: FakeState, key: str, headers: dict[str, str]
) -> None:
    response = await gateway.get("/v1/models", headers={**auth(key), **headers})
    assert response.status == 200
    body = await response.read()
    assert body == fake.sent[response.headers["x-request-id"]]
    assert [model["id"] for model in orjson.loads(body)["data"]] == list(MODEL_IDS)


async def test_a_compressed_list_goes_out_filtered_and_decoded(
    gateway: TestClient, fake: FakeState
) -> None:
    response = await gateway.get(
        "/v1/models",
        headers={**auth(LISTED_VK), "x-fake-gzip": "1", "Accept-Encoding": "gzip"},
        auto_decompress=False,
    )
    assert response.status == 200
    body = await response.read()
    assert "content-encoding" not in response.headers
    assert int(response.headers["content-length"]) == len(body)
    assert [model["id"] for model in orjson.loads(body)["data"]] == ["gpt-4o-mini", "fake-model"]
    # ... and that of a key without allowed_models as it came: compressed
    response = await gateway.get(
        "/v1/models",
        headers={**auth(OPENAI_VK), "x-fake-gzip": "1", "Accept-Encoding": "gzip"},
        auto_decompress=False,
    )
    assert response.headers["content-encoding"] == "gzip"
    assert [m["id"] for m in orjson.loads(gzip.decompress(await response.read()))["data"]] == list(
        MODEL_IDS
    )


@pytest.mark.parametrize(
    ("key", "headers"),
    [
        (LISTED_VK, {}),
        (LISTED_VK, {"x-fake-gzip": "1", "Accept-Encoding": "gzip"}),
        (RESTRICTED_VK, {"anthropic-version": "2023-06-01"}),
        (PAGED_VK, {"anthropic-version": "2023-06-01", **PAST_LARGEST}),
    ],
    ids=["openai", "openai-gzip", "anthropic", "anthropic-gathered"],
)
async def test_a_restricted_keys_head_of_the_model_list_says_what_its_get_sends(
    gateway: TestClient, fake: FakeState, key: str, headers: dict[str, str]
) -> None:
    get = await gateway.get("/v1/models", headers={**auth(key), **headers}, auto_decompress=False)
    body = await get.read()
    head = await gateway.head("/v1/models", headers={**auth(key), **headers})
    assert head.status == 200
    assert int(head.headers["content-length"]) == len(body)
    assert head.headers.get("content-encoding") == get.headers.get("content-encoding")
    assert await head.read() == b""
    assert fake.requests[-1].method == "GET"  # the list the head describes


async def test_gemini_native_head_of_a_restricted_keys_list_says_what_its_get_sends(
    gemini: TestClient,
) -> None:
    headers = {"x-goog-api-key": GEMINI_VK, **PAST_LARGEST}
    body = await (await gemini.get("/v1/models", headers=headers)).read()
    head = await gemini.head("/v1/models", headers=headers)
    assert (head.status, int(head.headers["content-length"])) == (200, len(body))


async def test_an_unrestricted_keys_head_of_the_model_list_goes_as_it_came(
    gateway: TestClient, fake: FakeState
) -> None:
    head = await gateway.head("/v1/models", headers=auth(OPENAI_VK))
    assert head.status == 200
    assert fake.requests[-1].method == "HEAD"


async def test_an_error_answer_passes_as_it_came(gateway: TestClient, fake: FakeState) -> None:
    response = await gateway.get("/v1/models", headers={**auth(LISTED_VK), "x-fake-status": "500"})
    assert response.status == 500
    assert await response.read() == fake.sent[response.headers["x-request-id"]]


async def test_a_body_that_is_no_json_passes_as_it_came(gateway: TestClient) -> None:
    response = await gateway.get(
        "/v1/models",
        headers={**auth(LISTED_VK), "x-fake-raw-chunks": "2", "x-fake-sized": "1"},
    )
    assert response.status == 200
    assert await response.read() == b"raw0\nraw1\n"


async def test_a_model_the_key_may_not_use_is_refused_when_asked_for_by_id(
    gateway: TestClient,
) -> None:
    async with openai_sdk(gateway, LISTED_VK) as client:
        assert (await client.models.retrieve("gpt-4o-mini")).id == "gpt-4o-mini"
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await client.models.retrieve("text-embedding-3-small")
    assert refused.value.code == "model_not_allowed"
    response = await gateway.get(
        "/v1/models/claude-opus-4-1",
        headers={**auth(RESTRICTED_VK), "anthropic-version": "2023-06-01"},
    )
    assert response.status == 403


async def test_a_router_key_lists_no_model_that_no_route_serves(gateway: TestClient) -> None:
    async with openai_sdk(gateway, ROUTED_VK) as client:
        listed = [model.id async for model in client.models.list()]
    assert listed == ["gpt-4o-mini"]  # fake-model is allowed, but no route serves it (400)


async def test_the_list_of_a_fallback_is_filtered_as_the_primarys_would_be(
    gateway: TestClient, fake: FakeState
) -> None:
    fake.faults["sk-real-falling-5656565656"] = Fault(503)
    async with openai_sdk(gateway, FALLING_VK) as client:
        listed = [model.id async for model in client.models.list()]
    assert listed == ["gpt-4o-mini"]
    assert fake.requests[-1].headers["api-key"] == "azure-real-falling-7878787878"


@pytest.fixture
async def gemini(
    tmp_path: Path, fake_base: str, make_gateway: Callable[..., Awaitable[TestClient]]
) -> TestClient:
    """A gateway whose GEMINI_VK goes to Gemini's native API (a declared provider, as
    docs/passing-through.md says), restricted to gemini-2.5-*."""
    return await gemini_gateway(tmp_path, fake_base, make_gateway, ["gemini-2.5-*"])


async def gemini_gateway(
    tmp_path: Path,
    fake_base: str,
    make_gateway: Callable[..., Awaitable[TestClient]],
    allowed_models: list[str] | None,
) -> TestClient:
    """A gateway whose GEMINI_VK goes to Gemini's native API, with `allowed_models` if any."""
    document = keys_document(fake_base)
    document["providers"]["google-ai"] = {
        "base_url": f"{fake_base}/v1beta",
        "auth": "x-goog-api-key",
    }
    document["virtual_keys"][GEMINI_VK] = {
        "provider": "google-ai",
        "api_key": "real-google-key-2222222222",
    }
    if allowed_models is not None:
        document["virtual_keys"][GEMINI_VK]["allowed_models"] = allowed_models
    path = tmp_path / "gemini-keys.json"
    path.write_text(json.dumps(document))
    return await make_gateway(KEYS_FILE_PATH=str(path))


async def test_gemini_native_lists_only_the_models_a_restricted_key_may_use(
    gemini: TestClient,
) -> None:
    response = await gemini.get("/v1/models", headers={"x-goog-api-key": GEMINI_VK})
    assert response.status == 200
    body = await response.json()
    assert [model["name"] for model in body["models"]] == [
        "models/gemini-2.5-flash",
        "models/gemini-2.5-pro",
    ]
    assert "nextPageToken" not in body
    refused = await gemini.get(
        "/v1/models/text-embedding-004", headers={"x-goog-api-key": GEMINI_VK}
    )
    assert refused.status == 403


async def gemini_pages(
    gemini: TestClient, query: dict[str, str], headers: dict[str, str], most: int
) -> list[list[str]]:
    """Each page's model ids, following nextPageToken as google-genai's Pager does (its
    `pageSize` on every request), for at most `most` pages."""
    pages: list[list[str]] = []
    token = None
    while len(pages) < most:
        asked = query if token is None else {**query, "pageToken": token}
        response = await gemini.get(
            "/v1/models", params=asked, headers={"x-goog-api-key": GEMINI_VK, **headers}
        )
        assert response.status == 200, await response.text()
        body = await response.json()
        pages.append([model["name"].removeprefix("models/") for model in body["models"]])
        token = body.get("nextPageToken")
        if token is None:
            return pages
    raise AssertionError(f"still more after {most} pages: {pages}")


async def test_gemini_native_lists_a_restricted_keys_models_from_later_pages_on_its_first(
    gemini: TestClient, fake: FakeState
) -> None:
    # Gemini's default page is 50: the 45 older models and 5 of the rest would be the first,
    # and a key whose models came after would get an empty page (google-genai's Pager raises
    # IndexError past two of them; a picker reading one page shows nothing).
    pages = await gemini_pages(gemini, {}, {"x-fake-older-models": "120"}, most=1)
    assert pages == [["gemini-2.5-flash", "gemini-2.5-pro"]]
    assert fake.requests[-1].query_string == "pageSize=1000"  # Gemini's largest page


async def test_gemini_native_lists_a_restricted_keys_models_past_the_providers_largest_page(
    gemini: TestClient, fake: FakeState
) -> None:
    # 1,010 older models: the key's two are on the provider's second page of 1,000, which the
    # gateway asks for with the token of the first (and its pageSize: Google's tokens must
    # come back with the pageSize they were made for).
    pages = await gemini_pages(gemini, {"pageSize": "2"}, PAST_LARGEST, most=3)
    assert pages == [["gemini-2.5-flash", "gemini-2.5-pro"]]
    assert [seen.query_string for seen in fake.requests[-2:]] == [
        "pageSize=1000",
        "pageSize=1000&pageToken=fake-page-1000-1000",
    ]


async def test_gemini_native_pages_on_from_where_a_gathered_page_ended(
    tmp_path: Path,
    fake_base: str,
    make_gateway: Callable[..., Awaitable[TestClient]],
    fake: FakeState,
) -> None:
    # The key allows ten of the provider's first 1,000 models and two of its next page.
    gemini = await gemini_gateway(
        tmp_path, fake_base, make_gateway, ["older-model-00?", "gemini-2.5-*"]
    )
    newest = ["gemini-2.5-flash", "gemini-2.5-pro"]
    # A page of 5: the provider's first page holds ten (its token is opaque: none is cut),
    # and the page after it, from its token, the other two.
    assert await gemini_pages(gemini, {"pageSize": "5"}, PAST_LARGEST, most=3) == [
        OLDER_PAGED,
        newest,
    ]
    # A page of 20: the first holds ten, so the provider's next page is asked for too.
    assert await gemini_pages(gemini, {"pageSize": "20"}, PAST_LARGEST, most=2) == [
        [*OLDER_PAGED, *newest]
    ]
    assert [seen.query_string for seen in fake.requests[-2:]] == [
        "pageSize=1000",
        "pageSize=1000&pageToken=fake-page-1000-1000",
    ]


async def test_a_gemini_key_without_allowed_models_pages_with_the_clients_own_query(
    gateway: TestClient,
    fake: FakeState,
    tmp_path: Path,
    fake_base: str,
    make_gateway: Callable[..., Awaitable[TestClient]],
) -> None:
    open_gemini = await gemini_gateway(tmp_path, fake_base, make_gateway, None)
    response = await open_gemini.get("/v1/models?pageSize=2", headers={"x-goog-api-key": GEMINI_VK})
    assert response.status == 200
    assert await response.read() == fake.sent[response.headers["x-request-id"]]
    assert fake.requests[-1].query_string == "pageSize=2"
