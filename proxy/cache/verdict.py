"""Whether a finished answer may be stored: a whole 200 of JSON, or a stream that ended well.

Peers' caches stored what they should not have: a stream cut short, one that carried the
provider's error event under a 200, a keepalive-only stream. Here an answer is kept only
when it is a 200 the gateway relayed to its end (`Outcome.ANSWERED`), no larger than
CACHE_MAX_ENTRY_BYTES, of a JSON or event-stream type (no multipart, no binary); and an
event stream only when its last event is its normal end (`data: [DONE]`, Anthropic's
`message_stop`, the Responses API's `response.completed` or `response.incomplete`, read
from its `event:` line or its data's leading `type`: the same words in the text of a stream
cut short are no end) and it has no error event (`event: error`, a `data:` line holding an
error object, `response.failed`). Nor is a 200 whose JSON is an error (as some
OpenAI-compatible servers answer one): the usage tap noted it on the record.
A compressed stream is decoded to be read, bounded by the entry's size limit.
"""

from __future__ import annotations

from collections.abc import Sequence

from proxy.encodings import decode_body
from proxy.errors import GatewayError
from proxy.record import Outcome, Record

_STORABLE_TYPES = ("application/json", "text/event-stream")
_END_EVENTS = (b"message_stop", b"response.completed", b"response.incomplete")
_END_DATA = (b"[DONE]",) + tuple(
    b'{"type":' + space + b'"' + event + b'"' for event in _END_EVENTS for space in (b"", b" ")
)
_ERRORS = (
    b"event: error",
    b'data: {"error"',
    b'data: {"type":"error"',
    b'data: {"type": "error"',
    b"response.failed",
)


def is_storable(
    record: Record, content_type: str, content_encoding: str, chunks: Sequence[bytes], limit: int
) -> bool:
    if record.status != 200 or record.outcome is not Outcome.ANSWERED or record.error:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    if not (media in _STORABLE_TYPES or media.endswith("+json")):
        return False
    if media != "text/event-stream":
        return True
    try:
        body = decode_body(b"".join(chunks), content_encoding or "identity", limit)
    except GatewayError:  # a coding not read, or not what it says: not kept
        return False
    return _ends_well(body) and not any(error in body for error in _ERRORS)


def _ends_well(body: bytes) -> bool:
    """Whether the stream's last event is an end: its first line `event: <end>`, or
    `data: [DONE]`, or `data: {"type":"<end>"...`."""
    body = body.rstrip(b"\r\n")
    start = 0
    for blank in (b"\n\n", b"\n\r\n", b"\r\r"):  # the blank line before the last event
        found = body.rfind(blank)
        if found >= 0:
            start = max(start, found + len(blank))
    line = body[start:].splitlines()[0] if start < len(body) else b""  # CRLF, LF or CR
    field, _, value = line.partition(b":")
    value = value.removeprefix(b" ")
    if field == b"event":
        return value in _END_EVENTS
    return field == b"data" and value.startswith(_END_DATA)
