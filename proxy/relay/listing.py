"""A restricted key's model list: the provider's, less the models the key would be refused.

Model pickers (Open WebUI, LibreChat, Cursor, Continue, the SDKs' `client.models.list()`)
offer what `GET /v1/models` lists; a key with `allowed_models` would then be refused (403)
most of what it offers. So for such a key, and only for it, the provider's 200 answer to
`GET /v1/models` (`/models`, Azure's `openai/models`, `openai/v1/models`) keeps only the
models the key may name: those its `allowed_models` allow and, for a key with routes and no
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
a key whose every target speaks that API. The cursors are the provider's all the same, so a
pager that goes on skips and repeats nothing:

- Anthropic's cursors are model ids the gateway can name, so the page is cut to the
  client's `limit`: its first models (the last ones, before `before_id`), `has_more` true
  when some were cut, `first_id` and `last_id` naming what is answered.
- Gemini's `nextPageToken` is opaque: a page is never cut, and may hold more than the
  client's `pageSize` (google-genai's Pager reads any number; Google asks that a token come
  back with the same `pageSize`, and every request of the key's asks the same).

A client's page size the provider would refuse (`limit=0`, `limit=5000`, named twice) goes
as it came, and so does its answer's refusal.

A compressed answer is decoded to be read, and goes out decoded (no Content-Encoding, its
own Content-Length) when a model was left out; its ETag, which named the provider's bytes,
goes too. An error, a body that is not such a JSON object, or one that does not decode goes
out as it came. What is not done: a key whose requests go to several providers (routes,
fallbacks) is listed the models of the one that answers the list (the first route's, a
fallback's when its primary fails), not the union of theirs; a target's `model`, which
replaces whatever a request names, is not what is listed (the list says which names the
key may send); a provider listing more than `LARGEST_PAGE` models whose first page of them
holds none of the key's still answers an empty page, and the SDKs stop there.
"""

from __future__ import annotations

from typing import Any

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
_ANTHROPIC_LIMIT = ("limit",)
_ANTHROPIC_DEFAULT_LIMIT = 20
_GEMINI_PAGE_SIZE = ("pageSize", "page_size")  # Google's HTTP mapping takes either name
# A list's own headers that describe the provider's bytes, not the list as filtered.
_OF_THE_BYTES = ("content-encoding", "content-length", "etag")


class ModelList:
    """Filters one answer to `GET …/models` to the models `key` may name."""

    __slots__ = ("_backward", "_key", "_limit", "query")

    def __init__(
        self, key: VirtualKey, query: str, limit: int | None = None, backward: bool = False
    ) -> None:
        self._key = key
        self.query = query  # what the provider is asked
        self._limit = limit  # the client's Anthropic page: the most models answered
        self._backward = backward  # paged by before_id: the page ends at the cursor

    @classmethod
    def of(
        cls, key: VirtualKey, method: str, tail: str, query: str, plan: Plan
    ) -> ModelList | None:
        """The filter a request's answer needs, with the query to send in place of `query`
        (the client's, raw): None but for a restricted key's model list."""
        if key.allowed_models is None or method != "GET" or endpoint(tail).rstrip("/") != "models":
            return None
        providers = [target.provider for target in plan.targets]
        items = query.split("&") if query else []
        if all(provider.api == "anthropic" for provider in providers):
            asked = _largest(items, _ANTHROPIC_LIMIT)
            if asked is None:
                return cls(key, query)
            widened, size = asked
            limit = _ANTHROPIC_DEFAULT_LIMIT if size is None else _count(size)
            if limit is None or not 1 <= limit <= LARGEST_PAGE:
                return cls(key, query)
            backward = any(item.partition("=")[0] == "before_id" for item in items)
            return cls(key, widened, limit, backward)
        if all(map(_speaks_gemini, providers)):
            asked = _largest(items, _GEMINI_PAGE_SIZE)
            if asked is None or (asked[1] is not None and _count(asked[1]) is None):
                return cls(key, query)
            return cls(key, asked[0])
        return cls(key, query)

    @staticmethod
    def applies(status: int, content_type: str | None) -> bool:
        """The answer is a list to filter: a 200 in JSON (or untyped); errors pass as sent."""
        return status == 200 and (content_type is None or "json" in content_type)

    def __call__(self, data: bytes, headers: CIMultiDict[str]) -> bytes:
        """The answer as the client gets it; `headers` lose those of the provider's bytes
        when a model was left out (or the page cut)."""
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
        if not isinstance(document, dict) or not self._filter(document):
            return data
        for name in _OF_THE_BYTES:
            headers.popall(name, None)
        return orjson.dumps(document)

    def _filter(self, document: dict[str, Any]) -> bool:
        """Leave out of `document` what the key may not name, and cut an Anthropic page to
        the client's `limit`; False: neither was done."""
        data = document.get("data")
        if isinstance(data, list):  # OpenAI-compatible, Anthropic
            kept = [entry for entry in data if self._may_name(_field(entry, "id"))]
            limit = self._limit
            if limit is not None and len(kept) > limit:  # cut to the client's page
                kept = kept[-limit:] if self._backward else kept[:limit]
                document["has_more"] = True
            elif len(kept) == len(data):
                return False
            document["data"] = kept
            if "first_id" in document:
                document["first_id"] = kept[0]["id"] if kept else None
            if "last_id" in document:
                document["last_id"] = kept[-1]["id"] if kept else None
            return True
        models = document.get("models")
        if isinstance(models, list):  # Gemini's native API
            kept = [entry for entry in models if self._may_name(_gemini_id(entry))]
            if len(kept) == len(models):
                return False
            document["models"] = kept
            return True
        return False

    def _may_name(self, model: str | None) -> bool:
        """A request naming `model` would pass the key's checks (allowed_models, routes)."""
        key = self._key
        return model is not None and key.allows(model) and key.plans.serves(model)


def _field(entry: Any, name: str) -> str | None:
    value = entry.get(name) if isinstance(entry, dict) else None
    return value if isinstance(value, str) else None


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
