"""`gateway.py --check` before an upgrade: every problem of the settings, keys.json and
PRICES_FILE at once, whatever else is wrong (the values this version newly refuses)."""

from __future__ import annotations

import json
from pathlib import Path

from proxy.runtime.check import check

GOOD_KEYS = {"virtual_keys": {"vk_" + "a" * 30: {"provider": "openai", "api_key": "sk-x"}}}
# Each a problem of its own, each taken by the previous version.
PRICES = {
    "openai": {
        "claude-sonnet-4-*": {"input_mtok": 1},
        "gpt-4o ": {"input_mtok": 1},
        "gpt-x": {"input_mtok": 2_000_000},
        "gpt-y": {"input_mtokens": 1},
    },
    "local ": {"*": {"input_mtok": 0}},
    "other": [],
}


def checked(tmp_path: Path, keys: object, prices: object, **env: str) -> list[str]:
    (tmp_path / "keys.json").write_text(json.dumps(keys))
    (tmp_path / "prices.json").write_text(json.dumps(prices))
    environ = {"PRICES_FILE": str(tmp_path / "prices.json"), "LOG_TO_FILE": "false", **env}
    return check([], environ, str(tmp_path / "keys.json")).problems


def test_every_problem_of_the_prices_file_is_listed(tmp_path: Path) -> None:
    problems = checked(tmp_path, GOOD_KEYS, PRICES)
    assert len(problems) == 6, problems
    for said in ("is a pattern", "'gpt-4o '", "at most 1000000", "unknown rate", "'local '"):
        assert any(said in line for line in problems), said
    assert any("'other' must be an object" in line for line in problems)


def test_a_bad_setting_does_not_hide_the_prices_files_problems(tmp_path: Path) -> None:
    problems = checked(tmp_path, GOOD_KEYS, {"openai": {"gpt-*": {}}}, BUDGET_USD="1e13")
    assert any(line.startswith("BUDGET_USD") for line in problems), problems
    assert any("is a pattern" in line for line in problems), problems


def test_every_bad_team_is_listed(tmp_path: Path) -> None:
    keys = {**GOOD_KEYS, "teams": {"ops ": {}, "t" * 201: {}, "fine": {"max_in_flight": 0}}}
    problems = checked(tmp_path, keys, {})
    assert len(problems) == 3, problems


def test_a_bad_team_is_one_line_and_the_other_teams_keys_load(tmp_path: Path) -> None:
    # One team's name with a space at an end made every key of every team say 'team must
    # name a team of 'teams' (known: none)', the good teams' keys as well.
    entry = {"provider": "openai", "api_key": "sk-x"}
    keys = {
        "teams": {"ops ": {}, "good": {}},
        "virtual_keys": {
            "vk_" + "a" * 30: {**entry, "name": "a", "team": "good"},
            "vk_" + "b" * 30: {**entry, "name": "b", "team": "ops "},
        },
    }
    problems = checked(tmp_path, keys, {})
    assert len(problems) == 1 and "a team name has a space at an end" in problems[0], problems


def test_a_platform_teams_self_hosted_servers_pass_the_check(tmp_path: Path) -> None:
    """docs/keys.md's self-hosted servers: http:// base URLs on localhost and a LAN, no key
    checked (`"auth": "none"`, a placeholder api_key), one server declared both ways, a
    route to the native API, a fallback between servers, and their prices at nothing."""
    keys = {
        "providers": {
            "ollama": {"base_url": "http://127.0.0.1:11434/v1", "auth": "none"},
            "ollama-native": {"base_url": "http://127.0.0.1:11434", "auth": "none"},
            "vllm": {"base_url": "http://10.0.0.5:8000/v1", "auth": "bearer"},
            "llamacpp": {"base_url": "http://gpu-box.lan:8080/v1", "auth": "none"},
            "lmstudio": {"base_url": "http://192.168.1.20:1234/v1", "auth": "none"},
            "tgi": {"base_url": "http://tgi:80", "auth": "none"},
        },
        "virtual_keys": {
            "vk_alice_" + "a" * 20: {
                "provider": "vllm",
                "api_key_env": "VLLM_API_KEY",
                "name": "alice",
                "quota": {"tokens": 200000},
                "fallbacks": [{"provider": "llamacpp", "api_key": "none"}],
            },
            "vk_bob_" + "b" * 20: {"provider": "ollama-native", "api_key": "none", "name": "bob"},
            "vk_carol_" + "c" * 20: {
                "name": "carol",
                "budget": {"usd": 5},
                "routes": [
                    {"models": ["llama3*"], "provider": "ollama", "api_key": "none"},
                    {"models": ["*"], "provider": "lmstudio", "api_key": "none"},
                ],
            },
            "vk_dave_" + "d" * 20: {"provider": "tgi", "api_key": "none", "name": "dave"},
        },
    }
    nothing = {"input_mtok": 0, "output_mtok": 0}
    prices = {name: {"*": nothing} for name in ("ollama", "vllm", "llamacpp", "lmstudio")}
    assert checked(tmp_path, keys, prices, VLLM_API_KEY="token-abc123") == []
