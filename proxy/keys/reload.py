"""Reloading keys.json while serving: on SIGHUP, on `POST /admin/reload`, and when it changes.

A reload reads and checks the whole file with the same loader as the start
(`app.load_keys`), in a thread (10,000 keys take about a quarter of a second of CPU: streams
keep flowing meanwhile), then swaps the result into the live `KeyRing` in one step on the event
loop, so no request sees half a file. Reloads run one at a time, in the order they were
asked for, so a slow one can never land after a newer one. A file that does not check
changes nothing: the keys in force keep serving, and one warning (stderr) gives the same
reason the start would have given. With KEYS_STORE=redis keys.json only seeds the store and
no reload is tried (`kept_elsewhere`): SIGHUP still reopens the log (logrotate's signal),
`POST /admin/reload` says why, and neither counts as a failed reload.

What a reload does not disturb: a request in flight holds the `VirtualKey` it
authenticated with, so it finishes under the config it started with (and its tokens are
charged to that key's window); quota windows are keyed by the key's name, so a rotated
secret under the same name keeps its counts, and new limits apply from the next request.
A key or team the swap removes is gone (`on_gone`): what the process keeps of it (windows,
totals, its metric series) is dropped.

With WORKERS, a change made through one worker's admin API reaches the others by SIGHUP
(through the supervisor), and the change is answered once each has heard it (`Siblings`): a
key made a moment ago and presented to another worker while it reloads waits for that
reload (`is_reloading`, `reloaded`) instead of being refused, so a 201 means the key serves
on every worker.

The config in force is named by the digest of the file's bytes and the file's modification
time (`loaded_at`). Both come from the file, not from the moment a process read it, so
every worker that loaded the same file shows the same pair on `/health`. A worker started
later (a replacement for one that died) compares the file with the keys it was forked
with and catches up at start.

Watching (KEYS_FILE_WATCH) polls `os.stat` once a second rather than using inotify: that
needs no library, and an inotify watch on the file misses what matters most here: a
Kubernetes Secret is updated by swapping a `..data` symlink in the mounted directory, and
editors save by renaming a new file over the old one; both replace the inode the watch
was on. The polled signature (resolved path, device, inode, size, mtime, link count) sees
an in-place write, a rename over the file and a symlink swap alike, and a file mounted alone
(Docker's `-v $PWD/keys.json:/app/keys.json`) that was renamed over on the other side (its
links drop to 0: the reload then fails, saying to mount the directory). A change is reloaded once the
signature holds still for one poll, so a file caught half-written is not even tried.

While the thread loads, the event loop comes first: the interpreter's switch interval is
0.5 ms instead of 5 (the loop, waking from its poll with requests to serve, takes the GIL
back from the loading thread within 0.5 ms rather than 5, at every turn, and a request
takes several turns), and the cyclic garbage collector is off (a 10,000-key load allocates
enough for young collections of 8-16 ms each, the GIL held throughout). In a process whose
start objects are frozen (`server.tune_gc`), the new keys are frozen too once loaded, so no
later collection walks them; what the swap replaces is freed by reference counting. Under
load, a 10,000-key reload delayed the slowest request by ~70 ms before this, ~10 ms after
(bench/scale.py --only reload; bench/README.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from typing import Protocol

from proxy.keys.fields import KeysFileError
from proxy.keys.keys import KeyRing
from proxy.quota.tracker import Scope

log = logging.getLogger("llm_gateway")  # in a gateway process: stderr, never blocking

POLL_SECONDS = 1.0
# The longest a key not found waits for a reload under way (10,000 keys load in about a
# second on a busy machine); then it is refused as any unknown key.
RELOADED_WITHIN_SECONDS = 5.0
LOADING_SWITCH_SECONDS = 0.0005  # sys.setswitchinterval while a reload's thread loads

Signature = tuple[str, int, int, int, int, int]


def signature(path: str) -> Signature | None:
    """What identifies the file's current content on disk; None when it cannot be read."""
    try:
        status = os.stat(path)  # follows symlinks: the file a Secret's links lead to
    except OSError:
        return None
    return (
        os.path.realpath(path),
        status.st_dev,
        status.st_ino,
        status.st_size,
        status.st_mtime_ns,
        # 0 once the file was replaced where it comes from but a mount of it alone (Docker's
        # `-v keys.json:…`) keeps the old one: a change, whose reload says why it cannot be.
        status.st_nlink,
    )


