"""The peek: a compressed upload is inflated for validation only, and bounded."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import brotli
import openai
import orjson
import pytest
import zstandard
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

from proxy.encodings import decode_body as readable
from proxy.errors import GatewayError
from proxy.record import MODEL_CHARS
from tests.conftest import OPENAI_REAL, OPENAI_VK, RESTRICTED_VK, auth
from tests.support.fake_provider import FakeState


def json_text(document: dict[str, Any], **fields: Any) -> str:
    return orjson.dumps({**document, **fields}).decode()


def gzipped(data: bytes) -> bytes:
    """gzip without a timestamp: the same bytes in every process (xdist compares test ids,
    which hold these bytes, between its workers)."""
    return gzip.compress(data, mtime=0)


BODY = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'


@pytest.mark.parametrize(
    ("encoding", "sent"),
    [
        ("", BODY),
        ("identity", BODY),
        ("gzip", gzipped(BODY)),
        ("GZIP", gzipped(BODY)),
        ("deflate", zlib.compress(BODY)),
        ("deflate", zlib.compress(BODY, wbits=-15)),
    ],
)
def test_a_body_is_read_as_the_provider_will_read_it(encoding: str, sent: bytes) -> None:
    assert readable(sent, encoding, limit=1000) == BODY


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
def test_a_large_compressed_upload_is_read_whole(coding: str) -> None:
    """Before, a br upload that inflates past a few hundred kilobytes (a long prompt, a
    document) was cut short by the gateway's brotli decoder and refused: 400 "truncated"."""
    body = orjson.dumps({"model": "gpt-4o-mini", "input": "word " * 400_000})
    sent = {
        "gzip": gzipped,
        "deflate": zlib.compress,
        "br": brotli.compress,
        "zstd": zstandard.ZstdCompressor().compress,
    }[coding](body)
    assert readable(sent, coding, limit=10_000_000) == body


def test_an_upload_that_inflates_past_the_limit_gets_413() -> None:
    bomb = gzipped(b"{" + b" " * 1_000_000 + b"}")
    with pytest.raises(GatewayError) as refused:
        readable(bomb, "gzip", limit=10_000)
    assert refused.value.status == 413


@pytest.mark.parametrize(
    ("encoding", "sent", "status"),
    [
        ("gzip", BODY, 400),
        ("gzip", gzipped(BODY)[:-12], 400),
        ("br", BODY, 400),
        ("zstd", BODY, 400),
        ("compress", BODY, 415),
    ],
)
def test_a_body_that_is_not_what_its_encoding_says_is_refused(
    encoding: str, sent: bytes, status: int
) -> None:
    with pytest.raises(GatewayError) as refused:
        readable(sent, encoding, limit=1000)
    assert refused.value.status == status


def test_a_content_encoding_whose_bytes_are_not_utf8_is_quoted_as_those_bytes() -> None:
    # aiohttp hands `Content-Encoding: a\xffb` over as "a\udcffb": quoted as it was, the
    # 415's message could not be written as JSON, so the answer was a 500 and the log line lost.
    with pytest.raises(GatewayError) as refused:
        readable(BODY, "a\udcffb", limit=1000)
    assert refused.value.status == 415
    assert "'a\\xffb'" in orjson.loads(orjson.dumps(refused.value.message))
    assert orjson.dumps(refused.value.why)


# --- allowed_models: every place a request names a model --------------------------------

GPT4O_VK = "vk_test_gpt4o_only_7d2c9e1a5b"
GPT4O_REAL = "sk-real-gpt4o-only-8888888888"


@pytest.fixture
async def restricted(gateway_with_keys: Callable[..., Awaitable[TestClient]]) -> TestClient:
    """A gateway with one OpenAI key restricted to gpt-4o-* (and one unrestricted key)."""
    entry = {
        "provider": "openai",
        "api_key": GPT4O_REAL,
        "name": "gpt4o-only",
        "allowed_models": ["gpt-4o-*"],
    }
    return await gateway_with_keys({GPT4O_VK: entry})


