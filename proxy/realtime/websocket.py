"""One WebSocket session relayed between two open ends: frames both ways, closes, bounds.

`realtime` opens both ends (the client's upgrade, the provider's connection); a `Session`
then carries frames with two pumps, one each way. Text, binary, ping and pong go on as they
came (both ends have autoping and autoclose off, so the far side answers its own pings and
closes). A close frame goes on with its code and reason, and the closing side is answered
with the code the other side answered. A side lost without a close frame makes the gateway
close the other: 1001 when the client went away, 1014 (bad gateway) when the provider did.
The gateway closes both sides with 1001 and a reason when the session is idle too long (a
client frame waiting for its gate, a turn in line for a slot, is no idle time), lasts too
long, or the gateway shuts down (`end`). On shutdown a session with a turn in flight
(`InFlight`: a Responses turn sent and not ended, a Realtime response begun and not done) is
let finish it first (`drain`), as an HTTP stream is: a Codex turn cut by a gateway's rollout
is paid for and lost. Meanwhile a turn the client starts is refused (its error event) and
never goes upstream; once none is in flight, the session ends; when the grace is over, the
drain ends it all the same (`end`).

Every close is bounded (CLOSE_SECONDS): a side that cannot take its close frame (a client
that reads nothing, whose socket buffer is full) has its connection dropped instead, so
the idle and session limits hold for it too, and a shutdown is not held by it.

Backpressure: each pump awaits its write before it reads the next frame, and aiohttp stops
reading a socket whose unread data passes 64 KiB, so a slow side slows the other one down
through TCP; nothing is buffered without bound. Invariant: when `run` returns both ends are
closed and both pumps are finished; nothing of the session is left.

A real key the provider quotes (an error event naming the credential it refused) reaches the
client masked, as an HTTP answer's body would (`echoes.masked`, the same rule and the same
mask of the key's length): in every text and binary frame, ping and pong payload and close
reason the provider sends. aiohttp hands over each message whole, so no key is split
between two.

What it does not do: keep a message's fragmentation (aiohttp reassembles fragments, and a
message goes on whole), or read what the frames say (`on_provider_text` sees the provider's
text frames after they went on, for usage; a `gate` may hold a client's text or binary
frame back (a provider's JSON reader may take either) and answer it itself, as the Responses
WebSocket mode's turn admission does, or send another in its place, `Forward`: a turn with
its target's model swapped in).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import aiohttp
from aiohttp import WebSocketError, WSCloseCode, WSMsgType, web
from aiohttp.http_websocket import WSMessageNoDecodeText

from proxy.relay.echoes import masked

log = logging.getLogger("llm_gateway")

# How long a closing end may take to answer our close frame before its socket is dropped.
# The frame itself goes out at once, so the other side learns of a close without delay.
CLOSE_ANSWER_SECONDS = 1.0
# How long closing an end may take in all (its close frame written, the answer awaited)
# before its connection is dropped: a client that reads nothing cannot hold a session.
CLOSE_SECONDS = CLOSE_ANSWER_SECONDS + 1.0
# Codes a close frame may carry on the wire (RFC 6455 §7.4.1): 1005 and 1006 only describe.
_SENDABLE = (
    frozenset(range(1000, 1004)) | frozenset(range(1007, 1015)) | frozenset(range(3000, 5000))
)

# The code that says a close frame carried none (RFC 6455 §7.4.1), which aiohttp reads as 0.
NO_STATUS = 1005

CLIENT, PROVIDER = "client", "provider"


class _End(Protocol):
    """What a pump uses of either end: aiohttp's server and client WebSockets alike."""

    @property
    def close_code(self) -> int | None: ...

    async def receive(self, timeout: float | None = None) -> WSMessageNoDecodeText: ...

    async def send_frame(
        self, message: bytes, opcode: WSMsgType, compress: int | None = None
    ) -> None: ...

    async def ping(self, message: bytes = b"") -> None: ...

    async def pong(self, message: bytes = b"") -> None: ...

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"") -> bool: ...


@dataclass(frozen=True, slots=True)
class Forward:
    """A gate's verdict: this frame goes upstream in place of the client's."""

    frame: bytes


