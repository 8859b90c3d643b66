"""KEYS_STORE=redis: the keys document in Redis under REDIS_URL, shared by every instance.

Stored: `llm-gateway:keys:document`, the keys document (keys.json's form) with every
virtual key as its digest (`hashed`), encrypted whole with Fernet (AES-128-CBC and
HMAC-SHA256, from the `cryptography` package) under a key derived from KEYS_STORE_SECRET;
and `llm-gateway:keys:version`, a number raised by each change. A dump of Redis shows
neither a virtual key (only digests, and those inside the ciphertext) nor a real key.

A change (`change`) reads document and version under WATCH, edits, checks the result with
the start's loader, and writes both in one MULTI/EXEC (a change racing it from another
process makes it start over, so none is lost), then publishes the new version on
`llm-gateway:keys:changed`. Every process follows: on a message, and at least every
POLL_SECONDS anyway (a message missed while a connection was down is caught up by the
version), it compares the version with the one it holds and, when it moved, loads the
document and swaps it into its key ring. The first start with no document imports the
keys.json document (once, whichever instance comes first).

Redis restarted without persistence (the compose file's and the Kubernetes manifest's
Redis) comes back empty; an instance started then imports its keys.json, where a revoked
key may still be and a key made since is not, and every process would follow that. So a
process that saw Redis restart (a call failed, or the server's `run_id` changed between two
reads: the connection pool reopens a dead idle connection without an error) and then finds
the store empty, or at a version below its own, puts back the document it holds
(`_RESTORE`: only while the store is still behind it), and the newest keys in force win.
An operator who empties the store on purpose (`DEL` of both keys, to start over from
keys.json) restarts nothing: nothing is put back.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import redis
import redis.asyncio
from cryptography.fernet import Fernet, InvalidToken
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, RedisError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.keys.credentials import sent
from proxy.keys.edits import hashed_document, prune
from proxy.keys.fields import KeysFileError
from proxy.keys.keys import KeyRing
from proxy.keys.store import Edit, Parse, StoreUnavailable, decoded, encoded

log = logging.getLogger("llm_gateway")

T = TypeVar("T")

DOCUMENT = "llm-gateway:keys:document"
VERSION = "llm-gateway:keys:version"
CHANNEL = "llm-gateway:keys:changed"
WHERE = "the Redis key store"
POLL_SECONDS = 0.25  # the longest a missed message delays a change
TIMEOUT_SECONDS = 2.0
MAX_ATTEMPTS = 50  # changes racing from other processes before one gives up
# Set the document and its first version only when there is none: one instance imports.
_IMPORT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
return redis.call('INCR', KEYS[2])
"""
# Put back the document a process holds, at its version, while the store is behind it.
_RESTORE = """
if tonumber(redis.call('GET', KEYS[2]) or '0') >= tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
return 1
"""


def fernet(secret: str) -> Fernet:
    """The cipher for KEYS_STORE_SECRET (any text; 32 random bytes' worth is plenty)."""
    return Fernet(base64.urlsafe_b64encode(hashlib.sha256(sent(secret)).digest()))


