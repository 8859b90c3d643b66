"""A fake LLM provider: a real aiohttp app that speaks the OpenAI and Anthropic shapes.

It answers closely enough for the official `openai` and `anthropic` SDKs to parse, and it
misbehaves on request, so tests can prove streaming, errors and disconnects against a
real server. What it saw and what it sent is kept in `app[FAKE_STATE]`, with the usage it
reported for each request (as far as it got: a stream cut short reported less).

Request headers steer it (they pass through the gateway unchanged):

    x-fake-chunks: N          N content deltas (default 3): "tok0 tok1 … "; N is also the
                              completion token count
    x-fake-delay-ms: N        wait N ms between two events (or two body chunks)
    x-fake-status: N          answer N with the provider's error JSON; 429 and 5xx add
                              retry-after: 7, 429 adds x-ratelimit-remaining-requests: 0
    x-fake-error-under: S     ... that error JSON sent with status S instead (as some
                              OpenAI-compatible servers answer an error under a 200)
    x-fake-reason: P          the status line's reason phrase is P, whatever the status
                              (`529 Overloaded`, `429 Slow Down`, `200 Fine`), as it is
    x-fake-hang: headers      never answer
    x-fake-hang: midstream    send the first half of the events (at least one), then nothing
    x-fake-hang: end          send every event, then hold the body's end (as a provider whose
                              last chunk comes after its last event)
    x-fake-hang: last         send every event but the last, then nothing
    x-fake-drop: headers      close the connection before answering
    x-fake-drop: midstream    send the first half of the events, then close the connection
                              without the terminating chunk
    x-fake-gzip: 1            JSON bodies gzip-compressed, Content-Encoding: gzip
    x-fake-encoding: C        any body (JSON or stream) in gzip, deflate, br or zstd, a
                              stream flushed event by event; unless the request's
                              Accept-Encoding is `identity`, which servers honour
    x-fake-line-end: E        a stream's lines end with `crlf` or `cr` instead of LF (the SSE
                              specification allows all three)
    x-fake-bom: 1             a stream opens with a UTF-8 byte order mark
    x-fake-split: N           any body goes in pieces of N bytes, each written alone (as a
                              proxy in front of a provider may cut it: inside a line, a line
                              end, a character, or a compressed stream's frame)
    x-fake-cached-tokens: N   N more prompt tokens, reported as read from the cache
                              (OpenAI cached_tokens, Anthropic cache_read_input_tokens)
    x-fake-cache-write-tokens: N  Anthropic: N cache_creation_input_tokens
    x-fake-cache-write-1h-tokens: N  Anthropic: N of them written for an hour (its usage's
                              `cache_creation` split by lifetime, the rest 5-minute writes)
    x-fake-web-searches: N    Anthropic: N server-side web searches (`server_tool_use`, in a
                              stream's message_delta); Responses: N web_search tool calls, in
                              the finished object's `tool_usage.web_search.num_requests`
    x-fake-compaction-tokens: N  Anthropic: server-side compaction (compact_20260112) read N
                              input tokens and wrote N // 10 first: a `compaction` iteration in
                              the usage's `iterations` (a stream's message_delta), which, as
                              Anthropic reports it, the top-level counts leave out
    x-fake-advisor-tokens: N  Anthropic: the advisor tool (advisor_20260301) consulted its model,
                              which read N input tokens and wrote N // 10: an `advisor_message`
                              iteration, also left out of the top-level counts, between the
                              executor's two samplings (the second reads the advice, N // 10,
                              and the context from the cache), whose input the top-level counts
                              leave out too
    x-fake-declined: N,M      Anthropic: server-side fallback (server-side-fallback-2026-06-01):
                              the requested model read N input tokens, wrote M and declined
                              (a refusal); claude-opus-4-8 answered. The usage's top-level
                              counts are the answer's; `iterations` holds the declined attempt
                              (type "message", its model) and the answer's ("fallback_message");
                              a `fallback` content block ({"to": {"model"}}) marks the change (a
                              stream's message_start, sent before, names the requested model)
    x-fake-reasoning-tokens: N    N more completion tokens, reported as reasoning (OpenAI)
    x-fake-thoughts-beside: N     OpenAI chat: N thinking tokens counted in total_tokens only,
                              not in completion_tokens (as Gemini's OpenAI-compatible API
                              has reported them)
    x-fake-tool-chars: N      the tool call's arguments are N characters (chat, when a tool
                              is offered; /messages: a tool_use block, when one is offered),
                              streamed in x-fake-chunks pieces (Anthropic: input_json_delta)
    x-fake-reasoning-chars: N N characters of reasoning before the answer: chat
                              `reasoning_content`, Anthropic a thinking block (thinking_delta),
                              in x-fake-chunks pieces (its N / 4 tokens, of output_tokens, in
                              Anthropic's usage.output_tokens_details.thinking_tokens)
    x-fake-piece-chars: N     tool-call arguments and reasoning streamed in pieces of N
                              characters instead (as providers stream them: many small deltas,
                              while x-fake-chunks still sets the content deltas and their count)
    x-fake-no-usage: 1        no usage anywhere (the Anthropic SDK's stream helper then fails)
    x-fake-raw-chunks: N      any path: an application/octet-stream body of N chunks "raw<i>\n"
    x-fake-reflect: headers   echo each credential header back, as x-echo-<name> and inside
                              an x-debug-request header (as a debugging proxy might)
    x-fake-reflect: body      that, and error messages quote the credential (with x-fake-status),
                              as do an Anthropic model list's display names
    x-fake-raw-bytes: N       ... each followed by N dots (a big body, for a slow reader)
    x-fake-sized: 1           ... with a Content-Length (sent in pieces all the same)
    x-fake-untyped: 1         any answer goes without a Content-Type
    x-fake-hold: 1            answer only once the test sets `state.release` (an asyncio.Event)
    x-fake-think-ms: N        wait N ms before the answer's headers (a long non-streamed
                              generation), or until the client leaves
    x-fake-polls: N           a background Response: the first N GETs of it answer
                              in_progress (default 0: the first GET finds it completed)
    x-fake-response-end: E    a Responses stream ends with `response.incomplete` (max_output_tokens)
                              or `response.failed` (a server_error) instead of `.completed`
    x-fake-lenient: 1         read "background" as pydantic's lax booleans do (vLLM's and SGLang's
                              Responses): 1, "true", "yes", "on" are true, as true is
    x-fake-older-models: N    GET /models (and Gemini's /v1beta/models) lists N older models
                              (`older-model-<i>`) before MODEL_IDS (GEMINI_MODEL_IDS)
    x-fake-largest-page: N    ... paged at most N a page: a larger Anthropic `limit` or Gemini
                              `pageSize` is refused with 400 (as an Anthropic-compatible server
                              capping its pages below Anthropic's 1000 does), and the default
                              page is N when it is smaller than 20 (Gemini's: 50)

A Responses object says the `service_tier` that served it: the request's, else "default",
and carries `tool_usage` as OpenAI's does (hosted tools' usage beside `usage`: all zeros
until it finishes, then its web searches).
(a chat completion and each of its chunks too, when the request names one).
A chat or text completion asking for `n` choices gets that many (streamed: a chunk of each
in turn, one usage chunk for all), each counted in its usage, as is each of a text
completion's `best_of` (of each prompt of a list of prompts).
A chat completion made with "store": true (streamed or not) is kept, with its usage and
`metadata`, as OpenAI keeps it for the project of the key that made it: GET /chat/completions
lists them (`model`, `metadata[k]`, `order`, `after`, `limit`), GET /chat/completions/{id}
answers one (its `/messages` the request's messages), POST /chat/completions/{id}
{"metadata"} replaces its metadata and answers it whole, DELETE deletes it; another key's
request, or an id it never made, gets OpenAI's 404.
A POST /responses with "background": true is kept and answered `queued`, usage null
(streamed: as usual, and kept all the same, also when the stream is cut); GET /responses/{id} answers it (`?stream=true`: as a stream of its last
events, ending with `response.completed`), finished with its usage, as often as asked;
POST /responses/{id}/cancel answers it `cancelled`, with the usage so far (all of it), and
later GETs find it so; an id it never made is a 404.

GET /v1/realtime is a WebSocket (the Realtime API), described in `tests/support/fake_realtime.py`.
Images, audio, Realtime client secrets and assistant runs: `tests/support/fake_media.py`.
Files and batches (OpenAI's and Anthropic's): `tests/support/fake_batches.py`.

Tests steer it per real key too: `state.faults[real_key] = Fault(503, {"retry-after": "2"})`
makes every request presenting that key get that answer (or only `times` of them), so a
fallback or a pool's other key can be told apart from the failing one; with `in_stream` the
answer is a 200 event stream carrying that status's error as an event instead (Anthropic's
`event: error` when overloaded, OpenAI's `data: {"error": ...}`): `first` as its first event,
`openrouter` as OpenRouter's chunk (a top-level `error` with the status as its `code`, the
choice's `finish_reason` "error", after a `: OPENROUTER PROCESSING` comment), `started`
after the stream's start that says nothing yet (Anthropic's `message_start` and `ping`,
OpenAI's chunk naming only the role), `after` after content;
`state.slow[real_key] = seconds` holds that key's answers that long before their headers
(a slow key's time to first byte); `state.gates[real_key] = asyncio.Event()` holds them until
the test sets it (to move an injected clock while they wait: a time to first byte that does not
depend on the machine's load).

The Anthropic dialect (errors, model objects) is used on `/messages` paths and for any
request carrying `anthropic-version`. Prompt tokens are the words in the request's
messages/input/prompt/system text, at least 1.

Azure OpenAI's paths (an azure base_url at the fake's root, as at a resource's endpoint):
the deployments API, `/openai/deployments/{deployment}/chat/completions` (`completions`,
`embeddings`) with an `api-version` query (none: 404 "Resource not found", as Azure; one
before 2024-09-01 refuses `stream_options` with 400, as Azure's older versions do), and
the v1 API, `/openai/v1/chat/completions` (...). As Azure answers: the model named is the
deployed one, `AZURE_MODEL` (a dated name, whatever the deployment is called); a chat answer
carries `prompt_filter_results` and each choice its `content_filter_results`; a chat stream
opens with a chunk of empty `choices`, `id`, `model` and `object` that holds only the
prompt's filter results; every answer has Azure's `apim-request-id`, `x-ms-region` headers.
    x-fake-content-filter: prompt   Azure: the 400 `content_filter` error of a filtered prompt

Gemini's OpenAI-compatible API (`/v1beta/openai/...`, where the built-in gemini's base URL
points) answers as the OpenAI paths do, but its errors (x-fake-status) are Google's, in a
list: `[{"error": {"code": 400, "message": ..., "status": "INVALID_ARGUMENT"}}]`.

Not done: checking credentials (only recorded; echoed only with x-fake-reflect), Anthropic tool
use unless x-fake-tool-chars asks for it, Responses API tool calls.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import gzip
import math
import signal
import socket
import struct
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import brotli
import orjson
import zstandard
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from tests.support import fake_batches, fake_media, fake_realtime

POLL_SECONDS = 0.01
DEFAULT_MODEL = "fake-model"
FALLBACK_MODEL = "claude-opus-4-8"  # what answers an Anthropic request whose model declined
MODEL_IDS = ("gpt-4o-mini", "text-embedding-3-small", "claude-3-5-haiku-latest", DEFAULT_MODEL)
TOOL_ARGUMENTS = '{"query": "fake"}'
EMBEDDING_SIZE = 8
AUTH_HEADERS = frozenset({"authorization", "x-api-key", "api-key", "x-goog-api-key"})
SSE_TYPE = "text/event-stream; charset=utf-8"
LINE_ENDS = {"lf": b"\n", "crlf": b"\r\n", "cr": b"\r"}
BOM = b"\xef\xbb\xbf"
DONE = b"data: [DONE]\n\n"
# What real providers send on every answer; the gateway passes or replaces them.
PROVIDER_HEADERS = (
    ("openai-processing-ms", "12"),
    ("x-ratelimit-limit-requests", "5000"),
    ("x-ratelimit-remaining-requests", "4999"),
    ("x-ratelimit-reset-requests", "12ms"),
    ("x-ratelimit-limit-tokens", "800000"),
    ("x-ratelimit-remaining-tokens", "799990"),
    ("x-ratelimit-reset-tokens", "1ms"),
    # Cloudflare in front of OpenAI and Anthropic (and Google's front end) advertise HTTP/3
    # on the provider's own host: an origin-specific header.
    ("alt-svc", 'h3=":443"; ma=86400'),
)
# Gemini's OpenAI-compatible API (the built-in gemini's base URL is under it), whose errors
# are Google's, in a list of one: [{"error": {"code": 400, "message": …, "status": …}}].
GEMINI_OPENAI = "/v1beta/openai"
GOOGLE_STATUSES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
# Azure OpenAI: the model a deployment runs, named in its answers; its own headers.
AZURE_MODEL = "gpt-4o-mini-2024-07-18"
AZURE_HEADERS = (
    ("apim-request-id", "2f1e5a6c-7b8d-4e9f-a0b1-c2d3e4f5a6b7"),
    ("x-ms-region", "East US"),
    ("x-ms-rai-invoked", "true"),
    ("azureml-model-session", "d001-20250101000000"),
)
# The first api-version that takes stream_options (2024-09-01-preview; GA 2024-10-21).
AZURE_STREAM_OPTIONS = "2024-09-01"
_SAFE = {"filtered": False, "severity": "safe"}
AZURE_FILTERS = {"hate": _SAFE, "self_harm": _SAFE, "sexual": _SAFE, "violence": _SAFE}
# What Anthropic sends on its answers besides: the account's limits, resets in RFC 3339.
ANTHROPIC_HEADERS = (
    ("anthropic-ratelimit-requests-limit", "4000"),
    ("anthropic-ratelimit-requests-remaining", "3999"),
    ("anthropic-ratelimit-requests-reset", "2026-01-01T00:00:01Z"),
    ("anthropic-ratelimit-tokens-limit", "400000"),
    ("anthropic-ratelimit-tokens-remaining", "399990"),
    ("anthropic-ratelimit-tokens-reset", "2026-01-01T00:00:01Z"),
    ("anthropic-ratelimit-input-tokens-limit", "320000"),
    ("anthropic-ratelimit-output-tokens-limit", "80000"),
)
OPENAI_ERRORS = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}
ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


@dataclass(frozen=True, slots=True)
class Seen:
    """One request as it arrived: `path` raw (still percent-encoded), `query_string` decoded."""

    method: str
    path: str
    query_string: str
    headers: CIMultiDict[str]
    body: bytes


@dataclass(slots=True)
class FakeState:
    """What the fake observed, for assertions."""

    requests: list[Seen] = field(default_factory=list)
    # time.monotonic() of each client that left before its answer was complete
    disconnects: list[float] = field(default_factory=list)
    # request id (the x-request-id received, else the fake's own) -> exact body bytes sent
    sent: dict[str, bytes] = field(default_factory=dict)
    # request id -> the usage fields the fake reported in what it sent (later replace earlier)
    usage: dict[str, dict] = field(default_factory=dict)
    # set on shutdown so hanging handlers let go instead of holding the server open
    is_stopping: bool = False
    # real key -> a fault every request presenting that key gets (see Fault)
    faults: dict[str, Fault] = field(default_factory=dict)
    # real key -> seconds its requests wait before they are answered (see `slow` above)
    slow: dict[str, float] = field(default_factory=dict)
    # real key -> an event its requests wait for before they are answered (see `gates` above)
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    # response id -> a background Response (POST /responses, "background": true)
    background: dict[str, Background] = field(default_factory=dict)
    # completion id -> a chat completion made with "store": true, in the order made
    stored_chats: dict[str, StoredChat] = field(default_factory=dict)
    # requests being answered right now, and the most there ever were at once
    open_now: int = 0
    open_peak: int = 0
    # requests with x-fake-hold: 1 wait for this before they are answered
    release: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(slots=True)
class Background:
    """A background Response: `done` finished, after `polls` GETs that find it running."""

    done: dict
    polls: int


@dataclass(slots=True)
class StoredChat:
    """A chat completion made with "store": true: the completion object (its `usage` and
    `metadata` too), the request's messages, and the real key that made it (its project:
    another key's requests do not find it)."""

    completion: dict
    messages: list[dict]
    key: str


