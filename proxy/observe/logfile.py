"""Where the interaction log's bytes go: a file that follows its path, or stdout.

Owned by the logbook's writer thread; nothing here runs on the event loop.

- Appends go to a descriptor opened with O_APPEND, so processes sharing one file never
  interleave lines. Stdout is not opened here: it is whatever the gateway was given, often
  a pipe (Docker's), where a write over PIPE_BUF (4 KiB: a batch, a line with bodies) is not
  atomic. So an append to stdout holds a POSIX record lock on it, which WORKERS sharing the
  pipe take in turn (the kernel releases a dead worker's); where stdout cannot be locked,
  the lines go out unlocked. So does an append to a path that is no regular file (a FIFO a
  log shipper reads, /dev/stdout): O_APPEND keeps no pipe's writes whole. A short write (a
  signal) is finished by further writes; one that fails part-way (a full disk) is cut back
  to its last whole line (`PartlyWritten` says how many lines went out whole), so every
  line in the file stays whole JSON.
- The file follows its path: `follow` opens the path again when asked (`reopen`: SIGHUP)
  or when the file there is no longer the one open, checked with one `stat` at most once
  per FOLLOW_SECONDS. So logrotate's `create` (rename, then a new file), its
  `copytruncate` (O_APPEND writes land at the new end) and a removed file all end with
  lines in the file at the configured path; lines written before the check land in the
  renamed file, none is lost. A removed file is seen at the next write (its link count),
  so no line goes to it after its removal.
- A path that cannot be opened again (its directory removed, or no longer writable) leaves
  the lines with the file open, while that file still has a name somewhere (renamed). Once
  that file is removed too, a line written to it could never be read: each append then
  raises `PartlyWritten` (nothing written: the logbook counts and says the loss) until the
  path opens again.
- A FIFO is opened without waiting for a reader: with none yet (a log shipper started
  after the gateway), the writer thread opens it at its first append, waiting there while
  the lines queue (the logbook's bound). `check_appendable` never opens one: its close
  would be the end of file to a reader already there (`cat log.fifo | shipper`).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import threading
import time

log = logging.getLogger("llm_gateway")

STDOUT_FILENO = 1
FOLLOW_SECONDS = 1.0  # the path is compared with the open file at most this often


class PartlyWritten(Exception):
    """A write failed after `whole_lines` of its lines went out whole."""

    def __init__(self, whole_lines: int, error: OSError) -> None:
        super().__init__(error)
        self.whole_lines = whole_lines
        self.reason = error.strerror or str(error)


class LogFile:
    """The file at `path` opened for appending, or stdout when `path` is None; a file it
    creates gets `mode` (`file_mode`)."""

    def __init__(self, path: str | None, mode: int = 0o644) -> None:
        self.path = path
        self._mode = mode
        self._fd: int | None = None
        # What is open is no regular file (stdout, a FIFO): appends hold a lock (`_lock`).
        self._is_pipe_like = False
        self._reopen_asked = threading.Event()
        self._next_check = 0.0
        # The file open was removed and the path cannot be opened: appends fail until it can.
        self._is_orphaned = False

    @property
    def name(self) -> str:
        return self.path if self.path is not None else "stdout"

    def open(self) -> None:
        """OSError if it cannot be opened; a FIFO no one reads yet is opened by the first
        append, which waits for a reader."""
        if self.path is None:
            self._use(STDOUT_FILENO)
            return
        try:
            fd = open_for_append(self.path, self._mode, os.O_NONBLOCK)
        except OSError as error:
            if error.errno != errno.ENXIO:  # ENXIO: a FIFO without a reader
                raise
            log.warning("logbook: no process reads the FIFO %s yet; lines wait for one", self.path)
            return
        os.set_blocking(fd, True)  # O_NONBLOCK was for the open only
        self._use(fd)

    def reopen(self) -> None:
        """Open the path again before the next append (any thread)."""
        self._reopen_asked.set()

    def close(self) -> None:
        if self._fd is not None and self._fd != STDOUT_FILENO:
            os.close(self._fd)
        self._fd = None

    def append(self, data: bytes) -> None:
        """Append whole lines in one write (more only after a short one). Raises PartlyWritten."""
        if self._fd is None and self.path is not None:
            try:  # a FIFO that had no reader at the start: waits for one
                self._use(open_for_append(self.path, self._mode))
            except OSError as error:
                raise PartlyWritten(0, error) from None
        self._follow()
        assert self._fd is not None
        is_locked = self._is_pipe_like and _lock(self._fd)
        written = 0
        try:
            while written < len(data):
                written += os.write(self._fd, memoryview(data)[written:])
        except OSError as error:
            whole = data.rfind(b"\n", 0, written) + 1  # the bytes of the lines written whole
            if whole < written:
                _cut_back(self._fd, written - whole)
            raise PartlyWritten(data.count(b"\n", 0, whole), error) from None
        finally:
            if is_locked:
                fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def _follow(self) -> None:
        """Open the path again if asked to, or if the file there is no longer the one open.
        Raises PartlyWritten when it cannot, and the file open has no name left."""
        if self.path is None or self._fd is None:
            return
        # The open file's link count is one fstat per write (of up to BATCH_LINES lines): a
        # removed file is left before a line goes to it, not up to FOLLOW_SECONDS later.
        is_removed = self._is_orphaned or os.fstat(self._fd).st_nlink == 0
        if not self._reopen_asked.is_set() and not is_removed:
            now = time.monotonic()
            if now < self._next_check:
                return
            self._next_check = now + FOLLOW_SECONDS
            if self._is_at_path():
                return
        self._reopen_asked.clear()
        try:
            fd = open_for_append(self.path, self._mode)
        except OSError as error:
            if is_removed:  # what is written there could never be read
                self._is_orphaned = True
                raise PartlyWritten(0, error) from None
            log.warning(
                "logbook: cannot open %s again (%s); lines still go to the file open before",
                self.path,
                error.strerror or error,
            )
            return
        self._is_orphaned = False
        previous = self._fd
        self._use(fd)
        os.close(previous)

    def _use(self, fd: int) -> None:
        """Append to `fd` from now on (one fstat per open, none per append)."""
        self._fd = fd
        self._is_pipe_like = fd == STDOUT_FILENO or not stat.S_ISREG(os.fstat(fd).st_mode)

    def _is_at_path(self) -> bool:
        assert self.path is not None and self._fd is not None
        try:
            there = os.stat(self.path)
        except FileNotFoundError:
            return False  # removed: opening creates it again
        except OSError:
            return True  # cannot tell (a directory not searchable): keep what is open
        here = os.fstat(self._fd)
        return (there.st_dev, there.st_ino) == (here.st_dev, here.st_ino)


def is_stdout(path: str | None) -> bool:
    """Whether the log goes to this process's stdout: no path, or one naming what stdout is
    (/dev/stdout, /proc/self/fd/1, the very file or FIFO stdout was sent to)."""
    if path is None:
        return True
    try:
        there, here = os.stat(path), os.fstat(STDOUT_FILENO)
    except OSError:
        return False
    return (there.st_dev, there.st_ino) == (here.st_dev, here.st_ino)


def _lock(fd: int) -> bool:
    """Wait for the other processes' appends to `fd` to end; False if it cannot be locked."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
    except OSError:
        return False  # a platform without record locks on pipes: written unlocked, as before
    return True


