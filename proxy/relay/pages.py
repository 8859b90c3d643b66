"""A further page of a provider's list, asked by the gateway itself: the page after (or
before) the one a client's request got, for a restricted key's model list (listing.py).

It goes to the target and pool key that answered the client's request, with the client's
headers (the provider's version, its betas), as one attempt: no retry, no fallback, no
breaker told (`Failover.fetch`), and is read whole up to `MAX_BYTES`, each silence bounded
by STREAM_IDLE_TIMEOUT, decoded when it came compressed. What is not done: a page that does
not come, comes as an error, or is no JSON object is not a failure of the request: it is
None, and the caller answers with what it has (saying where to page on from), so a client
pages on past it as it would past a page the provider cut short. It is said on stderr.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDictProxy

from proxy.encodings import content_coding, decode_body
from proxy.errors import GatewayError
from proxy.record import Record
from proxy.relay.links import MAX_BYTES
from proxy.upstream.failover import Failover
from proxy.upstream.signing import SigningFailed
from proxy.upstream.targets import Plan

log = logging.getLogger("llm_gateway")


class NotRead(Exception):
    """A page that did not come whole as JSON, and why."""


class Pages:
    """Asks the provider that answered `record`'s request for other pages of the same list."""

    __slots__ = ("_failover", "_plan", "_record", "_tail", "_headers", "_idle_seconds")

    def __init__(
        self,
        failover: Failover,
        plan: Plan,
        record: Record,
        tail: str,
        headers: CIMultiDictProxy[str],
        idle_seconds: float,
    ) -> None:
        self._failover, self._plan, self._record = failover, plan, record
        self._tail, self._headers, self._idle_seconds = tail, headers, idle_seconds

    async def __call__(self, query: str) -> dict[str, Any] | None:
        """The page `query` asks for, as a JSON object; None when it was not read."""
        try:
            return await self._page(query)
        except NotRead as why:
            record = self._record
            # Not the query: a client may have put a key in it (Gemini's `?key=`).
            log.warning(
                "%s %s of key %s: a further page of the provider's list was not read (%s); "
                "answered what the pages before it held",
                record.method,
                record.path,
                record.key,
                why,
            )
            return None

    async def _page(self, query: str) -> dict[str, Any]:
        record = self._record
        target = self._plan.answering(record.target)
        label = record.attempts[-1].key if record.attempts else None
        credential = next((c for c in target.pool.credentials if c.label == label), None)
        if credential is None:
            raise NotRead("the key that answered is no longer the target's")
        try:
            async with self._failover.fetch(
                target, credential, self._tail, query, self._headers, record.request_id
            ) as reply:
                if reply.status != 200:
                    raise NotRead(f"it answered {reply.status}")
                data = await self._read(reply.content.readany)
                coding = content_coding(reply.headers)
            document = orjson.loads(decode_body(data, coding, MAX_BYTES) if coding else data)
        except TimeoutError:
            raise NotRead("no answer in time") from None
        except (aiohttp.ClientError, SigningFailed, GatewayError, orjson.JSONDecodeError) as error:
            raise NotRead(error.__class__.__name__) from None
        if not isinstance(document, dict):
            raise NotRead("not a JSON object")
        return document

    async def _read(self, readany: Callable[[], Awaitable[bytes]]) -> bytes:
        """The whole body, at most MAX_BYTES; each silence at most the idle timeout."""
        parts: list[bytes] = []
        size = 0
        while True:
            async with asyncio.timeout(self._idle_seconds):
                chunk = await readany()
            if not chunk:
                return b"".join(parts)
            size += len(chunk)
            if size > MAX_BYTES:
                raise NotRead(f"larger than {MAX_BYTES} bytes")
            parts.append(chunk)
