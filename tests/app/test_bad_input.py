"""Hundreds of generated bad requests: each gets a well-formed refusal in its endpoint's dialect.

Every answer must be a 4xx (never a 500, never a traceback) with the JSON error shape of the
path it was sent to (Anthropic for `/v1/messages…` and `/messages…`, OpenAI otherwise); nothing
may reach the provider; the gateway logs no error; and it still serves a normal request after.

Well-formed HTTP goes through an aiohttp client (odd keys, methods, headers, bodies, chunked
uploads). Paths the client would normalise and HTTP that must be malformed (broken framing,
truncated bodies) go through raw sockets. The generator is seeded: a failing case is named
and replays the same way.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict

from tests.conftest import (
    ANTHROPIC_VK,
    LIMITED_VK,
    OPENAI_REAL,
    OPENAI_VK,
    RESTRICTED_VK,
    assert_anthropic_error,
    assert_openai_error,
    auth,
)
from tests.support.fake_provider import FakeState
from tests.support.polling import until

SEED = 20250607
ANSWER_SECONDS = 3.0
SMALL_LIMIT = 1024  # MAX_BODY_BYTES for the oversized-body tests

# The statuses the gateway's own OpenAI error codes come with (errors.py's failure map).
CODE_STATUS = {
    "invalid_api_key": 401,
    "invalid_path": 400,
    "unknown_route": 404,
    "invalid_json": 400,
    "missing_field": 400,
    "invalid_body": 400,
    "model_not_allowed": 403,
    "request_too_large": 413,
    "method_not_allowed": 405,
}
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
}
BAD_BODY = frozenset({"invalid_json", "missing_field"})
TRACEBACK_MARKS = (b"Traceback", b'File "')

OPENAI_PATHS = (
    "/v1/chat/completions",
    "/chat/completions",
    "/v1/completions",
    "/completions",
    "/v1/embeddings",
    "/embeddings",
    "/v1/responses",
    "/v1/models",
    "/models",
    "/v1/models/gpt-4o-mini",
    "/v1/files",
)
ANTHROPIC_PATHS = ("/v1/messages", "/messages", "/v1/messages/count_tokens", "/v1/messages/batches")
# Paths whose POST body must carry a non-empty string model and a non-empty messages array.
OPENAI_CHAT = ("/v1/chat/completions", "/chat/completions")
ANTHROPIC_CHAT = ("/v1/messages", "/messages", "/v1/messages/count_tokens")
# Methods llhttp parses (aiohttp's parser refuses the rest: see malformed_http).
ODD_METHODS = tuple(
    "PUT PATCH DELETE OPTIONS TRACE PROPFIND PROPPATCH REPORT MKCOL SEARCH PURGE LOCK UNLOCK COPY MOVE "
    "LINK UNLINK SUBSCRIBE NOTIFY MKCALENDAR CHECKOUT MERGE ACL BIND QUERY M-SEARCH".split()
)
# Of them, those a provider API serves: judged like a POST. The rest get 405 before any key.
PROXIED_ODD_METHODS = frozenset(("PUT", "PATCH", "DELETE", "OPTIONS"))
MESSAGES = [{"role": "user", "content": "hello"}]
GOOD_CHAT = {"model": "gpt-4o-mini", "messages": MESSAGES}
GOOD_MESSAGE = {"model": "claude-3-5-haiku-latest", "max_tokens": 9, "messages": MESSAGES}
JSON_TYPES = ("application/json", "application/json; charset=utf-8", "application/vnd.api+json")
OTHER_TYPES = (
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    None,
)


def is_anthropic(path: str) -> bool:
    return path.startswith(("/v1/messages", "/messages"))


def dumps(document: object) -> bytes:
    return json.dumps(document).encode()


@dataclass(frozen=True, slots=True)
class Bad:
    """One bad request and the refusals it may get (OpenAI codes; the status follows from them)."""

    label: str
    method: str
    path: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    codes: frozenset[str] = frozenset()
    field: str | None = None  # the field a missing_field refusal must name
    is_anthropic: bool | None = None  # the dialect; None: from the path

    @property
    def dialect_is_anthropic(self) -> bool:
        return is_anthropic(self.path) if self.is_anthropic is None else self.is_anthropic


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: CIMultiDict[str]
    body: bytes


def judge(case: Bad, answer: Answer) -> list[str]:
    """What is wrong with this answer to this bad request (nothing, ideally)."""
    problems: list[str] = []
    if answer.status == 500 or not 400 <= answer.status < 600:
        problems.append(f"status {answer.status}")
    if any(mark in answer.body for mark in TRACEBACK_MARKS):
        problems.append(f"traceback-like text in {answer.body[:200]!r}")
    if not answer.headers.get("x-request-id"):
        problems.append("no x-request-id")
    if not answer.headers.get("content-type", "").startswith("application/json"):
        problems.append(
            f"content-type {answer.headers.get('content-type')!r}: {answer.body[:120]!r}"
        )
        return problems
    try:
        body = json.loads(answer.body)
    except ValueError:
        return [*problems, f"not JSON: {answer.body[:120]!r}"]
    try:
        if case.dialect_is_anthropic:
            assert_anthropic_error(body, ANTHROPIC_TYPES.get(answer.status, "?"))
            if case.field and answer.status == 400:
                assert f"'{case.field}'" in body["error"]["message"], body
        else:
            code = (
                body.get("error", {}).get("code") if isinstance(body.get("error"), dict) else None
            )
            assert code in case.codes or not case.codes, (
                f"code {code!r}, expected one of {sorted(case.codes)}"
            )
            assert_openai_error(body, code)
            assert CODE_STATUS.get(code) == answer.status, (
                f"code {code} with status {answer.status}"
            )
            if case.field and code == "missing_field":
                assert body["error"]["param"] == case.field, body
    except AssertionError as error:
        problems.append(f"{answer.status} {error}")
    if case.dialect_is_anthropic and case.codes:
        allowed = {CODE_STATUS[code] for code in case.codes}
        if answer.status not in allowed:
            problems.append(f"status {answer.status}, expected one of {sorted(allowed)}")
    return problems


# --- sending -------------------------------------------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that adds no Content-Type of its own and uses one connection per request,
    so one case's broken connection cannot be blamed on the next."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(
        connector=connector, skip_auto_headers=("Content-Type",)
    ) as session:
        yield session


# aiohttp logs each request its HTTP parser refused under this message, with a traceback;
# test_malformed_http_logs_no_traceback holds that against the gateway separately.
PARSER_REFUSAL_LOG = "Error handling request from %s"


def logged_errors(caplog: pytest.LogCaptureFixture, *, parser_refusals: bool) -> list[str]:
    """Errors the gateway (or aiohttp under it) logged during the test."""
    return [
        f"{record.name}: {record.getMessage()}"
        for record in caplog.get_records("call")
        if record.levelno >= logging.ERROR
        and record.name.startswith(("llm_gateway", "aiohttp"))
        and (parser_refusals or record.msg != PARSER_REFUSAL_LOG)
    ]


@pytest.fixture(autouse=True)
def no_error_logged(caplog: pytest.LogCaptureFixture) -> Iterable[None]:
    """No bad input may make the gateway log an error (an internal error, an unhandled exception)."""
    caplog.set_level(logging.WARNING)
    yield
    errors = logged_errors(caplog, parser_refusals=False)
    assert not errors, "\n".join(errors)


async def send(
    http: aiohttp.ClientSession, gateway: TestClient, case: Bad, data: object = None
) -> Answer:
    url = gateway.make_url(case.path)
    body = case.body if data is None else data
    async with http.request(
        case.method, url, headers=CIMultiDict(case.headers), data=body or None
    ) as response:
        return Answer(response.status, CIMultiDict(response.headers), await response.read())


async def refuse_all(
    http: aiohttp.ClientSession, gateway: TestClient, fake: FakeState, cases: Sequence[Bad]
) -> None:
    """Send every case; each must be refused well, none may reach the provider."""
    problems: list[str] = []
    for case in cases:
        before = len(fake.requests)
        try:
            answer = await send(http, gateway, case)
        except aiohttp.ClientError as error:
            problems.append(f"{case.label}: no answer ({error!r})")
            continue
        problems += [f"{case.label}: {problem}" for problem in judge(case, answer)]
        if len(fake.requests) != before:
            problems.append(f"{case.label}: reached the provider")
    assert not problems, f"{len(problems)} of {len(cases)} cases went wrong:\n" + "\n".join(
        problems
    )


async def handlers_done(gateway: TestClient) -> None:
    """Every connection the gateway accepted is closed and its handler has returned: whatever
    it would log or forward, it has."""

    def idle() -> bool:
        handlers = [
            task
            for task in asyncio.all_tasks()
            if getattr(task.get_coro(), "__qualname__", "") == "RequestHandler.start"
        ]
        return not gateway.server.runner.server.connections and not handlers

    await until(idle, what="every connection's handler ending")


async def exchange(gateway: TestClient, data: bytes, *, half_close: bool = False) -> Answer | None:
    """Raw bytes in, the parsed answer out; None when the gateway closed without answering."""
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    try:
        writer.write(data)
        await writer.drain()
        if half_close:
            writer.write_eof()
        async with asyncio.timeout(ANSWER_SECONDS):
            head = b"HTTP/1.1 100 Continue\r\n\r\n"
            while head.startswith(b"HTTP/1.1 1"):  # an interim answer (100 Continue) is no answer
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as error:
                    assert not error.partial, f"half an answer: {error.partial!r}"
                    return None
            status_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
            headers = CIMultiDict(
                (name.strip(), value.strip())
                for name, _, value in (line.partition(":") for line in lines)
            )
            if "content-length" in headers:
                body = await reader.readexactly(int(headers["content-length"]))
            else:
                body = await reader.read()
        return Answer(int(status_line.split(" ", 2)[1]), headers, body)
    except ConnectionResetError:
        return None
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def http_bytes(
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    length: bool = True,
) -> bytes:
    """An HTTP/1.1 request as bytes, with Host and (unless told otherwise) Content-Length."""
    lines = [
        f"{method} {target} HTTP/1.1",
        "Host: gateway.test",
        *(f"{name}: {value}" for name, value in headers),
    ]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return "\r\n".join(lines).encode("utf-8", "surrogateescape") + b"\r\n\r\n" + body


async def refuse_all_raw(
    gateway: TestClient, fake: FakeState, cases: Sequence[tuple[Bad, bytes]]
) -> None:
    problems: list[str] = []
    for case, data in cases:
        before = len(fake.requests)
        answer = await exchange(gateway, data)
        if answer is None:
            problems.append(f"{case.label}: closed without an answer")
            continue
        problems += [f"{case.label}: {problem}" for problem in judge(case, answer)]
        if len(fake.requests) != before:
            problems.append(f"{case.label}: reached the provider")
    assert not problems, f"{len(problems)} of {len(cases)} cases went wrong:\n" + "\n".join(
        problems
    )


async def assert_still_serves(gateway: TestClient, fake: FakeState) -> None:
    """After all that, a normal request gets the provider's answer, byte for byte."""
    headers = {
        **auth(OPENAI_VK),
        "x-request-id": "req_after_bad_input",
        "Content-Type": "application/json",
    }
    async with gateway.post(
        "/v1/chat/completions", data=dumps(GOOD_CHAT), headers=headers
    ) as response:
        assert response.status == 200
        assert await response.read() == fake.sent["req_after_bad_input"]
    assert fake.requests[-1].headers["Authorization"] == f"Bearer {OPENAI_REAL}"


