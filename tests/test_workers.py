"""WORKERS: several processes on one port, metrics summed, one log, one drain."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import aiohttp

from tests.conftest import OPENAI_VK, auth
from tests.processes import Processes, refused, start_gateway

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def test_two_workers_share_the_port_sum_their_metrics_and_drain_together(
    processes: Processes,
    process_keys: Path,
    tmp_path: Path,  # noqa: F811
) -> None:
    log = tmp_path / "log.jsonl"
    metrics_dir = tmp_path / "metrics"
    process, url = start_gateway(
        processes,
        process_keys,
        log,
        WORKERS="2",
        QUOTA_ENABLED="false",
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
    )
    await asyncio.sleep(0.5)  # the second worker's "listening" line may come a moment later

    async def one(index: int) -> int:
        # A new connection each time, so the kernel spreads them over the workers.
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True)
        ) as session:
            async with session.post(
                f"{url}/v1/chat/completions",
                json=CHAT,
                headers={**auth(OPENAI_VK), "x-request-id": f"w-{index}"},
            ) as response:
                await response.read()
                return response.status

    assert await asyncio.gather(*(one(index) for index in range(60))) == [200] * 60
    pids = {name.rsplit("_", 1)[-1] for name in (p.name for p in metrics_dir.glob("counter_*.db"))}
    assert len(pids) == 2, f"requests reached only {pids}"
    async with aiohttp.ClientSession() as session:
        async with session.get(
            f"{url}/metrics", headers={"Accept": "application/json"}
        ) as response:
            summary = await response.json()
        async with session.get(f"{url}/metrics") as response:
            text = await response.text()
    assert summary["total_requests"] == 60
    assert (
        'llm_gateway_requests_total{model="gpt-4o-mini",provider="openai",status="200"} 60.0'
        in text
    )
    async with aiohttp.ClientSession() as session:
        stream = await session.post(
            f"{url}/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers={**auth(OPENAI_VK), "x-fake-chunks": "10", "x-fake-delay-ms": "100"},
        )
        await stream.content.readany()
        process.send_signal(signal.SIGTERM)
        rest = await stream.read()
    assert rest.endswith(b"data: [DONE]\n\n")
    assert await asyncio.to_thread(process.wait, 20) == 0
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 61 and {line["request_id"] for line in lines} >= {
        f"w-{index}" for index in range(60)
    }


def test_several_workers_without_redis_are_refused_at_start(process_keys: Path) -> None:  # noqa: F811
    result = refused({"KEYS_FILE_PATH": str(process_keys), "WORKERS": "2"})
    assert (
        result.returncode == 2 and "REDIS_URL" in result.stderr and "Traceback" not in result.stderr
    )


async def test_workers_whose_parent_is_killed_exit_by_themselves(
    processes: Processes,
    process_keys: Path,
    tmp_path: Path,  # noqa: F811
) -> None:
    process, url = start_gateway(
        processes, process_keys, tmp_path / "log.jsonl", WORKERS="2", QUOTA_ENABLED="false"
    )
    assert process.stdout is not None
    lines = [
        process.stdout.readline()
    ]  # the other worker's line; the first was read by start_gateway
    pids = [int(line.rsplit("worker ", 1)[1].rstrip(")\n")) for line in lines]
    process.kill()  # SIGKILL: the parent cannot forward anything
    for _ in range(100):
        try:
            for pid in pids:
                os.kill(pid, 0)
        except ProcessLookupError:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError(f"workers {pids} outlived their parent")
