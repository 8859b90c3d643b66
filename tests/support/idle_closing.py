"""A provider that closes keep-alive connections idle for `idle` seconds, as uvicorn (vLLM,
LiteLLM: 5 s) and Node.js (5 s, said in `Keep-Alive: timeout=5`) do, on the loop's clock.

A request that arrives on a connection idle that long crossed the server's close: it is
dropped unread and the connection closed, as when the server's FIN was on its way while the
request was written (over a network, a window a client cannot see). So a client that sends
on a connection past the server's idle time gets it closed before any answer, every time,
not by the luck of a race. `answered` lists every request read (its connection's number
and body), so a request the client sent twice shows twice.
"""

from __future__ import annotations

import asyncio

from yarl import URL

ANSWER = (
    b'{"id":"chatcmpl-1","object":"chat.completion","created":0,"model":"m","choices":'
    b'[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
)


class IdleClosing:
    """The server: `start()` it (its base URL, also `url`), `close()` it."""

    def __init__(self, idle: float, hint: bool) -> None:
        self.idle, self.hint = idle, hint
        self.answered: list[tuple[int, bytes]] = []
        self.dropped = 0  # requests that came on a connection idle past `idle`
        self.opened = 0
        self.url = URL()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> URL:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = URL(f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}")
        return self.url

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        self.opened += 1
        number = self.opened
        self._writers.append(writer)
        keep_alive = f"Keep-Alive: timeout={int(self.idle)}\r\n" if self.hint else ""
        answered_at = loop.time()
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if loop.time() - answered_at >= self.idle:  # closed as it came: unread
                    self.dropped += 1
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                self.answered.append((number, body))
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + keep_alive.encode()
                    + f"Content-Length: {len(ANSWER)}\r\n\r\n".encode()
                    + ANSWER
                )
                await writer.drain()
                answered_at = loop.time()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
