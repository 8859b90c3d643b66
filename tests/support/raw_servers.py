"""Raw TCP servers for tests that speak HTTP by hand, closed with their connections.

From Python 3.12.1 on, `asyncio.Server.wait_closed` (and so `async with server`) waits until
every connection the server accepted has closed; a keep-alive pool on the other side (the
gateway's `Wire`) holds them open until its own close, after the test, so the test waited for
ever. `RawServer` closes the connections it accepted when it closes, as 3.13's
`Server.close_clients` does, on every Python the project runs on.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

Handle = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None]


class RawServer:
    """`asyncio.start_server`'s server, whose close also closes what it accepted."""

    def __init__(self) -> None:
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    @classmethod
    async def start(cls, handle: Handle, host: str, port: int, **kwargs: Any) -> RawServer:
        raw = cls()

        async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            raw._writers.append(writer)  # held: 3.13 closes a collected writer's connection
            result = handle(reader, writer)
            if inspect.isawaitable(result):
                await result

        raw._server = await asyncio.start_server(tracked, host, port, **kwargs)
        return raw

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        assert self._server is not None
        return tuple(self._server.sockets)

    def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()

    async def wait_closed(self) -> None:
        assert self._server is not None
        await self._server.wait_closed()

    async def __aenter__(self) -> RawServer:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()
