"""A real key the provider echoes in its answer's body, masked before the client gets it.

SPEC: a real key never appears in a response, not even when the provider echoes it back
(an OpenAI-compatible server's 401 quoting the key it refused, a debugging proxy).
Headers carrying one are dropped (`providers.downstream_headers`); this module does the
body, and the Realtime relay's frames (`realtime/websocket.py`: each message whole, `masked`). Each occurrence of one of the request's real keys is overwritten by a mask of the
same length (`[redacted]****…`): a Content-Length stays true and a JSON string stays JSON.

- A whole body (`masked_whole`) is searched as it came. A compressed error answer (4xx,
  5xx: where providers quote the credential they refused) is decoded to be searched; when
  it carries a key it goes out decoded and masked, without its Content-Encoding. Such an
  answer is read whole also when it comes without a length (`is_searched_whole`: chunked,
  as nginx's or a CDN's gzip sends it to a client that accepts gzip, as every SDK does).
- A stream (`StreamMask`) is searched chunk by chunk. A chunk that ends with the first
  bytes of a key keeps them back until the next chunk tells whether the key follows; an
  SSE event ends in a line break, which no key holds, so an event stream is never held.
- The words of an answer that the log line and the traces name (`unechoed`: the model the
  provider says answered, its error's type) have a key `[redacted]`.

Not done: keys shorter than `MIN_SECRET_CHARS` (placeholders such as "EMPTY" for a local
server: masking them would corrupt answers that merely contain the word); a compressed
success body or stream (no provider quotes credentials there, and decoding every answer
would cost every request); a key spelled with JSON escapes (`\\u0073k-…`).
"""

from __future__ import annotations

from collections.abc import Iterable

from multidict import CIMultiDict

from proxy.encodings import content_coding, decode_body
from proxy.errors import GatewayError
from proxy.record import REDACTED
from proxy.upstream.providers import MIN_SECRET_CHARS

MASK = b"[redacted]"
# The most a compressed error answer is inflated to, to be searched; past it, not searched.
MAX_DECODED_BYTES = 8 << 20


def searched(secrets: Iterable[str]) -> tuple[bytes, ...]:
    """The real keys to search an answer for, as bytes."""
    return tuple(secret.encode() for secret in secrets if len(secret) >= MIN_SECRET_CHARS)


def masked(data: bytes, secrets: tuple[bytes, ...]) -> bytes:
    """`data` with every occurrence of each secret overwritten by a mask of its length."""
    for secret in secrets:
        if secret in data:
            data = data.replace(secret, (MASK + b"*" * len(secret))[: len(secret)])
    return data


def unechoed(word: str | None, secrets: Iterable[str]) -> str | None:
    """A word of the provider's answer that the log and the traces name (the model it says
    answered, its error's type), each of `secrets` in it `[redacted]`."""
    if word is not None:
        for secret in secrets:
            if secret in word:
                word = word.replace(secret, REDACTED)
    return word


def is_plain(coding: str | None) -> bool:
    """A Content-Encoding that codes nothing: none, or `identity` (RFC 9110 §8.4.1)."""
    return not coding or coding.strip().lower() == "identity"


def is_searched_whole(status: int, coding: str | None, secrets: tuple[bytes, ...]) -> bool:
    """An answer that can be searched only once whole (`masked_whole`): a coded error."""
    return status >= 400 and bool(secrets) and not is_plain(coding)


def masked_whole(
    data: bytes, status: int, headers: CIMultiDict[str], secrets: tuple[bytes, ...]
) -> bytes:
    """A whole body as the client may have it; `headers` lose Content-Encoding and
    Content-Length when it had to go out decoded."""
    coding = content_coding(headers)
    if is_plain(coding):
        return masked(data, secrets)
    if status < 400 or not secrets:
        return data
    decoded = _decoded(data, coding or "")
    if decoded is None or not any(secret in decoded for secret in secrets):
        return data
    headers.popall("content-encoding", None)
    headers.popall("content-length", None)
    return masked(decoded, secrets)


def _decoded(data: bytes, coding: str) -> bytes | None:
    """The body with its codings undone; None when it cannot be, or inflates too far."""
    try:
        return decode_body(data, coding, MAX_DECODED_BYTES)
    except GatewayError:  # unsupported, corrupt, or past the bound: sent as it came
        return None


class StreamMask:
    """Masks the secrets in a body sent chunk by chunk, also one split between two chunks."""

    __slots__ = ("_held", "_secrets")

    def __init__(self, secrets: tuple[bytes, ...]) -> None:
        self._secrets = secrets
        self._held = b""  # the end of the last chunk, which may begin a secret

    def __call__(self, chunk: bytes) -> bytes:
        """What of `chunk` (after what was held) may go out now, masked."""
        data = masked(self._held + chunk if self._held else chunk, self._secrets)
        hold = max(_begun(data, secret) for secret in self._secrets)
        self._held = data[len(data) - hold :] if hold else b""
        return data[: len(data) - hold] if hold else data

    def rest(self) -> bytes:
        """What is held back when the body ends: it began no secret after all."""
        held, self._held = self._held, b""
        return held


def _begun(data: bytes, secret: bytes) -> int:
    """How many bytes at the end of `data` are the first bytes of `secret` (0: none)."""
    start = max(0, len(data) - len(secret) + 1)
    first = secret[:1]
    at = data.find(first, start)
    while at != -1:  # the leftmost start that fits is the longest beginning
        if secret.startswith(data[at:]):
            return len(data) - at
        at = data.find(first, at + 1)
    return 0
