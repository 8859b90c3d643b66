"""The fake provider's Realtime API: a WebSocket at /v1/realtime that echoes and obeys commands.

Mounted by `tests/support/fake_provider.py`. Its first frame is `session.created` (naming
CALL_MODEL as the session's model for a call's sideband, `?call_id=`, whose URL names none).
It accepts the subprotocol `realtime`, answers every ping
with a pong of the same payload (autoping is off, so a test sees pings pass the gateway),
echoes text and binary frames unchanged, and obeys JSON commands (in a text frame, or a binary
one, as lenient JSON readers take either):

    {"type": "response.create"}                      response.created, then response.done
                                                     with usage (11 input + 7 output tokens);
                                                     with "fake_hold": true, response.created
                                                     only, the rest held until fake.resume
    {"type": "session.update", "session": S}         session.updated with S merged into the
                                                     session (transcription_session.update,
                                                     the beta's, alike)
    {"type": "input_audio_buffer.append"}            nothing (the audio is taken)
    {"type": "input_audio_buffer.commit"}            input_audio_buffer.committed; with a
                                                     transcription model in the session (GA:
                                                     audio.input.transcription.model; beta:
                                                     input_audio_transcription.model), then
                                                     conversation.item.input_audio_transcription
                                                     .completed with its usage: whisper-1's
                                                     TRANSCRIBED_SECONDS, else tokens
                                                     (TRANSCRIBED_AUDIO_TOKENS in, TRANSCRIPT_TOKENS out);
                                                     with "fake_transcript": T, T transcribed
    {"type": "fake.resume"}                          send the rest of a held response
    {"type": "fake.close", "code": C, "reason": R}   close with code C and reason R
    {"type": "fake.ping", "data": D}                 send a ping with payload D
    {"type": "fake.drop"}                            drop the connection, no close frame
    {"type": "fake.flood", "count": N, "size": S}    send N text frames of S bytes at once
    {"type": "fake.quote_key", "as": A}              quote the credential of its handshake
                                                     (its Authorization header) in an error
                                                     event sent as A: "text" or "binary"; or
                                                     with A "ping" or "close", as a ping's
                                                     payload or its close reason
    {"type": "fake.generate", "text": T, "pieces": N, "done": D}
                                                     response.created, an audio delta, then T
                                                     as N transcript deltas and N tool-call
                                                     argument deltas; with D, a response.done
                                                     without usage; without, nothing more

At /v1/live/sessions (and a session's /fork, and a sideband's /attach) it is the Live API:
`response.create` answers the Responses events below (run by LIVE_DELEGATED_MODEL), each
inside a `response.event` (as Live reports what its Responses delegation runs), then
`session.usage.updated` with LIVE_SECONDS of audio.

At /v1/responses it is the Responses API's WebSocket mode instead: `response.create` answers
response.created, two response.output_text.delta events and response.completed with usage
(11 input, 2 of them cached, + 7 output tokens), or usage null when the command has
"fake_no_usage": true; with "fake_hold": true, response.created and the first delta, the rest
held until fake.resume (a turn in flight, for as long as a test needs); with "fake_refuse": true, only an `error` event (status 400,
previous_response_not_found), as the provider refuses a turn it will not run. Its
handshake answers with HANDSHAKE_HEADERS (Codex reads `x-codex-turn-state` and the like from
it), its own `x-request-id` and `x-ratelimit-*` among them.

Every socket's frames received and sent, its close, and its end are kept in
`app[REALTIME_STATE].sockets`, for assertions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import orjson
from aiohttp import WSCloseCode, WSMsgType, web

# The usage of each response.done: of the input, some cached, some audio and some image (one
# of the cached tokens is audio and one image, as the API breaks the cached ones down); of
# the output, audio.
INPUT_TOKENS, CACHED_TOKENS, INPUT_AUDIO_TOKENS, CACHED_AUDIO_TOKENS = 11, 2, 4, 1
INPUT_IMAGE_TOKENS, CACHED_IMAGE_TOKENS = 3, 1
OUTPUT_TOKENS, OUTPUT_AUDIO_TOKENS = 7, 5
# The model a WebRTC or SIP call runs, which its sideband's session.created names.
CALL_MODEL = "gpt-realtime"
# A Live session's cumulative audio after one response, and the model its delegation runs.
LIVE_SECONDS, LIVE_DELEGATED_MODEL = 4.5, "gpt-4.1-mini"
# The usage of each transcription of committed audio: tokens (gpt-4o-transcribe), or seconds.
TRANSCRIBED_AUDIO_TOKENS, TRANSCRIPT_TOKENS, TRANSCRIBED_SECONDS = 30, 6, 2.5
# What the Responses WebSocket mode's handshake answers with, beside the handshake's own.
HANDSHAKE_HEADERS = {
    "x-codex-turn-state": "turn-state-7f3a",
    "openai-model": "gpt-4o-mini-2024-07-18",
    "x-reasoning-included": "true",
    "x-request-id": "req_provider_ws_1",
    "x-ratelimit-remaining-requests": "4999",
}


@dataclass(slots=True)
class FakeSocket:
    """One session as the fake saw it; `ended` is set when its handler returns."""

    protocol: str | None
    received: list[tuple[WSMsgType, bytes | str]] = field(default_factory=list)
    sent: list[tuple[WSMsgType, bytes | str]] = field(default_factory=list)
    close: tuple[int, str] | None = None  # the close frame received: code, reason
    is_lost: bool = False  # the gateway went away without a close frame
    flooded: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(slots=True)
class RealtimeState:
    sockets: list[FakeSocket] = field(default_factory=list)
    opened: asyncio.Event = field(default_factory=asyncio.Event)


REALTIME_STATE = web.AppKey("fake_realtime_state", RealtimeState)


def install(app: web.Application) -> None:
    app[REALTIME_STATE] = RealtimeState()
    for prefix in ("/v1", ""):
        app.router.add_get(f"{prefix}/realtime", realtime)
        app.router.add_get(f"{prefix}/responses", realtime)  # the Responses API's WebSocket mode
    # Azure OpenAI's, at a resource's endpoint: `?deployment=<d>` (AzureOpenAI), and its v1 API.
    app.router.add_get("/openai/realtime", realtime)
    app.router.add_get("/openai/v1/realtime", realtime)
    app.router.add_get("/openai/v1/responses", realtime)  # Azure's Responses WebSocket mode
    app.router.add_get("/v1/live/sessions", realtime)  # the Live API
    app.router.add_get("/v1/live/sessions/{session_id}/fork", realtime)
    app.router.add_get("/v1/live/sessions/{session_id}/attach", realtime)  # a sideband


async def realtime(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse(protocols=("realtime",), autoping=False, autoclose=False)
    if request.path.endswith("/responses"):
        ws.headers.update(HANDSHAKE_HEADERS)
    await ws.prepare(request)
    state = request.app[REALTIME_STATE]
    socket = FakeSocket(ws.ws_protocol)
    state.sockets.append(socket)
    state.opened.set()
    try:
        await serve(ws, socket, request)
    finally:
        socket.ended.set()
    return ws


async def serve(ws: web.WebSocketResponse, socket: FakeSocket, request: web.Request) -> None:
    async def send(kind: WSMsgType, data: bytes | str) -> None:
        socket.sent.append((kind, data))
        if kind is WSMsgType.TEXT:
            await ws.send_str(data)  # type: ignore[arg-type]
        else:
            await ws.send_bytes(data)  # type: ignore[arg-type]

    async def answer(events: list[dict], command: dict, held_from: int) -> None:
        """Send `events`; with "fake_hold", only those before `held_from` (the rest held)."""
        if command.get("fake_hold"):
            events, held[:] = events[:held_from], events[held_from:]
        for event in events:
            await send(WSMsgType.TEXT, orjson.dumps(event).decode())

    created: dict = {"type": "session.created"}
    if "call_id" in request.query:  # a call's sideband: the session says the model it runs
        created["session"] = {"type": "realtime", "model": CALL_MODEL}
    await send(WSMsgType.TEXT, orjson.dumps(created).decode())
    session: dict = {}  # what session.update set
    held: list[dict] = []  # a held response's events, sent on fake.resume
    while True:
        message = await ws.receive()
        if message.type is WSMsgType.CLOSE:
            socket.close = (message.data, message.extra or "")
            await ws.close(code=message.data)
            return
        if message.type in (WSMsgType.CLOSED, WSMsgType.ERROR, WSMsgType.CLOSING):
            socket.is_lost = True
            return
        socket.received.append((message.type, message.data))
        if message.type is WSMsgType.PING:
            await ws.pong(message.data)
        elif message.type is WSMsgType.BINARY and not _command(message.data):
            await send(WSMsgType.BINARY, message.data)
        elif message.type in (WSMsgType.TEXT, WSMsgType.BINARY):  # JSON read from either
            command = _command(message.data)
            kind = command.get("type")
            if kind == "response.create" and request.path.endswith("/responses"):
                await answer(responses_events(command), command, held_from=2)
            elif kind == "response.create" and "/live/" in request.path:
                for event in live_events(command):
                    await send(WSMsgType.TEXT, orjson.dumps(event).decode())
            elif kind == "response.create":
                usage = {
                    "total_tokens": INPUT_TOKENS + OUTPUT_TOKENS,
                    "input_tokens": INPUT_TOKENS,
                    "output_tokens": OUTPUT_TOKENS,
                    "input_token_details": {
                        "cached_tokens": CACHED_TOKENS,
                        "text_tokens": INPUT_TOKENS - INPUT_AUDIO_TOKENS - INPUT_IMAGE_TOKENS,
                        "audio_tokens": INPUT_AUDIO_TOKENS,
                        "image_tokens": INPUT_IMAGE_TOKENS,
                        "cached_tokens_details": {
                            "text_tokens": CACHED_TOKENS
                            - CACHED_AUDIO_TOKENS
                            - CACHED_IMAGE_TOKENS,
                            "audio_tokens": CACHED_AUDIO_TOKENS,
                            "image_tokens": CACHED_IMAGE_TOKENS,
                        },
                    },
                    "output_token_details": {
                        "text_tokens": OUTPUT_TOKENS - OUTPUT_AUDIO_TOKENS,
                        "audio_tokens": OUTPUT_AUDIO_TOKENS,
                    },
                }
                events = [
                    {"type": "response.created", "response": {"status": "in_progress"}},
                    {"type": "response.done", "response": {"status": "completed", "usage": usage}},
                ]
                await answer(events, command, held_from=1)
            elif kind in ("session.update", "transcription_session.update"):
                session |= command.get("session") or {}
                updated = {"type": kind.replace("update", "updated"), "session": session}
                await send(WSMsgType.TEXT, orjson.dumps(updated).decode())
            elif kind == "input_audio_buffer.append":
                pass
            elif kind == "input_audio_buffer.commit":
                for event in committed(session, command.get("fake_transcript")):
                    await send(WSMsgType.TEXT, orjson.dumps(event).decode())
            elif kind == "fake.resume":
                events, held[:] = held[:], []
                for event in events:
                    await send(WSMsgType.TEXT, orjson.dumps(event).decode())
            elif kind == "fake.close":
                await ws.close(code=command["code"], message=command["reason"].encode())
                return
            elif kind == "fake.ping":
                await ws.ping(command["data"].encode())
            elif kind == "fake.drop":
                assert request.transport is not None
                request.transport.abort()
                socket.is_lost = True
                return
            elif kind == "fake.generate":
                for event in generated(command):
                    await send(WSMsgType.TEXT, orjson.dumps(event).decode())
            elif kind == "fake.quote_key":
                if await quote_key(ws, command.get("as"), request.headers, send):
                    return
            elif kind == "fake.flood":
                for index in range(command["count"]):
                    await send(WSMsgType.TEXT, f"{index:08d}".ljust(command["size"], "x"))
                socket.flooded.set()
            else:
                await send(WSMsgType.TEXT, message.data)


async def quote_key(
    ws: web.WebSocketResponse,
    kind: object,
    headers: Mapping[str, str],
    send: Callable[[WSMsgType, bytes | str], Awaitable[None]],
) -> bool:
    """Quote the handshake's credential back, as a provider refusing it might; True: closed."""
    quoted = f"Incorrect API key provided: {headers.get('Authorization', '')}."
    if kind == "close":
        await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=quoted.encode())
        return True
    if kind == "ping":
        await ws.ping(quoted.encode())
        return False
    event = {"type": "error", "error": {"type": "invalid_request_error", "message": quoted}}
    text = orjson.dumps(event).decode()
    if kind == "binary":
        await send(WSMsgType.BINARY, text.encode())
    else:
        await send(WSMsgType.TEXT, text)
    return False


