"""Targets: where a virtual key's requests may go, and which real key each attempt uses.

A *target* is a provider, a pool of real keys, and optionally a model that replaces the
body's. A key's *plan* is its target followed by its fallbacks, tried in that order; a key
with `routes` picks a plan by the body's `model` (first matching pattern wins). All of it is
read from keys.json once (`parse_plans`), as data that one attempt loop walks.

How a pool chooses among its usable keys (not resting, not already tried), in order:

- *affinity*: a request that names its conversation (`prompt_cache_key`, Anthropic's
  `metadata.user_id`, or the POOL_STICKY_HEADER header) goes to the member with the highest
  weighted rendezvous score, -weight / ln(u), u a stable hash of the conversation and the
  member, uniform in (0, 1): each conversation stays on one member while it is usable, so
  the provider's prompt cache keeps hitting; over many conversations the members get their
  weights; a member resting or added moves only its own share of conversations.
- `"balance": "latency"`: of two members drawn by weight, the one with the lower expected
  wait, its time to first byte (an average over the last tens of requests that fades with
  time) times its requests in flight plus one; a member not yet measured first. A measurement fades toward nothing
  (DECAY_SECONDS): a member left aside looks cheaper as time passes, gets a request, and is
  measured again, so a slow member that speeds up gets its share back.
- `"weighted"` (the default): smooth weighted round-robin (nginx's algorithm: each pick adds
  every usable key's weight to its score, takes the highest, and subtracts the total from
  it), so weights 3:1 give a a-a-b-a, never a-a-a-b.

A key the provider rate-limits (429) or refuses (401/403) is set aside until its cooldown
passes; set aside, it gets no traffic at all. A plan whose `balance` is "latency" orders
its targets the same way (affinity, else the lower expected wait of two, equal weights);
"weighted" tries them in their order. A pool of one key pays for none of this.

What it does not do: share cooldowns or measurements between processes (each worker
learns a key's 429 and its speed on its own), or keep measurements across a reload.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from proxy.errors import GatewayError
from proxy.upstream.providers import Provider
from proxy.upstream.signing import Signer

WEIGHTED, LATENCY = "weighted", "latency"
BALANCES = (WEIGHTED, LATENCY)
# How fast a time-to-first-byte measurement fades: its weight is exp(-age / DECAY_SECONDS);
# and each new one weighs at least NEW_WEIGHT, so a busy member's average follows within
# tens of requests, an idle one's within seconds.
DECAY_SECONDS = 10.0
NEW_WEIGHT = 0.1
_UNIFORM = 2.0**-32  # a 32-bit hash as a fraction


def affinity_of(conversation: str) -> bytes:
    """A conversation's name as rendezvous hashing reads it: a 64-byte hash (BLAKE2b), the
    same in every process (unlike hash()), 16 uniform 32-bit numbers, one per member."""
    return hashlib.blake2b(conversation.encode("utf-8", "replace")).digest()


def _uniforms(affinity: bytes, count: int) -> tuple[int, ...]:
    """`count` uniform 32-bit numbers from `affinity`: the n-th member's is always the n-th."""
    if count > 16:  # beyond the hash's 16: more from the same bytes (SHAKE)
        affinity = hashlib.shake_256(affinity).digest(4 * count)
    return struct.unpack_from(f"<{count}I", affinity)