@dataclass(slots=True)
class Fault:
    """Answer `status` (the provider's error body, plus `headers`) to a real key's requests.
    A header given as "" is left out (`{"retry-after": ""}`: a 429 or 5xx without one).

    `times`: only that many times, then answer normally again (None: until removed).
    `is_unsized`: the body goes without a Content-Length, chunked (as many proxies and CDNs
    in front of providers send errors too).
    `is_cut`: half the body is sent, then the connection closed (a proxy breaking off).
    `in_stream`: "first", "openrouter", "started" or "after": a 200 stream carrying the error
    as an event instead (see the module's docstring).
    `in_answer`: a 200 JSON answer carrying the error instead, as OpenRouter answers a request
    not streamed that failed after its 200: a newline first (its keep-alive padding), then
    a body whose top-level `error` has the status as its `code`.
    `code`: an OpenAI error's type and code, in a stream or an error answer, instead of the
    status's own (a 429's `insufficient_quota`: a key whose quota is spent).
    `message`: the error's message instead of "fake provider error <status>" (Anthropic's 400
    for an account out of credit: "Your credit balance is too low ...").
    `retry_delay`: Google's error carries a RetryInfo detail with this `retryDelay` ("52s"),
    as Gemini's 429s do in place of a Retry-After header.
    `reason`: the status line's reason phrase, instead of the status's own (`529 Overloaded`).
    """

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    times: int | None = None
    is_unsized: bool = False
    is_cut: bool = False
    in_stream: str = ""
    in_answer: bool = False
    code: str = ""
    message: str = ""
    retry_delay: str = ""
    reason: str = ""


FAKE_STATE = web.AppKey("fake_state", FakeState)


