"""Every mistake at once: `gateway.py --check` and what a start says before serving."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from tests.support.processes import ROOT, Processes, free_port, gateway_command, refused

# Six mistakes in one file, and two in the settings: --check names all eight.
MISTAKES = {
    "providers": {"local": {"base_url": "http://127.0.0.1:9", "auht": "bearer"}},
    "virtual_keys": {
        "vk_first_key_long_enough_1": {"provider": "openai", "api_key": "sk-1", "qouta": {}},
        "vk_second_key_long_enough_2": {"provider": "nope", "api_key": "sk-2", "name": "b"},
        "vk_third_key_long_enough_33": {"provider": "openai", "api_key_env": "UNSET_X_Y_Z"},
        "vk_fourth_key_long_enough_4": {"provider": "openai", "api_key": "sk-4", "name": "b"},
        "vk_fifth_key_long_enough_55": {
            "provider": "openai",
            "api_key": "sk-5",
            "quota": {"requests": -1},
        },
    },
}


def write(tmp_path: Path, document: object) -> Path:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(document))
    return path


def test_check_lists_every_problem_of_the_settings_and_the_file_each_on_one_line(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, MISTAKES)
    result = refused({"MAX_BODY_BYTES": "-1", "WORKERS": "many"}, "--check", str(path))
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    expected = [
        "MAX_BODY_BYTES",
        "WORKERS",
        "'auht' is not a provider field",
        "'qouta' is not a key field",
        "provider 'nope' is unknown",
        "UNSET_X_Y_Z is not set",
        "key 'b': name is used by another key",
        "requests",
    ]
    for fragment in expected:
        assert sum(fragment in line for line in lines) >= 1, (fragment, result.stderr)
    assert lines[-1] == "llm-gateway: 8 problems: the gateway would not start", result.stderr
    assert "sk-1" not in result.stderr and "vk_first" not in result.stderr
    assert "listening" not in result.stdout


def test_check_of_a_good_file_says_what_would_start_and_exits_0(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {"virtual_keys": {"vk_" + "a" * 30: {"provider": "openai", "api_key": "sk-real"}}},
    )
    result = refused({"ADMIN_TOKEN": "t" * 24}, "--check", str(path))
    assert result.returncode == 0, result
    assert result.stdout.startswith("llm-gateway would start: 1 key from "), result.stdout
    assert "admin on" in result.stdout and result.stderr == ""


def test_make_check_runs_the_check(tmp_path: Path) -> None:
    path = write(tmp_path, MISTAKES)
    result = subprocess.run(
        [
            "make",
            "-s",
            "-o",
            ".venv/.installed-run",
            "check",
            f"ARGS={path}",
            "PY=" + gateway_command()[0],
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode != 0 and "6 problems: the gateway would not start" in result.stderr


def test_a_start_refuses_with_the_first_problem_and_says_how_many_more(tmp_path: Path) -> None:
    result = refused({"KEYS_FILE_PATH": str(write(tmp_path, MISTAKES))})
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.endswith("(and 5 more: python gateway.py --check lists every one)"), line


def test_the_start_line_and_the_warnings_a_person_reads_once(
    tmp_path: Path, processes: Processes
) -> None:
    keys = {
        "providers": {"local": {"base_url": "http://127.0.0.1:9/v1"}},
        "virtual_keys": {
            "vk_short": {"provider": "openai", "api_key": "sk-a", "name": "shorty"},
            "vk_" + "b" * 30: {
                "provider": "local",
                "api_key": "sk-b",
                "name": "spender",
                "budget": {"usd": 5, "window_seconds": 3600},
            },
        },
    }
    path = write(tmp_path, keys)
    port = free_port()
    process = processes.start(
        gateway_command("--server-host", "127.0.0.1", "--server-port", str(port)),
        env={
            "KEYS_FILE_PATH": str(path),
            "QUOTA_LIMTI": "5",
            "CORS_ALLOWED_ORIGINS": "https://a.example",
            "LOG_TO_FILE": "true",  # the listening line on stdout; the warnings on stderr
            "LOG_FILE_PATH": str(tmp_path / "log.jsonl"),
        },
        ready="listening on",
    )
    os.kill(process.pid, signal.SIGTERM)
    out, errors = process.communicate(timeout=15)
    warnings = [line for line in errors.splitlines() if "warning:" in line]
    assert any("QUOTA_LIMTI is not a setting" in w and "QUOTA_LIMIT?" in w for w in warnings)
    assert any("'shorty'" in w and "secrets.token_urlsafe(24)" in w for w in warnings)
    assert any("'spender' has a budget" in w and "PRICES_FILE" in w for w in warnings)
    assert len(warnings) == 3, errors
    assert "vk_short" not in errors and "sk-a" not in errors
    # The line before listening (read by processes.start), checked through a second start.
    checked = refused(
        {"KEYS_FILE_PATH": str(path), "CORS_ALLOWED_ORIGINS": "https://a.example"}, "--check"
    )
    line = checked.stdout.strip()
    assert line.startswith(f"llm-gateway would start: 2 keys from {path}; quotas in memory"), line
    for switch in (
        "admin off (set ADMIN_TOKEN)",
        "file watch off",
        "CORS https://a.example",
        "traces off",
        "Redis off",
        "1 worker",
    ):
        assert switch in line, (switch, line)


def test_a_price_for_the_provider_silences_the_budget_warning(tmp_path: Path) -> None:
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"local": {"*": {"input_mtok": 0, "output_mtok": 0}}}))
    keys = {
        "providers": {"local": {"base_url": "http://127.0.0.1:9/v1"}},
        "virtual_keys": {
            "vk_" + "b" * 30: {
                "provider": "local",
                "api_key": "sk-b",
                "budget": {"usd": 5, "window_seconds": 3600},
            }
        },
    }
    path = write(tmp_path, keys)
    without = refused({}, "--check", str(path))
    assert "has a budget" in without.stderr and without.returncode == 0
    priced = refused({"PRICES_FILE": str(prices)}, "--check", str(path))
    assert priced.returncode == 0 and priced.stderr == "", priced.stderr


def test_on_windows_one_line_says_where_it_runs_instead_of_a_traceback() -> None:
    # On Windows, signal.SIGHUP does not exist: the first line of gateway.py raised an
    # AttributeError traceback. Run as Windows would (sys.platform), it says what to do.
    started = (
        "import runpy, sys; sys.platform = 'win32'; "
        f"runpy.run_path({str(ROOT / 'gateway.py')!r}, run_name='__main__')"
    )
    result = subprocess.run(
        [gateway_command()[0], "-c", started], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "llm-gateway runs on Linux and macOS; on Windows, run it in WSL or with Docker "
        "(docker compose up)"
    )


def test_a_python_without_the_requirements_or_too_old_says_so_in_one_line() -> None:
    # SPEC's "python gateway.py --help" run with a python3 that lacks requirements.txt (the
    # system's, not .venv's) was a ModuleNotFoundError traceback for aiohttp; with Python
    # 3.10 (Ubuntu 22.04's), an ImportError from deep in proxy/. Each is now one line.
    python = gateway_command()[0]
    bare = subprocess.run(  # -S: no site-packages, so none of requirements.txt
        [python, "-S", str(ROOT / "gateway.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bare.returncode == 2, bare.stderr
    assert bare.stderr.count("\n") == 1 and "Traceback" not in bare.stderr, bare.stderr
    assert bare.stderr.startswith("llm-gateway: aiohttp is not installed for this Python ("), (
        bare.stderr
    )
    assert "make run" in bare.stderr and "pip install -r requirements.txt" in bare.stderr
    old = subprocess.run(
        [
            python,
            "-c",
            "import runpy, sys; sys.version_info = (3, 10, 12, 'final', 0); "
            f"runpy.run_path({str(ROOT / 'gateway.py')!r}, run_name='__main__')",
            "--help",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert old.returncode == 2, old.stderr
    assert old.stderr.strip() == "llm-gateway needs Python 3.11 or newer; this is Python 3.10.12"


def test_an_open_files_limit_below_what_max_connections_needs_is_said_at_start(
    tmp_path: Path,
) -> None:
    # A hard limit of 64 open files (a container's or a service's nofile) with the default
    # MAX_CONNECTIONS=1024: past about 30 connections, accepts failed and the event loop
    # closed each new connection unanswered, with no line anywhere (not the 503 the cap
    # answers), and providers could not be reached (502). The start now says why.
    import resource

    path = write(
        tmp_path,
        {"virtual_keys": {"vk_check_limit_key_00001": {"provider": "openai", "api_key": "sk-a"}}},
    )

    def start(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            gateway_command("--check", str(path)),
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)),
        )

    result = start()
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stderr.splitlines() if "open files" in line]
    assert len(said) == 1, result.stderr
    assert "64" in said[0] and "MAX_CONNECTIONS=1024" in said[0], said
    assert not [
        line for line in start(MAX_CONNECTIONS="16").stderr.splitlines() if "open files" in line
    ]
