"""A stream's first event: is it a provider's error that another key or target may not have?

Providers answer some failures with a 200 and an event stream whose first event is the
error: Anthropic's `event: error` (`overloaded_error`, `rate_limit_error`, `api_error`),
OpenAI's and OpenAI-compatible servers' `data: {"error": {...}}`, OpenRouter's chunk with a
top-level `error` whose `code` is the status it stands for (after `: OPENROUTER PROCESSING`
comments), the Responses API's `error` event and `response.failed` (its error inside the
failed Response), llama.cpp's server's `error: {"code", ...}` line
(a field of its own, not `data:`, in its older builds), and Bedrock's exception frame in its
AWS event stream (`throttlingException`...), and OpenRouter's 200 JSON answer whose `error`
names the status (a provider that failed after its 200, not streamed). The attempt loop (failover.py) asks this
module, for the bytes at hand before any went to the client, what that first event is.

The first event that says something, that is: a stream's start says nothing of the answer
yet, and the provider's error often follows it (Anthropic's `message_start` and `ping`, then
`overloaded_error`; OpenAI's chunk naming only the role, after Azure's prompt filter results;
the Responses API's `response.created` and `response.in_progress`, named by their `event:`
line or, from servers that send none, by their data's `type`). Such a start is read past.

Only a failure of the moment counts (overloaded, rate limited, a server error, timed out):
as the status it stands for (529, 429, 500, 503, 504...). An invalid request, a refused key,
a permission or a content policy fails the same everywhere: it is no failure here, and the
stream goes on as it came. Content is told by a bytes search (`b"error"` absent), and
parsed only when it names a role or prompt filter results (a start's chunk, maybe).
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
from collections.abc import Callable, Iterator
from typing import Final, Literal

from proxy.encodings import CorruptBody, Decoder, UnsupportedEncoding, codings

# Error kinds (`type`, else `code`, else Google's `status`) that say the provider could not
# serve now, as the HTTP status each stands for.
PASSING: Final = {
    "overloaded_error": 529,  # Anthropic
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "server_error": 500,  # OpenAI, OpenRouter
    "rate_limit_exceeded": 429,
    # A key whose quota is spent: OpenAI answers 429, or streams it on the Responses API
    # after `response.created`; another key or target may have some left.
    "insufficient_quota": 429,
    "requests": 429,  # OpenAI's rate limits: their type
    "tokens": 429,
    "service_unavailable": 503,
    "internal_error": 500,
    "UNAVAILABLE": 503,  # Google's status names
    "RESOURCE_EXHAUSTED": 429,
    "INTERNAL": 500,
    "DEADLINE_EXCEEDED": 504,
}
# Bedrock's exceptions (an AWS event stream's `:exception-type`) that say it could not serve
# now, as the HTTP status each stands for (AWS's own, but a model stream's error: "retry").
FRAMED_PASSING: Final = {
    "throttlingException": 429,
    "modelNotReadyException": 429,
    "serviceUnavailableException": 503,
    "internalServerException": 500,
    "modelStreamErrorException": 500,
    "modelTimeoutException": 408,
}
EVENT_STREAM: Final = "application/vnd.amazon.eventstream"
# Numeric codes (OpenRouter's: the HTTP status the error stands for) that are such failures.
PASSING_CODES: Final = frozenset((408, 429, 500, 502, 503, 504, 529))


class Undecided(enum.Enum):
    """The first event has not all come."""

    MORE = "more"


MORE: Final = Undecided.MORE


# Named events that start a stream and say nothing of the answer (Anthropic's, the Responses
# API's): an error may follow them.
STARTING: Final = frozenset(
    (b"message_start", b"ping", b"response.created", b"response.in_progress", b"response.queued")
)
# The same, as the `type` inside an event sent without its `event:` line (some servers of the
# Responses API's events send only their data).
STARTING_TYPES: Final = frozenset(name.decode() for name in STARTING)


Reader = Callable[[bytes], "tuple[str, int] | Literal[Undecided.MORE] | None"]


def reader(content_type: str) -> Reader | None:
    """What reads a 200 answer of this content type for an error of the moment: `failure`
    for an event stream (SSE), `framed_failure` for an AWS event stream (Bedrock's),
    `answered_failure` for JSON; None: nothing else is read."""
    if content_type.startswith("text/event-stream"):
        return failure
    if content_type.startswith("application/json"):
        return answered_failure
    if content_type.startswith(EVENT_STREAM):
        return framed_failure
    return None


def decoded(read: Reader, content_encoding: str, limit: int) -> Reader | None:
    """`read` over an answer in a content coding (gzip, deflate, br, zstd: the Anthropic SDK
    asks for them, and Anthropic compresses its streams so), given the bytes at hand decoded
    from their start, at most `limit` of them (a small bomb is not inflated whole); past
    those, an event still to come is not waited for (None). None: a coding not decoded."""
    try:
        if not codings(content_encoding):  # identity
            return read
    except UnsupportedEncoding:
        return None

    def read_decoded(at_hand: bytes) -> tuple[str, int] | Literal[Undecided.MORE] | None:
        pieces: list[bytes] = []
        room = limit

        def keep(piece: bytes) -> None:
            nonlocal room
            pieces.append(piece[:room])
            room -= len(piece)
            if room <= 0:
                raise _Enough

        try:
            Decoder(content_encoding, keep).feed(at_hand)
        except CorruptBody:
            return None
        except _Enough:
            found = read(b"".join(pieces))
            return None if found is MORE else found
        return read(b"".join(pieces))

    return read_decoded


class _Enough(Exception):
    """The decoded start is as long as is read for a first event."""


def target_failure(kind: str) -> int | None:
    """The status an error kind the provider sent inside its 200 answer stands for
    (`reading.note_error`'s: a type, a code, Google's status, Bedrock's exception, OpenRouter's
    numeric code) when it says the target failed of the moment: overloaded 529, a server
    error 500, unavailable 503. None for anything else, and for a rate limit (about the key,
    as a 429 is)."""
    status = PASSING.get(kind) or FRAMED_PASSING.get(kind)
    if status is None and kind.isdigit() and len(kind) == 3 and int(kind) in PASSING_CODES:
        status = int(kind)
    return None if status == 429 else status


def answered_failure(at_hand: bytes) -> tuple[str, int] | Literal[Undecided.MORE] | None:
    """A 200 JSON answer that is an error of the moment: OpenRouter's, whose provider failed
    after its 200 went (a top-level `error` whose `code` is the status it stands for, after
    whitespace it sent to keep the connection); MORE while it may not all have come (the
    caller stops waiting at its end); None: anything else (a Response whose error names a
    kind, not a status, is the answer: it may be one fetched)."""
    if b'"error"' not in at_hand:  # most answers: not parsed
        return MORE
    try:
        answer = json.loads(at_hand)
    except ValueError:  # not all come, or not JSON
        return MORE
    except RecursionError:  # nested deeper than the parser goes: not an error of ours
        return None
    error = answer.get("error") if isinstance(answer, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return (f"error {code}", code) if type(code) is int and code in PASSING_CODES else None


def failure(at_hand: bytes) -> tuple[str, int] | Literal[Undecided.MORE] | None:
    """What the stream's first event past its start is, from the bytes at hand: (its error
    kind, the status it stands for) when a failure of the moment; None when anything else
    (content, an error that fails everywhere); MORE while that event has not all come."""
    if b"data" not in at_hand and b"error:" not in at_hand:  # nothing yet, or comments
        return MORE
    for name, data in events(at_hand):
        if name in STARTING or (not name and _is_start_chunk(data)):
            continue
        if name != b"error" and b"error" not in data:  # the common stream: content
            return None
        try:
            parsed = json.loads(data)
        except (ValueError, RecursionError):  # not JSON (a UnicodeDecodeError is one too)
            return None
        return _passing(parsed, name == b"error") if isinstance(parsed, dict) else None
    return MORE


def framed_failure(at_hand: bytes) -> tuple[str, int] | Literal[Undecided.MORE] | None:
    """As `failure`, for Bedrock's AWS event-stream frames: its start (an invoke stream's
    `message_start` or `ping` chunk, Converse's `messageStart`) read past, then an exception
    frame of the moment (FRAMED_PASSING) is its type and status; anything else None."""
    from botocore.eventstream import (  # type: ignore[import-untyped]  # Bedrock's only
        EventStreamBuffer,
        ParserError,
    )

    frames = EventStreamBuffer()
    frames.add_data(at_hand)
    try:
        for message in frames:
            headers = message.headers
            kind = headers.get(":message-type")
            if kind == "event" and _is_framed_start(headers.get(":event-type"), message.payload):
                continue
            name = headers.get(":exception-type")
            if kind != "exception" or name not in FRAMED_PASSING:
                return None
            return name, FRAMED_PASSING[name]
    except ParserError:  # a bad length or CRC: not read here (the relay finds it so)
        return None
    return MORE


def _is_framed_start(event_type: object, payload: bytes) -> bool:
    """A Bedrock frame that says nothing yet: Converse's messageStart (the role), or an
    invoke stream's chunk whose model event is a start (Claude's `message_start`, `ping`)."""
    if event_type == "messageStart":
        return True
    if event_type != "chunk":
        return False
    try:
        event = json.loads(base64.b64decode(json.loads(payload)["bytes"], validate=True))
    except (ValueError, KeyError, TypeError, binascii.Error, RecursionError):
        return False
    return isinstance(event, dict) and event.get("type") in STARTING_TYPES


def events(at_hand: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Each whole event's name and data (its data lines joined), in order; comments and
    empty events skipped, the last one left while its blank line has not come. llama.cpp's
    `error:` line is an `error` event of that data."""
    text = at_hand.removeprefix(b"\xef\xbb\xbf").replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    blocks = text.split(b"\n\n")
    for block in blocks[:-1]:  # the last one is not yet ended
        name, data = b"", []
        for line in block.split(b"\n"):
            field, _, value = line.partition(b":")
            value = value.removeprefix(b" ")
            if field == b"event":
                name = value
            elif field == b"data":
                data.append(value)
            elif field == b"error":  # llama.cpp's server: a failure, a field of its own
                name = b"error"
                data.append(value)
        if data:
            yield name, b"\n".join(data)


