"""Credentials in request headers: which one a request presents, and bearer-token checks.

The virtual key is read from the first present of `Authorization: Bearer`, `x-api-key`,
`api-key`, `x-goog-api-key` (where the OpenAI, Anthropic, Azure and Gemini SDKs put it); `keys.KeyRing` looks it up. The gateway's
own tokens (`METRICS_TOKEN`) are compared here in constant time, so the time of a wrong
answer says nothing about how much of the token was right.

A header's bytes that are not UTF-8 reach the gateway as lone surrogates (aiohttp decodes
headers with `surrogateescape`, as `os.environ` decodes the tokens' variables), which
`str.encode()` refuses: a credential is hashed and compared as `sent(credential)`, the
bytes as they came, so such a credential is a wrong one (401), never a crash (500).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping


def presented(headers: Mapping[str, str]) -> str | None:
    """The first credential present: Authorization Bearer, x-api-key, api-key, x-goog-api-key."""
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if token and scheme.lower() == "bearer":
            return token
    for name in ("x-api-key", "api-key", "x-goog-api-key"):
        value = headers.get(name)
        if value and value.strip():
            return value.strip()
    return None


def sent(credential: str) -> bytes:
    """The bytes of a credential as the client (or the environment) gave them."""
    return credential.encode("utf-8", "surrogateescape")


def presents_token(headers: Mapping[str, str], token: str) -> bool:
    """The request carries `Authorization: Bearer <token>` (constant-time comparison)."""
    scheme, _, given = headers.get("authorization", "").strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(sent(given.strip()), sent(token))
