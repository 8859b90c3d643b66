"""What pricing and the usage tap cost per request, and what the taps hold in memory.

Run from the repository root: `python bench/pricing.py [--quick]`. Three figures:

1. Per request, in µs (median of repeats, one process, no network): the usage tap reading
   a typical answer (the baseline: what every request paid before pricing), the same plus
   `Prices.cost` (what a request pays now), and genai-prices' own generic `calc_price` for
   the same usage (why `pricing.py` does the arithmetic itself).
2. The same for an answer in br and in zstd (decoded for the tap only).
3. Memory: 40 answers of 15 MB read side by side, as 40 concurrent requests
   would: the most the taps held at once (tracemalloc peak) and what is still held after
   they ended: by default (a large body's tail only), with LOG_BODIES (whole bodies, for
   their text) under the shared bound (TAP_MEMORY_BYTES), and without that bound (each
   tap holding up to 16 MiB, as before).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import brotli
import orjson
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import genai_prices  # noqa: E402

from proxy.usage.pricing import Prices  # noqa: E402
from proxy.usage.usage import TapMemory, UsageTap  # noqa: E402

SSE = "text/event-stream"
JSON = "application/json"
MB = 1024 * 1024
REQUEST = orjson.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello " * 20}]}
)
USAGE = {
    "prompt_tokens": 1200,
    "completion_tokens": 300,
    "total_tokens": 1500,
    "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 128, "audio_tokens": 0},
}


def stream_answer(chunks: int) -> list[bytes]:
    """An OpenAI chat stream as it arrives: one network chunk per event, usage last."""
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-4o-mini"}
    events = [
        b"data: "
        + orjson.dumps({**head, "choices": [{"index": 0, "delta": {"content": f"tok{n} "}}]})
        + b"\n\n"
        for n in range(chunks)
    ]
    events.append(b"data: " + orjson.dumps({**head, "choices": [], "usage": USAGE}) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def per_call_us(work: Callable[[], object], calls: int, repeats: int) -> float:
    """Median over `repeats` of the mean time of one call, in µs."""
    results = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in range(calls):
            work()
        results.append((time.perf_counter_ns() - start) / calls / 1000)
    return statistics.median(results)


def tap_read(chunks: list[bytes], content_type: str, coding: str | None) -> Callable[[], object]:
    def read() -> object:
        tap = UsageTap(content_type, coding, keep_text=False)
        for chunk in chunks:
            tap.feed(chunk)
        return tap.usage(REQUEST)

    return read


def speed(calls: int, repeats: int) -> None:
    prices = Prices.load(None)
    stream = stream_answer(40)
    body = orjson.dumps(
        {
            "choices": [{"message": {"content": "tok " * 300}}],
            "usage": USAGE,
            "model": "gpt-4o-mini",
        }
    )
    usage = tap_read(stream, SSE, None)()

    library_usage = genai_prices.Usage(
        input_tokens=1200, output_tokens=300, cache_read_tokens=1024, output_reasoning_tokens=128
    )
    cost = per_call_us(lambda: prices.cost("openai", "gpt-4o-mini", usage), calls, repeats)  # type: ignore[arg-type]
    library = per_call_us(
        lambda: genai_prices.calc_price(library_usage, "gpt-4o-mini", provider_id="openai"),
        max(10, calls // 10),
        repeats,
    )
    print("per request, µs (median of repeats; pricing runs once per request, after the tap)")
    print(f"{'':40}{'tap (baseline)':>16}{'+ Prices.cost':>16}{'pricing share':>15}")
    for name, read in (
        ("OpenAI stream, 40 events + usage", tap_read(stream, SSE, None)),
        ("OpenAI JSON answer", tap_read([body], JSON, None)),
        ("OpenAI stream in br", tap_read([brotli.compress(b"".join(stream))], SSE, "br")),
        (
            "OpenAI stream in zstd",
            tap_read([zstandard.ZstdCompressor().compress(b"".join(stream))], SSE, "zstd"),
        ),
    ):
        baseline = per_call_us(read, calls, repeats)
        share = 100 * cost / (baseline + cost)
        print(f"{name:40}{baseline:16.1f}{baseline + cost:16.1f}{share:14.1f}%")
    print(f"{'Prices.cost (gpt-4o-mini, 4 token kinds)':40}{cost:16.1f}")
    print(f"{'genai_prices.calc_price, same usage':40}{library:16.1f}")


def memory(answers: int, answer_bytes: int) -> None:
    body = orjson.dumps({"choices": [{"message": {"content": "x" * answer_bytes}}], "usage": USAGE})
    piece = 64 * 1024
    print(f"\n{answers} answers of {answer_bytes // MB} MB read side by side (64 KiB chunks)")
    for label, keep_text, bound in (
        ("tails only (default)", False, None),
        ("whole bodies (LOG_BODIES), shared bound", True, None),
        ("whole bodies, no shared bound", True, 1 << 62),
    ):
        gc.collect()
        tracemalloc.start()
        memory_bound = TapMemory() if bound is None else TapMemory(bound)
        taps = [
            UsageTap(JSON, None, keep_text=keep_text, memory=memory_bound) for _ in range(answers)
        ]
        for start in range(0, len(body), piece):
            for tap in taps:
                tap.feed(body[start : start + piece])
        usages = [tap.usage(REQUEST) for tap in taps]
        _, peak = tracemalloc.get_traced_memory()
        del taps, tap  # the loop's last tap too: with LOG_BODIES it holds its text
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        read = sum(1 for usage in usages if usage is not None and not usage.estimated)
        print(
            f"  {label:42} peak held {peak / MB:7.1f} MB, after the end {after / MB:5.1f} MB, "
            f"read exactly {read}, estimated {answers - read}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and a smaller memory run")
    quick = parser.parse_args().quick
    speed(calls=200 if quick else 2000, repeats=3 if quick else 7)
    memory(answers=40 if not quick else 10, answer_bytes=15 * MB)


if __name__ == "__main__":
    main()
