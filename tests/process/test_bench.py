"""The benchmark's own parts that can be wrong without a benchmark showing it.

The floor (bench/passthrough.py) must really pass requests and streams through, or the
ratios to it mean nothing; `make bench`'s scripts must run end to end (on tiny settings:
their figures are for the benchmark, not for a test) (bench/profile_steps.py's reading of samples is
tests/unit/test_profile_steps.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

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


@pytest.mark.skipif(
    shutil.which("wrk") is None, reason="wrk is not installed (make bench installs it)"
)
def test_make_bench_prints_each_target_and_scale_figure_end_to_end() -> None:
    """run.py and scale.py on tiny settings (a few seconds each): every target of issue 30
    comes out as HOLDS or MISSES with its measured figure, every scale figure is printed."""
    bench = [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--normal-priority"]
    out = subprocess.run(bench, capture_output=True, text=True, timeout=60, cwd=ROOT).stdout
    targets = out.split("issue 30's targets", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    verdicts = [line.split()[0] for line in targets[:-1]]
    assert len(verdicts) == 7 and set(verdicts) <= {"HOLDS", "MISSES"}, out[-3000:]
    for what in ("throughput against the floor's", "best bare foundation", "added p50 at c=1",
                 "stream time to first byte", "client timeouts", "RSS idle", "open streams"):  # fmt: skip
        assert what in "\n".join(targets), what
    assert "CPU per chunk (us)" in out
    scale = [
        sys.executable,
        str(ROOT / "bench" / "scale.py"),
        "--smoke",
        "--only",
        "keys,choice,reload",
    ]
    out = subprocess.run(scale, capture_output=True, text=True, timeout=60, cwd=ROOT).stdout
    figures = out.split("scale (issue 30, point 3)", 1)[1]
    for what in ("start to first /health answer", "CPU per request against 10 keys",
                 "100 routes", "pool of 20", "reload of 200 keys under load"):  # fmt: skip
        assert what in figures, out[-3000:]


def test_charging_prints_a_row_per_case_with_both_checkouts_figures() -> None:
    """bench/charging.py --only P5 (~10 s), this checkout as both before and after: each case
    is a row with a figure in each column, read from the gateway's answers and /usage."""
    bench = [sys.executable, str(ROOT / "bench" / "charging.py"), "--before", str(ROOT),
             "--only", "P5"]  # fmt: skip
    done = subprocess.run(bench, capture_output=True, text=True, timeout=60, cwd=ROOT)
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| P5 ")]
    assert done.returncode == 0 and len(rows) == 8, done.stdout[-3000:] + done.stderr[-3000:]
    restricted = [row for row in rows if row[0].startswith("| P5 restricted")]
    assert [row[1:] for row in restricted] == [["403", "403 |"]] * 4, done.stdout
    speech = next(row for row in rows if "speech, tts-1" in row[0])
    assert speech[2] == "200; +1 request, +0 tokens, +$0.00066 |", done.stdout