# The frames a gate reads: binary ones too, whose bytes a provider's JSON reader may take as
# readily as a text frame's (Python's json.loads, JSON.parse of a Buffer): a turn or a session
# update sent as binary went past the gate unread.
_DATA = (WSMsgType.TEXT, WSMsgType.BINARY)

# What a gate makes of a client's text or binary frame: None lets it go on as sent; `Forward` sends
# another in its place; bytes are the frame the client gets back instead (a refusal).
Gated = bytes | Forward | None
# A gate answers at once, or with an awaitable when its answer may take a while (a turn
# waiting for a slot of its key): meanwhile the client's next message is read (`_awaited`).
Gate = Callable[[bytes], Gated | Awaitable[Gated]]


class InFlight(Protocol):
    """A session's turns, as its drain sees them (`turns.Turns`, `responding.Responding`)."""

    def is_turning(self) -> bool:
        """A turn is in flight: sent upstream, and its last event not yet come."""
        ...

    def refusal(self, frame: bytes) -> bytes | None:
        """For a client's frame that starts a turn, the error event it gets in its place while
        the gateway drains; None for any other."""
        ...


class _Dropped:
    """The verdict on a frame whose client closed or was lost while its gate waited."""


_DROPPED = _Dropped()
# The client's messages that wait behind a gate's verdict; any other (a close, the socket
# lost) ends the wait, the frame dropped.
_WAITING = frozenset((WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.PING, WSMsgType.PONG))


