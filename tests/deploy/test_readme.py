"""The README's commands run as shown, so none of them can rot.

The first path the README shows, `make run FAKE=1`, runs for real: the Quick try's curl,
its SDK snippets, the example command line and every `make example-*` go, unchanged but for
the port, to that gateway and its fake provider. `make run` starts on a copy of the
checkout. `make demo`, `make e2e` and the Docker commands are run by tests/deploy/test_e2e.py
and tests/deploy/test_docker.py; tests/deploy/test_docs.py checks what every page names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import Processes, free_port, start_gateway

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
QUOTAS_PAGE = (ROOT / "docs" / "quotas-and-money.md").read_text()
SHOWN = "http://localhost:8080"


def blocks(language: str, text: str = README) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.DOTALL)


def make(*arguments: str) -> list[str]:
    """make with this suite's Python, the venv counted as installed (this suite runs in it)."""
    return [
        "make",
        "-s",
        "-o",
        ".venv/.installed-run",
        "-o",
        ".venv/.installed",
        *arguments,
        f"PY={sys.executable}",
    ]


def test_the_readme_fits_in_300_lines_with_a_table_of_contents() -> None:
    lines = README.splitlines()
    assert len(lines) <= 300, len(lines)
    headings = re.findall(r"^## (.+)$", README, re.MULTILINE)
    anchors = re.findall(r"^\d+\. \[[^\]]+\]\(#([\w-]+)\)", README, re.MULTILINE)

    def slug(heading: str) -> str:
        return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")

    assert anchors == [slug(heading) for heading in headings]