# --- the generators --------------------------------------------------------------------------

KEYLESS = (
    ("no key", ()),
    ("unknown bearer", (("Authorization", "Bearer vk_unknown"),)),
    ("empty bearer", (("Authorization", "Bearer "),)),
    ("bare scheme", (("Authorization", "Bearer"),)),
    (
        "basic scheme",
        (("Authorization", "Basic " + base64.b64encode(f"u:{OPENAI_VK}".encode()).decode()),),
    ),
    ("token scheme", (("Authorization", f"Token {OPENAI_VK}"),)),
    ("scheme glued to key", (("Authorization", f"Bearer{OPENAI_VK}"),)),
    ("key minus a char", (("Authorization", f"Bearer {OPENAI_VK[:-1]}"),)),
    ("key plus a char", (("x-api-key", OPENAI_VK + "0"),)),
    ("upper-cased key", (("api-key", OPENAI_VK.upper()),)),
    ("key with a wildcard", (("x-api-key", "vk_test_*"),)),
    ("real key presented", (("Authorization", f"Bearer {OPENAI_REAL}"),)),
    ("blank x-api-key", (("x-api-key", "   "),)),
    ("unknown goog key", (("x-goog-api-key", "vk_unknown"),)),
    (
        "unknown bearer before a valid x-api-key",
        (("Authorization", "Bearer vk_unknown"), ("x-api-key", OPENAI_VK)),
    ),
    (
        "two authorizations, first unknown",
        (("Authorization", "Bearer vk_unknown"), ("Authorization", f"Bearer {OPENAI_VK}")),
    ),
    # As large as the gateway's header limit lets through (4096 bytes a field): see
    # test_a_head_over_the_header_limits_is_refused_before_any_handler for larger.
    ("huge key", (("Authorization", "Bearer " + "k" * 4000),)),
    ("key in proxy-authorization", (("Proxy-Authorization", f"Bearer {OPENAI_VK}"),)),
    ("key in a cookie", (("Cookie", f"api_key={OPENAI_VK}"),)),
    ("unicode key", (("x-api-key", "vk_ключ_🔑"),)),
)


