"""What an operator deploying the gateway meets: keys.json as Docker may leave it, the Server header.

Docker bind-mounts a keys.json that does not exist as an empty directory, and a keys.json
of mode 600 cannot be read by the image's user (uid 10001): the gateway names both, with
the fix (its Server header is tests/app/test_server_header.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.processes import ROOT, refused


def test_keys_json_as_a_directory_says_what_docker_did_and_how_to_fix_it(tmp_path: Path) -> None:
    (tmp_path / "keys.json").mkdir()
    result = refused({"KEYS_FILE_PATH": str(tmp_path / "keys.json")})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "is a directory, not a file" in lines[0] and "Docker" in lines[0]
    assert "cp keys.example.json keys.json" in lines[0]


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv"
)
def test_keys_json_of_mode_600_names_the_uid_and_the_chmod(tmp_path: Path) -> None:
    # As in the image: the file belongs to another user, mode 600. Root without the
    # capabilities that bypass file modes meets it as uid 10001 meets a host's root file.
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"virtual_keys": {}}))
    os.chown(keys, 10001, 10001)
    keys.chmod(0o600)
    drop = "-dac_override,-dac_read_search"
    result = subprocess.run(
        [
            "setpriv",
            f"--inh-caps={drop}",
            f"--bounding-set={drop}",
            sys.executable,
            str(ROOT / "gateway.py"),
        ],
        env={**os.environ, "KEYS_FILE_PATH": str(keys)},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "not readable by this process (uid 0)" in line, line
    assert "uid 10001" in line and "chmod 644" in line


def test_compose_hands_the_gateway_the_real_keys_the_readme_names_with_api_key_env() -> None:
    # The README's keys.json names the Anthropic key with api_key_env. Under `docker compose
    # up` the variable must reach the container from the shell that runs compose, or the
    # gateway refuses to start (api_key_env ... is not set) and compose restarts it forever.
    readme = (ROOT / "README.md").read_text()
    keys_section = readme.split("## keys.json", 1)[1]
    first_keys = re.search(r"```json\n(.*?)```", keys_section, re.DOTALL)
    assert first_keys
    named = set(re.findall(r'"api_key_env": "(\w+)"', first_keys.group(1)))
    assert named, "the README's keys.json no longer names a key with api_key_env"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    environment = compose["services"]["gateway"]["environment"]
    for name in named:
        assert name in environment, f"docker-compose.yml does not pass {name} to the gateway"
        assert environment[name] is None, f"{name}: pass it through without a value of its own"


def test_the_images_healthcheck_asks_the_gateway_directly_behind_an_outbound_proxy(
    tmp_path: Path,
) -> None:
    # The image's HEALTHCHECK asked for http://127.0.0.1:8080/health with urllib, which
    # sends an http URL to HTTP_PROXY: a container given the proxy variables of the outbound
    # proxy section (NO_PROXY naming localhost, not 127.0.0.1) asked the proxy for its own
    # loopback and turned unhealthy.
    dockerfile = (ROOT / "Dockerfile").read_text()
    found = re.search(r"^\s*CMD (\[.*\])\s*$", dockerfile.split("HEALTHCHECK", 1)[1], re.M)
    assert found, "no HEALTHCHECK CMD in exec form"
    program, *args = json.loads(found[1])
    assert program == "python"
    with socket.socket() as dead:  # a proxy that refuses every connection
        dead.bind(("127.0.0.1", 0))
        dead_proxy = f"http://127.0.0.1:{dead.getsockname()[1]}"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "http.server",
            "0",
            "--bind",
            "127.0.0.1",
            "--directory",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = re.search(r"port (\d+)", server.stdout.readline())[1]  # type: ignore[index]
        (tmp_path / "health").write_text("{}")
        checked = subprocess.run(
            [sys.executable, *args],
            env={
                **os.environ,
                "SERVER_PORT": port,
                "HTTP_PROXY": dead_proxy,
                "http_proxy": dead_proxy,
                "NO_PROXY": "localhost,.internal",
            },
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert checked.returncode == 0, checked.stderr
    finally:
        server.kill()
        server.wait()
