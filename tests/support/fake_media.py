"""The fake provider's endpoints without token usage, and those that name their model elsewhere.

Mounted by `tests/support/fake_provider.py` (its middleware records and steers these too):

    POST /images/generations (JSON), /images/edits, /images/variations (multipart)
        `n` images (default 1); a GPT image model (`gpt-image-*`) reports token usage:
        IMAGE_INPUT_TOKENS of text in (an edit adds EDIT_IMAGE_TOKENS of image),
        IMAGE_OUTPUT_TOKENS of image per image out; a DALL·E one reports none; `stream`
        true (a form's "true"): `partial_images` `image_generation.partial_image` events
        (`image_edit.…` for an edit), then `….completed` with that usage
    POST /audio/speech (JSON)
        AUDIO_BYTES of audio/mpeg, no usage (as the API answers tts-1 and gpt-4o-mini-tts),
        chunked in AUDIO_CHUNKS pieces as the API streams it; `stream_format: "sse"`:
        `speech.audio.delta` events, then `speech.audio.done` with token usage
        (SPEECH_INPUT_TOKENS in, SPEECH_OUTPUT_TOKENS out)
    POST /audio/transcriptions, /audio/translations (multipart)
        whisper-1: usage {"type": "duration", "seconds": AUDIO_SECONDS}; response_format
        verbose_json adds `duration`; a translation reports no usage (its `duration` only
        in verbose_json); any other model: token usage (TRANSCRIBE_INPUT_TOKENS of them
        audio, TRANSCRIBE_OUTPUT_TOKENS out); a transcription's form field `stream` "true":
        `transcript.text.delta` events, then `transcript.text.done` with that usage
    POST /realtime/client_secrets, /realtime/sessions, /realtime/transcription_sessions
        an ephemeral key `ek_fake_…` (the real API's shapes)
    POST /threads/runs, /threads/{thread_id}/runs
        a queued run, its model the body's or ASSISTANT_MODEL (the assistant's)
    POST /videos (multipart, as the SDK sends it)
        a queued video job (the real API's shape): its model the form's or sora-2, its
        `seconds` and `size` the form's or the API's defaults; no usage (billed per second)

A stream asked with `x-fake-hang: end` holds its body's end, after its last event, until the
client leaves. A `model` absent from an image, audio or video request is answered with the model the real
API would pick; the fake does not check what it is sent beyond that.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
import uuid
from typing import Any

import orjson
from aiohttp import web
from multipart import MultipartParser, parse_options_header  # type: ignore[import-untyped]

IMAGE_INPUT_TOKENS, IMAGE_OUTPUT_TOKENS, EDIT_IMAGE_TOKENS = 50, 4160, 1000
AUDIO_BYTES, AUDIO_CHUNKS = 4096, 4
SPEECH_INPUT_TOKENS, SPEECH_OUTPUT_TOKENS = 7, 300
AUDIO_SECONDS = 90.0
TRANSCRIBE_INPUT_TOKENS, TRANSCRIBE_AUDIO_TOKENS, TRANSCRIBE_OUTPUT_TOKENS = 120, 110, 40
ASSISTANT_MODEL = "gpt-4.1"
SSE_TYPE = "text/event-stream; charset=utf-8"
HELD_POLL_SECONDS = 0.01  # how often a held body looks whether its client left
# A tiny PNG (1x1, transparent): what each fake image holds.
PIXEL = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
)


def install(app: web.Application) -> None:
    for prefix in ("/v1", ""):
        for path in ("generations", "edits", "variations"):
            app.router.add_post(f"{prefix}/images/{path}", images)
        app.router.add_post(f"{prefix}/audio/speech", speech)
        app.router.add_post(f"{prefix}/audio/transcriptions", transcription)
        app.router.add_post(f"{prefix}/audio/translations", transcription)
        app.router.add_post(f"{prefix}/realtime/client_secrets", client_secret)
        app.router.add_post(f"{prefix}/realtime/sessions", session)
        app.router.add_post(f"{prefix}/realtime/transcription_sessions", session)
        app.router.add_post(f"{prefix}/threads/runs", run)
        app.router.add_post(f"{prefix}/threads/{{thread_id}}/runs", run)
        app.router.add_post(f"{prefix}/videos", video)


async def fields(request: web.Request) -> dict[str, Any]:
    """A JSON body, or a multipart form's text fields (files as their size)."""
    body = await request.read()  # already read by the fake's middleware: kept, not re-read
    if request.content_type == "multipart/form-data":
        _, options = parse_options_header(request.headers["content-type"])
        parts = MultipartParser(io.BytesIO(body), options["boundary"])
        return {part.name: part.size if part.filename else part.value for part in parts}
    document = orjson.loads(body) if body else {}
    return document if isinstance(document, dict) else {}


