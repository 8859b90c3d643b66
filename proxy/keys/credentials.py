"""Credentials in request headers: which one a request presents, and bearer-token checks.

The virtual key is read from the first present of `Authorization: Bearer`, `x-api-key`,
`api-key`, `x-goog-api-key` (where the OpenAI, Anthropic, Azure and Gemini SDKs put it), and
last from Google's `?key=` query parameter (Google's curl examples and older SDKs put it
there: `with_query`); `keys.KeyRing` looks it up. A `key` parameter is never forwarded, as
the credential headers are not: the provider would be sent the virtual key. The gateway's
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
from urllib.parse import unquote_plus

# Google's APIs take an API key as this query parameter too.
_QUERY_KEY = "key"


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


def with_query(headers: Mapping[str, str], query: str) -> tuple[Mapping[str, str], str]:
    """Where the key is presented (the headers; when they present none, the query's first
    `key` parameter, as `x-goog-api-key`), and the raw query without its `key` parameters,
    every other byte as sent."""
    if _QUERY_KEY not in query and "%" not in query:  # most requests: no parsing
        return headers, query
    found: str | None = None
    kept: list[str] = []
    for parameter in query.split("&"):
        name, _, value = parameter.partition("=")
        if unquote_plus(name) != _QUERY_KEY:
            kept.append(parameter)
        elif found is None:
            found = unquote_plus(value)
    if len(kept) == query.count("&") + 1:
        return headers, query
    if found and found.strip() and presented(headers) is None:
        headers = {"x-goog-api-key": found}
    return headers, "&".join(kept)


def sent(credential: str) -> bytes:
    """The bytes of a credential as the client (or the environment) gave them."""
    return credential.encode("utf-8", "surrogateescape")


def presents_token(headers: Mapping[str, str], token: str) -> bool:
    """The request carries `Authorization: Bearer <token>` (constant-time comparison)."""
    scheme, _, given = headers.get("authorization", "").strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(sent(given.strip()), sent(token))
