"""A stored answer: the provider's status, headers and body chunks as the client first got them.

Chunks are kept as they were written to the first client, so a stream is replayed as the
same events in the same order, cut where they were cut. The usage the answer reported (or
its estimate) and the model that answered travel with it, so a hit's log line can say what
the answer would have cost without reading the body again; and when it was stored, so a key
reads no answer older than its own ttl (a reload may have shortened it).

`encode` and `decode` give the form kept in Redis: a version byte, the length of a JSON
head (status, reason, headers, usage, model, provider, cost, the chunk sizes), the head, then the chunks'
bytes back to back: no base64, no copy of the body beyond the one join. A head with header
(or reason phrase) bytes that are not UTF-8 (`raw`) holds its values and its reason as their
bytes read as Latin-1.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import orjson

from proxy.record import Usage

_VERSION = b"\x01"
# What one entry costs beyond its bytes in this process (the object, its tuples, its name,
# its usage, the dict slot and LRU link), and each header beyond its characters (its value's
# str object and the pair; names are interned, one str for every entry), as tracemalloc
# sees entries made from answers through the gateway; counted against CACHE_MAX_BYTES, a
# little above (a chat answer of 12 headers: 2,674 bytes measured, 2,762 counted; a stream
# of 6 chunks: 3,808 and 3,898). 400 and 60, measured on entries whose names were shared
# literals (bench/cache.py), let a cache of chat answers hold 2.6 times CACHE_MAX_BYTES.
ENTRY_OVERHEAD_BYTES = 700
HEADER_OVERHEAD_BYTES = 110
# Each chunk is a bytes object: its header (33 bytes) and the tuple's pointer.
CHUNK_OVERHEAD_BYTES = 41


class CorruptEntry(ValueError):
    """Stored bytes that are not an entry (another version, a foreign value): a miss."""


@dataclass(frozen=True, slots=True)
class Entry:
    status: int
    reason: str | None  # the status line's, when not the status's own
    headers: tuple[tuple[str, str], ...]  # the provider's, less hop-by-hop and any secret
    chunks: tuple[bytes, ...]
    usage: Usage | None = None
    model: str | None = None  # the model the answer names
    stored_at: float | None = None  # by the cache's clock (None: stored before it was kept)
    # A header's value or the reason holds bytes that are not UTF-8, as lone surrogates
    # (relay/head_bytes.py)
    has_raw_bytes: bool = False
    # The provider that gave the answer (a route's, a fallback's; None: stored before it was
    # kept) and what the answer cost then (None: unpriced): a hit is logged, counted and
    # priced as its answer, not as the key's first provider at the default tier's rates.
    provider: str | None = None
    cost_usd: float | None = None

    @property
    def body_bytes(self) -> int:
        return sum(map(len, self.chunks))

    @property
    def size(self) -> int:
        """The bytes it holds in memory, about: what CACHE_MAX_BYTES counts."""
        headers = sum(
            len(name) + len(value) + HEADER_OVERHEAD_BYTES for name, value in self.headers
        )
        return (
            ENTRY_OVERHEAD_BYTES
            + headers
            + self.body_bytes
            + CHUNK_OVERHEAD_BYTES * len(self.chunks)
        )

    @property
    def is_whole(self) -> bool:
        """An answer of known length: replayed in one write, as it was sent."""
        return any(name.lower() == "content-length" for name, _ in self.headers)


def encode(entry: Entry) -> bytes:
    fields = {
        "status": entry.status,
        "reason": entry.reason,
        "headers": entry.headers,
        "sizes": [len(chunk) for chunk in entry.chunks],
        "usage": None if entry.usage is None else dataclasses.asdict(entry.usage),
        "model": entry.model,
        "stored_at": entry.stored_at,
        "provider": entry.provider,
        "cost_usd": entry.cost_usd,
    }
    if entry.has_raw_bytes:
        fields["headers"], fields["raw"] = _raw(entry.headers), True
        if entry.reason is not None:
            fields["reason"] = _latin_1(entry.reason)
    head = orjson.dumps(fields)
    return b"".join((_VERSION, len(head).to_bytes(4, "big"), head, *entry.chunks))


def decode(blob: bytes) -> Entry:
    """An entry from `encode`'s bytes. Raises CorruptEntry."""
    if blob[:1] != _VERSION or len(blob) < 5:
        raise CorruptEntry("not an entry of this version")
    end = 5 + int.from_bytes(blob[1:5], "big")
    try:
        head = orjson.loads(blob[5:end])
        chunks, start = [], end
        for size in head["sizes"]:
            chunks.append(blob[start : start + size])
            start += size
        if start != len(blob):
            raise CorruptEntry("the chunk sizes do not add up to the body")
        usage = head["usage"]
        has_raw_bytes = head.get("raw", False)
        headers = tuple((name, value) for name, value in head["headers"])
        reason = head["reason"]
        return Entry(
            status=head["status"],
            reason=_unlatin_1(reason) if has_raw_bytes and reason is not None else reason,
            headers=_unraw(headers) if has_raw_bytes else headers,
            chunks=tuple(chunks),
            usage=None if usage is None else Usage(**usage),
            model=head["model"],
            stored_at=head.get("stored_at"),
            has_raw_bytes=has_raw_bytes,
            provider=head.get("provider"),
            cost_usd=head.get("cost_usd"),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise CorruptEntry(str(error)) from None


# A head with bytes that are not UTF-8 is kept as its bytes read as Latin-1: JSON holds no
# lone surrogate. Every other head is kept as it is.
def _raw(headers: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    return tuple((name, _latin_1(value)) for name, value in headers)


def _unraw(headers: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    return tuple((name, _unlatin_1(value)) for name, value in headers)


def _latin_1(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("latin-1")


def _unlatin_1(text: str) -> str:
    return text.encode("latin-1").decode("utf-8", "surrogateescape")
