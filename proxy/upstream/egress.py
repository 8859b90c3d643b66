"""Egress: the outbound proxy a provider is reached through, as curl and requests choose it.

HTTPS_PROXY, HTTP_PROXY, ALL_PROXY and NO_PROXY (either case, the lowercase name winning;
`settings.outbound_proxies` reads them once, at start) name the proxy for each scheme and the
hosts reached directly. An https origin is reached through a CONNECT tunnel (the wire's
`_tunnel`), an http origin by sending the request to the proxy with its absolute URL. A
proxy URL's user and password become the Proxy-Authorization header sent to the proxy only;
nothing shows them: a hop prints as its host and port.

NO_PROXY is a comma-separated list of host names (each also covers its subdomains; a
leading dot is ignored), IP addresses, CIDR ranges (10.0.0.0/8), host:port entries, or `*`
(no proxy at all) — what curl, requests and httpx accept — and `*.corp.internal`, as Go
(Docker, kubectl) reads it: as `.corp.internal`.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import urllib.parse
from collections.abc import Mapping

from yarl import URL

Origin = tuple[str, str, int]  # scheme, host, port (as the wire keys its pools)
_HOST_PORT = re.compile(r"(?P<host>[^:\[\]]+|\[[^\]]+\]):(?P<port>\d+)")


class Hop:
    """An outbound proxy: where it is and what it is told, never shown whole."""

    __slots__ = ("host", "port", "authorization")

    def __init__(self, url: str) -> None:
        """`url`: http://[user:password@]host[:port] (checked at start by the settings)."""
        parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        self.host = parts.hostname or ""
        self.port = parts.port or 80
        self.authorization: str | None = None  # the Proxy-Authorization value
        if parts.username is not None:
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            pair = f"{user}:{password}".encode()
            self.authorization = f"Basic {base64.b64encode(pair).decode('ascii')}"

    @property
    def where(self) -> str:
        """host:port, for errors and the start line: never the credentials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> URL:
        """The proxy's URL without its credentials (aiohttp's `proxy=`)."""
        return URL.build(scheme="http", host=self.host, port=self.port)

    def __repr__(self) -> str:
        return f"Hop({self.where})"


class Egress:
    """Which origins go through which proxy; the answer kept per origin (there are few)."""

    __slots__ = ("_hops", "_no_proxy", "_chosen")

    def __init__(self, proxies: Mapping[str, str]) -> None:
        """`proxies`: scheme ("http", "https", "all") → proxy URL, and "no" → NO_PROXY."""
        fallback = proxies.get("all")
        self._hops: dict[str, Hop] = {}
        for scheme in ("http", "https"):
            url = proxies.get(scheme, fallback)
            if url:
                self._hops[scheme] = Hop(url)
        self._no_proxy = [
            entry.strip().lower() for entry in proxies.get("no", "").split(",") if entry.strip()
        ]
        self._chosen: dict[Origin, Hop | None] = {}

    @classmethod
    def of(cls, proxies: Mapping[str, str]) -> Egress | None:
        """The egress for these variables; None when no proxy is set for http or https (the
        wire then connects directly, checking nothing per request)."""
        egress = cls(proxies)
        return egress if egress._hops else None

    def hop(self, origin: Origin) -> Hop | None:
        """The proxy `origin` is reached through, or None: directly (NO_PROXY, or none set)."""
        try:
            return self._chosen[origin]
        except KeyError:
            scheme, host, port = origin
            hop = self._hops.get(scheme)
            if hop is not None and bypassed(self._no_proxy, host, port):
                hop = None
            self._chosen[origin] = hop
            return hop

    def describe(self) -> str:
        """For the start line: each scheme's proxy as host:port, and NO_PROXY's length."""
        said = [f"{scheme} via {hop.where}" for scheme, hop in self._hops.items()]
        if self._no_proxy:
            count = len(self._no_proxy)
            said.append(f"{count} NO_PROXY entr{'y' if count == 1 else 'ies'}")
        return ", ".join(said)


def origin_of(url: URL) -> Origin:
    """A URL's origin as the wire keys it; a WebSocket's (ws, wss) as http's and https's."""
    scheme = {"wss": "https", "ws": "http"}.get(url.scheme, url.scheme)
    return scheme, url.raw_host or "", url.port or (443 if scheme == "https" else 80)


def bypassed(no_proxy: list[str], host: str, port: int) -> bool:
    """`host` (at `port`) is reached directly: a NO_PROXY entry names it, a domain above it,
    its address or a range holding it, or is `*`."""
    host = host.lower().strip("[]").rstrip(".")
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in no_proxy:
        if entry == "*":
            return True
        matched = _HOST_PORT.fullmatch(entry)
        if matched is not None:  # host:port, [v6]:port: that port only
            if int(matched["port"]) != port:
                continue
            entry = matched["host"]
        entry = entry.strip("[]")
        try:
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError:  # a name; `*.corp` (Go's, Java's form) as `.corp`
            name = entry.removeprefix("*").lstrip(".").rstrip(".")
            if name and (host == name or host.endswith("." + name)):
                return True
            continue
        if address is not None and address in network:
            return True
    return False
