"""The usage tap, fed bytes directly: every provider shape, estimates, encodings, cut points."""

from __future__ import annotations

import base64
import dataclasses
import gzip
import itertools
import math
import zlib

import brotli
import orjson
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.record import Usage
from proxy.usage import anthropic, audio, batches, bedrock, images, responses
from proxy.usage.prompt import prompt_chars, request_chars
from proxy.usage.realtime_events import SessionUsage
from proxy.usage.responses import SocketUsage as ResponsesSocketUsage
from proxy.usage.usage import (
    MAX_HELD_BYTES,
    TAIL_BYTES,
    WHOLE_PARSE_BYTES,
    Charged,
    TapMemory,
    UsageTap,
    charged,
)
from tests.support.fake_bedrock import frame

JSON = "application/json"
SSE = "text/event-stream"
CHAT_REQUEST = orjson.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello to the world!"}]}
)


def sse(*events: object, done: bool = False) -> bytes:
    """An SSE body with one `data:` line per event, as the providers send it."""
    lines = [b"data: " + orjson.dumps(event) + b"\n\n" for event in events]
    if done:
        lines.append(b"data: [DONE]\n\n")
    return b"".join(lines)


def tap_of(
    body: bytes,
    content_type: str | None = SSE,
    encoding: str | None = None,
    chunks: list[int] | None = None,
    charged: Charged = Charged.TEXT,
) -> UsageTap:
    """A tap fed `body`, cut at the `chunks` positions (one chunk when None)."""
    tap = UsageTap(content_type, encoding, keep_text=True, charged=charged)
    cuts = [0, *(chunks or []), len(body)]
    for start, end in itertools.pairwise(cuts):
        tap.feed(body[start:end])
    return tap


def chat_chunk(content: str | None = None, usage: dict | None = None) -> dict:
    choices = (
        []
        if content is None
        else [{"index": 0, "delta": {"content": content}, "finish_reason": None}]
    )
    return {"id": "c1", "object": "chat.completion.chunk", "choices": choices, "usage": usage}


OPENAI_STREAM = sse(
    chat_chunk("Hello"),
    chat_chunk(", world"),
    chat_chunk("!"),
    chat_chunk(usage={"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}),
    done=True,
)
ANTHROPIC_STREAM = (
    b"event: message_start\n"
    + sse(
        {
            "type": "message_start",
            "message": {
                "id": "msg_1",
                "usage": {
                    "input_tokens": 25,
                    "cache_creation_input_tokens": 5,
                    "cache_read_input_tokens": 10,
                    "output_tokens": 1,
                },
            },
        }
    )
    + b"event: content_block_start\n"
    + sse(
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    )
    + b": a comment line\n"
    + sse(
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": "Bonjour"},
        }
    )
    + sse(
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": " le monde"},
        }
    )
    + sse({"type": "message_delta", "delta": {"stop_reason": None}, "usage": {"output_tokens": 7}})
    + sse(
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {"output_tokens": 15},
        }
    )
    + sse({"type": "message_stop"})
)


ANTHROPIC_USAGE = Usage(40, 15, cache_read_tokens=10, cache_write_tokens=5)


