"""Operator lines through a thread: a pipe nobody reads never blocks the caller."""

from __future__ import annotations

import logging
import os
import time

from proxy.observe.notices import Notices


def test_a_full_pipe_neither_blocks_saying_nor_closing_and_the_overflow_is_counted() -> None:
    reader, writer = os.pipe()
    notices = Notices(capacity=10)
    os.set_blocking(writer, False)
    try:
        while True:  # fill the pipe: nobody reads it
            os.write(writer, b"x" * 4096)
    except BlockingIOError:
        os.set_blocking(writer, True)
    try:
        notices.start()
        started = time.monotonic()
        for n in range(10_000):  # 1 MB of lines for a pipe that holds 64 KiB
            notices.say(f"line {n} " + "x" * 100, writer)
        assert time.monotonic() - started < 1.0
        assert notices.dropped > 9_000
        started = time.monotonic()
        assert notices.close(0.2) is False  # the writer is stuck: given up, not waited for
        assert time.monotonic() - started < 1.0
    finally:
        os.close(reader)  # the stuck write fails (EPIPE), and so does each line left
        assert notices.close(5.0) is True  # the thread ends before its descriptor closes
        os.close(writer)


def test_lines_and_log_records_are_written_in_order_and_close_flushes_them() -> None:
    reader, writer = os.pipe()
    notices = Notices()
    notices.start()
    notices.say("first", writer)
    notices.say("second", writer)
    assert notices.close(5.0) is True
    os.close(writer)
    with os.fdopen(reader) as lines:
        assert lines.read() == "first\nsecond\n"


def test_install_routes_logging_through_the_queue() -> None:
    root = logging.getLogger()
    before = root.handlers[:]
    notices = Notices()
    try:
        notices.install()
        logging.getLogger("llm_gateway").info("keys reloaded")
        assert notices._queue.qsize() == 1  # queued for stderr, not written on this thread
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        for handler in before:
            root.addHandler(handler)
