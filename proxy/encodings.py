"""Content codings (RFC 9110 §8.4): the one place a gzip, deflate, br or zstd body is decoded.

The gateway forwards bodies as sent, in both directions; it decodes only to read them: the
request's `model` (`peek`) and the response's usage (`usage`). `Decoder` undoes a response's
Content-Encoding piece by piece as chunks arrive, handing the decoded bytes to a sink in
pieces of at most `STEP` bytes, so a small bomb never allocates much at once and the sink
can stop it (by raising). `decode_body` decodes a whole request body, bounded.

Codings are read with the well-kept libraries: zlib (gzip, deflate: zlib-wrapped or raw, as
some servers send it), brotli and zstandard. A stacked Content-Encoding ("gzip, br") is
undone in reverse order (RFC 9110 §8.4). A gzip body of several members is decoded member
after member; bytes after a deflate stream, or after a gzip member that are not another
member, make the body corrupt (a request: 400), so no part of a body goes on unread. What
is not done: `compress` (no provider sends it), a zstd window over 8 MiB (RFC 9659 §3 lets
a decoder refuse it), telling a cut zstd body from a whole one.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import brotli  # type: ignore[import-untyped]  # brotli ships no type hints
import zstandard
from multidict import MultiMapping

from proxy.errors import GatewayError

STEP = 256 * 1024
ZSTD_WINDOW_BYTES = 8 * 1024 * 1024
CODINGS = ("gzip", "deflate", "br", "zstd")
_ALIASES = {"x-gzip": "gzip"}
GZIP_WBITS = 16 + zlib.MAX_WBITS
GZIP_MAGIC = b"\x1f\x8b"

Sink = Callable[[bytes], None]


class UnsupportedEncoding(ValueError):
    """A Content-Encoding the gateway cannot decode."""


class CorruptBody(ValueError):
    """Bytes that are not what their Content-Encoding says."""


def content_coding(headers: MultiMapping[str]) -> str | None:
    """A message's Content-Encoding, every line of it as one list (RFC 9110 §5.3: two lines
    mean what one line joined by a comma means, and clients decode them so); None: none."""
    lines = headers.getall("content-encoding", ())
    if not lines:
        return None
    return lines[0] if len(lines) == 1 else ", ".join(lines)


def codings(content_encoding: str | None) -> list[str]:
    """The codings named, in the order they were applied; [] for identity."""
    names = [_ALIASES.get(name, name) for name in _names(content_encoding)]
    unknown = [name for name in names if name not in CODINGS]
    if unknown:
        raise UnsupportedEncoding(unknown[0][:40])
    return names


def _names(content_encoding: str | None) -> list[str]:
    if not content_encoding:  # most bodies: nothing to split
        return []
    parts = (part.strip().lower() for part in (content_encoding or "").split(","))
    return [part for part in parts if part and part != "identity"]


class Decoder:
    """Undoes a body's codings as its chunks arrive. Raises UnsupportedEncoding at creation."""

    __slots__ = ("_stages",)

    def __init__(self, content_encoding: str | None, sink: Sink) -> None:
        # Built from the sink outwards: the first coding applied is the last undone.
        stages: list[_Stage] = []
        for name in codings(content_encoding):
            stages.append(_STAGES[name](sink))
            sink = stages[-1].feed
        self._stages = stages

    @property
    def is_identity(self) -> bool:
        return not self._stages

    def feed(self, data: bytes) -> None:
        """Decode the next chunk into the sink. Raises CorruptBody, or what the sink raises."""
        if self._stages:
            self._stages[-1].feed(data)

    @property
    def is_complete(self) -> bool:
        """False when a coding knows the body was cut short (zstd cannot tell)."""
        return all(stage.is_complete for stage in self._stages)


class _Stage:
    """One coding's decoder, handing its output to the next stage or the sink."""

    __slots__ = ("_sink",)

    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    def feed(self, data: bytes) -> None:
        raise NotImplementedError

    @property
    def is_complete(self) -> bool:
        raise NotImplementedError


class _Zlib(_Stage):
    __slots__ = ("_decoder", "_is_gzip", "_undecided")

    def __init__(self, sink: Sink, wbits: int | None) -> None:
        super().__init__(sink)
        self._is_gzip = wbits == GZIP_WBITS  # several members may follow one another
        self._undecided = b""  # deflate: the first bytes, until zlib-wrapped or raw is known
        self._decoder = None if wbits is None else zlib.decompressobj(wbits)

    def feed(self, data: bytes) -> None:
        if self._decoder is None:
            data = self._undecided + data
            if len(data) < 2:
                self._undecided = data
                return
            self._undecided = b""
            # RFC 9110 §8.4.1.2 says zlib-wrapped, but some servers send raw deflate.
            self._decoder = zlib.decompressobj(
                zlib.MAX_WBITS if _zlib_header(data) else -zlib.MAX_WBITS
            )
        pending = data
        try:
            while pending:
                decoder = self._decoder
                out = decoder.decompress(pending, STEP)
                if out:
                    self._sink(out)
                pending = decoder.unconsumed_tail
                if decoder.eof and decoder.unused_data:
                    pending = self._next_member(decoder.unused_data)
        except zlib.error as error:
            raise CorruptBody(str(error)) from None

    def _next_member(self, rest: bytes) -> bytes:
        """Bytes after the end of a stream: a next gzip member (RFC 1952 §2.2), else corrupt.

        What follows is decoded too, so nothing is forwarded that was not read: a body is
        checked whole or refused.
        """
        if not self._is_gzip:
            raise CorruptBody("bytes after the end of the deflate stream")
        if len(rest) >= 2 and rest[:2] != GZIP_MAGIC:
            raise CorruptBody("bytes after the end of a gzip member that are not another")
        self._decoder = zlib.decompressobj(GZIP_WBITS)
        return rest

    @property
    def is_complete(self) -> bool:
        return self._decoder is not None and self._decoder.eof


