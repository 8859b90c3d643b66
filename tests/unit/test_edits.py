"""Changes to a keys document as the admin API makes them (`proxy/keys/edits.py`)."""

from __future__ import annotations

from typing import Any

from proxy.keys.edits import change_key
from proxy.keys.fields import Defaults, budget
from proxy.quota.tracker import Budget

# BUDGET_USD=5: every key that names no budget gets this one.
DEFAULTS = Defaults(
    quota_enabled=True,
    requests=100,
    tokens=None,
    window_seconds=3600.0,
    budget=Budget(usd=5.0, window_seconds=2592000.0),
)


def document() -> dict[str, Any]:
    entry = {"name": "capped", "provider": "openai", "api_key": "sk-real-0123456789abcdef"}
    entry |= {"budget": {"usd": 1, "window_seconds": 60}, "quota": {"requests": 7}}
    return {"virtual_keys": {"vk_capped_0123456789abcdef": entry}}


def test_patching_budget_null_lifts_the_budget_rather_than_restoring_the_default() -> None:
    keys = document()
    change_key(keys, "capped", {"budget": None})
    entry = keys["virtual_keys"]["vk_capped_0123456789abcdef"]
    # keys.json's "budget": null means no budget; removing the field would give BUDGET_USD's.
    assert budget("key 'capped'", entry, DEFAULTS) is None


def test_patching_another_field_null_removes_it() -> None:
    keys = document()
    change_key(keys, "capped", {"quota": None})
    assert "quota" not in keys["virtual_keys"]["vk_capped_0123456789abcdef"]
