"""A hit sent to the client: the stored status, headers and bytes, as the first client got them.

A body of known length goes in one write; a stream chunk by chunk, the same chunks in the
same order, as fast as the client reads, then the end: nothing is added before, between
or after them (peers appended an error frame to a replayed stream, or replayed JSON as SSE;
a stream request has another body than a JSON one, so another entry). The caller adds the
gateway's own headers (request id, rate limits, `x-llm-gateway-cache: hit`).
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from multidict import CIMultiDict

from proxy.cache.entry import Entry
from proxy.errors import Cut
from proxy.record import CLIENT_CLOSED, Outcome, Record


def response_for(entry: Entry, headers: CIMultiDict[str]) -> web.StreamResponse:
    """The response to prepare: whole for a body of known length, else a stream."""
    if entry.is_whole:
        body = b"".join(entry.chunks)
        return web.Response(status=entry.status, reason=entry.reason, headers=headers, body=body)
    return web.StreamResponse(status=entry.status, reason=entry.reason, headers=headers)


async def replay(
    request: web.Request,
    response: web.StreamResponse,
    entry: Entry,
    record: Record,
    sending: Callable[[], None],
) -> None:
    """Send `entry` through `response` (from `response_for`), calling `sending` as each
    write begins (the caller watches a client that stops reading). Raises Cut: the client
    left."""
    record.saw_answer(entry.usage, entry.model)
    if entry.provider is not None:
        record.saw_replay(entry.provider, entry.cost_usd)
    try:
        await response.prepare(request)  # no first byte of a provider's: ttft_ms stays None
        if not isinstance(response, web.Response):
            for chunk in entry.chunks:
                sending()
                await response.write(chunk)
        sending()
        await response.write_eof()
    except ConnectionResetError:  # the client left before the whole answer went out
        raise Cut(CLIENT_CLOSED, Outcome.CLIENT_LEFT, "client closed the connection") from None
