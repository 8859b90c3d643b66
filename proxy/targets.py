"""Targets: where a virtual key's requests may go, and which real key each attempt uses.

A *target* is a provider, a pool of real keys, and optionally a model that replaces the
body's. A key's *plan* is its target followed by its fallbacks, tried in that order; a key
with `routes` picks a plan by the body's `model` (first matching pattern wins). All of it is
read from keys.json once (`parse_plans`), as data that one attempt loop walks.

A pool chooses keys by smooth weighted round-robin (nginx's algorithm: each pick adds every
usable key's weight to its score, takes the highest, and subtracts the total from it), so
weights 3:1 give a a-a-b-a, never a-a-a-b. A key the provider rate-limits (429) or refuses
(401/403) is set aside until its cooldown passes; set aside, it gets no traffic at all.
With a sticky header named (POOL_STICKY_HEADER), the same header value keeps the same key
while that key is usable, so a provider's prompt cache keeps hitting.

What it does not do: share cooldowns between processes (each worker learns a key's 429 on
its own: a few extra 429s, which the attempt loop absorbs), or balance by latency.
"""

from __future__ import annotations

import fnmatch
import re
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.errors import GatewayError
from proxy.fields import KeysFileError, check_fields
from proxy.providers import Provider

MAX_WEIGHT = 1000


@dataclass(slots=True)
class Credential:
    """One real key of a pool, with its weight and its state in the pool."""

    api_key: str = field(repr=False)
    label: str  # "<target>#<n>": how logs and /health name it; never the key
    weight: int = 1
    score: int = 0  # smooth weighted round-robin's running score
    resting_until: float = 0.0  # set aside (429, 401, 403) until this monotonic time


class Pool:
    """The real keys of one target: weighted round-robin over the usable ones."""

    __slots__ = ("credentials", "_total")

    def __init__(self, credentials: list[Credential]) -> None:
        self.credentials = credentials
        self._total = sum(c.weight for c in credentials)

    def pick(
        self, now: float, sticky: str | None = None, exclude: frozenset[str] = frozenset()
    ) -> Credential | None:
        """The next usable key (not resting, not excluded); None when none is left."""
        credentials = self.credentials
        if len(credentials) == 1:  # the common case pays nothing for pools
            only = credentials[0]
            usable = only.resting_until <= now and only.label not in exclude
            return only if usable else None
        usable = [c for c in credentials if c.resting_until <= now and c.label not in exclude]
        if not usable:
            return None
        if sticky is not None:
            # A stable hash of the header value over all keys; a resting key falls through.
            wanted = credentials[zlib.crc32(sticky.encode()) % len(credentials)]
            if wanted in usable:
                return wanted
        total = sum(c.weight for c in usable)
        best = usable[0]
        for credential in usable:
            credential.score += credential.weight
            if credential.score > best.score:
                best = credential
        best.score -= total
        return best

    def rest(self, credential: Credential, until: float) -> None:
        """Set a key aside until `until` (monotonic); a pool of one is never set aside."""
        if len(self.credentials) > 1:
            credential.resting_until = max(credential.resting_until, until)

    @property
    def size(self) -> int:
        return len(self.credentials)


@dataclass(frozen=True, slots=True)
class Target:
    """A provider, its pool of real keys, and the model it serves (None: the body's own)."""

    name: str  # from keys.json only: the provider, and "/model" when the target names one
    provider: Provider
    pool: Pool = field(repr=False)
    model: str | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    """A target and its fallbacks, in the order they are tried."""

    targets: tuple[Target, ...]
    # Every real key of every target: what no response header may carry (issue 10).
    secrets: tuple[str, ...] = field(default=(), repr=False)

    @property
    def is_single(self) -> bool:
        """One target with one key: nothing to fail over to."""
        return len(self.targets) == 1 and len(self.targets[0].pool.credentials) == 1

    @property
    def primary(self) -> Target:
        return self.targets[0]


@dataclass(frozen=True, slots=True)
class Route:
    """Models matching `patterns` go to `plan`."""

    patterns: tuple[str, ...]
    matcher: re.Pattern[str] = field(repr=False)
    plan: Plan

    def matches(self, model: str) -> bool:
        return self.matcher.fullmatch(model) is not None


@dataclass(frozen=True, slots=True)
class Plans:
    """A key's own plan (None when it only has routes) and its routes."""

    own: Plan | None
    routes: tuple[Route, ...] = ()

    def choose(self, model: str | None) -> Plan:
        """The plan for this request's model. Raises 400 when no route serves it."""
        if self.routes and model is not None:
            for route in self.routes:
                if route.matches(model):
                    return route.plan
        if self.own is not None:
            return self.own
        served = ", ".join(p for route in self.routes for p in route.patterns)
        shown = "none" if model is None else repr(model[:200])
        raise GatewayError(
            400,
            "model_not_routed",
            f"This key routes by model and none of its routes serves model {shown}. "
            f"It serves: {served}.",
            "model",
        )

    @property
    def first(self) -> Plan:
        """The plan a request without a model goes to first (for /usage, health, realtime)."""
        return self.own if self.own is not None else self.routes[0].plan

    def every_target(self) -> list[Target]:
        plans = ([self.own] if self.own else []) + [route.plan for route in self.routes]
        return [target for plan in plans for target in plan.targets]


