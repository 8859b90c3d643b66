"""The turns of a Responses API WebSocket session, each admitted when the client sends it.

In the Responses API's WebSocket mode (an upgrade on `/v1/responses`) a session stays open
across an agent's turns, each a `response.create` from the client. A session admitted once
at its start would give a key that is exhausted or revoked later free turns, so here every
`response.create` is admitted on its own, by the key as keys.json has it *now*, before it
goes upstream (`gate`): a refused turn never reaches the provider, and the client gets an
`error` event in its place (status, code, message; the session stays open, so a client may
retry when its window allows). Each admitted turn is settled by the usage of its
`response.completed` (or `.incomplete`, `.failed`; an estimate when none comes), in the
order the turns were sent: the provider runs a connection's responses one at a time. A turn
the provider refuses gets an `error` event and no response (a `previous_response_id` it no
longer holds, a turn sent while another runs): the first turn sent that no
`response.created` has begun is settled then, with nothing used, so its reservation does
not hold the key's window until the session ends, nor take the next turn's usage.

While the gateway shuts down, a turn is in flight from its `response.create` to its last
event (`is_turning`: the session's drain lets it end), and a new `response.create` is not
admitted: it gets the error event OpenAI sends on a connection that takes no more turns
(`websocket_connection_limit_reached`): Codex retries the turn on a new connection (to a
gateway that is not shutting down), agents that retry only on that code (pi) too, and the
`openai` SDK hands the error to the code that sent the turn, which a bare close would have
left waiting for the answer to a turn that never ran.

Continuations (`previous_response_id`) stay on the session's one upstream connection, so on
the real key the session opened with, where the provider keeps the previous response.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable
from typing import Any

import orjson

from proxy.errors import GatewayError, openai_type
from proxy.exchange import Exchange
from proxy.keys.keys import VirtualKey
from proxy.quota.tracker import Admission
from proxy.realtime.websocket import Forward, Gated
from proxy.record import Usage
from proxy.relay import named
from proxy.relay.peek import Peek, check_said_once
from proxy.upstream.outbound import swap_model, swap_model_within
from proxy.upstream.targets import Target
from proxy.usage import estimate, responses

_CREATE = b"response.create"
# A JSON escape (`response\\u002ecreate`) spells the event type without its plain bytes.
_ESCAPE = b"\\u"
# What a turn that names no model runs: its stored prompt's model (a `prompt` id).
_UNNAMED = "the model of its stored prompt"


class Turns:
    """A session's turns: admitted when sent, settled in order as their usage comes."""

    __slots__ = ("_begun", "_exchange", "_open", "_serving")

    def __init__(self, exchange: Exchange, serving: Target) -> None:
        self._exchange = exchange
        self._serving = serving  # the session's target: where each turn is priced
        # Turns admitted and not yet settled, oldest first: (key, admission, model).
        self._open: deque[tuple[VirtualKey, Admission | None, str | None]] = deque()
        self._begun = 0  # of them, the first ones, those a response.created began

    def gate(self, frame: bytes) -> Gated | Awaitable[Gated]:
        """Admit a client's `response.create`; None lets the frame go on, else the `error`
        event the client gets instead, or (a target pinning a model) the turn with that
        model swapped in, as an HTTP body's is. A frame that cannot hold one goes on unread.
        A turn is answered by an awaitable (`_admitted`): its admission may wait for a slot."""
        if frame.find(_CREATE) < 0 and frame.find(_ESCAPE) < 0:
            return None
        try:
            event = _event(frame)  # 400
        except GatewayError as error:
            return refusal(error)
        if event is None or event.get("type") != "response.create":
            return None
        return self._admitted(frame, event)

    async def _admitted(self, frame: bytes, event: dict[str, Any]) -> Gated:
        """A turn admitted (`gate`), or the error event refusing it."""
        model = _model(event)
        try:
            key, admission = await self._admit(frame, event, model)
        except GatewayError as error:
            return refusal(error)
        record = self._exchange.record
        if record.model is None:  # the upgrade named none: the session is logged under this one
            record.saw_model(model)
        pinned = self._serving.model
        swapped = frame
        if pinned is not None:  # the target's model runs in place of the one the turn names
            swapped = swap_model_within(swap_model(frame, pinned), "response", pinned)
        if swapped is frame:
            self._open.append((key, admission, model))
            return None
        self._open.append((key, admission, pinned))  # it runs, and is priced as, the pinned one
        return Forward(swapped)

    async def _admit(
        self, frame: bytes, event: dict[str, Any], model: str | None
    ) -> tuple[VirtualKey, Admission | None]:
        def check(key: VirtualKey) -> None:
            # As an HTTP body's: a deciding field named twice (parsers disagree on which copy
            # counts: 400), a `Model` that case-folding readers (Go's) take as `model` (403).
            check_said_once(frame, event, key)
            names = _names(event, model)
            if key.allowed_models is not None:
                names += _spelt_otherwise(event)
            named.check(key, names)  # 403

        # 401, 403, 429, 503
        return await self._exchange.admit_turn(_peek(event, model), self._serving, check)

    def is_turning(self) -> bool:
        """A turn is in flight: admitted and sent, its last event not yet come."""
        return bool(self._open)

    def refusal(self, frame: bytes) -> bytes | None:
        """While the gateway drains: the error event a `response.create` gets in place of its
        admission; None for any other frame (one the gate refuses as unreadable too)."""
        if frame.find(_CREATE) < 0 and frame.find(_ESCAPE) < 0:
            return None
        try:
            event = _event(frame)
        except GatewayError:
            return None  # the gate's 400
        if event is None or event.get("type") != "response.create":
            return None
        return refusal(
            GatewayError(
                503,
                "websocket_connection_limit_reached",
                "The gateway is shutting down: this connection takes no new response. "
                "Create a new websocket connection to continue.",
            )
        )

    def begun(self) -> None:
        """A response began (response.created): the first turn not yet begun runs."""
        self._begun = min(self._begun + 1, len(self._open))

    def completed(
        self, usage: Usage, *, service_tier: str | None = None, answered: str | None = None
    ) -> None:
        """The oldest open turn's usage came: settle it, priced at the tier that served it
        and as the model that ran it (a response the gateway did not see asked for, e.g. a
        provider's own, is charged to the key as it stands)."""
        exchange = self._exchange
        if self._open:
            key, admission, model = self._open.popleft()
            self._begun = max(self._begun - 1, 0)
            exchange.settle_turn(key, admission, usage, model, service_tier, answered)
        elif exchange.key is not None:
            exchange.settle_turn(exchange.key, None, usage, None, service_tier, answered)

    def refused(self) -> None:
        """The provider sent an error event: the first turn no response began was refused
        (nothing used); with every open turn begun, the error is a running response's,
        whose own end follows."""
        if self._begun < len(self._open):
            key, admission, model = self._open[self._begun]
            del self._open[self._begun]
            self._exchange.settle_turn(key, admission, None, model)

    def finish(self) -> None:
        """At the session's end: turns that never completed give back their reservations."""
        self._begun = 0
        while self._open:
            key, admission, model = self._open.popleft()
            self._exchange.settle_turn(key, admission, None, model)


