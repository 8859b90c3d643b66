"""Where the admin API writes keys: keys.json itself (`FileStore`, KEYS_STORE=file) or Redis
(`redis_store.RedisStore`, KEYS_STORE=redis). Both take a change as a function over the
keys document (`edits`), check the result with the loader the start uses, write it, swap
it into this process's key ring, and see that every other process takes it.

`FileStore`: keys.json is rewritten whole, atomically (a temporary file in the same folder,
fsync, rename over the file the path leads to, its mode and owner kept), under an exclusive
`flock` of that folder, so workers of one gateway writing at once take turns and none loses
another's change. The writing worker swaps in the keys it wrote and asks the supervisor to
make every worker reload (as SIGHUP does), and answers once each has heard (`Siblings`). A file the gateway cannot write (a Kubernetes
Secret or ConfigMap mount, a read-only mode) refuses every change with `StoreReadOnly`.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import os
import stat
import tempfile
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import orjson

from proxy.keys.edits import prune
from proxy.keys.fields import KeysFileError
from proxy.keys.keys import KeyRing, parsed, read_file
from proxy.keys.reload import KeysFile, Siblings

T = TypeVar("T")

Edit = Callable[[dict[str, Any]], T]
# A keys document and the digest of its bytes → the checked key ring. Raises KeysFileError.
Parse = Callable[[dict[str, Any], str], KeyRing]


class StoreReadOnly(Exception):
    """The keys cannot be changed where they are kept; the message says why and what to do."""


class StoreUnavailable(Exception):
    """The key store (Redis) cannot be reached."""


class KeyStore(Protocol):
    async def change(self, edit: Edit[T]) -> T:
        """Apply `edit` to the keys, check, write and take the result. Raises EditRefused,
        KeysFileError (the result does not load), StoreReadOnly, StoreUnavailable."""
        ...

    async def document(self) -> dict[str, Any]:
        """The keys document in force, as stored."""
        ...


def encoded(document: dict[str, Any]) -> tuple[bytes, str]:
    """The document's bytes as written, and their digest (the config hash /health shows).
    Raises KeysFileError for a value nested deeper than orjson writes (an admin body's: it
    reads deeper)."""
    try:
        raw = orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n"
    except orjson.JSONEncodeError:
        raise KeysFileError("the keys document: a value is nested too deeply") from None
    return raw, hashlib.sha256(raw).hexdigest()[:16]


def decoded(where: str, raw: bytes) -> dict[str, Any]:
    document = parsed(where, raw)
    if not isinstance(document, dict):
        raise KeysFileError(f"{where}: must be a JSON object with 'virtual_keys'")
    return document


class FileStore:
    """keys.json as the store: changed in place, atomically, every worker reloading."""

    def __init__(
        self,
        keys_file: KeysFile,
        parse: Parse,
        siblings: Siblings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys_file = keys_file
        self._parse = parse
        self._siblings = siblings
        self._clock = clock

    async def change(self, edit: Edit[T]) -> T:
        async with self._keys_file.changing():
            ring, result = await asyncio.to_thread(self._write, edit)
            self._keys_file.apply(ring, "admin API")
        if self._siblings is not None:  # the other workers reload the file, as after SIGHUP
            await self._siblings.reload()
        return result

    async def document(self) -> dict[str, Any]:
        path = self._keys_file.path
        return decoded(path, await asyncio.to_thread(read_file, path))

    def _write(self, edit: Edit[T]) -> tuple[KeyRing, T]:
        path = self._keys_file.path
        target = os.path.realpath(path)  # a symlinked file is changed where it lives
        self._check_writable(target)
        folder = os.open(os.path.dirname(target), os.O_RDONLY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)  # other workers' changes wait their turn
            raw = read_file(path)
            document = decoded(path, raw)
            prune(document, self._clock())
            result = edit(document)
            fresh, digest = encoded(document)
            ring = self._parse(document, digest)  # as at start; nothing written if it fails
            if fresh != raw:
                self._replace(target, fresh)
            return ring, result
        finally:
            os.close(folder)  # and with it the lock

    def _check_writable(self, target: str) -> None:
        try:
            mode = os.stat(target).st_mode
        except OSError as error:
            raise StoreReadOnly(
                f"{self._keys_file.path}: cannot be read ({error.strerror})"
            ) from None
        # No write bit counts as read-only even for root: the operator's way of saying so.
        if not mode & 0o222 or not os.access(target, os.W_OK):
            raise StoreReadOnly(_read_only(self._keys_file.path, "the file is read-only"))

    def _replace(self, target: str, data: bytes) -> None:
        folder = os.path.dirname(target)
        kept = os.stat(target)
        try:
            handle, temporary = tempfile.mkstemp(dir=folder, prefix=".keys-", suffix=".tmp")
        except OSError as error:
            raise StoreReadOnly(_read_only(self._keys_file.path, error.strerror or "")) from None
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(data)
                file.flush()
                os.fchmod(file.fileno(), stat.S_IMODE(kept.st_mode))
                _keep_owner(file.fileno(), kept)
                os.fsync(file.fileno())
            os.replace(temporary, target)
        except OSError as error:
            os.unlink(temporary)
            if error.errno == errno.EBUSY:  # a mount point: nothing can be renamed over it
                raise StoreReadOnly(_mounted_alone(self._keys_file.path)) from None
            raise StoreReadOnly(_read_only(self._keys_file.path, error.strerror or "")) from None
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a crash
        finally:
            os.close(directory)


def _keep_owner(handle: int, kept: os.stat_result) -> None:
    """Give the new file the old one's owner and group, as far as this process may: a
    gateway run as root would otherwise leave its owner a root-owned file (a 0600 one they
    could no longer read); another user keeps at least the group, if it is one of theirs."""
    for owner in (kept.st_uid, -1):
        try:
            os.fchown(handle, owner, kept.st_gid)
            return
        except OSError:  # not ours to give (or a file system without owners): as it comes
            continue


def _mounted_alone(path: str) -> str:
    return (
        f"{path} is mounted on its own (docker run -v $PWD/keys.json:/app/keys.json), so the "
        "gateway cannot replace it atomically: mount its folder instead "
        "(-v $PWD/keys:/app/keys with KEYS_FILE_PATH=/app/keys/keys.json), or set "
        "KEYS_STORE=redis to keep keys in Redis"
    )


def _read_only(path: str, reason: str) -> str:
    return (
        f"{path} cannot be changed by the gateway ({reason}; a Kubernetes Secret or ConfigMap "
        "mount?): change it where it comes from (your GitOps), or set KEYS_STORE=redis to "
        "keep keys in Redis and change them through this API"
    )
