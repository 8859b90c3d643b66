"""The README's commands run as shown, so none of them can rot.

`make run` starts on a copy of the checkout, the curl and SDK snippets of "Quick try" run
against a real gateway in front of the fake provider (only host and port substituted),
and the examples it names exist. `make test` is this suite; `make demo`, `make e2e` and
the Docker commands are run by tests/deploy/test_e2e.py and tests/deploy/test_docker.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.support.processes import Processes, free_port, start_gateway

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.DOTALL)


def test_make_run_on_a_fresh_copy_creates_keys_json_and_serves(
    tmp_path: Path, processes: Processes
) -> None:  # noqa: F811
    copy = tmp_path / "checkout"
    shutil.copytree(
        ROOT,
        copy,
        ignore=shutil.ignore_patterns(".venv", ".git", "keys.json", "*.jsonl", "__pycache__"),
    )
    (copy / ".venv").symlink_to(ROOT / ".venv")  # the installed environment, as make left it
    installed = (ROOT / ".venv" / ".installed").stat().st_mtime
    for requirements in copy.glob("requirements*.txt"):  # installed from these, not older ones
        os.utime(requirements, (installed - 1, installed - 1))
    port = free_port()
    # The README's way to change the port, with a free one.
    shown = re.search(r'^make run ARGS="(--server-port) 9000"', README, re.MULTILINE)
    assert shown, "the README no longer says how to change the port"
    process = processes.start(
        ["make", "-s", "run", f"ARGS=--server-host 127.0.0.1 {shown.group(1)} {port}"],
        env={"PYTHON": sys.executable},
        ready="listening on",
        cwd=copy,
    )
    assert json.loads((copy / "keys.json").read_text()) == json.loads(
        (ROOT / "keys.example.json").read_text()
    )
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
        assert json.loads(response.read())["status"] == "healthy"
    os.killpg(process.pid, signal.SIGTERM)  # make and the gateway it started
    process.wait(timeout=15)


def start_gateway_for_readme(processes: Processes, tmp_path: Path, fake: str) -> str:  # noqa: F811
    """The gateway with keys.example.json's keys, its providers pointed at the fake."""
    keys = json.loads((ROOT / "keys.example.json").read_text())
    keys["providers"] = {
        "openai": {"base_url": f"{fake}/v1"},
        "anthropic": {"base_url": f"{fake}/v1"},
    }
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(keys))
    return start_gateway(processes, path, tmp_path / "interactions.jsonl")[1]


def test_the_quick_try_snippets_work_as_shown(
    tmp_path: Path, processes: Processes, fake_url: str
) -> None:  # noqa: F811
    url = start_gateway_for_readme(processes, tmp_path, fake_url)
    curl = next(block for block in blocks("sh") if block.startswith("curl "))
    result = subprocess.run(
        ["bash", "-c", curl.replace("http://localhost:8080", url)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0 and json.loads(result.stdout)["object"] == "chat.completion", (
        result
    )
    for snippet in blocks("python")[:2]:
        result = subprocess.run(
            [sys.executable, "-c", snippet.replace("http://localhost:8080", url)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert result.returncode == 0, result.stderr
        assert "tok0" in result.stdout


def test_the_example_command_line_works_as_shown(
    tmp_path: Path, processes: Processes, fake_url: str
) -> None:  # noqa: F811
    url = start_gateway_for_readme(processes, tmp_path, fake_url)
    line = re.search(
        r"`(GATEWAY_URL=http://localhost:8080 GATEWAY_KEY=\S+ \.venv/bin/python examples/openai_chat.py)`",
        README,
    )
    assert line, "the README no longer shows how to run an example"
    command = (
        line.group(1)
        .replace("http://localhost:8080", url)
        .replace(".venv/bin/python ", f"{sys.executable} ", 1)
    )
    result = subprocess.run(
        ["bash", "-c", command],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=os.environ,
    )
    assert result.returncode == 0 and "tok0" in result.stdout, result.stderr


def test_the_readme_names_only_files_and_targets_that_exist() -> None:
    for path in re.findall(r"`((?:examples|e2e|bench)/[\w./-]+)`", README):
        assert (ROOT / path).exists(), path
    makefile = (ROOT / "Makefile").read_text()
    for target in set(re.findall(r"make (\w[\w-]*)", README)):
        assert re.search(rf"^{target}:", makefile, re.MULTILINE), f"make {target} is not a target"


def test_the_make_example_targets_run_the_examples_with_the_venv(
    tmp_path: Path, processes: Processes, fake_url: str
) -> None:  # noqa: F811
    url = start_gateway_for_readme(processes, tmp_path, fake_url)
    targets = re.findall(r"`make (example-[\w-]+)`", README)
    assert sorted(targets) == [
        "example-anthropic",
        "example-curl",
        "example-openai-chat",
        "example-openai-stream",
    ]
    for target in targets:
        # -o: the venv counts as installed (this suite runs in it); PY: this suite's Python.
        result = subprocess.run(
            [
                "make",
                "-s",
                "-o",
                ".venv/.installed",
                target,
                f"GATEWAY_URL={url}",
                f"PY={sys.executable}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env={k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
        )
        assert result.returncode == 0, (target, result.stdout + result.stderr)
        assert "tok0" in result.stdout or '"object":"chat.completion"' in result.stdout, target


def test_the_quota_snippet_shows_the_429_the_sdk_would_retry_silently(
    tmp_path: Path, processes: Processes, fake_url: str
) -> None:  # noqa: F811
    keys = json.loads((ROOT / "keys.example.json").read_text())
    keys["providers"] = {"openai": {"base_url": f"{fake_url}/v1"}}
    keys["virtual_keys"]["vk_user1_openai"]["quota"] = {"requests": 1, "window_seconds": 30}
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(keys))
    _, url = start_gateway(processes, path, tmp_path / "interactions.jsonl")
    snippet = next(block for block in blocks("python") if "max_retries=0" in block)
    runs = [
        subprocess.run(
            [sys.executable, "-c", snippet.replace("http://localhost:8080", url)],
            capture_output=True,
            text=True,
            timeout=20,  # a silent retry would wait the whole 30 s window
            cwd=ROOT,
        )
        for _ in range(2)
    ]
    assert all(run.returncode == 0 for run in runs), [run.stderr for run in runs]
    assert runs[0].stdout == ""  # the one request of the window: a 200, nothing printed
    assert re.fullmatch(r"429 retry after \d+ s\n", runs[1].stdout), runs[1].stdout


def test_make_unit_runs_the_fast_levels_its_comment_names() -> None:
    makefile = (ROOT / "Makefile").read_text()
    comment, recipe = re.search(
        r"^# unit: (.*?)\nunit:.*?\n\t(.*?)\n", makefile, re.M | re.S
    ).groups()
    levels = re.findall(r"tests/(\w+)", recipe)
    assert levels == ["unit", "app"]
    assert all(f"tests/{level}" in comment for level in levels)
    assert all((ROOT / "tests" / level).is_dir() for level in levels)
