"""The end-to-end shell scripts, run by e2e/run_all.sh against a real gateway and fake provider."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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


def run_demo(**env: str) -> str:
    result = subprocess.run(
        ["bash", str(ROOT / "e2e" / "demo.sh")],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def commands(out: str) -> dict[str, str]:
    """Each printed command by its heading: `== heading` then `$ command`."""
    lines = out.splitlines()
    return {
        heading[3:]: command[2:]
        for heading, command in zip(lines, lines[1:], strict=False)
        if heading.startswith("== ") and command.startswith("$ ")
    }


def test_the_demo_shows_a_call_a_stream_a_refusal_a_429_the_log_and_metrics_then_stops() -> None:
    out = run_demo()
    assert out.count("[HTTP 200]") >= 4 and "[HTTP 401]" in out
    assert "data: [DONE]" in out
    assert "request 3: HTTP 200" in out and "HTTP/1.1 429" in out and "retry-after: " in out
    assert '"status":429' in out and '"key":"e2e-limited"' in out
    assert 'llm_gateway_quota_rejections_total{key="e2e-limited"} 1.0' in out
    assert "_created" not in out  # prometheus-client's start-time series are switched off
    assert "\x1b" not in out, "colour codes in output that is not a terminal"
    assert "x-fake-delay-ms is the fake provider's own header" in out
    assert "Both stop when the demo ends" in out and "make demo KEEP=1" in out
    shown = commands(out)
    assert len(shown) >= 9, shown
    for command in shown.values():
        assert "…" not in command and "×" not in command, command
    work = out.split("keys in ", 1)[1].split("/keys.json", 1)[0]
    assert not Path(work).exists(), "the demo left its files behind"


def test_with_keep_the_demo_s_printed_commands_paste_and_answer_as_in_the_demo() -> None:
    out = run_demo(KEEP="1")
    stop = next(line for line in out.splitlines() if line.startswith("Stop them with: "))
    try:
        shown = commands(out)
        for heading in (
            "The fourth: 429, and its headers say when to retry",
            "/metrics, an excerpt",
        ):
            command = shown[heading]
            again = subprocess.run(
                ["bash", "-c", command], capture_output=True, text=True, timeout=30
            )
            section = out.split(f"$ {command}\n", 1)[1].split("\n\n== ", 1)[0]
            if heading.startswith("/metrics"):
                # Only the 429 above was added since: one more rejection, one more 429.
                section = section.replace(
                    'key="e2e-limited"} 1.0', 'key="e2e-limited"} 2.0'
                ).replace('status="429"} 1.0', 'status="429"} 2.0')
                assert again.stdout.strip() == section.strip(), (section, again.stdout)
            else:
                assert again.stdout.startswith("HTTP/1.1 429"), again.stdout
                assert "retry-after: " in again.stdout and "x-should-retry: false" in again.stdout
        assert "Its settings: KEYS_FILE_PATH=" in out and " SERVER_PORT=" in out
        examples = [line.strip() for line in out.splitlines() if line.startswith("  make example-")]
        assert sorted(line.split()[1] for line in examples) == [
            "example-anthropic",
            "example-curl",
            "example-openai-chat",
            "example-openai-stream",
        ]
        for line in examples:
            # As pasted, with this suite's Python as the venv's (-o: counted as installed).
            pasted = line.replace("make ", f"make -s -o .venv/.installed PY={sys.executable} ", 1)
            ran = subprocess.run(
                ["bash", "-c", pasted], capture_output=True, text=True, timeout=60, cwd=ROOT
            )
            assert ran.returncode == 0 and "tok0" in ran.stdout + ran.stderr, (line, ran)
    finally:
        subprocess.run(["bash", "-c", stop.removeprefix("Stop them with: ")], timeout=30)
    work = out.split("keys in ", 1)[1].split("/keys.json", 1)[0]
    assert not Path(work).exists(), "the stop command left the demo's files behind"
