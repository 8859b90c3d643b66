"""Masking a real key the provider echoes in a body: whole, compressed, or cut anywhere."""

from __future__ import annotations

import gzip

from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy.relay.echoes import StreamMask, masked, masked_whole, searched

KEY = "sk-real-openai-0123456789abcdef"
OTHER = "sk-ant-real-anthropic-fedcba9876543210"
SECRETS = searched((KEY, OTHER))
BODY = (
    b'{"error": {"message": "Incorrect API key provided: ' + KEY.encode() + b'", "code": 1}}\n'
    b"data: sss" + OTHER.encode() + b"sk-real-" + b"\n\n"
)


def streamed(chunks: list[bytes]) -> bytes:
    mask = StreamMask(SECRETS)
    return b"".join(mask(chunk) for chunk in chunks) + mask.rest()


def test_each_key_is_masked_by_as_many_bytes() -> None:
    out = masked(BODY, SECRETS)
    assert len(out) == len(BODY)
    assert KEY.encode() not in out and OTHER.encode() not in out
    assert b"[redacted]" in out and out.endswith(b"sk-real-\n\n")


def test_short_placeholder_keys_are_not_searched() -> None:
    assert searched(("EMPTY", "dummy", KEY)) == (KEY.encode(),)


def test_a_key_cut_at_any_two_places_is_masked_and_nothing_else_changes() -> None:
    whole = masked(BODY, SECRETS)
    for first in range(len(BODY) + 1):
        for second in range(first, len(BODY) + 1, 7):
            chunks = [BODY[:first], BODY[first:second], BODY[second:]]
            assert streamed(chunks) == whole, (first, second)


@given(st.lists(st.integers(min_value=0, max_value=len(BODY)), max_size=12))
def test_a_key_cut_anywhere_is_masked(cuts: list[int]) -> None:
    points = [0, *sorted(cuts), len(BODY)]
    chunks = [BODY[a:b] for a, b in zip(points, points[1:], strict=False)]
    assert streamed(chunks) == masked(BODY, SECRETS)


def test_an_event_stream_is_never_held_back() -> None:
    mask = StreamMask(SECRETS)
    event = b'data: {"choices": [{"delta": {"content": "sk-real-"}}]}\n\n'
    assert mask(event) == event


def test_a_compressed_error_carrying_a_key_goes_out_decoded_and_masked() -> None:
    headers = CIMultiDict({"Content-Encoding": "gzip", "Content-Length": "99"})
    out = masked_whole(gzip.compress(BODY), 401, headers, SECRETS)
    assert out == masked(BODY, SECRETS)
    assert "content-encoding" not in headers and "content-length" not in headers


def test_a_compressed_answer_without_a_key_or_a_success_passes_as_it_came() -> None:
    clean, success = gzip.compress(b'{"error": "no key here"}'), gzip.compress(BODY)
    headers = CIMultiDict({"Content-Encoding": "gzip"})
    assert masked_whole(clean, 401, headers, SECRETS) == clean
    assert masked_whole(success, 200, headers, SECRETS) == success
    assert masked_whole(b"\x1f\x8bnot gzip", 500, headers, SECRETS) == b"\x1f\x8bnot gzip"
    assert headers["content-encoding"] == "gzip"