def test_openai_json_usage_is_the_providers():
    body = orjson.dumps(
        {
            "choices": [{"message": {"role": "assistant", "content": "Hi there"}}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
        }
    )
    tap = tap_of(body, JSON)
    assert tap.usage(CHAT_REQUEST) == Usage(9, 2, estimated=False)
    assert tap.text == body.decode()


def test_json_with_a_charset_parameter_is_still_json():
    body = orjson.dumps({"usage": {"prompt_tokens": 1, "completion_tokens": 1}})
    assert tap_of(body, "application/json; charset=utf-8").usage(b"") == Usage(1, 1)


def test_embeddings_usage_has_prompt_tokens_only():
    body = orjson.dumps(
        {"data": [{"embedding": [0.1, 0.2]}], "usage": {"prompt_tokens": 8, "total_tokens": 8}}
    )
    assert tap_of(body, JSON).usage(b'{"input": "hello"}') == Usage(8, 0)


def test_responses_api_json_usage_reads_input_and_output_tokens():
    body = orjson.dumps(
        {
            "object": "response",
            "output": [{"type": "message", "content": [{"type": "output_text", "text": "Hi"}]}],
            "usage": {
                "input_tokens": 20,
                "input_tokens_details": {"cached_tokens": 4},
                "output_tokens": 6,
            },
        }
    )
    assert tap_of(body, JSON).usage(b"") == Usage(20, 6, cache_read_tokens=4)


def test_anthropic_json_usage_counts_cache_tokens_as_prompt():
    body = orjson.dumps(
        {
            "type": "message",
            "content": [{"type": "text", "text": "Hi"}],
            "usage": {
                "input_tokens": 10,
                "cache_creation_input_tokens": 100,
                "cache_read_input_tokens": 1000,
                "output_tokens": 3,
            },
        }
    )
    assert tap_of(body, "application/json").usage(b"") == Usage(
        1110, 3, cache_read_tokens=1000, cache_write_tokens=100
    )


def test_a_fallback_answer_split_around_an_advisor_call_is_not_taken_for_a_declined_attempt():
    # The answer of a server-side fallback (its model's iterations) that consulted the advisor
    # comes in two iterations around the advisor's: both are the answer's (its top-level
    # counts), not attempts that declined; only the requested model's, before, declined.
    counts = {"cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    iterations = [
        {"type": "message", "model": "claude-fable-5", "input_tokens": 500, "output_tokens": 20},
        {"type": "fallback_message", "model": "claude-opus-4-8", "input_tokens": 400, "output_tokens": 89},
        {"type": "advisor_message", "model": "claude-fable-5", "input_tokens": 800, "output_tokens": 1600},
        {"type": "fallback_message", "model": "claude-opus-4-8", "input_tokens": 1300, "output_tokens": 442},
    ]  # fmt: skip
    usage = {"input_tokens": 400, "output_tokens": 531, **counts, "iterations": iterations}
    body = orjson.dumps({"type": "message", "model": "claude-opus-4-8", "usage": usage})
    tap = tap_of(body, "application/json")
    # Every sampling's input is billed: the answer's second one (1300) too, which the
    # top-level counts (its first's input, every output) leave out.
    assert tap.usage(b"") == Usage(500 + 400 + 800 + 1300, 20 + 531 + 1600)
    assert tap.apart == (
        ("claude-fable-5", Usage(500, 20)),
        ("claude-fable-5", Usage(800, 1600)),
    )


def test_json_without_usage_is_estimated_from_request_and_response_text():
    body = orjson.dumps({"choices": [{"message": {"content": "x" * 9}}], "usage": None})
    # 23 characters of prompt → 6 tokens; 9 of completion → 3 (4 characters a token, ceiling).
    assert tap_of(body, JSON).usage(CHAT_REQUEST) == Usage(6, 3, estimated=True)


def test_anthropic_json_without_usage_is_estimated_from_content_blocks():
    body = orjson.dumps({"type": "message", "content": [{"type": "text", "text": "abcdefgh"}]})
    request = orjson.dumps(
        {
            "system": "Be brief.",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hey"}]}],
        }
    )
    assert tap_of(body, JSON).usage(request) == Usage(3, 2, estimated=True)


def test_estimate_reads_prompt_and_responses_input():
    body = orjson.dumps({"choices": [{"text": "abcd"}]})
    assert tap_of(body, JSON).usage(b'{"prompt": "12345678"}') == Usage(2, 1, estimated=True)
    request = orjson.dumps(
        {"input": [{"role": "user", "content": [{"type": "input_text", "text": "abcde"}]}]}
    )
    assert tap_of(body, JSON).usage(request) == Usage(2, 1, estimated=True)


def test_openai_stream_usage_chunk_is_the_providers():
    tap = tap_of(OPENAI_STREAM)
    assert tap.usage(CHAT_REQUEST) == Usage(12, 3)
    assert tap.text == "Hello, world!"


def test_openai_stream_without_usage_chunk_is_estimated():
    body = sse(chat_chunk("Hello"), chat_chunk(", world!"), done=True)
    tap = tap_of(body)
    assert tap.usage(CHAT_REQUEST) == Usage(6, 4, estimated=True)
    assert tap.text == "Hello, world!"


def test_a_groq_stream_is_charged_the_usage_groq_reports_in_x_groq():
    # Groq streams its usage in the last chunk's `x_groq.usage` (a request without
    # stream_options); it was estimated from the text instead.
    last = chat_chunk()
    last["choices"] = [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    last["x_groq"] = {
        "id": "req_01",
        "usage": {
            "queue_time": 0.07,
            "prompt_tokens": 23,
            "prompt_time": 0.006,
            "completion_tokens": 19,
            "total_tokens": 42,
        },
    }
    first = chat_chunk("Hello")
    first["x_groq"] = {"id": "req_01"}
    tap = tap_of(sse(first, last, done=True))
    assert tap.usage(CHAT_REQUEST) == Usage(23, 19)
    assert tap.text == "Hello"


@pytest.mark.parametrize(
    ("total", "completion"),
    [(2_757, 2_738 + 73_997), (19 + 2_738 + 73_997, 2_738 + 73_997)],
    ids=["left-out-of-the-total", "counted-in-the-total"],
)
def test_reasoning_reported_beside_the_completion_is_added_to_it_once(
    total: int, completion: int
) -> None:
    # Perplexity's deep research: `reasoning_tokens` at the usage's top level, beside the
    # completion and outside total_tokens; a total that counts it adds nothing more.
    usage = {
        "prompt_tokens": 19,
        "completion_tokens": 2_738,
        "total_tokens": total,
        "reasoning_tokens": 73_997,
    }
    body = orjson.dumps({"object": "chat.completion", "choices": [], "usage": usage})
    tap = tap_of(body, JSON)
    assert tap.usage(CHAT_REQUEST) == Usage(19, completion, reasoning_tokens=73_997)


def test_completions_stream_text_is_read_from_choices_text():
    body = sse(
        {"object": "text_completion", "choices": [{"text": "abc"}]}, {"choices": [{"text": "de"}]}
    )
    tap = tap_of(body)
    assert tap.text == "abcde"
    assert tap.usage(b'{"prompt": "1234"}') == Usage(1, 2, estimated=True)


def test_anthropic_stream_takes_the_last_cumulative_message_delta():
    tap = tap_of(ANTHROPIC_STREAM)
    # Prompt: 25 input + 5 cache writes + 10 cache reads.
    # Completion: the last delta, 15, not 1 + 7 + 15.
    assert tap.usage(b"") == ANTHROPIC_USAGE
    assert tap.text == "Bonjour le monde"


def test_an_anthropic_stream_cut_before_its_message_delta_is_charged_what_it_delivered():
    # message_start's output_tokens (1) only starts the count: cut before any message_delta,
    # the prompt is the provider's and the completion at least the text delivered.
    cut = ANTHROPIC_STREAM.index(b'data: {"type":"message_delta"')
    tap = tap_of(ANTHROPIC_STREAM[:cut])
    assert tap.usage(b"") == Usage(
        40, 4, estimated=True, cache_read_tokens=10, cache_write_tokens=5
    )  # "Bonjour le monde": 16 characters, 4 tokens (before: 1 token, not estimated)


def test_anthropic_message_delta_may_restate_input_tokens():
    body = sse(
        {"type": "message_start", "message": {"usage": {"input_tokens": 5, "output_tokens": 1}}},
        {"type": "message_delta", "usage": {"input_tokens": 50, "output_tokens": 9}},
    )
    assert tap_of(body).usage(b"") == Usage(50, 9)


def test_responses_api_stream_reads_deltas_and_completed_usage():
    body = (
        b"event: response.created\n"
        + sse({"type": "response.created", "response": {"usage": None}})
        + sse({"type": "response.output_text.delta", "delta": "Hi"})
        + sse({"type": "response.output_text.delta", "delta": " you"})
        + sse(
            {
                "type": "response.completed",
                "response": {"usage": {"input_tokens": 11, "output_tokens": 2}},
            }
        )
    )
    tap = tap_of(body)
    assert tap.usage(b"") == Usage(11, 2)
    assert tap.text == "Hi you"


def test_crlf_line_ends_and_a_missing_final_blank_line_still_count():
    body = (
        OPENAI_STREAM.replace(b"\n", b"\r\n")
        .removesuffix(b"data: [DONE]\r\n\r\n")
        .removesuffix(b"\r\n")
    )
    tap = tap_of(body)
    assert tap.usage(b"") == Usage(12, 3)
    assert tap.text == "Hello, world!"


def test_bare_cr_line_ends_count_wherever_the_stream_is_cut():
    for line_end in (b"\r", b"\r\n"):
        body = OPENAI_STREAM.replace(b"\n", line_end)
        for cut in range(len(body) + 1):
            tap = tap_of(body, chunks=[cut])
            assert tap.usage(b"") == Usage(12, 3), (line_end, cut)
            assert tap.text == "Hello, world!"


def test_the_last_event_is_seen_wherever_the_stream_is_cut_however_its_lines_end():
    # What tells a client that left after the last event (answered) from one cut before it.
    last_delta = ANTHROPIC_STREAM.removesuffix(sse({"type": "message_stop"}))
    for body in (OPENAI_STREAM, ANTHROPIC_STREAM, last_delta):
        for line_end in (b"\n", b"\r\n", b"\r"):
            framed = body.replace(b"\n", line_end)
            for cut in range(len(framed) + 1):
                assert tap_of(framed, chunks=[cut]).is_whole, (line_end, cut)
            assert tap_of(framed.rstrip(line_end)).is_whole  # its line end never came
    assert tap_of(gzip.compress(OPENAI_STREAM), encoding="gzip").is_whole
    assert not tap_of(OPENAI_STREAM.removesuffix(b"data: [DONE]\n\n")).is_whole
    assert not tap_of(ANTHROPIC_STREAM[: ANTHROPIC_STREAM.index(b"end_turn")]).is_whole


def gemini_events(last_usage: dict | None) -> list[dict]:
    """A Gemini stream as Vertex sends it: the prompt's count early, `last_usage` at the end."""
    prompt = {"usageMetadata": {"promptTokenCount": 5}}
    text = {"candidates": [{"content": {"parts": [{"text": "Hi"}]}, "index": 0}], **prompt}
    last = {"candidates": [{"content": {"parts": []}, "finishReason": "STOP", "index": 0}]}
    return [text, {**last, "usageMetadata": last_usage} if last_usage else last]


def test_a_gemini_streams_last_event_is_its_finish_reason_with_the_whole_usage():
    whole = {"promptTokenCount": 5, "candidatesTokenCount": 2}
    events = gemini_events(whole)
    assert tap_of(sse(*events)).is_whole
    assert tap_of(orjson.dumps(events), "application/json").is_whole  # one JSON array
    assert not tap_of(sse(events[0])).is_whole
    # No usage at all (a provider that reports none): the finish reason ends it.
    assert tap_of(sse(*gemini_events(None)[1:])).is_whole
    # A finish reason whose usage still counts only the prompt: its total is yet to come.
    assert not tap_of(sse(*gemini_events({"promptTokenCount": 5}))).is_whole


def test_a_bedrock_streams_last_frame_is_its_message_stop_or_its_invocation_metrics():
    stop, usage = frame("messageStop", {"stopReason": "end_turn"}), {"inputTokens": 3}
    start = frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Hi"}})
    converse = start + stop + frame("metadata", {"usage": {**usage, "outputTokens": 1}})
    assert tap_of(converse, bedrock.EVENT_STREAM).is_whole
    assert tap_of(start + stop, bedrock.EVENT_STREAM).is_whole  # its usage yet to come
    assert not tap_of(start, bedrock.EVENT_STREAM).is_whole
    # A Llama's invoke stream: its own events, Bedrock's count on the last one only.
    llama = {"generation": "Hi", "stop_reason": None}

    def chunk(event: dict) -> bytes:
        return frame("chunk", {"bytes": base64.b64encode(orjson.dumps(event)).decode()})

    metrics = {"inputTokenCount": 3, "outputTokenCount": 1}
    last = chunk({**llama, "amazon-bedrock-invocationMetrics": metrics})
    assert tap_of(chunk(llama) + last, bedrock.EVENT_STREAM).is_whole
    assert not tap_of(chunk(llama), bedrock.EVENT_STREAM).is_whole


def pretty(body: bytes) -> bytes:
    """Each event's JSON indented over several `data:` lines (as a server that writes
    indented JSON through an SSE library sends it: one data field per line)."""
    events = []
    for event in body.split(b"\n\n"):
        lines = []
        for line in event.split(b"\n"):
            if line.startswith(b"data: {"):
                indented = orjson.dumps(orjson.loads(line[6:]), option=orjson.OPT_INDENT_2)
                lines += [b"data: " + part for part in indented.split(b"\n")]
            else:
                lines.append(line)
        events.append(b"\n".join(lines))
    return b"\n\n".join(events)


def test_an_error_beside_choices_is_noted_only_when_it_is_an_object():
    openrouter = {"error": {"code": 502, "message": "m"}, "choices": [{"finish_reason": "error"}]}
    assert tap_of(sse(openrouter)).error_kind == "502"
    for quiet in (None, False, ""):
        assert tap_of(sse({**chat_chunk("hi"), "error": quiet})).error_kind is None


def test_an_event_whose_json_spans_several_data_lines_is_read_whole():
    # The SSE specification joins an event's data lines with a LF: the openai and anthropic
    # SDKs read such a stream, so its usage is the provider's, not an estimate.
    for body, usage, text in (
        (OPENAI_STREAM, Usage(12, 3), "Hello, world!"),
        (ANTHROPIC_STREAM, ANTHROPIC_USAGE, "Bonjour le monde"),
    ):
        indented = pretty(body)
        assert indented.count(b"data: ") > body.count(b"data: ")
        for line_end in (b"\n", b"\r\n"):
            framed = indented.replace(b"\n", line_end)
            for cut in range(0, len(framed) + 1, 7):
                tap = tap_of(framed, chunks=[cut])
                assert (tap.usage(b""), tap.text) == (usage, text), (line_end, cut)
        # The last event without the blank line after it: read at the stream's end.
        assert tap_of(indented.rstrip(b"\n")).usage(b"") == usage
    # One too large to parse whole (a long tool call's arguments, indented): its tail.
    arguments = {"choices": [{"delta": {"content": "x" * 64}}] * 20000}
    large = pretty(sse(arguments, chat_chunk(usage={"prompt_tokens": 5, "completion_tokens": 9})))
    assert len(large) > WHOLE_PARSE_BYTES
    assert tap_of(large).usage(b"") == Usage(5, 9)
    merged = pretty(sse({**arguments, "usage": {"prompt_tokens": 5, "completion_tokens": 9}}))
    assert tap_of(merged).usage(b"") == Usage(5, 9)


def test_data_lines_without_blank_lines_between_are_each_read():
    body = (
        b'data: {"choices": [{"delta": {"content": "o"}}]}\n'
        b'data:{"choices": [{"delta": {"content": "k"}}]}\n'
    )
    assert tap_of(body).text == "ok"


def test_gzip_body_is_decompressed_for_the_tap_only():
    tap = tap_of(gzip.compress(OPENAI_STREAM), encoding="gzip", chunks=[5, 17, 40])
    assert tap.usage(b"") == Usage(12, 3)
    assert tap.text == "Hello, world!"


def test_deflate_body_is_read_zlib_wrapped_or_raw():
    body = orjson.dumps({"usage": {"prompt_tokens": 4, "completion_tokens": 2}})
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    raw_body = raw.compress(body) + raw.flush()
    for encoded in (zlib.compress(body), raw_body):
        assert tap_of(encoded, JSON, "deflate", chunks=[1]).usage(b"") == Usage(4, 2)


def test_brotli_and_zstd_bodies_are_decoded_for_the_tap_only():
    for encoded, encoding in (
        (brotli.compress(OPENAI_STREAM), "br"),
        (zstandard.ZstdCompressor().compress(OPENAI_STREAM), "zstd"),
        (brotli.compress(gzip.compress(OPENAI_STREAM)), "gzip, br"),
    ):
        tap = tap_of(encoded, encoding=encoding, chunks=[1, 7, 30])
        assert tap.usage(b"") == Usage(12, 3), encoding
        assert tap.text == "Hello, world!"


def test_a_stream_in_zstd_flushed_event_by_event_is_read_as_it_goes():
    encoder = zstandard.ZstdCompressor().compressobj()
    tap = UsageTap(SSE, "zstd", keep_text=True)
    for event in OPENAI_STREAM.split(b"\n\n"):
        tap.feed(
            encoder.compress(event + b"\n\n") + encoder.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        )
    assert tap.usage(b"") == Usage(12, 3)


def test_an_unreadable_generation_is_estimated_never_free():
    unreadable = [
        tap_of(OPENAI_STREAM, encoding="compress"),  # a coding nobody decodes
        tap_of(b"\x1f\x8b\x08\x00garbage" * 10, encoding="gzip"),  # corrupt
        tap_of(b"\x00\xff\x10 not json " * 100, "text/plain"),
        tap_of(b"\x00\xff\x10 not json " * 100, None),
        tap_of(b'{"choices": [{"message": {"content": "cut sho', JSON),  # truncated
    ]
    for tap in unreadable:
        usage = tap.usage(CHAT_REQUEST)
        assert usage is not None and usage.estimated
        assert usage.prompt_tokens == 6  # the request's 23 characters
        assert usage.completion_tokens > 0  # the bytes received stand for the text


def test_an_embeddings_answer_that_cannot_be_read_is_charged_its_prompt():
    tap = UsageTap(JSON, "compress", keep_text=False, charged=Charged.PROMPT)
    tap.feed(b"\x00" * 4000)
    assert tap.usage(b'{"input": "12345678"}') == Usage(2, 0, estimated=True)


def test_what_is_charged_follows_the_endpoint():
    assert charged("POST", "/v1/chat/completions") is Charged.TEXT
    assert charged("POST", "/v1/completions") is Charged.TEXT
    assert charged("POST", "/v1/responses") is Charged.TEXT
    assert charged("POST", "/v1/messages") is Charged.TEXT
    assert charged("POST", "/openai/deployments/gpt/chat/completions") is Charged.TEXT
    assert charged("POST", "/v1/embeddings") is Charged.PROMPT
    assert charged("POST", "/v1/messages/count_tokens") is Charged.REPORTED
    assert charged("POST", "/v1/audio/transcriptions") is Charged.DURATION
    assert charged("POST", "/v1/audio/translations") is Charged.DURATION
    assert charged("POST", "/v1/audio/speech") is Charged.CHARACTERS
    assert charged("POST", "/v1/images/generations") is Charged.REPORTED
    assert charged("GET", "/v1/models") is Charged.NOTHING
    # Charged only when a background POST owed it (tests/app/test_background.py).
    assert charged("GET", "/v1/responses/resp_1") is Charged.FETCHED
    assert charged("GET", "/v1/chat/completions") is Charged.NOTHING
    # A stored chat completion's metadata updated: answered with the usage made before.
    assert charged("POST", "/v1/chat/completions/chatcmpl-1") is Charged.NOTHING
    assert charged("POST", "/chat/completions/chatcmpl-1") is Charged.NOTHING
    assert charged("POST", "/v1/chat/completions/") is Charged.REPORTED  # no id: not one


def test_a_models_list_or_a_token_count_is_charged_nothing():
    models = orjson.dumps({"object": "list", "data": [{"id": "gpt-4o-mini"}]})
    assert tap_of(models, JSON, charged=Charged.NOTHING).usage(b"") is None
    count = orjson.dumps({"input_tokens": 12})
    assert tap_of(count, JSON, charged=Charged.REPORTED).usage(CHAT_REQUEST) is None
    # A stored response fetched again carries usage: it was charged when it was made.
    stored = orjson.dumps({"object": "response", "usage": {"input_tokens": 5, "output_tokens": 1}})
    assert tap_of(stored, JSON, charged=Charged.NOTHING).usage(b"") is None
    # Another POST is charged what its provider reports, and nothing it does not.
    assert tap_of(stored, JSON, charged=Charged.REPORTED).usage(b"") == Usage(5, 1)
    assert tap_of(b"\x00\xff", "audio/mpeg", charged=Charged.REPORTED).usage(b"") is None


@pytest.mark.parametrize("keep_text", [False, True])
@pytest.mark.parametrize("chunk", [None, 5000, 300_000])
def test_a_stored_response_too_large_to_parse_whole_is_still_read_for_its_id(
    keep_text: bool, chunk: int | None
) -> None:
    # Its id and status come before its output (an image in base64, a long text), whose
    # nested items have ids and statuses of their own; its usage comes after.
    response = {
        "id": "resp_big",
        "object": "response",
        "created_at": 1,
        "error": None,
        "reasoning": {"effort": None, "summary": None},
        "status": "completed",
        "output": [{"id": "ig_1", "status": "generating", "result": "A" * 2_000_000}],
        "usage": {"input_tokens": 5, "output_tokens": 1056, "total_tokens": 1061},
    }
    body = orjson.dumps(response)
    tap = UsageTap(JSON, None, keep_text=keep_text, charged=Charged.FETCHED)
    for start in range(0, len(body), chunk or len(body)):
        tap.feed(body[start : start + (chunk or len(body))])
    assert tap.usage(b"") is None  # a fetch is charged nothing itself...
    assert tap.stored is not None  # ... but what it says is read, for its creator's charge
    assert (tap.stored.id, tap.stored.status) == ("resp_big", "completed")
    assert tap.stored.usage == Usage(5, 1056)


def test_speech_is_counted_by_its_inputs_characters_unless_it_reports_tokens():
    request = orjson.dumps({"model": "tts-1", "input": "héllo wörld", "voice": "alloy"})
    audio = tap_of(b"\xff\xfb" * 100, "audio/mpeg", charged=Charged.CHARACTERS)
    assert audio.usage(request) == Usage(input_characters=11)
    assert tap_of(b"", "audio/mpeg", charged=Charged.CHARACTERS).usage(b"not json") == Usage()
    done = {"type": "speech.audio.done", "usage": {"input_tokens": 7, "output_tokens": 90}}
    stream = sse({"type": "speech.audio.delta", "audio": "AAAA"}) + sse(done)
    assert tap_of(stream, charged=Charged.CHARACTERS).usage(request) == Usage(7, 90)


@pytest.mark.parametrize(
    ("answer", "usage"),
    [
        (
            {"text": "hi", "usage": {"type": "duration", "seconds": 90}},
            Usage(input_audio_seconds=90),
        ),
        (
            {"task": "transcribe", "duration": 12.5, "text": "hi", "segments": []},
            Usage(input_audio_seconds=12.5),
        ),
        (
            {
                "text": "hi",
                "usage": {
                    "type": "tokens",
                    "input_tokens": 120,
                    "input_token_details": {"audio_tokens": 110, "text_tokens": 10},
                    "output_tokens": 40,
                    "total_tokens": 160,
                },
            },
            Usage(120, 40, input_audio_tokens=110),
        ),
        ({"text": "hi"}, None),  # a translation reports nothing: nothing is made up
        ({"text": "hi", "usage": {"type": "duration", "seconds": "90"}}, None),
        ({"text": "hi", "usage": {"type": "duration", "seconds": -1}}, None),
    ],
)
def test_a_transcription_reports_tokens_or_seconds_of_audio(answer: dict, usage: Usage | None):
    for cut in ([], [7], [len(orjson.dumps(answer)) - 3]):
        tap = tap_of(orjson.dumps(answer), JSON, chunks=cut, charged=Charged.DURATION)
        assert tap.usage(b"") == usage


def test_a_transcription_too_large_to_parse_whole_is_read_by_its_usage_at_the_end():
    segments = [{"id": n, "text": "word " * 20, "start": n, "end": n + 1} for n in range(20_000)]
    answer = {"task": "transcribe", "duration": 20_000.0, "segments": segments}
    answer["usage"] = {"type": "duration", "seconds": 20_000.0}
    body = orjson.dumps(answer)
    assert len(body) > 1024 * 1024  # past WHOLE_PARSE_BYTES: only the tail is kept
    tap = UsageTap(JSON, None, keep_text=False, charged=Charged.DURATION)
    for start in range(0, len(body), 65536):
        tap.feed(body[start : start + 65536])
    assert tap.usage(b"") == Usage(input_audio_seconds=20_000.0)


def test_an_image_answer_reports_its_image_tokens_as_parts_of_the_totals():
    usage = {
        "input_tokens": 1050,
        "input_tokens_details": {"image_tokens": 1000, "text_tokens": 50},
        "output_tokens": 4160,
        "output_tokens_details": {"image_tokens": 4160, "text_tokens": 0},
        "total_tokens": 5210,
    }
    read = Usage(1050, 4160, input_image_tokens=1000, output_image_tokens=4160)
    body = orjson.dumps({"created": 1, "data": [{"b64_json": "AAAA"}], "usage": usage})
    assert tap_of(body, JSON, charged=Charged.REPORTED).usage(b"") == read
    partial = {"type": "image_generation.partial_image", "b64_json": "AAAA"}
    stream = sse(partial, {"type": "image_generation.completed", "b64_json": "AA", "usage": usage})
    assert tap_of(stream, charged=Charged.REPORTED).usage(b"") == read
    # DALL·E reports nothing: nothing is made up.
    dall_e = orjson.dumps({"created": 1, "data": [{"url": "https://x"}]})
    assert tap_of(dall_e, JSON, charged=Charged.REPORTED).usage(b"") is None


def test_a_streamed_transcription_reports_its_usage_at_the_end():
    usage = {"type": "tokens", "input_tokens": 20, "output_tokens": 3, "total_tokens": 23}
    events = [
        {"type": "transcript.text.delta", "delta": "fake "},
        {"type": "transcript.text.delta", "delta": "words"},
        {"type": "transcript.text.done", "text": "fake words", "usage": usage},
    ]
    tap = tap_of(b"".join(sse(event) for event in events), charged=Charged.DURATION)
    assert tap.usage(b"") == Usage(20, 3)
    assert tap.text == "fake words"


def test_json_body_that_does_not_parse_is_estimated_and_keeps_its_text():
    tap = tap_of(b'{"usage": {"prompt_tokens": 3', JSON)
    assert tap.usage(CHAT_REQUEST) == Usage(6, 8, estimated=True)  # 30 bytes received
    assert tap.text == '{"usage": {"prompt_tokens": 3'


def test_a_body_kept_for_the_log_past_the_bound_keeps_only_its_tail_and_is_still_read():
    memory = TapMemory()
    tap = UsageTap(JSON, None, keep_text=True, memory=memory)
    piece = b" " * (1024 * 1024)
    for _ in range(MAX_HELD_BYTES // len(piece) + 1):
        tap.feed(piece)
    assert memory.held_bytes <= TAIL_BYTES  # past 16 MiB: the tail only, at once
    tap.feed(orjson.dumps({"usage": OPENAI_DETAILED})[1:])  # the end of the object
    assert tap.usage(b"") == OPENAI_DETAILED_USAGE
    assert tap.text is None  # the log line goes without the body
    assert memory.held_bytes == 0


def test_a_large_body_with_nothing_readable_in_its_tail_is_estimated_from_its_size():
    tap = UsageTap(JSON, None, keep_text=False)
    piece = b" " * (1024 * 1024)
    for _ in range(3):
        tap.feed(piece)
    usage = tap.usage(b"")
    assert usage == Usage(0, 3 * len(piece) // 4, estimated=True)


def test_malformed_events_never_raise_and_are_skipped():
    body = (
        b"data: {not json\n\n"
        b"data: [1, 2, 3]\n\n"
        b"data: null\n\n"
        b"data: \xff\xfe\n\n"
        b'data: {"choices": "nope", "usage": [1]}\n\n'
        b'data: {"choices": [null, {"delta": null}, {"delta": {"content": 5}}]}\n\n'
        b'data: {"type": "message_start", "message": "x"}\n\n'
        b'data: {"type": "message_delta", "usage": {"output_tokens": "9", "input_tokens": 1.5}}\n\n'
        b'data: {"type": "content_block_delta", "delta": ["x"]}\n\n'
        b'data: {"usage": {"prompt_tokens": true, "completion_tokens": null}}\n\n'
        b'data: {"type": "response.completed", "response": {"usage": {"output_tokens": -3}}}\n\n'
        b'data: {"type": 7}\n\n'
        b'data: {"type": ["unhashable"]}\n\n'
        b'data: {"type": {"x": 1}, "usage": {"prompt_tokens": 99999999999999999999999}}\n\n'
        b"event: ping\nid: 3\nretry: 10\n\n"
        b"data\n\n"
        b'data: {"choices": [{"delta":\ndata:  {"content": "a split event never closed"\n\n'
        + sse(chat_chunk("fine"))
    )
    tap = tap_of(body)
    assert tap.usage(b"not json either") == Usage(0, 1, estimated=True)
    assert tap.text == "fine"


def test_a_request_body_nested_deeply_does_not_break_the_estimate():
    request = b'{"messages": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    assert tap_of(sse(chat_chunk("abcd"))).usage(request) == Usage(0, 1, estimated=True)


def test_usage_can_be_asked_twice():
    tap = tap_of(OPENAI_STREAM)
    assert tap.usage(b"") == tap.usage(b"") == Usage(12, 3)


def test_text_is_none_without_keep_text():
    tap = UsageTap(SSE, None, keep_text=False)
    tap.feed(OPENAI_STREAM)
    assert tap.text is None
    assert tap.usage(b"") == Usage(12, 3)


def test_every_single_cut_of_a_stream_gives_the_same_usage_and_text():
    for stream in (OPENAI_STREAM, ANTHROPIC_STREAM.replace(b"\n", b"\r\n")):
        whole = tap_of(stream)
        expected = (whole.usage(CHAT_REQUEST), whole.text)
        for cut in range(len(stream) + 1):
            tap = tap_of(stream, chunks=[cut])
            assert (tap.usage(CHAT_REQUEST), tap.text) == expected, f"cut at byte {cut}"


def test_a_stream_fed_byte_by_byte_gives_the_same_usage_and_text():
    tap = UsageTap(SSE, None, keep_text=True)
    for index in range(len(ANTHROPIC_STREAM)):
        tap.feed(ANTHROPIC_STREAM[index : index + 1])
    assert (tap.usage(b""), tap.text) == (ANTHROPIC_USAGE, "Bonjour le monde")


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
EVENT_KEYS = [
    "type",
    "usage",
    "choices",
    "delta",
    "message",
    "response",
    "content",
    "text",
    "input_tokens",
]


ENCODERS = {
    None: bytes,
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": zstandard.ZstdCompressor().compress,
}


@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(
        st.dictionaries(
            st.sampled_from(EVENT_KEYS),
            JSON_VALUES | st.sampled_from(["message_delta", "message_start"]),
        )
    ),
    noise=st.binary(max_size=64),
    encoding=st.sampled_from([None, "gzip", "deflate", "br", "zstd"]),
)
def test_random_events_and_bytes_never_raise(
    events: list[dict], noise: bytes, encoding: str | None
) -> None:
    for content_type in (SSE, JSON):
        body = sse(*events)
        encoded = ENCODERS[encoding](body)
        tap = UsageTap(content_type, encoding, keep_text=True)
        tap.feed(encoded + noise)
        tap.feed(noise)
        usage = tap.usage(noise)
        assert usage is None or usage.total_tokens >= 0
        assert tap.text is None or isinstance(tap.text, str)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_three_pieces_of_a_stream_give_the_same_usage_and_text(data: st.DataObject) -> None:
    stream = data.draw(
        st.sampled_from([OPENAI_STREAM, ANTHROPIC_STREAM, gzip.compress(ANTHROPIC_STREAM)])
    )
    encoding = "gzip" if stream[:2] == b"\x1f\x8b" else None
    first = data.draw(st.integers(0, len(stream)))
    second = data.draw(st.integers(first, len(stream)))
    whole = tap_of(stream, encoding=encoding)
    tap = tap_of(stream, encoding=encoding, chunks=[first, second])
    assert (tap.usage(CHAT_REQUEST), tap.text) == (whole.usage(CHAT_REQUEST), whole.text)


# --- every token kind, in every shape, whatever the cuts ---

OPENAI_DETAILED = {
    "prompt_tokens": 2000,
    "completion_tokens": 700,
    "total_tokens": 2700,
    "prompt_tokens_details": {"cached_tokens": 1536, "audio_tokens": 40},
    "completion_tokens_details": {
        "reasoning_tokens": 512,
        "audio_tokens": 30,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}
OPENAI_DETAILED_USAGE = Usage(
    2000,
    700,
    cache_read_tokens=1536,
    input_audio_tokens=40,
    reasoning_tokens=512,
    output_audio_tokens=30,
)
RESPONSES_DETAILED = {
    "input_tokens": 3000,
    "input_tokens_details": {"cached_tokens": 2048},
    "output_tokens": 900,
    "output_tokens_details": {"reasoning_tokens": 640},
    "total_tokens": 3900,
}
RESPONSES_DETAILED_USAGE = Usage(3000, 900, cache_read_tokens=2048, reasoning_tokens=640)
ANTHROPIC_DETAILED = {
    "input_tokens": 50,
    "cache_creation_input_tokens": 1200,
    "cache_read_input_tokens": 8000,
    "cache_creation": {"ephemeral_5m_input_tokens": 1200, "ephemeral_1h_input_tokens": 0},
    "output_tokens": 300,
}
ANTHROPIC_DETAILED_USAGE = Usage(9250, 300, cache_read_tokens=8000, cache_write_tokens=1200)

TOKEN_KIND_SHAPES = [
    (
        "openai chat json",
        JSON,
        orjson.dumps({"choices": [{"message": {"content": "Hi"}}], "usage": OPENAI_DETAILED}),
        OPENAI_DETAILED_USAGE,
    ),
    (
        "openai chat stream",
        SSE,
        sse(chat_chunk("Hi"), chat_chunk(usage=OPENAI_DETAILED), done=True),
        OPENAI_DETAILED_USAGE,
    ),
    (
        "responses json",
        JSON,
        orjson.dumps({"object": "response", "output": [], "usage": RESPONSES_DETAILED}),
        RESPONSES_DETAILED_USAGE,
    ),
    (
        "responses stream",
        SSE,
        b"event: response.output_text.delta\n"
        + sse({"type": "response.output_text.delta", "delta": "Hi"})
        + b"event: response.completed\n"
        + sse({"type": "response.completed", "response": {"usage": RESPONSES_DETAILED}}),
        RESPONSES_DETAILED_USAGE,
    ),
    (
        "embeddings json",
        JSON,
        orjson.dumps(
            {"data": [{"embedding": [0.5]}], "usage": {"prompt_tokens": 8, "total_tokens": 8}}
        ),
        Usage(8, 0),
    ),
    (
        "anthropic json",
        JSON,
        orjson.dumps({"type": "message", "content": [], "usage": ANTHROPIC_DETAILED}),
        ANTHROPIC_DETAILED_USAGE,
    ),
    (
        "anthropic stream",
        SSE,
        sse(
            {
                "type": "message_start",
                "message": {"usage": {**ANTHROPIC_DETAILED, "output_tokens": 1}},
            },
            {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Hi"}},
            {"type": "message_delta", "usage": {"output_tokens": 300}},
        ),
        ANTHROPIC_DETAILED_USAGE,
    ),
]


def test_every_token_kind_is_read_from_every_shape_cut_at_every_byte():
    for name, content_type, body, expected in TOKEN_KIND_SHAPES:
        for cut in range(len(body) + 1):
            tap = tap_of(body, content_type, chunks=[cut])
            assert tap.usage(CHAT_REQUEST) == expected, f"{name}: cut at byte {cut}"


def test_every_token_kind_is_read_from_every_shape_byte_by_byte_in_each_coding():
    for name, content_type, body, expected in TOKEN_KIND_SHAPES:
        for encoding, encode in ENCODERS.items():
            encoded = encode(body)
            tap = tap_of(encoded, content_type, encoding, chunks=list(range(1, len(encoded))))
            assert tap.usage(b"") == expected, f"{name} in {encoding}"


def test_the_log_dict_shows_the_other_units_only_when_there_are_some_before_estimated():
    usage = Usage(
        5, 7, True, input_image_tokens=1, output_image_tokens=2, input_characters=3,
        input_audio_seconds=1.5,
    )  # fmt: skip
    assert list(usage.as_dict().items())[-5:] == [
        ("input_image_tokens", 1),
        ("output_image_tokens", 2),
        ("input_characters", 3),
        ("input_audio_seconds", 1.5),
        ("estimated", True),
    ]
    assert list(Usage(5, 7, output_image_tokens=2).as_dict())[-2:] == [
        "output_image_tokens",
        "estimated",
    ]


def test_parts_of_the_totals_are_in_the_log_dict():
    assert OPENAI_DETAILED_USAGE.as_dict() == {
        "prompt_tokens": 2000,
        "completion_tokens": 700,
        "total_tokens": 2700,
        "cache_read_tokens": 1536,
        "cache_write_tokens": 0,
        "input_audio_tokens": 40,
        "reasoning_tokens": 512,
        "output_audio_tokens": 30,
        "estimated": False,
    }


# --- memory: bounded across taps, nothing held after the end ---


def feed_side_by_side(taps: list[UsageTap], body: bytes, memory: TapMemory) -> int:
    """Feed every tap `body` in 64 KiB chunks, turn by turn; the most memory held."""
    most = 0
    for start in range(0, len(body), 1 << 16):
        for tap in taps:
            tap.feed(body[start : start + (1 << 16)])
            most = max(most, memory.held_bytes)
    return most


BIG_ANSWER = orjson.dumps(
    {"choices": [{"message": {"content": "x" * (15 * 1024 * 1024)}}], "usage": OPENAI_DETAILED}
)


def test_forty_large_answers_are_read_exactly_from_their_tails_and_nothing_stays():
    memory = TapMemory()
    taps = [UsageTap(JSON, None, keep_text=False, memory=memory) for _ in range(40)]
    most = feed_side_by_side(taps, BIG_ANSWER, memory)
    assert most <= 40 * (WHOLE_PARSE_BYTES + (1 << 16))  # about 1 MiB each, not 15
    assert [tap.usage(CHAT_REQUEST) for tap in taps] == [OPENAI_DETAILED_USAGE] * 40
    assert memory.held_bytes == 0


def test_with_log_bodies_whole_bodies_share_the_bound_and_every_usage_is_still_read():
    memory = TapMemory(limit_bytes=40 * 1024 * 1024)
    # LOG_BODIES: whole bodies are kept for the log while the shared bound allows.
    taps = [UsageTap(JSON, None, keep_text=True, memory=memory) for _ in range(40)]
    assert feed_side_by_side(taps, BIG_ANSWER, memory) <= memory.limit_bytes
    assert [tap.usage(CHAT_REQUEST) for tap in taps] == [OPENAI_DETAILED_USAGE] * 40
    assert memory.held_bytes == 0
    # Whole bodies get half the bound, 20 MiB: one 15 MiB body at most (side by side, none).
    assert sum(tap.text is not None for tap in taps) <= 1
    alone = UsageTap(JSON, None, keep_text=True, memory=memory)
    feed_side_by_side([alone], BIG_ANSWER, memory)
    assert alone.usage(b"") == OPENAI_DETAILED_USAGE and alone.text == BIG_ANSWER.decode()


def test_a_tap_read_only_for_its_text_lets_go_too():
    memory = TapMemory()
    tap = UsageTap(JSON, None, keep_text=True, memory=memory)
    tap.feed(b'{"error": {"message": "overloaded"}}')
    assert memory.held_bytes > 0
    assert tap.text == '{"error": {"message": "overloaded"}}'  # an error answer: no usage asked
    assert memory.held_bytes == 0


def test_with_log_bodies_a_streams_text_is_held_within_the_bound_and_let_go_past_it():
    memory = TapMemory(limit_bytes=4 * 1024 * 1024)  # whole bodies and texts: 2 MiB
    piece = "x" * 64 * 1024
    long_stream = sse(
        *(chat_chunk(piece) for _ in range(48)),  # 3 MiB of text
        chat_chunk(usage={"prompt_tokens": 12, "completion_tokens": 48, "total_tokens": 60}),
        done=True,
    )
    kept, let_go = (UsageTap(SSE, None, keep_text=True, memory=memory) for _ in range(2))
    texts_end = OPENAI_STREAM.index(b"data: ", OPENAI_STREAM.index(b'"!"'))
    kept.feed(OPENAI_STREAM[:texts_end])
    assert memory.held_bytes == len("Hello, world!")  # the text kept for the log is held
    most = feed_side_by_side([let_go], long_stream, memory)
    assert most <= memory.limit_bytes // 2
    # Past the bound the log line goes without the text; the usage is still read.
    assert let_go.usage(b"") == Usage(12, 48) and let_go.text is None
    kept.feed(OPENAI_STREAM[texts_end:])
    assert kept.usage(b"") == Usage(12, 3) and kept.text == "Hello, world!"
    assert memory.held_bytes == 0


def test_a_streams_text_past_one_taps_bound_gives_way_to_its_lines_not_to_its_usage():
    memory = TapMemory()
    # A text just within the bound, then a line that does not fit beside it.
    events = (chat_chunk("x" * (MAX_HELD_BYTES - 1000)), chat_chunk("y" * 100_000))
    usage = {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}
    tap = UsageTap(SSE, None, keep_text=True, memory=memory)
    feed_side_by_side([tap], sse(*events, chat_chunk(usage=usage), done=True), memory)
    assert tap.usage(b"") == Usage(12, 2) and tap.text is None
    assert memory.held_bytes == 0


def test_a_long_sse_line_is_held_within_the_bound_and_released_at_its_end():
    memory = TapMemory()
    tap = UsageTap(SSE, None, keep_text=False, memory=memory)
    tap.feed(b"data: " + b"x" * 100_000)
    assert memory.held_bytes == 100_006
    tap.feed(b"\n\n" + OPENAI_STREAM[:10])
    assert memory.held_bytes == 10
    tap.feed(OPENAI_STREAM[10:])
    assert tap.usage(b"") == Usage(12, 3)
    assert memory.held_bytes == 0


def test_a_large_json_body_has_only_its_usage_parsed_the_last_one():
    big = "x" * (2 * 1024 * 1024)
    body = orjson.dumps(
        {
            "type": "message",
            "content": [
                {"type": "tool_use", "input": {"usage": {"input_tokens": 999999}}},
                {"type": "text", "text": big + ' "usage": {"input_tokens": 1} }'},
            ],
            "usage": {**ANTHROPIC_DETAILED, "service_tier": "st}and{ard"},
        }
    )
    for cut in (1, len(body) // 2, len(body) - 3):
        assert tap_of(body, JSON, chunks=[cut]).usage(b"") == ANTHROPIC_DETAILED_USAGE


def test_a_large_json_body_without_usage_is_estimated_from_its_size():
    body = orjson.dumps({"choices": [{"message": {"content": "x" * (2 * 1024 * 1024)}}]})
    usage = tap_of(body, JSON).usage(CHAT_REQUEST)
    assert usage == Usage(6, math.ceil(len(body) / 4), estimated=True)
    nulled = orjson.dumps(
        {"data": [{"usage": {"prompt_tokens": 5}}], "x": "y" * 2**21, "usage": None}
    )
    assert tap_of(nulled, JSON, charged=Charged.REPORTED).usage(b"") is None


# --- every string the provider generated is estimated, in every dialect ---

ARGS = '{"query": "' + "x" * 388 + '"}'  # 400 characters: 100 tokens
THOUGHT = "hmm " * 100  # 400 characters
GENERATED_STREAMS = [
    (
        "chat tool calls",
        sse(
            {"choices": [{"delta": {"role": "assistant", "content": None, "tool_calls": [
                {"index": 0, "id": "call_1", "type": "function",
                 "function": {"name": "search", "arguments": ""}}]}}]},
            *(
                {"choices": [{"delta": {"tool_calls": [
                    {"index": 0, "function": {"arguments": ARGS[i : i + 40]}}]}}]}
                for i in range(0, 400, 40)
            ),
            done=True,
        ),
        400 + len("search"),
    ),
    (
        "chat reasoning_content, reasoning and a refusal",
        sse(
            *({"choices": [{"delta": {"reasoning_content": THOUGHT[i : i + 50]}}]}
              for i in range(0, 400, 50)),
            {"choices": [{"delta": {"reasoning": "abcd"}}]},
            {"choices": [{"delta": {"content": None, "refusal": "I can't"}}]},
            done=True,
        ),
        400 + 4 + 7,
    ),
    (
        "chat function_call and audio transcript",
        sse(
            {"choices": [{"delta": {"function_call": {"name": "f", "arguments": ARGS}}}]},
            {"choices": [{"delta": {"audio": {"id": "a1", "transcript": "spoken"}}}]},
        ),
        1 + 400 + 6,
    ),
    (
        "responses tool call, reasoning and refusal",
        sse(
            {"type": "response.output_item.added",
             "item": {"type": "function_call", "name": "search", "arguments": ""}},
            *({"type": "response.function_call_arguments.delta", "delta": ARGS[i : i + 100]}
              for i in range(0, 400, 100)),
            {"type": "response.function_call_arguments.done", "arguments": ARGS},
            {"type": "response.reasoning_summary_text.delta", "delta": THOUGHT},
            {"type": "response.reasoning_summary_text.done", "text": THOUGHT},
            {"type": "response.refusal.delta", "delta": "no"},
            {"type": "response.output_item.done",
             "item": {"type": "function_call", "name": "search", "arguments": ARGS}},
        ),
        6 + 400 + 400 + 2,
    ),
    (
        "anthropic tool input and thinking",
        sse(
            {"type": "message_start", "message": {"model": "claude"}},
            {"type": "content_block_start", "index": 0,
             "content_block": {"type": "thinking", "thinking": ""}},
            {"type": "content_block_delta", "index": 0,
             "delta": {"type": "thinking_delta", "thinking": THOUGHT}},
            {"type": "content_block_delta", "index": 0,
             "delta": {"type": "signature_delta", "signature": "c2ln" * 50}},
            {"type": "content_block_start", "index": 1,
             "content_block": {"type": "tool_use", "id": "t1", "name": "search", "input": {}}},
            *({"type": "content_block_delta", "index": 1,
               "delta": {"type": "input_json_delta", "partial_json": ARGS[i : i + 80]}}
              for i in range(0, 400, 80)),
        ),
        400 + 6 + 400,
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("stream", "chars"),
    [pytest.param(stream, chars, id=name) for name, stream, chars in GENERATED_STREAMS],
)
def test_every_generated_string_of_a_stream_is_estimated_wherever_it_is_cut(
    stream: bytes, chars: int
) -> None:
    expected = Usage(0, math.ceil(chars / 4), estimated=True)
    for cut in range(0, len(stream) + 1, 7):
        tap = tap_of(stream, chunks=[cut])
        assert tap.usage(b"") == expected, cut
    assert tap.text == ""  # generated, counted, but not the answer's text in the log


GENERATED_BODIES = [
    (
        "chat tool call, reasoning, refusal, audio",
        {"choices": [{"message": {
            "role": "assistant", "content": None, "refusal": "no", "reasoning_content": THOUGHT,
            "tool_calls": [{"id": "c", "type": "function",
                            "function": {"name": "search", "arguments": ARGS}}],
            "audio": {"id": "a", "data": "AAAA" * 100, "transcript": "spoken"},
        }}]},
        2 + 400 + 6 + 400 + 6,
    ),
    (
        "chat custom tool call (freeform input)",
        {"choices": [{"message": {
            "role": "assistant", "content": None,
            "tool_calls": [{"id": "c", "type": "custom",
                            "custom": {"name": "apply_patch", "input": THOUGHT}}],
        }}]},
        11 + 400,
    ),
    (
        "completions text",
        {"object": "text_completion", "choices": [{"text": THOUGHT}]},
        400,
    ),
    (
        "responses output items",
        {"object": "response", "output": [
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": THOUGHT}]},
            {"type": "function_call", "name": "search", "arguments": ARGS},
            {"type": "message", "content": [{"type": "output_text", "text": "Hi"},
                                            {"type": "refusal", "refusal": "no"}]},
        ]},
        400 + 6 + 400 + 2 + 2,
    ),
    (
        "anthropic thinking and tool use",
        {"type": "message", "content": [
            {"type": "thinking", "thinking": THOUGHT, "signature": "c2ln" * 50},
            {"type": "tool_use", "id": "t", "name": "search", "input": {"query": "x" * 388}},
        ]},
        400 + 6 + len(orjson.dumps({"query": "x" * 388})),
    ),
    (
        "converse reasoning and tool use",
        {"output": {"message": {"role": "assistant", "content": [
            {"reasoningContent": {"reasoningText": {"text": THOUGHT, "signature": "c2ln"}}},
            {"text": "Hi"},
            {"toolUse": {"toolUseId": "t", "name": "search", "input": {"query": "x" * 388}}},
        ]}}, "stopReason": "tool_use"},
        400 + 2 + 6 + len(orjson.dumps({"query": "x" * 388})),
    ),
    (
        "gemini thought, function call and code",
        {"candidates": [{"content": {"role": "model", "parts": [
            {"text": THOUGHT, "thought": True},
            {"functionCall": {"name": "search", "args": {"query": "x" * 388}}},
            {"executableCode": {"language": "PYTHON", "code": "print(1)"}},
        ]}}]},
        400 + 6 + len(orjson.dumps({"query": "x" * 388})) + 8,
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "chars"),
    [pytest.param(body, chars, id=name) for name, body, chars in GENERATED_BODIES],
)
def test_every_generated_string_of_a_json_answer_is_estimated(body: dict, chars: int) -> None:
    assert tap_of(orjson.dumps(body), JSON).usage(b"") == Usage(
        0, math.ceil(chars / 4), estimated=True
    )


EVENT_TYPES = sorted({*anthropic.EVENTS, *responses.EVENTS, *audio.EVENTS, *images.EVENTS})
DELTA_KEYS = ["content", "tool_calls", "function_call", "audio", "reasoning", "refusal", "type"]


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from([None, *EVENT_TYPES]),
    value=JSON_VALUES,
    delta=st.dictionaries(st.sampled_from(DELTA_KEYS), JSON_VALUES, max_size=3),
)
def test_any_value_where_a_dialect_reads_never_raises(
    kind: str | None, value: object, delta: dict
) -> None:
    """Each dialect's events and answers with anything where it expects its shapes."""
    event = {
        "type": kind,
        "delta": delta if kind is None else value,
        "item": value,
        "response": {"usage": value, "output": value},
        "content_block": value,
        "message": {"usage": value, "content": value},
        "choices": [{"delta": delta, "message": delta, "text": value}, value],
        "usage": value,
        "output": [value, {"type": "message", "content": value}],
        "content": [value, {"type": "tool_use", "input": value}],
    }
    gemini = {
        "candidates": [value, {"content": value}, {"content": {"parts": [value, {
            "text": value, "thought": value, "functionCall": value, "executableCode": value}]}}],
        "usageMetadata": value,
        "usage_metadata": {"promptTokenCount": value, "candidates_token_count": value},
        "modelVersion": value,
    }  # fmt: skip
    answers = [  # one JSON answer of each dialect
        {key: event[key] for key in ("choices", "usage")},
        {"object": "response", "output": event["output"], "usage": value},
        {"type": "message", "content": event["content"], "usage": value},
        {"output": {"message": {"content": [value, {"toolUse": value,
         "reasoningContent": value}]}}, "stopReason": value, "usage": value},
        gemini,
        [gemini, value],  # Gemini's stream as one JSON array
    ]  # fmt: skip
    streams = [(sse(event), SSE), (sse(gemini, {"usageMetadata": value}), SSE)]
    for body, content_type in [*streams, *((orjson.dumps(a), JSON) for a in answers)]:
        usage = tap_of(body, content_type).usage(CHAT_REQUEST)
        assert usage is None or usage.total_tokens >= 0
    # Audio: a transcription's answer, a speech request, anything where their shapes go.
    transcription = orjson.dumps({"text": value, "usage": value, "duration": value})
    for body, content_type, kind_charged, request in [
        (transcription, JSON, Charged.DURATION, b""),
        (sse(event), SSE, Charged.DURATION, b""),
        (sse(event), SSE, Charged.CHARACTERS, orjson.dumps({"input": value})),
        (b"\xff\xfb", "audio/mpeg", Charged.CHARACTERS, orjson.dumps({"input": value})),
    ]:
        usage = tap_of(body, content_type, charged=kind_charged).usage(request)
        assert usage is None or usage.input_audio_seconds >= 0 <= usage.input_characters
    for reader in (
        SessionUsage(lambda usage, **_: None),
        ResponsesSocketUsage(lambda usage, **_: None),
    ):
        reader.read(orjson.dumps({**event, "type": kind or "response.done"}))
        reader.finish()


def test_a_type_that_is_no_string_is_read_as_no_type_and_never_raises() -> None:
    # A list where a `type` goes (unhashable) raised TypeError out of the tap, found by the
    # test above: a Responses item, a Realtime delta or session event, a batch's status.
    kind: list[str] = ["function_call"]
    items = {"type": "response.output_item.added", "item": {"type": kind, "name": "abc"}}
    done = {"type": "response.completed", "response": {"output": [{"type": kind}]}}
    assert tap_of(sse(items, done), SSE).usage(CHAT_REQUEST) is not None
    for reader in (
        SessionUsage(lambda usage, **_: None),
        ResponsesSocketUsage(lambda usage, **_: None),
    ):
        reader.read(orjson.dumps({"type": kind, "delta": "x", "note": "a.delta"}))
        reader.read(orjson.dumps({"type": kind, "note": 'session.updated"'}))
        reader.finish()
    batch = batches.read_batch({"id": "batch_1", "object": "batch", "status": kind}, True)
    assert batch is not None and not batch.is_finished


def test_a_tool_input_nested_deeper_than_orjson_writes_is_still_estimated() -> None:
    nested = b"[" * 300 + b"]" * 300  # orjson reads it, but writes at most 254 levels
    body = b'{"type": "message", "content": [{"type": "tool_use", "name": "t", "input": '
    usage = tap_of(body + nested + b"}]}", JSON).usage(b"")
    assert usage == Usage(0, 1, estimated=True)  # its name; the input is not counted


# --- the prompt: every string of it, by the dialect of its path ---

TOOL = {"name": "search", "description": "Find it.", "parameters": {"type": "object"}}
PROMPTS = [
    ("chat messages, tool calls and tools", "/v1/chat/completions", {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "find"},
                                         {"type": "image_url", "image_url": {"url": "x" * 99}}]},
            {"role": "assistant", "content": None, "refusal": "no", "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "search", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c", "content": "found"}],
        "tools": [{"type": "function", "function": TOOL}]},
        9 + 4 + 2 + 6 + 2 + 5 + len(orjson.dumps([{"type": "function", "function": TOOL}]))),
    ("completions strings and tokens", "/v1/completions",
        {"prompt": ["abc", [1, 2, 3]], "suffix": "de"}, 3 + 3 * 4 + 2),
    ("embeddings token arrays", "/v1/embeddings", {"input": [[1, 2], [3]]}, 3 * 4),
    ("responses instructions, items, tools, variables", "/v1/responses", {
        "instructions": "Be brief.",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "find"},
                                         {"type": "input_image", "image_url": "x" * 99}]},
            {"type": "function_call", "call_id": "c", "name": "search", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c", "output": "found"},
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "hm"}]}],
        "tools": [{"type": "function", **TOOL}],
        "prompt": {"id": "pmpt_1", "variables": {"city": "Paris",
                                                 "doc": {"type": "input_text", "text": "ab"}}}},
        9 + 4 + 6 + 2 + 5 + 2 + len(orjson.dumps([{"type": "function", **TOOL}])) + 5 + 2),
    ("anthropic system blocks, tool use and result, tools", "/v1/messages", {
        "system": [{"type": "text", "text": "Be brief."}],
        "messages": [
            {"role": "user", "content": "find"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hm", "signature": "c2ln"},
                {"type": "tool_use", "id": "t", "name": "search", "input": {"q": "x"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                          "content": [{"type": "text", "text": "found"}]}]}],
        "tools": [TOOL]},
        9 + 4 + 2 + 6 + len(b'{"q":"x"}') + 5 + len(orjson.dumps([TOOL]))),
    ("bedrock invoke: an anthropic body", "/v1/model/anthropic.claude-v2:1/invoke", {
        "anthropic_version": "bedrock-2023-05-31", "system": "Be brief.",
        "messages": [{"role": "user", "content": "find"}], "tools": [TOOL]},
        9 + 4 + len(orjson.dumps([TOOL]))),
    ("converse system, tool use and result, tool config", "/v1/model/m/converse", {
        "system": [{"text": "Be brief."}, {"guardContent": {"text": {"text": "safe"}}}],
        "messages": [
            {"role": "user", "content": [{"text": "find"}]},
            {"role": "assistant", "content": [
                {"reasoningContent": {"reasoningText": {"text": "hm", "signature": "s"}}},
                {"toolUse": {"toolUseId": "t", "name": "search", "input": {"q": "x"}}}]},
            {"role": "user", "content": [{"toolResult": {"toolUseId": "t", "content": [
                {"text": "found"}, {"json": {"n": 1}}]}}]}],
        "toolConfig": {"tools": [{"toolSpec": TOOL}]}},
        9 + 4 + 4 + 2 + 6 + len(b'{"q":"x"}') + 5 + len(b'{"n":1}')
        + len(orjson.dumps({"tools": [{"toolSpec": TOOL}]}))),
    ("gemini contents, system instruction, tools", "/v1/projects/p/locations/l/publishers/"
     "google/models/gemini-2.5-pro:streamGenerateContent", {
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "contents": [
            {"role": "user", "parts": [{"text": "find"}, {"inlineData": {"data": "x" * 99}}]},
            {"role": "model", "parts": [{"functionCall": {"name": "search", "args": {"q": "x"}}}]},
            {"role": "user", "parts": [{"function_response": {"name": "search",
                                                              "response": {"r": "found"}}}]}],
        "tools": [{"functionDeclarations": [TOOL]}]},
        9 + 4 + 6 + len(b'{"q":"x"}') + 6 + len(b'{"r":"found"}')
        + len(orjson.dumps([{"functionDeclarations": [TOOL]}]))),
    ("gemini on another path: by its shape", "/v1/custom", {
        "system_instruction": "Be brief.", "contents": [{"parts": [{"text": "find"}]}]}, 9 + 4),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "chars"),
    [pytest.param(path, body, chars, id=name) for name, path, body, chars in PROMPTS],
)
def test_every_string_of_a_prompt_is_counted_by_its_dialect(
    path: str, body: dict, chars: int
) -> None:
    assert prompt_chars(path, body) == chars
    assert request_chars(path, orjson.dumps(body)) == chars
    answer = orjson.dumps({"choices": [{"text": ""}]})
    tap = UsageTap(JSON, None, keep_text=False, path=path)
    tap.feed(answer)
    assert tap.usage(orjson.dumps(body)) == Usage(math.ceil(chars / 4), 0, estimated=True)


