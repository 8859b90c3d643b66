"""What the quota reads of a virtual key and of a request, as protocols.

The quota sits below the keys: a key is configured with the quota's limits, budget and
scopes (`keys` imports them), so the quota cannot import the key back without a circle.
It names here the few fields it reads instead; `keys.VirtualKey`, `relay.peek.Peek` and
`upstream.targets.Target` have them, and mypy checks that they still do wherever one is
handed in.
"""

from __future__ import annotations

from typing import Protocol

from proxy.quota.tracker import Budget, Limits, Scope


class Named(Protocol):
    @property
    def name(self) -> str: ...


class Scoped(Protocol):
    @property
    def scope(self) -> Scope: ...


class QuotaKey(Protocol):
    """A virtual key as the quota sees it: its handle, its limits, and whom it shares them with."""

    @property
    def id(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def limits(self) -> Limits | None: ...

    @property
    def budget(self) -> Budget | None: ...

    @property
    def team(self) -> Scoped | None: ...

    @property
    def shares(self) -> bool: ...

    @property
    def provider(self) -> Named: ...

    @property
    def output_allowance(self) -> int: ...

    def scopes(self, model: str | None) -> tuple[Scope, ...]: ...


class QuotaRequest(Protocol):
    """A request as the quota sees it: its model, and what it may use (for the reservation)."""

    @property
    def model(self) -> str | None: ...

    @property
    def prompt_tokens_estimate(self) -> int: ...

    @property
    def max_output_tokens(self) -> int | None: ...

    @property
    def answers(self) -> int: ...

    @property
    def is_generation(self) -> bool: ...


class Serving(Protocol):
    """Where a request will be served, as its reservation is priced: a provider, and the
    model the target puts in place of the body's (None: the body's own)."""

    @property
    def provider(self) -> Named: ...

    @property
    def model(self) -> str | None: ...