class RedisStore:
    """The keys in Redis: changed by any instance, followed by every process."""

    def __init__(
        self,
        url: str,
        secret: str,
        parse: Parse,
        apply: Callable[[KeyRing], None],
        clock: Callable[[], float],
        refused: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self._url = url
        self._refused = refused  # a document that does not load (another secret): why
        self._fernet = fernet(secret)
        self._parse = parse
        self._apply = apply
        self._clock = clock
        self._client = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=TIMEOUT_SECONDS,
            socket_connect_timeout=TIMEOUT_SECONDS,
            # A write answered READONLY (a primary a failover made a replica keeps its
            # clients' connections) drops its connection, as one that failed: the next
            # opens where the address leads now, the new primary.
            retry=Retry(NoBackoff(), 0),  # as without retry_on_error: never sent twice
            retry_on_error=[ReadOnlyError],
            client_name="llm-gateway-keys",
            protocol=2,
        )
        self._version = 0  # the version in force in this process
        self._token: bytes | str | None = None  # its document, as stored (encrypted)
        self._was_lost = False  # the connection broke since the store was last read
        self._run_id: str | None = None  # the Redis server that answered the last read
        self._left_out: dict[tuple[str, str], str] = {}  # entries said not to load, and why
        self._one_at_a_time = asyncio.Lock()

    async def start(self, seed: dict[str, Any]) -> None:
        """Import `seed` (keys.json) into an empty store, then take what the store holds.

        The gateway's start checked that Redis answers; a process that starts later (a worker
        replacing one that died) while Redis is away waits for it, saying so once: it has no
        keys to serve but the seed, which may hold keys revoked since, and failing to start
        would stop the whole gateway after three tries.
        """
        raw, _ = encoded(hashed_document(seed))
        token = self._fernet.encrypt(raw)
        waiting = False
        while True:
            try:
                await self._client.eval(_IMPORT, 2, DOCUMENT, VERSION, token)
                await self.sync()
                return
            except (RedisConnectionError, RedisTimeoutError, StoreUnavailable) as error:
                if not waiting:
                    log.warning(
                        "keys: %s cannot be read (%s): process %d waits for it before it serves",
                        WHERE,
                        error,
                        os.getpid(),
                    )
                    waiting = True
                await asyncio.sleep(POLL_SECONDS)
            except RedisError as error:
                raise KeysFileError(f"{WHERE}: cannot be reached ({error})") from None

    async def sync(self) -> None:
        """Take the store's document if its version moved since this process last did."""
        async with self._one_at_a_time:
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    pipe.mget(VERSION, DOCUMENT)
                    pipe.info("server")
                    read, server = await pipe.execute(raise_on_error=False)
                if isinstance(read, RedisError):
                    raise read
            except RedisError as error:
                self._was_lost = True
                raise StoreUnavailable(f"{WHERE}: cannot be reached ({error})") from None
            version, token = read
            was_lost, self._was_lost = self._was_lost, False
            was_lost |= self._restarted(server)
            behind = version is None or int(version) < self._version
            if was_lost and behind and self._token is not None:
                await self._restore(self._token)
                return
            if version is None or int(version) == self._version:
                return
            try:
                document = self._decrypt(token)
                ring = await asyncio.to_thread(self._parse, document, encoded(document)[1])
            except KeysFileError as error:
                self._version = int(version)  # said once; tried again on the next change
                self._refused(str(error))
                raise
            self._apply(ring)
            self._version, self._token = int(version), token
            self._say_left_out(ring)

    def _restarted(self, server: dict[str, Any] | Exception) -> bool:
        """Whether Redis restarted since this process last read it: its `run_id` changed.
        The connection pool reopens a dead idle connection without an error, so a restart
        between two reads fails no call. A Redis that refuses INFO (a managed one may)
        leaves only the failed calls to tell."""
        run_id = server.get("run_id") if isinstance(server, dict) else None
        restarted = None not in (run_id, self._run_id) and run_id != self._run_id
        self._run_id = run_id or self._run_id
        return restarted

    def _say_left_out(self, ring: KeyRing) -> None:
        """One line for each key or team of the store newly left out (at start: each)."""
        for entry, why in ring.left_out.items():
            if self._left_out.get(entry) != why:
                log.warning(
                    "keys: a %s is left out (process %d): %s; change or delete it through the "
                    "admin API",
                    entry[0],
                    os.getpid(),
                    why,
                )
        self._left_out = ring.left_out

    async def _restore(self, token: bytes | str) -> None:
        """Put the keys in force back into a store that lost them (Redis restarted empty)."""
        try:
            restored = await self._client.eval(_RESTORE, 2, DOCUMENT, VERSION, token, self._version)
            if restored:  # the instances that imported keys.json meanwhile take it at once
                await self._client.publish(CHANNEL, str(self._version))
        except RedisError as error:
            self._was_lost = True  # lost again: try once more when it answers
            raise StoreUnavailable(f"{WHERE}: cannot be reached ({error})") from None
        if restored:
            log.warning(
                "keys: Redis came back without the keys in force (restarted empty?): "
                "put them back (version %d, process %d)",
                self._version,
                os.getpid(),
            )

    async def change(self, edit: Edit[T]) -> T:
        async with self._one_at_a_time:
            for _ in range(MAX_ATTEMPTS):
                try:
                    return await self._try(edit)
                except WatchError:
                    continue  # another process changed the keys meanwhile: again, on theirs
                except RedisError as error:
                    raise StoreUnavailable(f"{WHERE}: cannot be reached ({error})") from None
        raise StoreUnavailable(f"{WHERE}: too many changes at once; try again")

    async def _try(self, edit: Edit[T]) -> T:
        async with self._client.pipeline(transaction=True) as pipe:
            await pipe.watch(VERSION)
            _, token = await pipe.mget(VERSION, DOCUMENT)
            document = self._decrypt(token)
            prune(document, self._clock())
            before = copy.deepcopy(document)
            result = edit(document)
            raw, digest = encoded(document)
            ring = await asyncio.to_thread(self._parse, document, digest)
            refuse_new_faults(before, document, ring)
            pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
            token = self._fernet.encrypt(raw)
            pipe.set(DOCUMENT, token)
            pipe.incr(VERSION)
            _, version = await pipe.execute()
        self._apply(ring)
        self._version, self._token = int(version), token
        self._say_left_out(ring)
        await self._client.publish(CHANNEL, str(version))
        return result

    async def document(self) -> dict[str, Any]:
        try:
            token = await self._client.get(DOCUMENT)
        except RedisError as error:
            raise StoreUnavailable(f"{WHERE}: cannot be reached ({error})") from None
        return self._decrypt(token)

    def _decrypt(self, token: bytes | str | None) -> dict[str, Any]:
        if token is None:
            raise StoreUnavailable(f"{WHERE}: holds no keys (was Redis emptied?)")
        return _opened(self._fernet, token)

    async def follow(self) -> None:
        """Take every change: on its message, or by polling the version (a missed one)."""
        complained = False
        while True:
            try:
                async with self._client.pubsub() as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    while True:
                        await pubsub.get_message(True, timeout=POLL_SECONDS)
                        await self.sync()
                        complained = False
            except (RedisError, StoreUnavailable, KeysFileError, OSError) as error:
                if isinstance(error, (RedisError, OSError)):
                    self._was_lost = True
                if not complained:
                    log.warning("keys not followed from Redis, the keys in force stay: %s", error)
                    complained = True
                await asyncio.sleep(POLL_SECONDS)

    @contextlib.asynccontextmanager
    async def running(self, seed: dict[str, Any]) -> AsyncIterator[None]:
        await self.start(seed)
        follower = asyncio.get_running_loop().create_task(self.follow())
        try:
            yield
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
            await self.close()

    async def close(self) -> None:
        await self._client.aclose()


