"""A fake Bedrock runtime: a real aiohttp app that checks every request's SigV4 signature.

Each request's signature is recomputed with botocore from what arrived (method, URL as
sent, the signed headers, the exact body bytes) and the same credentials the gateway's
keys.json holds; a request signed otherwise, or with one byte changed, gets Bedrock's 403
(InvalidSignatureException). Then it answers Bedrock's native paths for a Claude model:

    POST /model/{id}/invoke                        an Anthropic message, JSON (a meta.*
                                                   model: Llama's body; amazon.titan-text*:
                                                   Titan's), its token counts also in
                                                   X-Amzn-Bedrock-Input/Output-Token-Count
    POST /model/{id}/invoke-with-response-stream   AWS event-stream frames: each a `chunk`
                                                   {"bytes": base64 of an Anthropic event};
                                                   the last adds invocation metrics
    POST /model/{id}/converse                      a Converse answer, JSON, with `usage`
    POST /model/{id}/converse-stream               frames: messageStart, contentBlockDelta…,
                                                   messageStop, metadata (usage)
    POST /async-invoke                             an invocation's ARN (the model is the
                                                   body's `modelId`; its output goes to S3)
    GET  /async-invoke/{ARN}                       that invocation's state (its ARN's '/'
                                                   sent encoded, as boto3 sends it)
    POST /guardrail/{id or ARN}/version/{v}/apply  ApplyGuardrail: no intervention

and, as the control plane (`bedrock.<region>.amazonaws.com`), Anthropic's managed agents under
`/anthropic/v1/` (also under `/v1/`, where a client given a base URL of its own sends them):

    POST /anthropic/v1/agents, GET …/agents, GET …/agents/{id}      an agent, a page of them
    POST /anthropic/v1/sessions                                     a session
    POST /anthropic/v1/sessions/{id}/events                         the events sent, as stored
    GET  /anthropic/v1/sessions/{id}/events/stream                  SSE: agent.message events
                                                                    (`x-fake-chunks`, default 3),
                                                                    then session.status_idle

Asked by a real host's name (through a test's CONNECT proxy), each endpoint serves its own
paths only: the runtime's at `bedrock-runtime.<region>.amazonaws.com`, the control plane's at
`bedrock.<region>.amazonaws.com`; the other's get AWS's 404 (UnknownOperationException).

An invoke answer names the model as Bedrock does, by Anthropic's own name
(`us.anthropic.claude-sonnet-4-5-20250929-v1:0` answers `claude-sonnet-4-5-20250929`). It
reports INPUT_TOKENS input tokens and as many output tokens as it sends text pieces
(`x-fake-chunks`, default 3). A stream asked with `x-fake-exception: <type>` ends after its
first text piece with an exception frame of that type (`throttlingException`,
`modelStreamErrorException`), as Bedrock ends a stream that fails under its 200; one asked
with `x-fake-hang: end` holds its body's end, after its last frame, until the client leaves; a region in
`failing_at_start` sends its streams' start, then such a frame. A Converse
answer asked with `x-fake-cache-write-tokens: N` reports N tokens written to the cache,
`x-fake-cache-write-1h-tokens: M` of them for an hour (its `cacheDetails`, 1h before 5m).
A request asked with `x-fake-error: <type>` (ThrottlingException, ValidationException,
AccessDeniedException) is answered AWS's error whole: its status, `{"message"}`, and the type
in `x-amzn-ErrorType` with the suffix AWS adds (`ThrottlingException:http://internal...`).
An invoke with `x-fake-reflect` echoes the session token it was sent (`x-amz-security-token`)
in a header and in its body, as a debugging proxy in front of it may.
What it saw is kept in `app[BEDROCK_STATE]`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from multidict import CIMultiDict

from tests.support.fake_media import chunked

INPUT_TOKENS = 11
# What a managed agent runs on Bedrock: an inference profile's id, with its geography.
CLAUDE_PROFILE = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
EVENT_STREAM = "application/vnd.amazon.eventstream"
# A Claude model id, and Anthropic's own name in it (what an invoke answer's `model` says).
_CLAUDE_ID = re.compile(r"(?:[a-z]+\.)?anthropic\.(?P<name>claude-.+?)-v\d+(?::\d+)?")
_AUTHORIZATION = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/"
    r"(?P<service>[^/]+)/aws4_request, SignedHeaders=(?P<signed>[a-z0-9;-]+), "
    r"Signature=(?P<signature>[0-9a-f]{64})"
)


@dataclass
class BedrockState:
    """What the fake saw: each accepted request's headers and body, and the refusals."""

    access_key_id: str
    secret_access_key: str
    session_token: str | None
    region: str
    seen: list[tuple[str, CIMultiDict[str], bytes]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    # Regions served besides `region` (a key's fallback in another region), and regions
    # answering 503 ServiceUnavailableException (an outage) to a request signed for them.
    more_regions: set[str] = field(default_factory=set)
    down: set[str] = field(default_factory=set)
    # Regions whose streams fail at their start: the start (a `message_start` chunk, or
    # Converse's messageStart), then an exception frame of the type named here.
    failing_at_start: dict[str, str] = field(default_factory=dict)
    # A request with `x-fake-hold` is answered once this is set (after it is in `seen`).
    release: asyncio.Event = field(default_factory=asyncio.Event)


# AWS's errors answered whole, by their type: the status each comes with.
_ERROR_STATUS = {
    "ThrottlingException": 429,
    "ValidationException": 400,
    "AccessDeniedException": 403,
}
_CORAL = "http://internal.amazon.com/coral/com.amazon.bedrock/"

BEDROCK_STATE = web.AppKey("bedrock_state", BedrockState)


def bedrock_app(
    access_key_id: str, secret_access_key: str, session_token: str | None, region: str
) -> web.Application:
    app = web.Application()
    app[BEDROCK_STATE] = BedrockState(access_key_id, secret_access_key, session_token, region)
    app.router.add_post("/model/{model}/{action}", _handle)
    app.router.add_post("/async-invoke", _handle)
    app.router.add_get("/async-invoke/{arn:.+}", _handle)  # the ARN's '/' came encoded
    app.router.add_post("/guardrail/{guardrail:.+}/version/{version}/apply", _handle)
    app.router.add_route("*", "/anthropic/v1/{resource:.+}", _control_plane)
    app.router.add_route("*", "/v1/{resource:.+}", _control_plane)
    return app


def signature_problem(state: BedrockState, request: web.Request, body: bytes) -> str | None:
    """Why the request's SigV4 signature is not the one these credentials give; None: it is."""
    found = _AUTHORIZATION.fullmatch(request.headers.get("Authorization", ""))
    if found is None:
        return "no AWS4-HMAC-SHA256 Authorization"
    if found["key"] != state.access_key_id:
        return "another access key"
    regions = {state.region, *state.more_regions}
    if found["region"] not in regions or found["service"] != "bedrock":
        return "another region or service"
    if request.headers.get("X-Amz-Security-Token") != state.session_token:
        return "another session token"
    signed = found["signed"].split(";")
    headers = {name: request.headers[name] for name in signed if name != "host"}
    aws = AWSRequest(
        method=request.method, url=f"http://{request.host}{request.raw_path}", data=body,
        headers=headers,
    )  # fmt: skip
    aws.context["timestamp"] = request.headers.get("X-Amz-Date", "")
    credentials = Credentials(state.access_key_id, state.secret_access_key, state.session_token)
    signer = SigV4Auth(credentials, "bedrock", found["region"])
    expected = signer.signature(signer.string_to_sign(aws, signer.canonical_request(aws)), aws)
    if not hmac.compare_digest(expected, found["signature"]):
        return "the signature does not match"
    return None


def signed_region(request: web.Request | CIMultiDict[str]) -> str | None:
    """The region a request (or the headers it was seen with) is signed for."""
    headers = request.headers if isinstance(request, web.Request) else request
    found = _AUTHORIZATION.fullmatch(headers.get("Authorization", ""))
    return None if found is None else found["region"]


def _refusal(
    state: BedrockState, request: web.Request, body: bytes, host: str
) -> web.Response | None:
    """AWS's answer to a request this endpoint (`host`: its name's first label) does not
    take: another endpoint's path asked by a real host's name (404), or a signature that is
    not these credentials' (403). None: it is served, and kept in `seen`."""
    name = request.url.host or ""
    if name.endswith(".amazonaws.com") and not name.startswith(f"{host}."):
        state.refused.append(f"{request.path} at {name}")
        return web.json_response(
            {"message": f"Unknown operation {request.method} {request.path}"},
            status=404,
            headers={"x-amzn-ErrorType": "UnknownOperationException"},
        )
    problem = signature_problem(state, request, body)
    if problem is not None:
        state.refused.append(problem)
        return web.json_response(
            {"message": f"The request signature we calculated does not match ({problem})."},
            status=403,
            headers={"x-amzn-ErrorType": "InvalidSignatureException"},
        )
    state.seen.append((request.raw_path, CIMultiDict(request.headers), body))
    return None


async def _handle(request: web.Request) -> web.StreamResponse:
    state = request.app[BEDROCK_STATE]
    body = await request.read()
    refusal = _refusal(state, request, body, "bedrock-runtime")
    if refusal is not None:
        return refusal
    if signed_region(request) in state.down:
        return web.json_response(
            {"message": "Bedrock is unable to process your request."},
            status=503,
            headers={"x-amzn-ErrorType": "ServiceUnavailableException"},
        )
    error = request.headers.get("x-fake-error")
    if error is not None:
        return web.json_response(
            {"message": f"{error}: the fake's message."},
            status=_ERROR_STATUS[error],
            headers={"x-amzn-ErrorType": f"{error}:{_CORAL}", "x-amzn-RequestId": "fake-1"},
        )
    if "x-fake-hold" in request.headers:
        await state.release.wait()
    if request.path == "/async-invoke":
        return web.json_response(
            {"invocationArn": f"arn:aws:bedrock:{state.region}:1:async-invoke/x"}
        )
    if "arn" in request.match_info:  # GetAsyncInvoke: the invocation's state
        return web.json_response(
            {
                "invocationArn": request.match_info["arn"],
                "modelArn": f"arn:aws:bedrock:{state.region}::foundation-model/amazon.nova-reel-v1:1",
                "status": "InProgress",
                "submitTime": "2026-01-01T00:00:00Z",
                "outputDataConfig": {"s3OutputDataConfig": {"s3Uri": "s3://bucket/videos/"}},
            }
        )
    if "guardrail" in request.match_info:  # ApplyGuardrail: nothing to intervene on
        return web.json_response(
            {"usage": {"topicPolicyUnits": 1}, "action": "NONE", "outputs": [], "assessments": []}
        )
    model = request.match_info["model"]
    pieces = [f"tok{i} " for i in range(int(request.headers.get("x-fake-chunks", "3")))]
    action = request.match_info["action"]
    if action == "invoke":
        if "x-fake-reflect" in request.headers:  # a debugging proxy echoing what it was sent
            sent = request.headers.get("x-amz-security-token", "")
            answer = {**_message(model, pieces), "sent": sent}
            return web.json_response(answer, headers={"x-echo-security-token": sent})
        # Every InvokeModel answer counts its tokens in headers, whatever the model's body.
        counted = {
            "X-Amzn-Bedrock-Input-Token-Count": str(INPUT_TOKENS),
            "X-Amzn-Bedrock-Output-Token-Count": str(len(pieces)),
        }
        if model.startswith("meta."):  # Llama's own body: its counts, under its own names
            llama = {
                "generation": "".join(pieces),
                "prompt_token_count": INPUT_TOKENS,
                "generation_token_count": len(pieces),
                "stop_reason": "stop",
            }
            return web.json_response(llama, headers=counted)
        if model.startswith("amazon.titan-text"):  # Titan's: `results`, no usage object
            titan = {
                "inputTextTokenCount": INPUT_TOKENS,
                "results": [
                    {
                        "tokenCount": len(pieces),
                        "outputText": "".join(pieces),
                        "completionReason": "FINISH",
                    }
                ],
            }
            return web.json_response(titan, headers=counted)
        return web.json_response(_message(model, pieces), headers=counted)
    if action == "converse":
        return web.json_response(_converse(pieces, request.headers))
    if action == "count-tokens":  # CountTokens: the prompt's tokens, nothing generated
        return web.json_response({"inputTokens": INPUT_TOKENS})
    if action == "invoke-with-response-stream":
        frames = [_chunk(event) for event in _message_events(model, pieces)]
    elif action == "converse-stream":
        frames = [frame(kind, event) for kind, event in _converse_events(pieces, request.headers)]
    else:
        raise web.HTTPNotFound()
    at_start = state.failing_at_start.get(signed_region(request) or "")
    if at_start is not None:
        return await chunked(
            request, [frames[0], exception_frame(at_start, "Try again later.")], EVENT_STREAM
        )
    exception = request.headers.get("x-fake-exception")
    if exception is not None:  # cut after the first text piece (and what came before it)
        first_piece = next(i for i, one in enumerate(frames) if b"tok0" in _payload_text(one))
        frames = [*frames[: first_piece + 1], exception_frame(exception, "Try again later.")]
    return await chunked(
        request, frames, EVENT_STREAM, is_held=request.headers.get("x-fake-hang") == "end"
    )


async def _control_plane(request: web.Request) -> web.StreamResponse:
    """Anthropic's managed agents on Bedrock's control plane: just enough of each answer
    for the SDK to read it."""
    state = request.app[BEDROCK_STATE]
    body = await request.read()
    refusal = _refusal(state, request, body, "bedrock")
    if refusal is not None:
        return refusal
    sent = orjson.loads(body) if body else {}
    path, method = request.match_info["resource"].split("/"), request.method
    if path == ["agents"] and method == "POST":
        return web.json_response(_agent(sent.get("name", ""), sent.get("model")))
    if path == ["agents"] and method == "GET":
        return web.json_response({"data": [_agent("first", CLAUDE_PROFILE)], "next_page": None})
    if path[0] == "agents" and len(path) == 2 and method == "GET":
        return web.json_response(_agent("first", CLAUDE_PROFILE) | {"id": path[1]})
    if path == ["sessions"] and method == "POST":
        session = {"id": "sesn_bdrk_1", "type": "session", "status": "idle"}
        return web.json_response(session | {"agent": {"id": sent.get("agent"), "type": "agent"}})
    if path[0] == "sessions" and path[2:] == ["events"] and method == "POST":
        events = [event | {"id": f"sevt_{i}"} for i, event in enumerate(sent.get("events", []))]
        return web.json_response({"data": events})
    if path[0] == "sessions" and path[2:] == ["events", "stream"] and method == "GET":
        pieces = int(request.headers.get("x-fake-chunks", "3"))
        events = [
            ("agent.message", {"content": [{"type": "text", "text": f"tok{i} "}]})
            for i in range(pieces)
        ]
        events.append(("session.status_idle", {"stop_reason": {"type": "end_turn"}}))
        frames = [
            b"event: %s\ndata: %s\n\n"
            % (kind.encode(), orjson.dumps({"type": kind, "id": f"sevt_{i}", **data}))
            for i, (kind, data) in enumerate(events)
        ]
        return await chunked(request, frames, "text/event-stream")
    raise web.HTTPNotFound()


def _agent(name: str, model: Any) -> dict[str, Any]:
    model_config = model if isinstance(model, dict) else {"id": model}
    return {
        "id": "agent_bdrk_1",
        "type": "agent",
        "name": name,
        "model": model_config,
        "version": 1,
        "metadata": {},
        "mcp_servers": [],
        "skills": [],
        "tools": [],
        "created_at": "2026-12-01T00:00:00Z",
        "updated_at": "2026-12-01T00:00:00Z",
    }


def _usage(pieces: list[str]) -> dict[str, int]:
    return {"input_tokens": INPUT_TOKENS, "output_tokens": len(pieces)}


def _message(model: str, pieces: list[str]) -> dict[str, Any]:
    claude = _CLAUDE_ID.fullmatch(model)
    return {
        "id": "msg_bdrk_1",
        "type": "message",
        "role": "assistant",
        "model": model if claude is None else claude["name"],
        "content": [{"type": "text", "text": "".join(pieces)}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": _usage(pieces),
    }


def _message_events(model: str, pieces: list[str]) -> list[dict[str, Any]]:
    start = _message(model, [])
    start["content"], start["usage"] = [], {"input_tokens": INPUT_TOKENS, "output_tokens": 1}
    events: list[dict[str, Any]] = [{"type": "message_start", "message": start}]
    events.append(
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    )
    events += [
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}}
        for p in pieces
    ]
    events.append({"type": "content_block_stop", "index": 0})
    events.append(
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": len(pieces)},
        }
    )
    metrics = {"inputTokenCount": INPUT_TOKENS, "outputTokenCount": len(pieces)}
    events.append({"type": "message_stop", "amazon-bedrock-invocationMetrics": metrics})
    return events