@dataclass(frozen=True, slots=True)
class Knobs:
    """The x-fake-* request headers, read once."""

    chunks: int
    delay_seconds: float
    status: int | None
    hang: str | None
    drop: str | None
    is_gzip: bool
    encoding: str | None
    has_usage: bool
    cached_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    raw_chunks: int | None
    tool_chars: int = 0
    reasoning_chars: int = 0
    think_seconds: float = 0.0
    piece_chars: int = 0
    thoughts_beside: int = 0
    cache_write_1h_tokens: int = 0
    web_searches: int = 0
    compaction_tokens: int = 0
    advisor_tokens: int = 0
    declined: tuple[int, int] | None = None
    line_end: bytes = b"\n"
    has_bom: bool = False
    split_bytes: int = 0
    older_models: int = 0
    largest_page: int | None = None
    reason: str | None = None  # the status line's phrase: None, the status's own

    @classmethod
    def read(cls, headers: CIMultiDictProxy[str]) -> Knobs:
        status, raw_chunks = headers.get("x-fake-status"), headers.get("x-fake-raw-chunks")
        hang, drop = headers.get("x-fake-hang"), headers.get("x-fake-drop")
        if {hang, drop} - {None, "headers", "midstream"} and hang not in ("end", "last"):
            raise ValueError(
                f"x-fake-hang takes headers|midstream|last|end, x-fake-drop headers|midstream, got "
                f"{hang!r}/{drop!r}"
            )
        return cls(
            chunks=int(headers.get("x-fake-chunks", "3")),
            delay_seconds=int(headers.get("x-fake-delay-ms", "0")) / 1000,
            status=int(status) if status else None,
            hang=hang,
            drop=drop,
            is_gzip=headers.get("x-fake-gzip") == "1",
            encoding=None if is_identity_only(headers) else headers.get("x-fake-encoding"),
            has_usage=headers.get("x-fake-no-usage") != "1",
            cached_tokens=int(headers.get("x-fake-cached-tokens", "0")),
            cache_write_tokens=int(headers.get("x-fake-cache-write-tokens", "0")),
            reasoning_tokens=int(headers.get("x-fake-reasoning-tokens", "0")),
            raw_chunks=int(raw_chunks) if raw_chunks else None,
            tool_chars=int(headers.get("x-fake-tool-chars", "0")),
            reasoning_chars=int(headers.get("x-fake-reasoning-chars", "0")),
            think_seconds=int(headers.get("x-fake-think-ms", "0")) / 1000,
            piece_chars=int(headers.get("x-fake-piece-chars", "0")),
            thoughts_beside=int(headers.get("x-fake-thoughts-beside", "0")),
            cache_write_1h_tokens=int(headers.get("x-fake-cache-write-1h-tokens", "0")),
            web_searches=int(headers.get("x-fake-web-searches", "0")),
            compaction_tokens=int(headers.get("x-fake-compaction-tokens", "0")),
            advisor_tokens=int(headers.get("x-fake-advisor-tokens", "0")),
            declined=declined_counts(headers.get("x-fake-declined")),
            line_end=LINE_ENDS[headers.get("x-fake-line-end", "lf")],
            has_bom=headers.get("x-fake-bom") == "1",
            split_bytes=int(headers.get("x-fake-split", "0")),
            older_models=int(headers.get("x-fake-older-models", "0")),
            largest_page=int(largest) if (largest := headers.get("x-fake-largest-page")) else None,
            reason=headers.get("x-fake-reason"),
        )

    @property
    def cuts_midstream(self) -> bool:
        return "midstream" in (self.hang, self.drop)


REQUEST_ID = web.RequestKey("fake_request_id", str)
# The fake's own id for a request, which its answer carries (as a provider names its own).
OWN_ID = web.RequestKey("fake_own_id", str)
KNOBS = web.RequestKey("fake_knobs", Knobs)
OPEN = web.RequestKey("fake_open", bool)  # counted in FakeState.open_now


class ClientGone(Exception):
    """The client closed its connection while the fake was still answering."""


class Stopping(Exception):
    """The server is shutting down while a handler hangs."""


# --- plumbing: observe, pause, send --------------------------------------------------


