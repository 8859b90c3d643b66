"""Running the gateway: one process, or WORKERS processes sharing one port, kept at WORKERS.

With several workers, each is a forked copy with its own event loop and its own socket on
the same port (SO_REUSEPORT: the kernel spreads connections). The parent only supervises:

- SIGTERM/SIGINT: forwarded once to every worker as SIGTERM; the parent waits while they
  drain and exits with the first failure's code (0 when every worker drained).
- SIGHUP: forwarded to every worker, where the app reloads keys.json; never fatal. A
  worker that asks for it (its admin API changed keys.json) waits until each other worker
  has heard it (`Siblings`: a count per worker in shared memory).
- SIGUSR1: forwarded to every worker, where the app drops the cache entries another worker's
  admin API dropped (caches in memory: each worker has its own). The prefixes dropped go
  through shared memory (`Drops`), and the worker that dropped waits until each other one
  has dropped them too, as for SIGHUP.
- A worker that dies (a crash, an OOM kill, kill -9) is replaced at once; the others and
  their connections are untouched, and its live gauges leave the metrics sum
  (`forget_worker`). A worker that dies before it listens failed to start: after
  START_ATTEMPTS such failures in a row the gateway stops, with one line. A worker that
  refuses to start (exit 2, a port in use: it said why) stops the gateway at once, since
  the next one would be refused the same way.

Workers run in their own process group, so a Ctrl-C in a terminal reaches them once,
through the parent, and not twice. A worker whose parent died (even by SIGKILL) drains
and exits by itself, and the last one out removes the metrics directory the parent made.
Their metrics meet in one directory (prometheus-client's multiprocess mode), so `/metrics`
on any worker reports the sum; quotas meet in Redis (settings refuse several workers
without it).

Why this and not gunicorn with aiohttp's `GunicornUVLoopWebWorker`,
which respawns workers too: gunicorn's arbiter owns SIGHUP and answers it by re-forking
every worker, where the gateway reloads keys.json inside running workers so streams in
flight are never cut; its worker drains through `AppRunner.cleanup` with
`shutdown_timeout` at 95% of its grace, which aiohttp waits twice, so the arbiter kills
workers with streams before their log lines are written; and its
own settings (bind, workers, timeouts, header limits) and logging would sit beside
`Settings`, with the one-line refusals and exit code 2 to rebuild in its hooks. What the
gateway needs from a process manager is the ~100 lines below.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.context import ForkProcess
from multiprocessing.synchronize import Event
from types import FrameType

from proxy.app import build_app
from proxy.keys.keys import KeyRing
from proxy.observe.worker_metrics import forget_worker
from proxy.runtime.server import CannotListen, check_port_free, serve
from proxy.settings import SettingError, Settings

START_ATTEMPTS = 3  # failed starts in a row of one worker before the gateway gives up
# How long a worker that asked the others to reload keys.json waits for each to hear it (one
# that died is replaced meanwhile, and reads the file at its start), and how often it looks.
HEARD_WITHIN_SECONDS = 1.0
HEARD_POLL_SECONDS = 0.001
EXIT_REFUSED = 2  # the gateway refused to start (and said why): a bad setting, keys, a port
_FORWARDED = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1}
# Cache drops told between workers: the last DROP_SLOTS prefixes (a key's or a scope's: 27
# characters) are kept; a worker that missed more drops everything.
DROP_SLOTS = 64
DROP_BYTES = 64


def run(settings: Settings, key_ring: KeyRing) -> int:
    """Serve in this process, or supervise WORKERS processes. The exit code.

    Raises SettingError for a PROMETHEUS_MULTIPROC_DIR the workers cannot use."""
    if settings.worker_count == 1:
        serve(settings, build_app(settings, key_ring))
        return 0
    check_port_free(settings)  # before workers share it: a port in use refuses the start
    chosen = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    metrics_dir = chosen or tempfile.mkdtemp(prefix="llm-gateway-metrics-")
    try:
        _empty(metrics_dir)  # files of an earlier run would be summed in
    except OSError as error:  # a chosen directory that cannot be made, read or cleared
        raise SettingError(
            f"PROMETHEUS_MULTIPROC_DIR: cannot keep the workers' metrics in {metrics_dir}: "
            f"{error.strerror or error}"
        ) from None
    workers = Workers(settings, key_ring, metrics_dir, owns_metrics_dir=not chosen)
    signal.signal(signal.SIGTERM, workers.stop)
    signal.signal(signal.SIGINT, workers.stop)
    signal.signal(signal.SIGHUP, workers.forward)
    signal.signal(signal.SIGUSR1, workers.forward)
    try:
        return workers.run()
    finally:
        if not chosen:
            shutil.rmtree(metrics_dir, ignore_errors=True)


class Drops:
    """The cache drops told between the workers, in memory they all share, under one lock:
    a ring of the last DROP_SLOTS prefixes dropped, the serial of the last, and per worker
    (by slot) the serial up to which it has made them."""

    def __init__(self, context: multiprocessing.context.ForkContext, worker_count: int) -> None:
        self.lock = context.Lock()
        self.serial = context.RawValue("Q", 0)
        self.prefixes = context.RawArray("c", DROP_SLOTS * DROP_BYTES)
        self.heard = context.RawArray("Q", worker_count)

    def put(self, prefix: str) -> int:
        """Its serial."""
        encoded = prefix.encode()
        assert len(encoded) <= DROP_BYTES, "a cache scope's prefix is a digest: short"
        with self.lock:
            serial: int = self.serial.value + 1
            at = serial % DROP_SLOTS * DROP_BYTES
            self.prefixes[at : at + DROP_BYTES] = encoded.ljust(DROP_BYTES, b"\0")
            self.serial.value = serial
        return serial

    def since(self, seen: int) -> tuple[int, list[str] | None]:
        """The serial of the last drop, and the prefixes dropped after `seen` (None: more
        than the ring keeps, so drop everything)."""
        with self.lock:
            serial: int = self.serial.value
            if serial - seen > DROP_SLOTS:
                return serial, None
            found = []
            for n in range(seen + 1, serial + 1):
                at = n % DROP_SLOTS * DROP_BYTES
                found.append(bytes(self.prefixes[at : at + DROP_BYTES]).rstrip(b"\0").decode())
        return serial, found


@dataclass(frozen=True, slots=True)
class Worker:
    """One worker process, and the event it sets once it listens."""

    process: ForkProcess
    started: Event


class Workers:
    """The worker processes of one gateway: started, replaced, signalled, waited for."""

    def __init__(
        self, settings: Settings, key_ring: KeyRing, metrics_dir: str, owns_metrics_dir: bool
    ) -> None:
        self._settings, self._key_ring = settings, key_ring
        self._metrics_dir, self._owns_metrics_dir = metrics_dir, owns_metrics_dir
        self._context = multiprocessing.get_context("fork")
        # The SIGHUPs each worker (by slot) has heard, shared by all: `Siblings`.
        self._heard = self._context.RawArray("Q", settings.worker_count)
        self._drops = Drops(self._context, settings.worker_count)  # cache drops: `Siblings`
        self._slots: list[Worker | None] = []  # None: ended, not replaced (stopping)
        self._failed_starts = [0] * settings.worker_count
        self._is_stopping = False
        self._code = 0

    def run(self) -> int:
        """Start every worker, replace those that die until told to stop; the exit code."""
        self._slots = [None] * self._settings.worker_count
        for slot in range(self._settings.worker_count):
            self._start(slot)
        while live := [worker.process.sentinel for worker in self._slots if worker is not None]:
            multiprocessing.connection.wait(live)
            for slot, worker in enumerate(self._slots):
                if worker is not None and not worker.process.is_alive():
                    self._slots[slot] = None
                    self._ended(slot, worker)
        return self._code

    def stop(self, signum: int = signal.SIGTERM, frame: FrameType | None = None) -> None:
        """Ask every worker once to drain and exit."""
        if not self._is_stopping:
            self._is_stopping = True
            self.forward(signal.SIGTERM)

    def forward(self, signum: int, frame: FrameType | None = None) -> None:
        """Pass a signal on to every live worker."""
        for worker in self._slots:
            if worker is not None and worker.process.pid is not None:
                try:
                    os.kill(worker.process.pid, signum)
                except ProcessLookupError:
                    pass  # reaped a moment ago: `run` is about to empty its slot

    def _start(self, slot: int) -> None:
        started = self._context.Event()
        process = self._context.Process(
            target=_work,
            args=(self._settings, self._key_ring, self._metrics_dir, self._owns_metrics_dir),
            kwargs={"started": started, "slot": slot, "heard": self._heard, "drops": self._drops},
            name=f"worker-{slot}",
        )
        # The child runs the parent's handlers until it installs its own: hold the signals
        # across the fork (the child takes them once it is ready for them), and until the
        # new worker is in its slot, where `forward` finds it.
        signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
        try:
            process.start()
            self._slots[slot] = Worker(process, started)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)

    def _ended(self, slot: int, worker: Worker) -> None:
        pid, code = worker.process.pid, worker.process.exitcode
        assert pid is not None and code is not None
        forget_worker(self._metrics_dir, pid)
        if self._is_stopping:
            self._code = self._code or max(code, 0)
            return
        if code == EXIT_REFUSED:
            self._code = EXIT_REFUSED
            self.stop()
            return
        failed = 0 if worker.started.is_set() else self._failed_starts[slot] + 1
        self._failed_starts[slot] = failed
        if failed >= START_ATTEMPTS:
            say(f"a worker failed to start {failed} times in a row ({_why(code)}); stopping")
            self._code = 1
            self.stop()
            return
        say(f"worker {pid} {_why(code)}; starting another")
        self._start(slot)


def _work(
    settings: Settings,
    key_ring: KeyRing,
    metrics_dir: str,
    owns_metrics_dir: bool,
    started: Event,
    slot: int,
    heard: ctypes.Array[ctypes.c_uint64],
    drops: Drops,
) -> None:
    os.setpgrp()  # signals come through the parent, once
    parent = os.getppid()
    threading.Thread(target=_stop_when_orphaned, args=(parent,), daemon=True).start()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # until the cache takes it (SIG_DFL kills)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
    try:
        serve(
            settings,
            build_app(settings, key_ring, metrics_dir, Siblings(parent, slot, heard, drops)),
            label=f" (worker {os.getpid()})",
            reuse_port=True,
            on_listening=started.set,
        )
    except CannotListen as error:
        say(str(error))
        raise SystemExit(EXIT_REFUSED) from None
    if os.getppid() != parent and owns_metrics_dir:
        _leave(metrics_dir)


class Siblings:
    """A worker's view of the others, for keys.json (`reload.Siblings`): SIGHUP through the
    parent, and a count per worker (`heard`, by slot, in memory they all share) of the
    SIGHUPs it has heard, each adding to its own; and for cache drops (`cache.Others`):
    SIGUSR1 through the parent, the prefixes in `drops`."""

    def __init__(
        self, parent: int, slot: int, heard: ctypes.Array[ctypes.c_uint64], drops: Drops
    ) -> None:
        self._parent, self._slot, self._heard = parent, slot, heard
        self._drops = drops
        self._seen = drops.serial.value  # started now: its cache holds nothing dropped before

    async def reload(self) -> None:
        before = self._heard[:]
        await self._tell(
            signal.SIGHUP,
            lambda: any(c <= before[s] for s, c in enumerate(self._heard) if s != self._slot),
        )

    def heard(self) -> None:
        self._heard[self._slot] += 1

    async def drop(self, prefix: str) -> None:
        serial, made = self._drops.put(prefix), self._drops.heard
        await self._tell(
            signal.SIGUSR1,
            lambda: any(upto < serial for s, upto in enumerate(made) if s != self._slot),
        )

    def dropped(self) -> tuple[int, list[str] | None]:
        serial, found = self._drops.since(self._seen)
        self._seen = serial
        return serial, found

    def made_drops(self, upto: int) -> None:
        made = self._drops.heard
        made[self._slot] = max(made[self._slot], upto)

    async def _tell(self, signum: int, waiting: Callable[[], bool]) -> None:
        """Signal every worker through the parent; return once no other one is `waiting`,
        or after HEARD_WITHIN_SECONDS (one that died, being replaced)."""
        if os.getppid() != self._parent:  # an orphan drains and exits; its pid may be reused
            return
        os.kill(self._parent, signum)  # the parent passes it to every worker
        deadline = time.monotonic() + HEARD_WITHIN_SECONDS
        while time.monotonic() < deadline and waiting():
            await asyncio.sleep(HEARD_POLL_SECONDS)


def _stop_when_orphaned(parent: int) -> None:
    """A worker whose parent died (even by SIGKILL) drains and exits instead of lingering."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def _leave(metrics_dir: str) -> None:
    """An orphan's last step: drop its files and those of dead workers; the last one out
    removes the directory (rmdir fails while a live worker's files are in it)."""
    try:
        names = os.listdir(metrics_dir)
    except FileNotFoundError:
        return  # another worker removed it already
    for name in names:
        pid = name.removesuffix(".db").rsplit("_", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _is_alive(int(pid))):
            with contextlib.suppress(FileNotFoundError):  # another worker was first
                os.remove(os.path.join(metrics_dir, name))
    try:
        os.rmdir(metrics_dir)
    except OSError as error:
        # ENOTEMPTY: a live worker's files are still there, and it removes the directory last
        if error.errno not in (errno.ENOTEMPTY, errno.ENOENT):
            raise


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _why(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def say(line: str) -> None:
    """One line for the operator on stderr, before or outside a serving loop."""
    print(f"llm-gateway: {line}", file=sys.stderr, flush=True)


def _empty(directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name.endswith(".db"):
            os.remove(os.path.join(directory, name))
