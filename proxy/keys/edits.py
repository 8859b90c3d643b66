"""Changes to a keys document, as the admin API asks for them: create, change, rotate and
delete keys and teams, and the document as exported.

Each function edits a keys.json document (a dict, as parsed) in place, or raises
`EditRefused` with the status and the one line the API answers, before touching it. What
the result means is then checked by the loader itself (`KeyRing.from_document`), exactly as
at start, by the store that calls these: a change that would not load is never written.

A key the API makes is written as its digest (`hashed`), never as itself; its entry gets
`created_at`, which its windows' id includes (a name deleted and created again starts
fresh), and keeps it through changes and rotations (a rotated key keeps its windows).
"""

from __future__ import annotations

import copy
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from proxy.keys.fields import (
    MAX_NAME_CHARS,
    KeysFileError,
    check_fields,
    has_control,
    positive_number,
)
from proxy.keys.hashed import digest_of, hashed, is_hashed
from proxy.keys.keys import masked
from proxy.record import REDACTED

MIN_GIVEN_KEY = 20  # characters of a virtual key the API is given rather than makes
MAX_GRACE_SECONDS = 30 * 86400
SET_BY_GATEWAY = frozenset({"created_at", "previous_key"})
# The fields that hold a real credential itself (their `_env` forms name a variable); an AWS
# access key id is an identifier, not a secret, and stays.
SECRET_FIELDS = frozenset({"api_key", "aws_secret_access_key", "aws_session_token"})


