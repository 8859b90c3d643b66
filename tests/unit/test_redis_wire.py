"""The Redis tracker's connection against a server that accepts and never answers (a hung
or partitioned Redis), so no redis-server is needed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from proxy.quota.redis_wire import RedisWire, pack


@pytest.fixture
async def silent_server() -> AsyncIterator[tuple[str, list[asyncio.StreamWriter]]]:
    """A TCP server that takes every connection and never says a word: its URL, and the
    connections it took."""
    taken: list[asyncio.StreamWriter] = []

    async def take(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        taken.append(writer)
        await reader.read()  # until the client hangs up

    server = await asyncio.start_server(take, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"redis://127.0.0.1:{port}", taken
    finally:
        for writer in taken:
            writer.close()
        server.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 1)


async def test_callers_arriving_together_share_one_connection_attempt_and_fail_together(
    silent_server: tuple[str, list[asyncio.StreamWriter]],
) -> None:
    """A hung Redis must cost each request one timeout, not one per caller ahead of it."""
    url, taken = silent_server
    wire = RedisWire(url, 0.2, "llm-gateway", 30)
    try:
        results = await asyncio.gather(
            *(wire.call(pack("PING")) for _ in range(5)), return_exceptions=True
        )
        assert all(isinstance(result, OSError) for result in results), results
        assert len(taken) == 1  # one attempt, its failure shared by every caller waiting on it
        with pytest.raises(OSError):  # the next call tries again, on a connection of its own
            await wire.call(pack("PING"))
        assert len(taken) == 2
    finally:
        await wire.close()
