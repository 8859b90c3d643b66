"""Warnings about a keys.json that loads but looks like a mistake."""

from __future__ import annotations

import json
from pathlib import Path

from proxy.keys.advice import placeholders
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
