"""Every example in examples/ runs against a real gateway process in front of the fake provider."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import ROOT, Processes, start_fake_provider, start_gateway

EXAMPLES = ROOT / "examples"
OPENAI_VK = "vk_examples_openai_3b5d7f9a1c"
ANTHROPIC_VK = "vk_examples_anthropic_4c6e8a0b2d"


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A gateway process on a free port, its providers pointed at a fake provider process."""
    tmp = tmp_path_factory.mktemp("examples")
    processes = Processes()
    try:
        fake_url = start_fake_provider(processes)
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
                        # keys.example.json's, which the examples use when GATEWAY_KEY is unset
                        "vk_user1_openai": {
                            "provider": "openai",
                            "api_key": "sk-examples-real-2222",
                        },
                        "vk_user2_anthropic": {
                            "provider": "anthropic",
                            "api_key": "sk-ant-examples-real-3333",
                        },
                    },
                }
            )
        )
        _, url = start_gateway(processes, keys, tmp / "interactions.jsonl")
        with urllib.request.urlopen(f"{url}/ready", timeout=5) as response:
            assert response.status == 200
        yield url
    finally:
        processes.stop()


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


# Each example as a user runs it by hand.
EVERY_EXAMPLE = [
    [sys.executable, str(EXAMPLES / "openai_chat.py")],
    [sys.executable, str(EXAMPLES / "openai_stream.py")],
    [sys.executable, str(EXAMPLES / "anthropic_messages.py")],
    ["bash", str(EXAMPLES / "curl.sh")],
]


@pytest.mark.parametrize("args", EVERY_EXAMPLE, ids=lambda args: Path(args[1]).name)
def test_an_example_run_by_hand_without_gateway_key_uses_the_key_of_keys_example_json(
    gateway_url: str, args: list[str]
) -> None:
    env = {name: value for name, value in os.environ.items() if name != "GATEWAY_KEY"}
    result = subprocess.run(
        args,
        cwd=ROOT,
        env={**env, "GATEWAY_URL": gateway_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tok0 tok1 tok2" in result.stdout, result.stdout


@pytest.mark.parametrize("args", EVERY_EXAMPLE, ids=lambda args: Path(args[1]).name)
def test_an_example_takes_a_gateway_url_ending_in_a_slash(
    gateway_url: str, args: list[str]
) -> None:
    # http://localhost:8080/ joined to /v1 made //v1/..., which the gateway refuses (400)
    out = run_example(
        args, f"{gateway_url}/", OPENAI_VK if "anthropic" not in args[1] else ANTHROPIC_VK
    )
    assert "tok0 tok1 tok2" in out, out