@dataclass(slots=True)
class Speed:
    """What a member (a pool key, or a target) has shown: time to first byte, in flight."""

    ttfb: float | None = None  # seconds, as of `measured_at`; None: never measured
    measured_at: float = 0.0
    in_flight: int = 0

    def expected_wait(self, now: float) -> float:
        """The faded time to first byte times in flight plus one; 0 (first) when never
        measured and idle, infinite when never measured and busy."""
        ttfb = self.ttfb
        if ttfb is None:
            return 0.0 if self.in_flight == 0 else math.inf
        fade = math.exp((self.measured_at - now) / DECAY_SECONDS)
        return ttfb * fade * (self.in_flight + 1)

    def measure(self, seconds: float, now: float) -> None:
        """A first byte came after `seconds`: the average moves toward it as time passed."""
        ttfb = self.ttfb
        if ttfb is None:
            self.ttfb = seconds
        else:
            kept = (1.0 - NEW_WEIGHT) * math.exp(min(0.0, self.measured_at - now) / DECAY_SECONDS)
            self.ttfb = ttfb * kept + seconds * (1.0 - kept)
        self.measured_at = now

    def report(self) -> dict[str, object]:
        """/health's view: the last measured time to first byte (ms) and in flight."""
        ttfb_ms = None if self.ttfb is None else round(self.ttfb * 1000.0, 1)
        return {"ttfb_ms": ttfb_ms, "in_flight": self.in_flight}


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
    speed: Speed = field(default_factory=Speed, repr=False)
    # What /health shows for its label: every virtual key's key of that label at its target
    # together, shared with them (`Members`); its own until the key ring groups it.
    shown: Speed = field(default_factory=Speed, repr=False)


class Pool:
    """The real keys of one target, chosen among the usable ones (see the module's doc)."""

    __slots__ = ("balance", "credentials", "has_rested", "_draw", "_unmeasured")

    def __init__(
        self,
        credentials: list[Credential],
        balance: str = WEIGHTED,
        draw: Callable[[], float] = random.random,
    ) -> None:
        """`draw`: uniform in [0, 1), for the latency choice's two draws (tests seed it)."""
        self.credentials = credentials
        self.balance = balance
        self._draw = draw
        self._unmeasured = len(credentials)  # keys with no time to first byte yet
        self.has_rested = False  # a key was set aside once (a reload carries rests over)

    def pick(
        self, now: float, affinity: bytes | None = None, exclude: AbstractSet[str] = frozenset()
    ) -> Credential | None:
        """The next usable key (not resting, not excluded); None when none is left.

        `affinity`: the request's conversation (`affinity_of`), None when it names none."""
        credentials = self.credentials
        if len(credentials) == 1:  # the common case pays nothing for pools
            only = credentials[0]
            is_usable = only.resting_until <= now and only.label not in exclude
            return only if is_usable else None
        if affinity is not None:
            # Weighted rendezvous: the usable key of the highest -weight / ln(u).
            best, best_score, log = None, -1.0, math.log
            for credential, uniform in zip(
                credentials, _uniforms(affinity, len(credentials)), strict=True
            ):
                if credential.resting_until > now or credential.label in exclude:
                    continue
                score = credential.weight / -log((uniform + 0.5) * _UNIFORM)
                if score > best_score:
                    best, best_score = credential, score
            return best
        usable = [c for c in credentials if c.resting_until <= now and c.label not in exclude]
        if len(usable) <= 1:
            return usable[0] if usable else None
        if self.balance == LATENCY:
            if self._unmeasured:  # each is measured once before the two draws decide
                for credential in usable:
                    if credential.speed.ttfb is None and credential.speed.in_flight == 0:
                        return credential
            first, second = two_by_weight(usable, self._draw)
            if second.speed.expected_wait(now) < first.speed.expected_wait(now):
                return second
            return first
        total = 0
        best = usable[0]
        for credential in usable:
            total += credential.weight
            credential.score += credential.weight
            if credential.score > best.score:
                best = credential
        best.score -= total
        return best

    def has_usable(self, now: float, exclude: AbstractSet[str] = frozenset()) -> bool:
        """Whether `pick` would find a key (not resting, not excluded), choosing none."""
        return any(c.resting_until <= now and c.label not in exclude for c in self.credentials)

    def soonest(self) -> Credential:
        """The key whose rest ends first: asked when every key rests, rather than none."""
        return min(self.credentials, key=lambda credential: credential.resting_until)

    def rest(self, credential: Credential, until: float) -> None:
        """Set a key aside until `until` (monotonic); a pool of one is never set aside."""
        if len(self.credentials) > 1:
            credential.resting_until = max(credential.resting_until, until)
            self.has_rested = True

    def take_rests(self, previous: Pool) -> None:
        """At a reload, from the pool this one replaces: each real key resting there rests
        here as long (found by its real key: one whose real key changed is a new key)."""
        if not previous.has_rested:
            return
        rests = {c.api_key: c.resting_until for c in previous.credentials if c.resting_until}
        for credential in self.credentials:
            until = rests.get(credential.api_key)
            if until is not None:
                self.rest(credential, until)

    def began(self, credential: Credential) -> None:
        """An attempt goes to `credential`: in flight until `ended`."""
        credential.speed.in_flight += 1
        credential.shown.in_flight += 1

    def ended(self, credential: Credential) -> None:
        """The attempt failed, was set aside, or its answer reached the client whole."""
        credential.speed.in_flight -= 1
        credential.shown.in_flight -= 1

    def measured(self, credential: Credential, seconds: float, now: float) -> None:
        """`credential`'s answer had its first bytes (headers) after `seconds`."""
        speed = credential.speed
        if speed.ttfb is None:
            self._unmeasured -= 1
        speed.measure(seconds, now)
        shown = credential.shown  # the label's time to first byte: the one measured last
        shown.ttfb, shown.measured_at = speed.ttfb, now

    def expected_wait(self, now: float) -> float:
        """The lowest expected wait of its usable keys (a target's, for a plan's choice)."""
        waits = [c.speed.expected_wait(now) for c in self.credentials if c.resting_until <= now]
        return min(waits) if waits else math.inf

    @property
    def size(self) -> int:
        return len(self.credentials)