@web.middleware
async def observe(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Record the request and count it open until answered, then apply the faults."""
    state = request.app[FAKE_STATE]
    state.open_now += 1
    state.open_peak = max(state.open_peak, state.open_now)
    request[OPEN] = True
    try:
        return await answer(request, handler)
    finally:
        closing(request)


def closing(request: web.Request) -> None:
    """The request no longer counts as open: its last bytes are on their way (once)."""
    if request.get(OPEN):
        request[OPEN] = False
        request.app[FAKE_STATE].open_now -= 1


async def answer(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    state = request.app[FAKE_STATE]
    body = await request.read()
    seen = Seen(
        request.method,
        request.rel_url.raw_path,
        request.query_string,
        CIMultiDict(request.headers),
        body,
    )
    state.requests.append(seen)
    own_id = request[OWN_ID] = f"req_fake_{uuid.uuid4().hex[:16]}"
    request[REQUEST_ID] = request.headers.get("x-request-id") or own_id
    knobs = request[KNOBS] = Knobs.read(request.headers)
    if request.headers.get("x-fake-hold") == "1":
        await state.release.wait()
    presented = credential(request.headers) or ""
    if (gate := state.gates.get(presented)) is not None:
        await gate.wait()
    if (wait := state.slow.get(presented)) is not None:
        async with watching(request):
            await pause(request, wait)
    fault = state.faults.get(presented)
    if fault is not None and fault.times != 0:
        if fault.times is not None:
            fault.times -= 1
        if fault.is_cut:
            request[KNOBS] = dataclasses.replace(knobs, drop="midstream")
        if fault.reason:
            request[KNOBS] = dataclasses.replace(request[KNOBS], reason=fault.reason)
        if fault.in_stream:
            frames = stream_error(request, fault.status, fault.in_stream, fault.code)
            return await stream(request, frames)
        if fault.in_answer:
            return await send(
                request, [b"\n", answer_error(fault.status)], content_type="application/json"
            )
        return await reply_error(
            request,
            fault.status,
            fault.headers,
            not fault.is_unsized,
            message=fault.message,
            code=fault.code,
            retry_delay=fault.retry_delay,
        )
    if knobs.think_seconds:
        async with watching(request):
            await pause(request, knobs.think_seconds)
        if request.transport is None or request.transport.is_closing():
            return web.Response()  # never written: the client left while it thought
    if knobs.drop == "headers":
        close(request)
        return web.Response()  # never written: the connection is gone
    if knobs.hang == "headers":
        async with watching(request):
            await pause(request, math.inf)
        return web.Response()
    if knobs.status is not None:
        under = request.headers.get("x-fake-error-under")
        return await reply_error(request, knobs.status, under=int(under) if under else None)
    if is_azure(request) and (refusal := await azure_refusal(request)) is not None:
        return refusal
    if knobs.raw_chunks is not None:
        pad = b"." * int(request.headers.get("x-fake-raw-bytes", "0"))
        frames = [f"raw{index}\n".encode() + pad for index in range(knobs.raw_chunks)]
        return await send(
            request,
            frames,
            content_type="application/octet-stream",
            is_sized=request.headers.get("x-fake-sized") == "1",
        )
    return await handler(request)


def credential(headers: CIMultiDictProxy[str]) -> str | None:
    """The real key a request presents, in whichever provider style it came."""
    authorization = headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    for name in ("x-api-key", "api-key", "x-goog-api-key"):
        if name in headers:
            return headers[name]
    return None


def close(request: web.Request) -> None:
    """Close the connection: buffered bytes still go out, then FIN; no terminating chunk."""
    if request.transport is not None:
        request.transport.close()


async def pause(request: web.Request, seconds: float) -> None:
    """Sleep, raising ClientGone or Stopping as soon as either happens."""
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        # Polling rather than relying on handler cancellation, which aiohttp only
        # does when the runner asks for it (handler_cancellation=True).
        await asyncio.sleep(min(remaining, POLL_SECONDS))
        if request.app[FAKE_STATE].is_stopping:
            raise Stopping
        if request.transport is None or request.transport.is_closing():
            raise ClientGone


@contextlib.asynccontextmanager
async def watching(request: web.Request) -> AsyncIterator[None]:
    """Record a client that leaves mid-answer and end quietly; let go when stopping."""
    disconnects = request.app[FAKE_STATE].disconnects
    try:
        yield
    except (ClientGone, ConnectionResetError):
        disconnects.append(time.monotonic())
    except asyncio.CancelledError:
        disconnects.append(time.monotonic())
        raise
    except Stopping:
        close(request)


async def send(
    request: web.Request,
    frames: list[bytes],
    *,
    content_type: str,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    is_sized: bool = False,
    usages: list[dict | None] | None = None,
) -> web.StreamResponse:
    """Write the frames with the set delay between them; hang or drop halfway when asked.

    `usages`: the usage each frame reports, if any, recorded as the frame goes out.
    """
    state, knobs, request_id = request.app[FAKE_STATE], request[KNOBS], request[REQUEST_ID]
    headers = {**(headers or {}), "Content-Type": content_type}
    if knobs.encoding:
        frames = encoded(frames, knobs.encoding)
        headers["Content-Encoding"] = knobs.encoding
    response = web.StreamResponse(status=status, reason=knobs.reason, headers=headers)
    if is_sized:
        response.content_length = sum(map(len, frames))
    if knobs.cuts_midstream:
        frames = frames[: max(1, len(frames) // 2)]
    elif knobs.hang == "last":
        frames = frames[:-1]
    if knobs.split_bytes:
        frames, usages = in_pieces(frames, usages, knobs.split_bytes)
    state.sent[request_id] = b""
    reported = state.usage.setdefault(request_id, {})
    async with watching(request):
        await response.prepare(request)
        for index, frame in enumerate(frames):
            if index:
                await pause(request, knobs.delay_seconds)
            if index == len(frames) - 1 and not knobs.hang and not knobs.drop:
                # Before the last bytes: a client that has them (and may send the next
                # request) must never find this one still counted as open.
                closing(request)
            await response.write(frame)
            state.sent[request_id] += frame
            if usages and index < len(usages) and usages[index]:
                reported.update(usages[index])
        if knobs.hang in ("midstream", "last", "end"):
            await pause(request, math.inf)
        if knobs.drop == "midstream":
            close(request)
        else:
            await response.write_eof()
    return response


def in_pieces(
    frames: list[bytes], usages: list[dict | None] | None, size: int
) -> tuple[list[bytes], list[dict | None] | None]:
    """The frames' bytes in pieces of `size`; each frame's usage goes with the piece that
    holds its last byte."""
    body = b"".join(frames)
    pieces = [body[start : start + size] for start in range(0, len(body), size)]
    if not usages:
        return pieces, None
    moved: list[dict | None] = [None] * len(pieces)
    end = 0
    for frame, usage in zip(frames, usages, strict=False):
        end += len(frame)
        if usage and frame:
            moved[(end - 1) // size] = usage
    return pieces, moved


def is_identity_only(headers: CIMultiDictProxy[str]) -> bool:
    """The request accepts no content coding: `Accept-Encoding: identity`."""
    return headers.get("accept-encoding", "").strip().lower() == "identity"


def encoded(frames: list[bytes], coding: str) -> list[bytes]:
    """The frames as one body in `coding`, flushed after each frame so each can go alone."""
    if coding == "br":
        brotli_encoder = brotli.Compressor()
        parts = [brotli_encoder.process(frame) + brotli_encoder.flush() for frame in frames]
        return [*parts[:-1], parts[-1] + brotli_encoder.finish()] if parts else parts
    if coding == "zstd":
        zstd_encoder = zstandard.ZstdCompressor().compressobj()
        parts = [
            zstd_encoder.compress(frame) + zstd_encoder.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
            for frame in frames
        ]
        return [*parts[:-1], parts[-1] + zstd_encoder.flush()] if parts else parts
    if coding not in ("gzip", "deflate"):
        return frames  # a coding the fake cannot produce: labelled only, as a broken server would
    wbits = 31 if coding == "gzip" else zlib.MAX_WBITS
    zlib_encoder = zlib.compressobj(wbits=wbits)
    parts = [
        zlib_encoder.compress(frame) + zlib_encoder.flush(zlib.Z_SYNC_FLUSH) for frame in frames
    ]
    return [*parts[:-1], parts[-1] + zlib_encoder.flush()] if parts else parts


async def reply(
    request: web.Request,
    payload: object,
    *,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    is_sized: bool = True,
) -> web.StreamResponse:
    """Answer JSON with a Content-Length (unless not `is_sized`), gzip-compressed when asked."""
    knobs, headers = request[KNOBS], dict(headers or {})
    body = orjson.dumps(payload)
    if knobs.is_gzip:
        body = gzip.compress(body, mtime=0)
        headers["Content-Encoding"] = "gzip"
    half = len(body) // 2
    frames = [body[:half], body[half:]] if knobs.cuts_midstream else [body]
    usage = payload.get("usage") if isinstance(payload, dict) and status < 400 else None
    return await send(
        request,
        frames,
        content_type="application/json",
        status=status,
        headers=headers,
        is_sized=is_sized,
        usages=[None] * (len(frames) - 1) + [usage],
    )


async def stream(
    request: web.Request, frames: list[bytes], usages: list[dict | None] | None = None
) -> web.StreamResponse:
    knobs = request[KNOBS]
    if knobs.line_end != b"\n":  # JSON as orjson writes it holds no line end of its own
        frames = [frame.replace(b"\n", knobs.line_end) for frame in frames]
    if knobs.has_bom and frames:
        frames = [BOM + frames[0], *frames[1:]]
    return await send(
        request,
        frames,
        content_type=SSE_TYPE,
        headers={"Cache-Control": "no-cache"},
        usages=usages,
    )


def sse(data: object, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


async def drop_content_type(request: web.Request, response: web.StreamResponse) -> None:
    """x-fake-untyped: aiohttp adds application/octet-stream; take it off again."""
    if request.headers.get("x-fake-untyped") == "1":
        response.headers.popall("Content-Type", None)


async def add_provider_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Headers a real provider sends on every answer (on_response_prepare)."""
    for name, value in PROVIDER_HEADERS:
        response.headers.setdefault(name, value)
    if is_azure(request):
        for name, value in AZURE_HEADERS:
            response.headers.setdefault(name, value)
    if "/messages" in request.path:
        for name, value in ANTHROPIC_HEADERS:
            response.headers.setdefault(name, value)
    # Its own id for the request (not the client's x-request-id), as OpenAI (x-request-id)
    # and Anthropic (request-id) name theirs.
    if OWN_ID in request:
        name = "request-id" if "/messages" in request.path else "x-request-id"
        response.headers.setdefault(name, request[OWN_ID])
    response.headers.add("Set-Cookie", "__cf_bm=fake-cookie; Path=/; HttpOnly")
    if request.headers.get("x-fake-reflect") in ("headers", "body"):
        for name, value in request.headers.items():
            if name.lower() in AUTH_HEADERS:
                response.headers.add(f"x-echo-{name.lower()}", value)
        response.headers["x-debug-request"] = f"id=1; {reflected(request.headers)}; ok"


def reflected(headers: Mapping[str, str]) -> str:
    """The credential headers as received, for x-fake-reflect."""
    return ", ".join(
        f"{name.lower()}={value}" for name, value in headers.items() if name.lower() in AUTH_HEADERS
    )


async def let_go(app: web.Application) -> None:
    app[FAKE_STATE].is_stopping = True
    app[FAKE_STATE].release.set()


# --- what the answers are made of ----------------------------------------------------


async def read_json(request: web.Request) -> dict:
    return orjson.loads(await request.read() or b"{}")


def is_azure(request: web.Request) -> bool:
    return request.path.startswith("/openai/")


async def azure_refusal(request: web.Request) -> web.StreamResponse | None:
    """Azure's own refusals: a deployments path without api-version, a filtered prompt."""
    if "/deployments/" in request.path and "api-version" not in request.query:
        return await reply(
            request, {"error": {"code": "404", "message": "Resource not found"}}, status=404
        )
    version = request.query.get("api-version", "")
    if version and version < AZURE_STREAM_OPTIONS and b'"stream_options"' in await request.read():
        error = {
            "message": "Unrecognized request argument supplied: stream_options",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
        return await reply(request, {"error": error}, status=400)
    if request.headers.get("x-fake-content-filter") == "prompt":
        filtered = {**AZURE_FILTERS, "violence": {"filtered": True, "severity": "high"}}
        error = {
            "message": "The response was filtered due to the prompt triggering Azure OpenAI's "
            "content management policy. Please modify your prompt and retry.",
            "type": None,
            "param": "prompt",
            "code": "content_filter",
            "status": 400,
            "innererror": {
                "code": "ResponsibleAIPolicyViolation",
                "content_filter_result": filtered,
            },
        }
        return await reply(request, {"error": error}, status=400)
    return None


def is_anthropic(request: web.Request) -> bool:
    return "/messages" in request.path or "anthropic-version" in request.headers


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


def content_deltas(count: int) -> list[str]:
    return [f"tok{index} " for index in range(count)]


def split(text: str, parts: int) -> list[str]:
    return [
        text[len(text) * index // parts : len(text) * (index + 1) // parts]
        for index in range(parts)
    ]


def pieces(text: str, knobs: Knobs) -> list[str]:
    """Generated text as streamed: in x-fake-piece-chars pieces if set, else x-fake-chunks."""
    size = knobs.piece_chars
    if size <= 0:
        return split(text, knobs.chunks)
    return [text[start : start + size] for start in range(0, len(text), size)] or [""]


def count_words(value: object) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(map(count_words, value))
    if isinstance(value, dict):
        return count_words(value.get("content")) + count_words(value.get("text"))
    return 0


def prompt_tokens(payload: dict) -> int:
    return max(
        1, sum(count_words(payload.get(key)) for key in ("messages", "input", "prompt", "system"))
    )


def tool_arguments(chars: int) -> str:
    """A tool call's arguments: TOOL_ARGUMENTS, or a JSON object of `chars` characters."""
    if not chars:
        return TOOL_ARGUMENTS
    return '{"query": "' + "x" * max(0, chars - 13) + '"}'


def generated_tokens(knobs: Knobs) -> int:
    """The tokens of what x-fake-tool-chars and x-fake-reasoning-chars generate (4 chars each)."""
    return math.ceil((knobs.tool_chars + knobs.reasoning_chars) / 4)


def reasoning_text(chars: int) -> str:
    return ("thinking " * (chars // 9 + 1))[:chars]


def served_tier(payload: dict) -> str:
    """The service tier that serves a request: the one asked for ("auto", none: default)."""
    tier = payload.get("service_tier")
    return "default" if tier in (None, "auto") else str(tier)


def tool_name(payload: dict) -> str | None:
    """The tool the fake "calls": the first one offered, unless tool_choice is "none"."""
    tools = payload.get("tools") or []
    if not tools or payload.get("tool_choice") == "none":
        return None
    return tools[0].get("function", {}).get("name") or tools[0].get("name")


def is_usage_streamed(payload: dict) -> bool:
    return (payload.get("stream_options") or {}).get("include_usage") is True


async def reply_error(
    request: web.Request,
    status: int,
    extra: Mapping[str, str] | None = None,
    is_sized: bool = True,
    under: int | None = None,
    message: str = "",
    code: str = "",
    retry_delay: str = "",
) -> web.StreamResponse:
    """The provider's own error body and headers for this status (chunked unless `is_sized`),
    sent with the status `under` when given; `message`: the error's, instead of the fake's."""
    message = message or f"fake provider error {status}"
    if request.headers.get("x-fake-reflect") == "body":
        message += f": credentials received {reflected(request.headers)}"
    if is_anthropic(request):
        kind = ANTHROPIC_ERRORS.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
        body: dict | list = {
            "type": "error",
            "error": {"type": kind, "message": message},
            "request_id": request[REQUEST_ID],
        }
    elif request.path.startswith(GEMINI_OPENAI + "/"):
        google = {"code": status, "message": message, "status": GOOGLE_STATUSES.get(status)}
        if retry_delay:
            info = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay}
            google["details"] = [info]
        body = [{"error": google}]
    else:
        kind, named = (
            (code, code)
            if code
            else OPENAI_ERRORS.get(
                status, ("server_error" if status >= 500 else "invalid_request_error", None)
            )
        )
        body = {"error": {"message": message, "type": kind, "param": None, "code": named}}
    headers = {}
    if status == 429 or status >= 500:
        headers["retry-after"] = "7"
    if status == 429:
        headers["x-ratelimit-remaining-requests"] = "0"
    headers.update(extra or {})
    headers = {name: value for name, value in headers.items() if value}  # "": left out
    return await reply(request, body, status=under or status, headers=headers, is_sized=is_sized)


def stream_error(request: web.Request, status: int, where: str, code: str = "") -> list[bytes]:
    """A 200 stream's events carrying the provider's error for `status` (Fault.in_stream;
    `code`: Fault.code). The Responses API's: `response.created` and `response.in_progress`
    start it, then an `error` event and `response.failed`, as OpenAI streams a key's spent
    quota."""
    message = f"fake provider error {status}"
    if not is_anthropic(request) and request.path.endswith("/responses"):
        kind, code = (code, code) if code else OPENAI_ERRORS.get(status, ("server_error", None))
        response = {"id": new_id("resp_"), "object": "response", "status": "in_progress"}
        response["error"] = None
        started = sse(
            {"type": "response.created", "response": response, "sequence_number": 0},
            "response.created",
        ) + sse(
            {"type": "response.in_progress", "response": response, "sequence_number": 1},
            "response.in_progress",
        )
        failed = {**response, "status": "failed", "error": {"code": code, "message": message}}
        error = sse(
            {
                "type": "error",
                "error": {"type": kind, "code": code, "message": message, "param": None},
                "sequence_number": 2,
            },
            "error",
        ) + sse(
            {"type": "response.failed", "response": failed, "sequence_number": 3}, "response.failed"
        )
        delta = {"type": "response.output_text.delta", "delta": "Hello", "sequence_number": 2}
        content = started + sse(delta, "response.output_text.delta")
        if where == "started":
            return [started, error]
        return [content, error] if where == "after" else [error]
    if is_anthropic(request):
        kind = ANTHROPIC_ERRORS.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
        error = sse({"type": "error", "error": {"type": kind, "message": message}}, "error")
        start = {"type": "message_start", "message": {"id": new_id("msg_"), "type": "message"}}
        started = sse(start, "message_start") + sse({"type": "ping"}, "ping")
        block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}}
        content = started + sse(block, "content_block_start")
    else:
        kind, code = (
            (code, code)
            if code
            else OPENAI_ERRORS.get(
                status, ("server_error" if status >= 500 else "invalid_request_error", None)
            )
        )
        chunk = {"id": new_id("chatcmpl-"), "object": "chat.completion.chunk", "model": "m"}
        if where == "openrouter":
            return [
                b": OPENROUTER PROCESSING\n\n",
                sse(
                    {
                        **chunk,
                        "error": {"code": status, "message": message},
                        "choices": [
                            {"index": 0, "delta": {"content": ""}, "finish_reason": "error"}
                        ],
                    }
                ),
                b"data: [DONE]\n\n",
            ]
        error = sse({"error": {"message": message, "type": kind, "param": None, "code": code}})
        role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        started = sse({**chunk, "choices": [role]})
        delta = {"index": 0, "delta": {"content": "Hello"}, "finish_reason": None}
        content = started + sse({**chunk, "choices": [delta]})
    if where == "started":
        return [started, error]
    return [content, error] if where == "after" else [error]


def answer_error(status: int) -> bytes:
    """OpenRouter's 200 answer (not streamed) whose provider failed after its 200 was sent:
    a completion without content, its top-level `error` naming the status as `code`."""
    choice = {"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "error"}
    return orjson.dumps(
        {
            "id": new_id("gen-"),
            "object": "chat.completion",
            "choices": [choice],
            "error": {"code": status, "message": f"fake provider error {status}"},
        }
    )


# --- OpenAI --------------------------------------------------------------------------


def openai_usage(prompt: int, knobs: Knobs, answers: int = 1) -> dict:
    """OpenAI's usage object; its details only when cached or reasoning tokens are asked for.
    `answers`: choices generated (`n`, a completion's `best_of`), each counted."""
    prompt += knobs.cached_tokens
    completion = (knobs.chunks + knobs.reasoning_tokens + generated_tokens(knobs)) * answers
    usage: dict = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion + knobs.thoughts_beside,
    }
    if knobs.cached_tokens or knobs.reasoning_tokens:
        usage["prompt_tokens_details"] = {"cached_tokens": knobs.cached_tokens, "audio_tokens": 0}
        usage["completion_tokens_details"] = {
            "reasoning_tokens": knobs.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        }
    return usage


def answers(payload: dict) -> int:
    """How many choices a request generates: `n`, or a completion's `best_of` (of which it
    returns the `n` best), 1 by default; of each prompt of a completion's list of prompts."""
    return max(int(payload.get("n") or 1), int(payload.get("best_of") or 1)) * prompts(payload)


def prompts(payload: dict) -> int:
    """A text completion's prompts: a list of strings or of token lists is several."""
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        return len(prompt)
    return 1


def usage_at_end(frames: list[bytes], usage: dict | None) -> list[dict | None] | None:
    """Stream usages: the usage chunk is the last frame before [DONE]."""
    return [*([None] * (len(frames) - 2)), usage, None] if usage else None


async def chat_completions(request: web.Request) -> web.StreamResponse:
    payload, knobs = await read_json(request), request[KNOBS]
    tool, count = tool_name(payload), answers(payload)
    usage = openai_usage(prompt_tokens(payload), knobs, count)
    azure = is_azure(request)
    head = {
        "id": new_id("chatcmpl-"),
        "created": int(time.time()),
        "model": AZURE_MODEL if azure else payload.get("model") or DEFAULT_MODEL,
        "system_fingerprint": "fp_fake",
    }
    if "service_tier" in payload:  # the tier that served it, on every chunk
        head["service_tier"] = served_tier(payload)
    message: dict = {
        "role": "assistant",
        "content": "".join(content_deltas(knobs.chunks)),
        "refusal": None,
    }
    if tool:
        call = {
            "id": new_id("call_"),
            "type": "function",
            "function": {"name": tool, "arguments": tool_arguments(knobs.tool_chars)},
        }
        message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]}
    if knobs.reasoning_chars:
        message["reasoning_content"] = reasoning_text(knobs.reasoning_chars)
    choices = [
        {
            "index": index,
            "message": message,
            "logprobs": None,
            "finish_reason": "tool_calls" if tool else "stop",
        }
        for index in range(count)
    ]
    body = {**head, "object": "chat.completion", "choices": choices}
    if azure:
        for choice in choices:
            choice["content_filter_results"] = AZURE_FILTERS
        body["prompt_filter_results"] = [
            {"prompt_index": 0, "content_filter_results": AZURE_FILTERS}
        ]
    if knobs.has_usage:
        body["usage"] = usage
    if payload.get("store") is True:  # kept whole, streamed or not, with its usage
        stored = {**body, "usage": usage, "metadata": payload.get("metadata") or {}}
        messages = [m for m in payload.get("messages") or [] if isinstance(m, dict)]
        chats = request.app[FAKE_STATE].stored_chats
        chats[head["id"]] = StoredChat(stored, messages, credential(request.headers) or "")
    if payload.get("stream"):
        streamed_usage = usage if knobs.has_usage and is_usage_streamed(payload) else None
        frames = chat_frames(head, tool, knobs, streamed_usage, count, azure)
        return await stream(request, frames, usage_at_end(frames, streamed_usage))
    return await reply(request, body)


