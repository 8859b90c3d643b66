"""Warnings about a keys.json that loads but looks like a mistake."""

from __future__ import annotations

import json
from pathlib import Path

from proxy.keys.advice import endpoint_paths, placeholders
from proxy.keys.keys import Defaults, KeyRing

ROOT = Path(__file__).resolve().parents[2]
DEFAULTS = Defaults(quota_enabled=True, requests=100, tokens=None, window_seconds=3600.0)


def test_keys_example_json_as_copied_is_named_in_one_line() -> None:
    path = str(ROOT / "keys.example.json")
    ring = KeyRing.load(path, {}, DEFAULTS)
    [line] = placeholders(ring, path)
    for name in ("'user1'", "'user2'", "'team-resilient'", "'team-router'"):
        assert name in line
    assert "make run FAKE=1" in line and "sk-replace" not in line  # the key itself is not shown


def test_real_keys_draw_no_warning(tmp_path: Path) -> None:
    document = json.loads((ROOT / "keys.example.json").read_text())
    text = json.dumps(document).replace("replace-with-your", "a-real")
    path = tmp_path / "keys.json"
    path.write_text(text)
    assert placeholders(KeyRing.load(str(path), {}, DEFAULTS), str(path)) == []


def test_a_base_url_pasted_with_its_endpoint_path_is_named(tmp_path: Path) -> None:
    # The client's path is added to base_url: '.../v1/chat/completions' as base_url sends
    # '.../v1/chat/completions/chat/completions', every request the provider's 404.
    document = {
        "providers": {
            "groq": {"base_url": "https://api.groq.com/openai/v1/chat/completions"},
            "ds": {
                "base_url": "https://api.deepseek.com/anthropic/v1/messages/",
                "api": "anthropic",
            },
            "ollama": {"base_url": "http://127.0.0.1:11434/v1", "auth": "none"},
        },
        "virtual_keys": {
            "vk_" + "a" * 30: {"provider": "groq", "api_key": "gsk-1", "name": "a"},
            "vk_" + "b" * 30: {"provider": "ds", "api_key": "sk-2", "name": "b"},
            "vk_" + "c" * 30: {"provider": "ollama", "api_key": "x", "name": "c"},
        },
    }
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(document))
    lines = endpoint_paths(KeyRing.load(str(path), {}, DEFAULTS), str(path))
    assert len(lines) == 2, lines
    assert "provider 'ds': base_url ends with '/messages'" in lines[0]
    assert "provider 'groq': base_url ends with '/chat/completions'" in lines[1]
    assert "https://api.groq.com/openai/v1" in lines[1]
