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
