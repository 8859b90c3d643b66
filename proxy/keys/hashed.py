"""Virtual keys kept as digests: what a key store holds instead of the key itself.

A virtual key written in keys.json as `"sha256:<64 hex digits>"` is the SHA-256 digest of
the key a client presents; the gateway hashes what it is given and looks the digest up, so
neither the file nor a Redis dump reveals the key. The admin API writes every key it makes
in this form, and a rotated key's predecessor as `previous_key: {"key": "sha256:…",
"expires_at": <Unix seconds>}`, which authenticates as the same key until then.

Unsalted SHA-256 is enough for keys the gateway generates (32 random bytes) and for the
20-character minimum it asks of keys it is given: these are not passwords a person picks.
A digest presented as a key is hashed like any key, so a leaked digest opens nothing.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from proxy.keys.credentials import sent
from proxy.keys.fields import KeysFileError, positive_number

PREFIX = "sha256:"
_DIGEST = re.compile(r"[0-9a-f]{64}")


def digest(secret: str) -> str:
    """The hex SHA-256 of a key as a client presents it."""
    return hashlib.sha256(sent(secret)).hexdigest()


def hashed(secret: str) -> str:
    """The key as a store keeps it: `sha256:<hex>` (a digest stays as it is)."""
    return secret if is_hashed(secret) else PREFIX + digest(secret)


def is_hashed(written: str) -> bool:
    return written.startswith(PREFIX)


def digest_of(where: str, written: str) -> str:
    """The hex digest of a `sha256:` key as written. Raises KeysFileError."""
    hexdigest = written.removeprefix(PREFIX)
    if _DIGEST.fullmatch(hexdigest) is None:
        raise KeysFileError(f"{where}: a sha256: key must be 64 lower-case hex digits")
    return hexdigest


def previous_key(where: str, entry: Mapping[str, Any]) -> tuple[str, float] | None:
    """A rotated key's predecessor: its digest and until when it works. Raises KeysFileError."""
    previous = entry.get("previous_key")
    if previous is None:
        return None
    if not isinstance(previous, dict) or set(previous) != {"key", "expires_at"}:
        raise KeysFileError(f"{where}: previous_key must be an object (key, expires_at)")
    key, expires_at = previous["key"], previous["expires_at"]
    if not isinstance(key, str) or not is_hashed(key):
        raise KeysFileError(f"{where}: previous_key.key must be a sha256: digest")
    if not positive_number(expires_at):
        raise KeysFileError(f"{where}: previous_key.expires_at must be Unix seconds")
    return digest_of(f"{where}: previous_key", key), float(expires_at)
