"""A Realtime session's responses in flight, for the shutdown's drain.

A Realtime response runs from the provider's `response.created` to its `response.done`
(told by the session's usage reader, `realtime_events.SessionUsage`); out-of-band responses
(`conversation: "none"`) may run beside the conversation's, so each is counted. While the
gateway drains, the session is let finish those (`websocket.Session.drain`), and a
`response.create` the client sends gets Realtime's `error` event in its place (naming the
client event, as the provider's do) and never goes upstream.
"""

from __future__ import annotations

import orjson

from proxy.errors import GatewayError
from proxy.realtime.updates import refusal

_CREATE = b"response.create"
# A JSON escape (`response\\u002ecreate`) spells the event type without its plain bytes.
_ESCAPE = b"\\u"


class Responding:
    """How many of a session's responses have begun and are not done."""

    __slots__ = ("_running",)

    def __init__(self) -> None:
        self._running = 0

    def begun(self) -> None:
        """The provider began a response (response.created)."""
        self._running += 1

    def done(self) -> None:
        """A response is done (response.done: completed, cancelled, failed or incomplete)."""
        self._running = max(self._running - 1, 0)

    def is_turning(self) -> bool:
        """A response is in progress."""
        return self._running > 0

    def refusal(self, frame: bytes) -> bytes | None:
        """While the gateway drains: the error event a `response.create` gets in place of
        going upstream; None for any other frame."""
        if frame.find(_CREATE) < 0 and frame.find(_ESCAPE) < 0:
            return None
        try:
            event = orjson.loads(frame)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(event, dict) or event.get("type") != "response.create":
            return None
        client_event = event.get("event_id")
        error = GatewayError(
            503,
            "gateway_shutting_down",
            "The gateway is shutting down: this session takes no new response. "
            "Open a new session to continue.",
        )
        return refusal(error, client_event if isinstance(client_event, str) else None)
