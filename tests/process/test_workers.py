"""WORKERS: several processes on one port, metrics summed, one log, one drain."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import OPENAI_VK, auth
from tests.support.bodies import CHAT
from tests.support.observed import log_lines
from tests.support.processes import Processes, refused, serving_pid, start_gateway, wait_listening


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
    # Both workers serve before the requests go.
    await asyncio.to_thread(wait_listening, int(url.rsplit(":", 1)[1]), 2)

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
    # A request's metrics are counted after its answer has gone out, just before its log
    # line is handed to the writer: once the 60 lines are there, so are the counts.
    await log_lines([log], 60)
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


def test_a_metrics_directory_the_workers_cannot_use_is_refused_at_start(
    process_keys: Path,  # noqa: F811
    tmp_path: Path,  # noqa: F811
) -> None:
    """PROMETHEUS_MULTIPROC_DIR chosen where no directory can be made: a traceback, exit 1."""
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    result = refused(
        {
            "KEYS_FILE_PATH": str(process_keys),
            "WORKERS": "2",
            "QUOTA_ENABLED": "false",
            "PROMETHEUS_MULTIPROC_DIR": str(blocked / "metrics"),
        }
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith(
        f"llm-gateway: PROMETHEUS_MULTIPROC_DIR: cannot keep the workers' metrics in {blocked}"
    ), result.stderr


async def test_a_second_gateway_of_workers_on_a_port_in_use_is_refused_at_start(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    # Workers share their port with SO_REUSEPORT, which the kernel grants any process of the
    # same user: a second gateway started there by mistake would take half the connections.
    _, url = start_gateway(
        processes, process_keys, tmp_path / "log.jsonl", WORKERS="2", QUOTA_ENABLED="false"
    )
    port = url.rsplit(":", 1)[1]
    await asyncio.to_thread(wait_listening, int(port), 2)
    result = await asyncio.to_thread(
        refused,
        {
            "KEYS_FILE_PATH": str(process_keys),
            "SERVER_HOST": "127.0.0.1",
            "SERVER_PORT": port,
            "WORKERS": "2",
            "QUOTA_ENABLED": "false",
        },
    )
    assert result.returncode == 2, result.stderr
    # After the starting line (on stderr: stdout is the interaction log's), one line says why.
    starting, refusal = result.stderr.splitlines()
    assert starting.startswith("llm-gateway starting: "), result.stderr
    assert refusal == (
        f"llm-gateway: port {port} on 127.0.0.1 is already in use: "
        "stop what holds it, or choose another with SERVER_PORT or --server-port"
    )


async def test_workers_whose_parent_is_killed_exit_by_themselves(
    processes: Processes,
    process_keys: Path,
    tmp_path: Path,  # noqa: F811
) -> None:
    process, url = start_gateway(
        processes, process_keys, tmp_path / "log.jsonl", WORKERS="2", QUOTA_ENABLED="false"
    )
    await asyncio.to_thread(wait_listening, int(url.rsplit(":", 1)[1]), 2)
    pids = [int(pid) for pid in _children(process.pid)]
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


def _children(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()


async def _both_workers(process: subprocess.Popen[str], url: str) -> set[int]:
    """The two workers' pids, once both listen (the kernel's table, not their output)."""
    await asyncio.to_thread(wait_listening, int(url.rsplit(":", 1)[1]), 2)
    pids = {int(child) for child in _children(process.pid)}
    assert len(pids) == 2, pids
    return pids


async def _stream(
    session: aiohttp.ClientSession, url: str, request_id: str, **headers: str
) -> aiohttp.ClientResponse:
    response = await session.post(
        f"{url}/v1/chat/completions",
        json={**CHAT, "stream": True},
        headers={**auth(OPENAI_VK), "x-request-id": request_id, **headers},
    )
    await response.content.readany()  # under way
    return response


def _client_port(response: aiohttp.ClientResponse) -> int:
    assert response.connection is not None and response.connection.transport is not None
    return response.connection.transport.get_extra_info("sockname")[1]


async def _in_flight(session: aiohttp.ClientSession, url: str) -> float:
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    (line,) = [
        line for line in text.splitlines() if line.startswith("llm_gateway_requests_in_flight ")
    ]
    return float(line.split()[1])


async def test_a_killed_worker_is_replaced_at_once_while_the_others_streams_continue(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    log = tmp_path / "log.jsonl"
    process, url = start_gateway(processes, process_keys, log, WORKERS="2", QUOTA_ENABLED="false")
    port = int(url.rsplit(":", 1)[1])
    pids = await _both_workers(process, url)
    # A connection per request: the kernel spreads them over both workers.
    fresh = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=fresh) as session:
        streams = [
            await _stream(
                session, url, f"s-{n}", **{"x-fake-chunks": "20", "x-fake-delay-ms": "100"}
            )
            for n in range(8)
        ]
        served_by = {n: serving_pid(port, _client_port(s), pids) for n, s in enumerate(streams)}
        victim = served_by[0]
        assert victim in pids, served_by
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()

        async def new_worker_serves() -> int:
            while True:
                # A new worker's start (imports, listen) takes about a second on a quiet
                # machine and more on a busy CI one; the bound only catches no replacement.
                assert time.monotonic() - killed < 15, "no new worker served within 15 s"
                # A stream that stays open until closed: its connection can be looked up.
                try:
                    probe = await _stream(session, url, "probe", **{"x-fake-hang": "midstream"})
                except aiohttp.ClientConnectionError:
                    continue  # queued on the dead worker's socket as it died: reset
                children = {
                    int(pid)
                    for pid in Path(f"/proc/{process.pid}/task/{process.pid}/children")
                    .read_text()
                    .split()
                }
                pid = serving_pid(port, _client_port(probe), children)
                probe.close()
                if pid is not None and pid not in pids:
                    return pid

        replacement = await new_worker_serves()
        # The dead worker's streams leave the in-flight sum (forget_worker); the others' stay.
        survivors = sum(1 for pid in served_by.values() if pid != victim)
        while (in_flight := await _in_flight(session, url)) != survivors:
            assert time.monotonic() - killed < 10, f"{in_flight} in flight, {survivors} expected"
            await asyncio.sleep(0.05)
        survivor_done = set()
        for n, stream in enumerate(streams):
            if served_by[n] == victim:
                continue
            assert (await stream.read()).endswith(b"data: [DONE]\n\n")
            survivor_done.add(f"s-{n}")
    assert process.poll() is None
    process.send_signal(signal.SIGTERM)
    _, err = await asyncio.to_thread(process.communicate, None, 20)
    assert process.returncode == 0
    assert f"llm-gateway: worker {victim} was killed by SIGKILL; starting another" in err
    logged = {
        json.loads(line)["request_id"]: json.loads(line) for line in log.read_text().splitlines()
    }
    assert survivor_done <= set(logged)
    assert all(logged[request_id]["status"] == 200 for request_id in survivor_done)
    assert replacement not in pids


async def test_a_worker_that_keeps_failing_to_start_stops_the_gateway_with_one_line(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    process, url = start_gateway(
        processes, process_keys, logs / "log.jsonl", WORKERS="2", QUOTA_ENABLED="false"
    )
    pids = await _both_workers(process, url)
    shutil.rmtree(logs)  # a new worker cannot open its log file any more
    os.kill(min(pids), signal.SIGKILL)
    _, err = await asyncio.to_thread(process.communicate, None, 30)
    assert process.returncode == 1
    stops = [line for line in err.splitlines() if "failed to start" in line]
    assert stops == [
        "llm-gateway: a worker failed to start 3 times in a row (exited with code 1); stopping"
    ]
    for pid in pids:  # the other worker drained and exited with the gateway
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_sighup_to_the_parent_reaches_every_worker_and_stops_nothing(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    log = tmp_path / "log.jsonl"
    process, url = start_gateway(processes, process_keys, log, WORKERS="2", QUOTA_ENABLED="false")
    pids = await _both_workers(process, url)
    fresh = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=fresh) as session:
        streams = [
            await _stream(
                session, url, f"s-{n}", **{"x-fake-chunks": "10", "x-fake-delay-ms": "100"}
            )
            for n in range(6)
        ]
        process.send_signal(signal.SIGHUP)
        for stream in streams:
            assert (await stream.read()).endswith(b"data: [DONE]\n\n")
        async with session.post(
            f"{url}/v1/chat/completions",
            json=CHAT,
            headers={**auth(OPENAI_VK), "x-request-id": "after"},
        ) as after:
            assert after.status == 200
    assert process.poll() is None
    for pid in pids:
        os.kill(pid, 0)  # the same workers: none died of it
    process.send_signal(signal.SIGTERM)
    _, err = await asyncio.to_thread(process.communicate, None, 20)
    assert process.returncode == 0 and "starting another" not in err
    logged = [json.loads(line)["request_id"] for line in log.read_text().splitlines()]
    assert sorted(logged) == sorted([f"s-{n}" for n in range(6)] + ["after"])


async def test_workers_leave_nothing_in_the_temp_directory_however_the_gateway_ends(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    for ending in (signal.SIGTERM, signal.SIGKILL):
        temp = tmp_path / f"tmp-{ending.name}"
        temp.mkdir()
        process, url = start_gateway(
            processes,
            process_keys,
            tmp_path / "log.jsonl",
            WORKERS="2",
            QUOTA_ENABLED="false",
            TMPDIR=str(temp),
        )
        pids = await _both_workers(process, url)
        assert [path.name[:20] for path in temp.iterdir()] == ["llm-gateway-metrics-"]
        process.send_signal(ending)  # SIGKILL: the parent cannot clean up; its workers do
        await asyncio.to_thread(process.wait, 20)
        deadline = time.monotonic() + 20
        while any(temp.iterdir()) or any(Path(f"/proc/{pid}").exists() for pid in pids):
            assert time.monotonic() < deadline, (ending, list(temp.iterdir()))
            await asyncio.sleep(0.1)