def form(model: str) -> aiohttp.FormData:
    data = aiohttp.FormData()
    data.add_field("model", model)
    data.add_field("file", b"RIFF....WAVEfmt ", filename="a.wav", content_type="audio/wav")
    return data


async def test_a_multipart_upload_naming_another_model_gets_403(
    restricted: TestClient, fake: FakeState
) -> None:
    client = openai.AsyncOpenAI(
        base_url=str(restricted.make_url("/v1")), api_key=GPT4O_VK, max_retries=0
    )
    with pytest.raises(openai.PermissionDeniedError, match="may not use the model 'whisper-1'"):
        await client.audio.transcriptions.create(model="whisper-1", file=("a.wav", b"RIFF"))
    response = await restricted.post(
        "/v1/audio/transcriptions", data=form("o1"), headers=auth(GPT4O_VK)
    )
    assert response.status == 403
    assert fake.requests == []
    allowed = await restricted.post(
        "/v1/audio/transcriptions", data=form("gpt-4o-mini-transcribe"), headers=auth(GPT4O_VK)
    )
    assert allowed.status == 200 and len(fake.requests) == 1
    # An unrestricted key's upload is not parsed: it passes whatever it names.
    free = await restricted.post(
        "/v1/audio/transcriptions", data=form("o1"), headers=auth(OPENAI_VK)
    )
    assert free.status == 200


@pytest.mark.parametrize(
    "body",
    [
        b"model=o1&prompt=x",
        b"prompt=x&model=gpt-4o-mini&model=o1",
        # python-multipart (Starlette's and FastAPI's forms) splits a form without "&" at ";"
        b"model=gpt-4o-mini;model=o1",
        b"prompt=x;model=o1",
    ],
)
async def test_a_url_encoded_form_naming_another_model_gets_403(
    restricted: TestClient, body: bytes
) -> None:
    response = await restricted.post(
        "/v1/completions",
        data=body,
        headers={**auth(GPT4O_VK), "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status == 403


CHAT_O1 = orjson.dumps({"model": "o1", "messages": [{"role": "user", "content": "hi"}]})


@pytest.mark.parametrize(
    ("encodings", "sent"),
    [
        (("gzip", "gzip"), gzipped(gzipped(CHAT_O1))),
        (("identity", "gzip"), gzipped(CHAT_O1)),
        (("gzip, deflate",), zlib.compress(gzipped(CHAT_O1))),
    ],
)
async def test_a_body_under_several_content_encodings_is_still_checked(
    restricted: TestClient, fake: FakeState, encodings: tuple[str, ...], sent: bytes
) -> None:
    headers = CIMultiDict(auth(GPT4O_VK))
    headers["Content-Type"] = "application/json"
    for encoding in encodings:
        headers.add("Content-Encoding", encoding)
    response = await restricted.post("/v1/responses", data=sent, headers=headers)
    assert response.status == 403, await response.text()
    assert fake.requests == []


async def test_an_allowed_model_under_two_encodings_goes_up_as_sent(
    restricted: TestClient, fake: FakeState
) -> None:
    original = orjson.dumps({"model": "gpt-4o-mini", "input": "hi"})
    sent = gzipped(gzipped(original))
    headers = CIMultiDict(auth(GPT4O_VK))
    headers.add("Content-Encoding", "gzip")
    headers.add("Content-Encoding", "gzip")
    response = await restricted.post("/v1/anything", data=sent, headers=headers)
    assert response.status == 200
    seen = fake.requests[0]
    assert seen.headers.getall("Content-Encoding") == ["gzip", "gzip"]
    received = seen.body  # the fake's aiohttp server undoes one coding itself
    while received[:2] == b"\x1f\x8b":
        received = gzip.decompress(received)
    assert received == original


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/plain", CHAT_O1),
        ("text/plain", b"\xef\xbb\xbf" + CHAT_O1),  # a BOM: not JSON to the peek
        ("application/octet-stream", b"\x00\x01model=o1"),
        ("application/json", b'[{"model": "o1"}]'),
        ("application/json", b'{"model": ["o1", "gpt-4o-mini"], "input": "x"}'),
        ("multipart/form-data", b"--x\r\nno boundary given"),
        ("multipart/form-data; boundary=zz", b"--zz\r\nContent-Disposition: form-data"),
    ],
)
async def test_a_body_the_gateway_cannot_check_is_refused_for_a_restricted_key(
    restricted: TestClient, fake: FakeState, content_type: str, body: bytes
) -> None:
    response = await restricted.post(
        "/v1/responses", data=body, headers={**auth(GPT4O_VK), "Content-Type": content_type}
    )
    assert response.status == 403
    error = (await response.json())["error"]
    assert error["code"] == "model_not_allowed" and "model" in error["message"]
    assert fake.requests == []


