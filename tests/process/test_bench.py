"""The benchmark's own parts that can be wrong without a benchmark showing it.

The floor (bench/passthrough.py) must really pass requests and streams through, or the
ratios to it mean nothing (bench/profile_steps.py's reading of samples is
tests/unit/test_profile_steps.py).
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

from tests.support.processes import ROOT, Processes, free_port

sys.path.insert(0, str(ROOT / "bench"))

import ab  # noqa: E402

from tests.support.bodies import CHAT


def post(url: str, body: dict[str, object]) -> tuple[int, str, bytes]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        return reply.status, reply.headers.get("content-type", ""), reply.read()


def test_the_floor_passes_a_body_and_a_stream_through(processes: Processes, fake_url: str) -> None:
    port = free_port()
    processes.start(
        [
            sys.executable,
            str(ROOT / "bench" / "passthrough.py"),
            "--port",
            str(port),
            "--upstream",
            fake_url,
        ],
        ready="passthrough on",
    )
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    status, _, body = post(url, CHAT)
    assert status == 200 and "tok0" in json.loads(body)["choices"][0]["message"]["content"]
    status, content_type, body = post(url, {**CHAT, "stream": True})
    assert status == 200 and content_type.startswith("text/event-stream")
    assert body.rstrip().endswith(b"data: [DONE]") and body.count(b"data: ") >= 4


def test_the_floor_with_the_gateways_gc_setting_passes_requests_through(
    processes: Processes, fake_url: str, tmp_path: Path
) -> None:
    port = free_port()
    _, argv, is_gateway = ab.command("floor-gc", port, fake_url, tmp_path)
    assert not is_gateway
    processes.start(argv, env={"PYTHONPATH": ""}, ready="passthrough on")
    status, _, body = post(f"http://127.0.0.1:{port}/v1/chat/completions", CHAT)
    assert status == 200 and "tok0" in json.loads(body)["choices"][0]["message"]["content"]