GEMINI_USAGE = {"promptTokenCount": 40, "candidatesTokenCount": 9, "thoughtsTokenCount": 5,
                "cachedContentTokenCount": 32, "toolUsePromptTokenCount": 2}  # fmt: skip


def gemini_event(text: str, usage: dict | None = None) -> dict:
    event: dict = {"candidates": [{"content": {"role": "model", "parts": [{"text": text}]}}]}
    if usage is not None:
        event["usageMetadata"] = usage
    return event


def test_gemini_usage_metadata_is_read_in_every_kind() -> None:
    expected = Usage(40 + 2, 9 + 5, cache_read_tokens=32, reasoning_tokens=5)
    body = gemini_event("Hello", GEMINI_USAGE)
    assert tap_of(orjson.dumps(body), JSON).usage(b"") == expected
    snake = {"usage_metadata": {"prompt_token_count": 40, "candidates_token_count": 9}}
    assert tap_of(orjson.dumps(snake), JSON).usage(b"") == Usage(40, 9)
    stream = sse(gemini_event("Hel", {"promptTokenCount": 40}), gemini_event("lo", GEMINI_USAGE))
    tap = tap_of(stream)
    assert (tap.usage(b""), tap.text) == (expected, "Hello")
    array = orjson.dumps([gemini_event("Hel"), gemini_event("lo", GEMINI_USAGE)])
    assert tap_of(array, JSON).usage(b"") == expected


