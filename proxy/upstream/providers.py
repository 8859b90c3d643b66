"""The provider table: where a key's requests go and how its real key is sent.

Providers differ by data only: a base URL, the header that carries the real key, and
headers added when the client sent none; the clouds (`bedrock`, `vertex`) sign each request
instead of sending a key (`signing`), at a base URL that depends on the target's region
(Bedrock's region has two: its runtime, and its control plane for the tails under `v1/`,
Anthropic's managed agents). `keys.json` may override a built-in's
`base_url` or `auth`, or declare a custom provider. This module also owns the headers
of both directions: what is dropped (hop-by-hop, `Host`, anything that can carry a
virtual key) and the upstream URL, which no part of a request can point elsewhere.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

AUTH_STYLES = ("bearer", "x-api-key", "api-key", "x-goog-api-key", "none")
# Which API a provider speaks: a fallback or a route must speak the request's.
APIS = ("openai", "anthropic", "bedrock", "vertex")
# How a cloud provider authenticates a request: AWS SigV4 over the exact bytes, or a Google
# OAuth access token minted from a service account (upstream/signing.py).
SIGNINGS = ("", "sigv4", "google")
# The tails a provider's control plane serves, where it has one (`control_url`): Anthropic's
# managed agents on Bedrock (`v1/agents`, `v1/sessions`, `v1/memory_stores`), which the
# anthropic SDK sends as its own `/v1/...` under the base URL it is given (the gateway's `/v1`),
# signed for the same service as the runtime's calls (`bedrock`).
CONTROL_ROOT = "v1/"

# Headers that can carry a virtual key, in the order they are read: the
# headers the OpenAI, Anthropic, Azure and Gemini SDKs send their key in.
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key")

# Hop-by-hop headers are for one connection only (RFC 9110 §7.6.1); Proxy-* too.
HOP_BY_HOP = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    )
)

# Real keys are 30 to 110 characters: a shorter one is a placeholder ("-", "EMPTY", "none" for a
# server that checks no key), which no answer is searched for (`searched`): a header or a body
# holding "-" or "x" merely contains the character.
MIN_SECRET_CHARS = 16

# A client that signs for AWS itself sends these beside its Authorization: its own cloud
# credential, never forwarded (the gateway signs with the target's).
AWS_CREDENTIAL_HEADERS = ("x-amz-date", "x-amz-security-token", "x-amz-content-sha256")

# A Google client whose credentials name a quota project sends it beside its token (google-auth's
# `apply`): the project billed and quota-checked for the call. To a target the gateway signs
# with its own service account (`vertex`), it would let the client charge any project that
# account may use; never forwarded there. The account's own project applies (google-auth names
# no quota project for a key file read with `from_service_account_info`).
GOOGLE_CREDENTIAL_HEADERS = ("x-goog-user-project",)

# Cloudflare's edge writes CF-Connecting-IP for the origin behind it alone, and refuses any
# request that arrives with one (403, "error code: 1000"): behind a Cloudflare-proxied host,
# the gateway would send it on to providers that are themselves behind Cloudflare (OpenAI,
# Anthropic), which refused every call. The client's address goes on in X-Forwarded-For.
EDGE_ONLY = ("cf-connecting-ip",)

# A provider's own CORS answer (llama.cpp's server reflects the request's Origin on every
# answer, with credentials; Anthropic's answers `*` to a request saying
# `anthropic-dangerous-direct-browser-access`): the browser talks to the gateway, whose CORS
# alone applies (relay/cors.py; none when CORS_ALLOWED_ORIGINS is unset).
_PROVIDERS_CORS = frozenset(
    (
        "access-control-allow-origin",
        "access-control-allow-credentials",
        "access-control-allow-methods",
        "access-control-allow-headers",
        "access-control-expose-headers",
        "access-control-max-age",
    )
)

# Never passed back to the client: hop-by-hop headers, the provider's CORS, and Alt-Svc (RFC
# 7838), which names alternatives of the provider's origin (Cloudflare's and Google's
# `h3=":443"`): passed on, it tells browsers and HTTP/3 clients that the gateway's own host
# serves HTTP/3 on port 443 for as long as its `ma` says, as YARP and Caddy's reverse proxy
# also drop it.
_NOT_DOWNSTREAM = HOP_BY_HOP | _PROVIDERS_CORS | {"alt-svc"}

# Never forwarded upstream: the client's credentials, and headers the client library
# sets for its own connection (aiohttp writes Host and Content-Length for the body it sends).
# Expect is answered by the gateway itself (aiohttp sends the 100 Continue); upstream
# gets the whole body at once.
_NOT_UPSTREAM = (
    HOP_BY_HOP
    | frozenset(CREDENTIAL_HEADERS)
    | frozenset(AWS_CREDENTIAL_HEADERS)
    | frozenset(EDGE_ONLY)
    | {"host", "content-length", "expect"}
)
# ... and to a target the gateway signs for Google.
_NOT_UPSTREAM_GOOGLE = _NOT_UPSTREAM | frozenset(GOOGLE_CREDENTIAL_HEADERS)


@dataclass(frozen=True, slots=True)
class Provider:
    """Where requests go and how the real key is sent."""

    name: str
    base_url: URL
    auth: str
    # Added upstream only when the client sent none (e.g. anthropic-version).
    default_headers: Mapping[str, str] = field(default_factory=dict)
    api: str = "openai"  # one of APIS
    signing: str = ""  # one of SIGNINGS: "" sends a key in `auth`'s header
    # The base URL of a target in `{region}` (a cloud's); "" when base_url is the only one.
    regional_url: str = ""
    # The regions whose endpoint is not on that pattern: region -> its base URL.
    region_urls: Mapping[str, str] = field(default_factory=dict)
    # The base URL of the tails under CONTROL_ROOT (in `{region}` until `in_region`): Bedrock's
    # control plane; "" sends them to base_url, as any other tail.
    control_url: str = ""
    # Worked out once from the above (__post_init__), not on every request: base_url as a
    # string without its trailing slash (and control_url's); the credential's header and what
    # precedes the key; the client's headers never forwarded to it.
    _base: str = field(init=False, repr=False, compare=False)
    _control: str = field(init=False, repr=False, compare=False)
    _auth_header: str = field(init=False, repr=False, compare=False)
    _auth_prefix: str = field(init=False, repr=False, compare=False)
    not_upstream: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        is_bearer = self.auth == "bearer"
        object.__setattr__(self, "_base", str(self.base_url).rstrip("/"))
        object.__setattr__(self, "_control", self.control_url.rstrip("/"))
        object.__setattr__(self, "_auth_header", "Authorization" if is_bearer else self.auth)
        object.__setattr__(self, "_auth_prefix", "Bearer " if is_bearer else "")
        google = self.signing == "google"
        object.__setattr__(self, "not_upstream", _NOT_UPSTREAM_GOOGLE if google else _NOT_UPSTREAM)

    def in_region(self, region: str) -> Provider:
        """This provider at `region`'s endpoint (itself when its base URL is fixed)."""
        if not self.regional_url:
            return self
        url = self.region_urls.get(region) or self.regional_url.format(region=region)
        control = self.control_url.format(region=region)
        return replace(self, base_url=URL(url), control_url=control)

    def credential_headers(self, api_key: str) -> dict[str, str]:
        """The header that carries the real key, in this provider's style."""
        if self.auth == "none":
            return {}
        return {self._auth_header: self._auth_prefix + api_key}

    def set_credential(self, headers: CIMultiDict[str], api_key: str) -> None:
        """Set (replace) the header that carries the real key: `credential_headers`, in place."""
        if self.auth != "none":
            headers[self._auth_header] = self._auth_prefix + api_key

    def url(self, tail: str, query_string: str) -> URL:
        """`<base_url>/<tail>?<query>` (`<control_url>/...` for a tail under CONTROL_ROOT, where
        there is one); `tail` was already checked by `routing` not to climb out."""
        base = self._control if self._control and tail.startswith(CONTROL_ROOT) else self._base
        url = f"{base}/{tail}?{query_string}" if query_string else f"{base}/{tail}"
        return URL(url, encoded=True)

    def tail_of(self, url: str) -> str | None:
        """`<tail>?<query>` of a URL under this provider's base URL or control_url (`url`'s
        inverse); None for any other URL."""
        if self._control and _is_under(url, self._control):
            return url[len(self._control) :].lstrip("/")
        if not _is_under(url, self._base):
            return None
        return url[len(self._base) :].lstrip("/")