class Session:
    """One relayed session: the two ends, a pump each way, the counts and how it ended."""

    def __init__(
        self,
        client: web.WebSocketResponse[Literal[False]],
        provider: aiohttp.ClientWebSocketResponse[Literal[False]],
        idle_seconds: float,
        max_seconds: float,
        on_provider_text: Callable[[bytes], None],
        abort_client: Callable[[], None] = lambda: None,
        gate: Gate | None = None,
        secrets: tuple[bytes, ...] = (),
        turns: InFlight | None = None,
    ) -> None:
        self._ends: dict[str, _End] = {CLIENT: client, PROVIDER: provider}
        # Dropping a connection whose close cannot complete: the client's transport (given,
        # as its WebSocketResponse does not offer it; a cancelled close only closes it once
        # its buffer drains, which a client that reads nothing never lets happen); aiohttp
        # already drops the provider's connection when its close is cancelled.
        self._abort: dict[str, Callable[[], None]] = {CLIENT: abort_client, PROVIDER: _nothing}
        self._idle_seconds = idle_seconds
        self._max_seconds = max_seconds
        self._on_provider_text = on_provider_text
        # Asked of each client text or binary frame before it goes on (`Gated`): a turn the gateway
        # refused, or one with its target's model swapped in (`turns`).
        self._gate = gate
        # The real keys (`echoes.searched`) masked in whatever the provider sends the client.
        self._secrets = secrets
        self._loop = asyncio.get_running_loop()
        self._last_frame = self._loop.time()
        # A client's frame waiting for its gate (a turn in line for a slot): the client waits
        # on the gateway, so the session is not idle meanwhile.
        self._is_gating = False
        # What is in flight, for the drain (None: nothing known; the session ends at once).
        self._turns = turns
        self._is_draining = False  # the gateway shuts down: the session ends after its turn
        self.frames = {CLIENT: 0, PROVIDER: 0}  # frames sent by each side, close excluded
        # client | provider (it closed) | client_lost | provider_lost | client_error |
        # provider_error (a frame aiohttp refused) | idle | max_duration | shutdown; None: open.
        self.ended_by: str | None = None
        self.close_code: int | None = None

    async def run(self) -> None:
        """Carry frames both ways until a side closes or is lost, or a bound is reached."""
        started = self._loop.time()
        pumps = [
            asyncio.create_task(self._pump(CLIENT, PROVIDER), name="websocket-up"),
            asyncio.create_task(self._pump(PROVIDER, CLIENT), name="websocket-down"),
        ]
        try:
            while not any(pump.done() for pump in pumps):
                now = self._loop.time()
                if now >= started + self._max_seconds:
                    await self.end("max_duration")
                    break
                if self._is_gating:  # idle from the end of the wait, not through it
                    self._last_frame = now
                if now >= self._last_frame + self._idle_seconds:
                    await self.end("idle")
                    break
                wake = min(started + self._max_seconds, self._last_frame + self._idle_seconds)
                await asyncio.wait(pumps, timeout=wake - now, return_when=asyncio.FIRST_COMPLETED)
            # The pump that ended closed the other end, so the other pump is ending too.
            await asyncio.wait(pumps, timeout=CLOSE_ANSWER_SECONDS * 2)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.wait(pumps)
            for pump in pumps:
                if not pump.cancelled() and pump.exception() is not None:
                    log.error("websocket pump failed", exc_info=pump.exception())
            if self.ended_by is None:  # the handler was cancelled: the client's socket is gone
                self.ended_by, self.close_code = f"{CLIENT}_lost", WSCloseCode.GOING_AWAY
            await asyncio.gather(
                *(self._close(side, WSCloseCode.GOING_AWAY) for side in self._ends)
            )

    async def end(self, why: str) -> None:
        """The gateway ends the session: 1001 and the reason, to both sides."""
        if self.ended_by is None:
            self.ended_by, self.close_code = why, WSCloseCode.GOING_AWAY
        reason = f"llm-gateway: {why.replace('_', ' ')}".encode()
        await asyncio.gather(
            *(self._close(side, WSCloseCode.GOING_AWAY, reason) for side in self._ends)
        )

    async def drain(self) -> None:
        """The gateway shuts down: end the session now, or once its turn in flight is over
        (`_pump`); a turn the client starts meanwhile is refused."""
        self._is_draining = True
        if not self.is_turning():
            await self.end("shutdown")

    def is_turning(self) -> bool:
        """A turn is in flight (see `InFlight`)."""
        return self._turns is not None and self._turns.is_turning()

    async def _pump(self, source_side: str, target_side: str) -> None:
        """Frames from one side to the other, in order, one write at a time."""
        source, target = self._ends[source_side], self._ends[target_side]
        is_down = source_side == PROVIDER
        secrets = self._secrets if is_down else ()
        # The source's next message, read while a gate waited (`_awaited`).
        held: asyncio.Task[WSMessageNoDecodeText] | None = None
        try:
            while True:
                if held is None:
                    message = await source.receive()
                else:
                    message, held = await held, None
                kind = message.type
                try:
                    is_drained = self._is_draining and not is_down
                    refused = self._refused(kind, message.data) if is_drained else None
                    if refused is not None:  # a new turn while draining: never sent upstream
                        await source.send_frame(refused, WSMsgType.TEXT)
                    elif kind in _DATA and not is_down and self._gate is not None:
                        answer = self._gate(message.data)
                        verdict: Gated | _Dropped
                        if answer is None or isinstance(answer, (bytes, Forward)):
                            verdict = answer
                        else:  # an answer that may take a while: the client is heard meanwhile
                            verdict, held = await self._awaited(source, answer)
                        if isinstance(verdict, _Dropped):
                            pass  # its client closed meanwhile: the close comes next (`held`)
                        elif verdict is None:
                            await target.send_frame(message.data, kind)
                        elif isinstance(verdict, Forward):
                            await target.send_frame(verdict.frame, kind)
                        elif isinstance(verdict, bytes):
                            await source.send_frame(verdict, WSMsgType.TEXT)
                    elif kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
                        data = masked(message.data, secrets)
                        await target.send_frame(data, kind)
                        if is_down and kind is WSMsgType.TEXT:
                            self._on_provider_text(data)
                    elif kind is WSMsgType.PING:
                        await target.ping(masked(message.data, secrets))
                    elif kind is WSMsgType.PONG:
                        await target.pong(masked(message.data, secrets))
                    elif kind is WSMsgType.CLOSE:
                        reason = masked((message.extra or "").encode(), secrets)
                        return await self._pass_close(
                            source_side, target_side, message.data, reason
                        )
                    elif kind is WSMsgType.CLOSING:
                        return  # another task is closing this end
                    elif kind is WSMsgType.ERROR and isinstance(message.data, WebSocketError):
                        # aiohttp closed the source itself (1009 too big, 1002, 1007): say so.
                        return await self._broke(source_side, target_side, message.data.code)
                    else:  # CLOSED, or ERROR: the side went away without a close frame
                        return await self._lost(source_side, target_side)
                except ConnectionResetError:  # the target went away mid-write
                    return await self._lost(target_side, source_side)
                self.frames[source_side] += 1
                self._last_frame = self._loop.time()
                if self._is_draining and not self.is_turning():  # its turn ended (or was refused)
                    return await self.end("shutdown")
        finally:
            if held is not None:  # the session ended while a message was being read
                held.cancel()

    def _refused(self, kind: WSMsgType, data: bytes) -> bytes | None:
        """While draining: the error event in place of a client's frame that starts a turn."""
        if kind not in _DATA or self._turns is None:
            return None
        return self._turns.refusal(data)

    async def _awaited(
        self, source: _End, pending: Awaitable[Gated]
    ) -> tuple[Gated | _Dropped, asyncio.Task[WSMessageNoDecodeText]]:
        """A gate's verdict that may take a while (a turn waiting for a slot), and the
        source's next message, read meanwhile: a close or a socket lost ends the wait (the
        verdict cancelled, the frame dropped: `_DROPPED`), so a client that gives up is
        answered at once and its turn never goes upstream; any other message waits its
        turn behind the verdict. A verdict that comes first leaves the read under way."""
        verdict = asyncio.ensure_future(pending)
        receiving = asyncio.ensure_future(source.receive())
        self._is_gating = True
        try:
            await asyncio.wait((verdict, receiving), return_when=asyncio.FIRST_COMPLETED)
            if not verdict.done() and receiving.result().type not in _WAITING:
                verdict.cancel()  # a turn waiting for a slot leaves its line
                await asyncio.wait((verdict,))
                return _DROPPED, receiving
            return await verdict, receiving
        except BaseException:  # the session ends meanwhile (the pump cancelled), or a bug
            verdict.cancel()
            receiving.cancel()
            raise
        finally:
            self._is_gating = False
            self._last_frame = self._loop.time()

    async def _pass_close(
        self, source_side: str, target_side: str, code: int, reason: bytes
    ) -> None:
        """Pass a close frame on; answer the closing side with what the other side answered."""
        if self.ended_by is None:
            self.ended_by, self.close_code = source_side, code or NO_STATUS
        code = code if code in _SENDABLE else WSCloseCode.OK  # an empty close frame has no code
        await self._close(target_side, code, reason)
        answer = self._ends[target_side].close_code
        await self._close(source_side, answer if answer in _SENDABLE else code)

    async def _broke(self, source_side: str, other_side: str, code: int) -> None:
        """A side sent what aiohttp refused, and was closed with `code`: close the other too."""
        if self.ended_by is None:
            self.ended_by, self.close_code = f"{source_side}_error", code
        reason = f"llm-gateway: the {source_side} sent a frame refused with {code}".encode()
        await self._close(other_side, WSCloseCode.GOING_AWAY, reason)

    async def _lost(self, gone_side: str, other_side: str) -> None:
        """A side went away without a close frame: close the other with 1001 or 1014."""
        if gone_side == CLIENT:
            code, reason = WSCloseCode.GOING_AWAY, b"llm-gateway: client went away"
        else:
            code, reason = WSCloseCode.BAD_GATEWAY, b"llm-gateway: provider connection lost"
        if self.ended_by is None:
            self.ended_by, self.close_code = f"{gone_side}_lost", code
        await self._close(other_side, code, reason)

    async def _close(self, side: str, code: int, reason: bytes = b"") -> None:
        """Close one end politely within CLOSE_SECONDS, else drop its connection.

        aiohttp's close first waits until the close frame is written, and a peer that reads
        nothing never lets it be: without a bound the session (and a drain) waited forever.
        """
        try:
            await asyncio.wait_for(self._ends[side].close(code=code, message=reason), CLOSE_SECONDS)
        except TimeoutError:
            self._abort[side]()

    def tally(self) -> dict[str, object]:
        """The session's part of its log line."""
        return {
            "frames_up": self.frames[CLIENT],
            "frames_down": self.frames[PROVIDER],
            "ended_by": self.ended_by,
            "close_code": int(self.close_code) if self.close_code is not None else None,
        }


def _nothing() -> None:
    pass