def modified_at(path: str) -> str | None:
    """The file's modification time, RFC 3339 UTC; None when it cannot be read."""
    try:
        seconds = os.stat(path).st_mtime
    except OSError:
        return None
    return (
        datetime.fromtimestamp(seconds, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


class Siblings(Protocol):
    """The other workers of this gateway (WORKERS > 1), which reload keys.json with this one."""

    async def reload(self) -> None:
        """Ask every worker to reload keys.json (SIGHUP, through the supervisor); return once
        each other one has heard it, or after a second (one that died, being replaced)."""
        ...

    def heard(self) -> None:
        """This worker heard SIGHUP, its reload under way: a worker awaiting `reload` is told."""
        ...


class KeysFile:
    """The keys file in force, and the reload that replaces it in the live key ring."""

    def __init__(
        self,
        path: str,
        key_ring: KeyRing,
        load: Callable[[], KeyRing],
        on_reload: Callable[[str | None], None] = lambda error: None,
        is_watched: bool = False,
        on_sighup: Callable[[], None] = lambda: None,
        kept_elsewhere: str | None = None,
        siblings: Siblings | None = None,
        on_gone: Callable[[tuple[Scope, ...]], None] = lambda scopes: None,
    ) -> None:
        self.path = path
        self._siblings = siblings  # told each SIGHUP was heard (WORKERS > 1)
        # Why keys.json is never reloaded (KEYS_STORE=redis: it only seeds the store), or
        # None. Then a reload is not tried, so it is neither a failure nor counted as one.
        self._kept_elsewhere = kept_elsewhere
        self._key_ring = key_ring
        self._load = load
        self._loop_first = LoopFirst()
        self._on_reload = on_reload  # None on success, else the reason it was refused
        # Told the scopes of keys and teams a swap removed, so what is kept of them goes.
        self._on_gone = on_gone
        self._is_watched = is_watched
        self._on_sighup_too = on_sighup  # what else SIGHUP asks of the app (reopen the log)
        self._seen = signature(path)  # the file as of the last reload, tried or done
        self.loaded_at = modified_at(path)
        self._one_at_a_time = asyncio.Lock()
        self._signalled: set[asyncio.Task[str | None]] = set()

    @property
    def is_reloadable(self) -> bool:
        """Whether keys.json is reloaded at all (not with KEYS_STORE=redis)."""
        return self._kept_elsewhere is None

    @property
    def config(self) -> dict[str, object]:
        """Which keys file is in force: `{"hash", "loaded_at"}`, the same on every worker;
        with the Redis store, also `keys_left_out`: why each entry that does not load is out."""
        config: dict[str, object] = {"hash": self._key_ring.digest, "loaded_at": self.loaded_at}
        if self._kept_elsewhere is not None:
            config["keys_left_out"] = sorted(self._key_ring.left_out.values())
        return config

    async def reload(self, trigger: str) -> str | None:
        """Load, check and swap in the file; None on success, else why nothing changed."""
        if self._kept_elsewhere is not None:
            return self._kept_elsewhere
        async with self._one_at_a_time:
            self._seen, loaded_at = signature(self.path), modified_at(self.path)
            try:
                with self._loop_first.loading():  # the loop before the loading thread
                    fresh = await asyncio.to_thread(self._load)
            except KeysFileError as error:
                log.warning(
                    "keys not reloaded (%s, process %d), the previous keys stay: %s",
                    trigger,
                    os.getpid(),
                    error,
                )
                self._on_reload(str(error))
                return str(error)
            self._swap(fresh, loaded_at, trigger)
            return None

    def _swap(self, fresh: KeyRing, loaded_at: str | None, trigger: str) -> None:
        gone = self._key_ring.replace(fresh)
        self.loaded_at = loaded_at
        log.info(
            "keys reloaded (%s, process %d) from %s: %d keys, config %s",
            trigger,
            os.getpid(),
            self.path if self._kept_elsewhere is None else "Redis",  # keys.json is not read
            len(fresh),
            fresh.digest,
        )
        self._on_reload(None)
        if gone:
            self._on_gone(gone)

    def is_reloading(self) -> bool:
        """Whether a reload or a change is under way, or asked for (SIGHUP: with WORKERS,
        another worker's admin API wrote keys.json)."""
        return bool(self._signalled) or self._one_at_a_time.locked()

    async def reloaded(self) -> None:
        """Once the reloads and changes under way or asked for have ended, or
        RELOADED_WITHIN_SECONDS passed (a reload stuck reading the file holds no request for
        ever); a caller that leaves meanwhile cancels none of them."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RELOADED_WITHIN_SECONDS):
                if self._signalled:
                    await asyncio.wait(set(self._signalled))
                async with self._one_at_a_time:
                    pass

    @contextlib.asynccontextmanager
    async def changing(self) -> AsyncIterator[None]:
        """Hold off reloads while a change is written and applied (`apply`), so a reload
        that read the file before the change cannot swap it out after."""
        async with self._one_at_a_time:
            yield

    def apply(self, fresh: KeyRing, trigger: str) -> None:
        """Swap in keys just written (within `changing`), as a reload would."""
        self._seen = signature(self.path)
        self._swap(fresh, modified_at(self.path), trigger)

    def refused(self, reason: str) -> None:
        """Keys offered from the store (Redis) that do not load: a failed reload, shown on
        /health and counted, until keys load again."""
        self._on_reload(reason)

    def catch_up(self) -> None:
        """Reload at start if the file differs from the keys this process was given."""
        if self._kept_elsewhere is not None:
            return
        loaded_at = modified_at(self.path)
        try:
            fresh = self._load()
        except KeysFileError:
            return  # the keys given still serve; a later reload says what is wrong
        if fresh.digest != self._key_ring.digest:
            self._seen = signature(self.path)
            self._swap(fresh, loaded_at, "start")

    def _on_sighup(self) -> None:
        self._on_sighup_too()
        if self._kept_elsewhere is not None:  # logrotate's signal: not a failed reload
            log.info(
                "SIGHUP (process %d): keys.json not reloaded: %s", os.getpid(), self._kept_elsewhere
            )
            return
        task = asyncio.get_running_loop().create_task(self.reload("SIGHUP"))
        self._signalled.add(task)  # a reference, so the task is not collected mid-flight
        task.add_done_callback(self._signalled.discard)
        if self._siblings is not None:  # reloading from now: a key not found waits for it
            self._siblings.heard()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """SIGHUP reloads (and never kills) while the app runs; the watcher polls if asked."""
        loop = asyncio.get_running_loop()
        previous = signal.getsignal(signal.SIGHUP)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        self.catch_up()
        watcher = loop.create_task(self.watch()) if self._is_watched else None
        try:
            yield
        finally:
            for task in [watcher, *self._signalled]:
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            loop.remove_signal_handler(signal.SIGHUP)
            # Back to what the server had set (ignored), not the default, which would kill
            # the process while the log is still being flushed.
            signal.signal(signal.SIGHUP, previous)

    async def watch(self, every: float = POLL_SECONDS) -> None:
        """Reload when the file's signature changed and then held still for one poll."""
        last = signature(self.path)
        while True:
            await asyncio.sleep(every)
            current = signature(self.path)
            if current != last:
                last = current  # still changing, perhaps mid-write: look again next time
            elif current != self._seen:
                await self.reload("file changed")


class LoopFirst:
    """How a reload's loading thread shares the process with the loop and the collector.

    While the thread loads: a shorter switch interval, no cyclic collection. Then what was
    loaded is frozen where the start's objects were (`server.tune_gc`), out of every later
    collection (10,000 keys: ~111,000 objects, which a full collection walked in ~35 ms on a
    quiet core, after every reload).

    A freeze takes every object then tracked, and nothing frozen is ever collected: so the
    garbage waiting for a collection is collected first (what is walked is what is not
    frozen: the requests' young objects, a few ms). The requests in flight are frozen with
    the keys, and what of theirs later ends in a cycle (a client's closed connection, in
    aiohttp's server) stays: so once the frozen objects have grown by a quarter since they
    were last all walked, a reload first walks them all (unfrozen, collected, frozen again:
    ~76 ms with 10,000 keys), as Python's collector bounds its oldest generation. Without
    that bound, a gateway reloading under load grew without end (bench/README.md)."""

    GROWTH = 0.25  # of the frozen objects since their last walk, before the next walk

    def __init__(self) -> None:
        self._walked: int | None = None  # frozen objects after the last walk (None: none yet)

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        interval, collecting = sys.getswitchinterval(), gc.isenabled()
        freezing = collecting and gc.get_freeze_count() > 0  # the start froze (tune_gc)
        if freezing:
            # Between two reloads (the previous keys freed): what grew is the requests'.
            frozen = gc.get_freeze_count()
            walking = self._walked is not None and frozen > self._walked * (1 + self.GROWTH)
            if walking:
                gc.unfreeze()
            gc.collect()
            if walking or self._walked is None:
                gc.freeze()
                self._walked = gc.get_freeze_count()
        sys.setswitchinterval(min(interval, LOADING_SWITCH_SECONDS))
        gc.disable()
        try:
            yield
        finally:
            sys.setswitchinterval(interval)
            if freezing:
                gc.freeze()
            if collecting:
                gc.enable()
