"""What a batch answer says and what a batch's output used, read without a server."""

from __future__ import annotations

import orjson
import pytest

from proxy.record import Usage
from proxy.usage import batches
from proxy.usage.batches import ANTHROPIC, OPENAI, Call, Output, output_tail, read_batch
from proxy.usage.usage import Charged, UsageTap, charged


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/v1/batches", Call.MAKE),
        ("POST", "/batches", Call.MAKE),
        ("GET", "/v1/batches/batch_abc", Call.SEE),
        ("POST", "/v1/batches/batch_abc/cancel", Call.SEE),
        ("POST", "/v1/messages/batches", Call.MAKE),
        ("GET", "/v1/messages/batches/msgbatch_01", Call.SEE),
        ("POST", "/v1/messages/batches/msgbatch_01/cancel", Call.SEE),
        ("GET", "/v1/batches", None),  # a list: its batches are not claimed
        ("GET", "/v1/messages/batches/msgbatch_01/results", None),
        ("DELETE", "/v1/messages/batches/msgbatch_01", None),
        ("GET", "/v1/files/file-abc/content", None),
    ],
)
def test_requests_are_told_apart_by_what_they_do_to_a_batch(
    method: str, path: str, expected: Call | None
) -> None:
    assert batches.call(method, path) is expected


def test_batch_answers_are_charged_nothing_by_their_tap_and_say_their_batch() -> None:
    assert charged("POST", "/v1/batches") is Charged.BATCH_MADE
    assert charged("GET", "/v1/messages/batches/msgbatch_01") is Charged.BATCH_SEEN
    assert charged("GET", "/v1/batches") is Charged.NOTHING
    tap = UsageTap("application/json", None, False, Charged.BATCH_SEEN)
    body = {
        "id": "batch_1",
        "object": "batch",
        "status": "completed",
        "output_file_id": "file-out",
        "usage": {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15},
    }
    tap.feed(orjson.dumps(body))
    assert tap.usage(b"") is None
    assert tap.batch == batches.Batch("batch_1", OPENAI, False, True, "file-out", Usage(10, 5))


def test_an_openai_batch_is_ended_once_its_status_says_so_and_has_its_own_usage_if_any() -> None:
    running = read_batch({"id": "batch_1", "object": "batch", "status": "in_progress"}, True)
    assert running is not None and running.is_new and not running.is_finished
    ended = read_batch(
        {
            "id": "batch_1",
            "object": "batch",
            "status": "expired",
            "output_file_id": "file-xyz",
            "model": "gpt-4o-mini-2024-07-18",
            "usage": {
                "input_tokens": 100,
                "input_tokens_details": {"cached_tokens": 40},
                "output_tokens": 30,
                "output_tokens_details": {"reasoning_tokens": 10},
            },
        },
        False,
    )
    assert ended is not None and ended.is_finished and ended.model == "gpt-4o-mini-2024-07-18"
    assert ended.usage == Usage(100, 30, cache_read_tokens=40, reasoning_tokens=10)
    assert output_tail(ended) == "files/file-xyz/content"


def test_an_anthropic_batch_is_ended_by_its_processing_status() -> None:
    seen = {"id": "msgbatch_01", "type": "message_batch", "processing_status": "canceling"}
    assert read_batch(seen, False) == batches.Batch("msgbatch_01", ANTHROPIC, False, False)
    ended = read_batch({**seen, "processing_status": "ended"}, False)
    assert ended is not None and ended.is_finished
    assert output_tail(ended) == "messages/batches/msgbatch_01/results"


@pytest.mark.parametrize(
    "document",
    [
        {"error": {"message": "no such batch"}},
        {"id": "resp_1", "object": "response", "status": "completed"},
        {"id": "../../admin", "object": "batch", "status": "completed"},
        {"id": 7, "type": "message_batch", "processing_status": "ended"},
    ],
)
def test_what_is_not_a_batch_or_names_no_safe_id_is_no_batch(document: dict[str, object]) -> None:
    assert read_batch(document, False) is None


