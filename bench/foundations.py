"""Foundations: the same bare passthrough on each server and upstream client worth weighing.

The gateway's cost that no feature explains is the foundation under it: the server that
parses the client's request and the client that sends it upstream. This passthrough does
what `passthrough.py` (the floor) does — read the body, forward it with the client's headers
(hop-by-hop ones aside), stream the answer back chunk by chunk — on a chosen pair:

    server  app       aiohttp's web.Application (router, middlewares, the floor's)
            lowlevel  aiohttp's low-level web.Server: one handler, no router
    client  session   aiohttp's ClientSession (the floor's and today's gateway's)
            aiosonic  aiosonic's HTTPClient, streamed (read_chunks)
            pyreqwest pyreqwest (Rust reqwest), streamed (read_chunk)
            wire      the gateway's own upstream client (proxy/upstream/wire.py: a
                      keep-alive HTTP/1.1 pool on httptools' parser)
    --gc            the gateway's GC setting (server.tune_gc) before serving

`bench/ab.py foundation:lowlevel+session+gc ...` races them interleaved; `--check-stream`
asserts that a contender passes an SSE stream chunk by chunk (each chunk written to the
client as it arrives, not batched), which every candidate must before it counts.

    .venv/bin/python bench/foundations.py --port 9100 --upstream http://127.0.0.1:9000 \
        --server lowlevel --client wire --gc
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from aiohttp import web

HOP_BY_HOP = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    )
)

# An upstream answer: status, headers, and its body as chunks in arrival order.
Answer = tuple[int, list[tuple[str, str]], AsyncIterator[bytes]]
Send = Callable[[str, str, dict[str, str], bytes], Awaitable[tuple[Answer, Callable[[], Any]]]]


def kept(headers: Any) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}


# --- upstream clients: each returns (answer, release) ---


async def session_client(upstream: str) -> tuple[Send, Callable[[], Awaitable[None]]]:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None),
    )

    async def send(method: str, path: str, headers: dict[str, str], body: bytes) -> Any:
        reply = await session.request(
            method, upstream + path, headers=headers, data=body, allow_redirects=False
        )
        return (reply.status, list(reply.headers.items()), reply.content.iter_any()), reply.release

    return send, session.close


async def aiosonic_client(upstream: str) -> tuple[Send, Callable[[], Awaitable[None]]]:
    import aiosonic

    client = aiosonic.HTTPClient()

    async def send(method: str, path: str, headers: dict[str, str], body: bytes) -> Any:
        reply = await client.request(
            upstream + path, method, headers=headers, data=body, stream=True, follow=False
        )
        return (reply.status_code, list(reply.headers.items()), reply.read_chunks()), lambda: None

    async def close() -> None:
        await client.connector.cleanup()

    return send, close


async def pyreqwest_client(upstream: str) -> tuple[Send, Callable[[], Awaitable[None]]]:
    from pyreqwest.client import ClientBuilder

    client = ClientBuilder().follow_redirects(False).gzip(False).build()

    async def send(method: str, path: str, headers: dict[str, str], body: bytes) -> Any:
        request = client.request(method, upstream + path).headers(headers).body_bytes(body)
        request = request.streamed_read_buffer_limit(0)  # hand each chunk on as it comes
        context = request.build_streamed()
        reply = await context.__aenter__()

        async def chunks() -> AsyncIterator[bytes]:
            while (chunk := await reply.body_reader.read_chunk()) is not None:
                yield bytes(chunk)

        async def release() -> None:
            await context.__aexit__(None, None, None)

        return (reply.status, list(reply.headers.items()), chunks()), release

    async def close() -> None:
        await client.close()

    return send, close


async def wire_client(upstream: str) -> tuple[Send, Callable[[], Awaitable[None]]]:
    from yarl import URL

    from proxy.upstream.wire import Wire

    wire, base = Wire(connect_timeout=30), URL(upstream)

    async def send(method: str, path: str, headers: dict[str, str], body: bytes) -> Any:
        reply = await wire.request(method, base.with_path("").join(URL(path)), headers, body)
        return (reply.status, list(reply.headers.items()), reply.content.iter_any()), reply.release

    return send, wire.close


CLIENTS = {
    "session": session_client,
    "aiosonic": aiosonic_client,
    "pyreqwest": pyreqwest_client,
    "wire": wire_client,
}


def handler(box: dict[str, Send]) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
    async def forward(request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        (status, headers, chunks), release = await box["send"](
            request.method, request.path_qs, kept(request.headers), body
        )
        try:
            answer = web.StreamResponse(status=status, headers=kept(dict(headers)))
            await answer.prepare(request)
            async for chunk in chunks:
                await answer.write(chunk)
            await answer.write_eof()
            return answer
        finally:
            done = release()
            if asyncio.iscoroutine(done):
                await done

    return forward


async def serve(args: argparse.Namespace) -> None:
    send, close = await CLIENTS[args.client](args.upstream.rstrip("/"))
    box = {"send": send}
    forward = handler(box)
    if args.server == "app":
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", forward)
        runner: web.BaseRunner[Any] = web.AppRunner(app, access_log=None)
    else:
        runner = web.ServerRunner(web.Server(forward, access_log=None))
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    print(f"foundation {args.server}+{args.client} on http://{args.host}:{args.port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--server", choices=("app", "lowlevel"), default="app")
    parser.add_argument("--client", choices=sorted(CLIENTS), default="session")
    parser.add_argument("--gc", action="store_true", help="the gateway's GC setting")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the gateway's own modules
    if args.gc:
        from proxy.runtime.server import tune_gc

        tune_gc()
    logging.getLogger("aiohttp.server").disabled = True
    uvloop.run(serve(args))


if __name__ == "__main__":
    main()
