"""What a 200 stream's first event is: a failure of the moment (failed over), or anything else.

The first event that says something: the stream's start before it (Anthropic's
`message_start` and `ping`, OpenAI's chunk naming only the role, Azure's prompt filter
results, the Responses API's `response.created`) carries nothing of the answer yet."""

from __future__ import annotations

import base64
import gzip
import json
import zlib

import pytest

from proxy.upstream.first_event import (
    MORE,
    answered_failure,
    decoded,
    failure,
    framed_failure,
    reader,
)
from tests.support.fake_bedrock import exception_frame, frame


def event(data: object, name: str | None = None) -> bytes:
    head = b"" if name is None else f"event: {name}\n".encode()
    return head + b"data: " + json.dumps(data).encode() + b"\n\n"


ANTHROPIC_START = event({"type": "message_start", "message": {"id": "msg_1"}}, "message_start")
PING = event({"type": "ping"}, "ping")
OVERLOADED = event({"type": "error", "error": {"type": "overloaded_error"}}, "error")
CHUNK = {"id": "c1", "object": "chat.completion.chunk", "choices": []}
ROLE = event({**CHUNK, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
AZURE_FILTERS = event({**CHUNK, "prompt_filter_results": [{"prompt_index": 0}]})
SERVER_ERROR = event({"error": {"message": "m", "type": "server_error", "code": None}})
# The Responses API's failed response: its error inside the Response, not beside it.
RESPONSE_FAILED = event(
    {
        "type": "response.failed",
        "response": {"status": "failed", "error": {"code": "server_error", "message": "m"}},
    },
    "response.failed",
)
RESPONSE_START = event({"type": "response.created"}, "response.created") + event(
    {"type": "response.in_progress"}, "response.in_progress"
)
# A server that sends the Responses API's events without their `event:` lines (their `type`
# names them): its start holds the Response, whose `"error": null` says nothing yet.
NAMELESS_START = event(
    {"type": "response.created", "response": {"status": "in_progress", "error": None}}
) + event({"type": "response.in_progress", "response": {"error": None}})


@pytest.mark.parametrize(
    ("at_hand", "expected"),
    [
        (event({"type": "error", "error": {"type": "overloaded_error"}}, "error"), 529),
        (event({"type": "error", "error": {"type": "rate_limit_error"}}, "error"), 429),
        (event({"type": "error", "error": {"type": "api_error"}}, "error"), 500),
        (event({"error": {"message": "m", "type": "server_error", "code": None}}), 500),
        (event({**CHUNK, "error": {"code": 502, "message": "down"}}), 502),  # OpenRouter
        (b": OPENROUTER PROCESSING\n\n" + event({**CHUNK, "error": {"code": 429}}), 429),
        (event({"type": "error", "code": "server_error", "message": "m"}, "error"), 500),
        (event([{"error": {"code": 503, "status": "UNAVAILABLE"}}]), None),  # not an object
        (
            b"\xef\xbb\xbf"
            + event({"type": "error", "error": {"type": "overloaded_error"}}, "error").replace(
                b"\n", b"\r\n"
            ),
            529,
        ),
        (ANTHROPIC_START + OVERLOADED, 529),  # the start says nothing of the answer yet
        (ANTHROPIC_START + PING + OVERLOADED, 529),
        (ROLE + SERVER_ERROR, 500),
        (AZURE_FILTERS + ROLE + SERVER_ERROR, 500),
        (RESPONSE_START + event({"type": "error", "code": "server_error"}, "error"), 500),
        (RESPONSE_START + RESPONSE_FAILED, 500),  # its error in the failed Response
        (RESPONSE_FAILED.replace(b"server_error", b"rate_limit_exceeded"), 429),
        (  # a spent quota, which OpenAI answers 429 when not streamed
            RESPONSE_START
            + event({"type": "error", "error": {"type": "insufficient_quota"}}, "error"),
            429,
        ),
        (NAMELESS_START + RESPONSE_FAILED.replace(b"event: response.failed\n", b""), 500),
        (NAMELESS_START + event({"type": "error", "code": "server_error"}), 500),
    ],
)
def test_an_error_of_the_moment_first_stands_for_its_status(
    at_hand: bytes, expected: int | None
) -> None:
    found = failure(at_hand)
    assert (found if found is None else found[1]) == expected  # type: ignore[index]


@pytest.mark.parametrize(
    "at_hand",
    [
        event({"type": "error", "error": {"type": "invalid_request_error"}}, "error"),
        event({"type": "error", "error": {"type": "authentication_error"}}, "error"),
        event({"type": "error", "error": {"type": "permission_error"}}, "error"),
        event({"error": {"type": "invalid_request_error", "code": "content_filter"}}),
        event({**CHUNK, "error": {"code": 400, "message": "bad"}}),
        event({**CHUNK, "error": {"code": 403, "message": "moderation"}}),
        event({**CHUNK, "choices": [{"delta": {"content": "an error of mine"}}]}),
        ANTHROPIC_START
        + event({"type": "content_block_start", "index": 0}, "content_block_start")
        + OVERLOADED,
        ROLE + event({**CHUNK, "choices": [{"delta": {"content": "Hi"}}]}) + SERVER_ERROR,
        event({**CHUNK, "choices": [{"delta": {"role": "assistant", "content": "Hi"}}]}),
        event({**CHUNK, "choices": [{"delta": {"role": "assistant"}, "finish_reason": "stop"}]}),
        event({**CHUNK, "choices": [{"delta": {"role": "assistant", "tool_calls": [{}]}}]}),
        RESPONSE_START
        + event({"type": "response.output_item.added"}, "response.output_item.added"),
        b"data: not json error\n\n",
        b"data: [DONE]\n\n",
        RESPONSE_START + RESPONSE_FAILED.replace(b"server_error", b"invalid_prompt"),
        NAMELESS_START + event({"type": "response.output_text.delta", "delta": "an error"}),
        event({"type": "message", "error": None}),  # a type that starts nothing
    ],
)
def test_content_first_or_an_error_that_fails_everywhere_goes_on(at_hand: bytes) -> None:
    assert failure(at_hand) is None


@pytest.mark.parametrize(
    "at_hand",
    [
        b"",
        b": OPENROUTER PROCESSING\n\n",
        b"event: error\n",
        b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error"}}\n',
        ANTHROPIC_START,
        ANTHROPIC_START + PING,
        ROLE,
        AZURE_FILTERS + ROLE,
        RESPONSE_START,
        ANTHROPIC_START + b"event: content_block_start\n",
        NAMELESS_START,
    ],
)
def test_a_first_event_not_all_come_waits_for_more(at_hand: bytes) -> None:
    assert failure(at_hand) == MORE


def llamacpp_error(code: int, kind: str) -> bytes:
    """llama.cpp's server (older builds): a failure as a line of its own field, `error:`."""
    return b"error: " + json.dumps({"code": code, "message": "m", "type": kind}).encode() + b"\n\n"


def test_llamacpps_error_line_is_an_error_event() -> None:
    loading = llamacpp_error(503, "unavailable_error")
    assert failure(ROLE + loading + b"data: [DONE]\n\n") == ("error 503", 503)
    assert failure(loading) == ("error 503", 503)  # no data line needed before it
    assert failure(ROLE + llamacpp_error(400, "exceed_context_size_error")) is None
    assert failure(b'error: {"code": 5') is MORE  # its blank line has not come


def test_a_bedrock_stream_is_read_by_its_frames() -> None:
    """Bedrock's AWS event stream: its start read past, an exception of the moment stands
    for its status, a frame not all come waits, a frame whose CRC is wrong is not read."""
    start = frame("chunk", {"bytes": base64.b64encode(b'{"type": "message_start"}').decode()})
    throttled = exception_frame("throttlingException", "Too many requests")
    assert reader("application/vnd.amazon.eventstream") is framed_failure
    assert framed_failure(start + throttled) == ("throttlingException", 429)
    assert framed_failure(frame("messageStart", {"role": "assistant"}) + throttled)[1] == 429  # type: ignore[index]
    assert framed_failure(start) is MORE
    assert framed_failure(start + throttled[:20]) is MORE
    assert framed_failure(start + exception_frame("validationException", "bad")) is None
    assert framed_failure(frame("contentBlockDelta", {"delta": {"text": "hi"}}) + throttled) is None
    assert framed_failure(start[:-1] + b"\x00" + throttled) is None  # a broken CRC


def test_a_json_answer_is_read_for_openrouters_error() -> None:
    """OpenRouter's 200 answer whose `error` names a status of the moment stands for it,
    after its whitespace; another answer (content, a 400, a Response's error by kind) is
    none; a body not all come (or no error yet) waits for its end."""
    failed = b'{"id": "gen-1", "choices": [], "error": {"code": 503, "message": "down"}}'
    assert reader("application/json; charset=utf-8") is answered_failure
    assert answered_failure(b"\n\n" + failed) == ("error 503", 503)
    assert answered_failure(failed.replace(b"503", b"400")) is None
    assert answered_failure(b'{"object": "response", "error": {"code": "server_error"}}') is None
    assert answered_failure(b'{"choices": [{"message": {"content": "an error"}}]}') is MORE
    assert answered_failure(b"\n") is MORE
    assert answered_failure(failed[:30]) is MORE


def test_a_coded_stream_is_read_decoded_from_its_start_and_bounded() -> None:
    events = (
        b'event: message_start\ndata: {"type": "message_start"}\n\n'
        b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error"}}\n\n'
    )
    coder = zlib.compressobj(wbits=31)
    coded = coder.compress(events) + coder.flush(zlib.Z_SYNC_FLUSH)
    read = decoded(failure, "gzip", 1 << 14)
    assert read is not None
    assert read(coded[:5]) is MORE  # its gzip header, not yet an event
    assert read(coded) == ("overloaded_error", 529)
    assert decoded(failure, "identity", 1 << 14) is failure
    assert decoded(failure, "compress", 1 << 14) is None  # not decoded: not read
    assert read(b"\x1f\x8b not gzip at all") is None
    # A start that inflates past the bound without its event: not waited for.
    bomb = gzip.compress(b": " + b"x" * (1 << 20) + b"\n\n")
    assert len(bomb) < 2048 and read(bomb) is None


NESTED = b"[" * 5000 + b"]" * 5000  # deeper than Python's parser goes (RecursionError)


@pytest.mark.parametrize(
    ("read", "at_hand"),
    [
        (failure, b'data: {"error": ' + NESTED + b"}\n\n"),
        (failure, b'data: {"role": ' + NESTED + b"}\n\n"),  # read as a start, maybe
        (answered_failure, b'{"error": ' + NESTED + b"}"),
    ],
)
def test_a_first_event_nested_past_the_parsers_depth_is_no_failure(
    read: object, at_hand: bytes
) -> None:
    """Before, the parser's RecursionError came up through the attempt loop: a 500
    internal_error for a request that had a fallback, where the stream goes on as it came."""
    assert callable(read) and read(at_hand) is None