def responses_events(command: dict) -> list[dict]:
    """A response in the Responses API's WebSocket mode: its events, usage last."""
    if command.get("fake_refuse"):
        error = {
            "type": "invalid_request_error",
            "code": "previous_response_not_found",
            "message": "Previous response with id 'resp_gone' not found.",
            "param": "previous_response_id",
        }
        return [{"type": "error", "status": 400, "error": error}]
    usage = None
    if not command.get("fake_no_usage"):
        usage = {
            "input_tokens": INPUT_TOKENS,
            "input_tokens_details": {"cached_tokens": CACHED_TOKENS},
            "output_tokens": OUTPUT_TOKENS,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": INPUT_TOKENS + OUTPUT_TOKENS,
        }
    running = {"id": "resp_ws_1", "object": "response", "status": "in_progress", "usage": None}
    return [
        {"type": "response.created", "response": running},
        {"type": "response.output_text.delta", "delta": "Hello, "},
        {"type": "response.output_text.delta", "delta": "world"},
        {
            "type": "response.completed",
            # The tier that served it, as over HTTP: the one asked for, else "default".
            "response": {
                **running,
                "status": "completed",
                "usage": usage,
                "service_tier": command.get("service_tier") or "default",
            },
        },
    ]


def live_events(command: dict) -> list[dict]:
    """A Live session's delegated response: its Responses events (the response run by
    LIVE_DELEGATED_MODEL), each in a `response.event`, then the session's cumulative audio."""
    events = responses_events(command)
    for event in events:
        if isinstance(event.get("response"), dict):
            event["response"]["model"] = LIVE_DELEGATED_MODEL
    wrapped = [
        {
            "type": "response.event",
            "event_id": f"event_{index}",
            "delegation_id": "dlg_1",
            "event": event,
        }
        for index, event in enumerate(events)
    ]
    usage = {
        "type": "session.usage.updated",
        "event_id": "event_usage",
        "usage": {"seconds": LIVE_SECONDS},
    }
    return [*wrapped, usage]