def test_a_byte_order_mark_opening_a_stream_hides_none_of_its_first_event() -> None:
    # The SSE specification skips one UTF-8 BOM at a stream's start; the first line is then
    # `data:`, whose event may be the only one with the usage (a one-event answer, or an
    # Anthropic-compatible stream without `event:` lines, whose message_start has the prompt).
    one_event = sse(gemini_event("Hello", GEMINI_USAGE))
    gemini = Usage(40 + 2, 9 + 5, cache_read_tokens=32, reasoning_tokens=5)
    no_event_lines = b"".join(
        line + b"\n" for line in ANTHROPIC_STREAM.split(b"\n") if not line.startswith(b"event:")
    )
    for body, usage in ((one_event, gemini), (no_event_lines, ANTHROPIC_USAGE)):
        for line_end in (b"\n", b"\r\n", b"\r"):
            framed = b"\xef\xbb\xbf" + body.replace(b"\n", line_end)
            for cut in range(5):  # in the mark, and after it
                assert tap_of(framed, chunks=[cut]).usage(b"") == usage, (line_end, cut)


def test_gemini_modalities_are_read_as_their_parts() -> None:
    """Gemini bills some modalities at rates of their own (an image model's output images,
    a flash model's input audio, cached audio): the details lists by modality are read into
    those parts, a tool's prompt's with the prompt's, DOCUMENT as images (as genai-prices)."""
    metadata = {
        "promptTokenCount": 1000,
        "candidatesTokenCount": 1300,
        "cachedContentTokenCount": 500,
        "toolUsePromptTokenCount": 40,
        "promptTokensDetails": [
            {"modality": "TEXT", "tokenCount": 100},
            {"modality": "AUDIO", "tokenCount": 600},
            {"modality": "IMAGE", "tokenCount": 258},
            {"modality": "DOCUMENT", "tokenCount": 42},
        ],
        "toolUsePromptTokensDetails": [{"modality": "AUDIO", "tokenCount": 40}],
        "cacheTokensDetails": [
            {"modality": "AUDIO", "tokenCount": 400},
            {"modality": "IMAGE", "tokenCount": 100},
        ],
        "candidatesTokensDetails": [
            {"modality": "TEXT", "tokenCount": 10},
            {"modality": "IMAGE", "tokenCount": 1290},
        ],
    }
    expected = Usage(
        1040,
        1300,
        cache_read_tokens=500,
        input_audio_tokens=640,
        input_image_tokens=300,
        output_image_tokens=1290,
        cache_audio_read_tokens=400,
        cache_image_read_tokens=100,
    )
    assert tap_of(orjson.dumps(gemini_event("", metadata)), JSON).usage(b"") == expected
    snake = {
        "prompt_token_count": 10,
        "candidates_token_count": 20,
        "prompt_tokens_details": [{"modality": "AUDIO", "token_count": 10}],
        "candidates_tokens_details": [{"modality": "AUDIO", "token_count": 20}],
    }
    body = orjson.dumps({"usage_metadata": snake})
    assert tap_of(body, JSON).usage(b"") == Usage(
        10, 20, input_audio_tokens=10, output_audio_tokens=20
    )