def refuse_new_faults(before: dict[str, Any], after: dict[str, Any], ring: KeyRing) -> None:
    """A change may leave an entry left out as it was (the older version's, to mend later),
    not make or keep one that does not load: raises KeysFileError for each such entry."""
    sections = {"key": "virtual_keys", "team": "teams"}
    faults = [
        why
        for (kind, name), why in ring.left_out.items()
        if _section(after, sections[kind]).get(name) != _section(before, sections[kind]).get(name)
    ]
    if faults:
        raise KeysFileError(faults[0], faults)


def _section(document: dict[str, Any], name: str) -> dict[str, Any]:
    section = document.get(name)
    return section if isinstance(section, dict) else {}


def stored_document(url: str, secret: str) -> dict[str, Any] | None:
    """The store's document as an instance with `secret` reads it, None when there is none
    (`--check`: what a start would take). Raises KeysFileError, RedisError."""
    client = redis.Redis.from_url(
        url, socket_timeout=TIMEOUT_SECONDS, socket_connect_timeout=TIMEOUT_SECONDS, protocol=2
    )
    try:
        token = client.get(DOCUMENT)
    finally:
        client.close()
    return None if token is None else _opened(fernet(secret), token)


def _opened(cipher: Fernet, token: bytes | str) -> dict[str, Any]:
    """The stored document, decrypted. Raises KeysFileError."""
    try:
        return decoded(WHERE, cipher.decrypt(token))  # bytes or str alike
    except InvalidToken:
        raise KeysFileError(
            f"{WHERE}: cannot be decrypted with this KEYS_STORE_SECRET (every instance "
            "needs the same one)"
        ) from None
