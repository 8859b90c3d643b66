"""What a background response is charged, without a server: which requests are fetched, charged
later or not at all, and what the usage tap reads of a queued or a fetched answer (through a
gateway: tests/app/test_background.py)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.quota.tracker import NOTHING, Charge
from proxy.record import Usage
from proxy.usage.background import remainder
from proxy.usage.usage import Charged, UsageTap, charged


def test_only_a_get_of_one_response_is_fetched_and_only_a_background_post_is_later() -> None:
    assert charged("GET", "/v1/responses/resp_1") is Charged.FETCHED
    assert charged("GET", "/v1/responses/resp_1/input_items") is Charged.NOTHING
    assert charged("GET", "/v1/responses") is Charged.NOTHING
    assert charged("DELETE", "/v1/responses/resp_1") is Charged.NOTHING
    assert charged("POST", "/v1/responses", is_background=True) is Charged.LATER
    assert charged("POST", "/v1/responses") is Charged.TEXT
    assert charged("POST", "/v1/responses/resp_1/cancel") is Charged.FETCHED
    assert charged("POST", "/v1/batches/batch_1/cancel") is Charged.BATCH_SEEN  # test_batches


@pytest.mark.parametrize("status", ["queued", "in_progress"])
def test_a_queued_answer_is_charged_nothing_yet_and_read_for_its_id(status: str) -> None:
    tap = UsageTap("application/json", None, False, Charged.LATER)
    body = {"id": "resp_9", "object": "response", "status": status, "usage": None}
    tap.feed(json.dumps(body).encode())
    assert tap.usage(b'{"input": "one two"}') is None
    assert tap.stored is not None and (tap.stored.id, tap.stored.is_pending) == ("resp_9", True)


def test_a_fetched_response_is_charged_nothing_by_the_tap_but_reports_its_usage() -> None:
    tap = UsageTap("text/event-stream", None, False, Charged.FETCHED)
    done = {
        "id": "resp_9",
        "status": "completed",
        "usage": {"input_tokens": 3, "output_tokens": 5, "total_tokens": 8},
    }
    event = json.dumps({"type": "response.completed", "response": done})
    for piece in (b"event: response.completed\n", f"data: {event}\n\n".encode()):
        tap.feed(piece)
    assert tap.usage(b"") is None
    assert tap.stored is not None and tap.stored.is_finished
    assert tap.stored.usage == Usage(3, 5)


def test_a_background_stream_cut_short_is_charged_what_it_streamed_and_noted_running() -> None:
    tap = UsageTap("text/event-stream", None, False, Charged.LATER)
    running = {"id": "resp_9", "status": "in_progress", "usage": None}
    events = [
        {"type": "response.created", "response": running},
        *({"type": "response.output_text.delta", "delta": "abcd"} for _ in range(10)),
        {"type": "response.output_text.done", "text": "abcd" * 10},
    ]
    for event in events:
        tap.feed(b"data: %s\n\n" % json.dumps(event).encode())
    usage = tap.usage(b'{"input": "one two"}')
    assert usage is not None and usage.estimated and usage.completion_tokens == 10
    assert usage.prompt_tokens > 0
    assert tap.stored is not None and (tap.stored.id, tap.stored.is_pending) == ("resp_9", True)


FINISHED = Usage(
    30, 100, cache_read_tokens=20, reasoning_tokens=60, output_audio_tokens=5, input_characters=7
)


def spent(prompt: int, completion: int, micro_usd: int = 0) -> Charge:
    return Charge(prompt + completion, micro_usd, (prompt, completion, 0, 0, 0, 0, 0))


def test_nothing_charged_yet_leaves_the_whole_usage_to_charge() -> None:
    assert remainder(FINISHED, NOTHING) is FINISHED


def test_the_rest_is_the_finished_total_less_what_was_charged_part_by_part() -> None:
    rest = remainder(FINISHED, spent(10, 25, 999))
    assert (rest.prompt_tokens, rest.completion_tokens, rest.estimated) == (20, 75, True)
    assert rest.total_tokens == FINISHED.total_tokens - 35
    # Parts stay within their totals; units no estimate charges are kept.
    assert (rest.cache_read_tokens, rest.reasoning_tokens, rest.output_audio_tokens) == (20, 60, 5)
    assert rest.input_characters == 7


def test_a_total_charged_beyond_its_count_takes_its_excess_from_the_other() -> None:
    rest = remainder(FINISHED, spent(50, 40))  # the prompt was overestimated by 20
    assert (rest.prompt_tokens, rest.completion_tokens) == (0, 40)
    assert rest.cache_read_tokens == 0 and rest.reasoning_tokens <= rest.completion_tokens
    assert remainder(FINISHED, spent(5, 120)).total_tokens == 5  # the completion, by 20


@given(
    st.integers(0, 10_000),
    st.integers(0, 10_000),
    st.integers(0, 10_000),
    st.integers(0, 10_000),
)
def test_what_was_charged_plus_the_rest_is_the_finished_total_never_less_never_twice(
    prompt: int, completion: int, charged_prompt: int, charged_completion: int
) -> None:
    finished = Usage(prompt, completion, reasoning_tokens=completion // 2)
    rest = remainder(finished, spent(charged_prompt, charged_completion))
    assert min(rest.prompt_tokens, rest.completion_tokens, rest.reasoning_tokens) >= 0
    assert rest.reasoning_tokens <= rest.completion_tokens
    already = charged_prompt + charged_completion
    assert already + rest.total_tokens == max(finished.total_tokens, already)