def test_a_gemini_embeddings_modalities_are_read_as_their_parts() -> None:
    """embedContent's usage (EmbeddingUsageMetadata) names its details `promptTokenDetails`,
    not generateContent's `promptTokensDetails`: gemini-embedding-2 prices audio and images
    embedded at rates of their own."""
    details = [
        {"modality": "TEXT", "tokenCount": 5},
        {"modality": "AUDIO", "tokenCount": 800},
        {"modality": "IMAGE", "tokenCount": 258},
    ]
    body = {"embedding": {"values": [0.1, 0.2]},
            "usageMetadata": {"promptTokenCount": 1063, "promptTokenDetails": details}}  # fmt: skip
    tap = tap_of(orjson.dumps(body), JSON, charged=Charged.PROMPT)
    expected = Usage(1063, 0, input_audio_tokens=800, input_image_tokens=258)
    assert tap.usage(b"") == expected


def test_gemini_video_is_read_as_its_part() -> None:
    """Video embedded (gemini-embedding-2: $12/Mtok against $0.20 for text) and generated
    (the Omni models: $17.50 against $9) is billed at rates of its own."""
    embedded = {"usageMetadata": {"promptTokenCount": 1000,
                "promptTokenDetails": [{"modality": "VIDEO", "tokenCount": 900}]}}  # fmt: skip
    tap = tap_of(orjson.dumps(embedded), JSON, charged=Charged.PROMPT)
    assert tap.usage(b"") == Usage(1000, 0, input_video_tokens=900)
    metadata = {"promptTokenCount": 10, "candidatesTokenCount": 1000,
                "candidatesTokensDetails": [{"modality": "VIDEO", "tokenCount": 990}]}  # fmt: skip
    body = orjson.dumps(gemini_event("", metadata))
    assert tap_of(body, JSON).usage(b"") == Usage(10, 1000, output_video_tokens=990)