def chat_frames(
    head: dict,
    tool: str | None,
    knobs: Knobs,
    usage: dict | None,
    count: int = 1,
    azure: bool = False,
) -> list[bytes]:
    """Role chunk, the deltas, the finish chunk, the usage chunk if asked for, [DONE]; with
    `count` choices (`n`), a chunk of each choice in turn at every step, as OpenAI
    interleaves them, and one usage chunk for all; on Azure, first the chunk of the
    prompt's filter results, and each choice's own."""
    chunks = knobs.chunks

    def chunk(delta: dict, finish_reason: str | None = None, index: int = 0) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        if azure:
            choice["content_filter_results"] = AZURE_FILTERS if delta else {}
        body = {**head, "object": "chat.completion.chunk", "choices": [choice]}
        if usage:
            body["usage"] = None  # OpenAI sends usage: null on every chunk but the last
        return sse(body)

    def each(delta: dict, finish_reason: str | None = None) -> list[bytes]:
        return [chunk(delta, finish_reason, index) for index in range(count)]

    if tool:
        call = {
            "index": 0,
            "id": new_id("call_"),
            "type": "function",
            "function": {"name": tool, "arguments": ""},
        }
        first: dict = {"role": "assistant", "content": None, "tool_calls": [call]}
        parts = pieces(tool_arguments(knobs.tool_chars), knobs)
        deltas = [{"tool_calls": [{"index": 0, "function": {"arguments": part}}]} for part in parts]
    else:
        first = {"role": "assistant", "content": "", "refusal": None}
        deltas = [{"content": text} for text in content_deltas(chunks)]
    if knobs.reasoning_chars:
        thoughts = pieces(reasoning_text(knobs.reasoning_chars), knobs)
        deltas = [*({"reasoning_content": part} for part in thoughts), *deltas]
    frames = [
        *each(first),
        *(frame for delta in deltas for frame in each(delta)),
        *each({}, "tool_calls" if tool else "stop"),
    ]
    if usage:
        frames.append(
            sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage})
        )
    if azure:
        prompt = [{"prompt_index": 0, "content_filter_results": AZURE_FILTERS}]
        opening = {"choices": [], "created": 0, "id": "", "model": "", "object": ""}
        frames.insert(0, sse({**opening, "prompt_filter_results": prompt}))
    return [*frames, DONE]


