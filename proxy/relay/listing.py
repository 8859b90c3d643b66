"""A restricted key's model list: the provider's, less the models the key would be refused.

Model pickers (Open WebUI, LibreChat, Cursor, Continue, the SDKs' `client.models.list()`)
offer what `GET /v1/models` lists; a key with `allowed_models` would then be refused (403)
most of what it offers. So for such a key, and only for it, the provider's 200 answer to
`GET /v1/models` (`/models`, Azure's `openai/models`, `openai/v1/models`) keeps only the
models the key may name: those its `allowed_models` allow and, for a key with routes and no
target of its own, that a route serves (`Plans.serves`; any other gets 400). The answer
keeps the provider's shape, and is re-encoded (orjson) only when a model was left out:

- OpenAI-compatible, Anthropic: `data`, each entry by its `id`; Anthropic's `first_id` and
  `last_id` name the first and last entry kept (null when none is), so that paging on from
  them (`after_id`, `before_id`) skips no model the key may use. `has_more` stays the
  provider's.
- Gemini's native API: `models`, each by its `name` less `models/` (as the key's check
  reads `models/<id>:generateContent`); `nextPageToken` stays the provider's.

A compressed answer is decoded to be read, and goes out decoded (no Content-Encoding, its
own Content-Length) when a model was left out; its ETag, which named the provider's bytes,
goes too. An error, a body that is not such a JSON object, or one that does not decode goes
out as it came. What is not done: a key whose requests go to several providers (routes,
fallbacks) is listed the models of the one that answers the list (the first route's, a
fallback's when its primary fails), not the union of theirs; a target's `model`, which
replaces whatever a request names, is not what is listed (the list says which names the
key may send).
"""

from __future__ import annotations

from typing import Any

import orjson
from multidict import CIMultiDict

from proxy.encodings import content_coding, decode_body
from proxy.errors import GatewayError
from proxy.keys.keys import VirtualKey
from proxy.relay.links import MAX_BYTES  # read whole to be filtered (or decoded) up to it
from proxy.upstream.routing import endpoint

_GEMINI_PREFIX = "models/"
# A list's own headers that describe the provider's bytes, not the list as filtered.
_OF_THE_BYTES = ("content-encoding", "content-length", "etag")


class ModelList:
    """Filters one answer to `GET …/models` to the models `key` may name."""

    __slots__ = ("_key",)

    def __init__(self, key: VirtualKey) -> None:
        self._key = key

    @classmethod
    def of(cls, key: VirtualKey, method: str, tail: str) -> ModelList | None:
        """The filter a request's answer needs: None but for a restricted key's model list."""
        if key.allowed_models is None or method != "GET" or endpoint(tail).rstrip("/") != "models":
            return None
        return cls(key)

    @staticmethod
    def applies(status: int, content_type: str | None) -> bool:
        """The answer is a list to filter: a 200 in JSON (or untyped); errors pass as sent."""
        return status == 200 and (content_type is None or "json" in content_type)

    def __call__(self, data: bytes, headers: CIMultiDict[str]) -> bytes:
        """The answer as the client gets it; `headers` lose those of the provider's bytes
        when a model was left out."""
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
        """Leave out of `document` what the key may not name; False: nothing was."""
        data = document.get("data")
        if isinstance(data, list):  # OpenAI-compatible, Anthropic
            kept = [entry for entry in data if self._may_name(_field(entry, "id"))]
            if len(kept) == len(data):
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
