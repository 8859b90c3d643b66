"""The floor: a bare aiohttp passthrough on uvloop, for `bench/run.py` to measure against.

It reads the body, forwards it with the client's headers to `--upstream`, and streams the
answer back chunk by chunk: no keys, quotas, usage, log or metrics. Whatever the gateway
costs beyond this is the price of its features; no Python proxy on aiohttp costs less.

    .venv/bin/python bench/passthrough.py --port 9100 --upstream http://127.0.0.1:9000
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import AsyncIterator

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


def passthrough(upstream: str) -> web.Application:
    async def session(app: web.Application) -> AsyncIterator[None]:
        app["session"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),  # as the gateway's: no pool limit
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None),
        )
        yield
        await app["session"].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        async with request.app["session"].request(
            request.method,
            upstream + request.path_qs,
            headers=headers,
            data=body,
            allow_redirects=False,
        ) as reply:
            answer = web.StreamResponse(
                status=reply.status,
                headers={k: v for k, v in reply.headers.items() if k.lower() not in HOP_BY_HOP},
            )
            await answer.prepare(request)
            async for chunk in reply.content.iter_any():
                await answer.write(chunk)
            await answer.write_eof()
            return answer

    app = web.Application()
    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL the paths are appended to")
    parser.add_argument(
        "--reuse-port",
        action="store_true",
        help="SO_REUSEPORT: several of these share the port, as the gateway's WORKERS do",
    )
    parser.add_argument(
        "--backlog",
        type=int,
        default=128,
        help="the listen backlog (aiohttp's default 128; the gateway's is 1024)",
    )
    args = parser.parse_args()
    # A client that leaves mid-answer (wrk at the end of a run) is not worth a traceback here.
    logging.getLogger("aiohttp.server").disabled = True
    web.run_app(
        passthrough(args.upstream.rstrip("/")),
        host=args.host,
        port=args.port,
        access_log=None,
        backlog=args.backlog,
        reuse_port=args.reuse_port or None,
        loop=uvloop.new_event_loop(),
        print=lambda _: print(f"passthrough on http://{args.host}:{args.port}", flush=True),
    )
