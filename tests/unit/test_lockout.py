"""Failed authentications, at the Lockout: counted and throttled per client address and key prefix
(through the gateway: tests/app/test_lockout_gateway.py)."""

from __future__ import annotations

from typing import Any

import pytest
from multidict import CIMultiDict

from proxy.errors import GatewayError
from proxy.keys.lockout import Lockout
from proxy.settings import SettingError, Settings
from tests.conftest import (
    auth,
)
from tests.support.clock import Clock


def lockout(clock: Clock, outcomes: list[str], **changes: Any) -> Lockout:
    options: dict[str, Any] = {"failures": 3, "window_seconds": 60.0, "max_addresses": 100}
    options.update(changes)
    return Lockout(on_failure=outcomes.append, clock=clock, **options)


def test_an_address_is_refused_after_its_failures_until_the_window_ends() -> None:
    clock, outcomes = Clock(), []
    door = lockout(clock, outcomes)
    for _ in range(3):
        door.check("10.0.0.1")
        door.failed("10.0.0.1")
    with pytest.raises(GatewayError) as refused:
        door.check("10.0.0.1")
    assert refused.value.status == 429 and refused.value.headers["retry-after"] == "60"
    door.check("10.0.0.2")  # another address is not concerned
    clock.now += 59.0
    with pytest.raises(GatewayError):
        door.check("10.0.0.1")
    clock.now += 1.0
    door.check("10.0.0.1")  # the window has passed
    assert outcomes == ["refused"] * 3 + ["throttled"] * 2


def test_failures_spread_over_more_than_a_window_never_lock_out() -> None:
    clock, outcomes = Clock(), []
    door = lockout(clock, outcomes)
    for _ in range(10):
        door.failed("10.0.0.1")
        door.failed("10.0.0.1")
        clock.now += 61.0
        door.check("10.0.0.1")


def test_memory_is_bounded_by_forgetting_the_stalest_address() -> None:
    clock, outcomes = Clock(), []
    door = lockout(clock, outcomes, failures=1, max_addresses=100)
    door.failed("10.0.0.1")
    for n in range(5000):
        door.failed(f"192.168.{n // 256}.{n % 256}")
    assert len(door._failures) == 100
    door.check("10.0.0.1")  # forgotten: the stalest went first
    with pytest.raises(GatewayError):
        door.check("192.168.19.135")  # the latest is remembered


def test_the_key_is_not_looked_up_while_the_address_is_locked_out() -> None:
    class Ring:
        looked_up = 0

        def key_for(self, secret: str | None) -> Any:
            self.looked_up += 1
            raise GatewayError(401, "invalid_api_key", "no")

    clock, outcomes, ring = Clock(), [], Ring()
    door = lockout(clock, outcomes, failures=2)
    for _ in range(5):
        with pytest.raises(GatewayError):
            door.authenticate(ring, CIMultiDict(), "10.0.0.1")  # type: ignore[arg-type]
    assert ring.looked_up == 2


class Ring:
    """A key ring that knows one key."""

    def __init__(self, valid: str) -> None:
        self.valid = valid

    def key_for(self, secret: str | None) -> Any:
        if secret != self.valid:
            raise GatewayError(401, "invalid_api_key", "no")
        return self.valid


def test_a_stale_key_locks_only_keys_beginning_like_it_and_a_known_key_is_served() -> None:
    clock, outcomes = Clock(), []
    door = lockout(clock, outcomes, failures=3)
    ring = Ring("vk_live_bob_9f8e7d6c5b4a")
    nat = "203.0.113.9"
    assert door.authenticate(ring, CIMultiDict(auth(ring.valid)), nat)  # type: ignore[arg-type]
    for _ in range(10):  # a stale key, retried without end from the same address
        with pytest.raises(GatewayError):
            door.authenticate(ring, CIMultiDict(auth("vk_live_alice_0ld0ld0ld")), nat)  # type: ignore[arg-type]
    assert outcomes.count("refused") == 3  # then throttled, and not counted again
    assert door.authenticate(ring, CIMultiDict(auth(ring.valid)), nat)  # type: ignore[arg-type]
    other = Ring("vk_live_carol_1a2b3c4d5e")  # a client never seen before, another prefix
    assert door.authenticate(other, CIMultiDict(auth(other.valid)), nat)  # type: ignore[arg-type]


def test_many_keys_guessed_lock_the_address_for_every_key_not_accepted_there_before() -> None:
    clock, outcomes = Clock(), []
    door = lockout(clock, outcomes, failures=3)
    ring = Ring("vk_live_bob_9f8e7d6c5b4a")
    assert door.authenticate(ring, CIMultiDict(auth(ring.valid)), "10.0.0.1")  # type: ignore[arg-type]
    for n in range(12):  # 4 times the limit, each guess another prefix
        with pytest.raises(GatewayError):
            door.authenticate(ring, CIMultiDict(auth(f"vk_{n:04d}_guess_xxxx")), "10.0.0.1")  # type: ignore[arg-type]
    found = Ring("vk_live_dave_0a0b0c0d0e")  # a right guess is not even looked up
    with pytest.raises(GatewayError) as refused:
        door.authenticate(found, CIMultiDict(auth(found.valid)), "10.0.0.1")  # type: ignore[arg-type]
    assert refused.value.status == 429 and refused.value.headers["x-should-retry"] == "false"
    assert door.authenticate(ring, CIMultiDict(auth(ring.valid)), "10.0.0.1")  # type: ignore[arg-type]


