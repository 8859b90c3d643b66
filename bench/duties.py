"""The duties floor: the least SPEC asks of every proxied request, on the best bare foundation.

Issue 30 asks the gateway, every feature on, for 0.8x the throughput of the best bare
foundation (aiohttp's low-level server, the gateway's upstream wire, its GC setting:
`foundations.py lowlevel+wire+gc`). This passthrough runs on that foundation and does, in
the cheapest plain form it knows, what SPEC requires of each request the gateway relays,
and nothing else:

- a request id (the client's `x-request-id`, else 128 random bits);
- the virtual key read from the first present of its four headers, looked up, 401 without;
- the path kept inside the provider's base URL (`..`, encoded slashes: 400);
- the body read whole, bounded (413), a chat body parsed: 400 without `model`/`messages`;
- admission on a sliding window of the key's requests, checked and counted in one step;
- upstream headers: the client's, without the key's headers, hop-by-hop ones and Host,
  with the provider's key;
- the answer's headers without hop-by-hop ones and the provider's rate-limit headers, with
  `x-request-id` and the key's `x-ratelimit-*-requests` trio;
- the body passed as it came (a small known length in one write, else chunk by chunk),
  searched for the real key (a provider may echo it);
- the usage read from a JSON answer (the `usage` of an SSE stream's last events), charged
  to the key's totals;
- the SPEC log line (timestamp, request_id, key, provider, method, path, model, stream,
  status, duration_ms, ttft_ms, usage) handed to a writer thread, off the request path;
- the metrics SPEC names kept as plain numbers: requests by provider, model and status,
  duration and first-byte histograms, tokens, requests in flight.

It is a floor, not a gateway: refusals are answered but not logged (the load has none); no failover, breakers, cache, teams, pricing, tracing, CORS,
streams' idle timeouts, reloads, admin, or any dialect beyond OpenAI's errors. A gateway
that met SPEC could not be cheaper than this per request; `ab.py duties ...` races it.

    .venv/bin/python bench/duties.py --port 9100 --keys /tmp/keys.json
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import json
import logging
import queue
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import uvloop
from aiohttp import web
from foundations import HOP_BY_HOP

KEY_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key")
DROPPED_UP = HOP_BY_HOP | frozenset(KEY_HEADERS)
MAX_BODY_BYTES = 10 << 20
WHOLE_BODY_BYTES = 1 << 20
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def refusal(status: int, code: str, message: str, request_id: str) -> web.Response:
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    }
    return web.Response(
        status=status,
        body=orjson.dumps(body),
        content_type="application/json",
        headers={"x-request-id": request_id},
    )


class Key:
    __slots__ = ("name", "provider", "base", "secret", "requests", "window", "stamps", "tokens")

    def __init__(
        self, name: str, provider: str, base: str, secret: str, quota: dict[str, Any]
    ) -> None:
        self.name, self.provider, self.base, self.secret = name, provider, base, secret
        self.requests = quota.get("requests")
        self.window = float(quota.get("window_seconds", 60))
        self.stamps: collections.deque[float] = collections.deque()
        self.tokens = 0

    def admit(self, now: float) -> int | None:
        """Remaining requests after this one, or None: over quota (not counted)."""
        stamps, since = self.stamps, now - self.window
        while stamps and stamps[0] <= since:
            stamps.popleft()
        if self.requests is not None and len(stamps) >= self.requests:
            return None
        stamps.append(now)
        return -1 if self.requests is None else self.requests - len(stamps)


class Metrics:
    def __init__(self) -> None:
        self.requests: collections.Counter[tuple[str, str, int]] = collections.Counter()
        self.duration = [0] * (len(BUCKETS) + 1)
        self.ttft = [0] * (len(BUCKETS) + 1)
        self.sums = [0.0, 0.0]
        self.tokens = [0, 0]
        self.in_flight = 0

    def observe(
        self, provider: str, model: str, status: int, duration: float, ttft: float, usage: Any
    ) -> None:
        self.requests[provider, model, status] += 1
        self.duration[bisect.bisect_left(BUCKETS, duration)] += 1
        self.ttft[bisect.bisect_left(BUCKETS, ttft)] += 1
        self.sums[0] += duration
        self.sums[1] += ttft
        if usage:
            self.tokens[0] += usage.get("prompt_tokens", 0)
            self.tokens[1] += usage.get("completion_tokens", 0)


class Log:
    """Lines formatted and written by a thread: the request path only enqueues a dict."""

    def __init__(self, path: Path) -> None:
        self.lines: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self.file = path.open("ab")
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        get, file = self.lines.get, self.file
        while True:
            batch = [get()]
            while not self.lines.empty():
                batch.append(get())
            out = []
            for fields in batch:
                stamp = fields["timestamp"]
                fields["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(stamp)) + (
                    f".{int(stamp * 1000) % 1000:03d}Z"
                )
                out.append(orjson.dumps(fields, option=orjson.OPT_APPEND_NEWLINE))
            file.write(b"".join(out))
            file.flush()


def load_keys(path: Path) -> dict[str, Key]:
    document = json.loads(path.read_text())
    providers = document["providers"]
    return {
        virtual: Key(
            entry.get("name", virtual[:6]),
            entry["provider"],
            providers[entry["provider"]]["base_url"].rstrip("/"),
            entry["api_key"],
            entry.get("quota", {}),
        )
        for virtual, entry in document["virtual_keys"].items()
    }


def presented(headers: Any) -> str | None:
    for name in KEY_HEADERS:
        value = headers.get(name)
        if value:
            return (
                value[7:] if name == "authorization" and value[:7].lower() == "bearer " else value
            )
    return None


def usage_of_stream(tail: bytes) -> Any:
    """The usage of an SSE stream's last events (OpenAI sends it in the last data chunk)."""
    for line in reversed(tail.split(b"\n")):
        if line.startswith(b"data: {") and b'"usage"' in line:
            return orjson.loads(line[6:]).get("usage")
    return None


