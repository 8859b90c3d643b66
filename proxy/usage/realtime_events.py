"""OpenAI Realtime events over a WebSocket: the usage of each response, as frames go by.

The provider's `response.done` event carries `response.usage`: {input_tokens,
output_tokens, input_token_details {cached_tokens, audio_tokens, image_tokens,
cached_tokens_details {audio_tokens, image_tokens}}, output_token_details {audio_tokens}},
details parts of the totals (the cached audio and images parts of both the cached and the
audio or image input; transcriptions report in the same fields).
Each response's usage is handed on as it arrives (a session may last an hour: each is
charged then) and summed for the session's log line. A `response.done` whose usage holds
no valid count is a response of 0 tokens, handed on all the same.

When no usage comes (a provider that reports none, a session that ends mid-response), what
the response generated is estimated: the characters of its text, audio transcript and
tool-call argument deltas (the audio deltas themselves are not parsed: base64, the largest
frames). The prompt of such a response is not estimated (it is the whole conversation, held
by the provider). `finish` at the session's end charges a response still unanswered.

A session that transcribes its input audio (`session.audio.input.transcription`, the beta's
`input_audio_transcription`; a transcription session's too) is billed for each
transcription apart, at the transcription model's price: its
`conversation.item.input_audio_transcription.completed` event carries its `usage` (tokens,
or whisper-1's `duration` in seconds), handed on with that model, read from the provider's
`session.created`/`session.updated` events (and the beta's `transcription_session.*`).
Those events also name the model the session runs (`session.model`): each response's usage
is handed on with it (`answered`), for a session whose URL names none (a WebRTC or SIP
call's sideband, `?call_id=`) to be priced.

Its reader also tells when a response begins (`response.created`) and is done
(`response.done`), for the shutdown's drain, which lets a response in progress end
(`realtime.responding`).

`socket_usage` picks a session's reader by its path: a WebSocket on `/v1/responses` is the
Responses API's WebSocket mode, whose events are the Responses dialect's (`responses`); one on
`/v1/live/sessions` (a session's `/fork`, a sideband's `/attach`) the Live API's, whose
delegated Responses come wrapped in `response.event` frames (`LiveUsage`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import orjson

from proxy.record import Usage
from proxy.usage import estimate, responses
from proxy.usage.provider_usage import (
    CACHE_AUDIO_READ,
    CACHE_IMAGE_READ,
    CACHE_READ,
    COMPLETION,
    INPUT_AUDIO,
    INPUT_IMAGE,
    OUTPUT_AUDIO,
    PROMPT,
    ProviderUsage,
    UsageFields,
    added,
)
from proxy.usage.reading import MODEL_CHARS

USAGE = UsageFields(
    counts=(("input_tokens", PROMPT), ("output_tokens", COMPLETION)),
    details=(
        ("input_token_details", "cached_tokens", CACHE_READ),
        ("input_token_details", "audio_tokens", INPUT_AUDIO),
        ("input_token_details", "image_tokens", INPUT_IMAGE),
        ("output_token_details", "audio_tokens", OUTPUT_AUDIO),
    ),
    nested=(
        ("input_token_details", "cached_tokens_details", "audio_tokens", CACHE_AUDIO_READ),
        ("input_token_details", "cached_tokens_details", "image_tokens", CACHE_IMAGE_READ),
    ),
)
# A transcription's usage, and the model that transcribed it (None: not known).
OnTranscribed = Callable[[Usage, str | None], None]
_TRANSCRIBED = "conversation.item.input_audio_transcription.completed"
# Events that tell the session's configuration, its transcription model among it (GA, beta).
_SESSION_EVENTS = frozenset(
    {
        "session.created",
        "session.updated",
        "transcription_session.created",
        "transcription_session.updated",
    }
)
# Events whose `delta` is generated text: output text, audio transcripts, tool-call
# arguments (GA names, then the beta's). The audio itself is base64, not read.
_GENERATED = frozenset(
    {
        "response.output_text.delta",
        "response.output_audio_transcript.delta",
        "response.function_call_arguments.delta",
        "response.text.delta",
        "response.audio_transcript.delta",
    }
)


# A Live session's socket (`live/sessions`, a stored one's `live/sessions/{id}/fork`, a
# sideband's `live/sessions/{id}/attach`), and its frame that holds one event of a
# delegated Responses stream.
_LIVE_SESSIONS, _LIVE_RESPONSE = "/live/sessions", "response.event"
_LIVE_SOCKETS = frozenset(("fork", "attach"))


class SessionUsage:
    """The usage of a session's responses and transcriptions: each handed on at once, all summed."""

    __slots__ = (
        "_chars",
        "_model",
        "_on_begun",
        "_on_done",
        "_on_response",
        "_on_transcribed",
        "_total",
        "_transcriber",
    )

    def __init__(
        self,
        on_response: responses.OnResponse,
        on_transcribed: OnTranscribed | None = None,
        on_begun: Callable[[], None] = lambda: None,
        on_done: Callable[[], None] = lambda: None,
    ) -> None:
        self._on_response = on_response
        self._on_transcribed = on_transcribed
        self._on_begun, self._on_done = on_begun, on_done  # response.created, response.done
        self._total: Usage | None = None
        self._chars = 0  # generated since the last response.done: an estimate if none comes
        self._transcriber: str | None = None  # the session's transcription model
        # The model the session runs, as the provider says (a call's sideband names none).
        self._model: str | None = None

    def read(self, frame: bytes) -> None:
        """One provider text frame, already sent on; most cost one or two substring searches.

        A frame that may be metered is parsed, and read as the type it says: an event's name
        may also stand in another's text (instructions, a transcript, a tool's arguments)."""
        if frame.find(b"response.done") < 0:
            if frame.find(b'.delta"') >= 0:
                if frame.find(b'audio.delta"') >= 0:
                    return  # audio: base64, the largest frames, not read
            elif (
                frame.find(b"transcription.completed") < 0
                and frame.find(b'session.updated"') < 0
                and frame.find(b'session.created"') < 0
                and frame.find(b"response.created") < 0
            ):
                return  # nothing metered
        event = _event(frame)
        kind = event.get("type") if event is not None else None
        if event is None or type(kind) is not str:
            return
        if kind == "response.done":
            self._read_done(event)
        elif kind in _GENERATED:
            delta = event.get("delta")
            if isinstance(delta, str):
                self._chars += len(delta)
        elif kind == _TRANSCRIBED:
            self._read_transcribed(event)
        elif kind in _SESSION_EVENTS:
            self._read_session(event)
        elif kind == "response.created":
            self._on_begun()

    def finish(self) -> None:
        """At the session's end: a response cut before its `response.done` is estimated."""
        if self._chars:
            self._add(Usage(0, estimate.tokens(self._chars), estimated=True))

    def _read_done(self, event: dict[str, Any]) -> None:
        self._on_done()
        response = event.get("response")
        usage = response.get("usage") if isinstance(response, dict) else None
        if isinstance(usage, dict):
            reported = ProviderUsage()
            reported.read(usage, USAGE)
            self._add(reported.usage() or Usage())
        else:  # a provider that reports none: what the response generated, estimated
            self.finish()

    def _read_transcribed(self, event: dict[str, Any]) -> None:
        reported = ProviderUsage()
        read_transcription_usage(event.get("usage"), reported)
        usage = reported.usage()
        if usage is None:
            return
        self._total = usage if self._total is None else added(self._total, usage)
        if self._on_transcribed is not None:
            self._on_transcribed(usage, self._transcriber)
        else:
            self._on_response(usage)

    def _read_session(self, event: dict[str, Any]) -> None:
        session = event.get("session")
        if isinstance(session, dict):
            self._transcriber = transcription_model(session)
            model = session.get("model")
            if isinstance(model, str) and model:
                self._model = model[:MODEL_CHARS]

    def _add(self, usage: Usage) -> None:
        self._chars = 0
        self._total = usage if self._total is None else added(self._total, usage)
        self._on_response(usage, answered=self._model)

    @property
    def total(self) -> Usage | None:
        """The session's usage; None when the provider reported none and generated nothing."""
        return self._total

    @property
    def model(self) -> str | None:
        """The model the provider says the session runs (`session.created`); None: unsaid."""
        return self._model


