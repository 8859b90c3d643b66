"""A gateway process given a careless keys file or a broken prices file does not start: it exits
2 with one line naming the file and what is wrong, and never echoes a secret."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import refused


@pytest.mark.parametrize(
    ("document", "says", "never"),
    [
        (
            {
                "provider": {"openai": {"base_url": "http://127.0.0.1:9/v1"}},
                "virtual_keys": {"vk_a_123456789": {"provider": "openai", "api_key": "x"}},
            },
            "'provider' is not a top-level field (did you mean 'providers'?)",
            None,
        ),
        (
            {
                "virtual_keys": {
                    "vk_a_123456789": {
                        "provider": "openai",
                        "api_key": "x",
                        "name": "user2",
                        "qouta": {"requests": 2},
                    }
                }
            },
            "key 'user2': 'qouta' is not a key field (did you mean 'quota'?)",
            None,
        ),
        ({"virtual_keys": {}}, "'virtual_keys' is empty", None),
        (
            {
                "providers": {"openai": {"base_url": "https://admin:s3cr3t-pw@api.example.com/v1"}},
                "virtual_keys": {"vk_a_123456789": {"provider": "openai", "api_key": "x"}},
            },
            "base_url must not carry credentials",
            "s3cr3t-pw",
        ),
        (
            {"virtual_keys": {"vk_a_123456789": {"provider": "openai", "api_key": "sk-a\r\nb"}}},
            "api_key contains a control character",
            "sk-a",
        ),
        # A provider given as an object or a list ended the start in a TypeError traceback.
        (
            {
                "virtual_keys": {
                    "vk_a_123456789": {
                        "provider": {"name": "openai"},
                        "api_key": "x",
                        "fallbacks": [{"provider": ["anthropic"], "api_key": "y"}],
                    }
                }
            },
            "key 'vk_a…e427d3': provider must be a provider's name (known: ",
            "Traceback",
        ),
    ],
)
def test_the_gateway_refuses_to_start_on_a_careless_keys_file(
    tmp_path: Path, document: Any, says: str, never: str | None
) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(document))
    result = refused({"KEYS_FILE_PATH": str(path)})
    assert result.returncode == 2
    assert says in result.stderr and str(path) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert never is None or never not in result.stderr + result.stdout


def test_a_bad_prices_file_stops_the_start_with_one_line_and_exit_2(
    tmp_path: Path, keys_file: Path
) -> None:
    broken = tmp_path / "prices.json"
    broken.write_text("{not json")
    for path, says in ((broken, "is not valid JSON"), (tmp_path / "none.json", "cannot be read")):
        result = refused({"KEYS_FILE_PATH": str(keys_file), "PRICES_FILE": str(path)})
        assert result.returncode == 2, result.stderr
        assert says in result.stderr and "PRICES_FILE" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
