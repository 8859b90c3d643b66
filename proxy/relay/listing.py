"""A restricted key's model list: the provider's, less the models the key would be refused.

Model pickers (Open WebUI, LibreChat, Cursor, Continue, the SDKs' `client.models.list()`)
offer what `GET /v1/models` lists; a key with `allowed_models` would then be refused (403)
most of what it offers. So for such a key, and only for it, the provider's 200 answer to
`GET /v1/models` (`/models`, Azure's `openai/models`, `openai/v1/models`) keeps only the
models the key may name (a HEAD of it goes to the provider as that GET, and is answered the
head of the filtered list: its Content-Length what the GET sends, no body): those its `allowed_models` allow and, for a key with routes and no
target of its own, that a route serves (`Plans.serves`; any other gets 400). The answer
keeps the provider's shape, and is re-encoded (orjson) only when a model was left out (or a
page cut, below):

- OpenAI-compatible, Anthropic: `data`, each entry by its `id`; Anthropic's `first_id` and
  `last_id` name the first and last entry kept (null when none is), so that paging on from
  them (`after_id`, `before_id`) skips no model the key may use. `has_more` stays the
  provider's (but see below).
- Gemini's native API: `models`, each by its `name` less `models/` (as the key's check
  reads `models/<id>:generateContent`); `nextPageToken` stays the provider's.

Both page their lists, and a page filtered empty would end the SDKs' pagers (the Python and
Node SDKs' `has_next_page`: no items, no next page) while later pages hold the key's models.
So such a key's list asks the provider for its largest page (`LARGEST_PAGE`) in place of the
client's page size: Anthropic's `limit` (default 20), Gemini's `pageSize` (default 50), of
a key whose every target speaks that API. And while what it keeps is fewer than the client's
page and the provider says it has more, it asks for the provider's next page (pages.py: the
target and key that answered, the same query with the provider's cursor), at most
`MOST_PAGES` in all. The cursors are the provider's all the same, so a pager that goes on
skips and repeats nothing:

- Anthropic's cursors are model ids the gateway can name, so the page is cut to the
  client's `limit`: its first models (the last ones, before `before_id`), `has_more` true
  when some were cut, `first_id` and `last_id` naming what is answered. When the pages
  stopped short of the limit while the provider had more (`MOST_PAGES` asked, a page not
  read), `has_more` is true and the cursor the client pages by (`last_id`; `first_id`
  before `before_id`) names the provider's model where they stopped (none between the
  models answered and it is the key's): paging on from it skips nothing.
- Gemini's `nextPageToken` is opaque: a page is never cut, and may hold more than the
  client's `pageSize` (google-genai's Pager reads any number; Google asks that a token come
  back with the same `pageSize`, and every request of the key's asks the same). It is the
  token of the last page read (none: the provider has no more).

A client's page size the provider would refuse (`limit=0`, `limit=5000`, named twice) goes
as it came, and so does its answer's refusal. A provider that refuses the largest page
(400, 422: an Anthropic-compatible server whose pages are at most 100) is asked the list
again as the client asked it, once (the relay's walk, anew), and its pages are gathered at
that size: each such list costs that one refused request more (nothing is remembered
between requests), and a refusal of the client's own query goes to the client as it came.

A compressed answer is decoded to be read, and goes out decoded (no Content-Encoding, its
own Content-Length) when a model was left out; its ETag, which named the provider's bytes,
goes too. An error, a body that is not such a JSON object, or one that does not decode goes
out as it came. What is not done: a key whose requests go to several providers (routes,
fallbacks) is listed the models of the one that answers the list (the first route speaking
the client's API, a fallback's when its primary fails), not the union of theirs; a target's `model`, which
replaces whatever a request names, is not what is listed (the list says which names the
key may send); a provider listing more than `MOST_PAGES` pages of models none of the key's
answers a page with none, and a cursor to go on from: the SDKs' pagers stop at a page with no
models, a client paging by the cursor (as Anthropic's and Google's docs page) finds them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import orjson
from multidict import CIMultiDict

from proxy.encodings import content_coding, decode_body
from proxy.errors import GatewayError
from proxy.keys.keys import VirtualKey
from proxy.relay.links import MAX_BYTES  # read whole to be filtered (or decoded) up to it
from proxy.upstream.providers import Provider
from proxy.upstream.routing import endpoint
from proxy.upstream.targets import Plan

_GEMINI_PREFIX = "models/"
# The largest page each provider documents: Anthropic's `limit` "ranges from 1 to 1000",
# Gemini's list "returns at most 1000 models per page, even if you pass a larger pageSize".
LARGEST_PAGE = 1000
# The most pages of the provider's one answer gathers (the first included): 10,000 models
# at the largest page, a few seconds of round trips at worst.
MOST_PAGES = 10
_ANTHROPIC_LIMIT = ("limit",)
_ANTHROPIC_DEFAULT_LIMIT = 20
_GEMINI_PAGE_SIZE = ("pageSize", "page_size")  # Google's HTTP mapping takes either name
_GEMINI_PAGE_TOKEN = ("pageToken", "page_token")
_GEMINI_DEFAULT_PAGE = 50
# A list's own headers that describe the provider's bytes, not the list as filtered.
_OF_THE_BYTES = ("content-encoding", "content-length", "etag")
_ANTHROPIC, _GEMINI = "anthropic", "gemini"
_LISTING_METHODS = ("GET", "HEAD")
# A page size refused: 400 (Anthropic's invalid_request_error, Google's INVALID_ARGUMENT),
# 422 (the validation error of a FastAPI server).
_REFUSED = (400, 422)

# Asks the provider for another page of the list, by the query to send (pages.Pages):
# the page as a JSON object, None when it was not read.
MorePages = Callable[[str], Awaitable[dict[str, Any] | None]]


class ModelList:
    """Filters one answer to `GET …/models` to the models `key` may name, gathering the
    provider's further pages where its first holds fewer than the client's page."""

    __slots__ = ("_asked", "_backward", "_items", "_key", "_paged", "_size", "query", "tail")

    def __init__(
        self,
        key: VirtualKey,
        tail: str,
        query: str,
        paged: str | None = None,
        size: int | None = None,
        backward: bool = False,
        asked: str | None = None,
    ) -> None:
        self._key = key
        self.tail, self.query = tail, query  # what the provider is asked
        self._items = query.split("&") if query else []
        # How the provider pages (Anthropic's cursors, Gemini's token; None: not paged, or
        # not by the gateway) and the client's page: Anthropic's most models answered, Gemini's
        # fewest gathered (its page is never cut).
        self._paged, self._size = paged, size
        self._backward = backward  # Anthropic's, paged by before_id: the page ends at the cursor
        self._asked = asked  # the client's own query, when `query` asks a larger page

    @classmethod
    def of(
        cls, key: VirtualKey, method: str, tail: str, query: str, plan: Plan
    ) -> ModelList | None:
        """The filter a request's answer needs, with the query to send in place of `query`
        (the client's, raw): None but for a restricted key's model list (its GET, or its
        HEAD, which the provider is asked as a GET: the head says the length of that body)."""
        if (
            key.allowed_models is None
            or method not in _LISTING_METHODS
            or endpoint(tail).rstrip("/") != "models"
        ):
            return None
        providers = [target.provider for target in plan.targets]
        items = query.split("&") if query else []
        if all(provider.api == "anthropic" for provider in providers):
            larger = _largest(items, _ANTHROPIC_LIMIT)
            if larger is None:
                return cls(key, tail, query)
            widened, size = larger
            limit = _ANTHROPIC_DEFAULT_LIMIT if size is None else _count(size)
            if limit is None or not 1 <= limit <= LARGEST_PAGE:
                return cls(key, tail, query)
            backward = any(item.partition("=")[0] == "before_id" for item in items)
            own = None if widened == query else query
            return cls(key, tail, widened, _ANTHROPIC, limit, backward, own)
        if all(map(_speaks_gemini, providers)):
            larger = _largest(items, _GEMINI_PAGE_SIZE)
            if larger is None:
                return cls(key, tail, query)
            widened, size = larger
            page_size = 0 if size is None else _count(size)
            if page_size is None:
                return cls(key, tail, query)
            least = min(page_size, LARGEST_PAGE) or _GEMINI_DEFAULT_PAGE  # 0: Google's default
            return cls(
                key, tail, widened, _GEMINI, least, asked=None if widened == query else query
            )
        return cls(key, tail, query)

    def is_refused(self, status: int) -> bool:
        """The provider refused the larger page it was asked (a server whose pages are
        smaller than LARGEST_PAGE): the list is to be asked again as the client asked it."""
        return self._asked is not None and status in _REFUSED

    def as_asked(self) -> ModelList:
        """This list asked with the client's own query (and its pages gathered at that size)."""
        assert self._asked is not None
        return ModelList(self._key, self.tail, self._asked, self._paged, self._size, self._backward)

    @staticmethod
    def applies(status: int, content_type: str | None) -> bool:
        """The answer is a list to filter: a 200 in JSON (or untyped); errors pass as sent."""
        return status == 200 and (content_type is None or "json" in content_type)

    async def __call__(
        self, data: bytes, headers: CIMultiDict[str], more: MorePages | None = None
    ) -> bytes:
        """The answer as the client gets it; `headers` lose those of the provider's bytes
        when a model was left out (or the page cut, or pages gathered from `more`)."""
        plain = data
        coding = content_coding(headers)
        if coding:
            try:
                plain = decode_body(data, coding, MAX_BYTES)
            except GatewayError:  # unsupported, corrupt, or past the bound: as it came
                return data
        try:
            document = orjson.loads(plain)
        except orjson.JSONDecodeError:
            return data
        if not isinstance(document, dict) or not await self._filter(document, more):
            return data
        for name in _OF_THE_BYTES:
            headers.popall(name, None)
        return orjson.dumps(document)

    async def _filter(self, document: dict[str, Any], more: MorePages | None) -> bool:
        """Leave out of `document` what the key may not name, gather the provider's further
        pages while the client's page is not full, and cut an Anthropic page to the client's
        `limit`; False: none of it was done."""
        data = document.get("data")
        if isinstance(data, list):  # OpenAI-compatible, Anthropic
            kept = self._kept(data, _openai_id)
            if self._paged == _ANTHROPIC:
                return await self._anthropic(document, data, kept, more)
            if len(kept) == len(data):
                return False
            document["data"] = kept
            return True
        models = document.get("models")
        if isinstance(models, list):  # Gemini's native API
            kept = self._kept(models, _gemini_id)
            if self._paged == _GEMINI:
                return await self._gemini(document, models, kept, more)
            if len(kept) == len(models):
                return False
            document["models"] = kept
            return True
        return False

    async def _anthropic(
        self, document: dict[str, Any], data: list[Any], kept: list[Any], more: MorePages | None
    ) -> bool:
        """An Anthropic page: the provider's pages on (by `after_id`, or `before_id` paging
        backward) until the client's `limit` is reached, then cut to it; `first_id` and
        `last_id` name the first and last model answered (null: none), but when the pages
        stopped short of the limit while the provider had more (MOST_PAGES asked, a page
        not read): then the cursor paged by names where the provider's pages stopped."""
        limit, backward = self._size, self._backward
        assert limit is not None
        ends = "first_id" if backward else "last_id"  # the provider's cursor to page on from
        has_more, cursor = document.get("has_more") is True, document.get(ends)
        asked, gathered, stopped, cut = 1, False, False, False
        while len(kept) < limit and has_more and more is not None and isinstance(cursor, str):
            if asked == MOST_PAGES:
                stopped = True
                break
            page = await more(
                self._following(("before_id",) if backward else ("after_id",), cursor)
            )
            asked += 1
            if page is None:
                stopped = True
                break
            listed, following = page.get("data"), page.get(ends)
            if not isinstance(listed, list) or following == cursor:  # no page, or no step on
                stopped = True
                break
            found = self._kept(listed, _openai_id)
            kept = found + kept if backward else kept + found
            has_more, cursor, gathered = page.get("has_more") is True, following, True
        if len(kept) > limit:  # cut to the client's page
            kept = kept[-limit:] if backward else kept[:limit]
            has_more, stopped, cut = True, False, True
        elif not gathered and len(kept) == len(data):
            return False
        document["data"] = kept
        if gathered or cut:
            document["has_more"] = has_more
        if "first_id" in document or gathered:
            document["first_id"] = kept[0]["id"] if kept else None
        if "last_id" in document or gathered:
            document["last_id"] = kept[-1]["id"] if kept else None
        if stopped:  # paging on from here skips none of the provider's models
            document[ends] = cursor
        return True

    async def _gemini(
        self, document: dict[str, Any], models: list[Any], kept: list[Any], more: MorePages | None
    ) -> bool:
        """A Gemini native page: the provider's pages on (by `pageToken`) until the client's
        `pageSize` is reached; never cut (the token is opaque), `nextPageToken` the last page's
        read (absent: the provider has no more)."""
        size = self._size
        assert size is not None
        token, asked, gathered = document.get("nextPageToken"), 1, False
        while len(kept) < size and more is not None and isinstance(token, str) and token:
            if asked == MOST_PAGES:
                break
            page = await more(self._following(_GEMINI_PAGE_TOKEN, token))
            asked += 1
            if page is None:
                break
            listed, following = page.get("models"), page.get("nextPageToken")
            if not isinstance(listed, list) or following == token:  # no page, or no step on
                break
            kept = kept + self._kept(listed, _gemini_id)
            token, gathered = following, True
        if not gathered and len(kept) == len(models):
            return False
        document["models"] = kept
        if gathered:
            if isinstance(token, str) and token:
                document["nextPageToken"] = token
            else:
                document.pop("nextPageToken", None)
        return True

    def _following(self, names: tuple[str, ...], cursor: str) -> str:
        """The query for the provider's page at `cursor`: the first's, with the cursor under
        the one of `names` the client's query used (in its place), else the first (added)."""
        items = self._items
        at = next((i for i, item in enumerate(items) if item.partition("=")[0] in names), None)
        if at is None:
            return "&".join([*items, f"{names[0]}={quote(cursor, safe='')}"])
        name = items[at].partition("=")[0]
        return "&".join([*items[:at], f"{name}={quote(cursor, safe='')}", *items[at + 1 :]])

    def _kept(self, entries: list[Any], model_of: Callable[[Any], str | None]) -> list[Any]:
        """The entries naming a model the key may name."""
        return [entry for entry in entries if self._may_name(model_of(entry))]

    def _may_name(self, model: str | None) -> bool:
        """A request naming `model` would pass the key's checks (allowed_models, routes)."""
        key = self._key
        return model is not None and key.allows(model) and key.plans.serves(model)


def _field(entry: Any, name: str) -> str | None:
    value = entry.get(name) if isinstance(entry, dict) else None
    return value if isinstance(value, str) else None


def _openai_id(entry: Any) -> str | None:
    """The model an OpenAI-compatible or Anthropic entry names: its `id`."""
    return _field(entry, "id")


def _gemini_id(entry: Any) -> str | None:
    """The model a Gemini entry's `name` (`models/<id>`) names, as a request's path does."""
    name = _field(entry, "name")
    return None if name is None else name.removeprefix(_GEMINI_PREFIX)


def _largest(items: list[str], names: tuple[str, ...]) -> tuple[str, str | None] | None:
    """The query of `items` (its `name=value` parts) asking for the largest page in place
    of the client's size, named by one of `names` (the first when it named none), and the
    client's size as it came (None: not named); None when it named one more than once."""
    found = [index for index, item in enumerate(items) if item.partition("=")[0] in names]
    if not found:
        return "&".join([*items, f"{names[0]}={LARGEST_PAGE}"]), None
    if len(found) > 1:
        return None
    at = found[0]
    name, _, size = items[at].partition("=")
    return "&".join([*items[:at], f"{name}={LARGEST_PAGE}", *items[at + 1 :]]), size


def _count(value: str) -> int | None:
    """A page size as a query writes it (ASCII digits), else None."""
    return int(value) if value.isascii() and value.isdigit() else None


def _speaks_gemini(provider: Provider) -> bool:
    """Gemini's native API (a declared provider sending `x-goog-api-key`), not Google's
    OpenAI-compatible endpoint under it, whose list is OpenAI's, not paged."""
    return provider.auth == "x-goog-api-key" and not provider.base_url.path.rstrip("/").endswith(
        "/openai"
    )
