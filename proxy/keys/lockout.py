"""Throttling of failed authentications: per client address and presented-key prefix.

A virtual key is a password, and every endpoint that looks one up is a way to guess it:
without a limit a client can try keys as fast as the gateway answers (a 12-character key
fell in 4,096 requests). So failed authentications are counted in a fixed window per
client address (an IPv6 client's /64: a host is given one, 2**64 addresses that would each
have had fresh tries), and within it per prefix of the credential presented (its first
PREFIX_CHARS characters):

- `failures` failures from one address with keys that begin alike lock that prefix at
  that address: such keys get 429 until the window ends (guessing the rest of a key);
- `failures` × ADDRESS_FACTOR failures from one address, whatever the keys, lock the
  address: any key gets 429 (guessing whole keys).

Neither locks out the valid. Behind a NAT, an ingress or a Service one client's stale key
must not lock out everyone at that address: a stale key's retries lock only its own
prefix, and while anything is locked, a credential that was accepted from that address
before (a key, the admin token; remembered as a salted hash, at most KNOWN_PER_ADDRESS per
address) is still looked up and served. A guesser only ever reaches the credentials the
address already held. A success does not reset the counts: a client holding one valid key
could otherwise interleave its guesses with it.

The lockout's 429 carries `x-should-retry: false` (the OpenAI and Anthropic SDKs would
otherwise retry it, silently, for as long as Retry-After says) and is not itself counted
as a failure.

The client's address is the connection's peer, unless that peer is one of TRUSTED_PROXIES:
then X-Forwarded-For names it (the rightmost entry that is not a trusted proxy; its port,
which some load balancers write, dropped: a new connection is not a new client), so the
counts are per client behind an ingress, not one count for the ingress. An entry that names
no address (`unknown`) leaves the proxy as the client. A header from any
other peer is ignored: a client cannot forge its way out of a lockout.

Memory is bounded: at most `max_addresses` addresses are remembered (failing ones, and
known ones, each), the least recently seen forgotten first. State is per process
(WORKERS > 1: each worker counts its own connections).
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from aiohttp import web

from proxy import errors
from proxy.errors import GatewayError
from proxy.keys.credentials import presented, sent
from proxy.keys.keys import KeyRing, VirtualKey
from proxy.settings import Networks

log = logging.getLogger("llm_gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_ADDRESSES = 10_000
PREFIX_CHARS = 12  # of the presented credential: what a stale key's retries lock
ADDRESS_FACTOR = 4  # an address's failures, over its prefixes, that lock every unknown key
KNOWN_PER_ADDRESS = 64  # credentials remembered as accepted from one address

IP = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(slots=True)
class _Failures:
    since: float  # the first failure of the current window (the clock's time)
    count: int = 0  # every failure of the address in the window
    by_prefix: dict[str, int] = field(default_factory=dict)


class NotYetKnown(Exception):
    """A key not found while the keys are being reloaded: one made a moment ago through
    another worker's admin API, whose SIGHUP this worker is acting on. Not counted as a
    failure: it is asked for again once the reload has ended."""


class Lockout:
    """Failed authentications per address and key prefix in a fixed window; over: 429."""

    def __init__(
        self,
        failures: int,
        window_seconds: float,
        on_failure: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        max_addresses: int = MAX_ADDRESSES,
        trusted_proxies: Networks = (),
    ) -> None:
        self._limit = failures
        self._window = window_seconds
        # Told "refused" (a 401) or "throttled" (a 429 from here): the app counts both.
        self._on_failure = on_failure
        self._clock = clock
        self._max_addresses = max_addresses
        self._trusted = trusted_proxies
        self._failures: OrderedDict[str, _Failures] = OrderedDict()
        # Address → fingerprints of credentials accepted from it, most recent last.
        self._known: OrderedDict[str, OrderedDict[bytes, None]] = OrderedDict()
        self._salt = os.urandom(16)  # fingerprints mean nothing outside this process
        self._names: dict[str, str] = {}  # an address with a colon → what it is counted as

    def client_address(self, request: web.BaseRequest) -> str:
        """The client's address as counted: the peer's, or X-Forwarded-For's behind a trusted
        proxy; an IPv6 one's /64."""
        peer = request.remote or ""
        if not self._trusted or not self._is_trusted(_ip(peer)):
            return self._counted(peer)
        hops = [
            hop
            for header in request.headers.getall("x-forwarded-for", [])
            for hop in header.split(",")
        ]
        for hop in reversed(hops):  # the nearest first: each proxy appends who it heard
            ip = _hop_ip(hop)
            if ip is None:  # "unknown", garbage: a proxy that hid who it heard
                return self._counted(peer)
            if not self._is_trusted(ip):
                return self._counted(hop.strip())
        # Only proxies: the nearest is the client as far as can be known.
        return self._counted(peer)

    def _counted(self, address: str) -> str:
        """What `address` is counted as: an IPv4 address as it is, an IPv6 one as its /64 (a
        host is given a /64, and each of its addresses had fresh tries). Remembered, as
        working it out costs a few us."""
        if ":" not in address:  # IPv4, spelt one way (a port or IPv6 would have a colon)
            return address
        named = self._names.get(address)
        if named is None:
            if len(self._names) >= self._max_addresses:
                self._names.clear()
            named = self._names[address] = _network(address)
        return named

    def _is_trusted(self, ip: IP | None) -> bool:
        return ip is not None and any(ip in network for network in self._trusted)

    def authenticate(
        self,
        ring: KeyRing,
        headers: Mapping[str, str],
        address: str | None,
        is_reloading: Callable[[], bool] | None = None,
    ) -> VirtualKey:
        """The key the headers name, unless its address and prefix failed too often.

        Raises 401, or 429 (locked, and the credential was never accepted from here);
        NotYetKnown, not counted, for a key not found while `is_reloading()`.
        """
        credential = presented(headers)
        self.check(address, credential)
        try:
            key = ring.key_for(credential)
        except GatewayError:
            if credential is not None and is_reloading is not None and is_reloading():
                raise NotYetKnown from None
            self.failed(address, credential)
            raise
        self.accepted(address, credential)
        return key

    def guarded(self, handler: Handler) -> Handler:
        """An own endpoint (`/usage`, `/admin/*`, `/metrics`) behind the lockout: its 401s
        count as failures, and its accepted tokens are served while the address is locked."""

        @functools.wraps(handler)
        async def answer(request: web.Request) -> web.StreamResponse:
            address, credential = self.client_address(request), presented(request.headers)
            try:
                self.check(address, credential)
            except GatewayError as error:
                return errors.render(error, request.path)
            response = await handler(request)
            if response.status == 401:
                self.failed(address, credential)
            elif response.status < 400 and credential is not None:
                self.accepted(address, credential)
            return response

        return answer

    def refuses(self, request: web.BaseRequest) -> bool:
        """Whether the request would get the lockout's 429 (counting nothing)."""
        address, credential = self.client_address(request), presented(request.headers)
        return self.locked_for(address, credential) is not None

    def check(self, address: str | None, credential: str | None = None) -> None:
        """Raise 429 when the credential may not be tried from `address` now."""
        wait = self.locked_for(address, credential)
        if wait is not None:
            self._on_failure("throttled")
            raise GatewayError(
                429,
                "too_many_authentication_failures",
                f"Too many failed authentications from this address; retry in {math.ceil(wait)} "
                "seconds with a valid key.",
                headers={
                    "retry-after": str(max(1, math.ceil(wait))),
                    "x-should-retry": "false",  # the SDKs would retry it silently
                },
            )

    def locked_for(self, address: str | None, credential: str | None = None) -> float | None:
        """Seconds until the credential may be tried from `address`, or None when it may now."""
        entry = self._failures.get(address or "")
        if entry is None:
            return None
        wait = entry.since + self._window - self._clock()
        if wait <= 0:
            return None
        is_locked = entry.count >= self._limit * ADDRESS_FACTOR
        is_locked = is_locked or entry.by_prefix.get(_prefix(credential), 0) >= self._limit
        if not is_locked or self._is_known(address or "", credential):
            return None
        return wait

    def failed(self, address: str | None, credential: str | None = None) -> None:
        """Count one failed authentication from `address` with `credential`."""
        self._on_failure("refused")
        now, address, prefix = self._clock(), address or "", _prefix(credential)
        entry = self._failures.pop(address, None)
        if entry is None or now - entry.since >= self._window:
            entry = _Failures(since=now)
        entry.count += 1
        entry.by_prefix[prefix] = entry.by_prefix.get(prefix, 0) + 1
        self._failures[address] = entry  # most recent last
        # One line per failure: at most `failures` per window per prefix, then 429s.
        log.warning(
            "failed authentication from %s (%d of %d allowed in %g s with keys beginning "
            "alike, %d of %d in all)",
            address or "an unknown address",
            entry.by_prefix[prefix],
            self._limit,
            self._window,
            entry.count,
            self._limit * ADDRESS_FACTOR,
        )
        while len(self._failures) > self._max_addresses:
            self._failures.popitem(last=False)

    def accepted(self, address: str | None, credential: str | None) -> None:
        """Remember that `credential` was accepted from `address` (a few per address)."""
        if credential is None:
            return
        address = address or ""
        known = self._known.get(address)
        if known is None:
            known = self._known[address] = OrderedDict()
            while len(self._known) > self._max_addresses:
                self._known.popitem(last=False)
        else:
            self._known.move_to_end(address)
        fingerprint = self._fingerprint(credential)
        if fingerprint in known:
            return
        known[fingerprint] = None
        if len(known) > KNOWN_PER_ADDRESS:
            known.popitem(last=False)

    def _is_known(self, address: str, credential: str | None) -> bool:
        known = self._known.get(address)
        return (
            credential is not None
            and known is not None
            and (self._fingerprint(credential) in known)
        )

    def _fingerprint(self, credential: str) -> bytes:
        # The salt as a prefix, not BLAKE2's key parameter: a keyed hasher costs twice as much
        # to set up (0.8 against 0.4 us, on every accepted request), and BLAKE2 over salt and
        # credential is as unguessable without the salt (it has no length extension).
        return hashlib.blake2b(self._salt + sent(credential), digest_size=16).digest()


