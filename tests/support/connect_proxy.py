"""A forward proxy on loopback, as a corporate egress proxy behaves (squid, tinyproxy).

It tunnels `CONNECT host:port` (200, then bytes both ways, untouched) and forwards requests
in absolute form (`GET http://host:port/path HTTP/1.1`) to their origin, answer by answer
on kept-alive connections, a chunked body chunk by chunk, an upgrade (101: a WebSocket) as
bytes both ways from then on. With `credentials` ("user:pass")
it asks for them: a request without the matching `Proxy-Authorization: Basic` gets 407.
What it saw is kept: each CONNECT's target, each forwarded URL, each Proxy-Authorization
(None when absent), and how many client connections it took. `hosts` sends a tunnel to a
name elsewhere (`"bedrock.us-west-2.amazonaws.com:443": "127.0.0.1:<port>"`), as /etc/hosts
would: a fake stands in for a provider's real host, the gateway's URL unchanged.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from dataclasses import dataclass, field

from yarl import URL


@dataclass
class ConnectProxy:
    credentials: str | None = None
    hosts: dict[str, str] = field(default_factory=dict)
    connects: list[str] = field(default_factory=list)
    forwarded: list[str] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)
    connections: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> ConnectProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def url(self, userinfo: str = "") -> str:
        """The proxy's URL as HTTPS_PROXY holds it, with `userinfo` ("user:pass@")."""
        return f"http://{userinfo}127.0.0.1:{self.port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    async def __aenter__(self) -> ConnectProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        upstreams: dict[str, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                fields = [line.split(":", 1) for line in lines[1:] if line]
                headers = {name.strip().lower(): value.strip() for name, value in fields}
                authorization = headers.get("proxy-authorization")
                self.authorizations.append(authorization)
                if self.credentials is not None and authorization != self._expected():
                    writer.write(
                        b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                        b'Proxy-Authenticate: Basic realm="egress"\r\n'
                        b"Content-Length: 0\r\n\r\n"
                    )
                    await writer.drain()
                    continue
                if method == "CONNECT":
                    self.connects.append(target)
                    await self._tunnel(target, reader, writer)
                    return
                self.forwarded.append(target)
                await self._forward(method, target, lines, headers, reader, writer, upstreams)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            return  # (cancelled: the proxy closes; the task ends quietly)
        finally:
            for _, upstream in upstreams.values():
                upstream.close()
            writer.close()
            self._tasks.discard(task)

    def _expected(self) -> str:
        assert self.credentials is not None
        return "Basic " + base64.b64encode(self.credentials.encode()).decode()

    async def _tunnel(
        self, target: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        host, _, port = self.hosts.get(target, target).rpartition(":")
        try:
            origin_reader, origin_writer = await asyncio.open_connection(host.strip("[]"), port)
        except OSError:
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            return
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        try:
            await asyncio.gather(_pipe(reader, origin_writer), _pipe(origin_reader, writer))
        finally:
            origin_writer.close()

    async def _forward(
        self,
        method: str,
        target: str,
        lines: list[str],
        headers: dict[str, str],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstreams: dict[str, tuple[asyncio.StreamReader, asyncio.StreamWriter]],
    ) -> None:
        url = URL(target)
        authority = f"{url.host}:{url.port}"
        if authority not in upstreams:
            upstreams[authority] = await asyncio.open_connection(url.host, url.port)
        origin_reader, origin_writer = upstreams[authority]
        kept = [line for line in lines[1:] if line and not line.lower().startswith("proxy-")]
        request_line = f"{method} {url.raw_path_qs} HTTP/1.1"
        origin_writer.write("\r\n".join([request_line, *kept, "", ""]).encode("latin-1"))
        length = int(headers.get("content-length", "0"))
        if length:
            origin_writer.write(await reader.readexactly(length))
        await origin_writer.drain()
        answer = await origin_reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        answer_lines = answer.decode("latin-1").lower().split("\r\n")
        answer_headers = dict(
            (name.strip(), value.strip())
            for name, value in (line.split(":", 1) for line in answer_lines[1:] if line)
        )
        if method == "HEAD":
            return
        if answer_lines[0].split(" ")[1] == "101":  # an upgrade (WebSocket): bytes both ways
            await asyncio.gather(_pipe(reader, origin_writer), _pipe(origin_reader, writer))
            raise ConnectionError("the upgraded connection ended")
        if answer_headers.get("transfer-encoding") == "chunked":
            while True:  # chunk by chunk, each passed on as it comes
                size_line = await origin_reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                writer.write(size_line)
                if size == 0:
                    writer.write(await origin_reader.readuntil(b"\r\n"))  # no trailers
                    await writer.drain()
                    return
                writer.write(await origin_reader.readexactly(size + 2))
                await writer.drain()
        writer.write(await origin_reader.readexactly(int(answer_headers["content-length"])))
        await writer.drain()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.write_eof()