def _is_start_chunk(data: bytes) -> bool:
    """An event without a name that says nothing yet: an OpenAI chunk whose choices' deltas
    name only the role (or empty text), no finish, or no choices beside Azure's prompt filter
    results; or a start named by its `type` (STARTING_TYPES)."""
    if b'"role"' not in data and b'"prompt_filter_results"' not in data and b'"type"' not in data:
        return False  # most chunks: not parsed
    try:
        chunk = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: nested past the parser's depth
        return False
    if isinstance(chunk, dict) and chunk.get("type") in STARTING_TYPES:
        return True
    choices = chunk.get("choices") if isinstance(chunk, dict) else None
    if not isinstance(choices, list) or "error" in chunk:
        return False
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict) or choice.get("finish_reason") is not None:
            return False
        if any(value for name, value in delta.items() if name != "role"):
            return False
    return True


def _passing(event: dict[str, object], is_error_event: bool) -> tuple[str, int] | None:
    """An error event's kind and status when a failure of the moment, else None."""
    error = event.get("error")
    if event.get("type") == "response.failed":  # the Responses API's: in the failed Response
        response = event.get("response")
        error = response.get("error") if isinstance(response, dict) else None
    if not isinstance(error, dict):
        if is_error_event or event.get("type") == "error":  # the Responses API's error event
            error = event
        else:
            return None
    code = error.get("code")
    if type(code) is int:
        return (f"error {code}", code) if code in PASSING_CODES else None
    for name in ("type", "code", "status"):
        kind = error.get(name)
        if isinstance(kind, str) and kind in PASSING:
            return kind, PASSING[kind]
    return None