def read_transcription_usage(usage: object, reported: ProviderUsage) -> None:
    """A transcription's `usage` object: tokens (in Realtime's fields), or seconds of audio."""
    if not isinstance(usage, dict):
        return
    if usage.get("type") == "duration":
        reported.read_seconds(usage.get("seconds"))
    else:
        reported.read(usage, USAGE)


def transcription_model(session: dict[str, Any]) -> str | None:
    """The model a session transcribes its input audio with: GA's
    `audio.input.transcription.model`, else the beta's `input_audio_transcription.model`."""
    for path in (
        ("audio", "input", "transcription", "model"),
        ("input_audio_transcription", "model"),
    ):
        value: object = session
        for name in path:
            value = value.get(name) if isinstance(value, dict) else None
        if isinstance(value, str) and value:
            return value
    return None


def _event(frame: bytes) -> dict[str, Any] | None:
    try:
        event = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None


class LiveUsage:
    """A Live API session's usage (`/v1/live/sessions`, a session's `/fork`, a sideband's
    `/attach`): the Responses its delegation runs come as `response.event` frames, each
    holding one event of a Responses stream (`event`), read and charged as the Responses
    API's WebSocket mode's are. Its audio (`session.usage.updated`: seconds, cumulative) is
    not metered."""

    __slots__ = ("_responses",)

    def __init__(self, on_response: responses.OnResponse) -> None:
        self._responses = responses.SocketUsage(on_response)

    def read(self, frame: bytes) -> None:
        """One provider text frame, already sent on: a delegated response's delta or its end."""
        if frame.find(b"response.event") < 0 or (
            frame.find(b'.delta"') < 0 and frame.find(b'"usage"') < 0
        ):
            return  # the session's own events, a response begun: nothing metered
        event = _event(frame)
        nested = event.get("event") if event is not None else None
        if event is not None and event.get("type") == _LIVE_RESPONSE and isinstance(nested, dict):
            self._responses.read_event(nested)

    def finish(self) -> None:
        """At the session's end: a delegated response cut before it finished is estimated."""
        self._responses.finish()

    @property
    def total(self) -> Usage | None:
        return self._responses.total

    @property
    def model(self) -> str | None:
        """The model the provider says ran the first delegated response; None: unsaid."""
        return self._responses.model


