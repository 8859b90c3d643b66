"""The provider's (or the client's) silence on a response body: STREAM_IDLE_TIMEOUT, for every
answer at once on one timer.

`asyncio.timeout` per answer arms a timer handle on every request, cancels it at the end and
moves it as chunks come: several microseconds a request. Here an answer being relayed only
notes when it last moved (`Watch.moved`, one clock read a chunk), and one timer for all of
them (`Silences`) wakes every IDLE_SLACK of the timeout and cuts those silent for the whole
timeout: it cancels their task, as `asyncio.timeout` does, and the watch turns that
cancellation into TimeoutError where the answer is relayed. So a silence is cut after
between 1 and 1 + IDLE_SLACK times the timeout, never before. The timer stops when no answer
is watched, and starts again with the next.

While a chunk goes to the client (`Watch.sending`), the silence is the client's, and a
client that takes any of it moves: one write of a large chunk (hundreds of KiB) to a client
on a slow link can take longer than the timeout while it never stops reading. The sweep
reads how much of the write still waits in the client's transport (as aiohttp's upload
progress does): less than at the sweep before is movement, dated at that sweep (the
client may have taken its last byte up to one period earlier, so such a silence is cut
within 1 + 2 × IDLE_SLACK times the timeout, never before). A chunk costs no more than
marking when its write starts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType

# The timer wakes this share of the timeout after the last time: how late past the timeout
# a silence may be cut.
IDLE_SLACK = 0.1


class Watch:
    """One answer's silence, while it is relayed: `with silences.watch() as watch:`.

    Inside, a TimeoutError comes up in place of the cancellation when the silence was cut.
    """

    __slots__ = (
        "_cancelling",
        "_clock",
        "_expired",
        "_task",
        "_transport",
        "_unsent",
        "_watches",
        "is_writing",
        "last",
    )

    def __init__(
        self,
        watches: set[Watch],
        task: asyncio.Task[object],
        clock: Callable[[], float],
        transport: asyncio.WriteTransport | None = None,
    ) -> None:
        self._watches = watches
        self._task = task
        self._clock = clock
        self._cancelling = task.cancelling()
        self._expired = False
        self._transport = transport  # the client's: what of a write it has not taken yet
        self._unsent = -1  # what the sweep saw of it last (-1: not yet, in this write)
        self.is_writing = False  # a chunk is going to the client: a silence is the client's
        self.last = clock()  # the loop's time when the answer last moved (read by the sweep)

    def moved(self) -> None:
        """A chunk came (or went): the silence starts again (the provider's, if any)."""
        self.last = self._clock()
        self.is_writing = False

    def sending(self) -> None:
        """A chunk came and goes to the client now: the silence starts again, and until
        `moved` it is the client's, which moves as it takes any of the chunk."""
        self.last = self._clock()
        self.is_writing = True
        self._unsent = -1

    def took_some(self) -> bool:
        """The client took some of the write since the sweep before (the sweep's)."""
        transport = self._transport
        if transport is None:
            return False
        unsent = transport.get_write_buffer_size()
        seen, self._unsent = self._unsent, unsent
        return unsent < seen

    def cut(self) -> None:
        """The silence lasted the timeout: cancel the task (the sweep's)."""
        self._expired = True
        self._task.cancel()

    def __enter__(self) -> Watch:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._watches.discard(self)
        # As asyncio.timeout: the cancellation was ours only if no one else's is pending.
        if self._expired and self._task.uncancel() <= self._cancelling:
            if kind is asyncio.CancelledError:
                raise TimeoutError from error


class Silences:
    """Every answer being relayed, and the one timer that cuts those silent for `idle` seconds."""

    def __init__(self, idle: float, slack: float = IDLE_SLACK) -> None:
        self.idle = idle
        self._period = idle * slack
        self._watches: set[Watch] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def watch(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        transport: asyncio.WriteTransport | None = None,
    ) -> Watch:
        """Watch the current task's answer from now on (arming the timer if it sleeps).

        `loop`: the running loop, when the caller has it (asking costs a getpid() call).
        `transport`: the client's, whose writes the sweep follows (`Watch.sending`)."""
        if loop is None:
            loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        assert task is not None, "an answer is relayed in a task"
        watch = Watch(self._watches, task, loop.time, transport)
        self._watches.add(watch)
        if self._timer is None or self._loop is not loop:
            self._loop = loop
            self._timer = loop.call_at(watch.last + self._period, self._wake)
        return watch

    def sweep(self, now: float) -> None:
        """Cut every answer silent since `now - idle` or before; a client that took some of
        a write since the sweep before moved now."""
        since = now - self.idle
        silent = []
        for watch in self._watches:
            if watch.is_writing and watch.took_some():
                watch.last = now
            elif watch.last <= since:
                silent.append(watch)
        for watch in silent:
            self._watches.discard(watch)
            watch.cut()

    def _wake(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        self.sweep(now)
        self._timer = loop.call_at(now + self._period, self._wake) if self._watches else None