def _is_under(url: str, base: str) -> bool:
    return url.startswith(base) and url[len(base) : len(base) + 1] in ("/", "?")


BUILTINS: dict[str, Provider] = {
    "openai": Provider("openai", URL("https://api.openai.com/v1"), "bearer"),
    "anthropic": Provider(
        "anthropic",
        URL("https://api.anthropic.com/v1"),
        "x-api-key",
        {"anthropic-version": "2023-06-01"},
        "anthropic",
    ),
    "gemini": Provider(
        "gemini", URL("https://generativelanguage.googleapis.com/v1beta/openai"), "bearer"
    ),
    # The clouds: the base URL is the target's region's, every request signed.
    "bedrock": Provider(
        "bedrock",
        URL("https://bedrock-runtime.us-east-1.amazonaws.com"),
        "none",
        api="bedrock",
        signing="sigv4",
        regional_url="https://bedrock-runtime.{region}.amazonaws.com",
        # The SDK's own default for the managed agents (`AnthropicBedrock`'s base_url, unset).
        control_url="https://bedrock.{region}.amazonaws.com/anthropic",
    ),
    "vertex": Provider(
        "vertex",
        URL("https://us-east5-aiplatform.googleapis.com/v1"),
        "none",
        api="vertex",
        signing="google",
        regional_url="https://{region}-aiplatform.googleapis.com/v1",
        # The global endpoint, and the multi-region ones (`us`, `eu`), as the SDKs know them.
        region_urls={
            "global": "https://aiplatform.googleapis.com/v1",
            "us": "https://aiplatform.us.rep.googleapis.com/v1",
            "eu": "https://aiplatform.eu.rep.googleapis.com/v1",
        },
    ),
    # Azure has no shared endpoint: each resource sets its base_url in keys.json.
    "azure": Provider("azure", URL(""), "api-key"),
}


