"""Lines for the operator (stdout, stderr), written by a thread so they never block the loop.

A `print` to stdout on the event loop waits as long as the pipe behind it is full: a log
collector that stops reading stalled every request, and SIGTERM's own "draining" line kept
the gateway up until something killed it. Here a line is queued in a bounded queue and a
daemon thread writes it; when the queue is full the line is dropped and counted, never
waited for. `handler` routes Python logging (the gateway's warnings, aiohttp's errors) the
same way, so nothing the process says to its operator can stall it.

`close` writes what is queued within a bound and gives up after it: a stuck pipe keeps
the last lines, not the process. One `Notices` per process: the thread does not survive a
fork, so each worker starts its own (`runtime.server.serve`).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time

STDOUT_FILENO, STDERR_FILENO = 1, 2
CAPACITY = 1000  # lines waiting for a stuck pipe; the rest are dropped
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Notices:
    """A bounded queue of operator lines and the thread that writes them."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self._queue: queue.Queue[tuple[int, bytes] | None] = queue.Queue(capacity)
        self._thread: threading.Thread | None = None
        self.dropped = 0  # lines the queue had no room for

    def start(self) -> None:
        self._thread = threading.Thread(target=self._write, name="notices", daemon=True)
        self._thread.start()

    def say(self, line: str, fd: int = STDOUT_FILENO) -> None:
        """Queue one line for `fd`; never blocks: dropped (and counted) when the queue is full."""
        try:
            self._queue.put_nowait((fd, (line + "\n").encode(errors="replace")))
        except queue.Full:
            self.dropped += 1

    def install(self) -> None:
        """Route this process's logging through the queue (to stderr), in place of its handlers.

        The gateway's own logger says what an operator needs at INFO (a reload, a reopened
        log file); other libraries stay at the root's level.
        """
        root = logging.getLogger()
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        handler = _Handler(self, logging.INFO)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
        logging.getLogger("llm_gateway").setLevel(logging.INFO)

    def close(self, timeout_seconds: float) -> bool:
        """Write what is queued, within `timeout_seconds`; False if the writer is stuck."""
        thread = self._thread
        if thread is None:
            return True
        deadline = time.monotonic() + timeout_seconds
        try:
            self._queue.put(None, timeout=timeout_seconds)
        except queue.Full:
            return False
        thread.join(max(0.0, deadline - time.monotonic()))
        return not thread.is_alive()

    def _write(self) -> None:
        while (item := self._queue.get()) is not None:
            fd, data = item
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(fd, view) :]
            except OSError:
                pass  # a closed pipe: the operator is not listening; nothing else to tell


class _Handler(logging.Handler):
    def __init__(self, notices: Notices, level: int) -> None:
        super().__init__(level)
        self._notices = notices

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # a record that cannot format must not raise into the caller
            line = f"{record.levelname} {record.name}: {record.msg!r}"
        self._notices.say(line, STDERR_FILENO)
