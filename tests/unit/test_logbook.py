"""The interaction log: one valid JSON line per record, off the request path, never lost."""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.observe.logbook import Logbook, rfc3339
from proxy.record import Record, Usage
from tests.support.polling import until

RFC3339_MILLIS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def finished_record(n: int = 0, **changes: object) -> Record:
    """A record as relay leaves it after a successful call."""
    record = Record.begin(f"req-{n}", "POST", "/v1/chat/completions")
    record.key, record.provider, record.model = "user1", "openai", "gpt-4o-mini"
    record.status, record.usage = 200, Usage(12, 34)
    record.ttft_ms, record.duration_ms = 123.456, 789.04
    record.request_body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user"}]}'
    record.response_text = '{"choices": []}'
    for name, value in changes.items():
        setattr(record, name, value)
    return record


class Calls:
    """Counts calls to the on_write_error callback, from any thread."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self.count += 1


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


async def test_500_records_are_500_valid_json_lines_after_close(tmp_path: Path) -> None:
    path = tmp_path / "interactions.jsonl"
    logbook = Logbook(str(path), log_bodies=False, on_write_error=Calls())
    logbook.open()
    for n in range(500):
        logbook.write(finished_record(n))
    await logbook.close()

    lines = lines_of(path)
    assert len(lines) == 500
    assert [line["request_id"] for line in lines] == [f"req-{n}" for n in range(500)]


async def test_a_line_has_the_spec_fields_and_types(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    logbook = Logbook(str(path), log_bodies=False, on_write_error=Calls())
    logbook.open()
    logbook.write(finished_record(is_stream=True))
    await logbook.close()

    [line] = lines_of(path)
    assert list(line) == [
        "timestamp", "request_id", "key", "team", "provider", "method", "path", "model",
        "stream", "status", "duration_ms", "ttft_ms", "usage", "cost_usd", "cache",
    ]  # fmt: skip
    assert RFC3339_MILLIS.match(line["timestamp"])
    assert line["request_id"] == "req-0"
    assert (line["key"], line["provider"], line["model"]) == ("user1", "openai", "gpt-4o-mini")
    assert (line["method"], line["path"]) == ("POST", "/v1/chat/completions")
    assert line["stream"] is True
    assert line["status"] == 200
    assert (line["duration_ms"], line["ttft_ms"]) == (789.0, 123.5)
    assert line["usage"] == {
        "prompt_tokens": 12,
        "completion_tokens": 34,
        "total_tokens": 46,
        "cache_read_tokens": 0,
        "cache_write_tokens": 0,
        "input_audio_tokens": 0,
        "reasoning_tokens": 0,
        "output_audio_tokens": 0,
        "estimated": False,
    }
    assert line["cost_usd"] is None
    assert line["cache"] is None  # the key has no cache


async def test_a_refused_request_has_its_error_and_null_usage_and_timings(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    logbook = Logbook(str(path), log_bodies=False, on_write_error=Calls())
    logbook.open()
    logbook.write(finished_record(status=429, error="quota exceeded", usage=None, ttft_ms=None))
    logbook.write(finished_record(1))
    await logbook.close()

    refused, served = lines_of(path)
    assert (refused["status"], refused["error"]) == (429, "quota exceeded")
    assert refused["usage"] is None and refused["ttft_ms"] is None
    assert "error" not in served


def test_timestamps_are_rfc3339_utc_with_milliseconds() -> None:
    assert rfc3339(1795454852.1239) == "2026-11-23T17:27:32.123Z"
    assert rfc3339(0.0) == "1970-01-01T00:00:00.000Z"


async def test_lines_of_one_second_and_of_the_next_carry_their_own_timestamps(
    tmp_path: Path,
) -> None:
    # The writer formats each second once: a line of the next second (or an earlier one,
    # the clock set back) must not keep the previous second's text.
    path = tmp_path / "log.jsonl"
    logbook = Logbook(str(path), log_bodies=False, on_write_error=Calls())
    logbook.open()
    stamps = [1795454852.1239, 1795454852.999, 1795454853.0, 1795454853.5, 1795454800.25]
    for n, stamp in enumerate(stamps):
        logbook.write(finished_record(n, timestamp=stamp))
    await logbook.close()
    assert [line["timestamp"] for line in lines_of(path)] == [rfc3339(t) for t in stamps]


async def test_without_log_bodies_no_body_is_written(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    logbook = Logbook(str(path), log_bodies=False, on_write_error=Calls())
    logbook.open()
    logbook.write(finished_record())
    await logbook.close()

    [line] = lines_of(path)
    assert "request" not in line and "response" not in line
    assert b"messages" not in path.read_bytes()


async def test_log_bodies_logs_json_request_and_response_as_json_and_the_rest_as_text(
    tmp_path: Path,
) -> None:
    path = tmp_path / "log.jsonl"
    logbook = Logbook(str(path), log_bodies=True, on_write_error=Calls())
    logbook.open()
    logbook.write(finished_record())
    logbook.write(finished_record(1, request_body=b"plain text", response_text="data: x\n\n"))
    logbook.write(finished_record(2, request_body=b"", response_text=None))
    await logbook.close()

    as_json, as_text, empty = lines_of(path)
    assert as_json["request"] == {"model": "gpt-4o-mini", "messages": [{"role": "user"}]}
    assert as_json["response"] == {"choices": []}
    assert as_text["request"] == "plain text"
    assert as_text["response"] == "data: x\n\n"
    assert (empty["request"], empty["response"]) == (None, None)


FORM_TYPE = "multipart/form-data; boundary=b0undary"


def form(*parts: tuple[str, bytes]) -> bytes:
    """A multipart body of these (Content-Disposition parameters, content) parts."""
    body = b"".join(
        b"--b0undary\r\nContent-Disposition: form-data; "
        + head.encode()
        + b"\r\n\r\n"
        + content
        + b"\r\n"
        for head, content in parts
    )
    return body + b"--b0undary--\r\n"


async def test_bodies_that_are_no_json_are_logged_as_what_an_operator_can_read(
    tmp_path: Path,
) -> None:
    path = tmp_path / "log.jsonl"
    real = "sk-real-in-a-form-0123456789"
    logbook = Logbook(str(path), True, Calls(), secrets=lambda: frozenset({real}))
    logbook.open()
    fields = form(
        ('name="image[]"; filename="a.png"', b"\x89PNG\r\n\x1a\n\xff"),
        ('name="image[]"; filename="b.png"', b"\x89PNG"),
        ('name="prompt"', f"a hat, {real}".encode()),
        ('name="api_key"', b"third-party-secret"),
        ('name="api_key"', b"another-secret"),
        ('name="mask"', b"\xff\xfe\x00"),  # bytes sent without a filename
    )
    records = [
        (fields, FORM_TYPE),
        (b"\x00\x01\xff" * 100, "application/octet-stream"),
        (b"\xff\xfe", None),
        (b'{"note": "caf\xe9"}', "application/json"),  # JSON with a stray byte, as ever
        (form(('name="model"', b"x"))[:-10], FORM_TYPE),  # cut short: its text, as ever
        (b"plain words", FORM_TYPE.replace("b0undary", "other")),  # no such form: as text
    ]
    for n, (body, content_type) in enumerate(records):
        logbook.write(finished_record(n, request_body=body, request_type=content_type))
    await logbook.close()

    text = path.read_text()
    assert real not in text and "secret" not in text and "\ufffd\ufffd" not in text
    the_form, binary, untyped, stray, cut, plain = (line["request"] for line in lines_of(path))
    assert the_form == {
        "image[]": [
            {"filename": "a.png", "content_type": None, "bytes": 9},
            {"filename": "b.png", "content_type": None, "bytes": 4},
        ],
        "prompt": "a hat, [redacted]",
        "api_key": ["[redacted]", "[redacted]"],
        "mask": {"filename": None, "content_type": None, "bytes": 3},
    }
    assert binary == {"content_type": "application/octet-stream", "bytes": 300}
    assert untyped == {"content_type": None, "bytes": 2}
    assert stray == {"note": "caf\ufffd"}
    assert cut.startswith("--b0undary\r\n") and plain == "plain words"


async def test_a_body_nested_deeper_than_orjson_writes_leaves_its_line_without_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A body nested 300 levels reads (orjson reads 1024) but does not write again (255):
    # with LOG_BODIES its request's line was lost ("cannot format line: Recursion limit
    # reached"), and with it every count read from the log.
    path = tmp_path / "log.jsonl"
    logbook = Logbook(str(path), log_bodies=True, on_write_error=Calls())
    logbook.open()
    deep = '{"a":' * 300 + "1" + "}" * 300
    logbook.write(finished_record(0, request_body=b'{"metadata": ' + deep.encode() + b"}"))
    logbook.write(finished_record(1, response_text="[" * 300 + "]" * 300))
    # As deep as orjson writes alone, one level too deep inside the line.
    logbook.write(finished_record(2, response_text="[" * 254 + "]" * 254))
    logbook.write(finished_record(3, response_text="[" * 253 + "]" * 253))
    await logbook.close()

    first, second, third, fourth = lines_of(path)
    assert (first["request"], first["response"]) == (None, {"choices": []})
    assert second["request"]["model"] == "gpt-4o-mini" and second["response"] is None
    assert third["response"] is None
    assert orjson.dumps(fourth["response"]) == b"[" * 253 + b"]" * 253
    assert not [record for record in caplog.records if "cannot format" in record.getMessage()]


async def test_stdout_mode_writes_one_line_per_record(capfd: pytest.CaptureFixture[str]) -> None:
    logbook = Logbook(None, log_bodies=False, on_write_error=Calls())
    logbook.open()
    for n in range(20):
        logbook.write(finished_record(n))
    await logbook.close()

    out, err = capfd.readouterr()
    lines = [orjson.loads(line) for line in out.splitlines()]
    assert [line["request_id"] for line in lines] == [f"req-{n}" for n in range(20)]
    assert err == ""
    os.fstat(1)  # stdout is still open: close() leaves it to the process


def test_a_file_that_cannot_be_opened_raises_oserror(tmp_path: Path) -> None:
    logbook = Logbook(str(tmp_path / "missing" / "log.jsonl"), False, on_write_error=Calls())
    with pytest.raises(OSError):
        logbook.open()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
async def test_a_failed_write_calls_back_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    calls = Calls()
    logbook = Logbook("/dev/full", log_bodies=False, on_write_error=calls)
    logbook.open()
    logbook.write(finished_record())
    await until(lambda: calls.count > 0)
    assert calls.count == 1
    (said,) = caplog.records
    assert "logbook: cannot write to /dev/full" in said.getMessage() and said.exc_info is None
    caplog.clear()

    for n in range(3):
        logbook.write(finished_record(n))
    await logbook.close()
    assert calls.count == 4  # every lost line is counted...
    assert caplog.records == []  # ...but said only once


async def test_a_log_whose_directory_is_removed_counts_and_says_its_lost_lines_until_it_returns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: the lines went on into the removed file, where nobody could read them, with
    one warning saying they still went "to the file open before", and no count."""
    folder = tmp_path / "logs"
    folder.mkdir()
    path = folder / "interactions.jsonl"
    calls = Calls()
    logbook = Logbook(str(path), log_bodies=False, on_write_error=calls)
    logbook.open()
    logbook.write(finished_record(0))
    await until(lambda: path.exists() and path.read_bytes().count(b"\n") == 1)
    shutil.rmtree(folder)

    for n in range(1, 4):
        logbook.write(finished_record(n))
    await until(lambda: calls.count == 3)  # every line lost is counted...
    (said,) = caplog.records  # ...and said, once
    assert f"cannot write to {path}: No such file or directory" in said.getMessage()
    caplog.clear()

    folder.mkdir()  # the directory is back: lines reach the file at the path again
    logbook.write(finished_record(4))
    await logbook.close()
    assert [line["request_id"] for line in lines_of(path)] == ["req-4"]
    assert calls.count == 3
    assert [record.getMessage() for record in caplog.records] == [
        f"logbook: lines reach {path} again"
    ]


