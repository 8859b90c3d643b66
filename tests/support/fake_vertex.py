"""A fake Vertex AI with its own token endpoint: a real aiohttp app.

`POST /token` is Google's OAuth token endpoint as a service account uses it: the JWT
assertion must verify against the service account's public key (google-auth's `jwt`), and
then a fresh access token is minted (`ya29.fake-access-token-<n>`, living `expires_in` seconds).
`POST /v1/projects/{project}/locations/{region}/publishers/anthropic/models/{model}:rawPredict`
(and `:streamRawPredict`) answer an Anthropic message (JSON, or SSE), and
`.../models/count-tokens:rawPredict` Anthropic's token count (INPUT_TOKENS), only with
`Authorization: Bearer <a token the endpoint minted>`, and only for the expected project
and region; else 401 or 403, as Vertex does. `.../publishers/google/models/{model}:generateContent`
(and `:streamGenerateContent`, SSE with `alt=sse`, else one JSON array) answer as Gemini
does: a thought, the text pieces and a function call, with `usageMetadata` (GEMINI_PROMPT
prompt tokens, a candidate token a piece, GEMINI_THOUGHTS thought tokens) unless the request
says `x-fake-no-usage`; with `x-fake-hang: end` the stream (the array too, then written event
by event) holds its body's end until the client leaves. A rawPredict with `x-fake-reflect` echoes the Authorization it was
sent in a header and in its body, as a debugging proxy in front of it may. What it saw is
kept in `app[VERTEX_STATE]`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.auth import jwt
from multidict import CIMultiDict

from tests.support.fake_media import chunked

INPUT_TOKENS = 13
GEMINI_PROMPT, GEMINI_THOUGHTS = 17, 7
GEMINI_THOUGHT = "Think first."
GEMINI_CALL = {"name": "lookup", "args": {"query": "tok"}}
KEY_ID = "fake-key-id-1"


@dataclass
class VertexState:
    public_pem: bytes
    project: str
    region: str
    expires_in: int = 3600
    minted: list[str] = field(default_factory=list)
    seen: list[tuple[str, CIMultiDict[str], bytes]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)  # the raw paths of any other request (404)
    echoes: bool = False  # a refusal's error_description quotes the assertion it was sent
    # A request with `x-fake-hold` is answered once this is set (after it is in `seen`).
    release: asyncio.Event = field(default_factory=asyncio.Event)


VERTEX_STATE = web.AppKey("vertex_state", VertexState)


def service_account(token_uri: str, project: str) -> tuple[dict[str, Any], bytes]:
    """A service account key file's JSON with a fresh RSA key, and the key's public PEM."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    info = {
        "type": "service_account",
        "project_id": project,
        "private_key_id": KEY_ID,
        "private_key": private.decode(),
        "client_email": f"gateway@{project}.iam.gserviceaccount.com",
        "client_id": "1234567890",
        "token_uri": token_uri,
    }
    return info, public


def vertex_app(state: VertexState) -> web.Application:
    app = web.Application()
    app[VERTEX_STATE] = state
    app.router.add_post("/token", _token)
    app.router.add_post(
        "/v1/projects/{project}/locations/{region}/publishers/anthropic/models/{call}", _predict
    )
    app.router.add_post(
        "/v1/projects/{project}/locations/{region}/publishers/google/models/{call}", _generate
    )
    app.router.add_route("*", "/{anything:.*}", _other)
    return app


async def _other(request: web.Request) -> web.Response:
    request.app[VERTEX_STATE].other.append(request.raw_path)
    return web.json_response({"error": {"code": 404, "status": "NOT_FOUND"}}, status=404)


async def _token(request: web.Request) -> web.Response:
    state = request.app[VERTEX_STATE]
    form = await request.post()
    assertion = form.get("assertion")
    if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer" or not isinstance(
        assertion, str
    ):
        return web.json_response({"error": "invalid_request"}, status=400)
    try:
        claims = jwt.decode(assertion, certs={KEY_ID: state.public_pem.decode()})
    except ValueError as error:
        state.refused.append(f"assertion: {error}")
        refusal = {"error": "invalid_grant"}
        if state.echoes:
            refusal["error_description"] = f"Invalid JWT Signature: {assertion}"
        return web.json_response(refusal, status=400)
    if "cloud-platform" not in claims.get("scope", ""):
        return web.json_response({"error": "invalid_scope"}, status=400)
    token = f"ya29.fake-access-token-{len(state.minted) + 1}"  # as long as a key
    state.minted.append(token)
    answer = {"access_token": token, "expires_in": state.expires_in, "token_type": "Bearer"}
    return web.json_response(answer)


def _refusal(state: VertexState, request: web.Request) -> web.Response | None:
    """Vertex's 401 or 403 for a token it did not mint, or another project or region."""
    token = request.headers.get("Authorization", "").removeprefix("Bearer ")
    if token not in state.minted:
        state.refused.append("an unknown token")
        return web.json_response({"error": {"code": 401, "status": "UNAUTHENTICATED"}}, status=401)
    info = request.match_info
    if (info["project"], info["region"]) != (state.project, state.region):
        state.refused.append("another project or region")
        return web.json_response(
            {"error": {"code": 403, "status": "PERMISSION_DENIED"}}, status=403
        )
    return None


