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


async def test_a_collector_that_hangs_neither_holds_the_shutdown_nor_loses_spans_uncounted(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    held: list[asyncio.StreamWriter] = []

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # reads nothing, answers nothing, closes nothing

    collector = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = collector.sockets[0].getsockname()[1]
    grace = 1.0
    process, url = start_gateway(
        processes,
        process_keys,
        tmp_path / "interactions.jsonl",
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
        OTEL_BSP_SCHEDULE_DELAY="50",
        OTEL_BSP_MAX_QUEUE_SIZE="8",
        OTEL_BSP_MAX_EXPORT_BATCH_SIZE="4",
        SHUTDOWN_GRACE_SECONDS=f"{grace:g}",
        QUOTA_ENABLED="false",
    )
    async with aiohttp.ClientSession() as session:
        for _ in range(40):  # 80 spans (a server and a client span each) for a queue of 8
            async with session.post(
                f"{url}/v1/chat/completions", json=CHAT, headers=auth(OPENAI_VK)
            ) as response:
                assert response.status == 200
        async with session.get(f"{url}/metrics") as response:
            text = await response.text()
    dropped = [
        line
        for line in text.splitlines()
        if line.startswith("llm_gateway_trace_spans_dropped_total ")
    ]
    assert dropped and float(dropped[0].split()[-1]) > 0, dropped
    started = asyncio.get_running_loop().time()
    process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.wait, 30) == 0
    elapsed = asyncio.get_running_loop().time() - started
    assert elapsed < grace + 2.0, (
        f"{elapsed:.1f} s to stop with a hung collector, grace {grace:g} s"
    )
    collector.close()
    for writer in held:
        writer.close()
