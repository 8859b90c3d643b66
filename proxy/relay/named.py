"""Which models a request names, wherever it names them, for `allowed_models`.

A restricted key may use only its models, so every place a request can name one is read:
the JSON body's `model` (and each `params.model` of an Anthropic batch), a form's `model`
field (multipart uploads such as audio transcriptions, or url-encoded), a `model` query
parameter (realtime), and the path (`models/<name>:generateContent`,
`deployments/<name>/…`). What cannot be read is `Unreadable`: for a restricted key that is
a 403, never a pass: a name the gateway cannot see must not slip past allowed_models. This
module finds the names and judges them (`check`): the one allowed_models check of every
request, HTTP (`peek.validate`) and WebSocket (`realtime`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, unquote

from multidict import MultiMapping
from multipart import (  # type: ignore[import-untyped]  # multipart ships no type hints
    MultipartError,
    MultipartSegment,
    PushMultipartParser,
    parse_options_header,
)

from proxy.errors import GatewayError
from proxy.keys.keys import VirtualKey
from proxy.record import shown

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
# OpenAI's batches name their models inside an uploaded file the gateway never sees.
_MODELS_ELSEWHERE = frozenset(("batches",))


class Unreadable(ValueError):
    """The request may name a model the gateway cannot read; the message says where."""


def in_document(document: Any) -> Iterator[Any]:
    """The `model` values of a JSON body: its own, and those of an Anthropic batch's requests."""
    if not isinstance(document, dict):
        return
    if "model" in document:
        yield document["model"]
    requests = document.get("requests")
    if isinstance(requests, list):
        for item in requests:
            params = item.get("params") if isinstance(item, dict) else None
            if isinstance(params, dict) and "model" in params:
                yield params["model"]


def in_form(content_type: str, body: bytes) -> list[str]:
    """The `model` fields of a form body. Raises Unreadable for a broken multipart body."""
    media_type, options = parse_options_header(content_type)
    if media_type == "application/x-www-form-urlencoded":
        text = body.decode("utf-8", "replace")
        return [value for name, value in parse_qsl(text, keep_blank_values=True) if name == "model"]
    boundary = options.get("boundary")
    if not boundary:
        raise Unreadable("a multipart body without a boundary")
    models: list[str] = []
    value: bytearray | None = None
    try:
        with PushMultipartParser(boundary) as parser:
            for event in (*parser.parse(body), *parser.parse(b"")):
                if isinstance(event, MultipartSegment):
                    value = bytearray() if event.name == "model" else None
                elif event and value is not None:
                    value += event
                elif event is None and value is not None:
                    models.append(value.decode("utf-8", "replace"))
                    value = None
    except MultipartError as error:
        raise Unreadable(f"a multipart body that does not parse ({error})") from None
    return models


def in_path(method: str, tail: str, query: MultiMapping[str]) -> list[str]:
    """Models named by the path (`models/<m>`, `deployments/<m>`, Bedrock's `model/<m>/…`) or a
    `model` query parameter.

    Raises Unreadable for a request whose models are where the gateway cannot see them.
    """
    segments = tail.split("/")
    if method == "POST" and segments[0] in _MODELS_ELSEWHERE:
        raise Unreadable(f"creating {segments[0]} (their models are inside an uploaded file)")
    models = list(query.getall("model", ()))
    if segments[0] == "model" and len(segments) > 1 and segments[1]:
        # Bedrock's native paths: model/<id>/invoke, /converse...; an id may hold a colon.
        models.append(unquote(segments[1]))
    for before, segment in zip(segments, segments[1:], strict=False):
        if before in ("models", "deployments") and segment:
            # Gemini's native paths add the method after a colon: models/gemini-pro:generateContent
            models.append(unquote(segment).partition(":")[0])
    return models


def check(key: VirtualKey, names: list[Any], unreadable: str | None = None) -> None:
    """Every model named is one the key may use, and none is out of sight. Raises 403.

    `unreadable`: where the request may name a model the gateway could not read. A key
    without allowed_models may use any model.
    """
    if key.allowed_models is None:
        return
    allowed = ", ".join(key.model_patterns or ())  # as keys.json writes them
    for name in names:
        if not isinstance(name, str):
            raise GatewayError(
                403,
                "model_not_allowed",
                f"This key may use only some models ({allowed}), and 'model' here is not a string.",
                "model",
            )
        if not key.allows(name):
            raise GatewayError(
                403,
                "model_not_allowed",
                f"This key may not use the model '{shown(name)}'. It may use: {allowed}.",
                "model",
            )
    if unreadable is not None:
        raise GatewayError(
            403,
            "model_not_allowed",
            f"This key may use only some models ({allowed}), and the gateway cannot check the model of "
            f"this request ({unreadable}): send JSON, or a form with a 'model' field.",
            "model",
        )