@pytest.mark.parametrize(
    ("method", "target", "body"),
    [
        ("GET", "/v1/realtime?model=o1-realtime", None),
        ("POST", "/v1/models/o1:generateContent", b"{}"),
        ("POST", "/v1/tunedModels/gpt-4o-mini-tuned:generateContent", b"{}"),
        ("POST", "/v1/tunedModels/gpt-4o-mini:streamGenerateContent?alt=sse", b"{}"),
        ("GET", "/v1/models/o1", None),
        ("POST", "/v1/deployments/o1/chat/completions?api-version=1", CHAT_O1),
        ("POST", "/v1/batches", b'{"input_file_id": "file-1", "endpoint": "/v1/responses"}'),
        (
            "POST",
            "/v1/messages/batches",
            orjson.dumps(
                {
                    "requests": [
                        {"custom_id": "a", "params": {"model": "gpt-4o-mini"}},
                        {"custom_id": "b", "params": {"model": "o1"}},
                    ]
                }
            ),
        ),
    ],
)
async def test_a_model_named_in_the_path_query_or_a_batch_is_checked(
    restricted: TestClient, fake: FakeState, method: str, target: str, body: bytes | None
) -> None:
    response = await restricted.request(
        method, target, data=body, headers={**auth(GPT4O_VK), "Content-Type": "application/json"}
    )
    assert response.status == 403
    assert fake.requests == []


async def test_a_restricted_key_still_reaches_what_names_no_model(
    restricted: TestClient, fake: FakeState
) -> None:
    assert (await restricted.get("/v1/models", headers=auth(GPT4O_VK))).status == 200
    assert (await restricted.get("/v1/models/gpt-4o-mini", headers=auth(GPT4O_VK))).status == 200
    upload = aiohttp.FormData()
    upload.add_field("purpose", "assistants")
    upload.add_field("file", b"hello", filename="a.txt")
    assert (await restricted.post("/v1/files", data=upload, headers=auth(GPT4O_VK))).status == 200
    assert len(fake.requests) == 3


# --- what was read is recorded, even when refused ---------------------------------------


async def test_a_refused_request_records_the_model_it_named(
    gateway: TestClient, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    disallowed = {
        "model": "claude-opus-4-1",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "x"}],
    }
    response = await gateway.post("/v1/messages", json=disallowed, headers=auth(RESTRICTED_VK))
    assert response.status == 403
    empty = {"model": "gpt-4o-mini", "messages": [], "stream": True}
    response = await gateway.post("/v1/chat/completions", json=empty, headers=auth(OPENAI_VK))
    assert response.status == 400
    lines = await records(2)
    assert [(line["status"], line["model"]) for line in lines] == [
        (403, "claude-opus-4-1"),
        (400, "gpt-4o-mini"),
    ]
    assert lines[1]["stream"] is True
    metrics = await (await gateway.get("/metrics")).text()
    assert (
        'llm_gateway_requests_total{model="claude-opus-4-1",provider="anthropic",status="403"} 1.0'
        in metrics
    )
    assert (
        'llm_gateway_requests_total{model="gpt-4o-mini",provider="openai",status="400"} 1.0'
        in metrics
    )


