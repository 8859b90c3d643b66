"""The end-to-end shell scripts, run by e2e/run_all.sh against a real gateway and fake provider."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_e2e_script_passes_against_a_real_gateway() -> None:
    result = subprocess.run(
        ["bash", str(ROOT / "e2e" / "run_all.sh")],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, output
    assert last.endswith(" passed, 0 failed") and not last.startswith("0 "), output


def test_the_demo_shows_a_call_a_stream_a_refusal_a_429_the_log_and_metrics_then_stops() -> None:
    result = subprocess.run(
        ["bash", str(ROOT / "e2e" / "demo.sh")],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert out.count("[HTTP 200]") >= 4 and "[HTTP 401]" in out
    assert "data: [DONE]" in out
    assert "request 4: HTTP 429" in out and "retry-after: " in out
    assert '"status":429' in out and '"key":"e2e-limited"' in out
    assert 'llm_gateway_quota_rejections_total{key="e2e-limited"} 1.0' in out
    work = out.split("keys in ", 1)[1].split("/keys.json", 1)[0]
    assert not Path(work).exists(), "the demo left its files behind"
