"""A fake self-hosted model server: the shapes Ollama, vLLM, llama.cpp's server and TGI answer.

A real aiohttp app, beside `fake_provider` (which speaks the clouds' APIs): a platform team
declares such a server in keys.json (`"auth": "none"`, an http:// base URL) and its answers
differ from OpenAI's in ways the gateway has to read. What it answers:

Ollama's native API, at its root (`base_url` without `/v1`):
    POST /api/chat, /api/generate   a stream by default (`"stream": false`: one JSON body):
                                    newline-delimited JSON, `application/x-ndjson`, one object
                                    a token (`message.content` / `response`), written one by
                                    one; the last (`"done": true`) carries the counts,
                                    `prompt_eval_count` and `eval_count`, and the timings
    POST /api/embed                 `embeddings`, with `prompt_eval_count`
    GET  /api/tags                  the local models
    errors                          `{"error": "<a sentence>"}`: a string, not an object

llama.cpp's native API, at its root:
    POST /completion, /infill   `{"content", "stop", "tokens_predicted", "tokens_evaluated", "timings"...}`;
                                `"stream": true`: an event stream of such objects (`data:` lines, no
                                `[DONE]`), each with the running counts, the last `"stop": true`
    POST /tokenize              `{"tokens": [...]}`: counts nothing, generates nothing

Hugging Face TGI's native API, at its root:
    POST /generate          `{"generated_text": ...}`, with `details` (`generated_tokens`,
                            `input_length`) only when `parameters.details` is true
    POST /generate_stream   an event stream (`data:` with no space), one `{"token": {"text"},
                            "generated_text": null, "details": null}` a token; the last has the
                            whole `generated_text` (and `details`, when asked)

OpenAI-compatible (`/v1/...`), as each server flavours it (`x-fake-flavour`):
    vllm      usage only when asked (`stream_options.include_usage`), in a last chunk of no
              choices; with `continuous_usage_stats` also in every chunk, cumulative
    llamacpp  usage and `timings` in the finishing chunk (choices not empty), whether asked
              or not (llama.cpp before its fix of #15443), no separate usage chunk
    ollama    usage only when asked, in a last chunk of no choices

Steering headers (they pass through the gateway unchanged):
    x-fake-chunks: N        N content tokens (default 3): "tok0 tok1 ..."; N is the completion
                            count reported
    x-fake-status: N        answer N with the server's error body (Ollama: a string `error`;
                            `/v1/`: llama.cpp's loading error for 503, else vLLM's object)
    x-fake-error-midstream: 1   a stream's second line is an error (Ollama: `{"error": "..."}`;
                            llama.cpp's `/v1` stream: an `error: {"code": 500, ...}` line, a
                            field of its own, not `data:`, as older builds send a failure,
                            then `data: [DONE]`)
    x-fake-error-first: N   the first N requests carrying it: llama.cpp's `/v1` stream sends that
                            `error:` line right after its start (the role chunk), a 503 of a
                            server still loading (`unavailable_error`); the others answer
    x-fake-hang: end        an Ollama stream holds its body's end, after its last line, until
                            the client leaves
    x-fake-hold: 1          each stream line waits until the test sets `state.step` (an
                            asyncio.Event, cleared after each line): one line at a time

What it saw is kept in `app[SELFHOSTED_STATE]`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.support.fake_media import until_gone

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
MODEL = "llama3.2:1b"
PROMPT_TOKENS = 7


@dataclass
class SelfHostedState:
    """What the fake saw, and the event a held stream waits on for each line."""

    requests: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    step: asyncio.Event = field(default_factory=asyncio.Event)
    lines_sent: int = 0
    failed_first: int = 0  # requests x-fake-error-first failed


SELFHOSTED_STATE = web.AppKey("selfhosted_state", SelfHostedState)


def build_fake_selfhosted() -> web.Application:
    app = web.Application()
    app[SELFHOSTED_STATE] = SelfHostedState()
    app.router.add_post("/api/chat", ollama_generate)
    app.router.add_post("/api/generate", ollama_generate)
    app.router.add_post("/api/embed", ollama_embed)
    app.router.add_get("/api/tags", ollama_tags)
    app.router.add_post("/v1/chat/completions", openai_chat)
    app.router.add_post("/completion", llamacpp_completion)
    app.router.add_post("/infill", llamacpp_completion)
    app.router.add_post("/tokenize", llamacpp_tokenize)
    app.router.add_post("/generate", tgi_generate)
    app.router.add_post("/generate_stream", tgi_generate)
    return app


async def _seen(request: web.Request) -> tuple[SelfHostedState, dict[str, Any]]:
    state = request.app[SELFHOSTED_STATE]
    raw = await request.read()
    body = orjson.loads(raw) if raw else {}
    state.requests.append((request.method, request.path, body))
    state.headers.append(dict(request.headers))
    return state, body


def _count(request: web.Request) -> int:
    return int(request.headers.get("x-fake-chunks", "3"))


def ollama_error(status: int, message: str) -> web.Response:
    """Ollama's error: a JSON object whose `error` is a sentence."""
    return web.json_response({"error": message}, status=status)