def answer(payload: object) -> web.Response:
    return web.Response(body=orjson.dumps(payload), content_type="application/json")


async def images(request: web.Request) -> web.StreamResponse:
    sent = await fields(request)
    model = str(sent.get("model") or "gpt-image-1")
    count = int(sent.get("n") or 1)
    body: dict[str, Any] = {"created": int(time.time()), "data": [{"b64_json": PIXEL}] * count}
    if model.startswith("gpt-image"):
        images_in = EDIT_IMAGE_TOKENS if request.path.endswith("/edits") else 0
        output = IMAGE_OUTPUT_TOKENS * count
        body["usage"] = {
            "input_tokens": IMAGE_INPUT_TOKENS + images_in,
            "input_tokens_details": {"image_tokens": images_in, "text_tokens": IMAGE_INPUT_TOKENS},
            "output_tokens": output,
            "output_tokens_details": {"image_tokens": output, "text_tokens": 0},
            "total_tokens": IMAGE_INPUT_TOKENS + images_in + output,
        }
    if sent.get("stream") in (True, "true"):
        kind = "image_edit" if request.path.endswith("/edits") else "image_generation"
        events: list[dict[str, Any]] = [
            {"type": f"{kind}.partial_image", "b64_json": PIXEL, "partial_image_index": index}
            for index in range(int(sent.get("partial_images") or 0))
        ]
        completed = {"type": f"{kind}.completed", "b64_json": PIXEL}
        events.append({**completed, **({"usage": body["usage"]} if "usage" in body else {})})
        return await chunked(request, [sse(event) for event in events], SSE_TYPE, is_held(request))
    return answer(body)