def grounded(model: str, queries: list[str], usage: dict | None = None) -> dict:
    event = gemini_event("It rained.", usage)
    event["modelVersion"] = model
    event["candidates"][0]["groundingMetadata"] = {
        "webSearchQueries": queries,
        "groundingChunks": [{"web": {"uri": "https://example.com", "title": "example.com"}}],
    }
    return event


def test_gemini_grounding_with_google_search_is_counted_as_google_bills_it() -> None:
    """Grounding with Google Search is billed per search query on Gemini 3 and later, per
    grounded prompt on 2.5 and earlier; `groundingMetadata.webSearchQueries` lists the
    queries. A stream repeating them in a later event counts them once."""
    usage = {"promptTokenCount": 40, "candidatesTokenCount": 9}
    queries = ["weather london", "london rain today"]
    body = orjson.dumps(grounded("gemini-3-flash-preview", queries, usage))
    assert tap_of(body, JSON).usage(b"") == Usage(40, 9, web_searches=2)
    body = orjson.dumps(grounded("gemini-2.5-flash", queries, usage))
    assert tap_of(body, JSON).usage(b"") == Usage(40, 9, web_searches=1)
    stream = sse(
        grounded("gemini-3-flash-preview", queries, {"promptTokenCount": 40}),
        grounded("gemini-3-flash-preview", queries, usage),
    )
    assert tap_of(stream).usage(b"") == Usage(40, 9, web_searches=2)
    snake = gemini_event("x", {"prompt_token_count": 40, "candidates_token_count": 9})
    snake["candidates"][0]["grounding_metadata"] = {"web_search_queries": queries}
    assert tap_of(orjson.dumps(snake), JSON).usage(b"") == Usage(40, 9, web_searches=2)
    # No search made (the model answered from what it knew): nothing counted.
    body = orjson.dumps(grounded("gemini-2.5-flash", [], usage))
    assert tap_of(body, JSON).usage(b"") == Usage(40, 9)