async def _line(
    response: web.StreamResponse, state: SelfHostedState, data: bytes, held: bool
) -> None:
    if held:
        await state.step.wait()
        state.step.clear()
    await response.write(data)
    state.lines_sent += 1


async def ollama_generate(request: web.Request) -> web.StreamResponse:
    """/api/chat and /api/generate: NDJSON tokens, the counts in the last line."""
    state, body = await _seen(request)
    status = request.headers.get("x-fake-status")
    model = body.get("model") or MODEL
    if status is not None:
        return ollama_error(int(status), f'model "{model}" not found, try pulling it first')
    count = _count(request)
    is_chat = request.path == "/api/chat"
    created = "2024-08-04T08:52:19.385406455-07:00"

    def piece(text: str) -> dict[str, Any]:
        if is_chat:
            return {"model": model, "created_at": created,
                    "message": {"role": "assistant", "content": text}, "done": False}  # fmt: skip
        return {"model": model, "created_at": created, "response": text, "done": False}

    last = {
        **piece(""),
        "done": True,
        "done_reason": "stop",
        "total_duration": 4883583458,
        "load_duration": 1334875,
        "prompt_eval_count": PROMPT_TOKENS,
        "prompt_eval_duration": 342546000,
        "eval_count": count,
        "eval_duration": 4535599000,
    }
    if body.get("stream", True) is False:
        whole = {**last, **({"message": {"role": "assistant", "content": _text(count)}}
                            if is_chat else {"response": _text(count)})}  # fmt: skip
        return web.json_response(whole)
    response = web.StreamResponse(headers={"Content-Type": NDJSON})
    await response.prepare(request)
    held = request.headers.get("x-fake-hold") == "1"
    for index in range(count):
        if index == 1 and request.headers.get("x-fake-error-midstream") == "1":
            await _line(response, state, orjson.dumps({"error": "an error was encountered while running the model: unexpected EOF"}) + b"\n", held)  # fmt: skip
            await response.write_eof()
            return response
        await _line(response, state, orjson.dumps(piece(f"tok{index} ")) + b"\n", held)
    await _line(response, state, orjson.dumps(last) + b"\n", held)
    if request.headers.get("x-fake-hang") == "end":
        await until_gone(request)
        return response
    await response.write_eof()
    return response


def _text(count: int) -> str:
    return "".join(f"tok{index} " for index in range(count))


async def ollama_embed(request: web.Request) -> web.Response:
    _, body = await _seen(request)
    return web.json_response(
        {
            "model": body.get("model") or "all-minilm",
            "embeddings": [[0.01, -0.02, 0.03]],
            "total_duration": 14143917,
            "load_duration": 1019500,
            "prompt_eval_count": PROMPT_TOKENS,
        }
    )


async def ollama_tags(request: web.Request) -> web.Response:
    await _seen(request)
    model = {"name": MODEL, "model": MODEL, "size": 1321098329, "digest": "baf6a787fdff"}
    return web.json_response({"models": [model]})