def committed(session: dict, transcript: str | None = None) -> list[dict]:
    """The events of committed audio: committed, then its transcription (`transcript`, else
    "Hello there.") if the session has a transcription model, with that model's usage."""
    item = "item_fake_1"
    events: list[dict] = [{"type": "input_audio_buffer.committed", "item_id": item}]
    ga = ((session.get("audio") or {}).get("input") or {}).get("transcription") or {}
    model = ga.get("model") or (session.get("input_audio_transcription") or {}).get("model")
    if model is None:
        return events
    usage: dict
    if model == "whisper-1":
        usage = {"type": "duration", "seconds": TRANSCRIBED_SECONDS}
    else:
        usage = {
            "type": "tokens",
            "total_tokens": TRANSCRIBED_AUDIO_TOKENS + TRANSCRIPT_TOKENS,
            "input_tokens": TRANSCRIBED_AUDIO_TOKENS,
            "input_token_details": {"text_tokens": 0, "audio_tokens": TRANSCRIBED_AUDIO_TOKENS},
            "output_tokens": TRANSCRIPT_TOKENS,
        }
    done = {
        "type": "conversation.item.input_audio_transcription.completed",
        "item_id": item,
        "content_index": 0,
        "transcript": transcript or "Hello there.",
        "usage": usage,
    }
    return [*events, done]


def generated(command: dict) -> list[dict]:
    """A response's events that say what it generated, as fake.generate describes them."""
    text, pieces = command["text"], command.get("pieces", 1)
    parts = [text[len(text) * i // pieces : len(text) * (i + 1) // pieces] for i in range(pieces)]
    events: list[dict] = [
        {"type": "response.created", "response": {"status": "in_progress"}},
        {"type": "response.output_audio.delta", "delta": "UklGRg==" * 500},  # base64 audio
    ]
    for kind in (
        "response.output_audio_transcript.delta",
        "response.function_call_arguments.delta",
    ):
        events += [{"type": kind, "delta": part} for part in parts]
    if command.get("done"):
        events.append({"type": "response.done", "response": {"status": "completed"}})
    return events


def _command(text: str | bytes) -> dict:
    try:
        document = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {}
    return document if isinstance(document, dict) else {}