def stored_chat(request: web.Request) -> StoredChat | None:
    """The stored chat completion the path names, if the request's key may see it."""
    found = request.app[FAKE_STATE].stored_chats.get(request.match_info["completion_id"])
    return found if found is not None and found.key == credential(request.headers) else None


async def chat_not_found(request: web.Request) -> web.StreamResponse:
    """OpenAI's 404 for a stored chat completion it does not have (or another project's)."""
    message = f"Chat completion with id '{request.match_info['completion_id']}' not found."
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    return await reply(request, {"error": error}, status=404)


def page(data: list[dict], request: web.Request) -> dict:
    """A cursor page: `after` an id, at most `limit` (default 20) items."""
    after, limit = request.query.get("after"), int(request.query.get("limit", "20"))
    if after is not None:
        ids = [item["id"] for item in data]
        data = data[ids.index(after) + 1 :] if after in ids else []
    shown = data[:limit]
    return {
        "object": "list",
        "data": shown,
        "first_id": shown[0]["id"] if shown else None,
        "last_id": shown[-1]["id"] if shown else None,
        "has_more": len(data) > limit,
    }


async def list_chats(request: web.Request) -> web.StreamResponse:
    """GET /chat/completions: the key's stored completions, by `model` and `metadata[k]`."""
    key, query = credential(request.headers), request.query
    wanted = {name[9:-1]: value for name, value in query.items() if name.startswith("metadata[")}
    chats = [
        chat.completion
        for chat in request.app[FAKE_STATE].stored_chats.values()
        if chat.key == key
        and query.get("model") in (None, chat.completion["model"])
        and all(chat.completion["metadata"].get(name) == value for name, value in wanted.items())
    ]
    if query.get("order") == "desc":
        chats.reverse()
    return await reply(request, page(chats, request))


async def retrieve_chat(request: web.Request) -> web.StreamResponse:
    found = stored_chat(request)
    return await (chat_not_found(request) if found is None else reply(request, found.completion))


async def chat_messages(request: web.Request) -> web.StreamResponse:
    """GET /chat/completions/{id}/messages: the request's messages, each with an id."""
    found = stored_chat(request)
    if found is None:
        return await chat_not_found(request)
    completion_id = request.match_info["completion_id"]
    messages = [
        {"id": f"{completion_id}-{index}", "content": None, **message}
        for index, message in enumerate(found.messages)
    ]
    return await reply(request, page(messages, request))


async def update_chat(request: web.Request) -> web.StreamResponse:
    """POST /chat/completions/{id} {"metadata": {...}}: the completion, its metadata replaced."""
    found = stored_chat(request)
    if found is None:
        return await chat_not_found(request)
    found.completion["metadata"] = (await read_json(request)).get("metadata") or {}
    return await reply(request, found.completion)


async def delete_chat(request: web.Request) -> web.StreamResponse:
    found = stored_chat(request)
    if found is None:
        return await chat_not_found(request)
    completion_id = request.match_info["completion_id"]
    del request.app[FAKE_STATE].stored_chats[completion_id]
    deleted = {"object": "chat.completion.deleted", "id": completion_id, "deleted": True}
    return await reply(request, deleted)


async def completions(request: web.Request) -> web.StreamResponse:
    """Legacy text completions: `n` choices returned, `best_of` generated (and counted)."""
    payload, knobs = await read_json(request), request[KNOBS]
    usage = openai_usage(prompt_tokens(payload), knobs, answers(payload))
    count = int(payload.get("n") or 1) * prompts(payload)  # n of each prompt
    head = {
        "id": new_id("cmpl-"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": AZURE_MODEL if is_azure(request) else payload.get("model") or DEFAULT_MODEL,
    }

    def choice(text: str, finish_reason: str | None, index: int = 0) -> dict:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}

    deltas = content_deltas(knobs.chunks)
    if payload.get("stream"):
        last = len(deltas) - 1
        frames = [
            sse({**head, "choices": [choice(text, "stop" if i == last else None, index)]})
            for i, text in enumerate(deltas)
            for index in range(count)
        ]
        streamed_usage = usage if knobs.has_usage and is_usage_streamed(payload) else None
        if streamed_usage:
            frames.append(sse({**head, "choices": [], "usage": usage}))
        frames.append(DONE)
        return await stream(request, frames, usage_at_end(frames, streamed_usage))
    text = "".join(deltas)
    body = {**head, "choices": [choice(text, "stop", index) for index in range(count)]}
    if knobs.has_usage:
        body["usage"] = usage
    return await reply(request, body)


async def embeddings(request: web.Request) -> web.StreamResponse:
    """One vector of `dimensions` (default EMBEDDING_SIZE) floats per input; base64 float32
    when asked."""
    payload, knobs = await read_json(request), request[KNOBS]
    given, size = payload.get("input"), int(payload.get("dimensions") or EMBEDDING_SIZE)
    is_single = isinstance(given, str) or (
        isinstance(given, list) and bool(given) and isinstance(given[0], int)
    )
    inputs = [given] if is_single else list(given or [])
    data = []
    for index in range(len(inputs)):
        vector = [(index + position) / size for position in range(size)]
        if payload.get("encoding_format") == "base64":
            packed = struct.pack(f"<{size}f", *vector)
            data.append(
                {
                    "object": "embedding",
                    "index": index,
                    "embedding": base64.b64encode(packed).decode(),
                }
            )
        else:
            data.append({"object": "embedding", "index": index, "embedding": vector})
    body: dict = {"object": "list", "data": data, "model": payload.get("model") or DEFAULT_MODEL}
    if knobs.has_usage:
        prompt = prompt_tokens(payload)
        body["usage"] = {"prompt_tokens": prompt, "total_tokens": prompt}
    return await reply(request, body)


