"""What a background response is charged, without a server: which requests are fetched, charged
later or not at all, and what the usage tap reads of a queued or a fetched answer (through a
gateway: tests/app/test_background.py)."""

from __future__ import annotations

import json

import pytest

from proxy.record import Usage
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
