"""Warnings about a keys.json that loads but looks like a mistake."""

from __future__ import annotations

import json
from pathlib import Path

from proxy.keys.advice import endpoint_paths, placeholders
from proxy.keys.keys import Defaults, KeyRing
from proxy.runtime.check import check

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


def test_a_prices_file_naming_a_provider_as_keys_json_does_not_is_named(tmp_path: Path) -> None:
    # PRICES_FILE is keyed by keys.json's provider names: "local-vlm" priced nothing, and the
    # requests of "local-vllm" went on unpriced (a budget spending nothing) without a word.
    keys = {
        "providers": {"local-vllm": {"base_url": "http://127.0.0.1:8000/v1", "auth": "none"}},
        "virtual_keys": {"vk_" + "a" * 30: {"provider": "local-vllm", "api_key": "x"}},
    }
    prices = {
        "local-vlm": {"*": {"input_mtok": 0, "output_mtok": 0}},
        "elsewhere": {"*": {"input_mtok": 1, "output_mtok": 1}},  # another file's: no word
    }
    (tmp_path / "keys.json").write_text(json.dumps(keys))
    (tmp_path / "prices.json").write_text(json.dumps(prices))
    found = check(
        [],
        {"PRICES_FILE": str(tmp_path / "prices.json"), "LOG_TO_FILE": "false"},
        str(tmp_path / "keys.json"),
    )
    assert found.problems == []
    [line] = [line for line in found.warnings if "local-vlm" in line]
    assert "did you mean 'local-vllm'?" in line
    assert not any("elsewhere" in line for line in found.warnings)


def test_a_provider_key_written_as_the_virtual_key_is_named(tmp_path: Path) -> None:
    # The real key pasted where the virtual key goes (the OpenAI key as both, or an Anthropic
    # key as the virtual key of api_key_env) loaded without a word: each client then holds
    # the provider's key, which the gateway exists to keep from them.
    openai_key = "sk-proj-" + "A1b2C3d4" * 6
    anthropic_key = "sk-ant-api03-" + "Z9y8X7w6" * 8
    document = {
        "virtual_keys": {
            openai_key: {"provider": "openai", "api_key": openai_key, "name": "alice"},
            anthropic_key: {"provider": "anthropic", "api_key_env": "ANTHROPIC_KEY"},
            "sk-" + "q" * 40: {"provider": "openai", "api_key": "sk-other", "name": "litellm"},
            "vk_" + "c" * 30: {"provider": "openai", "api_key": openai_key, "name": "carol"},
        }
    }
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(document))
    found = check([], {"ANTHROPIC_KEY": anthropic_key, "LOG_TO_FILE": "false"}, str(path))
    assert found.problems == []
    [line] = [line for line in found.warnings if "provider's key" in line]
    assert "'alice'" in line and "'sk-a…" in line and "litellm" not in line and "carol" not in line
    assert "give each client a virtual key of its own" in line
    assert openai_key[:12] not in line and anthropic_key[:16] not in line


def test_a_base_url_short_of_the_apis_v1_is_named(tmp_path: Path) -> None:
    # The client's path after /v1/ is added to base_url: Anthropic's API given as
    # "https://api.anthropic.com" (as the SDK's base_url is written) sent '.../messages', and
    # OpenAI's at a server's root '.../chat/completions': every request the provider's 404,
    # and the start said nothing.
    document = {
        "providers": {
            "anthropic": {"base_url": "https://api.anthropic.com"},
            "ds": {"base_url": "https://api.deepseek.com/anthropic/", "api": "anthropic"},
            "openai": {"base_url": "http://10.0.0.5:8000"},
            "ollama-native": {"base_url": "http://127.0.0.1:11434", "auth": "none"},
            "ds-v1": {"base_url": "https://api.deepseek.com/anthropic/v1", "api": "anthropic"},
        },
        "virtual_keys": {
            "vk_" + name * 30: {"provider": provider, "api_key": "k-1", "name": name}
            for name, provider in [
                ("a", "anthropic"),
                ("b", "ds"),
                ("c", "openai"),
                ("d", "ollama-native"),
                ("e", "ds-v1"),
            ]
        },
    }
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(document))
    lines = endpoint_paths(KeyRing.load(str(path), {}, DEFAULTS), str(path))
    assert len(lines) == 3, lines
    assert "provider 'anthropic': base_url does not end with /v1" in lines[0]
    assert "Give the API's root: https://api.anthropic.com/v1" in lines[0]
    assert "provider 'ds'" in lines[1] and "https://api.deepseek.com/anthropic/v1" in lines[1]
    assert "provider 'openai'" in lines[2] and "http://10.0.0.5:8000/v1" in lines[2]


def test_the_readmes_keys_json_copied_as_shown_is_named_for_its_placeholder(
    tmp_path: Path,
) -> None:
    # The README's keys.json holds "api_key": "sk-…": copied as shown, it loaded without a
    # word and every request was sent 'Authorization: Bearer sk-…', the provider's 401.
    readme = (ROOT / "README.md").read_text()
    shown = readme.split("## keys.json", 1)[1].split("```json\n", 1)[1].split("```", 1)[0]
    assert '"sk-…"' in shown
    path = tmp_path / "keys.json"
    path.write_text(shown)
    ring = KeyRing.load(str(path), {"ANTHROPIC_API_KEY": "sk-ant-real-0123456789"}, DEFAULTS)
    [line] = placeholders(ring, str(path))
    assert "'user1'" in line and "'user2'" not in line and "placeholder" in line
