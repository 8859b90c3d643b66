"""OpenAI's audio endpoints: what speech, transcriptions and translations are charged by.

None of them answers in tokens alone. Speech (`POST /audio/speech`) answers audio bytes: it
is counted by the characters of its request's `input` (what `tts-1` is priced by), unless
its stream (`stream_format: "sse"`) ends with `speech.audio.done`, whose usage is tokens.
A transcription (or translation) reports a `usage` of one of two types: `tokens`
(`input_tokens` with `input_token_details` {audio_tokens, text_tokens}, `output_tokens`: the
gpt-4o transcribe models, as Realtime reports them) or `duration` (`seconds` of audio:
whisper-1); a `verbose_json` answer without usage has the audio's `duration`. A streamed
transcription's usage comes with `transcript.text.done`. What is not read: the audio itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import orjson

from proxy.record import Usage
from proxy.usage import realtime_events, responses
from proxy.usage.reading import Reading


def speech_usage(request_body: bytes) -> Usage:
    """What a speech request is counted by: the characters of its `input` (0 when the body
    cannot be read: not JSON, or compressed)."""
    try:
        document = orjson.loads(request_body) if request_body else None
    except orjson.JSONDecodeError:
        document = None
    text = document.get("input") if isinstance(document, dict) else None
    return Usage(input_characters=len(text) if isinstance(text, str) else 0)


def read_transcription(document: dict[str, Any], reading: Reading) -> None:
    """A transcription's or translation's JSON answer: its usage, tokens or seconds."""
    reading.add_text(document.get("text"))
    read_usage(document.get("usage"), reading)
    if "usage" not in document:  # verbose_json without usage: the audio's length
        reading.reported.read_seconds(document.get("duration"))


def read_usage(usage: object, reading: Reading) -> None:
    """A transcription's `usage` object: tokens, or seconds of audio."""
    realtime_events.read_transcription_usage(usage, reading.reported)


def _text_delta(event: dict[str, Any], reading: Reading) -> None:
    reading.add_text(event.get("delta"))


def _transcript_done(event: dict[str, Any], reading: Reading) -> None:
    """The transcription's last event, with its usage."""
    read_usage(event.get("usage"), reading)
    reading.is_ended = True


def _speech_done(event: dict[str, Any], reading: Reading) -> None:
    """The speech's last event, with its usage."""
    reading.reported.read(event.get("usage"), responses.USAGE)
    reading.is_ended = True


EVENTS: Mapping[str, Callable[[dict[str, Any], Reading], None]] = {
    "transcript.text.delta": _text_delta,
    "transcript.text.done": _transcript_done,
    "speech.audio.done": _speech_done,
}