def handler(wire: Any, keys: dict[str, Key], log: Log, metrics: Metrics) -> Any:
    from yarl import URL

    async def forward(request: web.BaseRequest) -> web.StreamResponse:
        began, wall = time.perf_counter(), time.time()
        headers = request.headers
        request_id = headers.get("x-request-id") or f"{random.getrandbits(128):032x}"
        path = request.raw_path
        virtual = presented(headers)
        key = None if virtual is None else keys.get(virtual)
        if key is None:
            return refusal(401, "invalid_api_key", "Invalid virtual key.", request_id)
        if ".." in path or "%2f" in path.lower() or not path.startswith("/v1/"):
            return refusal(
                400, "invalid_path", "The path leaves the provider's base URL.", request_id
            )
        if (request.content_length or 0) > MAX_BODY_BYTES:
            return refusal(413, "body_too_large", "The body is too large.", request_id)
        body = await request.read()
        model, stream = None, False
        if path.endswith(("/chat/completions", "/messages")):
            try:
                document = orjson.loads(body)
            except orjson.JSONDecodeError:
                return refusal(400, "invalid_json", "The body is not JSON.", request_id)
            model, messages = document.get("model"), document.get("messages")
            if not isinstance(model, str) or not model:
                return refusal(400, "invalid_request", "'model' is required.", request_id)
            if not isinstance(messages, list) or not messages:
                return refusal(400, "invalid_request", "'messages' is required.", request_id)
            stream = document.get("stream") is True
        remaining = key.admit(time.monotonic())
        if remaining is None:
            return refusal(429, "rate_limit_exceeded", "Over quota.", request_id)
        metrics.in_flight += 1
        up = {k: v for k, v in headers.items() if k.lower() not in DROPPED_UP}
        up["Authorization"] = "Bearer " + key.secret
        status, usage, first = 502, None, began
        try:
            try:
                reply = await wire.request(request.method, URL(key.base + path[3:]), up, body)
            except Exception:  # unreachable, refused, cut before the head
                return refusal(
                    502, "upstream_unreachable", "The provider is unreachable.", request_id
                )
            first, status, answer_headers = time.perf_counter(), reply.status, reply.headers
            down = {
                k: v
                for k, v in answer_headers.items()
                if k.lower() not in HOP_BY_HOP and not k.lower().startswith("x-ratelimit-")
            }
            down["x-request-id"] = request_id
            down["x-ratelimit-limit-requests"] = str(key.requests)
            down["x-ratelimit-remaining-requests"] = str(remaining)
            down["x-ratelimit-reset-requests"] = f"{key.window:g}s"
            secret = key.secret.encode()
            length, kind = reply.content_length, answer_headers.get("content-type", "")
            try:
                if (
                    length is not None
                    and length <= WHOLE_BODY_BYTES
                    and not kind.startswith("text/event-stream")
                ):
                    data = await reply.read()
                    if secret in data:
                        data = data.replace(secret, b"*" * len(secret))
                    if status < 400 and kind.startswith("application/json"):
                        usage = orjson.loads(data).get("usage")
                    answer = web.Response(status=status, headers=down, body=data)
                    await answer.prepare(request)
                    await answer.write_eof()
                    return answer
                answer = web.StreamResponse(status=status, headers=down)
                await answer.prepare(request)
                tail = b""
                async for chunk in reply.content.iter_any():
                    if secret in chunk:
                        chunk = chunk.replace(secret, b"*" * len(secret))
                    await answer.write(chunk)
                    tail = chunk
                await answer.write_eof()
                if status < 400 and kind.startswith("text/event-stream"):
                    usage = usage_of_stream(tail)
                return answer
            finally:
                reply.release()
        finally:
            end = time.perf_counter()
            metrics.in_flight -= 1
            if usage:
                key.tokens += usage.get("total_tokens", 0)
            metrics.observe(key.provider, model or "", status, end - began, first - began, usage)
            log.lines.put(
                {
                    "timestamp": wall,
                    "request_id": request_id,
                    "key": key.name,
                    "provider": key.provider,
                    "method": request.method,
                    "path": path,
                    "model": model,
                    "stream": stream,
                    "status": status,
                    "duration_ms": round((end - began) * 1000, 1),
                    "ttft_ms": round((first - began) * 1000, 1),
                    "usage": usage and {**usage, "estimated": False},
                }
            )

    return forward


async def serve(args: argparse.Namespace) -> None:
    from proxy.upstream.wire import Wire

    wire = Wire(connect_timeout=30)
    forward = handler(wire, load_keys(args.keys), Log(args.log), Metrics())
    runner = web.ServerRunner(web.Server(forward, access_log=None))
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    print(f"duties floor on http://{args.host}:{args.port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await wire.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--keys", type=Path, required=True, help="a keys.json")
    parser.add_argument("--log", type=Path, default=Path("/dev/null"), help="the JSON lines")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the gateway's own modules
    from proxy.runtime.server import tune_gc

    tune_gc()
    logging.getLogger("aiohttp.server").disabled = True
    uvloop.run(serve(args))


if __name__ == "__main__":
    main()
