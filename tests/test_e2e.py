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