async def test_a_write_after_close_is_counted_not_raised(tmp_path: Path) -> None:
    calls = Calls()
    logbook = Logbook(str(tmp_path / "log.jsonl"), log_bodies=False, on_write_error=calls)
    logbook.open()
    await logbook.close()
    logbook.write(finished_record())
    assert calls.count == 1


async def test_two_logbooks_appending_to_one_file_never_interleave_lines(tmp_path: Path) -> None:
    # Two instances stand for two worker processes: both append to one file at the same time.
    path = tmp_path / "shared.jsonl"
    books = [Logbook(str(path), log_bodies=True, on_write_error=Calls()) for _ in range(2)]
    for book in books:
        book.open()
    big = "x" * 100_000  # far above PIPE_BUF and a page: interleaving would show
    for n in range(300):
        for which, book in enumerate(books):
            book.write(finished_record(n, request_id=f"{which}-{n}", response_text=big))
    await asyncio.gather(*(book.close() for book in books))

    lines = lines_of(path)
    assert len(lines) == 600
    assert all(line["response"] == big for line in lines)
    assert {line["request_id"] for line in lines} == {
        f"{w}-{n}" for w in (0, 1) for n in range(300)
    }


async def test_a_write_hands_its_line_off_and_writes_nothing_on_the_callers_turn(
    tmp_path: Path,
) -> None:
    # What a write costs the request path is a figure for bench/ (profile_steps.py's "log
    # record" step), not a timed test; what this checks is that it does no I/O of its own.
    path = tmp_path / "log.jsonl"
    logbook = Logbook(str(path), log_bodies=True, on_write_error=Calls())
    logbook.open()
    for n in range(100):
        logbook.write(finished_record(n, request_id=f"r{n}"))
    assert logbook.queued[0] == 100
    assert not path.exists() or path.read_text() == ""
    await logbook.close()
    assert [line["request_id"] for line in lines_of(path)] == [f"r{n}" for n in range(100)]


