"""keys.json's shared limits: `teams` (top level), and a key's `team`, `max_in_flight`,
`queue_seconds` and `model_quotas`.

Each becomes a `tracker.Scope`, built once at load: the quota admits a request only when
every scope of its key admits it. A team is named only here (never by a request header).
A team's scope id is a digest of its name, so a reload keeps its windows, as a key's; a
model group's id is its key's id and a digest of its patterns, so reordering the groups
keeps them too.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.keys.fields import (
    MAX_NAME_CHARS,
    WINDOW_LENGTH,
    Defaults,
    KeysFileError,
    budget,
    check_fields,
    has_control,
    model_name,
    positive_int,
    window_length,
)
from proxy.quota.tracker import Limits, Scope

# A window with a token limit but no request limit counts requests up to this: never reached.
UNLIMITED_REQUESTS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Team:
    """A team of keys: its scope (windows, budget, slots), shared by every member."""

    name: str
    scope: Scope


@dataclass(frozen=True, slots=True)
class ModelQuota:
    """A window of its own for the models matching `patterns`, on top of the key's."""

    patterns: tuple[str, ...]
    matches: re.Pattern[str]
    scope: Scope


def parse_teams(
    path: str, section: Any, defaults: Defaults, refused: dict[str, KeysFileError]
) -> dict[str, Team]:
    """The top-level `teams` object: the teams that load; each that does not is added to
    `refused` (its name → why), and the others are still checked. Raises KeysFileError for
    a section that is not an object."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise KeysFileError(f"{path}: 'teams' must be an object of team name → limits")
    teams = {}
    for name, entry in section.items():
        try:
            teams[name] = _team(path, name, entry, defaults)
        except KeysFileError as error:
            refused[name] = error
    return teams


def _team(path: str, name: str, entry: Any, defaults: Defaults) -> Team:
    """One team of `teams`. Raises KeysFileError."""
    where = f"{path}: team '{name}'"
    if not name.strip():
        raise KeysFileError(f"{path}: a team name must be a non-empty string")
    if has_control(name):  # as the admin API refuses it
        raise KeysFileError(
            f"{path}: a team name contains a control character (a NUL, tab, line break "
            "or escape): a name must be printable text"
        )
    if name != name.strip():  # as the admin API refuses it
        raise KeysFileError(
            f"{path}: a team name has a space at an end: another name than without it, "
            f"shown alike; remove it ({name.strip()[:80]!r})"
        )
    if len(name) > MAX_NAME_CHARS:  # as the admin API refuses it
        raise KeysFileError(
            f"{path}: a team name must be at most {MAX_NAME_CHARS} characters (it is in "
            "its metrics)"
        )
    if not isinstance(entry, dict):
        raise KeysFileError(f"{where}: must be an object (quota, budget, max_in_flight, ...)")
    check_fields(where, entry, "team")
    cap, queue = in_flight(where, entry, defaults)
    if defaults.unshared_workers != 1 and ("quota" in entry or "budget" in entry):
        raise KeysFileError(
            f"{where}: a team's limits with WORKERS other than 1 need REDIS_URL: each "
            "worker would count its own share of them, multiplying them"
        )
    # A team deleted and created again through the admin API starts fresh windows.
    created_at = entry.get("created_at")
    if created_at is not None and not isinstance(created_at, str):
        raise KeysFileError(f"{where}: created_at must be a timestamp (text)")
    seed = name + (f"\n{created_at}" if created_at else "")
    scope = Scope(
        id="team-" + hashlib.sha256(seed.encode()).hexdigest()[:24],
        kind="team",
        name=name,
        limits=window(where, entry.get("quota"), "quota", defaults),
        budget=budget(where, entry, defaults) if "budget" in entry else None,
        max_in_flight=cap,
        queue_seconds=queue,
    )
    return Team(name, scope)


class UnknownTeam(KeysFileError):
    """A key names a team `teams` does not define, or one it defines but refused (`team`,
    the name, None when not text): that team's own problem is said instead."""

    def __init__(self, message: str, team: str | None) -> None:
        super().__init__(message)
        self.team = team


