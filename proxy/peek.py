"""What the gateway reads of a request before it goes upstream: the body, and a peek at it.

`read_body` reads the body bounded by MAX_BODY_BYTES; `validate` peeks at the few fields
the gateway checks (`model`, `stream`, `messages`) in a JSON body, decoding a compressed
upload (`encodings`) for the peek only. The bytes that go upstream are the bytes the client
sent: the peek is a separate, parsed value (`Peek`), never a re-encoding of the body.
"""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from proxy.encodings import decode_body
from proxy.errors import GatewayError
from proxy.keys import VirtualKey

# Endpoints whose body must name a model and a non-empty list of messages (SPEC: Validation).
_NEEDS_MODEL_AND_MESSAGES = frozenset(("chat/completions", "messages", "messages/count_tokens"))
_JSON_TYPES = ("application/json", "+json")


@dataclass(frozen=True, slots=True)
class Peek:
    """The few fields read from a JSON body; the body itself is forwarded untouched."""

    model: str | None = None
    is_stream: bool = False


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, bounded. Raises 413 past `limit`, 400 for a broken upload."""
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    if not request.body_exists:
        return b""
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        # A chunked upload: aiohttp stops reading at client_max_size (= MAX_BODY_BYTES).
        raise _too_large(limit) from None
    except (RequestPayloadError, aiohttp.http_exceptions.HttpProcessingError) as error:
        raise GatewayError(
            400, "invalid_body", f"The request body could not be read: {error.__class__.__name__}."
        ) from None


def _too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        "request_too_large",
        f"The request body is larger than the gateway's limit of {limit} bytes.",
    )


def validate(tail: str, request: web.Request, body: bytes, key: VirtualKey, limit: int) -> Peek:
    """Peek at `model` and `stream`. Raises 400 (bad JSON, missing field), 403 (model), 413, 415."""
    content_type = request.content_type
    declared_json = content_type.endswith(_JSON_TYPES)
    body = decode_body(body, request.headers.get("content-encoding", ""), limit)
    if not body or not (declared_json or body.lstrip()[:1] == b"{"):
        if tail in _NEEDS_MODEL_AND_MESSAGES and request.method == "POST":
            raise GatewayError(
                400,
                "missing_field",
                "The request body must be a JSON object with 'model' and 'messages'.",
                "model",
            )
        return Peek()
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        if declared_json or tail in _NEEDS_MODEL_AND_MESSAGES:
            raise GatewayError(
                400, "invalid_json", f"The request body is not valid JSON: {error}."
            ) from None
        return Peek()  # not declared JSON: an opaque body the provider will judge
    if not isinstance(document, dict):
        if tail in _NEEDS_MODEL_AND_MESSAGES:
            raise GatewayError(400, "invalid_json", "The request body must be a JSON object.")
        return Peek()
    model = document.get("model")
    if tail in _NEEDS_MODEL_AND_MESSAGES and request.method == "POST":
        if not isinstance(model, str) or not model.strip():
            raise GatewayError(400, "missing_field", "'model' must be a non-empty string.", "model")
        messages = document.get("messages")
        if not isinstance(messages, list) or not messages:
            raise GatewayError(
                400, "missing_field", "'messages' must be a non-empty array.", "messages"
            )
    if not isinstance(model, str):
        model = None
    if model is not None and not key.allows(model):
        raise GatewayError(
            403, "model_not_allowed", f"This key may not use the model '{model[:200]}'.", "model"
        )
    return Peek(model=model, is_stream=document.get("stream") is True)