async def speech(request: web.Request) -> web.StreamResponse:
    sent = await fields(request)
    audio = b"\xff\xfb" * (AUDIO_BYTES // 2)
    size = AUDIO_BYTES // AUDIO_CHUNKS
    pieces = [audio[start : start + size] for start in range(0, AUDIO_BYTES, size)]
    if sent.get("stream_format") != "sse":
        return await chunked(request, pieces, "audio/mpeg")
    usage = {
        "input_tokens": SPEECH_INPUT_TOKENS,
        "output_tokens": SPEECH_OUTPUT_TOKENS,
        "total_tokens": SPEECH_INPUT_TOKENS + SPEECH_OUTPUT_TOKENS,
    }
    events = [
        {"type": "speech.audio.delta", "audio": base64.b64encode(piece).decode()}
        for piece in pieces
    ]
    events.append({"type": "speech.audio.done", "usage": usage})
    return await chunked(request, [sse(event) for event in events], SSE_TYPE, is_held(request))


def sse(event: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(event) + b"\n\n"


async def chunked(
    request: web.Request, pieces: list[bytes], content_type: str, is_held: bool = False
) -> web.StreamResponse:
    """The pieces written one by one, without a Content-Length (Transfer-Encoding: chunked);
    `is_held`: the body's end held until the client leaves (as a provider whose last chunk
    comes after its last event)."""
    response = web.StreamResponse(headers={"Content-Type": content_type})
    await response.prepare(request)
    for piece in pieces:
        await response.write(piece)
    if is_held:
        await until_gone(request)
        return response
    await response.write_eof()
    return response


def is_held(request: web.Request) -> bool:
    """The request asks its stream's body end held (`x-fake-hang: end`)."""
    return request.headers.get("x-fake-hang") == "end"


async def until_gone(request: web.Request) -> None:
    """Hold an answer's end until its client leaves."""
    while request.transport is not None and not request.transport.is_closing():
        await asyncio.sleep(HELD_POLL_SECONDS)


async def transcription(request: web.Request) -> web.StreamResponse:
    sent = await fields(request)
    model = str(sent.get("model") or "whisper-1")
    is_translation = request.path.endswith("/translations")
    body: dict[str, Any] = {"text": "fake words"}
    if sent.get("response_format") == "verbose_json":
        task = "translate" if is_translation else "transcribe"
        body.update(task=task, language="english", duration=AUDIO_SECONDS, segments=[])
    if is_translation:  # the API's translations report no usage
        return answer(body)
    if model == "whisper-1":
        body["usage"] = {"type": "duration", "seconds": AUDIO_SECONDS}
    else:
        body["usage"] = {
            "type": "tokens",
            "input_tokens": TRANSCRIBE_INPUT_TOKENS,
            "input_token_details": {
                "audio_tokens": TRANSCRIBE_AUDIO_TOKENS,
                "text_tokens": TRANSCRIBE_INPUT_TOKENS - TRANSCRIBE_AUDIO_TOKENS,
            },
            "output_tokens": TRANSCRIBE_OUTPUT_TOKENS,
            "total_tokens": TRANSCRIBE_INPUT_TOKENS + TRANSCRIBE_OUTPUT_TOKENS,
        }
    if sent.get("stream") == "true":
        words = str(body["text"]).split(" ")
        events = [{"type": "transcript.text.delta", "delta": word} for word in words]
        events.append(
            {"type": "transcript.text.done", "text": body["text"], "usage": body["usage"]}
        )
        return await chunked(request, [sse(event) for event in events], SSE_TYPE, is_held(request))
    return answer(body)


def ephemeral_key() -> dict[str, Any]:
    return {"value": f"ek_fake_{uuid.uuid4().hex}", "expires_at": int(time.time()) + 600}


async def client_secret(request: web.Request) -> web.Response:
    sent = await fields(request)
    session = sent.get("session") if isinstance(sent.get("session"), dict) else {}
    return answer({**ephemeral_key(), "session": {"type": "realtime", **session}})


async def session(request: web.Request) -> web.Response:
    sent = await fields(request)
    return answer(
        {"id": f"sess_{uuid.uuid4().hex[:16]}", "object": "realtime.session", **sent}
        | {"client_secret": ephemeral_key()}
    )


async def run(request: web.Request) -> web.Response:
    sent = await fields(request)
    thread_id = request.match_info.get("thread_id") or f"thread_{uuid.uuid4().hex[:16]}"
    return answer(
        {
            "id": f"run_{uuid.uuid4().hex[:16]}",
            "object": "thread.run",
            "created_at": int(time.time()),
            "assistant_id": sent.get("assistant_id"),
            "thread_id": thread_id,
            "status": "queued",
            "model": sent.get("model") or ASSISTANT_MODEL,
            "instructions": "",
            "tools": [],
            "parallel_tool_calls": True,
        }
    )


async def video(request: web.Request) -> web.Response:
    sent = await fields(request)
    return answer(
        {
            "id": f"video_{uuid.uuid4().hex[:16]}",
            "object": "video",
            "model": sent.get("model") or "sora-2",
            "status": "queued",
            "progress": 0,
            "created_at": int(time.time()),
            "completed_at": None,
            "expires_at": None,
            "prompt": sent.get("prompt"),
            "seconds": sent.get("seconds") or "4",
            "size": sent.get("size") or "720x1280",
            "remixed_from_video_id": None,
            "error": None,
        }
    )