def keyless_cases(rng: random.Random) -> list[Bad]:
    """Each way of not presenting a known key, on a sample of methods, paths and bodies."""
    bodies = (b"", b"{bad", dumps(GOOD_CHAT), dumps(GOOD_MESSAGE), b"\xff\xfe\x00")
    cases = []
    for label, headers in KEYLESS:
        for path in (
            rng.sample(OPENAI_PATHS, 2) + rng.sample(ANTHROPIC_PATHS, 1) + ["/unknown/route"]
        ):
            method = rng.choice(("POST", "GET", *ODD_METHODS))
            # A path that is not proxied, or a method no provider API serves, is refused
            # before any key is looked at.
            if path == "/unknown/route":
                code = "unknown_route"
            elif method in ("POST", "GET", *PROXIED_ODD_METHODS):
                code = "invalid_api_key"
            else:
                code = "method_not_allowed"
            cases.append(
                Bad(
                    f"{label} {method} {path}",
                    method,
                    path,
                    headers,
                    rng.choice(bodies),
                    frozenset({code}),
                )
            )
    return cases


def odd_method_cases(rng: random.Random) -> list[Bad]:
    """Every parseable odd method on a proxied path, carrying a body that declares JSON but is
    not: one a provider API serves is judged like a POST, any other refused with 405."""
    cases = []
    for method in ODD_METHODS:
        for path in (rng.choice(OPENAI_PATHS), rng.choice(ANTHROPIC_PATHS)):
            headers = (
                *auth(OPENAI_VK if not is_anthropic(path) else ANTHROPIC_VK).items(),
                ("Content-Type", "application/json"),
            )
            cases.append(
                Bad(
                    f"{method} {path}",
                    method,
                    path,
                    headers,
                    b'{"model": ',
                    frozenset(
                        {"invalid_json" if method in PROXIED_ODD_METHODS else "method_not_allowed"}
                    ),
                )
            )
    return cases


def not_json_bodies(rng: random.Random) -> list[tuple[str, bytes]]:
    deep = 100_000
    return [
        ("open brace", b"{bad"),
        ("lone open", b"{"),
        ("lone close", b"}"),
        ("extra close", b"{}}"),
        ("cut short", b'{"model": "m", "messages": [1]'),
        ("trailing garbage", b'{"model": "m", "messages": [1]} trailing'),
        ("single quotes", b"{'model': 'm', 'messages': [1]}"),
        ("comment", b'{"model": "m", /* c */ "messages": [1]}'),
        ("NaN", b'{"model": "m", "messages": [1], "temperature": NaN}'),
        ("Infinity", b'{"model": "m", "messages": [1], "temperature": Infinity}'),
        ("trailing comma", b'{"model": "m", "messages": [1],}'),
        ("utf-8 BOM", b'\xef\xbb\xbf{"model": "m", "messages": [1]}'),
        ("utf-16", '{"model": "m", "messages": [1]}'.encode("utf-16")),
        ("latin-1 in a string", b'{"model": "gpt-\xe9", "messages": [1]}'),
        ("overlong utf-8", b'{"model": "\xc0\xaf", "messages": [1]}'),
        ("lone surrogate escape", b'{"model": "\\ud800", "messages": [1]}'),
        ("bad escape", b'{"model": "\\x41", "messages": [1]}'),
        ("raw NUL in a string", b'{"model": "a\x00b", "messages": [1]}'),
        ("raw newline in a string", b'{"model": "a\nb", "messages": [1]}'),
        ("NULs", b"\x00" * 16),
        ("0xff bytes", b"\xff" * 32),
        ("random bytes", rng.randbytes(64)),
        ("random bytes after a brace", b"{" + rng.randbytes(64)),
        ("deep arrays", b"[" * deep),
        ("deep objects", b'{"a":' * 5000 + b"1" + b"}" * 5000),
        ("deep messages", b'{"model": "m", "messages": ' + b"[" * 2000 + b"]" * 2000 + b"}"),
        ("unclosed deep messages", b'{"model": "m", "messages": ' + b"[" * deep),
        ("empty", b""),
        ("blank", b"   \r\n\t"),
        ("bare word", b"nul"),
        ("open then spaces", b"{" + b" " * 1000),
    ]


NOT_OBJECTS = [
    b"[]",
    b"[1]",
    dumps([GOOD_CHAT]),
    b'"str"',
    b"1",
    b"-0.5",
    b"null",
    b"true",
    b"false",
    b'""',
]
WRONG_MODELS = [None, 1, 1.5, True, [], ["gpt-4o-mini"], {}, {"id": "gpt-4o-mini"}, "", " ", "\n\t"]
WRONG_MESSAGES = [None, "hi", 1, {}, {"role": "user", "content": "hi"}, [], True, ""]
WRONG_STREAMS = ["yes", 1, None, [], {}, "true"]
MISSING = object()


def chat_body(path: str, **fields: object) -> bytes:
    base = dict(GOOD_MESSAGE if is_anthropic(path) else GOOD_CHAT)
    for name, value in fields.items():
        if value is MISSING:
            base.pop(name, None)
        else:
            base[name] = value
    return dumps(base)


def bad_body_cases(rng: random.Random) -> list[Bad]:
    """Malformed JSON, JSON that is no object, and wrong model/messages/stream types, on the
    paths that need model and messages, each under a random Content-Type."""

    def case(
        label: str, path: str, body: bytes, codes: frozenset[str], field: str | None = None
    ) -> Bad:
        key = ANTHROPIC_VK if is_anthropic(path) else OPENAI_VK
        content_type = rng.choice(JSON_TYPES + OTHER_TYPES)
        headers = tuple(auth(key).items()) + (
            (("Content-Type", content_type),) if content_type else ()
        )
        return Bad(
            f"{label} POST {path} as {content_type}", "POST", path, headers, body, codes, field
        )

    def paths() -> list[str]:
        return [rng.choice(OPENAI_CHAT), rng.choice(ANTHROPIC_CHAT)]

    cases = []
    for label, body in not_json_bodies(rng):
        cases += [case(label, path, body, BAD_BODY) for path in paths()]
    for body in NOT_OBJECTS:
        cases += [case(f"not an object {body[:20]!r}", path, body, BAD_BODY) for path in paths()]
    missing_field = frozenset({"missing_field"})
    for model in [MISSING, *WRONG_MODELS]:
        label = "no model" if model is MISSING else f"model={model!r}"
        cases += [
            case(label, path, chat_body(path, model=model), missing_field, "model")
            for path in paths()
        ]
    for messages in [MISSING, *WRONG_MESSAGES]:
        label = "no messages" if messages is MISSING else f"messages={messages!r}"
        cases += [
            case(label, path, chat_body(path, messages=messages), missing_field, "messages")
            for path in paths()
        ]
    for stream in WRONG_STREAMS:
        # The gateway leaves stream's type to the provider; it must still refuse the rest.
        for path in paths():
            model = rng.choice(WRONG_MODELS)
            cases.append(
                case(
                    f"stream={stream!r} model={model!r}",
                    path,
                    chat_body(path, stream=stream, model=model),
                    missing_field,
                    "model",
                )
            )
            messages = rng.choice(WRONG_MESSAGES)
            cases.append(
                case(
                    f"stream={stream!r} messages={messages!r}",
                    path,
                    chat_body(path, stream=stream, messages=messages),
                    missing_field,
                    "messages",
                )
            )
    return cases


