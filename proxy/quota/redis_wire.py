"""One pipelined RESP2 connection to Redis per process: the Redis tracker's client.

Why not redis-py's asyncio client: for each command it checks a connection out of its pool,
encodes every argument through its encoder, dispatches its observability events, wraps each
read in a timeout and puts the connection back: about 90 µs of CPU per admission on this
project's machine, against about 20 µs here (`bench/redis_cost.py`, bench/README.md). The
tracker needs little of that, and every guarantee it relies on stays:

- The URL is read as redis-py reads it (`parse_url`): host and port or a unix socket path,
  the database, username and password, `rediss://` with its `ssl_*` options. Connecting sends
  AUTH, SELECT and CLIENT SETNAME in one write and checks each answer.
- Every call fails within `timeout`, on one timer per connection (not one per call): the
  connection is then dropped, as redis-py drops one that timed out, and the next call opens a
  new one. A connection the server closed is seen at once (`connection_lost`). Nothing is
  ever sent twice, except a script Redis answered NOSCRIPT (it did not run): then EVAL with
  its source, which runs it and loads it again (Redis restarted empty).
- A connection idle for `health_check_seconds` is PINGed before its next command, so a
  connection dropped silently on the way (NAT, a proxy) fails the PING, not the script.
- A write answered READONLY (a primary demoted to a replica by a failover, which keeps its
  clients' connections) closes the connection, as redis-py's Sentinel client does: the next
  call connects again, to the new primary where the URL's address now leads (ElastiCache's
  primary endpoint, a Kubernetes Service), rather than failing every call for as long as the
  old connection lives.

Pipelining: every caller of the process shares the connection. Commands are written in the
order they are called and Redis answers in that order, so each answer goes to the oldest
caller still waiting (a queue of futures); commands written together (MULTI … EXEC) are
never interleaved with another caller's. A caller that gives up (cancelled) leaves its place
in the queue, and its answer is dropped when it arrives.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import ssl
from collections.abc import Sequence
from typing import Any, cast

import hiredis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url

Arg = int | str | bytes
# What a replica answers a write (a script's error quotes it): its connection is left.
_READ_ONLY = "READONLY"


class ReplyError(Exception):
    """An error Redis answered (the command reached it, and it said no)."""


class Script:
    """A Lua script called by its SHA."""

    def __init__(self, source: str) -> None:
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source).hexdigest().encode()


def pack(*args: Arg) -> bytes:
    """One command in RESP."""
    return b"*%d\r\n%b" % (len(args), packed(args))


def packed(args: Sequence[Arg]) -> bytes:
    """Arguments as RESP bulk strings, without the command's header."""
    out = []
    for arg in args:
        data = (
            b"%d" % arg if isinstance(arg, int) else arg.encode() if isinstance(arg, str) else arg
        )
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


class RedisWire:
    """The connection, opened on first use and again after it is lost."""

    def __init__(
        self,
        url: str,
        timeout: float,
        client_name: str,
        health_check_seconds: float,
    ) -> None:
        self._options: dict[str, Any] = dict(parse_url(url))
        self._timeout = timeout
        self._health_check = health_check_seconds
        self._handshake = _handshake(self._options, client_name)
        self._connection: _Connection | None = None
        # The connection attempt under way: every caller that needs a connection meanwhile
        # waits for this one attempt and shares its outcome, so a Redis that does not answer
        # costs each of them one timeout, not one per caller ahead of it in a line.
        self._opening: asyncio.Future[_Connection] | None = None

    async def call(self, *commands: bytes) -> list[Any]:
        """Send the packed commands in one write; their answers, in order (an error Redis
        answered is a ReplyError among them). Raises OSError (lost, refused, timed out)."""
        connection = self._connection
        if connection is None or connection.lost is not None:
            connection = await self._open()
        elif connection.idle(self._health_check):
            await _checked(connection.send([pack("PING")]))
        answers = await connection.send(commands)
        if any(isinstance(a, ReplyError) and _READ_ONLY in str(a) for a in answers):
            # A primary demoted by a failover keeps its clients' connections and refuses
            # every write: the next call connects again, to where the address leads now.
            connection.close()
        return answers

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """EVALSHA the script (EVAL when Redis answers NOSCRIPT). Raises ReplyError, OSError."""
        tail = b"$%d\r\n%d\r\n%b" % (len(str(len(keys))), len(keys), packed([*keys, *args]))
        count = b"*%d\r\n" % (len(keys) + len(args) + 3)
        (answer,) = await self.call(
            b"%b$7\r\nEVALSHA\r\n$40\r\n%b\r\n%b" % (count, script.sha, tail)
        )
        if isinstance(answer, ReplyError) and str(answer).startswith("NOSCRIPT"):
            source = b"$%d\r\n%b\r\n" % (len(script.source), script.source)
            (answer,) = await self.call(b"%b$4\r\nEVAL\r\n%b%b" % (count, source, tail))
        if isinstance(answer, ReplyError):
            raise answer
        return answer

    async def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    async def _open(self) -> _Connection:
        """The connection the attempt under way (or a new one) opens. Raises OSError."""
        opening = self._opening
        if opening is None:
            self._connection = None
            opening = self._opening = asyncio.ensure_future(self._connect())
            opening.add_done_callback(self._opened)
        # Shielded: a caller that gives up does not cut the attempt short for the others.
        return await asyncio.shield(opening)

    def _opened(self, opening: asyncio.Future[_Connection]) -> None:
        self._opening = None
        if not opening.cancelled() and opening.exception() is None:
            self._connection = opening.result()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        options = self._options
        connection = _Connection(loop, self._timeout)
        try:
            async with asyncio.timeout(self._timeout):
                if options.get("connection_class") is UnixDomainSocketConnection:
                    transport, _ = await loop.create_unix_connection(
                        lambda: connection, options["path"]
                    )
                else:
                    host, port = options.get("host", "localhost"), options.get("port", 6379)
                    context = _tls(options)
                    transport, _ = await loop.create_connection(
                        lambda: connection,
                        host,
                        port,
                        ssl=context,
                        server_hostname=host if context is not None else None,
                    )
                connection.connection_made(transport)  # uvloop may call it only later
                if self._handshake:
                    await _checked(connection.send(self._handshake))
        except TimeoutError:
            connection.close()
            raise TimeoutError("Timeout connecting to Redis") from None
        except BaseException:
            connection.close()
            raise
        return connection


