"""How a body reads in the log (LOG_BODIES): what an operator can read of it, redacted.

A body that parses as JSON is logged as its JSON value, text as its text; a multipart form
(an audio transcription, a file upload, an image edit) as its fields, name → value (a name
sent more than once: a list), each file part as a placeholder naming its file, type and
size, never its bytes; any other body that is no UTF-8 text (`application/octet-stream`) as
a placeholder of its type and size. Bytes decoded as text would only be a line of
replacement characters as long as the upload (LiteLLM's spend logs, Helicone and Langfuse
show a file the same way: its name and size).

Everything here runs on the logbook's writer thread, never on the request path; every
string shown goes through the logbook's `redact` (real keys, virtual keys), and strings
under a field named for a credential (`CREDENTIALS`) are `[redacted]` whole. It does not
decide which bodies are kept (relay) nor how they are bounded (logbook).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from multipart import (  # type: ignore[import-untyped]  # multipart ships no type hints
    MultipartError,
    MultipartSegment,
    PushMultipartParser,
    parse_options_header,
)

from proxy.record import REDACTED

Redact = Callable[[str], str]

# Fields whose string values are credentials for a third party, by their lower-case name.
CREDENTIALS = frozenset(
    ("authorization_token", "authorization", "api_key", "api-key", "x-api-key", "x-goog-api-key")
)


def logged_request(body: bytes | None, content_type: str | None, redact: Redact) -> Any:
    """The request body as logged: a form's fields, a placeholder for bytes that are no
    text, else as `logged_text` (JSON bodies exactly as they always were)."""
    if not body:
        return None
    media_type, options = parse_options_header(content_type or "")
    if media_type == "multipart/form-data" and options.get("boundary"):
        form = _form(body, options["boundary"], redact)
        if form is not None:
            return form
    try:
        text = body.decode()
    except UnicodeDecodeError:
        text = body.decode("utf-8", "replace")
        try:  # JSON with a stray byte reads as it always did
            orjson.loads(text)
        except orjson.JSONDecodeError:
            return _placeholder(media_type, len(body), redact)
    return logged_text(text, redact)


def logged_text(body: str | None, redact: Redact) -> Any:
    """A body for the log, redacted: its JSON value if it parses (credentials for third
    parties redacted), else its text; None for JSON nested too deeply to write again."""
    if not body:
        return None
    text = redact(body)
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return text
    if not isinstance(value, dict | list | str):
        return value
    # JSON may spell a key with escapes ("\u0073k-..."): redact its canonical form too.
    try:  # written inside a list, as deep as it sits in the line
        canonical = redact(orjson.dumps([value])[1:-1].decode())
    except orjson.JSONEncodeError:
        # Nested deeper than orjson writes (it reads deeper): the line goes without it, as
        # without a body over the queue's bound, its credentials for third parties unread.
        return None
    try:
        return _without_credentials(orjson.loads(canonical))
    except orjson.JSONDecodeError:
        return canonical  # a key that matched JSON syntax itself: the text, redacted


def _form(body: bytes, boundary: str, redact: Redact) -> dict[str, Any] | None:
    """A multipart form's fields: text as text, a file part (or a part of bytes that are no
    text) as a placeholder; None for a body that does not parse as one."""
    fields: dict[str, Any] = {}
    segment: MultipartSegment | None = None
    content, size = bytearray(), 0
    try:
        with PushMultipartParser(boundary) as parser:
            for events in (parser.parse(body), parser.parse(b"")):
                for event in events:
                    if isinstance(event, MultipartSegment):
                        segment, content, size = event, bytearray(), 0
                    elif event:
                        size += len(event)
                        if segment is not None and segment.filename is None:
                            content += event  # a file's bytes are only counted
                    elif segment is not None:  # the part's end
                        _add(
                            fields,
                            redact(segment.name or ""),
                            _part(segment, content, size, redact),
                        )
    except MultipartError:
        return None
    return fields


def _part(segment: MultipartSegment, content: bytearray, size: int, redact: Redact) -> Any:
    if segment.filename is None:
        try:
            return redact(content.decode())
        except UnicodeDecodeError:
            pass
    kind = None if segment.content_type is None else redact(segment.content_type)
    filename = None if segment.filename is None else redact(segment.filename)
    return {"filename": filename, "content_type": kind, "bytes": size}


def _add(fields: dict[str, Any], name: str, value: Any) -> None:
    """A field's value under its name; a name sent again (`timestamp_granularities[]`,
    `image[]`) holds the list of its values."""
    if isinstance(value, str) and name.lower() in CREDENTIALS:
        value = REDACTED
    if name not in fields:
        fields[name] = value
    elif isinstance(held := fields[name], list):  # a part's value is never a list itself
        held.append(value)
    else:
        fields[name] = [held, value]


def _placeholder(media_type: str, size: int, redact: Redact) -> dict[str, Any]:
    return {"content_type": redact(media_type) if media_type else None, "bytes": size}


def _without_credentials(value: Any) -> Any:
    """`value` (parsed JSON) with each string under a `CREDENTIALS` field redacted, in place."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for name, inner in item.items():
                if isinstance(inner, str):
                    if name.lower() in CREDENTIALS:
                        item[name] = REDACTED
                elif isinstance(inner, dict | list):
                    stack.append(inner)
        elif isinstance(item, list):
            stack.extend(inner for inner in item if isinstance(inner, dict | list))
    return value