def _converse(pieces: list[str], headers: Mapping[str, str]) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "inputTokens": INPUT_TOKENS,
        "outputTokens": len(pieces),
        "totalTokens": INPUT_TOKENS + len(pieces),
    }
    writes = int(headers.get("x-fake-cache-write-tokens", "0"))
    if writes:  # written to the cache, beside inputTokens; `cacheDetails` by lifetime
        one_hour = int(headers.get("x-fake-cache-write-1h-tokens", "0"))
        details = [{"ttl": "1h", "inputTokens": one_hour}] if one_hour else []
        if writes > one_hour:
            details.append({"ttl": "5m", "inputTokens": writes - one_hour})
        usage |= {"cacheReadInputTokens": 0, "cacheWriteInputTokens": writes}
        usage |= {"cacheDetails": details, "totalTokens": usage["totalTokens"] + writes}
    return {
        "output": {"message": {"role": "assistant", "content": [{"text": "".join(pieces)}]}},
        "stopReason": "end_turn",
        "usage": usage,
        "metrics": {"latencyMs": 5},
    }


def _converse_events(
    pieces: list[str], headers: Mapping[str, str]
) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = [("messageStart", {"role": "assistant"})]
    events += [
        ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": p}}) for p in pieces
    ]
    events.append(("contentBlockStop", {"contentBlockIndex": 0}))
    events.append(("messageStop", {"stopReason": "end_turn"}))
    usage = _converse(pieces, headers)["usage"]
    events.append(("metadata", {"usage": usage, "metrics": {"latencyMs": 5}}))
    return events


