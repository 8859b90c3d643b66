"""keys.json's shape: the fields each level accepts, and the one check that refuses the rest.

A typo in keys.json must stop the start, not pass silently: a top-level `"provider"`
for `"providers"` would send traffic to the real provider instead of the intended
`base_url`. Every level of the file (the document, a provider, a key, its quota,
budget, targets, pool entries and routes) is checked by `check_fields`, against the
table below; each level's own parser then reads the values. This module checks names
only, never values.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any


class KeysFileError(ValueError):
    """keys.json cannot be used; the message names the file, the key and the field."""


# The fields each level of keys.json accepts, by the level's name in the error message.
FIELDS: Mapping[str, frozenset[str]] = {
    "top-level": frozenset({"providers", "virtual_keys"}),
    "provider": frozenset({"base_url", "auth", "api"}),
    "key": frozenset(
        {
            "provider",
            "api_key",
            "api_key_env",
            "api_keys",
            "model",
            "name",
            "quota",
            "allowed_models",
            "fallbacks",
            "routes",
            "budget",
            "stream_usage",
        }
    ),
    "quota": frozenset({"requests", "tokens", "window_seconds"}),
    "budget": frozenset({"usd", "window_seconds"}),
    "target": frozenset({"provider", "api_key", "api_key_env", "api_keys", "model"}),
    "pool entry": frozenset({"api_key", "api_key_env", "weight"}),
    "route": frozenset(
        {"models", "provider", "api_key", "api_key_env", "api_keys", "model", "fallbacks"}
    ),
}


def check_fields(where: str, entry: Mapping[str, Any], level: str, prefix: str = "") -> None:
    """Refuse the first field `level` does not know. Raises KeysFileError.

    `where` starts the message ("keys.json: key 'alice'"); `prefix` names the field's
    parent ("quota." gives "quota.reqests"). The suggestion comes from difflib.
    """
    known = FIELDS[level]
    for name in entry:
        if name in known:
            continue
        close = difflib.get_close_matches(str(name), sorted(known), n=1, cutoff=0.6)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
        fields = ", ".join(sorted(known))
        shown = repr(f"{prefix}{name}"[:80])  # repr: a newline in a name stays on one line
        raise KeysFileError(f"{where}: {shown} is not a {level} field{hint}; known: {fields}")