async def responses(request: web.Request) -> web.StreamResponse:
    payload, knobs = await read_json(request), request[KNOBS]
    deltas = content_deltas(knobs.chunks)
    text, prompt, created_at = "".join(deltas), prompt_tokens(payload), int(time.time())
    response_id, item_id = new_id("resp_"), new_id("msg_")
    usage = None
    if knobs.has_usage:
        cached, reasoning = knobs.cached_tokens, knobs.reasoning_tokens
        usage = {
            "input_tokens": prompt + cached,
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": knobs.chunks + reasoning,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": prompt + cached + knobs.chunks + reasoning,
        }

    def part(text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def item(status: str, content: list[dict]) -> dict:
        return {
            "id": item_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def response(status: str, output: list[dict], usage: dict | None) -> dict:
        searches = knobs.web_searches if usage is not None else 0
        return {
            "id": response_id,
            "object": "response",
            "created_at": created_at,
            "status": status,
            "model": payload.get("model") or DEFAULT_MODEL,
            "output": output,
            "usage": usage,
            "error": None,
            "incomplete_details": None,
            "instructions": payload.get("instructions"),
            "parallel_tool_calls": True,
            "temperature": 1.0,
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "text": {"format": {"type": "text"}},
            "service_tier": served_tier(payload),
            "tool_usage": {
                "image_gen": {
                    "input_tokens": 0,
                    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
                    "output_tokens": 0,
                    "output_tokens_details": {"image_tokens": 0, "text_tokens": 0},
                    "total_tokens": 0,
                },
                "web_search": {"num_requests": searches},
            },
        }

    done = response("completed", [item("completed", [part(text)])], usage)
    background = payload.get("background")
    if request.headers.get("x-fake-lenient") == "1" and background in (1, "1", "true", "yes", "on"):
        background = True
    if background is True:
        done["background"] = True
        polls = int(request.headers.get("x-fake-polls", "0"))
        request.app[FAKE_STATE].background[response_id] = Background(done, polls)
        if not payload.get("stream"):
            queued = {**done, "status": "queued", "output": [], "usage": None}
            return await reply(request, queued)
    if not payload.get("stream"):
        return await reply(request, done)
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    ending, ended = request.headers.get("x-fake-response-end", "completed"), done
    if ending == "incomplete":
        ended = {
            **done,
            "status": "incomplete",
            "incomplete_details": {"reason": "max_output_tokens"},
        }
    elif ending == "failed":
        error = {"code": "server_error", "message": "The model failed to finish."}
        ended = {**done, "status": "failed", "error": error}
    events = [
        {"type": "response.created", "response": response("in_progress", [], None)},
        {"type": "response.in_progress", "response": response("in_progress", [], None)},
        {"type": "response.output_item.added", "output_index": 0, "item": item("in_progress", [])},
        {"type": "response.content_part.added", **where, "part": part("")},
        *(
            {"type": "response.output_text.delta", **where, "delta": delta, "logprobs": []}
            for delta in deltas
        ),
        {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **where, "part": part(text)},
        {
            "type": "response.output_item.done",
            "output_index": 0,
            "item": item("completed", [part(text)]),
        },
        {"type": f"response.{ending}", "response": ended},
    ]
    return await stream(
        request,
        [sse({**event, "sequence_number": n}, event["type"]) for n, event in enumerate(events)],
        [*([None] * (len(events) - 1)), usage],
    )


async def retrieve_response(request: web.Request) -> web.StreamResponse:
    """GET /responses/{id}: a background Response, running or finished."""
    found = request.app[FAKE_STATE].background.get(request.match_info["response_id"])
    if found is None:
        return await reply_error(request, 404)
    done = found.done
    if found.polls > 0:
        found.polls -= 1
        done = {**done, "status": "in_progress", "output": [], "usage": None}
    if request.query.get("stream") != "true":
        return await reply(request, done)
    running = {**done, "status": "in_progress", "output": [], "usage": None}
    events = [{"type": "response.in_progress", "response": running}]
    if done["status"] == "completed":
        events.append({"type": "response.completed", "response": done})
    return await stream(
        request,
        [sse({**event, "sequence_number": n}, event["type"]) for n, event in enumerate(events)],
        [None, done["usage"]],
    )


async def cancel_response(request: web.Request) -> web.StreamResponse:
    """POST /responses/{id}/cancel: the background Response, cancelled (its usage kept)."""
    found = request.app[FAKE_STATE].background.get(request.match_info["response_id"])
    if found is None:
        return await reply_error(request, 404)
    found.done["status"], found.polls = "cancelled", 0
    return await reply(request, found.done)


def openai_model(model_id: str) -> dict:
    return {"id": model_id, "object": "model", "created": 1700000000, "owned_by": "fake-provider"}


def anthropic_model(model_id: str) -> dict:
    return {
        "id": model_id,
        "type": "model",
        "display_name": model_id,
        "created_at": "2024-10-22T00:00:00Z",
        "lifecycle": "active",
    }


def model_ids(request: web.Request, newest: tuple[str, ...]) -> list[str]:
    """The ids a model list holds: x-fake-older-models' older ones, then `newest`."""
    older = request[KNOBS].older_models
    return [f"older-model-{index:03d}" for index in range(older)] + list(newest)


async def models(request: web.Request) -> web.StreamResponse:
    """GET /models: OpenAI's whole list; Anthropic's a page of it, as Anthropic pages: at
    most `limit` (default 20, 1 to 1000, else a 400) after `after_id` or before `before_id`,
    `has_more` (more in that direction), `first_id` and `last_id`."""
    ids = model_ids(request, MODEL_IDS)
    if not is_anthropic(request):
        return await reply(request, {"object": "list", "data": [openai_model(i) for i in ids]})
    largest = request[KNOBS].largest_page or ANTHROPIC_MAX_LIMIT
    query, limit = request.query, request.query.get("limit", str(min(20, largest)))
    if not limit.isdigit() or not 1 <= int(limit) <= largest:
        return await reply_error(request, 400, message=f"limit: {limit!r} is not 1 to {largest}")
    size, after, before = int(limit), query.get("after_id"), query.get("before_id")
    if before is not None:  # an unknown cursor: nothing
        ahead = ids[: ids.index(before)] if before in ids else []
        shown, has_more = ahead[-size:], len(ahead) > size
    else:
        rest = ids if after is None else ids[ids.index(after) + 1 :] if after in ids else []
        shown, has_more = rest[:size], len(rest) > size
    listed = [anthropic_model(model_id) for model_id in shown]
    if request.headers.get("x-fake-reflect") == "body":  # as a debugging proxy might
        for entry in listed:
            entry["display_name"] += f" ({reflected(request.headers)})"
    page = {
        "data": listed,
        "has_more": has_more,
        "first_id": shown[0] if shown else None,
        "last_id": shown[-1] if shown else None,
    }
    return await reply(request, page)


# Gemini's native API (generativelanguage.googleapis.com/v1beta) names its models
# `models/<id>`, and pages its list with a token.
GEMINI_MODEL_IDS = ("gemini-2.5-flash", "gemini-2.5-pro", "text-embedding-004")
ANTHROPIC_MAX_LIMIT = GEMINI_MAX_PAGE = 1000  # each provider's documented largest page


async def gemini_models(request: web.Request) -> web.StreamResponse:
    """Gemini's native list (GET v1beta/models): `models`, each `name` `models/<id>`, paged as
    Google pages it: at most `pageSize` (default 50, at most 1000), from `pageToken` (opaque;
    valid only with the pageSize it was made for, as Google's are), `nextPageToken` while
    more follow."""
    ids = model_ids(request, GEMINI_MODEL_IDS)
    size_asked, token = request.query.get("pageSize", "0"), request.query.get("pageToken", "")
    largest = request[KNOBS].largest_page
    if not size_asked.isdigit() or (largest is not None and int(size_asked) > largest):
        return await reply_error(request, 400, message=f"pageSize: {size_asked!r}")
    size = min(int(size_asked), GEMINI_MAX_PAGE) or min(50, largest or GEMINI_MAX_PAGE)
    start = 0
    if token:
        offset, _, made_for = token.removeprefix("fake-page-").partition("-")
        if not token.startswith("fake-page-") or made_for != str(size):
            return await reply_error(request, 400, message="page token of another page size")
        start = int(offset)
    listed = [
        {"name": f"models/{model_id}", "displayName": model_id, "inputTokenLimit": 1048576}
        for model_id in ids[start : start + size]
    ]
    page: dict[str, object] = {"models": listed}
    if start + size < len(ids):
        page["nextPageToken"] = f"fake-page-{start + size}-{size}"
    return await reply(request, page)


async def model(request: web.Request) -> web.StreamResponse:
    model_id = request.match_info["model_id"]
    return await reply(
        request, anthropic_model(model_id) if is_anthropic(request) else openai_model(model_id)
    )


# --- Anthropic -----------------------------------------------------------------------


async def messages(request: web.Request) -> web.StreamResponse:
    payload, knobs = await read_json(request), request[KNOBS]
    deltas = content_deltas(knobs.chunks)
    head = {
        "id": new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": payload.get("model") or DEFAULT_MODEL,
    }
    usage: dict = {
        "input_tokens": prompt_tokens(payload),
        "output_tokens": knobs.chunks + generated_tokens(knobs),
        "cache_creation_input_tokens": knobs.cache_write_tokens,
        "cache_read_input_tokens": knobs.cached_tokens,
    }
    if knobs.cache_write_1h_tokens:
        usage["cache_creation"] = {
            "ephemeral_5m_input_tokens": knobs.cache_write_tokens - knobs.cache_write_1h_tokens,
            "ephemeral_1h_input_tokens": knobs.cache_write_1h_tokens,
        }
    searches = {"web_search_requests": knobs.web_searches} if knobs.web_searches else None
    if searches:
        usage["server_tool_use"] = searches
    if "speed" in payload:  # fast mode: the speed that served it, priced at its own rates
        usage["speed"] = payload["speed"]
    thinking_tokens = math.ceil(knobs.reasoning_chars / 4)
    iterations = side_iterations(usage, knobs.compaction_tokens, knobs.advisor_tokens)
    # The requested model declined and the fallback answered: a `fallback` block marks where
    # (a stream's message_start, sent before, still names the requested model).
    fallback = None
    if knobs.declined is not None:
        iterations = fallback_iterations(usage, head["model"], knobs.declined)
        fallback = {
            "type": "fallback",
            "from": {"model": head["model"]},
            "to": {"model": FALLBACK_MODEL},
        }
    tool = tool_name(payload) if knobs.tool_chars else None
    thinking = reasoning_text(knobs.reasoning_chars)
    if not payload.get("stream"):
        answer: dict = {"type": "text", "text": "".join(deltas)}
        if tool:
            arguments = orjson.loads(tool_arguments(knobs.tool_chars))
            answer = {"type": "tool_use", "id": new_id("toolu_"), "name": tool, "input": arguments}
        thought = {"type": "thinking", "thinking": thinking, "signature": "c2lnbmVk"}
        body = {
            **head,
            **({"model": FALLBACK_MODEL} if fallback else {}),
            "content": [
                *([fallback] if fallback else []),
                *([thought] if thinking else []),
                answer,
            ],
            "stop_reason": "tool_use" if tool else "end_turn",
            "stop_sequence": None,
        }
        if knobs.has_usage:
            body["usage"] = {**usage, "iterations": iterations} if iterations else usage
            if thinking_tokens:
                body["usage"]["output_tokens_details"] = {"thinking_tokens": thinking_tokens}
        return await reply(request, body)
    start: dict = {**head, "content": [], "stop_reason": None, "stop_sequence": None}
    stop: dict = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
    }
    if knobs.has_usage:
        start["usage"] = {
            **{name: count for name, count in usage.items() if name != "server_tool_use"},
            "output_tokens": 1,
        }  # cumulative: the message_delta count replaces it
        stop["usage"] = {"output_tokens": usage["output_tokens"]}
        if searches:  # made while it generates: counted at the end
            stop["usage"]["server_tool_use"] = searches
        if thinking_tokens:  # the part of output_tokens that was thinking
            stop["usage"]["output_tokens_details"] = {"thinking_tokens": thinking_tokens}
        if iterations:
            stop["usage"]["iterations"] = iterations
    blocks: list[tuple[dict, list[dict]]] = []  # each block's start and its deltas
    if fallback:
        blocks.append((fallback, []))
    if thinking:
        empty = {"type": "thinking", "thinking": "", "signature": ""}
        thoughts = [{"type": "thinking_delta", "thinking": t} for t in pieces(thinking, knobs)]
        blocks.append((empty, [*thoughts, {"type": "signature_delta", "signature": "c2lnbmVk"}]))
    if tool:
        parts = pieces(tool_arguments(knobs.tool_chars), knobs)
        start_block = {"type": "tool_use", "id": new_id("toolu_"), "name": tool, "input": {}}
        blocks.append(
            (start_block, [{"type": "input_json_delta", "partial_json": p} for p in parts])
        )
        stop["delta"]["stop_reason"] = "tool_use"
    else:
        blocks.append(
            ({"type": "text", "text": ""}, [{"type": "text_delta", "text": d} for d in deltas])
        )
    events = [{"type": "message_start", "message": start}]
    for index, (block, block_deltas) in enumerate(blocks):
        events.append({"type": "content_block_start", "index": index, "content_block": block})
        if index == 0:
            events.append({"type": "ping"})
        events.extend(
            {"type": "content_block_delta", "index": index, "delta": delta}
            for delta in block_deltas
        )
        events.append({"type": "content_block_stop", "index": index})
    events += [stop, {"type": "message_stop"}]
    usages = [event.get("usage") or event.get("message", {}).get("usage") for event in events]
    return await stream(request, [sse(event, event["type"]) for event in events], usages)


def declined_counts(header: str | None) -> tuple[int, int] | None:
    """x-fake-declined's "N,M": what the declined attempt read and wrote."""
    if header is None:
        return None
    read, wrote = header.split(",")
    return int(read), int(wrote)


def fallback_iterations(usage: dict, requested: str, declined: tuple[int, int]) -> list[dict]:
    """A served fallback's usage `iterations`: the requested model's declined attempt, then
    the fallback model's answer (its top-level counts)."""
    cached = {"cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    read, wrote = declined
    attempt = {"type": "message", "model": requested, "input_tokens": read, **cached}
    served = {name: usage[name] for name in ("input_tokens", "output_tokens", *cached)}
    return [
        {**attempt, "output_tokens": wrote},
        {"type": "fallback_message", "model": FALLBACK_MODEL, **served},
    ]


def side_iterations(usage: dict, compaction_tokens: int, advisor_tokens: int) -> list[dict] | None:
    """A message's usage `iterations` when server-side compaction ran first or the advisor
    was consulted. A compaction: its own counts, then the message's (its top-level counts,
    which leave the compaction's out). The advisor: the executor's first sampling (the
    top-level input counts, one output token: the advisor's call), the advisor's own counts,
    then the executor's second sampling, which reads the advice (its output) and, from the
    cache, the context before it, and writes the rest of the output. As Anthropic reports
    it, the top-level counts are the first sampling's input and every executor output."""
    if not compaction_tokens and not advisor_tokens:
        return None
    cached = {"cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    first = {
        "type": "message",
        **{name: usage[name] for name in ("input_tokens", "output_tokens", *cached)},
    }
    iterations = []
    if compaction_tokens:
        iterations.append(
            {
                "type": "compaction",
                "input_tokens": compaction_tokens,
                "output_tokens": compaction_tokens // 10,
                **cached,
            }
        )
    if not advisor_tokens:
        return [*iterations, first]
    advice = advisor_tokens // 10
    context = sum(usage[name] for name in ("input_tokens", *cached)) + 1
    return [
        *iterations,
        {**first, "output_tokens": 1},
        {
            "type": "advisor_message",
            "model": "claude-opus-4-8",
            "input_tokens": advisor_tokens,
            "output_tokens": advice,
            **cached,
        },
        {
            "type": "message",
            "input_tokens": advice,
            "output_tokens": usage["output_tokens"] - 1,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": context,
        },
    ]


async def count_tokens(request: web.Request) -> web.StreamResponse:
    return await reply(request, {"input_tokens": prompt_tokens(await read_json(request))})


# --- anything else -------------------------------------------------------------------


async def echo(request: web.Request) -> web.StreamResponse:
    """Say what arrived; credential values are redacted here (FakeState keeps them)."""
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        key, shown = name.lower(), "[redacted]" if name.lower() in AUTH_HEADERS else value
        headers[key] = f"{headers[key]}, {shown}" if key in headers else shown
    body = await request.read()
    return await reply(
        request,
        {
            "method": request.method,
            "path": request.rel_url.raw_path,
            "query_string": request.query_string,
            "headers": headers,
            "body": body.decode("utf-8", "replace"),
        },
    )


def build_fake_provider() -> web.Application:
    app = web.Application(middlewares=[observe], client_max_size=64 * 1024 * 1024)
    app[FAKE_STATE] = FakeState()
    for prefix in ("/v1", "", GEMINI_OPENAI):
        app.router.add_post(f"{prefix}/chat/completions", chat_completions)
        app.router.add_get(f"{prefix}/chat/completions", list_chats)
        chat = f"{prefix}/chat/completions/{{completion_id}}"
        app.router.add_get(chat, retrieve_chat)
        app.router.add_post(chat, update_chat)
        app.router.add_delete(chat, delete_chat)
        app.router.add_get(f"{chat}/messages", chat_messages)
        app.router.add_post(f"{prefix}/completions", completions)
        app.router.add_post(f"{prefix}/embeddings", embeddings)
        app.router.add_post(f"{prefix}/responses", responses)
        app.router.add_get(f"{prefix}/responses/{{response_id}}", retrieve_response)
        app.router.add_post(f"{prefix}/responses/{{response_id}}/cancel", cancel_response)
        app.router.add_get(f"{prefix}/models", models)
        app.router.add_get(f"{prefix}/models/{{model_id}}", model)
        app.router.add_post(f"{prefix}/messages", messages)
        app.router.add_post(f"{prefix}/messages/count_tokens", count_tokens)
    app.router.add_get("/v1beta/models", gemini_models)
    # Azure OpenAI at a resource's endpoint: the deployments API and the v1 API.
    for prefix in ("/openai/deployments/{deployment}", "/openai/v1"):
        app.router.add_post(f"{prefix}/chat/completions", chat_completions)
        app.router.add_post(f"{prefix}/completions", completions)
        app.router.add_post(f"{prefix}/embeddings", embeddings)
    fake_realtime.install(app)  # the Realtime API's WebSocket
    fake_media.install(app)  # images, audio, ephemeral keys, assistant runs
    fake_batches.install(app)  # files, OpenAI batches, Anthropic message batches
    app.router.add_route("*", "/{tail:.*}", echo)
    app.on_response_prepare.append(add_provider_headers)
    app.on_response_prepare.append(drop_content_type)
    app.on_shutdown.append(let_go)
    return app


async def serve(host: str, port: int) -> None:
    """Listen until SIGINT or SIGTERM; print the real address once listening."""
    runner = web.AppRunner(
        build_fake_provider(), handler_cancellation=True, access_log=None, shutdown_timeout=1.0
    )
    await runner.setup()
    sock = socket.create_server((host, port))
    await web.SockSite(runner, sock).start()
    print(f"fake provider on http://{host}:{sock.getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the fake LLM provider.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.host, args.port))
    else:
        uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
