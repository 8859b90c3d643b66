"""Realtime through a gateway process: a session relayed over a real socket, and SIGTERM closing
it with 1001 instead of holding the drain for the whole grace period."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
from aiohttp import WSMsgType

from tests.app.test_realtime import PATH, next_data
from tests.conftest import OPENAI_VK, auth
from tests.support.processes import Processes, start_gateway


async def test_a_gateway_process_relays_a_session_and_closes_it_with_1001_on_sigterm(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    process, url = start_gateway(
        processes, process_keys, tmp_path / "interactions.jsonl", SHUTDOWN_GRACE_SECONDS="20"
    )
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(
            f"{url}{PATH}", headers=auth(OPENAI_VK), protocols=["realtime"], autoclose=False
        )
        assert ws.protocol == "realtime"
        await next_data(ws)  # session.created
        await ws.send_str("over a real process")
        echo = await next_data(ws)
        assert (echo.type, echo.data) == (WSMsgType.TEXT, "over a real process")
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        close = await next_data(ws)
        assert (close.type, close.data) == (WSMsgType.CLOSE, 1001)
        await ws.close()
    assert await asyncio.to_thread(process.wait, 30) == 0
    assert time.monotonic() - started < 10  # the open session did not hold the drain for its grace