# The defaults a provider declared in keys.json adds, by the API it speaks: one speaking
# Anthropic's (an Anthropic-compatible endpoint) needs anthropic-version as the built-in does.
API_DEFAULT_HEADERS: dict[str, Mapping[str, str]] = {
    "anthropic": BUILTINS["anthropic"].default_headers
}


def upstream_url(provider: Provider, tail: str, query_string: str) -> URL:
    """`<base_url>/<tail>?<query>`; `tail` was already checked by `routing` not to climb out."""
    return provider.url(tail, query_string)


def upstream_headers(
    provider: Provider, api_key: str, incoming: CIMultiDictProxy[str], request_id: str
) -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop, Host and credentials; plus the real key."""
    headers = forwarded_headers(provider, incoming)
    provider.set_credential(headers, api_key)
    headers["x-request-id"] = request_id
    return headers


def forwarded_headers(provider: Provider, incoming: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop, Host and credentials, plus the provider's
    defaults the client did not send: `upstream_headers` before the key is set."""
    headers = _without(incoming, provider.not_upstream)
    for name, value in provider.default_headers.items():
        if name not in headers:
            headers[name] = value
    return headers


def downstream_headers(
    incoming: CIMultiDictProxy[str], secrets: Collection[str]
) -> CIMultiDict[str]:
    """The provider's headers minus hop-by-hop ones, its CORS, Alt-Svc, and any that carry
    one of `secrets`.

    `secrets` are the real keys the request was sent with (`searched`: placeholders left
    out): a provider (or a debugging proxy in front of it) that reflects request headers must
    not hand them to the client. Such a header is dropped whole, not redacted: its other
    bytes may encode the key too.
    Content-Length stays (same bytes).
    """
    headers = _without(incoming, _NOT_DOWNSTREAM)
    # One search per secret over every name and value at once (a match across two of them
    # is checked header by header below): no header holds one, in all but a broken setup.
    names_values = "\n".join(headers.keys()) + "\n" + "\n".join(headers.values())
    if any(secret in names_values for secret in secrets) and any(
        secret in name or secret in value for name, value in headers.items() for secret in secrets
    ):
        headers = CIMultiDict(
            (name, value)
            for name, value in headers.items()
            if not any(secret in name or secret in value for secret in secrets)
        )
    return headers


def searched(secrets: Iterable[str]) -> tuple[str, ...]:
    """The real keys an answer is searched for: those of `MIN_SECRET_CHARS` or more, longest
    first. A key may begin with another (keys chosen by hand: `...-key`, `...-key-2`): masked
    first, the shorter one would leave the longer one's tail showing."""
    kept = [secret for secret in secrets if len(secret) >= MIN_SECRET_CHARS]
    return tuple(sorted(kept, key=len, reverse=True))


def _without(incoming: CIMultiDictProxy[str], dropped: frozenset[str]) -> CIMultiDict[str]:
    # A copy (one C call), then the few dropped names taken out: cheaper than rebuilding the
    # dict header by header, and the headers keep their order and case.
    headers = CIMultiDict(incoming)
    for name in dropped:
        if name in headers:
            del headers[name]
    # Headers listed in Connection are hop-by-hop for this connection (RFC 9110 §7.6.1).
    for value in incoming.getall("connection", ()):
        for token in value.split(","):
            headers.popall(token.strip(), None)
    return headers