class EditRefused(Exception):
    """A change the API refuses: its HTTP status, error code and one-line message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def stamp(now: float) -> str:
    return (
        datetime.fromtimestamp(now, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    )


def new_secret() -> str:
    """A virtual key: 32 random bytes, URL-safe, with a prefix that says what it is."""
    return "vk-" + secrets.token_urlsafe(32)


def _checked(where: str, body: Mapping[str, Any], level: str) -> None:
    """Refuse a field the level does not know (400, the loader's words) or sets itself."""
    for name in body:
        if name in SET_BY_GATEWAY:
            raise EditRefused(400, "invalid_field", f"{where}: {name!r} is set by the gateway")
    try:
        check_fields(where, body, level)
    except KeysFileError as error:
        raise EditRefused(400, "invalid_key_settings", str(error)) from None


def _name(body: Mapping[str, Any], what: str) -> str:
    name = body.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS:
        raise EditRefused(
            400, "invalid_name", f"The {what} needs a name: text, 1 to {MAX_NAME_CHARS} characters."
        )
    if name != name.strip():
        raise EditRefused(
            400,
            "invalid_name",
            f"The {what}'s 'name' has a space at an end: another name than without it, shown "
            "alike in logs and metrics; remove it.",
        )
    if has_control(name):  # never quoted back: it would garble the message it is in
        raise EditRefused(
            400,
            "invalid_name",
            f"The {what}'s 'name' contains a control character (a NUL, tab, line break or "
            "escape): a name must be printable text.",
        )
    return name


def _keys(document: dict[str, Any]) -> dict[str, Any]:
    entries = document.setdefault("virtual_keys", {})
    if not isinstance(entries, dict):
        raise EditRefused(422, "invalid_key_settings", "'virtual_keys' must be an object")
    return entries


def find_key(document: dict[str, Any], name: str) -> str | None:
    """The virtual key (as written) of the key named `name`, or None."""
    for written, entry in _keys(document).items():
        if isinstance(entry, dict) and entry.get("name", masked(written)) == name:
            return written
    return None


def _given_or_new(where: str, document: dict[str, Any], given: Any) -> str:
    if given is None:
        return new_secret()
    if not isinstance(given, str) or len(given) < MIN_GIVEN_KEY or given != given.strip():
        raise EditRefused(
            400,
            "weak_key",
            f"{where}: a given key must be at least {MIN_GIVEN_KEY} characters, without "
            "spaces; leave 'key' out and the gateway makes one",
        )
    if " " in given or has_control(given) or is_hashed(given):
        raise EditRefused(400, "weak_key", f"{where}: a given key must be printable, not a digest")
    if hashed(given) in _taken(document):
        raise EditRefused(409, "key_exists", f"{where}: that virtual key is already in use")
    return given


def _taken(document: dict[str, Any]) -> set[str]:
    """Every virtual key that authenticates, as digests: each key's, and each predecessor's
    still in its grace (the store prunes ended ones first). Given to another key, a
    predecessor would silently move its clients' requests to that key."""
    taken = set()
    for written, entry in _keys(document).items():
        taken.add(hashed(written))
        previous = entry.get("previous_key") if isinstance(entry, dict) else None
        if isinstance(previous, dict) and isinstance(previous.get("key"), str):
            taken.add(previous["key"])
    return taken


def create_key(document: dict[str, Any], body: Mapping[str, Any], now: float) -> str:
    """Add a key from `body` (a keys.json entry with `name`, and `key` if given); the key."""
    name = _name(body, "key")
    where = f"key '{name}'"
    entry = {field: value for field, value in body.items() if field != "key"}
    _checked(where, entry, "key")
    if find_key(document, name) is not None:
        raise EditRefused(409, "key_exists", f"{where}: a key of that name exists")
    secret = _given_or_new(where, document, body.get("key"))
    _keys(document)[hashed(secret)] = {**entry, "created_at": stamp(now)}
    return secret


def change_key(document: dict[str, Any], name: str, body: Mapping[str, Any]) -> None:
    """Set the fields of `body` on the key (null removes one, but `"budget": null` stays:
    no budget); its name and key stay."""
    where = f"key '{name}'"
    for fixed, instead in (("name", "create a key of the new name"), ("key", "rotate it")):
        if fixed in body:
            raise EditRefused(400, "invalid_field", f"{where}: {fixed!r} cannot change: {instead}")
    _checked(where, body, "key")
    written = find_key(document, name)
    if written is None:
        raise EditRefused(404, "unknown_key", f"No key is named {name[:100]!r}.")
    _merge(_keys(document)[written], body, NULL_IS_A_VALUE)


def delete_key(document: dict[str, Any], name: str) -> None:
    """Remove the key, and with it any predecessor still in its grace."""
    written = find_key(document, name)
    if written is None:
        raise EditRefused(404, "unknown_key", f"No key is named {name[:100]!r}.")
    del _keys(document)[written]


def rotate_key(document: dict[str, Any], name: str, body: Mapping[str, Any], now: float) -> str:
    """Give the key a new virtual key; the old one works `grace_seconds` more. The new key.

    Only the key just replaced gets a grace: one that was still in its grace from an
    earlier rotation stops working now.
    """
    where = f"key '{name}'"
    unknown = set(body) - {"grace_seconds", "key"}
    if unknown:
        raise EditRefused(
            400,
            "invalid_key_settings",
            f"{where}: {sorted(unknown)[0]!r} is not a rotate field; known: grace_seconds, key",
        )
    grace = body.get("grace_seconds")
    if (
        isinstance(grace, bool)
        or not isinstance(grace, int | float)
        or not 0 <= grace <= MAX_GRACE_SECONDS
    ):
        raise EditRefused(
            400,
            "invalid_grace",
            f"{where}: grace_seconds must be a number of seconds, "
            f"0 (the old key stops now) to {MAX_GRACE_SECONDS}",
        )
    written = find_key(document, name)
    if written is None:
        raise EditRefused(404, "unknown_key", f"No key is named {name[:100]!r}.")
    secret = _given_or_new(where, document, body.get("key"))
    entries = _keys(document)
    entry = dict(entries[written])
    entry.pop("previous_key", None)
    entry.setdefault("name", name)  # a key named by its masked form keeps that name
    if grace > 0:
        entry["previous_key"] = {"key": hashed(written), "expires_at": now + grace}
    document["virtual_keys"] = {
        (hashed(secret) if old == written else old): (entry if old == written else value)
        for old, value in entries.items()
    }
    return secret


def prune(document: dict[str, Any], now: float) -> None:
    """Drop the predecessors whose grace has ended."""
    for entry in _keys(document).values():
        previous = entry.get("previous_key") if isinstance(entry, dict) else None
        if isinstance(previous, dict) and positive_number(previous.get("expires_at")):
            if previous["expires_at"] <= now:
                del entry["previous_key"]


def _teams(document: dict[str, Any]) -> dict[str, Any]:
    teams = document.setdefault("teams", {})
    if not isinstance(teams, dict):
        raise EditRefused(422, "invalid_key_settings", "'teams' must be an object")
    return teams


def create_team(document: dict[str, Any], body: Mapping[str, Any], now: float) -> None:
    name = _name(body, "team")
    where = f"team '{name}'"
    entry = {field: value for field, value in body.items() if field != "name"}
    _checked(where, entry, "team")
    if name in _teams(document):
        raise EditRefused(409, "team_exists", f"{where}: a team of that name exists")
    _teams(document)[name] = {**entry, "created_at": stamp(now)}


def change_team(document: dict[str, Any], name: str, body: Mapping[str, Any]) -> None:
    where = f"team '{name}'"
    if "name" in body:
        raise EditRefused(400, "invalid_field", f"{where}: 'name' cannot change")
    _checked(where, body, "team")
    if name not in _teams(document):
        raise EditRefused(404, "unknown_team", f"No team is named {name[:100]!r}.")
    _merge(_teams(document)[name], body, frozenset())  # a team has no default budget


def delete_team(document: dict[str, Any], name: str) -> None:
    if name not in _teams(document):
        raise EditRefused(404, "unknown_team", f"No team is named {name[:100]!r}.")
    members = sorted(
        str(entry.get("name", masked(written)))
        for written, entry in _keys(document).items()
        if isinstance(entry, dict) and entry.get("team") == name
    )
    if members:
        raise EditRefused(
            409,
            "team_has_keys",
            f"team '{name}' still has keys ({', '.join(members[:20])}): move or delete them first",
        )
    del _teams(document)[name]


# Fields whose null keys.json reads as a value, not as absence: a key's `"budget": null` is
# no budget, while a key without `budget` takes BUDGET_USD's.
NULL_IS_A_VALUE = frozenset({"budget"})


def _merge(entry: dict[str, Any], body: Mapping[str, Any], kept: frozenset[str]) -> None:
    """Set the fields of `body`; null removes one, but for the fields in `kept`."""
    for field, value in body.items():
        if value is None and field not in kept:
            entry.pop(field, None)
        else:
            entry[field] = value


def hashed_document(document: dict[str, Any]) -> dict[str, Any]:
    """The document with every virtual key as its digest (what a key store keeps)."""
    hashed_keys = {}
    for written, entry in _keys(document).items():
        if is_hashed(written):
            digest_of("keys.json", written)
        hashed_keys[hashed(written)] = entry
    return {**document, "virtual_keys": hashed_keys}


def exported(document: dict[str, Any], with_real_keys: bool) -> dict[str, Any]:
    """The document as keys.json: virtual keys as digests; real keys (and AWS secrets)
    redacted unless asked for (`api_key_env` references are kept: they name a variable)."""
    shown = copy.deepcopy(hashed_document(document))
    if not with_real_keys:
        _redact(shown["virtual_keys"])
    return shown


def _redact(value: Any) -> None:
    if isinstance(value, dict):
        for field, inner in value.items():
            if field in SECRET_FIELDS:
                value[field] = REDACTED
            else:
                _redact(inner)
    elif isinstance(value, list):
        for inner in value:
            _redact(inner)