def restricted_model_cases(rng: random.Random) -> list[Bad]:
    """Models outside the restricted key's allowed patterns, however they are spelled."""
    models = [
        "claude-opus-4-1",
        "gpt-4o",
        "claude-3-5-haiku",
        "CLAUDE-3-5-HAIKU-latest",
        "claude-sonnet-4",
        " claude-sonnet-4-6",
        "claude-3-haiku-20240307",
        "x" * 5000,
        "claude-sonnet-3\u0000-4-x",
        "🤖",
    ]
    cases = []
    for model in models:
        path = rng.choice(ANTHROPIC_CHAT)
        stream = rng.choice([True, False, "yes"])
        body = chat_body(path, model=model, stream=stream)
        headers = (("x-api-key", RESTRICTED_VK), ("Content-Type", "application/json"))
        cases.append(
            Bad(
                f"restricted model {model[:40]!r}",
                "POST",
                path,
                headers,
                body,
                frozenset({"model_not_allowed"}),
            )
        )
    return cases


# Within the gateway's header limits (4096 bytes a field, 32 fields): larger heads are
# aiohttp's parser's to refuse (test_a_head_over_the_header_limits_is_refused_before_any_handler).
ODD_HEADERS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("huge header", (("x-padding", "a" * 4000),)),
    ("twenty headers", tuple((f"x-h{index}", "v" * 50) for index in range(20))),
    ("twenty of one header", tuple(("x-dup", str(index)) for index in range(20))),
    ("two request ids", (("x-request-id", "req_a"), ("x-request-id", "req_b"))),
    ("long request id", (("x-request-id", "r" * 4000),)),
    ("unicode request id", (("x-request-id", "ünïcødé-✓"),)),
    ("empty request id", (("x-request-id", ""),)),
    ("another host", (("Host", "evil.example"),)),
    (
        "forwarded host",
        (("X-Forwarded-Host", "evil.example"), ("Forwarded", "host=evil.example;proto=https")),
    ),
    ("connection names the key headers", (("Connection", "keep-alive, authorization, x-api-key"),)),
    ("expect continue", (("Expect", "100-continue"),)),
    ("accept html", (("Accept", "text/html"),)),
    ("accept-encoding br only", (("Accept-Encoding", "br;q=1, gzip;q=0, identity;q=0"),)),
    ("junk anthropic-version", (("anthropic-version", "ÿÿÿÿ"),)),
    ("junk traceparent", (("traceparent", "zz-" + "0" * 200),)),
    ("huge cookie", (("Cookie", "a=" + "b" * 4000),)),
    ("range", (("Range", "bytes=0-1"),)),
    ("method override", (("X-HTTP-Method-Override", "GET"),)),
    ("content-encoding identity", (("Content-Encoding", "identity"),)),
    ("charset latin-1", (("Content-Type", "application/json; charset=latin-1"),)),
    ("header with only spaces", (("x-blank", "   "),)),
)


def odd_header_cases(rng: random.Random) -> list[Bad]:
    """Odd, duplicate and huge headers on requests the gateway must refuse anyway."""
    cases = []
    for label, extra in ODD_HEADERS:
        path = rng.choice(OPENAI_CHAT + ANTHROPIC_CHAT)
        has_type = any(name.lower() == "content-type" for name, _ in extra)
        json_type = () if has_type else (("Content-Type", "application/json"),)
        cases += [
            Bad(
                f"{label}, unknown key",
                "POST",
                path,
                (("x-api-key", "vk_unknown"), *extra),
                chat_body(path),
                frozenset({"invalid_api_key"}),
            ),
            Bad(
                f"{label}, bad JSON",
                "POST",
                path,
                (*auth(OPENAI_VK).items(), *json_type, *extra),
                b'{"model": [',
                BAD_BODY,
            ),
            Bad(
                f"{label}, restricted model",
                "POST",
                rng.choice(ANTHROPIC_CHAT),
                (("x-api-key", RESTRICTED_VK), *json_type, *extra),
                chat_body("/v1/messages", model="claude-opus-4-1"),
                frozenset({"model_not_allowed"}),
            ),
        ]
    return cases


UNSAFE_TARGETS: tuple[tuple[str, bool], ...] = (
    # (request target, is the Anthropic dialect expected)
    ("/v1/../v1/chat/completions", False),
    ("/v1/chat/../../admin", False),
    ("/v1/./chat/completions", False),
    ("/v1/chat/completions/..", False),
    ("/v1/chat/completions/.", False),
    ("/v1//chat/completions", False),
    ("/v1/chat//completions", False),
    ("/v1/%2e%2e/admin", False),
    ("/v1/%2E%2E/admin", False),
    ("/v1/.%2e/admin", False),
    ("/v1/%2e/chat/completions", False),
    ("/v1/chat%2fcompletions", False),
    ("/v1/chat%2Fcompletions", False),
    ("/v1/chat%5ccompletions", False),
    ("/v1/chat\\completions", False),
    ("/v1/%00", False),
    ("/v1/chat%00/completions", False),
    ("//evil.example/v1/chat/completions", False),
    ("///v1/chat/completions", False),
    ("/v1/http://evil.example/x", False),
    ("/v1/https:%2f%2fevil.example", False),
    ("http://evil.example/v1/chat/completions", False),
    ("/", False),
    ("/v2/chat/completions", False),
    ("/v1", False),
    ("/v1/", False),
    ("/V1/chat/completions", False),
    ("/favicon.ico", False),
    ("/admin", False),
    ("/.env", False),
    ("/health/../v1/chat/completions", False),
    ("/embeddings/..", False),
    ("/models/../../etc/passwd", False),
    ("/completions/%2e%2e", False),
    ("/chat/completions/../../../etc/passwd", False),
    ("/v1/messages/../../etc/passwd", True),
    ("/v1/messages/%2e%2e/%2e%2e/admin", True),
    ("/v1/messages%2fcount_tokens", True),
    ("/v1/messages/count_tokens/..", True),
    ("/v1/messages//batches", True),
    ("/messages/%2F%2Fevil.example", True),
    ("/v1/messages/%5c..%5c", True),
    ("/messages/./count_tokens", True),
    ("https://evil.example/v1/messages", True),
)


def unsafe_path_cases(rng: random.Random) -> list[tuple[Bad, bytes]]:
    """Paths that climb out, smuggle a host or name nothing proxied: 400 or 404, never forwarded."""
    cases = []
    for target, anthropic in UNSAFE_TARGETS:
        for method in ("POST", rng.choice(("GET", "DELETE", "PUT", "OPTIONS"))):
            query = rng.choice(("", "?a=1", "?next=../../admin", "?url=http://evil.example/"))
            body = dumps(GOOD_MESSAGE if anthropic else GOOD_CHAT)
            headers = (
                *auth(ANTHROPIC_VK if anthropic else OPENAI_VK).items(),
                ("Content-Type", "application/json"),
            )
            case = Bad(
                f"{method} {target}{query}",
                method,
                target + query,
                headers,
                body,
                frozenset({"invalid_path", "unknown_route"}),
                is_anthropic=anthropic,
            )
            cases.append((case, http_bytes(method, target + query, headers, body)))
    return cases


