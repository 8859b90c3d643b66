"""The usage tap's cost per chunk, A/B across checkouts: the hot path of every stream.

    .venv/bin/python bench/tap.py before=/path/to/checkout after=. [--rounds 5]

Each contender runs in its own process (its own `proxy` package), taking turns in an order
that reverses every round: it feeds a fresh `UsageTap` each stream below, one event per
chunk as providers flush them, and reads its usage at the end. Printed per stream: the
median over rounds of the tap's CPU time per chunk (thread time, so that other load on the
machine counts less; feed, and the share of `usage` at the end), in nanoseconds, and the
ratio to the first contender. The streams: an OpenAI chat stream of
text deltas (the commonest), the same with its usage chunk, a chat stream of tool-call
arguments, an Anthropic stream and a Responses API stream, 200 events each.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

# Run inside each contender's process: prints "<stream> <ns per chunk>" lines.
MEASURE = r"""
import sys, time, orjson
sys.path.insert(0, sys.argv[1])
from proxy.usage.usage import UsageTap

EVENTS = 200
def sse(event, name=None):
    head = f"event: {name}\n".encode() if name else b""
    return head + b"data: " + orjson.dumps(event) + b"\n\n"
def chat(delta):
    return sse({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                "model": "gpt-4o-mini", "system_fingerprint": "fp",
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": None}]})
usage = {"prompt_tokens": 9, "completion_tokens": EVENTS, "total_tokens": EVENTS + 9}
streams = {
    "chat text": [chat({"content": f"tok{i} "}) for i in range(EVENTS)] + [b"data: [DONE]\n\n"],
    "chat + usage": [chat({"content": f"tok{i} "}) for i in range(EVENTS)]
    + [sse({"object": "chat.completion.chunk", "choices": [], "usage": usage}),
       b"data: [DONE]\n\n"],
    "chat tools": [chat({"tool_calls": [{"index": 0, "function": {"arguments": '{"q": 1'}}]})
                   for _ in range(EVENTS)] + [b"data: [DONE]\n\n"],
    "anthropic": [sse({"type": "message_start", "message": {"model": "claude",
                       "usage": {"input_tokens": 9, "output_tokens": 1}}}, "message_start")]
    + [sse({"type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": f"tok{i} "}}, "content_block_delta")
       for i in range(EVENTS)]
    + [sse({"type": "message_delta", "usage": {"output_tokens": EVENTS}}, "message_delta")],
    "responses": [sse({"type": "response.output_text.delta", "item_id": "msg_1",
                       "output_index": 0, "content_index": 0, "delta": f"tok{i} ",
                       "sequence_number": i}, "response.output_text.delta")
                  for i in range(EVENTS)]
    + [sse({"type": "response.completed", "response": {"id": "resp_1", "model": "gpt",
            "usage": {"input_tokens": 9, "output_tokens": EVENTS}}}, "response.completed")],
}
request = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
repeats = int(sys.argv[2])
for name, chunks in streams.items():
    best = float("inf")
    for _ in range(5):
        started = time.thread_time_ns()
        for _ in range(repeats):
            tap = UsageTap("text/event-stream", None, False)
            for chunk in chunks:
                tap.feed(chunk)
            tap.usage(request)
        best = min(best, (time.thread_time_ns() - started) / repeats / len(chunks))
    print(name, best)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("contenders", nargs="+", help="name=checkout directory")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=100, help="streams per timing")
    args = parser.parse_args()
    contenders = {}
    for spec in args.contenders:
        name, _, directory = spec.partition("=")
        contenders[name] = str(Path(directory or ".").resolve())
    results: dict[str, dict[str, list[float]]] = {name: {} for name in contenders}
    names = list(contenders)
    for turn in range(args.rounds):
        for name in names if turn % 2 == 0 else names[::-1]:
            out = subprocess.run(
                [sys.executable, "-c", MEASURE, contenders[name], str(args.repeats)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            for line in out.splitlines():
                stream, _, ns = line.rpartition(" ")
                results[name].setdefault(stream, []).append(float(ns))
    first = results[names[0]]
    for stream in first:
        base = statistics.median(first[stream])
        shown = "  ".join(
            f"{name} {statistics.median(results[name][stream]):6.0f} ns "
            f"({statistics.median(results[name][stream]) / base:.2f}x)"
            for name in names
        )
        print(f"{stream:>13}: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
