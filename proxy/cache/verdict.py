"""Whether a finished answer may be stored: a whole 200 of JSON, or a stream that ended well.

Peers' caches stored what they should not have: a stream cut short, one that carried the
provider's error event under a 200, a keepalive-only stream. Here an answer is kept only
when it is a 200 the gateway relayed to its end (`Outcome.ANSWERED`), no larger than
CACHE_MAX_ENTRY_BYTES, of a JSON or event-stream type (no multipart, no binary); and an
event stream only when it names its normal end (`data: [DONE]`, Anthropic's
`message_stop`, the Responses API's `response.completed` or `response.incomplete`) and no
error event (`event: error`, a `data:` line holding an error object, `response.failed`).
A compressed stream is decoded to be read, bounded by the entry's size limit.
"""

from __future__ import annotations

from collections.abc import Sequence

from proxy.encodings import decode_body
from proxy.errors import GatewayError
from proxy.record import Outcome, Record

_STORABLE_TYPES = ("application/json", "text/event-stream")
_ENDS = (b"data: [DONE]", b"message_stop", b"response.completed", b"response.incomplete")
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
    if record.status != 200 or record.outcome is not Outcome.ANSWERED:
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
    return any(end in body for end in _ENDS) and not any(error in body for error in _ERRORS)
