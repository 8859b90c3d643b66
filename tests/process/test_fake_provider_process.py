"""The fake provider as a process of its own, as tests/process and the e2e scripts start it."""

import asyncio
import signal
import sys
from pathlib import Path

import aiohttp


async def test_runs_standalone_and_prints_its_port():
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.support.fake_provider", "--port", "0",
        cwd=Path(__file__).parents[2], stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        line = (await asyncio.wait_for(process.stdout.readline(), 10)).decode().strip()
        assert line.startswith("fake provider on http://127.0.0.1:")
        async with (
            aiohttp.ClientSession() as session,
            session.get(line.split(" on ")[1] + "/v1/models") as response,
        ):
            assert (await response.json())["object"] == "list"
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 5) == 0
