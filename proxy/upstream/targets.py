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

import re
import zlib
from dataclasses import dataclass, field

from proxy.errors import GatewayError
from proxy.upstream.providers import Provider
from proxy.upstream.signing import Signer


@dataclass(slots=True)
class Credential:
    """One real key of a pool, with its weight and its state in the pool."""

    api_key: str = field(repr=False)
    label: str  # "<target>#<n>": how logs and /health name it; never the key
    weight: int = 1
    score: int = 0  # smooth weighted round-robin's running score
    resting_until: float = 0.0  # set aside (429, 401, 403) until this monotonic time
    # A cloud's: signs each request in place of sending `api_key` (then the cloud's secret,
    # kept only so that no response header may echo it).
    signer: Signer | None = field(default=None, repr=False)


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
            is_usable = only.resting_until <= now and only.label not in exclude
            return only if is_usable else None
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
    # Vertex: "projects/<project>/locations/<region>", what the client's path names is
    # replaced with (a client in gateway mode need not know the project).
    project_path: str | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    """A target and its fallbacks, in the order they are tried."""

    targets: tuple[Target, ...]
    # Every real key of every target: what no response header may carry, should a provider echo one.
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
        if model is None:  # a request naming no model (GET /v1/models, files): the first route
            return self.routes[0].plan
        served = ", ".join(p for route in self.routes for p in route.patterns)
        shown = repr(model[:200])
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
