"""Traces from a gateway process: the spans still queued are exported when it stops, and an
exporter it cannot use stops its start with one line."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer

from tests.app.test_tracing import CHAT
from tests.conftest import OPENAI_VK, auth
from tests.support.otlp_receiver import Received
from tests.support.processes import Processes, refused, start_gateway


async def test_a_gateway_process_exports_the_spans_still_queued_when_it_stops(
    processes: Processes,
    process_keys: Path,
    tmp_path: Path,
    receiver: TestServer,
    received: Received,
) -> None:
    process, url = start_gateway(
        processes,
        process_keys,
        tmp_path / "interactions.jsonl",
        OTEL_EXPORTER_OTLP_ENDPOINT=str(receiver.make_url("")),
        OTEL_BSP_SCHEDULE_DELAY="600000",  # no export on a timer: only a full batch, or the stop
    )
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{url}/v1/chat/completions", json=CHAT, headers=auth(OPENAI_VK)
        ) as response:
            assert response.status == 200
    assert received.exports == 0
    process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.wait, 30) == 0
    spans = await received.wait_for(2)
    assert {span.kind for span in spans} == {"server", "client"}


def test_an_otel_exporter_the_gateway_cannot_use_stops_the_process_with_one_line(
    process_keys: Path,
) -> None:
    result = refused(
        {"KEYS_FILE_PATH": str(process_keys), "OTEL_TRACES_EXPORTER": "zipkin"},
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "OTEL_TRACES_EXPORTER" in result.stderr