async def test_close_is_bounded_when_the_writer_is_stuck(caplog: pytest.LogCaptureFixture) -> None:
    reader, writer = os.pipe()
    try:
        # Nobody reads the pipe: the writer blocks once the pipe's buffer is full.
        logbook = Logbook(f"/dev/fd/{writer}", log_bodies=True, on_write_error=Calls())
        logbook.open()
        for n in range(10):
            logbook.write(finished_record(n, response_text="y" * 100_000))
        started = time.monotonic()
        await logbook.close(timeout_seconds=0.3)
        assert time.monotonic() - started < 2
        assert "lines not written" in caplog.text
    finally:
        # Read everything, so the writer's thread ends with the test.
        os.set_blocking(reader, False)
        newlines, deadline = 0, time.monotonic() + 5
        while newlines < 10 and time.monotonic() < deadline:
            try:
                newlines += os.read(reader, 1 << 20).count(b"\n")
            except BlockingIOError:
                await asyncio.sleep(0.01)
        os.close(reader)
        os.close(writer)


async def test_close_waits_for_a_slow_sink_while_it_takes_lines() -> None:
    """Before: close gave any sink 0.5 s, so a collector reading slowly lost what it had
    not read by then, however much of the shutdown's grace was left."""
    reader, writer = os.pipe()
    read = bytearray()

    def read_slowly() -> None:  # about 3 MB a second: 3 MB take about a second
        while chunk := os.read(reader, 32 * 1024):
            read.extend(chunk)
            time.sleep(0.01)

    thread = threading.Thread(target=read_slowly, daemon=True)
    try:
        logbook = Logbook(f"/dev/fd/{writer}", log_bodies=True, on_write_error=Calls())
        logbook.open()
        for n in range(300):
            logbook.write(finished_record(n, response_text="y" * 10_000))
        thread.start()
        await logbook.close(timeout_seconds=20, stall_seconds=2.0)
        assert logbook.queued == (0, 0)  # written before close returned, not given up on
        os.close(writer)
        writer = -1
        await asyncio.to_thread(thread.join, 10)
        assert bytes(read).count(b"\n") == 300
    finally:
        if writer != -1:
            os.close(writer)
        os.close(reader)