def test_an_output_file_id_that_is_not_a_plain_id_is_never_read() -> None:
    batch = read_batch(
        {"id": "b", "object": "batch", "status": "completed", "output_file_id": "a/../../x"}, False
    )
    assert batch is not None and batch.output_file_id is None and output_tail(batch) is None


def openai_line(model: str, usage: dict[str, int], status: int = 200) -> bytes:
    body = {"object": "chat.completion", "model": model, "usage": usage}
    line = {"id": "r", "custom_id": "c", "response": {"status_code": status, "body": body}}
    return orjson.dumps(line) + b"\n"


OPENAI_OUTPUT = b"".join(
    [
        openai_line("gpt-4o-mini", {"prompt_tokens": 10, "completion_tokens": 4}),
        openai_line(
            "gpt-4o-mini",
            {
                "prompt_tokens": 20,
                "completion_tokens": 6,
                "prompt_tokens_details": {"cached_tokens": 8},
            },
        ),
        b"\n",
        orjson.dumps({"id": "r", "custom_id": "x", "response": None, "error": {"code": "e"}})
        + b"\n",
        # A Responses batch line: the Responses API's usage fields.
        orjson.dumps(
            {
                "response": {
                    "status_code": 200,
                    "body": {
                        "object": "response",
                        "model": "gpt-5-mini",
                        "usage": {
                            "input_tokens": 7,
                            "output_tokens": 9,
                            "output_tokens_details": {"reasoning_tokens": 5},
                        },
                    },
                }
            }
        ),  # the last line, without its end
    ]
)


def test_an_openai_output_is_summed_by_model_wherever_its_chunks_are_cut() -> None:
    expected = {
        "gpt-4o-mini": Usage(30, 10, cache_read_tokens=8),
        "gpt-5-mini": Usage(7, 9, reasoning_tokens=5),
    }
    for cut in range(len(OPENAI_OUTPUT) + 1):
        output = Output(OPENAI)
        output.feed(OPENAI_OUTPUT[:cut])
        output.feed(OPENAI_OUTPUT[cut:])
        assert output.end() == expected, cut
        assert output.lines == 3
    bytewise = Output(OPENAI)
    for index in range(len(OPENAI_OUTPUT)):
        bytewise.feed(OPENAI_OUTPUT[index : index + 1])
    assert bytewise.end() == expected


def test_an_anthropic_output_counts_succeeded_requests_only_with_their_cache_beside() -> None:
    def line(kind: str, model: str = "claude-haiku-4-5") -> bytes:
        usage = {"input_tokens": 5, "output_tokens": 7, "cache_read_input_tokens": 100}
        message = {"type": "message", "model": model, "usage": usage}
        result = {"type": kind, "message": message} if kind == "succeeded" else {"type": kind}
        return orjson.dumps({"custom_id": "c", "result": result}) + b"\n"

    output = Output(ANTHROPIC)
    output.feed(line("succeeded") + line("errored") + line("expired") + line("canceled"))
    output.feed(line("succeeded", "claude-sonnet-4-5") + line("succeeded"))
    assert output.end() == {
        "claude-haiku-4-5": Usage(210, 14, cache_read_tokens=200),
        "claude-sonnet-4-5": Usage(105, 7, cache_read_tokens=100),
    }


def test_a_line_past_the_bound_is_skipped_and_counted_and_the_rest_still_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(batches, "MAX_LINE_BYTES", 200)
    long = openai_line("gpt-4o-mini", {"prompt_tokens": 1, "completion_tokens": 1}).replace(
        b'"c"', b'"' + b"x" * 300 + b'"'
    )
    short = openai_line("gpt-4o-mini", {"prompt_tokens": 2, "completion_tokens": 3})
    data = short + long + short
    for step in (1, 7, 64, len(data)):
        output = Output(OPENAI)
        for start in range(0, len(data), step):
            output.feed(data[start : start + step])
        assert output.end() == {"gpt-4o-mini": Usage(4, 6)}, step
        assert (output.lines, output.skipped) == (2, 1)