def truncated_requests() -> list[tuple[str, str, bytes]]:
    """(label, path, bytes) of uploads that stop short: the client then sends EOF."""
    cases = []
    for path in ("/v1/chat/completions", "/v1/messages", "/v1/embeddings"):
        key = auth(ANTHROPIC_VK if is_anthropic(path) else OPENAI_VK)
        head = [*key.items(), ("Content-Type", "application/json")]
        body = chat_body(path)
        cases += [
            (
                "half the declared length",
                path,
                http_bytes(
                    "POST",
                    path,
                    [*head, ("Content-Length", str(len(body) * 2))],
                    body,
                    length=False,
                ),
            ),
            (
                "nothing of the declared length",
                path,
                http_bytes("POST", path, [*head, ("Content-Length", "100")], length=False),
            ),
            (
                "expect continue, then nothing",
                path,
                http_bytes(
                    "POST",
                    path,
                    [*head, ("Expect", "100-continue"), ("Content-Length", "50")],
                    length=False,
                ),
            ),
            (
                "chunk cut in half",
                path,
                http_bytes(
                    "POST",
                    path,
                    [*head, ("Transfer-Encoding", "chunked")],
                    b"40\r\n" + body[:20],
                    length=False,
                ),
            ),
            (
                "no last chunk",
                path,
                http_bytes(
                    "POST",
                    path,
                    [*head, ("Transfer-Encoding", "chunked")],
                    b"%x\r\n%s\r\n" % (len(body), body),
                    length=False,
                ),
            ),
            (
                "chunk size only",
                path,
                http_bytes(
                    "POST", path, [*head, ("Transfer-Encoding", "chunked")], b"10", length=False
                ),
            ),
        ]
    return cases