class Peer:
    """What `client_address` reads of a request: its peer and its headers."""

    def __init__(self, remote: str, *forwarded: str) -> None:
        self.remote = remote
        self.headers = CIMultiDict(("X-Forwarded-For", value) for value in forwarded)


@pytest.mark.parametrize(
    ("peer", "client"),
    [
        (Peer("10.1.2.3", "198.51.100.7"), "198.51.100.7"),  # the ingress names the client
        (Peer("10.1.2.3", "6.6.6.6, 198.51.100.7"), "198.51.100.7"),  # a forged first hop
        (Peer("10.1.2.3", "198.51.100.7, 10.9.9.9"), "198.51.100.7"),  # two trusted hops
        (Peer("10.1.2.3", "198.51.100.7", "10.9.9.9"), "198.51.100.7"),  # as two headers
        (Peer("10.1.2.3"), "10.1.2.3"),  # no header: the proxy itself
        (Peer("192.0.2.1", "198.51.100.7"), "192.0.2.1"),  # not trusted: its header ignored
        (Peer("fd00::5", "2001:db8::1"), "2001:db8::/64"),  # an IPv6 client: its /64
        # As load balancers write them: with the client's port (Azure Application Gateway),
        # an IPv6 address in brackets, with or without one, in capitals, with spaces.
        (Peer("10.1.2.3", "198.51.100.7:50123"), "198.51.100.7"),
        (Peer("10.1.2.3", "[2001:db8::1]:443"), "2001:db8::/64"),
        (Peer("10.1.2.3", "[2001:DB8:0::1]"), "2001:db8::/64"),
        (Peer("10.1.2.3", "6.6.6.6,198.51.100.7:1 ,  10.9.9.9:8080 "), "198.51.100.7"),
        # What names no address (a proxy that hid it, garbage): the proxy is the client.
        (Peer("10.1.2.3", "198.51.100.7, unknown"), "10.1.2.3"),
        (Peer("10.1.2.3", "198.51.100.7, " + "x" * 9000), "10.1.2.3"),
        (Peer("10.1.2.3", "198.51.100.7,,"), "10.1.2.3"),
        (Peer("10.1.2.3", "[2001:db8::1"), "10.1.2.3"),
        # IPv4 as a dual-stack socket names it (IPv4-mapped IPv6): the IPv4 CIDR holds it.
        (Peer("::ffff:10.1.2.3", "198.51.100.7"), "198.51.100.7"),
        (Peer("10.1.2.3", "198.51.100.7, ::ffff:10.9.9.9"), "198.51.100.7"),
        (Peer("10.1.2.3", "[::ffff:198.51.100.7]:50123"), "198.51.100.7"),
    ],
)
def test_x_forwarded_for_names_the_client_only_behind_a_trusted_proxy(
    peer: Peer, client: str
) -> None:
    networks = Settings.from_env({"TRUSTED_PROXIES": "10.0.0.0/8, fd00::/8"}, []).trusted_proxies
    assert networks is not None
    door = Lockout(3, 60.0, lambda outcome: None, trusted_proxies=networks)
    assert door.client_address(peer) == client  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("peer", "client"),
    [
        (Peer("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64"),
        (Peer("198.51.100.7"), "198.51.100.7"),
        (Peer("::ffff:198.51.100.7"), "198.51.100.7"),
    ],
)
def test_a_peer_is_counted_by_its_address_and_an_ipv6_one_by_its_64(
    peer: Peer, client: str
) -> None:
    door = Lockout(3, 60.0, lambda outcome: None)
    assert door.client_address(peer) == client  # type: ignore[arg-type]


def test_trusted_proxies_that_do_not_parse_stop_the_start() -> None:
    with pytest.raises(SettingError, match="TRUSTED_PROXIES.*'10.0.0.0/33'"):
        Settings.from_env({"TRUSTED_PROXIES": "10.0.0.1,10.0.0.0/33"}, [])


def test_what_ipv6_addresses_are_counted_as_is_remembered_within_the_bound() -> None:
    door = Lockout(3, 60.0, lambda outcome: None, max_addresses=10)
    for n in range(1, 26):  # an attacker rotating addresses
        assert door.client_address(Peer(f"2001:db8:0:{n:x}::1")) == f"2001:db8:0:{n:x}::/64"  # type: ignore[arg-type]
        assert len(door._names) <= 10
