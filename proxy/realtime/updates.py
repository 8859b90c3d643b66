"""A restricted key's Realtime session: the transcription model its session.update names.

A Realtime session's model is its upgrade's `model` (checked there, `realtime`), fixed for
the session; but a `session.update` (the beta's `transcription_session.update` too) names
the model that transcribes the input audio (GA: `session.audio.input.transcription.model`;
beta: `session.input_audio_transcription.model`), which the provider runs and bills. For a
key with allowed_models, each such event is read before it goes upstream (`Updates.gate`):
one naming a model the key may not use never reaches the provider, and the client gets
Realtime's `error` event in its place (naming the client event it answers, as the
provider's do; the session stays open). A key without allowed_models has no gate: its
frames go on unread.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from proxy.errors import GatewayError, openai_type
from proxy.keys.keys import VirtualKey
from proxy.relay import named
from proxy.relay.peek import check_said_once
from proxy.usage.realtime_events import transcription_model

_UPDATE = b"session.update"
# A JSON escape (`session\\u002eupdate`) spells the event type without its plain bytes.
_ESCAPE = b"\\u"
_UPDATES = frozenset(("session.update", "transcription_session.update"))


class Updates:
    """The gate of a restricted key's session: its session updates' models, checked."""

    __slots__ = ("_key",)

    def __init__(self, key: VirtualKey) -> None:
        self._key = key

    def gate(self, frame: bytes) -> bytes | None:
        """None lets the frame go on; else the `error` event the client gets instead."""
        if frame.find(_UPDATE) < 0 and frame.find(_ESCAPE) < 0:
            return None
        try:
            event = orjson.loads(frame)
        except orjson.JSONDecodeError:
            why = "A frame that may be a session.update is not JSON the gateway can read."
            return refusal(GatewayError(400, "invalid_json", why), None)
        if not isinstance(event, dict) or event.get("type") not in _UPDATES:
            return None
        session = event.get("session")
        if not isinstance(session, dict):
            return None
        model = transcription_model(session)
        # As an HTTP body's: a model named twice in one object (parsers disagree on which copy
        # counts: 400), or as `Model`, which case-folding readers (Go's) take as `model`.
        names = [model] if model is not None else []
        for settings in _transcriptions(session):
            names += named.spelt_otherwise(settings)
        try:
            check_said_once(frame, event, self._key)  # 400
            if names:
                named.check(self._key, names)  # 403
        except GatewayError as error:
            client_event = event.get("event_id")
            return refusal(error, client_event if isinstance(client_event, str) else None)
        return None


def _transcriptions(session: dict[str, Any]) -> list[dict[str, Any]]:
    """The objects of a session that name its transcription model (GA's
    `audio.input.transcription`, the beta's `input_audio_transcription`)."""
    found = []
    for path in (("audio", "input", "transcription"), ("input_audio_transcription",)):
        value: object = session
        for name in path:
            value = value.get(name) if isinstance(value, dict) else None
        if isinstance(value, dict):
            found.append(value)
    return found


def refusal(error: GatewayError, client_event: str | None) -> bytes:
    """Realtime's `error` event for a client event the gateway refused."""
    return orjson.dumps(
        {
            "type": "error",
            "event_id": f"event_{uuid.uuid4().hex}",
            "error": {
                "type": openai_type(error),
                "code": error.code,
                "message": error.message,
                "param": None,
                "event_id": client_event,
            },
        }
    )