def file_mode(has_bodies: bool) -> int:
    """The mode a log file is created with: with bodies (every prompt and answer) its owner
    writes and its group reads (a log shipper in the gateway's group), others nothing;
    without, readable by all, as nginx's access log. The umask narrows either; a file that
    exists keeps its own."""
    return 0o640 if has_bodies else 0o644


def open_for_append(path: str, mode: int, flags: int = 0) -> int:
    """A descriptor appending to `path`, created with `mode` if it is not there. OSError."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | flags, mode)


def check_appendable(path: str, mode: int) -> None:
    """OSError unless lines can be appended to `path` (created if missing). A FIFO is only
    checked for permission: opening it waits for a reader, and closing it again would end
    the stream of a reader already there."""
    try:
        is_fifo = stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        is_fifo = False  # not there (created below), or not reachable (said below)
    if not is_fifo:
        os.close(open_for_append(path, mode))
    elif not os.access(path, os.W_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)


def _cut_back(fd: int, extra: int) -> None:
    """Remove the last `extra` bytes this descriptor appended: a line a failed write cut.

    Only when nothing was appended after them (another worker sharing the file): cutting
    then would remove that worker's line. A pipe cannot be cut back at all.
    """
    try:
        end = os.lseek(fd, 0, os.SEEK_CUR)  # O_APPEND: where this descriptor's write ended
        if os.fstat(fd).st_size == end:
            os.ftruncate(fd, end - extra)
    except OSError:
        pass