class _Gzip(_Zlib):
    __slots__ = ()

    def __init__(self, sink: Sink) -> None:
        super().__init__(sink, GZIP_WBITS)


class _Deflate(_Zlib):
    __slots__ = ()

    def __init__(self, sink: Sink) -> None:
        super().__init__(sink, None)


class _Brotli(_Stage):
    __slots__ = ("_decoder",)

    def __init__(self, sink: Sink) -> None:
        super().__init__(sink)
        self._decoder = brotli.Decompressor()

    def feed(self, data: bytes) -> None:
        decoder = self._decoder
        try:
            out = decoder.process(data, output_buffer_limit=STEP)
            # can_accept_more_data() says only that no input is left over: a decoder that
            # filled its step may still hold output with all of the input taken. Drained
            # until a call hands out nothing (a body that inflates a lot was read only in
            # part before: its end, where the usage is, never).
            while out or not decoder.can_accept_more_data():
                if not out:  # input left over, and no output: brotli is stuck
                    raise CorruptBody("the brotli decoder makes no progress")
                self._sink(out)
                out = decoder.process(b"", output_buffer_limit=STEP)
        except brotli.error as error:
            raise CorruptBody(str(error)) from None

    @property
    def is_complete(self) -> bool:
        return bool(self._decoder.is_finished())  # brotli is untyped: make the bool sure


class _Zstd(_Stage):
    """zstandard's stream writer hands its output to `write` in pieces of at most STEP."""

    __slots__ = ("_writer",)

    def __init__(self, sink: Sink) -> None:
        super().__init__(sink)
        decompressor = zstandard.ZstdDecompressor(max_window_size=ZSTD_WINDOW_BYTES)
        # The writer only ever calls `write`; zstandard's hints ask for a whole IO[bytes].
        self._writer = decompressor.stream_writer(self, write_size=STEP, closefd=False)  # type: ignore[arg-type]

    def write(self, data: bytes) -> int:
        self._sink(data)
        return len(data)

    def feed(self, data: bytes) -> None:
        try:
            self._writer.write(data)
        except zstandard.ZstdError as error:
            raise CorruptBody(str(error)) from None

    @property
    def is_complete(self) -> bool:
        # The stream writer does not say where a frame ended; a zstd body cut short is
        # caught by what reads it next (a JSON body that does not parse).
        return True


def _zlib_header(data: bytes) -> bool:
    # RFC 1950 §2.2: method 8 in the low nibble, and CMF*256+FLG a multiple of 31.
    return data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0


_STAGES: dict[str, Callable[[Sink], _Stage]] = {
    "gzip": _Gzip,
    "deflate": _Deflate,
    "br": _Brotli,
    "zstd": _Zstd,
}


def decode_body(body: bytes, content_encoding: str, limit: int) -> bytes:
    """A whole request body decoded, for reading only: what goes upstream stays as sent.

    Raises 400 (not what its Content-Encoding says, or cut short), 413 (decodes past
    `limit`), 415 (a coding the gateway cannot decode).
    """
    if not body or not content_encoding:  # most bodies: nothing to decode
        return body
    # Quoted in the error, which is JSON: bytes that are not UTF-8 (lone surrogates, as aiohttp
    # hands them over) as \xNN escapes, not the surrogates JSON cannot hold.
    named = content_encoding.strip().lower()[:40]
    if not named.isascii():
        named = named.encode("utf-8", "surrogateescape").decode("ascii", "backslashreplace")
    decoded = bytearray()

    def keep(piece: bytes) -> None:
        decoded.extend(piece)
        if len(decoded) > limit:
            raise _TooLarge

    try:
        decoder = Decoder(content_encoding, keep)
        if decoder.is_identity:
            return body
        decoder.feed(body)
    except UnsupportedEncoding:
        raise GatewayError(
            415,
            "unsupported_encoding",
            f"Content-Encoding '{named}' is not supported; send gzip, deflate, br, zstd or none.",
        ) from None
    except CorruptBody:
        raise GatewayError(400, "invalid_body", f"The request body is not valid {named}.") from None
    except _TooLarge:
        raise GatewayError(
            413,
            "request_too_large",
            f"The request body is larger than the gateway's limit of {limit} bytes.",
        ) from None
    if not decoder.is_complete:
        raise GatewayError(400, "invalid_body", f"The request body is truncated {named}.")
    return bytes(decoded)


class _TooLarge(Exception):
    """The decoded body passed its limit (raised by the sink to stop the decoder)."""
