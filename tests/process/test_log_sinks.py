"""A gateway process whose log sinks fail: a stdout nobody reads, a rotated file, a full disk."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import OPENAI_VK, auth
from tests.support.bodies import CHAT
from tests.support.polling import until
from tests.support.processes import (
    Processes,
    free_port,
    gateway_command,
    start_gateway,
    wait_listening,
)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def chats(
    url: str, count: int, prompt_bytes: int = 0, concurrency: int = 50, tag: str = ""
) -> list[int]:
    """`count` chat requests, `concurrency` at a time (x-request-id `tag`-N): their statuses."""
    content = "x" * prompt_bytes or "hi"
    chat = {**CHAT, "messages": [{"role": "user", "content": content}]}
    semaphore = asyncio.Semaphore(concurrency)

    async def one(session: aiohttp.ClientSession, index: int) -> int:
        headers = {**auth(OPENAI_VK), **({"x-request-id": f"{tag}-{index}"} if tag else {})}
        async with semaphore:
            async with session.post(
                f"{url}/v1/chat/completions", json=chat, headers=headers
            ) as response:
                await response.read()
                return response.status

    async with aiohttp.ClientSession() as session:
        return await asyncio.gather(*(one(session, index) for index in range(count)))


async def metric(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/metrics") as response:
            text = await response.text()
    values = [line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")]
    return float(values[0]) if values else 0.0


def whole_lines(path: Path) -> list[dict[str, object]]:
    """Every line of the file, each of which must be whole JSON."""
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"a line cut short: {data[-80:]!r}"
    return [json.loads(line) for line in data.splitlines()]


async def test_a_stdout_nobody_reads_bounds_memory_and_sigterm_still_ends_the_process(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    grace = 2.0
    process, url = start_gateway(
        processes,
        process_keys,
        tmp_path / "unused.jsonl",
        LOG_TO_FILE="false",  # stdout: a pipe this test never reads again
        LOG_BODIES="true",
        QUOTA_ENABLED="false",
        SHUTDOWN_GRACE_SECONDS=f"{grace:g}",
    )
    before = rss_mb(process.pid)
    # 2,000 bodies of 64 KiB, each logged: 130 MB of lines the pipe's 64 KiB cannot take.
    # Past the 32 MiB of bodies the queue holds, lines wait without their bodies.
    assert await chats(url, 2000, prompt_bytes=64 * 1024) == [200] * 2000
    grown = rss_mb(process.pid) - before
    assert grown < 70, f"RSS grew {grown:.0f} MB with the log's sink stuck"
    async with aiohttp.ClientSession() as session:
        # A stream that never ends: the drain waits the whole grace, then cuts it.
        stream = await session.post(
            f"{url}/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers={**auth(OPENAI_VK), "x-fake-hang": "midstream"},
        )
        await stream.content.readany()
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, grace + 10)
        except subprocess.TimeoutExpired:
            raise AssertionError("SIGTERM did not end a gateway whose stdout is full") from None
        elapsed = time.monotonic() - started
    assert process.returncode == 0
    assert grace <= elapsed < grace + 2.0, f"{elapsed:.1f} s for a grace of {grace:g} s"
    _, err = process.communicate(timeout=10)
    said = [line for line in err.splitlines() if "without their bodies" in line]
    assert len(said) == 1, err[-2000:]


def rotate(mode: str, log: Path) -> Path:
    """Rotate `log` as logrotate's `create` or `copytruncate`, or remove it; the old lines' file."""
    old = log.with_name(log.name + ".1")
    if mode == "create":
        log.rename(old)
        log.touch()
    elif mode == "copytruncate":
        old.write_bytes(log.read_bytes())
        os.truncate(log, 0)
    else:
        log.unlink()
    return old


@pytest.mark.parametrize(
    ("mode", "hup"), [("create", True), ("create", False), ("copytruncate", False), ("rm", False)]
)
async def test_the_log_follows_its_path_through_rotation_and_removal(
    processes: Processes, process_keys: Path, tmp_path: Path, mode: str, hup: bool
) -> None:
    log = tmp_path / "log.jsonl"
    process, url = start_gateway(processes, process_keys, log, QUOTA_ENABLED="false")
    assert await chats(url, 20) == [200] * 20
    deadline = time.monotonic() + 10
    while len(log.read_bytes().splitlines()) < 20:
        assert time.monotonic() < deadline, "the first lines never reached the file"
        await asyncio.sleep(0.05)
    old = rotate(mode, log)
    if hup:
        process.send_signal(signal.SIGHUP)  # what logrotate's postrotate sends
    sent = 20
    deadline = time.monotonic() + 10  # without a signal: the writer's check, once a second
    while not log.exists() or not log.read_bytes():
        assert time.monotonic() < deadline, f"no line reached {log} after {mode}"
        assert await chats(url, 1) == [200]
        sent += 1
        await asyncio.sleep(0.1)
    assert await chats(url, 20) == [200] * 20
    process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.wait, 15) == 0
    after = whole_lines(log)
    before = whole_lines(old) if old.exists() else []
    assert len(after) >= 20
    if mode != "rm":  # none is lost
        assert len(before) + len(after) == sent + 20
    else:  # the first 20 went with the removed file; none written after it (seen at once)
        assert len(after) == sent


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a disk that fills up (needs root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_a_full_disk_leaves_only_whole_lines_and_is_counted_and_said(
    processes: Processes, process_keys: Path, small_disk: Path
) -> None:
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * 256 * 1024)  # removed later: room again
    log = small_disk / "log.jsonl"
    process, url = start_gateway(
        processes, process_keys, log, LOG_BODIES="true", QUOTA_ENABLED="false"
    )
    deadline = time.monotonic() + 30
    sent = 0
    while await metric(url, "llm_gateway_log_write_errors_total") == 0:
        assert time.monotonic() < deadline, "the disk never filled up"
        # 7 KiB bodies: a batch of lines fills the last pages part-way through a line.
        assert await chats(url, 20, prompt_bytes=7 * 1024, concurrency=20) == [200] * 20
        sent += 20

    async def every_line_written_or_lost() -> bool:
        lost = await metric(url, "llm_gateway_log_write_errors_total") + await metric(
            url, "llm_gateway_log_lines_dropped_total"
        )
        # Counted by their ends: a write going on may show a line's start before it is cut back.
        return log.read_bytes().count(b"\n") + lost >= sent

    # The lines still queued when the disk filled would take the room made next.
    await until(every_line_written_or_lost, 10, f"{sent} lines written or counted lost")
    whole_lines(log)  # every write is over: what a failed one cut was cut back
    filler.unlink()
    assert await chats(url, 5, tag="room") == [200] * 5
    deadline = time.monotonic() + 10
    while True:
        found = {line["request_id"] for line in whole_lines(log)}
        if {f"room-{index}" for index in range(5)} <= found:
            break
        assert time.monotonic() < deadline, "no line reached the file once there was room"
        await asyncio.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = await asyncio.to_thread(process.communicate, None, 15)
    assert "logbook: cannot write to" in err and "No space left on device" in err
    assert "lines reach" in err  # and that it writes again


async def test_with_two_workers_sighup_to_the_parent_moves_every_worker_to_the_new_file(
    processes: Processes, process_keys: Path, tmp_path: Path, redis_url: str
) -> None:
    log = tmp_path / "log.jsonl"
    process, url = start_gateway(
        processes, process_keys, log, WORKERS="2", REDIS_URL=redis_url, QUOTA_ENABLED="false"
    )
    assert await chats(url, 40, tag="before") == [200] * 40
    deadline = time.monotonic() + 10
    while len(log.read_bytes().splitlines()) < 40:
        assert time.monotonic() < deadline, "the first lines never reached the file"
        await asyncio.sleep(0.05)
    old = rotate("create", log)
    process.send_signal(signal.SIGHUP)  # to the parent, which passes it on to each worker
    deadline = time.monotonic() + 10
    while True:  # each worker reopens the path: new lines go to the new file only
        assert await chats(url, 40, tag="after") == [200] * 40
        written = {line["request_id"] for line in whole_lines(log)}
        if {f"after-{index}" for index in range(40)} <= written:
            break
        assert time.monotonic() < deadline, "a worker kept writing to the renamed file"
        await asyncio.sleep(0.2)
    assert {line["request_id"] for line in whole_lines(old)} >= {
        f"before-{index}" for index in range(40)
    }
    process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.wait, 20) == 0


async def test_two_workers_logging_to_one_stdout_pipe_write_every_line_whole(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    # Docker's default: the log on stdout, a pipe. A write over PIPE_BUF (4 KiB: a batch of
    # lines, a line with bodies) is not atomic, so two workers' writes could interleave.
    process, url = start_gateway(
        processes,
        process_keys,
        tmp_path / "unused.jsonl",
        LOG_TO_FILE="false",
        LOG_BODIES="true",
        WORKERS="2",
        QUOTA_ENABLED="false",
    )
    await asyncio.to_thread(wait_listening, int(url.rsplit(":", 1)[1]), 2)
    assert process.stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout or ()), daemon=True)
    reader.start()
    assert await chats(url, 1500, prompt_bytes=6 * 1024, tag="piped") == [200] * 1500
    process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.wait, 20) == 0
    await asyncio.to_thread(reader.join, 10)
    logged = lines  # stdout holds the log alone (the gateway's own lines go to stderr)
    broken = []
    for line in logged:
        try:
            json.loads(line)
        except ValueError:
            broken.append(line[:120])
    assert not broken, f"{len(broken)} lines cut or interleaved: {broken[:3]}"
    assert sorted(json.loads(line)["request_id"] for line in logged) == sorted(
        f"piped-{index}" for index in range(1500)
    )


async def test_sigterm_writes_every_line_to_a_slow_stdout_within_the_grace(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    # A log collector behind stdout that reads, slowly: the lines queued at SIGTERM take
    # longer than a stuck sink is given, but it takes them, and the grace has time left.
    process, url = start_gateway(
        processes,
        process_keys,
        tmp_path / "unused.jsonl",
        LOG_TO_FILE="false",
        LOG_BODIES="true",
        QUOTA_ENABLED="false",
        SHUTDOWN_GRACE_SECONDS="10",
    )
    assert process.stdout is not None
    stdout = process.stdout.fileno()
    read: list[bytes] = []
    terminated = threading.Event()

    def read_slowly() -> None:  # nothing until SIGTERM, then about 6 MB a second
        terminated.wait()
        while chunk := os.read(stdout, 64 * 1024):
            read.append(chunk)
            time.sleep(0.01)

    reader = threading.Thread(target=read_slowly, daemon=True)
    reader.start()
    assert await chats(url, 3000, prompt_bytes=2 * 1024, tag="slow") == [200] * 3000
    process.send_signal(signal.SIGTERM)
    terminated.set()
    assert await asyncio.to_thread(process.wait, 20) == 0
    await asyncio.to_thread(reader.join, 10)
    logged = set()
    for line in b"".join(read).splitlines():
        try:
            logged.add(json.loads(line)["request_id"])
        except ValueError:
            pass  # a line cut short: its request is missing below
    missing = {f"slow-{index}" for index in range(3000)} - logged
    assert not missing, f"{len(missing)} of 3000 lines missing"


async def test_two_workers_logging_to_one_fifo_path_write_every_line_whole(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    # LOG_FILE_PATH naming a pipe (a FIFO a log shipper reads, or /dev/stdout: Docker's pipe
    # again, by its path): O_APPEND keeps a file's appends whole, not a pipe's past PIPE_BUF
    # (4 KiB), so the workers' writes were cut into each other, as on stdout before.
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # before any writer: no wait
    holder = os.open(fifo, os.O_WRONLY)  # kept open: the reader sees no end until the test's
    os.set_blocking(reader, True)
    received = bytearray()

    def read_all() -> None:
        while data := os.read(reader, 1 << 16):
            received.extend(data)

    thread = threading.Thread(target=read_all, daemon=True)
    thread.start()
    try:
        process, url = start_gateway(
            processes,
            process_keys,
            fifo,
            LOG_BODIES="true",
            WORKERS="2",
            QUOTA_ENABLED="false",
        )
        await asyncio.to_thread(wait_listening, int(url.rsplit(":", 1)[1]), 2)
        assert await chats(url, 600, prompt_bytes=6 * 1024, tag="fifo") == [200] * 600
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 20) == 0
    finally:
        os.close(holder)
    await asyncio.to_thread(thread.join, 10)
    os.close(reader)
    broken = []
    for line in bytes(received).splitlines():
        try:
            json.loads(line)
        except ValueError:
            broken.append(line[:120])
    assert not broken, f"{len(broken)} lines cut or interleaved: {broken[:3]}"
    assert sorted(json.loads(line)["request_id"] for line in received.splitlines()) == sorted(
        f"fifo-{index}" for index in range(600)
    )


async def test_a_log_file_path_naming_stdout_keeps_stdout_to_json_lines(
    processes: Processes, process_keys: Path
) -> None:
    # LOG_FILE_PATH=/dev/stdout with LOG_TO_FILE=true (how many containers are told to log):
    # the log is on stdout, yet the gateway's own lines (starting, listening, draining) went
    # there too, as when the log is in a file: a `jq` or a collector parsing each line of
    # stdout met "llm-gateway listening on ..." among the JSON lines.
    port = free_port()
    process = processes.start(
        gateway_command(),
        env={
            "KEYS_FILE_PATH": str(process_keys),
            "SERVER_HOST": "127.0.0.1",
            "SERVER_PORT": str(port),
            "LOG_TO_FILE": "true",
            "LOG_FILE_PATH": "/dev/stdout",
        },
    )
    await asyncio.to_thread(wait_listening, port, 1)
    url = f"http://127.0.0.1:{port}"
    assert await chats(url, 3, tag="stdout") == [200] * 3
    process.send_signal(signal.SIGTERM)
    stdout, _ = await asyncio.to_thread(process.communicate, None, 20)
    assert process.returncode == 0
    lines = stdout.splitlines()
    assert not [line for line in lines if not line.startswith("{")], stdout
    assert sorted(json.loads(line)["request_id"] for line in lines) == [
        f"stdout-{index}" for index in range(3)
    ]


@pytest.mark.parametrize("reader", ["started before the gateway", "started after it"])
async def test_a_fifo_path_read_by_a_plain_reader_gets_every_line(
    processes: Processes, process_keys: Path, tmp_path: Path, reader: str
) -> None:
    # LOG_FILE_PATH naming a FIFO a log shipper reads as `cat log.fifo | shipper` does. Before,
    # the start's check opened the FIFO and closed it: the reader saw its end of file and
    # left, and the gateway then waited in open() for a reader for ever, never listening.
    # With no reader yet (a shipper started after the gateway), it waited the same way.
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    out = tmp_path / "read.jsonl"
    cat = ["sh", "-c", f"exec cat {fifo} > {out}"]
    if reader == "started before the gateway":
        shipper = processes.start(cat)
    port = free_port()
    process = processes.start(  # not start_gateway: its wait for a line would wait for ever
        gateway_command(),
        env={
            "KEYS_FILE_PATH": str(process_keys),
            "SERVER_HOST": "127.0.0.1",
            "SERVER_PORT": str(port),
            "LOG_TO_FILE": "true",
            "LOG_FILE_PATH": str(fifo),
            "QUOTA_ENABLED": "false",
        },
    )
    await asyncio.to_thread(wait_listening, port, 1)
    url = f"http://127.0.0.1:{port}"
    assert await chats(url, 3, tag="early") == [200] * 3  # no reader yet: the lines wait
    if reader == "started after it":
        shipper = processes.start(cat)
    assert await chats(url, 3, tag="late") == [200] * 3
    process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.wait, 15) == 0
    assert await asyncio.to_thread(shipper.wait, 10) == 0  # the gateway's close: its end
    assert sorted(line["request_id"] for line in whole_lines(out)) == [
        f"{tag}-{index}" for tag in ("early", "late") for index in range(3)
    ]