def two_by_weight(
    members: Sequence[Credential], draw: Callable[[], float]
) -> tuple[Credential, Credential]:
    """Two different members, each drawn with a chance in proportion to its weight."""
    if len(members) == 2:
        a, b = members
        return (a, b) if draw() * (a.weight + b.weight) < a.weight else (b, a)
    total = sum(c.weight for c in members)
    first = _drawn(members, draw() * total, None)
    return first, _drawn(members, draw() * (total - first.weight), first)


def _drawn(members: Sequence[Credential], point: float, skip: Credential | None) -> Credential:
    chosen = members[-1] if members[-1] is not skip else members[-2]
    for member in members:
        if member is skip:
            continue
        point -= member.weight
        if point < 0:
            return member
    return chosen


@dataclass(frozen=True, slots=True)
class Target:
    """A provider, its pool of real keys, and the model it serves (None: the body's own)."""

    # From keys.json only: the provider, and "/model" when the target names one ("/region"
    # for a cloud's: each region is an endpoint of its own).
    name: str
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
    # Every real key of every target, but placeholders (`providers.searched`): what no response
    # header may carry, should a provider echo one.
    secrets: tuple[str, ...] = field(default=(), repr=False)
    balance: str = WEIGHTED  # LATENCY: the first target tried is chosen (see the module's doc)
    # The clouds' signers of its targets, whose bearer tokens change as they are refreshed.
    signers: tuple[Signer, ...] = field(default=(), repr=False)

    def echoable(self) -> tuple[str, ...]:
        """What no answer may carry: every real key, and the bearer tokens its clouds send
        (a Vertex access token, and one refreshed away that has not expired)."""
        if not self.signers:
            return self.secrets
        return self.secrets + tuple(token for signer in self.signers for token in signer.bearers)

    @property
    def is_single(self) -> bool:
        """One target with one key: nothing to fail over to."""
        return len(self.targets) == 1 and len(self.targets[0].pool.credentials) == 1

    @property
    def primary(self) -> Target:
        return self.targets[0]

    def answering(self, name: str | None) -> Target:
        """The target named `name` (the record's last tried: the one that answered)."""
        return next((target for target in self.targets if target.name == name), self.primary)

    def in_order(
        self,
        now: float,
        affinity: bytes | None,
        is_closed: Callable[[str], bool],
        draw: Callable[[], float] = random.random,
    ) -> tuple[Target, ...]:
        """The targets in the order to try them: as listed, or with "latency" the chosen one
        first (among those whose breaker `is_closed`), then the others as listed."""
        targets = self.targets
        if self.balance == WEIGHTED or len(targets) == 1:
            return targets
        usable = [index for index, t in enumerate(targets) if is_closed(t.name)]
        if len(usable) < 2:
            return targets
        if affinity is not None:
            uniforms = _uniforms(affinity, len(targets))  # equal weights: the highest wins
            first = targets[max(usable, key=uniforms.__getitem__)]
        else:
            count = len(usable)
            i, j = int(draw() * count), int(draw() * (count - 1))
            a, b = targets[usable[i]], targets[usable[j + (j >= i)]]
            first = b if b.pool.expected_wait(now) < a.pool.expected_wait(now) else a
        if first is targets[0]:
            return targets
        return (first, *(t for t in targets if t is not first))


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
    # What answers this key's requests, as text: each plan's targets (provider, base URL,
    # model, project, a digest of its real keys) and each route's patterns, never a real
    # key. Keys sharing a cache
    # scope share answers only when it is the same (a reload that changes it starts anew).
    served: str = ""

    def choose(self, model: str | None, api: str | None = None) -> Plan:
        """The plan for this request's model. Raises 400 when no route serves it.

        A request naming no model (a model list, a file, a batch by id) goes to the key's own
        target, else to its first route speaking `api`, the request's (None: any), else to its
        first route: what the Anthropic SDK lists or fetches is Anthropic's, whatever the
        route listed first."""
        if self.routes and model is not None:
            for route in self.routes:
                if route.matches(model):
                    return route.plan
        if self.own is not None:
            return self.own
        if model is None:
            for route in self.routes:
                if api is None or route.plan.primary.provider.api == api:
                    return route.plan
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

    def serves(self, model: str) -> bool:
        """A request naming `model` goes somewhere (`choose` raises no 400 for it)."""
        return self.own is not None or any(route.matches(model) for route in self.routes)

    @property
    def first(self) -> Plan:
        """The plan a request without a model goes to first (for /usage, health, realtime)."""
        return self.own if self.own is not None else self.routes[0].plan

    def every_target(self) -> list[Target]:
        plans = ([self.own] if self.own else []) + [route.plan for route in self.routes]
        return [target for plan in plans for target in plan.targets]

    def serving(self, target_name: str, label: str) -> tuple[Target, Credential] | None:
        """The target and pool key that answered a request, by the names a record keeps
        (the target's name, the key's label); None when neither is the key's any more."""
        for target in self.every_target():
            if target.name == target_name:
                for credential in target.pool.credentials:
                    if credential.label == label:
                        return target, credential
        return None


class Members:
    """/health's view of each target's keys by label: the time to first byte measured last
    (ms, None before the first) and the requests in flight, over every virtual key whose
    target has that name.

    Grouped once, when a key ring is built: each key of a label shares that label's `shown`
    speed, which the pools keep as they keep their own; so a report costs the labels, not
    the keys (walking 10,000 keys' targets held the event loop for each /health probe)."""

    __slots__ = ("_by_name",)

    def __init__(self, targets: Iterable[Target]) -> None:
        """`targets`: every target of every key of a ring being built (none serving yet)."""
        by_name: dict[str, dict[str, Speed]] = {}
        for target in targets:
            members = by_name.setdefault(target.name, {})
            for credential in target.pool.credentials:
                shown = members.get(credential.label)
                if shown is None:
                    shown = members[credential.label] = Speed()
                credential.shown = shown
        self._by_name = {
            name: dict(sorted(members.items())) for name, members in sorted(by_name.items())
        }

    def report(self) -> dict[str, dict[str, dict[str, object]]]:
        return {
            name: {label: speed.report() for label, speed in members.items()}
            for name, members in self._by_name.items()
        }
