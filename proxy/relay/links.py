"""Links a provider hands out to its own URLs, pointed back at the gateway: a message
batch's `results_url`, and a redirect's `Location`.

A `Location` at the base URL of the provider that answered (a FastAPI server's redirect of
a trailing slash, `307 Location: http://vllm:8000/v1/models`) becomes the same path on the
gateway, relative (`/v1/models`), as `pointed_back` makes it: the SDKs follow redirects,
and would otherwise take the client past the gateway, its virtual key with it (httpx drops
only `Authorization` on a redirect to another host, not `x-api-key`), to a host it may not
reach. A `Location` anywhere else (a signed download URL) stays as sent.

Anthropic answers a message batch (GET /v1/messages/batches/{id}, its cancel, a list of
them) with a `results_url` that is absolute, at the provider
(`https://api.anthropic.com/v1/messages/batches/{id}/results`), and the Anthropic SDKs'
`batches.results()` dial it as it is: through the gateway, the virtual key would go to the
provider's host, past the gateway, and be refused there. So in those answers (JSON, status
200; not the results themselves) each absolute `results_url` ending in
`/messages/batches/{id}/results` becomes that path on the gateway, relative
(`/v1/messages/batches/{id}/results`, as the client's own path began): the SDKs join a
relative URL to their base URL, so it reaches the gateway however the client does (behind
an ingress's path prefix too). Every other byte stays as the provider sent it.

These answers are read whole to be rewritten (a batch, or a page of at most 1,000: under
`MAX_BYTES`), also when they come without a length. A compressed one is decoded to be
searched, and goes out decoded, without its Content-Encoding, when a link changed;
otherwise as it came.
"""

from __future__ import annotations

import re

from multidict import CIMultiDict

from proxy.encodings import content_coding, decode_body
from proxy.errors import GatewayError
from proxy.upstream.providers import Provider

# A page of 1,000 batches is about 700 KB; the most read whole (or inflated) to be rewritten.
MAX_BYTES = 8 << 20
_NAME = b'"results_url"'
_RESULTS_URL = re.compile(
    rb'"results_url"(\s*:\s*)"https?://[^"/]+(?:/[^"]*)?/messages/batches/([A-Za-z0-9_\-]{1,200})/results"'
)


class ResultsLinks:
    """Rewrites the results links of one answer for a client whose path began `prefix`."""

    __slots__ = ("_prefix",)

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix.encode()

    @classmethod
    def of(
        cls, method: str, path: str, status: int, content_type: str | None
    ) -> ResultsLinks | None:
        """The rewrite an answer needs: None for every answer but a message batch's (or a
        list of them)."""
        if (
            status != 200
            or "/messages/batches" not in path
            or path.endswith("/results")
            or method not in ("GET", "POST")
            or not (content_type or "").startswith("application/json")
        ):
            return None
        return cls("/v1" if path.startswith("/v1/") else "")

    async def __call__(self, data: bytes, headers: CIMultiDict[str]) -> bytes:
        """The answer as the client gets it; `headers` lose Content-Encoding and
        Content-Length when it changed."""
        coding = content_coding(headers)
        plain = data
        if coding and coding.strip().lower() != "identity":
            try:
                plain = decode_body(data, coding, MAX_BYTES)
            except GatewayError:  # unsupported, corrupt, or past the bound: as it came
                return data
        if _NAME not in plain:
            return data
        prefix = self._prefix
        rewritten, count = _RESULTS_URL.subn(
            lambda found: b"".join(
                (_NAME, found[1], b'"', prefix, b"/messages/batches/", found[2], b'/results"')
            ),
            plain,
        )
        if not count:
            return data
        headers.popall("content-encoding", None)
        headers.popall("content-length", None)
        return rewritten


def pointed_back(headers: CIMultiDict[str], provider: Provider, path: str) -> None:
    """An answer's `Location` under `provider`'s base URL, as the same path on the gateway
    for a client whose path was `path` (`/v1/...` or a root path: the client's shape)."""
    location = headers.get("location")
    if location is None:
        return
    tail = provider.tail_of(location)
    if tail is not None:
        headers["location"] = ("/v1/" if path.startswith("/v1/") else "/") + tail