@pytest.fixture
def fake_run(processes: Processes) -> Iterator[tuple[subprocess.Popen[str], str, str]]:
    """`make run FAKE=1` as the README shows it, on a free port: (process, gateway, fake)."""
    shown = re.search(r"^make run FAKE=1 ", README, re.MULTILINE)
    assert shown, "the README no longer starts with make run FAKE=1"
    port = free_port()
    process = processes.start(
        make("run", "FAKE=1", f"ARGS=--server-host 127.0.0.1 --server-port {port}"),
        env={"PYTHON": sys.executable},
    )
    # The status lines are on stderr: stdout is the interaction log's.
    assert process.stderr is not None
    fake = ""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        found = re.search(r"fake provider at (http://[\d.:]+)", line)
        fake = found.group(1) if found else fake
        if "listening on" in line:
            break
    else:
        line = ""
    assert "listening on" in line and fake, process.stderr.read()
    yield process, f"http://127.0.0.1:{port}", fake


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def test_make_run_fake_serves_the_quick_try_unchanged_and_ctrl_c_stops_both(
    fake_run: tuple[subprocess.Popen[str], str, str],
) -> None:
    process, url, fake = fake_run
    curl = next(block for block in blocks("sh") if block.startswith("curl "))
    result = subprocess.run(
        ["bash", "-c", curl.replace(SHOWN, url)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result
    assert json.loads(result.stdout)["object"] == "chat.completion", result.stdout
    for snippet in blocks("python")[:2]:  # the OpenAI and the Anthropic SDK
        result = subprocess.run(
            [sys.executable, "-c", snippet.replace(SHOWN, url)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert result.returncode == 0, result.stderr
        assert "tok0" in result.stdout
    # Ctrl-C: SIGINT to the terminal's process group (make, the script, the gateway, the fake).
    os.killpg(process.pid, signal.SIGINT)
    # make reports the interrupt as its own (-SIGINT), as for plain make run.
    _, errors = process.communicate(timeout=20)
    assert "placeholder" not in errors  # FAKE=1 needs no real key, and says nothing of them
    assert not answers(f"{url}/health") and not answers(f"{fake}/v1/models")


def test_the_example_lines_work_unchanged_against_make_run_fake(
    fake_run: tuple[subprocess.Popen[str], str, str],
) -> None:
    _, url, _ = fake_run
    line = re.search(
        r"`(GATEWAY_URL=http://localhost:8080 GATEWAY_KEY=\S+ \.venv/bin/python examples/openai_chat.py)`",
        README,
    )
    assert line, "the README no longer shows how to run an example"
    command = line.group(1).replace(SHOWN, url).replace(".venv/bin/python ", f"{sys.executable} ")
    result = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0 and "tok0" in result.stdout, result.stderr
    targets = re.findall(r"`make (example-[\w-]+)`", README)
    assert sorted(targets) == [
        "example-anthropic",
        "example-curl",
        "example-openai-chat",
        "example-openai-stream",
    ]
    for target in targets:
        result = subprocess.run(
            make(target, f"GATEWAY_URL={url}"),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env={k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
        )
        assert result.returncode == 0, (target, result.stdout + result.stderr)
        assert "tok0" in result.stdout or '"object":"chat.completion"' in result.stdout, target


def test_an_example_with_no_gateway_asks_whether_it_is_running() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for target in ("example-openai-chat", "example-anthropic", "example-curl"):
        result = subprocess.run(
            make(target, f"GATEWAY_URL={url}"), capture_output=True, text=True, timeout=60, cwd=ROOT
        )
        assert result.returncode != 0, target
        assert "is the gateway running?" in result.stderr, (target, result.stderr)
        assert "Traceback" not in result.stderr, (target, result.stderr)


def copy_of_the_checkout(tmp_path: Path) -> Path:
    copy = tmp_path / "checkout"
    shutil.copytree(
        ROOT,
        copy,
        ignore=shutil.ignore_patterns(".venv", ".git", "keys.json", "*.jsonl", "__pycache__"),
    )
    return copy


def test_make_run_on_a_fresh_copy_creates_keys_json_and_serves(
    tmp_path: Path, processes: Processes
) -> None:
    copy = copy_of_the_checkout(tmp_path)
    port = free_port()
    # The README's way to change the port, with a free one.
    shown = re.search(r'^make run ARGS="(--server-port) 9000"', README, re.MULTILINE)
    assert shown, "the README no longer says how to change the port"
    process = processes.start(
        make("run", f"ARGS=--server-host 127.0.0.1 {shown.group(1)} {port}"),
        # The log to a file: the listening line on stdout, the warnings left on stderr.
        env={"PYTHON": sys.executable, "LOG_TO_FILE": "true"},
        ready="listening on",
        cwd=copy,
    )
    assert json.loads((copy / "keys.json").read_text()) == json.loads(
        (ROOT / "keys.example.json").read_text()
    )
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
        assert json.loads(response.read())["status"] == "healthy"
    os.killpg(process.pid, signal.SIGTERM)  # make and the gateway it started
    _, errors = process.communicate(timeout=15)
    # keys.json as copied: the placeholders are named, in one line.
    warned = [line for line in errors.splitlines() if "placeholder" in line]
    assert len(warned) == 1 and "'user1'" in warned[0], errors


def test_make_run_installs_only_what_running_needs(tmp_path: Path) -> None:
    copy = copy_of_the_checkout(tmp_path)  # no .venv: make would create and fill one
    for variant in ([], ["FAKE=1"]):
        planned = subprocess.run(
            ["make", "-n", "run", *variant], capture_output=True, text=True, cwd=copy, timeout=30
        )
        assert planned.returncode == 0, planned.stderr
        assert "-r requirements.txt" in planned.stdout, planned.stdout
        assert "requirements-dev" not in planned.stdout, planned.stdout
        assert "--server-port" not in planned.stdout  # FAKE=1 keeps plain make run's port
    testing = subprocess.run(
        ["make", "-n", "unit"], capture_output=True, text=True, cwd=copy, timeout=30
    )
    assert "-r requirements-dev.txt" in testing.stdout, testing.stdout


# A Python 3.10 as far as a -c program can tell (Ubuntu 22.04's python3), which makes no venv.
OLD_PYTHON = f"""#!/usr/bin/env bash
if [[ $1 == -c ]]; then
    code=$2; shift 2
    exec {sys.executable} -c "import sys; sys.version_info = (3, 10, 12, 'final', 0)
sys.version = '3.10.12 (stand-in)'
$code" "$@"
fi
echo "a Python 3.10 stand-in: $* not run" >&2
exit 1
"""


def test_make_run_with_a_python_older_than_3_11_says_so_in_one_line(tmp_path: Path) -> None:
    # Ubuntu 22.04's python3 is 3.10: make run made .venv with it, pip then failed on a pin
    # that needs 3.11 ("No matching distribution found for genai-prices"), and every later
    # make run kept that .venv (test -x .venv/bin/python), failing the same way.
    copy = copy_of_the_checkout(tmp_path)
    old = tmp_path / "python3.10"
    old.write_text(OLD_PYTHON)
    old.chmod(0o755)
    fresh = subprocess.run(
        ["make", "run", "FAKE=1", f"PYTHON={old}"],
        capture_output=True,
        text=True,
        cwd=copy,
        timeout=60,
    )
    assert fresh.returncode != 0
    assert f"llm-gateway needs Python 3.11 or newer; {old} is Python 3.10.12" in fresh.stderr
    assert "make run PYTHON=python3.11" in fresh.stderr, fresh.stderr
    assert not (copy / ".venv").exists()
    # A .venv made before with such a Python is named, and how to be rid of it.
    (copy / ".venv" / "bin").mkdir(parents=True)
    shutil.copy(old, copy / ".venv" / "bin" / "python")
    kept = subprocess.run(
        ["make", "run", "FAKE=1"], capture_output=True, text=True, cwd=copy, timeout=60
    )
    assert kept.returncode != 0
    assert "llm-gateway needs Python 3.11 or newer; .venv is Python 3.10.12" in kept.stderr
    assert "rm -rf .venv" in kept.stderr, kept.stderr


def test_the_quota_snippet_shows_the_429_the_sdk_would_retry_silently(
    tmp_path: Path, processes: Processes, fake_url: str
) -> None:
    keys = json.loads((ROOT / "keys.example.json").read_text())
    keys["providers"] = {"openai": {"base_url": f"{fake_url}/v1"}}
    keys["virtual_keys"]["vk_user1_openai"]["quota"] = {"requests": 1, "window_seconds": 30}
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(keys))
    _, url = start_gateway(processes, path, tmp_path / "interactions.jsonl")
    snippet = next(block for block in blocks("python", QUOTAS_PAGE) if "max_retries=0" in block)
    runs = [
        subprocess.run(
            [sys.executable, "-c", snippet.replace(SHOWN, url)],
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
    found = re.search(r"^# unit: (.*?)\nunit:.*?\n\t(.*?)\n", makefile, re.M | re.S)
    assert found
    comment, recipe = found.groups()
    levels = re.fullmatch(r'.* -m "(\w+) or (\w+)" tests', recipe)
    assert levels and levels.groups() == ("unit", "app"), recipe
    assert all(f"tests/{level}" in comment for level in levels.groups())
    assert all((ROOT / "tests" / level).is_dir() for level in levels.groups())


def test_docker_podman_make_docker_build_keeps_the_healthcheck(tmp_path: Path) -> None:
    # podman builds OCI images by default, and OCI has no HEALTHCHECK: podman drops it with a
    # warning. The README's `DOCKER=podman make docker-build` must ask for Docker's format.
    shown = re.search(r"`(DOCKER=podman) make docker-build`", README)
    assert shown, "the README no longer says how to build with podman"
    for tool in ("podman", "docker"):
        bin_dir = tmp_path / tool
        bin_dir.mkdir()
        record = bin_dir / "called"
        (bin_dir / tool).write_text(
            f'#!/bin/sh\necho "BUILDAH_FORMAT=$BUILDAH_FORMAT $*" > {record}\n'
        )
        (bin_dir / tool).chmod(0o755)
        result = subprocess.run(
            ["make", "-s", "docker-build"],
            env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "DOCKER": tool},
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        called = record.read_text()
        assert " build " in f" {called}", called
        docker_format = "BUILDAH_FORMAT=docker " in called or "--format docker" in called
        # docker build has no --format; podman's default format would drop the HEALTHCHECK
        assert docker_format if tool == "podman" else "--format" not in called, (tool, called)
