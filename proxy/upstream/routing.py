"""Which provider path a request names, and the refusal of paths that could climb out.

`/v1/<tail>` and the seed paths without `/v1` (`/chat/completions`, `/completions`,
`/embeddings`, `/messages`, `/models`) name `<base_url>/<tail>` of the key's provider; so does
Azure OpenAI's root, `/openai/…`, where the AzureOpenAI clients put every path under the
`azure_endpoint` they are given (`/openai/deployments/<d>/chat/completions`, `/openai/v1/…`):
an azure base_url at the resource's endpoint gets the same path.
The tail is taken from the raw request target and forwarded still encoded (but an escaped
letter, digit, '-', '.', '_' or '~', decoded: the same path to the provider), so the
provider sees the same bytes; anything that could move the request off the provider's
base URL (`..` or `.` segments, `;` parameters or not (`..;`), encoded slashes or
backslashes, an absolute URL, an empty segment, a control character) is refused (but the
'%2F' of a Bedrock ARN: a model's, an async invocation's, a guardrail's) with 400 before it
goes anywhere. Any other path gets 404
naming the proxied ones; the gateway's own endpoints, reached here only with a method they
do not serve, get 405, as do methods no provider API serves (TRACE, CONNECT, WebDAV's). Routing needs no key: the exchange routes first.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import unquote

from proxy.errors import GatewayError

_AZURE_ROOT, _VERSION_ROOT = "openai/", "v1/"
OPENAI_API, ANTHROPIC_API = "openai", "anthropic"  # of `providers.APIS`
SEED_ROOTS = frozenset(("chat", "completions", "embeddings", "messages", "models", "openai"))
# The gateway's own GET endpoints; app.py routes their GET and HEAD before the catch-all.
OWN_ENDPOINTS = frozenset(("/health", "/ready", "/metrics", "/usage"))
# The methods the provider APIs serve (and OPTIONS, a CORS preflight's); any other (TRACE,
# which echoes the request and its real key; CONNECT; WebDAV's) is refused with 405.
PROXIED_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
_ALLOWED = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"

# Encoded '/', '\' and NUL: a provider may decode them into path separators.
_ENCODED_SEPARATOR = re.compile(r"%(2f|5c|00)", re.IGNORECASE)
# An unreserved character written as an escape (RFC 3986 §2.3: letters, digits, - . _ ~).
_ENCODED_UNRESERVED = re.compile(r"%(2[dD]|2[eE]|3[0-9]|[46][1-9a-fA-F]|[57][0-9aA]|5[fF]|7[eE])")
# Control characters, raw or encoded (%0a ...): no provider path holds one; a log reader
# or a provider's own router could be misled by it.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]|%(0[0-9a-f]|1[0-9a-f]|7f)", re.IGNORECASE)
# A scheme and '//' inside the path: `/v1/http://evil.example/x`.
_ABSOLUTE_URL = re.compile(r"(^|/)[a-z][a-z0-9+.-]*:(//|%2f%2f)", re.IGNORECASE)
# Bedrock's model id may be an ARN (an application inference profile, a provisioned model, a
# Bedrock Marketplace model's SageMaker endpoint), whose one '/' the SDK and boto3 send
# encoded in `model/<id>/<action>`: no separator there. So are an async invocation's ARN and a
# guardrail's (`_ARN_ROOTS`).
_BEDROCK_ARN = re.compile(
    r"arn:aws[a-z-]*:(?:bedrock:[a-z0-9-]*:[0-9]*:[a-z-]+|sagemaker:[a-z0-9-]*:[0-9]*:endpoint)"
    r"/[A-Za-z0-9][A-Za-z0-9_.:-]*"
)
# Bedrock's paths whose segment after this root may be an ARN: a model's
# (`model/<id>/<action>`), an async invocation's (GetAsyncInvoke: `async-invoke/<ARN>`, the
# whole path) and a guardrail's (ApplyGuardrail: `guardrail/<id>/version/<v>/apply`).
_INVOCATIONS = "async-invoke"
_ARN_ROOTS = frozenset(("model", _INVOCATIONS, "guardrail"))
# A tail none of the checks below can refuse (most): segments of letters, digits, '_', '-',
# '.' and ':' that start with none of the last two, so none is empty, '.' or '..', and no
# '%', '\', control character or '//' anywhere. It skips them; any other tail takes them.
_PLAIN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.:-]*(?:/[A-Za-z0-9_-][A-Za-z0-9_.:-]*)*/?")


def route(raw_target: str) -> tuple[str, str]:
    """(tail, raw query) of the request target. Raises 400 (unsafe), 404 (not proxied), 405."""
    if "#" in raw_target:
        # Clients never send fragments; forwarding without it would skip validation by path.
        raise _unsafe("a fragment ('#')")
    path, _, query = raw_target.partition("?")
    if path.startswith("//"):
        # A host, not a path (RFC 3986 §4.2); most often a client's base URL ending in '/'.
        raise GatewayError(
            400,
            "invalid_path",
            "The path starts with '//', which names a host; it was not forwarded. A base URL "
            "ending in '/' joined to '/v1...' makes one: drop that slash.",
        )
    if not path.startswith("/"):
        raise _unsafe("an absolute URL")
    if path in OWN_ENDPOINTS:
        raise GatewayError(
            405,
            "method_not_allowed",
            f"{path} answers GET (and HEAD) only.",
            headers={"allow": "GET, HEAD"},
        )
    if path.startswith("/v1/"):
        tail = path[4:]
    elif path.partition("/")[2].partition("/")[0] in SEED_ROOTS:
        tail = path[1:]
    else:
        raise GatewayError(
            404,
            "unknown_route",
            "Not a proxied path. Proxied: /v1/<provider path> (e.g. /v1/chat/completions, "
            "/v1/messages, /v1/embeddings, /v1/models, /v1/responses) and, without /v1, "
            "/chat/completions, /completions, /embeddings, /messages, /models, and Azure's "
            "/openai/... (AzureOpenAI with the gateway as azure_endpoint). "
            "Bedrock and Vertex clients take the gateway's /v1 as their endpoint. "
            "The gateway's own: GET /health, /ready, /metrics, /usage." + _prefix_advice(path),
        )
    if _PLAIN.fullmatch(tail):
        return tail, query
    if _CONTROL.search(tail):
        raise _unsafe("a control character")
    if _ABSOLUTE_URL.search(tail):
        raise _unsafe("an absolute URL")
    if "\\" in tail or _ENCODED_SEPARATOR.search(_without_bedrock_arn(tail)):
        raise _unsafe("an encoded slash or backslash")
    segments = tail.split("/")
    if segments[-1] == "":
        segments.pop()  # a trailing slash is the provider's business
    if not segments:
        raise GatewayError(404, "unknown_route", "Name a provider path after /v1/.")
    for segment in segments:
        # '//' also catches an absolute URL smuggled into the path (http://...). A segment's
        # ';' parameters (RFC 2396 §3.3) are dropped before dot segments resolve by servlet
        # containers (Tomcat, Jetty, Spring): '..;x' climbs there as '..' does.
        if unquote(segment).partition(";")[0] in ("", ".", ".."):
            raise _unsafe("an empty, '.' or '..' segment")
    if "%" in tail:
        # RFC 3986 §6.2.2.2: '%73' and 's' name the same path, and the provider decodes them
        # before it routes: the checks by path (client secrets, batches, an endpoint's
        # default model) read, and the provider is sent, the path it will route.
        tail = _ENCODED_UNRESERVED.sub(_decoded, tail)
    return tail, query


def spoken_api(tail: str, headers: Mapping[str, str]) -> str:
    """The API a request speaks (`providers.APIS`), for a key's routes to send one naming no
    model to a route that speaks it: Anthropic's endpoints (`messages…`) and any request
    carrying `anthropic-version`, which the Anthropic SDKs send on every call (a model list,
    files, skills), speak Anthropic's; any other OpenAI's (WebSocket sessions too: Realtime
    and the Responses API's WebSocket mode are OpenAI's)."""
    if tail == "messages" or tail.startswith("messages/") or "anthropic-version" in headers:
        return ANTHROPIC_API
    return OPENAI_API


def not_proxied(method: str) -> GatewayError:
    """The 405 of a method outside PROXIED_METHODS, on a proxied path."""
    shown = method[:32] if method.isascii() and method.isprintable() else "this method"
    return GatewayError(
        405,
        "method_not_allowed",
        f"{shown} is not proxied: provider APIs answer {_ALLOWED}.",
        headers={"allow": _ALLOWED},
    )


def _prefix_advice(path: str) -> str:
    """For a path with `/v1/…` after some segments (`/llm/v1/chat/completions`, as both SDKs
    send it under a base URL with a prefix): those segments are a prefix a proxy in front
    mounted the gateway under and left on the path."""
    segments = path.split("/")
    for index in range(2, len(segments) - 1):
        if segments[index] == "v1":
            prefix = "/".join(segments[:index])
            return (
                f" '{prefix}' looks like a path prefix that a proxy in front left on: have the "
                "proxy strip it (docs/reverse-proxies.md), as the gateway serves these paths at "
                "its root."
            )
    return ""


def endpoint(tail: str) -> str:
    """The OpenAI endpoint a tail names (`batches`, `chat/completions`, `realtime/…`): the
    tail, less Azure's roots before it. Azure serves OpenAI's API under its resource's
    `openai/` (deployments, threads, batches) and `openai/v1/` (its v1 API): an azure base_url
    at the resource (AzureOpenAI's azure_endpoint) or at its `openai/` puts them in the tail."""
    if tail.startswith(_AZURE_ROOT):
        tail = tail[len(_AZURE_ROOT) :]
    return tail[len(_VERSION_ROOT) :] if tail.startswith(_VERSION_ROOT) else tail


def _decoded(escape: re.Match[str]) -> str:
    return chr(int(escape.group(1), 16))


def _without_bedrock_arn(tail: str) -> str:
    """`tail` less a Bedrock segment that is an ARN (`model/<ARN>/...`, `async-invoke/<ARN>`,
    `guardrail/<ARN>/...`): the '%2F' in it is the ARN's own. Any other tail as it is."""
    first, _, rest = tail.partition("/")
    if first not in _ARN_ROOTS:
        return tail
    arn, _, after = rest.partition("/")
    if (after or first == _INVOCATIONS) and _BEDROCK_ARN.fullmatch(unquote(arn)):
        return after
    return tail


def _unsafe(what: str) -> GatewayError:
    return GatewayError(400, "invalid_path", f"The path contains {what}; it was not forwarded.")