def malformed_http() -> list[tuple[str, bytes]]:
    """HTTP that aiohttp's parser refuses before the gateway sees a request.

    A gateway process answers each with its own JSON error (`runtime.server`'s protocol:
    tests/process/test_server.py); the in-process test server runs aiohttp's own protocol,
    so here only the status and the absence of a traceback are held."""
    key = f"Authorization: Bearer {OPENAI_VK}\r\n".encode()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway.test\r\n" + key
    return [
        (
            "unknown method",
            b"BREW /v1/chat/completions HTTP/1.1\r\nHost: g\r\n"
            + key
            + b"Content-Length: 0\r\n\r\n",
        ),
        (
            "lower-case method",
            b"post /v1/chat/completions HTTP/1.1\r\nHost: g\r\n"
            + key
            + b"Content-Length: 0\r\n\r\n",
        ),
        (
            "RTSP method",
            b"DESCRIBE /v1/messages HTTP/1.1\r\nHost: g\r\n" + key + b"Content-Length: 0\r\n\r\n",
        ),
        ("request line too long", b"POST /v1/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: g\r\n\r\n"),
        ("header too long", head + b"x-big: " + b"a" * 70_000 + b"\r\nContent-Length: 0\r\n\r\n"),
        (
            "too many headers",
            head
            + b"".join(b"x-h%d: v\r\n" % index for index in range(200))
            + b"Content-Length: 0\r\n\r\n",
        ),
        ("header without colon", head + b"no colon here\r\nContent-Length: 0\r\n\r\n"),
        ("space before colon", head + b"x-api-key : vk\r\nContent-Length: 0\r\n\r\n"),
        ("obsolete line folding", head + b"x-a: 1\r\n  folded\r\nContent-Length: 0\r\n\r\n"),
        ("NUL in a header value", head + b"x-a: a\x00b\r\nContent-Length: 0\r\n\r\n"),
        (
            "control char in a request id",
            head + b"x-request-id: a\x01b\r\nContent-Length: 0\r\n\r\n",
        ),
        ("bad char in a header name", head + b"x-a(b): 1\r\nContent-Length: 0\r\n\r\n"),
        (
            "two content-types",
            head
            + b"Content-Type: text/plain\r\nContent-Type: application/json\r\nContent-Length: 4\r\n\r\n{bad",
        ),
        ("two hosts", head + b"Host: evil.example\r\nContent-Length: 4\r\n\r\n{bad"),
        ("two content-lengths", head + b"Content-Length: 4\r\nContent-Length: 5\r\n\r\n{bad"),
        ("negative content-length", head + b"Content-Length: -1\r\n\r\n"),
        ("non-numeric content-length", head + b"Content-Length: abc\r\n\r\n"),
        ("plus-signed content-length", head + b"Content-Length: +4\r\n\r\n{bad"),
        (
            "overflowing content-length",
            head + b"Content-Length: 99999999999999999999999999\r\n\r\n",
        ),
        (
            "content-length and chunked",
            head + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{bad\r\n0\r\n\r\n",
        ),
        (
            "identity transfer-encoding",
            head + b"Transfer-Encoding: identity\r\nContent-Length: 4\r\n\r\n{bad",
        ),
        ("bad chunk size", head + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"),
        (
            "huge chunk size",
            head + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\nabc\r\n0\r\n\r\n",
        ),
        ("chunk without its CRLF", head + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcXX0\r\n\r\n"),
        (
            "bad chunk extension",
            head + b"Transfer-Encoding: chunked\r\n\r\n4;a=b;;\r\n{bad\r\n0\r\n\r\n",
        ),
        (
            "HTTP/2.0 in a request line",
            b"POST /v1/chat/completions HTTP/2.0\r\nHost: g\r\n"
            + key
            + b"Content-Length: 0\r\n\r\n",
        ),
        ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        ("TLS on the plain port", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40),
        ("no Host", b"POST /v1/chat/completions HTTP/1.1\r\n" + key + b"Content-Length: 0\r\n\r\n"),
        (
            "space in the target",
            b"POST /v1/chat completions HTTP/1.1\r\nHost: g\r\n"
            + key
            + b"Content-Length: 0\r\n\r\n",
        ),
        (
            "raw 0xff in the target",
            b"POST /v1/\xff HTTP/1.1\r\nHost: g\r\n" + key + b"Content-Length: 0\r\n\r\n",
        ),
        (
            "control char in the target",
            b"POST /v1/\x01 HTTP/1.1\r\nHost: g\r\n" + key + b"Content-Length: 0\r\n\r\n",
        ),
        ("asterisk target", b"OPTIONS * HTTP/1.1\r\nHost: g\r\n" + key + b"\r\n"),
        (
            "deflate claim on a plain body",
            head
            + b"Content-Encoding: deflate\r\nContent-Type: application/json\r\nContent-Length: 4\r\n\r\n{bad",
        ),
        (
            "br claim without Brotli",
            head
            + b"Content-Encoding: br\r\nContent-Type: application/json\r\nContent-Length: 4\r\n\r\n{bad",
        ),
        (
            "zstd claim without zstd",
            head
            + b"Content-Encoding: zstd\r\nContent-Type: application/json\r\nContent-Length: 4\r\n\r\n{bad",
        ),
    ]


def encoding_claim_cases(rng: random.Random) -> list[Bad]:
    """Bodies that say they are gzip/deflate-compressed but are not (or are, but broken)."""
    broken_gzip = gzip.compress(dumps(GOOD_CHAT))[:-8]
    cases = []
    for encoding in ("gzip", "GZIP", "deflate"):
        for path in (rng.choice(OPENAI_CHAT), rng.choice(ANTHROPIC_CHAT)):
            for label, body in (
                ("plain JSON", chat_body(path)),
                ("non-UTF-8", b"\xff\xfe\xfd" * 10),
                ("truncated gzip", broken_gzip),
            ):
                key = ANTHROPIC_VK if is_anthropic(path) else OPENAI_VK
                headers = (
                    *auth(key).items(),
                    ("Content-Type", "application/json"),
                    ("Content-Encoding", encoding),
                )
                cases.append(
                    Bad(
                        f"{encoding} claim, {label}, {path}",
                        "POST",
                        path,
                        headers,
                        body,
                        frozenset({"invalid_body", "invalid_json", "missing_field"}),
                    )
                )
    return cases


def oversized_cases(rng: random.Random) -> list[Bad]:
    """Bodies past MAX_BODY_BYTES=1024, declared by Content-Length, on every kind of path."""
    cases = []
    for size in (SMALL_LIMIT + 1, 2 * SMALL_LIMIT, 64 * 1024, 3 * 1024 * 1024):
        for path in (
            "/v1/chat/completions",
            "/v1/messages",
            "/v1/embeddings",
            "/v1/files",
            "/messages/count_tokens",
        ):
            key = ANTHROPIC_VK if is_anthropic(path) else OPENAI_VK
            filler = rng.choice((b"a", b"{", b"\xff"))
            body = (chat_body(path)[:-1] + b', "pad": "')[: size // 2] + filler * size
            cases.append(
                Bad(
                    f"{size} bytes to {path}",
                    "POST",
                    path,
                    (*auth(key).items(), ("Content-Type", "application/json")),
                    body[:size],
                    frozenset({"request_too_large"}),
                )
            )
    return cases


def generated_count() -> int:
    rng = random.Random(SEED)
    return sum(
        (
            len(keyless_cases(rng)),
            len(odd_method_cases(rng)),
            len(bad_body_cases(rng)),
            len(restricted_model_cases(rng)),
            len(odd_header_cases(rng)),
            len(unsafe_path_cases(rng)),
            len(truncated_requests()),
            len(malformed_http()),
            len(encoding_claim_cases(rng)),
            len(oversized_cases(rng)),
            4 * len(CHUNK_PLANS),
        )
    )


# --- the tests -------------------------------------------------------------------------------


def test_at_least_two_hundred_bad_requests_are_generated() -> None:
    assert generated_count() >= 200


async def test_missing_or_unknown_keys_get_401_in_the_dialect(
    http, make_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    # Many failed authentications from one address: lift the lockout (tested in test_lockout).
    gateway = await make_gateway(AUTH_FAILURE_LIMIT="100000")
    await refuse_all(http, gateway, fake, keyless_cases(random.Random(f"{SEED}-keys")))
    await assert_still_serves(gateway, fake)


async def test_odd_methods_are_judged_like_post(http, gateway: TestClient, fake: FakeState) -> None:
    await refuse_all(http, gateway, fake, odd_method_cases(random.Random(f"{SEED}-methods")))
    await assert_still_serves(gateway, fake)


async def test_head_with_an_unknown_key_gets_401_headers_only(
    http, gateway: TestClient, fake: FakeState
) -> None:
    for path in ("/v1/chat/completions", "/v1/messages", "/models"):
        async with http.head(
            gateway.make_url(path), headers={"x-api-key": "vk_unknown"}
        ) as response:
            assert response.status == 401
            assert response.headers["content-type"].startswith("application/json")
            assert response.headers["x-request-id"]
    assert fake.requests == []


async def test_bad_bodies_get_400_naming_the_problem(
    http, gateway: TestClient, fake: FakeState
) -> None:
    await refuse_all(http, gateway, fake, bad_body_cases(random.Random(f"{SEED}-bodies")))
    await assert_still_serves(gateway, fake)


async def test_models_outside_allowed_models_get_403(
    http, gateway: TestClient, fake: FakeState
) -> None:
    await refuse_all(http, gateway, fake, restricted_model_cases(random.Random(f"{SEED}-models")))
    await assert_still_serves(gateway, fake)


async def test_odd_duplicate_and_huge_headers_do_not_change_the_refusal(
    http, make_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    # Many failed authentications from one address: lift the lockout (tested in test_lockout).
    gateway = await make_gateway(AUTH_FAILURE_LIMIT="100000")
    await refuse_all(http, gateway, fake, odd_header_cases(random.Random(f"{SEED}-headers")))
    await assert_still_serves(gateway, fake)


async def test_unsafe_and_unknown_paths_are_refused_before_forwarding(
    gateway: TestClient, fake: FakeState
) -> None:
    await refuse_all_raw(gateway, fake, unsafe_path_cases(random.Random(f"{SEED}-paths")))
    await assert_still_serves(gateway, fake)


async def test_a_fragment_does_not_skip_validation(gateway: TestClient, fake: FakeState) -> None:
    headers = list(auth(OPENAI_VK).items())
    cases = [
        (
            Bad(
                "bad JSON to chat#x",
                "POST",
                "/v1/chat/completions#x",
                codes=BAD_BODY | {"invalid_path"},
            ),
            http_bytes("POST", "/v1/chat/completions#x", headers, b"{bad"),
        ),
        (
            Bad(
                "no model to messages#x",
                "POST",
                "/v1/messages#x",
                codes=BAD_BODY | {"invalid_path"},
            ),
            http_bytes(
                "POST", "/v1/messages#x", [("x-api-key", ANTHROPIC_VK)], b'{"messages": []}'
            ),
        ),
    ]
    await refuse_all_raw(gateway, fake, cases)


async def test_malformed_http_gets_a_4xx_without_a_traceback(
    gateway: TestClient, fake: FakeState
) -> None:
    problems = []
    for label, data in malformed_http():
        answer = await exchange(gateway, data)
        if answer is None:
            continue  # closing the connection is a fair answer to bytes that are not HTTP
        if not 400 <= answer.status < 500:
            problems.append(f"{label}: status {answer.status}")
        if any(mark in answer.body for mark in TRACEBACK_MARKS):
            problems.append(f"{label}: traceback in {answer.body[:200]!r}")
    assert not problems, "\n".join(problems)
    assert fake.requests == []
    await assert_still_serves(gateway, fake)


async def test_malformed_http_logs_no_traceback(
    gateway: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    for _, data in malformed_http():
        await exchange(gateway, data)
    for _, _, data in truncated_requests():
        await exchange(gateway, data, half_close=True)
    await handlers_done(gateway)
    assert not logged_errors(caplog, parser_refusals=True)


async def test_truncated_uploads_end_quietly_and_go_nowhere(
    gateway: TestClient, fake: FakeState
) -> None:
    problems = []
    for label, path, data in truncated_requests():
        answer = await exchange(gateway, data, half_close=True)
        if answer is not None:  # answering 400 is as fair as closing: the request never ended
            problems += [
                f"{label} {path}: {problem}"
                for problem in judge(
                    Bad(label, "POST", path, codes=frozenset({"invalid_body"})), answer
                )
            ]
    for _, _, data in truncated_requests():  # and clients that vanish altogether
        _, writer = await asyncio.open_connection(gateway.host, gateway.port)
        writer.write(data)
        await writer.drain()
        writer.close()
    await handlers_done(gateway)
    assert not problems, "\n".join(problems)
    assert fake.requests == []
    await assert_still_serves(gateway, fake)


async def test_false_content_encoding_claims_get_400(
    http, gateway: TestClient, fake: FakeState
) -> None:
    await refuse_all(http, gateway, fake, encoding_claim_cases(random.Random(f"{SEED}-encodings")))
    await assert_still_serves(gateway, fake)


async def test_a_gzip_request_body_reaches_the_provider_as_sent(
    gateway: TestClient, fake: FakeState
) -> None:
    body = gzip.compress(dumps(GOOD_CHAT))
    headers = {
        **auth(OPENAI_VK),
        "Content-Type": "application/json",
        "Content-Encoding": "gzip",
        "x-request-id": "req_gzip_up",
    }
    async with gateway.post("/v1/chat/completions", data=body, headers=headers) as response:
        assert response.status == 200, await response.text()
        assert await response.read() == fake.sent["req_gzip_up"]
    # The fake's own aiohttp decompresses what arrives: the original JSON means the gzip bytes went up intact.
    assert fake.requests[-1].body == dumps(GOOD_CHAT)


async def test_a_second_gzip_member_is_read_too_and_a_body_that_is_not_one_json_is_refused(
    gateway: TestClient, fake: FakeState
) -> None:
    headers = {**auth(OPENAI_VK), "Content-Type": "application/json", "Content-Encoding": "gzip"}
    # Two members read as one JSON body: each is checked, and the whole goes up.
    halves = dumps(GOOD_CHAT)[:20], dumps(GOOD_CHAT)[20:]
    body = b"".join(gzip.compress(half) for half in halves)
    async with gateway.post("/v1/chat/completions", data=body, headers=headers) as response:
        assert response.status == 200, await response.text()
    sent = len(fake.requests)
    # A whole JSON body in the first member, something else hidden in a second: refused.
    hidden = gzip.compress(dumps(GOOD_CHAT)) + gzip.compress(b'{"model": "o1-pro"}')
    async with gateway.post("/v1/chat/completions", data=hidden, headers=headers) as response:
        assert response.status == 400, await response.text()
        assert_openai_error(await response.json(), "invalid_json")
    assert len(fake.requests) == sent  # nothing of it went up


async def test_bodies_over_the_limit_get_413_from_content_length(
    http, make_gateway, fake: FakeState
) -> None:
    gateway = await make_gateway(MAX_BODY_BYTES=str(SMALL_LIMIT))
    await refuse_all(http, gateway, fake, oversized_cases(random.Random(f"{SEED}-oversized")))
    await assert_still_serves(gateway, fake)


# (label, chunk sizes) of chunked uploads that add up to more than SMALL_LIMIT
CHUNK_PLANS = (
    ("one chunk just over", [SMALL_LIMIT + 1]),
    ("byte by byte", [1] * (SMALL_LIMIT + 1)),
    ("hundreds", [100] * 11),
    ("a megabyte in 64 KiB chunks", [64 * 1024] * 16),
    ("a small then a big one", [10, 5000]),
)


async def chunks(sizes: Sequence[int], start: bytes) -> AsyncIterator[bytes]:
    """A chunked upload: `start`, then filler, in these chunk sizes."""
    data = (start + b"x" * sum(sizes))[: sum(sizes)]
    offset = 0
    for size in sizes:
        yield data[offset : offset + size]
        offset += size


async def test_chunked_uploads_over_the_limit_get_413(http, make_gateway, fake: FakeState) -> None:
    gateway = await make_gateway(MAX_BODY_BYTES=str(SMALL_LIMIT))
    problems = []
    for label, sizes in CHUNK_PLANS:
        for path in ("/v1/chat/completions", "/v1/messages", "/v1/embeddings", "/v1/files"):
            key = ANTHROPIC_VK if is_anthropic(path) else OPENAI_VK
            case = Bad(
                f"chunked {label} to {path}",
                "POST",
                path,
                (*auth(key).items(), ("Content-Type", "application/json")),
                codes=frozenset({"request_too_large"}),
            )
            try:
                answer = await send(http, gateway, case, data=chunks(sizes, chat_body(path)[:-1]))
            except aiohttp.ClientError as error:
                problems.append(f"{case.label}: no answer ({error!r})")
                continue
            problems += [f"{case.label}: {problem}" for problem in judge(case, answer)]
    assert not problems, "\n".join(problems)
    assert fake.requests == []
    await assert_still_serves(gateway, fake)


async def test_a_chunked_upload_is_refused_before_it_ends(make_gateway, fake: FakeState) -> None:
    """The 413 comes while the client is still sending: the gateway stopped reading at the limit."""
    gateway = await make_gateway(MAX_BODY_BYTES=str(SMALL_LIMIT))
    for path in ("/v1/chat/completions", "/v1/messages"):
        headers = [
            *auth(OPENAI_VK).items(),
            ("Content-Type", "application/json"),
            ("Transfer-Encoding", "chunked"),
        ]
        start = http_bytes(
            "POST",
            path,
            headers,
            b"%x\r\n%s\r\n" % (2 * SMALL_LIMIT, b"a" * 2 * SMALL_LIMIT),
            length=False,
        )
        answer = await exchange(gateway, start)  # no last chunk: the upload never ends
        assert answer is not None
        assert not judge(Bad(path, "POST", path, codes=frozenset({"request_too_large"})), answer)


async def test_a_body_of_exactly_the_limit_is_judged_not_refused(
    http, make_gateway, fake: FakeState
) -> None:
    gateway = await make_gateway(MAX_BODY_BYTES=str(SMALL_LIMIT))
    body = (b'{"model": [' + b" " * SMALL_LIMIT)[:SMALL_LIMIT]
    case = Bad(
        "limit-sized bad JSON",
        "POST",
        "/v1/chat/completions",
        (*auth(OPENAI_VK).items(), ("Content-Type", "application/json")),
        body,
        frozenset({"invalid_json"}),
    )
    await refuse_all(http, gateway, fake, [case])
    good = chat_body("/v1/chat/completions")
    good = good[:-1] + b', "pad": "' + b"p" * (SMALL_LIMIT - len(good) - 11) + b'"}'
    assert len(good) == SMALL_LIMIT
    async with http.post(
        gateway.make_url("/v1/chat/completions"),
        data=good,
        headers={**auth(OPENAI_VK), "Content-Type": "application/json"},
    ) as response:
        assert response.status == 200
    assert fake.requests[-1].body == good


async def test_a_non_utf8_request_id_keeps_its_log_line(gateway: TestClient, records) -> None:
    data = http_bytes(
        "POST",
        "/v1/chat/completions",
        [*auth(OPENAI_VK).items(), ("x-request-id", "id-\udcff\udcfe")],
        b"{bad",
    )
    answer = await exchange(gateway, data)
    assert answer is not None and answer.status == 400
    assert answer.headers["x-request-id"]
    assert len(await records(1, timeout=10.0)) == 1  # 10 s only bounds a failure


async def first_answer_line(gateway: TestClient, head: list[tuple[str, str]]) -> bytes:
    """Send a request head with Expect: 100-continue and no body; the first status line back."""
    reader, writer = await asyncio.open_connection(gateway.server.host, gateway.server.port)
    try:
        lines = [b"POST /v1/chat/completions HTTP/1.1", b"Host: gateway"]
        lines += [f"{name}: {value}".encode() for name, value in head]
        writer.write(b"\r\n".join([*lines, b"Expect: 100-continue", b"", b""]))
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("head", "answer"),
    [
        ([("Authorization", "Bearer vk_unknown_0000000"), ("Content-Length", "100")], b"401"),
        ([("Content-Length", "100")], b"401"),
        ([("Authorization", f"Bearer {OPENAI_VK}"), ("Content-Length", str(10**9))], b"413"),
        ([("Authorization", f"Bearer {OPENAI_VK}"), ("Content-Length", "100")], b"100 Continue"),
    ],
)
async def test_100_continue_is_sent_only_to_a_request_the_gateway_will_read(
    gateway: TestClient, fake: FakeState, head: list[tuple[str, str]], answer: bytes
) -> None:
    line = await first_answer_line(gateway, head)
    assert line.startswith(b"HTTP/1.1 ") and answer in line, line
    assert fake.requests == []


async def test_a_client_gone_before_its_100_continue_still_gets_its_log_line(
    gateway: TestClient, fake: FakeState, records
) -> None:
    # A client that sends its head with Expect: 100-continue (and what it had of its body)
    # and leaves: the 100 could not be written, the expect handler failed with it, and the
    # request left no log line, where the same client without Expect is logged 499.
    _, writer = await asyncio.open_connection(gateway.server.host, gateway.server.port)
    head = http_bytes(
        "POST",
        "/v1/chat/completions",
        [
            *auth(OPENAI_VK).items(),
            ("Content-Length", "100"),
            ("Expect", "100-continue"),
            ("x-request-id", "req_gone_before_continue"),
        ],
        b'{"model": "gpt-4o-mini"',
        length=False,
    )
    writer.write(head)
    writer.write_eof()
    await writer.drain()
    await handlers_done(gateway)
    writer.close()
    (line,) = await records(1)
    assert (line["request_id"], line["status"]) == ("req_gone_before_continue", 499)
    assert fake.requests == []


async def test_100_continue_is_not_sent_to_a_locked_out_address(
    make_gateway: Callable[..., Awaitable[TestClient]],
) -> None:
    gateway = await make_gateway(AUTH_FAILURE_LIMIT="1")
    guess = "vk_test_openai_0000000000"  # begins as OPENAI_VK, which was never accepted here
    assert (await gateway.get("/usage", headers=auth(guess))).status == 401
    line = await first_answer_line(
        gateway, [("Authorization", f"Bearer {OPENAI_VK}"), ("Content-Length", "10")]
    )
    assert b"429" in line, line


async def test_100_continue_is_not_sent_to_a_key_whose_quota_is_spent(
    gateway: TestClient, fake: FakeState
) -> None:
    for _ in range(3):  # LIMITED_VK: 3 requests an hour
        assert (
            await gateway.post("/v1/chat/completions", json=GOOD_CHAT, headers=auth(LIMITED_VK))
        ).status == 200
    refused = await gateway.post("/v1/chat/completions", json=GOOD_CHAT, headers=auth(LIMITED_VK))
    assert refused.status == 429
    sent = len(fake.requests)
    line = await first_answer_line(
        gateway, [("Authorization", f"Bearer {LIMITED_VK}"), ("Content-Length", "100")]
    )
    assert line.startswith(b"HTTP/1.1 429"), line
    assert len(fake.requests) == sent


@pytest.mark.parametrize(
    "extra",
    [
        (("x-padding", "a" * 60_000),),
        (("Authorization", "Bearer " + "k" * 8000),),
        tuple((f"x-h{index}", "v" * 50) for index in range(100)),
    ],
)
async def test_a_head_over_the_header_limits_is_refused_before_any_handler(
    gateway: TestClient, fake: FakeState, extra: tuple[tuple[str, str], ...]
) -> None:
    data = http_bytes("POST", "/v1/chat/completions", [*auth(OPENAI_VK).items(), *extra], b"{}")
    answer = await exchange(gateway, data)
    assert answer is None or 400 <= answer.status < 500
    assert fake.requests == []
    await assert_still_serves(gateway, fake)


async def test_an_upload_that_stops_arriving_gets_408_at_client_body_timeout(
    make_gateway: Callable[..., Awaitable[TestClient]],
    fake: FakeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    # A client sends its head and half its body, then nothing: without a bound it held its
    # connection and its buffered body until it left (MAX_CONNECTIONS of them: the memory
    # of as many bodies).
    gateway = await make_gateway(CLIENT_BODY_TIMEOUT="0.3")
    for path, key_header in (
        ("/v1/chat/completions", f"Authorization: Bearer {OPENAI_VK}"),
        ("/v1/messages", f"x-api-key: {ANTHROPIC_VK}"),
    ):
        body = json.dumps({**GOOD_CHAT, "max_tokens": 9}).encode()
        reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: x\r\n{key_header}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body[: len(body) // 2]
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert head.startswith(b"HTTP/1.1 408"), head
        assert b"\r\nconnection: close\r\n" in head.lower()  # closed after it (at most 10 s)
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        error = json.loads(await reader.readexactly(length))
        if path == "/v1/messages":
            assert error["type"] == "error" and error["error"]["message"]
        else:
            assert error["error"]["code"] == "request_timeout"
        writer.close()
    lines = await records(2)
    assert [line["status"] for line in lines] == [408, 408]
    assert fake.requests == []
    await assert_still_serves(gateway, fake)


async def test_a_request_behind_a_mesh_and_a_cdn_with_fifty_headers_is_served(
    gateway: TestClient, fake: FakeState
) -> None:
    # An SDK sends 17-19 headers; an ingress, a service mesh and a CDN add a dozen or more
    # (x-forwarded-*, x-envoy-*, x-b3-*, cf-*, traceparent, baggage): 32 refused such calls
    # with 431 on every request.
    proxies = {f"x-envoy-hop-{index}": "1" for index in range(30)}
    sdk = {f"x-stainless-{index}": "python" for index in range(18)}
    headers = {**auth(OPENAI_VK), **sdk, **proxies}
    assert len(headers) == 49
    response = await gateway.post("/v1/chat/completions", json=GOOD_CHAT, headers=headers)
    assert response.status == 200, await response.text()
    assert fake.requests[-1].headers["x-envoy-hop-29"] == "1"
