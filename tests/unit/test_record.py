"""The record's request id: the client's own when sane, else a fresh one, unique per process."""

from __future__ import annotations

import os
import re

from proxy.record import Usage, own_request_id

FRESH = re.compile(r"[0-9a-f]{32}")


def test_a_fresh_request_id_is_32_lower_case_hex_digits() -> None:
    ids = {own_request_id(None) for _ in range(1000)}
    assert len(ids) == 1000
    assert all(FRESH.fullmatch(request_id) for request_id in ids)


def test_a_sane_client_request_id_is_kept_and_an_insane_one_replaced() -> None:
    assert own_request_id("my-id-1") == "my-id-1"
    assert FRESH.fullmatch(own_request_id("a\x01b"))
    assert FRESH.fullmatch(own_request_id("x" * 201))


def test_a_forked_worker_draws_other_request_ids_than_its_parent() -> None:
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # a worker, as runtime.workers forks it
        os.write(write, "".join(own_request_id(None) for _ in range(3)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    drawn = os.read(read, 4096).decode()
    os.close(read)
    theirs = {drawn[i : i + 32] for i in range(0, len(drawn), 32)}
    ours = {own_request_id(None) for _ in range(3)}
    assert len(theirs) == 3 and not theirs & ours


def test_a_logged_usage_keeps_each_count_within_2_53_and_its_own_type() -> None:
    """Past 2**53 no JSON reader keeps an integer exact, nor INT64 columns one past 2**63:
    each count is clamped there, the seconds (a float) to a float."""
    usage = Usage(5, 2**64 - 1, input_audio_seconds=1e300).as_dict()
    assert usage["prompt_tokens"] == 5
    assert usage["completion_tokens"] == usage["total_tokens"] == 2**53
    assert type(usage["input_audio_seconds"]) is float
    assert usage["input_audio_seconds"] == 2.0**53
    assert usage["estimated"] is False