async def test_real_keys_are_redacted_from_logged_bodies(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    real, other = "sk-real-echoed-0123456789", "sk-ant-other-9876543210"
    secrets = frozenset({real, other})
    logbook = Logbook(str(path), True, Calls(), secrets=lambda: secrets)
    logbook.open()
    echoed = {"error": {"message": f"Incorrect API key provided: {real}", "code": 401}}
    logbook.write(
        finished_record(
            request_body=b'{"note": "\\u0073k-real-echoed-0123456789"}',
            response_text=orjson.dumps(echoed).decode(),
        )
    )
    logbook.write(
        finished_record(1, request_body=b"key=" + other.encode(), response_text=f"data: {real}\n\n")
    )
    await logbook.close()

    text = path.read_text()
    assert real not in text and other not in text
    as_json, as_text = lines_of(path)
    assert as_json["response"] == {
        "error": {"message": "Incorrect API key provided: [redacted]", "code": 401}
    }
    assert as_text["request"] == "key=[redacted]"
    assert as_text["response"] == "data: [redacted]\n\n"


async def test_a_sink_that_takes_nothing_holds_at_most_the_queue_and_the_rest_is_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reader, writer = os.pipe()
    dropped = Calls()
    try:
        logbook = Logbook(
            f"/dev/fd/{writer}",
            log_bodies=True,
            on_write_error=Calls(),
            on_dropped=dropped,
            max_lines=100,
            max_bytes=10**9,
        )
        logbook.open()
        for n in range(1000):  # 100 KB each: the pipe takes one, nobody reads it
            logbook.write(finished_record(n, response_text="y" * 100_000))
            await asyncio.sleep(0)
        assert logbook.queued[0] <= 100
        assert dropped.count >= 900 - 2  # a line or two is in the pipe, not the queue
        said = [record.getMessage() for record in caplog.records]
        assert len(said) == 1 and "llm_gateway_log_lines_dropped_total" in said[0]
        await logbook.close(timeout_seconds=0.1)
    finally:
        os.close(reader)  # the stuck write fails (EPIPE), and the writer goes through the rest
        await until(lambda: logbook.queued[0] == 0)
        os.close(writer)


async def test_bodies_over_the_queues_bound_leave_the_line_without_them_not_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A healthy file, and bodies that together pass the bound before the writer takes them
    # (several large prompts at once), or alone (a long stream's text): every line is
    # written; those the bound has no room for go without their bodies.
    path = tmp_path / "log.jsonl"
    dropped = Calls()
    logbook = Logbook(
        str(path), log_bodies=True, on_write_error=Calls(), on_dropped=dropped, max_bytes=1000
    )
    logbook.open()
    for n in range(3):
        logbook.write(finished_record(n, request_body=b"x" * 400, response_text="y" * 100))
    logbook.write(finished_record(3, request_body=b"{}", response_text="z" * 5000))
    await logbook.close()

    lines = lines_of(path)
    assert [line["request_id"] for line in lines] == ["req-0", "req-1", "req-2", "req-3"]
    assert dropped.count == 0
    assert [line["response"] for line in lines[:2]] == ["y" * 100] * 2
    assert [(line["request"], line["response"]) for line in lines[2:]] == [(None, None)] * 2
    said = [record.getMessage() for record in caplog.records]
    assert len(said) == 1 and "without their bodies" in said[0], said


@pytest.mark.parametrize("cost", [math.inf, math.nan])
async def test_a_cost_past_what_a_float_holds_is_written_null_never_invalid_json(
    tmp_path: Path, cost: float
) -> None:
    """A price of 1e308 per million tokens (PRICES_FILE takes any finite rate) times a large
    count is inf: written as it was (`"cost_usd":inf`), the line was no JSON, and a reader
    such as jq stopped at it. Not a price anyone can pay: null, as an unpriced request."""
    path = tmp_path / "log.jsonl"
    logbook = Logbook(str(path), log_bodies=False, on_write_error=Calls())
    logbook.open()
    logbook.write(finished_record(cost_usd=cost))
    await logbook.close()

    [line] = lines_of(path)
    assert line["cost_usd"] is None
