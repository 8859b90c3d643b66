"""Every example in examples/ runs against a real gateway process in front of the fake provider."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
OPENAI_VK = "vk_examples_openai_3b5d7f9a1c"
ANTHROPIC_VK = "vk_examples_anthropic_4c6e8a0b2d"
START_SECONDS = 15


def start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )


def wait_for_line(process: subprocess.Popen[bytes], log: Path, prefix: str) -> str:
    """The first line of the process's output that starts with `prefix`, within START_SECONDS."""
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if line.startswith(prefix):
                return line
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"no '{prefix}' from {process.args}: {log.read_text()[-2000:]}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A gateway subprocess on a free port, its providers pointed at a fake provider subprocess."""
    tmp = tmp_path_factory.mktemp("examples")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    processes: list[subprocess.Popen[bytes]] = []
    try:
        fake = start(
            [sys.executable, "-m", "tests.support.fake_provider", "--port", "0"],
            tmp / "fake.log",
            env,
        )
        processes.append(fake)
        fake_url = wait_for_line(fake, tmp / "fake.log", "fake provider on ").split(" on ", 1)[1]
        keys = tmp / "keys.json"
        keys.write_text(
            json.dumps(
                {
                    "providers": {
                        "openai": {"base_url": f"{fake_url}/v1"},
                        "anthropic": {"base_url": f"{fake_url}/v1"},
                    },
                    "virtual_keys": {
                        OPENAI_VK: {"provider": "openai", "api_key": "sk-examples-real-0000"},
                        ANTHROPIC_VK: {
                            "provider": "anthropic",
                            "api_key": "sk-ant-examples-real-1111",
                        },
                    },
                }
            )
        )
        port = free_port()
        gateway_env = {
            **env,
            "SERVER_HOST": "127.0.0.1",
            "SERVER_PORT": str(port),
            "KEYS_FILE_PATH": str(keys),
        }
        gateway = start([sys.executable, "gateway.py"], tmp / "gateway.log", gateway_env)
        processes.append(gateway)
        wait_for_line(gateway, tmp / "gateway.log", "llm-gateway listening on ")
        url = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{url}/ready", timeout=5) as response:
            assert response.status == 200
        yield url
    finally:
        for process in reversed(processes):
            stop(process)


def run_example(args: list[str], gateway_url: str, key: str, **extra_env: str) -> str:
    env = {**os.environ, "GATEWAY_URL": gateway_url, "GATEWAY_KEY": key, **extra_env}
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_openai_chat_example_prints_the_reply_and_its_tokens(gateway_url: str) -> None:
    out = run_example([sys.executable, str(EXAMPLES / "openai_chat.py")], gateway_url, OPENAI_VK)
    assert "tok0 tok1 tok2" in out
    assert "tokens: " in out and " 3 out" in out


def test_openai_stream_example_prints_the_streamed_reply_and_its_usage(gateway_url: str) -> None:
    out = run_example([sys.executable, str(EXAMPLES / "openai_stream.py")], gateway_url, OPENAI_VK)
    assert "tok0 tok1 tok2" in out
    assert " 3 out" in out


def test_anthropic_messages_example_prints_the_plain_and_the_streamed_reply(
    gateway_url: str,
) -> None:
    out = run_example(
        [sys.executable, str(EXAMPLES / "anthropic_messages.py")], gateway_url, ANTHROPIC_VK
    )
    assert out.count("tok0 tok1 tok2") == 2, out
    assert " 3 out" in out


def test_curl_example_runs_every_call(gateway_url: str) -> None:
    out = run_example(
        ["bash", str(EXAMPLES / "curl.sh")],
        gateway_url,
        OPENAI_VK,
        GATEWAY_ANTHROPIC_KEY=ANTHROPIC_VK,
    )
    assert '"object":"chat.completion"' in out
    assert "data: [DONE]" in out
    assert '"type":"message"' in out
    assert '"requests":' in out and '"status":"healthy"' in out