class SocketUsage(Protocol):
    """What reads a WebSocket session's usage, frame by frame, for the relay, and the model
    the provider says the session runs (for its log line and metrics when it named none)."""

    def read(self, frame: bytes) -> None: ...
    def finish(self) -> None: ...
    @property
    def total(self) -> Usage | None: ...
    @property
    def model(self) -> str | None: ...


def is_responses_socket(path: str) -> bool:
    """A WebSocket in the Responses API's WebSocket mode: on `…/responses` (a route's tail or
    a whole path), OpenAI's `/v1/responses` and Azure's `/openai/v1/responses` alike."""
    return ("/" + path.strip("/")).endswith("/responses")


def socket_usage(
    path: str,
    on_response: responses.OnResponse,
    on_begun: Callable[[], None] = lambda: None,
    on_error: Callable[[], None] = lambda: None,
    on_transcribed: OnTranscribed | None = None,
    on_done: Callable[[], None] = lambda: None,
) -> SocketUsage:
    """The reader of a session's usage by the API its path names: the Responses API's
    WebSocket mode (`/v1/responses`) speaks Responses events (and tells `on_begun` and
    `on_error`: `responses.SocketUsage`); any other path, Realtime's (its transcriptions
    told to `on_transcribed` with their model, each response's `on_begun` and `on_done`)."""
    if is_responses_socket(path):
        return responses.SocketUsage(on_response, on_begun, on_error)
    if is_live_socket(path):
        return LiveUsage(on_response)
    return SessionUsage(on_response, on_transcribed, on_begun, on_done)


def is_live_socket(path: str) -> bool:
    """A Live API socket (a route's tail, or a whole path): a session's own (`…/live/sessions`),
    a stored one's fork (`…/live/sessions/{id}/fork`), or a server's sideband attached to a
    WebRTC or SIP session (`…/live/sessions/{id}/attach`), which sees its delegated Responses
    as the primary connection does."""
    path = "/" + path.strip("/")
    if _LIVE_SESSIONS not in path:  # most sessions: at once
        return False
    if path.endswith(_LIVE_SESSIONS):
        return True
    head, _, last = path.rpartition("/")
    sessions, _, session_id = head.rpartition("/")
    return last in _LIVE_SOCKETS and bool(session_id) and sessions.endswith(_LIVE_SESSIONS)
