"""The SSE line reader: CRLF, LF and CR end a line, wherever the chunks are cut."""

from __future__ import annotations

import itertools
import re

from hypothesis import given
from hypothesis import strategies as st

from proxy.usage.sse_lines import LineReader

_LINE_END = re.compile(rb"\r\n|\r|\n")


def spec_lines(stream: bytes) -> tuple[list[bytes], bytes]:
    """The SSE specification's reading of a whole stream: its lines and an unfinished rest."""
    pieces = _LINE_END.split(stream)
    return pieces[:-1], pieces[-1]


def read(chunks: list[bytes]) -> tuple[list[bytes], bytes]:
    reader = LineReader()
    lines = [bytes(line) for chunk in chunks for line in reader.feed(chunk)]
    return lines, reader.rest()


def read_raw(chunks: list[bytes]) -> tuple[list[bytes], bytes]:
    reader = LineReader()
    lines = [bytes(line) for chunk in chunks for line in reader.feed_raw(chunk)]
    return lines, reader.rest()


def cut(stream: bytes, at: list[int]) -> list[bytes]:
    bounds = [0, *sorted(at), len(stream)]
    return [stream[start:end] for start, end in itertools.pairwise(bounds)]


def test_lf_crlf_and_cr_each_end_one_line() -> None:
    stream = b"data: a\ndata: b\r\ndata: c\r\rdata: d"
    assert read([stream]) == ([b"data: a", b"data: b", b"data: c", b""], b"data: d")


def test_a_crlf_cut_between_its_cr_and_its_lf_is_one_line_end() -> None:
    assert read([b"data: a\r", b"\n", b"data: b\r", b"\ndata: c\r\n"]) == (
        [b"data: a", b"data: b", b"data: c"],
        b"",
    )
    # An empty chunk between the CR and the LF changes nothing.
    assert read([b"data: a\r", b"", b"\ndata: b\n"]) == ([b"data: a", b"data: b"], b"")
    # A CR then a CR in the next chunk: two line ends, the second an empty line.
    assert read([b"data: a\r", b"\rdata: b\n"]) == ([b"data: a", b"", b"data: b"], b"")


def test_a_cr_at_a_chunk_end_finishes_its_line_at_once() -> None:
    reader = LineReader()
    assert reader.feed(b"data: a\r") == [b"data: a"]
    assert reader.held_bytes == 0


def test_a_line_over_many_chunks_is_held_until_its_end() -> None:
    reader = LineReader()
    assert reader.feed(b"data: ") == []
    assert reader.feed(b"x" * 10) == []
    assert reader.held_bytes == 16
    assert reader.feed(b"y\n\n") == [b"data: " + b"x" * 10 + b"y", b""]
    assert reader.held_bytes == 0


def test_raw_lines_keep_every_byte_and_give_a_line_ending_with_a_cr_at_once() -> None:
    reader = LineReader()
    assert reader.feed_raw(b"data: a\r") == [b"data: a\r"]  # not held for a LF to come
    assert reader.feed_raw(b"\ndata: b\r") == [b"\n", b"data: b\r"]  # the CRLF's rest, alone
    assert reader.feed_raw(b"data: c\n") == [b"data: c\n"]
    assert reader.rest() == b""


@given(
    st.lists(st.sampled_from([b"data: x", b"a", b"\r", b"\n", b"\r\n", b":", b"", b" "])),
    st.lists(st.integers(min_value=0, max_value=200), max_size=6),
)
def test_any_stream_cut_anywhere_reads_as_the_specification_says(
    parts: list[bytes], at: list[int]
) -> None:
    stream = b"".join(parts)
    chunks = cut(stream, [min(point, len(stream)) for point in at])
    lines, rest = spec_lines(stream)
    assert read(chunks) == (lines, rest)
    raw, raw_rest = read_raw(chunks)
    assert b"".join(raw) + raw_rest == stream  # every byte, in order, once
    # Raw, a CRLF cut between two chunks comes as its line (with the CR), then its LF alone.
    joined = [bytes(line) for line in raw]
    for index in range(len(joined) - 1, 0, -1):
        if joined[index] == b"\n" and joined[index - 1].endswith(b"\r"):
            joined[index - 1] += joined.pop(index)
    assert [_LINE_END.sub(b"", line) for line in joined] == lines


def test_every_single_cut_of_a_crlf_stream_gives_the_same_lines() -> None:
    stream = b"event: x\r\ndata: 1\r\n\r\ndata: 2\r\r\ndata: 3\n"
    whole = read([stream])
    for point in range(len(stream) + 1):
        assert read(cut(stream, [point])) == whole, point
    assert read([bytes([byte]) for byte in stream]) == whole