async def _predict(request: web.Request) -> web.StreamResponse:
    state = request.app[VERTEX_STATE]
    body = await request.read()
    refusal = _refusal(state, request)
    if refusal is not None:
        return refusal
    model, _, specifier = request.match_info["call"].partition(":")
    state.seen.append((request.raw_path, CIMultiDict(request.headers), body))
    if "x-fake-hold" in request.headers:
        await state.release.wait()
    if model == "count-tokens" and specifier == "rawPredict":  # the model is in the body
        return web.json_response({"input_tokens": INPUT_TOKENS})
    pieces = [f"tok{i} " for i in range(int(request.headers.get("x-fake-chunks", "3")))]
    if specifier == "rawPredict":
        if "x-fake-reflect" in request.headers:  # a debugging proxy echoing what it was sent
            sent = request.headers["Authorization"]
            answer = {**_message(model, pieces), "sent": sent}
            return web.json_response(answer, headers={"x-echo-authorization": sent})
        return web.json_response(_message(model, pieces))
    if specifier != "streamRawPredict":
        raise web.HTTPNotFound()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for event in _events(model, pieces):
        await response.write(
            b"event: %s\ndata: %s\n\n" % (event["type"].encode(), orjson.dumps(event))
        )
    await response.write_eof()
    return response


def _message(model: str, pieces: list[str]) -> dict[str, Any]:
    return {
        "id": "msg_vrtx_1",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": "".join(pieces)}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": INPUT_TOKENS, "output_tokens": len(pieces)},
    }


def _events(model: str, pieces: list[str]) -> list[dict[str, Any]]:
    start = _message(model, [])
    start["content"], start["usage"] = [], {"input_tokens": INPUT_TOKENS, "output_tokens": 1}
    block = {"type": "text", "text": ""}
    return [
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "index": 0, "content_block": block},
        *(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}}
            for p in pieces
        ),
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": len(pieces)},
        },
        {"type": "message_stop"},
    ]


async def _generate(request: web.Request) -> web.StreamResponse:
    """Gemini's generateContent and streamGenerateContent."""
    state = request.app[VERTEX_STATE]
    body = await request.read()
    refusal = _refusal(state, request)
    if refusal is not None:
        return refusal
    model, _, specifier = request.match_info["call"].partition(":")
    state.seen.append((request.raw_path, CIMultiDict(request.headers), body))
    if "x-fake-hold" in request.headers:
        await state.release.wait()
    pieces = [f"tok{i} " for i in range(int(request.headers.get("x-fake-chunks", "3")))]
    answers = _gemini_answers(model, pieces, "x-fake-no-usage" not in request.headers)
    if specifier == "generateContent":
        whole = answers[-1]
        whole["candidates"][0]["content"]["parts"] = [
            part for answer in answers for part in answer["candidates"][0]["content"]["parts"]
        ]
        return web.json_response(whole)
    if specifier != "streamGenerateContent":
        raise web.HTTPNotFound()
    is_held = request.headers.get("x-fake-hang") == "end"
    if request.query.get("alt") != "sse":
        if not is_held:
            return web.json_response(answers)
        # One JSON array, written event by event as Gemini streams it.
        pieces = [b"[" + orjson.dumps(answers[0])]
        pieces += [b"\n,\r\n" + orjson.dumps(answer) for answer in answers[1:]]
        return await chunked(request, [*pieces, b"\n]"], "application/json", is_held)
    pieces = [b"data: %s\r\n\r\n" % orjson.dumps(answer) for answer in answers]
    return await chunked(request, pieces, "text/event-stream", is_held)


def _gemini_answers(model: str, pieces: list[str], has_usage: bool) -> list[dict[str, Any]]:
    """A stream's events: a thought, one text piece each, a function call; usage at the end."""
    parts: list[dict[str, Any]] = [{"text": GEMINI_THOUGHT, "thought": True}]
    parts += [{"text": piece} for piece in pieces]
    parts.append({"functionCall": GEMINI_CALL})
    answers = [
        {
            "candidates": [{"content": {"role": "model", "parts": [part]}, "index": 0}],
            "modelVersion": model,
        }
        for part in parts
    ]
    answers[-1]["candidates"][0]["finishReason"] = "STOP"
    if has_usage:  # as Vertex does: the prompt's count early on, all of it at the end
        for answer in answers[:-1]:
            answer["usageMetadata"] = {"promptTokenCount": GEMINI_PROMPT}
        answers[-1]["usageMetadata"] = {
            "promptTokenCount": GEMINI_PROMPT,
            "candidatesTokenCount": len(pieces),
            "thoughtsTokenCount": GEMINI_THOUGHTS,
            "totalTokenCount": GEMINI_PROMPT + len(pieces) + GEMINI_THOUGHTS,
        }
    return answers