async def openai_chat(request: web.Request) -> web.StreamResponse:
    """/v1/chat/completions as vLLM, llama.cpp or Ollama's OpenAI mode answer it."""
    state, body = await _seen(request)
    flavour = request.headers.get("x-fake-flavour", "vllm")
    status = request.headers.get("x-fake-status")
    if status is not None:
        code = int(status)
        if flavour == "llamacpp" and code == 503:
            error = {"code": 503, "message": "Loading model", "type": "unavailable_error"}
        elif flavour == "ollama":
            return ollama_error(code, "model is required")
        else:
            error = {"object": "error", "message": "boom", "type": "BadRequestError",
                     "param": None, "code": code}  # fmt: skip
        return web.json_response({"error": error}, status=code)
    count = _count(request)
    model = body.get("model") or MODEL
    usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": count,
             "total_tokens": PROMPT_TOKENS + count}  # fmt: skip
    chunk_id, created = "chatcmpl-1", int(time.time())
    if not body.get("stream"):
        message = {"role": "assistant", "content": _text(count)}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return web.json_response({"id": chunk_id, "object": "chat.completion", "created": created,
                                  "model": model, "choices": [choice], "usage": usage})  # fmt: skip
    options = body.get("stream_options") or {}
    asked = options.get("include_usage") is True
    continuous = asked and options.get("continuous_usage_stats") is True and flavour == "vllm"

    def chunk(delta: dict[str, Any], finish: str | None, done: int) -> dict[str, Any]:
        event: dict[str, Any] = {
            "id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }  # fmt: skip
        if continuous:
            event["usage"] = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": done,
                              "total_tokens": PROMPT_TOKENS + done}  # fmt: skip
        return event

    response = web.StreamResponse(headers={"Content-Type": SSE})
    await response.prepare(request)
    held = request.headers.get("x-fake-hold") == "1"
    events = [chunk({"role": "assistant", "content": ""}, None, 0)]
    events += [chunk({"content": f"tok{index} "}, None, index + 1) for index in range(count)]
    last = chunk({}, "stop", count)
    if flavour == "llamacpp":
        last["usage"] = usage
        last["timings"] = {"prompt_n": PROMPT_TOKENS, "prompt_ms": 180.0, "predicted_n": count,
                           "predicted_ms": 875.4, "predicted_per_second": 35.4}  # fmt: skip
    events.append(last)
    if asked and flavour != "llamacpp":
        events.append({"id": chunk_id, "object": "chat.completion.chunk", "created": created,
                       "model": model, "choices": [], "usage": usage})  # fmt: skip
    # after the role chunk and one token
    failing_at = 2 if request.headers.get("x-fake-error-midstream") == "1" else None
    error = {"code": 500, "message": "Context size has been exceeded.", "type": "server_error"}
    if state.failed_first < int(request.headers.get("x-fake-error-first", "0")):
        state.failed_first += 1
        failing_at = 1
        error = {"code": 503, "message": "Loading model", "type": "unavailable_error"}
    for index, event in enumerate(events):
        if index == failing_at:
            await _line(response, state, b"error: " + orjson.dumps(error) + b"\n\n", held)
            break
        await _line(response, state, b"data: " + orjson.dumps(event) + b"\n\n", held)
    await _line(response, state, b"data: [DONE]\n\n", held)
    await response.write_eof()
    return response


async def llamacpp_completion(request: web.Request) -> web.StreamResponse:
    """llama.cpp's native /completion: its own result objects, whole or streamed."""
    state, body = await _seen(request)
    count = _count(request)
    timings = {"prompt_n": PROMPT_TOKENS, "prompt_ms": 30.9, "predicted_n": count,
               "predicted_ms": 661.0, "predicted_per_second": 52.9}  # fmt: skip
    final = {"index": 0, "content": _text(count), "tokens": [], "id_slot": 0, "stop": True,
             "model": "gpt-3.5-turbo", "tokens_predicted": count,
             "tokens_evaluated": PROMPT_TOKENS, "generation_settings": {"n_ctx": 4096},
             "prompt": body.get("prompt"), "has_new_line": False, "truncated": False,
             "stop_type": "eos", "stopping_word": "", "tokens_cached": PROMPT_TOKENS + count,
             "timings": timings}  # fmt: skip
    if not body.get("stream"):
        return web.json_response(final)
    response = web.StreamResponse(headers={"Content-Type": SSE})
    await response.prepare(request)
    held = request.headers.get("x-fake-hold") == "1"
    for index in range(count):
        partial = {"index": 0, "content": f"tok{index} ", "tokens": [], "stop": False,
                   "id_slot": -1, "tokens_predicted": index + 1,
                   "tokens_evaluated": PROMPT_TOKENS}  # fmt: skip
        await _line(response, state, b"data: " + orjson.dumps(partial) + b"\n\n", held)
    await _line(response, state, b"data: " + orjson.dumps({**final, "content": ""}) + b"\n\n", held)
    await response.write_eof()
    return response


async def llamacpp_tokenize(request: web.Request) -> web.Response:
    _, body = await _seen(request)
    return web.json_response({"tokens": list(range(len(str(body.get("content", "")).split())))})


async def tgi_generate(request: web.Request) -> web.StreamResponse:
    """TGI's /generate and /generate_stream."""
    state, body = await _seen(request)
    count = _count(request)
    parameters = body.get("parameters") or {}
    details = (
        {
            "finish_reason": "length",
            "generated_tokens": count,
            "seed": None,
            "input_length": PROMPT_TOKENS,
        }  # fmt: skip
        if parameters.get("details")
        else None
    )
    if request.path == "/generate":
        answer: dict[str, Any] = {"generated_text": _text(count)}
        if details is not None:
            answer["details"] = {**details, "prefill": [], "tokens": []}
        return web.json_response(answer)
    response = web.StreamResponse(headers={"Content-Type": SSE})
    await response.prepare(request)
    held = request.headers.get("x-fake-hold") == "1"
    for index in range(count):
        last = index == count - 1
        event = {
            "index": index + 1,
            "token": {"id": 100 + index, "text": f"tok{index} ", "logprob": -0.5, "special": False},
            "generated_text": _text(count) if last else None,
            "details": details if last else None,
        }
        await _line(response, state, b"data:" + orjson.dumps(event) + b"\n\n", held)
    await response.write_eof()
    return response