def _chunk(event: dict[str, Any]) -> bytes:
    return frame("chunk", {"bytes": base64.b64encode(orjson.dumps(event)).decode()})


def frame(event_type: str, payload: dict[str, Any]) -> bytes:
    """One AWS event-stream message: prelude, string headers, JSON payload, CRCs."""
    return _encoded(
        ((":event-type", event_type), (":content-type", "application/json"), (":message-type", "event")),
        orjson.dumps(payload),
    )  # fmt: skip


def exception_frame(exception_type: str, message: str) -> bytes:
    """An event stream's exception message, as Bedrock ends a failed stream with one."""
    return _encoded(
        (
            (":exception-type", exception_type),
            (":content-type", "application/json"),
            (":message-type", "exception"),
        ),
        orjson.dumps({"message": message}),
    )


def _payload_text(message: bytes) -> bytes:
    """A message's payload, a chunk's base64 decoded: where a text piece shows."""
    headers_length = struct.unpack(">I", message[4:8])[0]
    payload = message[12 + headers_length : -4]
    encoded = orjson.loads(payload).get("bytes")
    return base64.b64decode(encoded) if isinstance(encoded, str) else payload


def _encoded(header_pairs: tuple[tuple[str, str], ...], data: bytes) -> bytes:
    headers = b"".join(_header(name, value) for name, value in header_pairs)
    total = 12 + len(headers) + len(data) + 4
    prelude = struct.pack(">II", total, len(headers))
    prelude += struct.pack(">I", binascii.crc32(prelude))
    message = prelude + headers + data
    return message + struct.pack(">I", binascii.crc32(message))


def _header(name: str, value: str) -> bytes:
    encoded = value.encode()
    return bytes([len(name)]) + name.encode() + b"\x07" + struct.pack(">H", len(encoded)) + encoded