def test_a_large_gemini_answer_is_charged_the_usage_metadata_in_its_tail() -> None:
    """An answer with an inline image of 2 MiB is not parsed whole: its usage is still read."""
    image = {"inlineData": {"mimeType": "image/png", "data": "A" * (2 * WHOLE_PARSE_BYTES)}}
    body = {"candidates": [{"content": {"parts": [{"text": "Here"}, image]}}],
            "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": 1290}}  # fmt: skip
    encoded = orjson.dumps(body)
    assert tap_of(encoded, JSON, chunks=[1000, len(encoded) // 2]).usage(b"") == Usage(12, 1290)


def test_a_gemini_stream_cut_before_its_counts_is_charged_its_prompt_and_what_came() -> None:
    """The prompt's count alone, early in a stream (Vertex sends it so), is not the answer's
    usage: a stream cut there is charged that prompt (an image or a cached document in it
    counts, which no estimate sees) and at least the completion it delivered, estimated."""
    stream = sse(gemini_event("x" * 40, {"promptTokenCount": 40}), gemini_event("y" * 40))
    request = orjson.dumps({"contents": [{"parts": [{"text": "z" * 20}]}]})
    assert tap_of(stream).usage(request) == Usage(40, 20, estimated=True)
    array = orjson.dumps([gemini_event("x" * 40, {"promptTokenCount": 40})])
    assert tap_of(array, JSON).usage(request) == Usage(40, 10, estimated=True)
    # A full count, then a count of the prompt alone: the full count stands.
    stream = sse(gemini_event("x", GEMINI_USAGE), gemini_event("y", {"promptTokenCount": 40}))
    assert tap_of(stream).usage(request) == Usage(42, 14, cache_read_tokens=32, reasoning_tokens=5)


@settings(max_examples=300, deadline=None)
@given(
    value=JSON_VALUES,
    loose=st.dictionaries(
        st.sampled_from(["messages", "tools", "functions", "prompt", "input", "suffix",
                         "instructions", "system", "contents", "systemInstruction",
                         "system_instruction", "toolConfig", "anthropic_version"]),
        JSON_VALUES,
    ),
    path=st.sampled_from(["", "chat/completions", "completions", "embeddings", "responses",
                          "messages", "model/m/converse", "model/m/invoke",
                          "models/g:generateContent"]),
)  # fmt: skip
def test_any_value_where_a_prompt_is_read_never_raises(value: object, loose: dict, path: str):
    """Every dialect's request shapes with anything where it expects its parts."""
    bodies = [
        loose,
        {"messages": [value, {"content": value, "tool_calls": [value, {"function": value}],
                              "function_call": value, "audio": value}],
         "tools": value, "prompt": [value, [value]], "input": value, "suffix": value},
        {"instructions": value, "input": [value, {"content": [value], "output": value,
                                                  "summary": value, "arguments": value}],
         "prompt": {"variables": value}, "tools": value},
        {"system": [value], "messages": [{"content": [value, {"content": value, "input": value,
                                                              "text": value}]}]},
        {"system": [value, {"guardContent": {"text": value}}], "toolConfig": value,
         "messages": [{"content": [value, {"toolUse": value, "toolResult": {"content": [value]},
                                           "reasoningContent": {"reasoningText": value}}]}]},
        {"contents": [value, {"parts": value}, {"parts": [value, {
            "functionCall": value, "function_response": value, "executableCode": value,
            "codeExecutionResult": value, "text": value}]}],
         "systemInstruction": value, "system_instruction": {"parts": value}, "tools": value},
    ]  # fmt: skip
    for body in bodies:
        assert prompt_chars(path, body) >= 0
        assert request_chars(path, orjson.dumps(body)) >= 0


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n", b"\r"])
def test_a_stream_event_too_long_to_hold_is_charged_the_usage_in_its_tail(line_end: bytes):
    """A Responses stream ends with the whole response in one event: with the image_generation
    tool, every image's base64 is in it, and a few large images pass a tap's bound. Its usage
    comes last: it is read from the line's tail, never charged as if its bytes were text."""
    image = "A" * (MAX_HELD_BYTES + 1024 * 1024)
    done = {
        "id": "resp_1",
        "object": "response",
        "status": "completed",
        "model": "gpt-5",
        "output": [{"type": "image_generation_call", "id": "ig_1", "result": image}],
        "usage": RESPONSES_DETAILED,
        "tool_usage": {"web_search": {"num_requests": 0}},
    }
    events = (
        {"type": "response.created", "response": {**done, "status": "in_progress", "usage": None}},
        {"type": "response.output_text.delta", "delta": "Here it is"},
        {"type": "response.completed", "response": done},
    )
    body = line_end.join(
        b"event: " + e["type"].encode() + line_end + b"data: " + orjson.dumps(e) + line_end
        for e in events
    )
    memory = TapMemory()
    tap = UsageTap(SSE, None, keep_text=False, memory=memory, path="/v1/responses")
    most = feed_side_by_side([tap], body + b"event: after" + line_end * 2, memory)
    assert most <= MAX_HELD_BYTES  # past it, the line's tail only
    assert tap.usage(b'{"input": "draw"}') == RESPONSES_DETAILED_USAGE
    assert memory.held_bytes == 0


def test_streams_side_by_side_past_the_shared_bound_are_each_charged_their_usage():
    """The bound is shared: image streams side by side pass it with smaller events each."""
    done = {
        "id": "resp_1",
        "status": "completed",
        "output": [{"type": "image_generation_call", "result": "A" * (3 * 1024 * 1024)}],
        "usage": RESPONSES_DETAILED,
    }
    body = sse({"type": "response.completed", "response": done})
    memory = TapMemory(limit_bytes=8 * 1024 * 1024)
    taps = [UsageTap(SSE, None, keep_text=False, memory=memory) for _ in range(4)]
    assert feed_side_by_side(taps, body, memory) <= memory.limit_bytes
    assert [tap.usage(b"") for tap in taps] == [RESPONSES_DETAILED_USAGE] * 4
    assert memory.held_bytes == 0


@pytest.mark.parametrize("kind", [JSON, SSE])
def test_a_large_responses_answer_is_charged_its_web_searches_from_its_tail(kind: str):
    """An answer with images too large to parse whole keeps its hosted tools' usage beside
    its `usage`, at the end: its web searches are read from the tail too."""
    done = {
        "id": "resp_1",
        "object": "response",
        "status": "completed",
        "output": [{"type": "image_generation_call", "result": "A" * (MAX_HELD_BYTES + 2**20)}],
        "tool_usage": {"web_search": {"num_requests": 2}},
        "usage": RESPONSES_DETAILED,
    }
    body = (
        orjson.dumps(done)
        if kind == JSON
        else sse({"type": "response.completed", "response": done})
    )
    tap = tap_of(body, kind, chunks=list(range(1 << 16, len(body), 1 << 16)))
    assert tap.usage(b"") == dataclasses.replace(RESPONSES_DETAILED_USAGE, web_searches=2)


# --- Ollama's native API: newline-delimited JSON, its counts in the last line ---

NDJSON = "application/x-ndjson"
OLLAMA_STREAM = b"".join(
    orjson.dumps(line) + b"\n"
    for line in (
        {
            "model": "llama3.2",
            "created_at": "t",
            "message": {"role": "assistant", "content": "Hel"},
            "done": False,
        },  # fmt: skip
        {
            "model": "llama3.2",
            "created_at": "t",
            "message": {"role": "assistant", "content": "lo"},
            "done": False,
        },  # fmt: skip
        {
            "model": "llama3.2",
            "created_at": "t",
            "message": {"role": "assistant", "content": ""},
            "done": True,
            "done_reason": "stop",
            "prompt_eval_count": 26,
            "eval_count": 2,
        },  # fmt: skip
    )
)


@given(st.lists(st.integers(min_value=1, max_value=len(OLLAMA_STREAM) - 1), unique=True))
@settings(max_examples=60, deadline=None, derandomize=True)
def test_an_ollama_stream_reads_alike_wherever_it_is_cut(cuts: list[int]) -> None:
    tap = tap_of(OLLAMA_STREAM, NDJSON, chunks=sorted(cuts))
    assert tap.usage(b"") == Usage(26, 2)
    assert tap.text == "Hello"
    assert tap.model == "llama3.2"
    assert tap.is_whole


def test_an_ollama_stream_without_its_last_line_end_still_counts_it() -> None:
    tap = tap_of(OLLAMA_STREAM.rstrip(b"\n"), "application/x-ndjson; charset=utf-8")
    assert tap.usage(b"") == Usage(26, 2)


def test_an_ollama_answer_without_its_prompts_count_is_estimated_not_charged_no_prompt() -> None:
    """Ollama's releases of early 2024 left `prompt_eval_count` out when the prompt was in its
    cache (a chat's turns after the first): the completion's count alone charged no prompt."""
    cached = OLLAMA_STREAM.replace(b'"prompt_eval_count":26,', b"")
    assert b"prompt_eval_count" not in cached
    request = orjson.dumps(
        {"model": "llama3.2", "messages": [{"role": "user", "content": "x" * 400}]}
    )
    assert tap_of(cached, NDJSON).usage(request) == Usage(100, 2, estimated=True)


def test_ollamas_paths_are_charged_as_generations_and_embeddings() -> None:
    assert charged("POST", "/v1/api/chat") is Charged.TEXT
    assert charged("POST", "/api/generate") is Charged.TEXT
    assert charged("POST", "/v1/api/embed") is Charged.PROMPT
    assert charged("POST", "/v1/api/embeddings") is Charged.PROMPT
    assert charged("GET", "/v1/api/tags") is Charged.NOTHING
    assert charged("POST", "/v1/api/pull") is Charged.REPORTED  # a download: no tokens


# --- llama.cpp's native /completion: result objects, running counts in a stream ---

LLAMACPP_STREAM = sse(
    {"index": 0, "content": "Hel", "stop": False, "tokens_predicted": 1, "tokens_evaluated": 9},
    {"index": 0, "content": "lo", "stop": False, "tokens_predicted": 2, "tokens_evaluated": 9},
    {
        "index": 0,
        "content": "",
        "stop": True,
        "model": "qwen",
        "tokens_predicted": 2,
        "tokens_evaluated": 9,
        "timings": {"prompt_n": 9, "predicted_n": 2},
    },  # fmt: skip
)


@given(st.lists(st.integers(min_value=1, max_value=len(LLAMACPP_STREAM) - 1), unique=True))
@settings(max_examples=60, deadline=None, derandomize=True)
def test_a_llamacpp_stream_reads_alike_wherever_it_is_cut(cuts: list[int]) -> None:
    tap = tap_of(LLAMACPP_STREAM, chunks=sorted(cuts))
    assert tap.usage(b"") == Usage(9, 2)
    assert tap.text == "Hello"
    assert tap.is_whole


def test_a_llamacpp_stream_cut_short_is_charged_its_running_counts() -> None:
    first_event = LLAMACPP_STREAM.index(b"\n\n") + 2
    assert tap_of(LLAMACPP_STREAM[:first_event]).usage(b"") == Usage(9, 1)


def test_llamacpp_results_of_several_prompts_are_counted_together() -> None:
    results = [
        {"index": 0, "content": "a", "tokens_predicted": 3, "tokens_evaluated": 5, "stop": True},
        {"index": 1, "content": "b", "tokens_predicted": 4, "tokens_evaluated": 6, "stop": True},
    ]
    assert tap_of(orjson.dumps(results), JSON).usage(b"") == Usage(11, 7)


def test_llamacpps_paths_are_charged_as_generations() -> None:
    assert charged("POST", "/v1/completion") is Charged.TEXT
    assert charged("POST", "/infill") is Charged.TEXT
    assert charged("POST", "/v1/tokenize") is Charged.REPORTED


# --- TGI's native /generate and /generate_stream ---


def tgi_event(text: str, special: bool = False, whole: str | None = None, details: dict | None = None) -> bytes:  # fmt: skip
    token = {"id": 1, "text": text, "logprob": -0.1, "special": special}
    event = {"token": token, "generated_text": whole, "details": details}
    return b"data:" + orjson.dumps(event) + b"\n\n"


TGI_STREAM = (
    tgi_event("Hel")
    + tgi_event("lo")
    + tgi_event(
        "</s>", special=True, whole="Hello", details={"generated_tokens": 3, "input_length": 8}
    )  # fmt: skip
)


@given(st.lists(st.integers(min_value=1, max_value=len(TGI_STREAM) - 1), unique=True))
@settings(max_examples=60, deadline=None, derandomize=True)
def test_a_tgi_stream_reads_alike_wherever_it_is_cut(cuts: list[int]) -> None:
    tap = tap_of(TGI_STREAM, chunks=sorted(cuts))
    assert tap.usage(b"") == Usage(8, 3)
    assert tap.text == "Hello"  # the last event's whole text is not counted again
    assert tap.is_whole


def test_a_tgi_stream_without_details_is_estimated_from_its_tokens_and_inputs() -> None:
    stream = tgi_event("Hel") + tgi_event("lo") + tgi_event("", whole="Hello")
    usage = tap_of(stream).usage(b'{"inputs": "12345678"}')
    assert usage == Usage(2, 2, estimated=True)


def test_tgis_paths_are_charged_as_generations() -> None:
    assert charged("POST", "/v1/generate") is Charged.TEXT
    assert charged("POST", "/generate_stream") is Charged.TEXT


def test_llamacpps_error_line_is_the_providers_error_and_charges_nothing_before_content() -> None:
    """llama.cpp's server ends a failing stream with an `error:` line of its own (not `data:`)."""
    error = b'error: {"code":500,"message":"slot unavailable","type":"server_error"}\n\n'
    start = sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}]})
    tap = tap_of(start + error + b"data: [DONE]\n\n")
    assert tap.error_kind == "server_error"
    assert tap.usage(CHAT_REQUEST) is None  # nothing generated: charged as its 5xx would be
    assert tap_of(b"data: {}\n\nerror-free: 1\n\n").error_kind is None


