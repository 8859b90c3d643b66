"""The response cache's cost: a hit against the floor's miss, and the memory one entry takes.

    .venv/bin/python bench/cache.py [--quick] [--sequential 1000] [--delay-ms 20] [--wrk-seconds 3]

`make bench` runs it after run.py (`--quick` with QUICK=1).

Starts the mock provider (core 1), the floor (bench/passthrough.py) and the gateway (core
0, quotas on, the log to a file) with two keys: one without a cache, one with. Prints, at
concurrency 1 on one keep-alive connection (median of the request latencies):

- the floor's miss: every request goes to the mock, which answers after `--delay-ms` (the
  bench's provider time, as run.py's throughput figure) and after 0 ms (pure overhead);
- the gateway's hit (the cached key, the same request: answered from memory, never
  upstream), and the ratio floor miss / hit (the cache is worth it at >= 5x);
- the gateway's miss for the key without a cache, for scale;

then hits under load (wrk, 256 connections) against the floor's misses, and the memory one
entry takes in the in-memory store (tracemalloc over 2,000 entries) beside what the store
counts for it against CACHE_MAX_BYTES (`Entry.size`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path

from harness import (
    BENCH,
    ROOT,
    Processes,
    free_port,
    healthy,
    listening,
    start_mock,
    wait_until,
    wrk,
)
from probes import CHAT, request_bytes, sequential_latencies

sys.path.insert(0, str(ROOT))

from proxy.cache.entry import Entry  # noqa: E402
from proxy.cache.memory_store import MemoryStore  # noqa: E402
from proxy.record import Usage  # noqa: E402

KEY, CACHED = "vk_bench_0123456789", "vk_bench_cached_0123456789"
SERVER_CORE, LOAD_CORE = 0, 1


def start(procs: Processes, tmp: Path) -> tuple[int, int]:
    """The mock, the floor and the gateway; (floor port, gateway port)."""
    floor_port, gateway_port = free_port(), free_port()
    upstream = start_mock(procs, tmp, LOAD_CORE)
    floor = procs.start(
        [sys.executable, str(BENCH / "passthrough.py"), "--port", str(floor_port),
         "--upstream", upstream],
        SERVER_CORE,
        tmp / "floor.log",
    )  # fmt: skip
    wait_until(lambda: listening(floor_port), "the floor", floor, tmp / "floor.log")
    quota = {"requests": 100_000_000, "window_seconds": 3600}
    keys = {
        "providers": {"openai": {"base_url": f"{upstream}/v1"}},
        "virtual_keys": {
            KEY: {"provider": "openai", "api_key": "sk-bench", "quota": quota},
            CACHED: {
                "provider": "openai",
                "api_key": "sk-bench",
                "quota": quota,
                "name": "cached",
                "cache": {"ttl_seconds": 3600},
            },
        },
    }
    (tmp / "keys.json").write_text(json.dumps(keys))
    gateway = procs.start(
        [sys.executable, str(ROOT / "gateway.py"), "--server-host", "127.0.0.1",
         "--server-port", str(gateway_port), "--keys-file-path", str(tmp / "keys.json"),
         "--quota-enabled", "true", "--log-to-file", "true",
         "--log-file-path", str(tmp / "interactions.jsonl"), "--workers", "1"],
        SERVER_CORE,
        tmp / "gateway.log",
    )  # fmt: skip
    wait_until(lambda: healthy(gateway_port), "the gateway", gateway, tmp / "gateway.log")
    return floor_port, gateway_port


def p50(port: int, key: str, delay_ms: float, count: int) -> float:
    raw = request_bytes(port, key, CHAT, {"x-mock-delay-ms": f"{delay_ms:g}"})
    sequential_latencies(port, raw, 50)  # warm: connections, the entry stored
    latencies, bad = sequential_latencies(port, raw, count)
    if bad:
        raise SystemExit(f"bench: {bad} answers were not 2xx")
    return statistics.median(latencies)


def latency(floor: int, gateway: int, delays: list[float], count: int) -> None:
    for delay in delays:
        floor_miss = p50(floor, KEY, delay, count)
        hit = p50(gateway, CACHED, delay, count)
        miss = p50(gateway, KEY, delay, count)
        print(
            f"c=1, provider answers after {delay:g} ms: floor miss p50 {floor_miss:.3f} ms, "
            f"gateway hit p50 {hit:.3f} ms ({floor_miss / hit:.1f}x faster than the floor's "
            f"miss), gateway miss (no cache) p50 {miss:.3f} ms"
        )


def load(procs: Processes, tmp: Path, floor: int, gateway: int, delay: int, seconds: int) -> None:
    floor_run = wrk(procs, tmp / "wrk.out", KEY, floor, LOAD_CORE, 256, seconds, delay, 2)
    hit_run = wrk(procs, tmp / "wrk.out", CACHED, gateway, LOAD_CORE, 256, seconds, delay, 2)
    print(
        f"c=256, provider {delay} ms: floor misses {floor_run['rps']:,.0f} rps "
        f"(p50 {floor_run['p50_us'] / 1000:.2f} ms), gateway hits {hit_run['rps']:,.0f} rps "
        f"(p50 {hit_run['p50_us'] / 1000:.2f} ms), errors {floor_run['errors']}/{hit_run['errors']}"
    )


def chat_entry(index: int) -> Entry:
    body = (
        b'{"id":"chatcmpl-%06d","object":"chat.completion","created":1700000000,'
        b'"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant",'
        b'"content":"Hello from the provider, a short answer of a few words."},'
        b'"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":14,'
        b'"total_tokens":26}}' % index
    )
    headers = (
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Date", "Thu, 03 Dec 2026 21:00:00 GMT"),
        ("openai-processing-ms", "412"),
        ("openai-version", "2020-10-01"),
        ("x-request-id", f"req_{index:032x}"),
    )
    return Entry(200, "OK", headers, (body,), Usage(12, 14), "gpt-4o-mini")


def stream_entry(index: int) -> Entry:
    chunks = tuple(
        b'data: {"id":"chatcmpl-%06d","object":"chat.completion.chunk","created":1700000000,'
        b'"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"tok%d "}}]}\n\n'
        % (index, n)
        for n in range(40)
    ) + (b"data: [DONE]\n\n",)
    headers = (("Content-Type", "text/event-stream; charset=utf-8"), ("x-request-id", "req"))
    return Entry(200, "OK", headers, chunks, Usage(12, 40), "gpt-4o-mini")


def memory(make: Callable[[int], Entry], label: str, count: int = 2000) -> None:
    entries = [make(index) for index in range(count)]
    store = MemoryStore(max_bytes=1 << 40)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    held = [make(index) for index in range(count)]

    async def fill() -> None:
        for index, entry in enumerate(held):
            await store.put(f"k:bench:{index:064x}", entry, 3600)

    asyncio.run(fill())
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    used = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    body = statistics.mean(entry.body_bytes for entry in entries)
    counted = statistics.mean(entry.size for entry in entries)
    print(
        f"memory per {label} entry: {used / count:,.0f} bytes in this process "
        f"(body {body:,.0f} bytes; the store counts {counted:,.0f} against CACHE_MAX_BYTES)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequential", type=int, default=1000)
    parser.add_argument("--delay-ms", type=int, default=20)
    parser.add_argument("--wrk-seconds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="200 requests a figure, 1 s of wrk")
    args = parser.parse_args()
    if args.quick:
        args.sequential, args.wrk_seconds = 200, 1
    memory(chat_entry, "chat JSON")
    memory(stream_entry, "41-chunk stream")
    procs = Processes()
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        try:
            floor, gateway = start(procs, tmp)
            latency(floor, gateway, [args.delay_ms, 0], args.sequential)
            if args.wrk_seconds:
                load(procs, tmp, floor, gateway, args.delay_ms, args.wrk_seconds)
        finally:
            procs.stop_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