def _ip(address: str) -> IP | None:
    """The address; an IPv4 one as a dual-stack socket names it (`::ffff:10.0.0.1`) as IPv4,
    so an IPv4 CIDR of TRUSTED_PROXIES holds it and its client is counted once."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    return (ip.ipv4_mapped or ip) if isinstance(ip, ipaddress.IPv6Address) else ip


def _network(address: str) -> str:
    """An address, with or without a port: IPv4 as it is, IPv6 as its /64."""
    ip = _hop_ip(address)
    if ip is None:
        return address
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip)
    return f"{ipaddress.IPv6Address(int(ip) >> 64 << 64)}/64"


def _hop_ip(hop: str) -> IP | None:
    """An X-Forwarded-For entry's address, as load balancers write it: `198.51.100.7`,
    `2001:db8::1`, or with the client's port (`198.51.100.7:50123`, `[2001:db8::1]:443`,
    Azure's Application Gateway); None when it names none."""
    hop = hop.strip()
    if hop.startswith("["):
        end = hop.find("]")
        hop = hop[1:end] if end > 0 else ""
    elif hop.count(":") == 1:
        hop = hop[: hop.find(":")]
    return _ip(hop)


def _prefix(credential: str | None) -> str:
    return (credential or "")[:PREFIX_CHARS]
