"""A provider's header values (and reason phrase) that are not UTF-8, written to the client
as they came.

A field value may hold any byte but controls (obs-text, RFC 9110 §5.5): a Latin-1 file name,
a server's own bytes. The upstream clients hold such a byte as a lone surrogate
(`surrogateescape`: the wire, aiohttp's client for a WebSocket handshake), as aiohttp's
server holds a request's. That server writes every head as UTF-8, and its C writer drops a
lone surrogate (its pure-Python one raises): `caf\\xe9` reached the client as `caf`, or, read
as Latin-1 before, as `caf\\xc3\\xa9`. An answer marked `RAW_HEAD` has its head written with
each such byte back in its place; every other head is aiohttp's own, at no added cost.

The head still goes out when aiohttp sends it (held for the first chunk, or at once): only
its bytes are made here, in place of the C writer's, in the request's `StreamWriter`
(`_headers_buf`, aiohttp 3.14's buffer of a head not yet sent, pinned in requirements.txt;
tests/app/test_head_bytes.py fails if a new aiohttp stops reading it).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import cast

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_writer import StreamWriter
from multidict import CIMultiDict

# The answer's head holds header values of bytes that are not UTF-8 (lone surrogates).
RAW_HEAD = web.ResponseKey("raw_head", bool)

# What no field may hold, as aiohttp's writer refuses it (RFC 9110 §5.5, RFC 9112 §4):
# a header that splits the head in two.
_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def has_raw_bytes(values: Iterable[str]) -> bool:
    """Whether one of `values` holds a byte that is not UTF-8 (a lone surrogate)."""
    for value in values:
        if not value.isascii():  # O(1) in CPython: the str knows it
            try:
                value.encode()
            except UnicodeEncodeError:
                return True
    return False


def keep_raw(response: web.StreamResponse, writer: AbstractStreamWriter) -> None:
    """At prepare (relay.dispatch), of an answer that holds state, before its head is
    written: one marked `RAW_HEAD` has `writer` write its head byte for byte."""
    if response.get(RAW_HEAD):
        own = cast(StreamWriter, writer)  # the server's, for every request
        own.write_headers = functools.partial(_write_raw_head, own)  # type: ignore[method-assign]


async def _write_raw_head(
    writer: StreamWriter, status_line: str, headers: CIMultiDict[str]
) -> None:
    """`StreamWriter.write_headers`, each lone surrogate written as the byte it holds."""
    lines = [status_line]
    for name, value in headers.items():
        if _FORBIDDEN.search(name) or _FORBIDDEN.search(value):
            raise ValueError("Forbidden control character in a header")  # as aiohttp's
        lines.append(f"{name}: {value}")
    lines.append("\r\n")
    writer._headers_buf = "\r\n".join(lines).encode("utf-8", "surrogateescape")
    writer._headers_written = False
