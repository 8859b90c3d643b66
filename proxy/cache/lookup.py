"""Which requests the cache may answer, and the name of the entry that answers them.

A request is cacheable when it is a POST of a JSON object (whatever its Content-Type says:
curl's -d labels JSON as a form, and the provider reads it as JSON) to a generation or embedding
endpoint (chat and text completions, embeddings, Anthropic messages, Responses neither in
the background nor in a conversation; neither chat nor Responses stored), and the client did not say
`Cache-Control: no-store`.
`no-cache` (and `max-age=0`) skips the lookup and lets the answer replace the entry;
`max-age=N` takes no entry stored more than N seconds ago.

The entry's name is a SHA-256 over, each length-prefixed: the scope, what answers the key's
requests (`Plans.served`: its targets' providers, base URLs, models and a digest of their
real keys), the method, the path (after /v1, so /v1/chat/completions and /chat/completions
are one), the raw query, the body's exact bytes, and the request headers that change the provider's answer
(`ANSWER_HEADERS`). sha256, not Python's `hash()`: every process, restart and instance
must name one request alike (a salted hash would never hit across them). No parsing or
re-serialising of the body: two bodies that differ by a space are two entries, which can
only miss, never serve a wrong answer. The name starts with its scope's digest, so an
operator can drop a key's or a scope's entries (`scope_prefix`).
"""

from __future__ import annotations

import enum
import hashlib
from typing import Any

from multidict import MultiMapping

from proxy.keys.fields import CachePolicy
from proxy.upstream.routing import endpoint

# Endpoints whose answers may be stored: the tail (after /v1/, and Azure's roots: `endpoint`)
# is one of these, or one of these under Azure's `deployments/<name>/`
# (/openai/deployments/<name>/chat/completions);
# never another path that merely ends so (the Assistants API's threads/<id>/messages adds a
# message to a thread: a write).
CACHEABLE_ENDPOINTS = ("chat/completions", "completions", "embeddings", "messages", "responses")
# Request headers that change what the provider answers (a beta feature, an API version,
# how the body is encoded, the OpenAI organization and project whose stored prompts, previous
# responses and files a request reads, named again in the answer's headers); every other
# header (tracing, user agents) names the same answer.
ANSWER_HEADERS = (
    "anthropic-version",
    "anthropic-beta",
    "openai-beta",
    "accept-encoding",
    "openai-organization",
    "openai-project",
)


class Directive(enum.Enum):
    """What the client's Cache-Control asks of this request."""

    USE = "use"  # look up, and store a miss's answer
    REFRESH = "refresh"  # no-cache: skip the lookup, store the answer
    SKIP = "skip"  # no-store: neither read nor write


_USE = (Directive.USE, None)


def directive(headers: MultiMapping[str]) -> tuple[Directive, int | None]:
    """The request's Cache-Control, read for no-store, no-cache and max-age (RFC 9111
    §5.2.1), and the oldest answer in seconds it takes (max-age; None: any within the ttl).
    `max-age=0`, what fetch() sends for `cache: "no-cache"` and a browser's reload, asks
    the provider again as no-cache does."""
    values = headers.getall("cache-control", ())
    if not values:
        return _USE
    tokens = {token.strip().lower() for value in values for token in value.split(",")}
    if "no-store" in tokens:
        return Directive.SKIP, None
    if "no-cache" in tokens:
        return Directive.REFRESH, None
    max_age = None
    for token in tokens:
        name, _, seconds = token.partition("=")
        seconds = seconds.strip().strip('"')
        if name.rstrip() == "max-age" and seconds.isascii() and seconds.isdigit():
            max_age = int(seconds)  # not a number: ignored (RFC 9111 §4.2.1)
    if max_age == 0:
        return Directive.REFRESH, None
    return Directive.USE, max_age


def is_cacheable_endpoint(method: str, tail: str) -> bool:
    if method != "POST":
        return False
    tail = endpoint(tail)
    return any(tail == name or _is_deployments(tail, name) for name in CACHEABLE_ENDPOINTS)


def _is_deployments(tail: str, name: str) -> bool:
    """`…deployments/<deployment>/<name>`."""
    if not tail.endswith("/" + name):
        return False
    return tail[: -len(name) - 1].split("/")[-2:-1] == ["deployments"]


def is_cacheable(method: str, tail: str, document: dict[str, Any] | None) -> bool:
    """A POST of a JSON object to a generation or embedding endpoint, not kept by the provider.

    `document`: the body parsed (None: not a JSON object). A chat completion or a Responses
    request with `store` true (a Responses one with `background` true) makes an object the
    provider keeps and answers later by id, and a Responses request in a `conversation`
    reads that conversation's items and appends to them: its answer is not a pure function
    of the request.
    """
    if document is None or not is_cacheable_endpoint(method, tail):
        return False
    if document.get("store") is True:
        return False
    if tail.endswith("responses"):
        return document.get("background") is not True and document.get("conversation") is None
    return True


def scope_of(key_id: str, policy: CachePolicy) -> str:
    """Whose entries a key reads: its shared scope's, else its own (by its id, never the key)."""
    if policy.scope is not None:
        return shared_scope(policy.scope)
    return "k:" + key_id


def shared_scope(scope: str) -> str:
    """A shared scope by its digest: never equal to a key's own (`k:`), bounded in Redis."""
    return "s:" + hashlib.sha256(scope.encode()).hexdigest()[:24]


def entry_name(
    scope: str,
    served: str,
    method: str,
    tail: str,
    query: str,
    body: bytes,
    headers: MultiMapping[str],
) -> str:
    """`<scope>:<sha256 hex>`, the same in every process for the same request."""
    digest = hashlib.sha256()
    fields = [scope.encode(), served.encode(), method.encode(), tail.encode(), query.encode(), body]
    for name in ANSWER_HEADERS:
        values = ", ".join(headers.getall(name, ()))
        # The bytes as sent: aiohttp hands a value that is not UTF-8 over as lone surrogates.
        fields.append(name.encode() + b"=" + values.encode("utf-8", "surrogateescape"))
    for field in fields:
        digest.update(len(field).to_bytes(8, "big"))
        digest.update(field)
    return f"{scope}:{digest.hexdigest()}"


def scope_prefix(scope: str) -> str:
    """What every entry name of a scope starts with."""
    return scope + ":"