def team_of(where: str, entry: Mapping[str, Any], teams: Mapping[str, Team]) -> Team | None:
    """The key's `team`, which the top-level `teams` must define. Raises UnknownTeam."""
    name = entry.get("team")
    if name is None:
        return None
    if not isinstance(name, str) or name not in teams:
        known = ", ".join(sorted(teams)) or "none"
        raise UnknownTeam(
            f"{where}: team must name a team of 'teams' (known: {known})",
            name if isinstance(name, str) else None,
        )
    return teams[name]


def in_flight(where: str, entry: Mapping[str, Any], defaults: Defaults) -> tuple[int | None, float]:
    """`max_in_flight` and `queue_seconds` of a key or a team. Raises KeysFileError."""
    cap = entry.get("max_in_flight")
    queue = entry.get("queue_seconds", 0)
    if cap is not None and not positive_int(cap):
        raise KeysFileError(f"{where}: max_in_flight must be a positive integer")
    if cap is not None and defaults.unshared_workers != 1:
        raise KeysFileError(
            f"{where}: max_in_flight with WORKERS other than 1 needs REDIS_URL: each worker "
            "would count its own slots, multiplying the cap"
        )
    if isinstance(queue, bool) or not isinstance(queue, int | float) or not 0 <= queue <= 3600:
        raise KeysFileError(f"{where}: queue_seconds must be a number of seconds, 0 to 3600")
    if queue and cap is None:
        raise KeysFileError(f"{where}: queue_seconds needs max_in_flight (what it waits for)")
    return cap, float(queue)


def window(where: str, quota: Any, field: str, defaults: Defaults) -> Limits | None:
    """A window of requests and/or tokens (a team's quota, a model group); None when absent
    or when QUOTA_ENABLED is false (every window off, the keys' own as well)."""
    if quota is None:
        return None
    if not isinstance(quota, dict):
        raise KeysFileError(
            f"{where}: {field} must be an object (requests, tokens, window_seconds)"
        )
    if field == "quota":
        check_fields(where, quota, "quota", "quota.")
    requests = quota.get("requests")
    tokens = quota.get("tokens")
    seconds = quota.get("window_seconds", defaults.window_seconds)
    if requests is None and tokens is None:
        raise KeysFileError(f"{where}: {field} needs requests, tokens or both")
    if requests is not None and not positive_int(requests):
        raise KeysFileError(f"{where}: {field}.requests must be a positive integer")
    if tokens is not None and not positive_int(tokens):
        raise KeysFileError(f"{where}: {field}.tokens must be a positive integer")
    if not window_length(seconds):
        raise KeysFileError(f"{where}: {field}.window_seconds must be {WINDOW_LENGTH}")
    if not defaults.quota_enabled:
        return None
    return Limits(requests or UNLIMITED_REQUESTS, tokens, float(seconds))


def parse_model_quotas(
    where: str, section: Any, key_id: str, defaults: Defaults, window_seconds: float
) -> tuple[ModelQuota, ...]:
    """A key's `model_quotas`: a list of {models, requests?, tokens?, window_seconds?}.

    `window_seconds`: the key's window, what a group naming none gets."""
    if section is None:
        return ()
    if not isinstance(section, list):
        raise KeysFileError(f"{where}: model_quotas must be a list of {{models, requests, ...}}")
    # Only here, not for each key: most keys have no model_quotas, and the copy costs.
    defaults = dataclasses.replace(defaults, window_seconds=window_seconds)
    groups = []
    for index, group in enumerate(section):
        at = f"model_quotas[{index}]"
        if not isinstance(group, dict):
            raise KeysFileError(f"{where}: {at} must be an object (models, requests, tokens)")
        check_fields(where, group, "model quota", f"{at}.")
        models = group.get("models")
        if (
            not isinstance(models, list)
            or not models
            or not all(isinstance(m, str) and m for m in models)
        ):
            raise KeysFileError(f"{where}: {at}.models must be a list of model name patterns")
        for pattern in models:
            model_name(where, f"{at}.models", pattern)
        limits = window(where, {k: v for k, v in group.items() if k != "models"}, at, defaults)
        if limits is None:
            continue  # QUOTA_ENABLED=false: windows off
        digest = hashlib.sha256("\n".join(models).encode()).hexdigest()[:12]
        scope = Scope(
            id=f"{key_id}/model-{digest}",
            kind="model",
            name=", ".join(models),
            limits=limits,
        )
        matches = re.compile("|".join(f"(?:{fnmatch.translate(m)})" for m in models))
        groups.append(ModelQuota(tuple(models), matches, scope))
    return tuple(groups)