# --- a client's model string is bounded and cleaned before logs and labels --------------


async def test_a_huge_model_or_control_characters_stay_out_of_logs_and_labels(
    gateway: TestClient, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    huge = "m" * 1_000_000
    sneaky = 'gpt\r\n"x\x00\x1b[31m} 1\nfake_metric 9'
    for model in (huge, sneaky):
        body = {"model": model, "messages": [{"role": "user", "content": "x"}]}
        response = await gateway.post("/v1/chat/completions", json=body, headers=auth(OPENAI_VK))
        assert response.status == 200
    lines = await records(2)
    assert len(lines[0]["model"]) <= MODEL_CHARS + 1 and lines[0]["model"].startswith("mmm")
    assert not any(ord(char) < 0x20 for char in lines[1]["model"])
    metrics = await (await gateway.get("/metrics")).text()
    assert "\x00" not in metrics and "\x1b" not in metrics and "\r" not in metrics
    assert "fake_metric" not in [line.split(" ")[0] for line in metrics.splitlines()]
    families = list(text_string_to_metric_families(metrics))  # still parses
    assert families


# --- a field the gateway decides on, named twice: parsers disagree on which one counts ----

METERED_VK = "vk_test_metered_tokens_3e8a1c5f7b"
CHAT_HI = b'"messages": [{"role": "user", "content": "hi"}]'


@pytest.fixture
async def checked(gateway_with_keys: Callable[..., Awaitable[TestClient]]) -> TestClient:
    """The gpt-4o-* key, and a key with a token quota (its requests reserve)."""
    return await gateway_with_keys(
        {
            GPT4O_VK: {
                "provider": "openai",
                "api_key": GPT4O_REAL,
                "name": "gpt4o-only",
                "allowed_models": ["gpt-4o-*"],
            },
            METERED_VK: {
                "provider": "openai",
                "api_key": OPENAI_REAL,
                "name": "metered",
                "quota": {"requests": 100, "tokens": 1_000_000, "window_seconds": 3600},
            },
        }
    )


@pytest.mark.parametrize(
    ("key", "path", "body", "field"),
    [
        # orjson (and most servers) keep the last; gjson, simdjson, RapidJSON keep the first
        (
            GPT4O_VK,
            "/v1/chat/completions",
            b'{"model": "o1", "model": "gpt-4o-mini", ' + CHAT_HI + b"}",
            "model",
        ),
        (
            GPT4O_VK,
            "/v1/chat/completions",
            b'{"model": "o1", "mod\\u0065l": "gpt-4o-mini", ' + CHAT_HI + b"}",
            "model",
        ),
        (
            GPT4O_VK,
            "/v1/chat/completions",
            b'{"\\u006dodel": "o1", "model": "gpt-4o-mini", ' + CHAT_HI + b"}",
            "model",
        ),
        (
            GPT4O_VK,
            "/v1/responses",
            b'{"model": "gpt-4o-mini", "input": "x", "tools": [{"type": "image_generation", '
            b'"model": "gpt-image-1", "model": "gpt-4o-mini"}]}',
            "model",
        ),
        (
            GPT4O_VK,
            "/v1/responses",
            b'{"model": "gpt-4o-mini", "input": "x", "tools": [{"type": "image_generation"}], '
            b'"tools": []}',
            "tools",
        ),
        (
            GPT4O_VK,
            "/v1/responses",
            b'{"model": "gpt-4o-mini", "input": "x", "tools": [{"type": "image_generation", '
            b'"type": "function", "name": "f", "model": "gpt-image-1"}]}',
            "type",
        ),
        (
            GPT4O_VK,
            "/v1/chat/completions",
            b'{"model": "gpt-4o-mini", "models": ["o1"], "models": [], ' + CHAT_HI + b"}",
            "models",
        ),
        (
            METERED_VK,
            "/v1/chat/completions",
            b'{"model": "gpt-4o-mini", "max_tokens": 64000, "max_tokens": 1, ' + CHAT_HI + b"}",
            "max_tokens",
        ),
        (
            METERED_VK,
            "/v1/chat/completions",
            b'{"model": "gpt-4o-mini", "n": 8, "\\u006e": 1, ' + CHAT_HI + b"}",
            "n",
        ),
        (
            METERED_VK,
            "/v1/responses",
            b'{"model": "gpt-4o-mini", "input": "x", "background": true, "background": false}',
            "background",
        ),
        (
            METERED_VK,
            "/v1/chat/completions",
            b'{"model": "gpt-4o-mini", "stream": true, "stream": false, ' + CHAT_HI + b"}",
            "stream",
        ),
    ],
)
async def test_a_body_naming_a_deciding_field_twice_is_refused(
    checked: TestClient, fake: FakeState, key: str, path: str, body: bytes, field: str
) -> None:
    response = await checked.post(
        path, data=body, headers={**auth(key), "Content-Type": "application/json"}
    )
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["code"] == "duplicate_field" and error["param"] == field
    assert f"'{field}' more than once" in error["message"]
    assert fake.requests == []


async def test_a_restricted_anthropic_key_is_refused_a_repeated_model_in_its_dialect(
    gateway: TestClient, fake: FakeState
) -> None:
    body = (
        b'{"model": "claude-opus-4-1", "max_tokens": 10, "model": "claude-sonnet-4-5", '
        + CHAT_HI
        + b"}"
    )
    response = await gateway.post(
        "/v1/messages",
        data=body,
        headers={"x-api-key": RESTRICTED_VK, "Content-Type": "application/json"},
    )
    assert response.status == 400
    payload = await response.json()
    assert payload["type"] == "error" and payload["error"]["type"] == "invalid_request_error"
    assert "'model' more than once" in payload["error"]["message"]
    assert fake.requests == []


@pytest.mark.parametrize(
    "body",
    [
        # a tool taking a "model" argument, a schema listing "n" and "stream": distinct objects
        b'{"model": "gpt-4o-mini", "max_tokens": 5, "stream": false, ' + CHAT_HI + b', "tools": '
        b'[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", '
        b'"properties": {"model": {"type": "string"}, "n": {}, "stream": {}, "max_tokens": {}},'
        b' "required": ["model", "n"]}}}]}',
        # text quoting JSON with a repeated key, and a backslash before a u in text
        b'{"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": '
        b'"{\\"model\\": 1, \\"model\\": 2} C:\\\\u0061"}]}',
    ],
)
async def test_a_deciding_name_used_elsewhere_in_the_body_still_passes(
    checked: TestClient, fake: FakeState, body: bytes
) -> None:
    for key in (GPT4O_VK, METERED_VK):
        response = await checked.post(
            "/v1/chat/completions",
            data=body,
            headers={**auth(key), "Content-Type": "application/json"},
        )
        assert response.status == 200, await response.text()
    assert [seen.body for seen in fake.requests] == [body, body]


# --- a body the gateway cannot read, where a lenient server reads it ---------------------

LONG_ANSWER = {"model": "gpt-4o-mini", "input": "x", "max_output_tokens": 100_000}


@pytest.mark.parametrize(
    ("path", "content_type", "body"),
    [
        # Python's json.loads, under FastAPI servers (a body without Content-Type is read as
        # JSON), takes NaN, a UTF-8 BOM and UTF-16
        ("/v1/responses", None, orjson.dumps(LONG_ANSWER)[:-1] + b', "top_p": NaN}'),
        ("/v1/responses", "text/plain", b"\xef\xbb\xbf" + orjson.dumps(LONG_ANSWER)),
        ("/v1/completions", None, json_text(LONG_ANSWER, prompt="x").encode("utf-16")),
        ("/v1/embeddings", None, b'{"model": "text-embedding-3-small", "input": "x" /* c */}'),
    ],
)
async def test_a_metered_keys_body_the_gateway_cannot_read_is_refused_where_it_reserves(
    checked: TestClient, fake: FakeState, path: str, content_type: str | None, body: bytes
) -> None:
    """Read as nothing, it reserved nothing (and named no model to price the reservation at),
    while the provider generated up to the cap it names."""
    headers = (
        auth(METERED_VK)
        if content_type is None
        else {**auth(METERED_VK), "Content-Type": content_type}
    )
    response = await checked.post(
        path, data=body, headers=headers, skip_auto_headers=("Content-Type",)
    )
    assert response.status == 400, await response.text()
    error = (await response.json())["error"]
    assert error["code"] == "invalid_json" and "JSON" in error["message"]
    assert fake.requests == []


async def test_an_opaque_upload_of_a_metered_key_still_passes(
    checked: TestClient, fake: FakeState
) -> None:
    lines = b'{"custom_id": "a"}\n{"custom_id": "b"}\n'  # a JSONL file's part, not one object
    response = await checked.post(
        "/v1/uploads/upload_1/parts",
        data=lines,
        headers={**auth(METERED_VK), "Content-Type": "application/octet-stream"},
    )
    await response.read()
    assert [seen.body for seen in fake.requests] == [lines]  # the provider judges it


# --- a field spelt in another case: Go's encoding/json (Ollama, LocalAI, Go gateways) and
# ASP.NET's web defaults match JSON names to fields whatever their case ------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", b'{"Model": "o1", "prompt": "x"}'),
        ("/v1/embeddings", b'{"MODEL": "o1", "input": "x"}'),
        ("/v1/chat/completions", b'{"model": "gpt-4o-mini", "mOdEl": "o1", ' + CHAT_HI + b"}"),
    ],
)
async def test_a_model_named_in_another_case_is_checked_too(
    checked: TestClient, fake: FakeState, path: str, body: bytes
) -> None:
    response = await checked.post(
        path, data=body, headers={**auth(GPT4O_VK), "Content-Type": "application/json"}
    )
    assert response.status == 403, await response.text()
    error = (await response.json())["error"]
    assert error["code"] == "model_not_allowed" and "'o1'" in error["message"]
    assert fake.requests == []
    allowed = body.replace(b'"o1"', b'"gpt-4o-2024-08-06"')
    response = await checked.post(
        path, data=allowed, headers={**auth(GPT4O_VK), "Content-Type": "application/json"}
    )
    assert response.status != 403
    assert [seen.body for seen in fake.requests] == [allowed]


# --- OpenRouter's fallbacks: `models`, and `route: "fallback"` --------------------------


@pytest.mark.parametrize(
    ("fields", "allowed"),
    [
        ({"models": ["o1"]}, False),
        ({"models": ["gpt-4o-2024-08-06", "o1"], "route": "fallback"}, False),
        ({"route": "fallback"}, False),  # OpenRouter picks the fallback model itself
        ({"models": "o1"}, False),
        ({"models": ["gpt-4o-mini", "gpt-4o-2024-08-06"]}, True),
        ({"models": ["gpt-4o-2024-08-06"], "route": "fallback"}, True),
    ],
)
async def test_a_fallback_model_a_router_may_run_is_checked(
    checked: TestClient, fake: FakeState, fields: dict[str, Any], allowed: bool
) -> None:
    """OpenRouter (a custom provider) runs the models of `models` in turn when the first
    fails: a key allowed only gpt-4o-* reached o1 by naming it there."""
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **fields}
    response = await checked.post("/v1/chat/completions", json=body, headers=auth(GPT4O_VK))
    if allowed:
        assert response.status == 200
        assert len(fake.requests) == 1
    else:
        assert response.status == 403
        assert (await response.json())["error"]["code"] == "model_not_allowed"
        assert fake.requests == []