def refusal(error: GatewayError) -> bytes:
    """The Responses WebSocket mode's `error` event for a turn the gateway refused, with the
    headers its HTTP answer would carry (`Retry-After`, `x-should-retry`, the quota's), as the
    provider's own error events carry theirs: Codex reads its wait there."""
    event: dict[str, object] = {
        "type": "error",
        "status": error.status,
        "error": {
            "type": openai_type(error),
            "code": error.code,
            "message": error.message,
            "param": None,
        },
    }
    if error.headers:
        event["headers"] = {name.lower(): value for name, value in error.headers.items()}
    return orjson.dumps(event)


def _event(frame: bytes) -> dict[str, Any] | None:
    """The frame's event; None for JSON that is not an object. Raises 400 for a frame that
    may be a turn and is not JSON the gateway can read (a lone surrogate, say): another
    reader at the provider may take it, and run a turn the gateway never admitted."""
    try:
        event = orjson.loads(frame)
    except orjson.JSONDecodeError:
        why = "A frame that may be a response.create is not JSON the gateway can read."
        raise GatewayError(400, "invalid_json", why) from None
    return event if isinstance(event, dict) else None


def _model(event: dict[str, Any]) -> str | None:
    """The turn's model: at the event's top level, or in a nested `response` object."""
    model = event.get("model")
    nested = event.get("response")
    if model is None and isinstance(nested, dict):
        model = nested.get("model")
    return model if isinstance(model, str) and model else None


def _names(event: dict[str, Any], model: str | None) -> list[Any]:
    """Every model the turn runs, as an HTTP body's are read (`named.in_document`): its own
    (`_model`, or what it runs naming none) and those of its parts that run their own (an
    image_generation tool's), at the top level and in a nested `response`."""
    names: list[Any] = [model or named.Unnamed(_UNNAMED)]
    return names + named.in_document(event) + named.in_document(event.get("response"))


def _spelt_otherwise(event: dict[str, Any]) -> list[Any]:
    """The turn's models named in another case (`Model`), at the top level and in a nested
    `response`, as an HTTP body's are read (`named.spelt_otherwise`)."""
    names = named.spelt_otherwise(event)
    nested = event.get("response")
    return names + named.spelt_otherwise(nested) if isinstance(nested, dict) else names


def _peek(event: dict[str, Any], model: str | None) -> Peek:
    """What the quota reserves for a turn: its new input at about 4 characters a token, and
    the output cap it names (the earlier turns' context is the provider's, not counted)."""
    cap = event.get("max_output_tokens")
    has_cap = isinstance(cap, int) and not isinstance(cap, bool) and cap > 0
    return Peek(
        model=model,
        prompt_tokens_estimate=estimate.tokens(responses.prompt_chars(event)),
        max_output_tokens=cap if has_cap else None,
        is_generation=True,
    )