def test_an_older_llamacpp_streams_text_is_counted_though_its_events_carry_no_counts() -> None:
    """llama.cpp's server in older builds (2024) sent each partial event as `{"content", "stop": false,
    "id_slot", "multimodal", "index"}`, the counts only in the last: a stream cut before it is
    estimated from the text that came."""
    partial = {"content": "12345678", "stop": False, "id_slot": 0, "multimodal": False, "index": 0}
    tap = tap_of(sse(partial, partial))
    assert tap.usage(b'{"prompt": "1234"}') == Usage(1, 4, estimated=True)
    assert tap.text == "1234567812345678"


@pytest.mark.parametrize("content_type", [JSON, "application/json; charset=utf-8", None])
@pytest.mark.parametrize("body", [OPENAI_STREAM, ANTHROPIC_STREAM, b"\n\n" + OPENAI_STREAM])
def test_a_stream_labelled_json_or_not_at_all_is_read_as_the_stream_it_is(
    content_type: str | None, body: bytes
) -> None:
    # Servers that send their stream as JSON (or unlabelled): read as the SDKs read it,
    # wherever the first chunk ends.
    whole = tap_of(body, SSE).usage(CHAT_REQUEST)
    assert whole is not None and not whole.estimated
    for cut in (1, 2, 7, len(body) // 2):
        assert tap_of(body, content_type, chunks=[cut]).usage(CHAT_REQUEST) == whole


@pytest.mark.parametrize("body", [b'\n  {"usage": {"prompt_tokens": 4, "completion_tokens": 2}}'])
def test_a_json_body_opening_with_blank_lines_is_still_read_as_json(body: bytes) -> None:
    for cut in (1, 2, 3):
        usage = tap_of(body, JSON, chunks=[cut]).usage(CHAT_REQUEST)
        assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (4, 2)