async def _checked(answers: asyncio.Future[list[Any]]) -> None:
    for answer in await answers:
        if isinstance(answer, ReplyError):
            raise answer


def _handshake(options: dict[str, Any], client_name: str) -> list[bytes]:
    commands = []
    password, username = options.get("password"), options.get("username")
    if password is not None or username is not None:
        who = (username,) if username else ()
        commands.append(pack("AUTH", *who, password or ""))
    if options.get("db"):
        commands.append(pack("SELECT", int(options["db"])))
    if client_name:
        commands.append(pack("CLIENT", "SETNAME", client_name))
    return commands


def _tls(options: dict[str, Any]) -> ssl.SSLContext | None:
    """The TLS context of a rediss:// URL (None for redis://), as its ssl_* options ask."""
    if options.get("connection_class") is not SSLConnection:
        return None
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    required = str(options.get("ssl_cert_reqs", "required")).lower()
    if required in ("none", "cert_none"):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif required in ("optional", "cert_optional"):
        context.verify_mode = ssl.CERT_OPTIONAL
    if str(options.get("ssl_check_hostname", "")).lower() in ("false", "0", "no"):
        context.check_hostname = False
    if options.get("ssl_certfile"):
        context.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
    return context


class _Connection(asyncio.Protocol):
    """One socket to Redis: commands out in order, each answer to the oldest caller waiting."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._loop = loop
        self._timeout = timeout
        self._reader = hiredis.Reader(replyError=ReplyError)
        self._transport: asyncio.Transport | None = None
        # Each caller waiting: its future, how many answers it waits for, those it has, and
        # by when it must have them (loop time).
        self._waiting: collections.deque[tuple[asyncio.Future[list[Any]], int, list[Any], float]]
        self._waiting = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._sent_at = loop.time()
        self._unsent: list[bytes] = []  # written together at the end of this turn of the loop
        self.lost: OSError | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._transport is None:
            self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def idle(self, seconds: float) -> bool:
        """Nothing sent for `seconds` and nothing waiting."""
        return not self._waiting and self._loop.time() - self._sent_at > seconds

    def send(self, commands: Sequence[bytes]) -> asyncio.Future[list[Any]]:
        """Write the commands; a future of their answers. Raises OSError when lost."""
        if self.lost is not None:
            raise self.lost
        assert self._transport is not None
        future: asyncio.Future[list[Any]] = self._loop.create_future()
        now = self._sent_at = self._loop.time()
        self._waiting.append((future, len(commands), [], now + self._timeout))
        if self._unsent:
            self._unsent += commands
        else:
            self._unsent = list(commands)
            self._loop.call_soon(self._flush)
        if self._timer is None:
            self._timer = self._loop.call_at(now + self._timeout, self._check_deadline)
        return future

    def _flush(self) -> None:
        unsent, self._unsent = self._unsent, []
        if self._transport is not None and self.lost is None:
            self._transport.write(b"".join(unsent))

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        waiting = self._waiting
        try:
            while (answer := self._reader.gets()) is not False:
                future, count, answers, _ = waiting[0]
                answers.append(answer)
                if len(answers) == count:
                    waiting.popleft()
                    if not future.done():
                        future.set_result(answers)
        except (hiredis.ProtocolError, IndexError):  # not Redis, or an answer nobody asked for
            self._fail(ConnectionError("Protocol error reading from Redis"))

    def connection_lost(self, exc: Exception | None) -> None:
        reason = "Connection closed by server." if exc is None else f"Connection lost: {exc}"
        self._fail(exc if isinstance(exc, OSError) else ConnectionError(reason))

    def close(self) -> None:
        self._fail(ConnectionError("Connection closed by the gateway."))

    def _check_deadline(self) -> None:
        self._timer = None
        if not self._waiting:
            return
        deadline = self._waiting[0][3]
        if deadline > self._loop.time():
            self._timer = self._loop.call_at(deadline, self._check_deadline)
            return
        self._fail(TimeoutError("Timeout reading from Redis"))

    def _fail(self, error: OSError) -> None:
        if self.lost is None:
            self.lost = error
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiting:
            future = self._waiting.popleft()[0]
            if not future.done():
                future.set_exception(error)
        if self._transport is not None:
            self._transport.abort()