RealKey = Callable[[Mapping[str, Any], str], str]


def parse_plans(
    key: str,
    entry: Mapping[str, Any],
    providers: Mapping[str, Provider],
    real_key: RealKey,
) -> Plans:
    """A key's plans from its keys.json entry. Raises KeysFileError, starting with `key`."""
    own = None
    if "provider" in entry:
        own = _plan(key, entry, providers, real_key, "")
    elif "fallbacks" in entry:
        raise KeysFileError(
            f"{key}: fallbacks needs the key's own provider (or put them in a route)"
        )
    raw_routes = entry.get("routes")
    if raw_routes is None:
        if own is None:
            raise KeysFileError(f"{key}: provider is missing (or give the key routes)")
        return Plans(own)
    if not isinstance(raw_routes, list) or not raw_routes:
        raise KeysFileError(f"{key}: routes must be a non-empty list of {{models, provider, ...}}")
    routes = []
    for index, raw in enumerate(raw_routes):
        at = f"routes[{index}]"
        if not isinstance(raw, dict):
            raise KeysFileError(f"{key}: {at} must be an object with models and a provider")
        check_fields(key, raw, "route", f"{at}.")
        patterns = raw.get("models")
        if not isinstance(patterns, list) or not patterns:
            raise KeysFileError(f"{key}: {at}.models must be a non-empty list of model patterns")
        if not all(isinstance(p, str) and p for p in patterns):
            raise KeysFileError(f"{key}: {at}.models must hold non-empty strings")
        plan = _plan(key, raw, providers, real_key, f"{at}.")
        routes.append(Route(tuple(patterns), compile_patterns(patterns), plan))
    return Plans(own, tuple(routes))


def compile_patterns(patterns: list[str]) -> re.Pattern[str]:
    """Shell-style patterns as one compiled alternation."""
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


def _plan(
    key: str,
    entry: Mapping[str, Any],
    providers: Mapping[str, Provider],
    real_key: RealKey,
    where: str,
) -> Plan:
    first = _target(key, entry, providers, real_key, where)
    targets = [first]
    fallbacks = entry.get("fallbacks", [])
    if not isinstance(fallbacks, list):
        raise KeysFileError(f"{key}: {where}fallbacks must be a list of targets")
    for index, raw in enumerate(fallbacks):
        at = f"{where}fallbacks[{index}]"
        if not isinstance(raw, dict):
            raise KeysFileError(f"{key}: {at} must be an object with a provider and a key")
        check_fields(key, raw, "target", f"{at}.")
        fallback = _target(key, raw, providers, real_key, f"{at}.")
        if fallback.provider.api != first.provider.api:
            raise KeysFileError(
                f"{key}: {at}: provider '{fallback.provider.name}' speaks the {fallback.provider.api} "
                f"API but '{first.provider.name}' speaks the {first.provider.api} API; "
                "a fallback must speak the same API"
            )
        targets.append(fallback)
    secrets = tuple(c.api_key for target in targets for c in target.pool.credentials)
    return Plan(tuple(targets), secrets)


def _target(
    key: str,
    entry: Mapping[str, Any],
    providers: Mapping[str, Provider],
    real_key: RealKey,
    where: str,
) -> Target:
    provider = providers.get(entry.get("provider"))  # type: ignore[arg-type]
    if provider is None:
        known = ", ".join(sorted(providers))
        raise KeysFileError(
            f"{key}: {where}provider {entry.get('provider')!r} is unknown (known: {known})"
        )
    if not provider.base_url.host:
        raise KeysFileError(
            f"{key}: {where}provider '{provider.name}' needs a base_url in 'providers'"
        )
    model = entry.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise KeysFileError(f"{key}: {where}model must be a non-empty string")
    name = provider.name if model is None else f"{provider.name}/{model}"
    return Target(name, provider, _pool(key, entry, real_key, where, name), model)


def _pool(key: str, entry: Mapping[str, Any], real_key: RealKey, where: str, name: str) -> Pool:
    has_pool = "api_keys" in entry
    if has_pool and ("api_key" in entry or "api_key_env" in entry):
        raise KeysFileError(f"{key}: {where}set exactly one of api_key, api_key_env and api_keys")
    if not has_pool:
        return Pool([Credential(real_key(entry, where), f"{name}#1")])
    members = entry["api_keys"]
    if not isinstance(members, list) or not members:
        raise KeysFileError(
            f"{key}: {where}api_keys must be a non-empty list of {{api_key, weight}}"
        )
    credentials = []
    for index, member in enumerate(members):
        at = f"{where}api_keys[{index}]."
        if not isinstance(member, dict):
            raise KeysFileError(f"{key}: {at[:-1]} must be an object with api_key or api_key_env")
        check_fields(key, member, "pool entry", at)
        weight = member.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 < weight <= MAX_WEIGHT:
            raise KeysFileError(f"{key}: {at}weight must be an integer from 1 to {MAX_WEIGHT}")
        credentials.append(Credential(real_key(member, at), f"{name}#{index + 1}", weight))
    return Pool(credentials)
