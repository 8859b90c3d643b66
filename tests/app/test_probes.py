"""Probes that cost nothing (PROBE_INTERVAL_SECONDS), against the fake provider.

A key's primary fails (the fake answers its real key 503, `FakeState.faults`) until its
breaker opens; the breakers' clock stands still (`Clock`), so no cooldown ever passes and
no client's request can be the half-open probe: only a probe can close the breaker. The
interval is tiny and the tests wait on `Probes.round_ended`, never on time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from yarl import URL

from proxy.app import FAILOVER, PROBES, build_app
from proxy.settings import Settings
from proxy.upstream.breaker import OPEN, BreakerPolicy, Breakers
from proxy.upstream.probes import Probes
from proxy.upstream.providers import BUILTINS, Provider
from proxy.upstream.targets import Credential, Pool, Target
from proxy.upstream.wire import Wire
from tests.conftest import auth
from tests.support.bodies import chat, messages
from tests.support.clock import Clock
from tests.support.fake_provider import FakeState, Fault, credential
from tests.support.polling import until

CHAT = chat("hello")
VK = "vk_test_probes_7b9d1f3a5c"
OTHER_VK = "vk_test_probes_other_2e4a6c8b0d"
PRIMARY = "sk-probe-primary-1111111111"
BACKUP = "sk-probe-backup-2222222222"
ANT_PRIMARY = "sk-ant-probe-primary-3333333333"
ANT_BACKUP = "sk-ant-probe-backup-4444444444"
TINY = "0.005"  # seconds between rounds: the tests wait on rounds, not on this

WITH_FALLBACK = {
    "provider": "openai",
    "api_key": PRIMARY,
    "fallbacks": [{"provider": "backup", "api_key": BACKUP}],
}


@pytest.fixture
def probing_gateway(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    tmp_path: Path,
    fake_base: str,
    log_path: Path,
) -> Callable[..., Awaitable[TestClient]]:
    """A gateway with these keys (virtual key → entry), its breakers on a clock that stands
    still, and these setting overrides."""

    async def make(keys: dict[str, dict[str, Any]], **env: str) -> TestClient:
        path = tmp_path / "keys.json"
        document = {
            "providers": {
                "openai": {"base_url": f"{fake_base}/v1"},
                "backup": {"base_url": f"{fake_base}/v1"},
                "anthropic": {"base_url": f"{fake_base}/v1"},
                "ant-backup": {
                    "base_url": f"{fake_base}/v1",
                    "auth": "x-api-key",
                    "api": "anthropic",
                },
            },
            "virtual_keys": keys,
        }
        path.write_text(json.dumps(document))
        interval = env.pop("PROBE_INTERVAL_SECONDS", None)
        settings = Settings.from_env(
            {
                "KEYS_FILE_PATH": str(path),
                "LOG_TO_FILE": "true",
                "LOG_FILE_PATH": str(log_path),
                "QUOTA_ENABLED": "false",
            }
            | env
        )
        if interval is not None:  # below the setting's floor (1 s): the tests wait on rounds
            settings = dataclasses.replace(settings, probe_interval_seconds=float(interval))
        gateway = await aiohttp_client(
            build_app(settings), server_kwargs={"handler_cancellation": True}
        )
        gateway.app[FAILOVER].breakers.clock = Clock()  # no cooldown passes by itself
        return gateway

    return make


def posts(fake: FakeState) -> list[str | None]:
    return [credential(seen.headers) for seen in fake.requests if seen.method == "POST"]


def gets(fake: FakeState) -> list[str]:
    return [seen.path for seen in fake.requests if seen.method == "GET"]


async def open_breaker(gateway: TestClient, fake: FakeState, vk: str, real: str) -> None:
    """The primary answers 503 until three requests opened its breaker; the fallback serves."""
    fake.faults[real] = Fault(503)
    for _ in range(3):
        response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(vk))
        assert response.status == 200  # the fallback's answer
        await response.read()
    assert await state(gateway, "openai") == OPEN


async def a_round(gateway: TestClient) -> None:
    """Wait until a round of probes that starts from now has ended (bounded: fails, not hangs)."""
    await asyncio.wait_for(gateway.app[PROBES].round_ended(), 5)


async def state(gateway: TestClient, target: str) -> str:
    health = await (await gateway.get("/health")).json()
    return str(health["targets"][target]["state"])


async def test_an_open_breaker_is_probed_by_get_models_and_closes_without_a_client_request(
    probing_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState, records: Any
) -> None:
    gateway = await probing_gateway(
        {VK: {"name": "probed", **WITH_FALLBACK}}, PROBE_INTERVAL_SECONDS=TINY
    )
    await open_breaker(gateway, fake, VK, PRIMARY)
    fake.requests.clear()
    del fake.faults[PRIMARY]  # the outage ends; no client sends anything meanwhile
    await a_round(gateway)
    assert await state(gateway, "openai") == "closed"  # closed by the probe alone
    assert posts(fake) == []  # nothing that generates: not one POST
    probes = [seen for seen in fake.requests if seen.method == "GET"]
    assert probes and {seen.path for seen in probes} == {"/v1/models"}
    assert {credential(seen.headers) for seen in probes} == {PRIMARY}  # the target's own key
    assert all(seen.body == b"" for seen in probes)
    fake.requests.clear()
    response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
    assert response.status == 200
    assert posts(fake) == [PRIMARY]  # the next client request goes to the primary again
    metrics = await (await gateway.get("/metrics")).text()
    assert 'llm_gateway_probes_total{result="ok",target="openai"}' in metrics
    # A probe is no client's request: four log lines, the client's POSTs, none of them a probe.
    lines = await records(4)
    assert [line["path"] for line in lines] == ["/v1/chat/completions"] * 4
    assert all(PRIMARY not in json.dumps(line) for line in lines)


async def test_an_anthropic_target_is_probed_with_x_api_key_and_anthropic_version(
    probing_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    key = {
        "name": "claude",
        "provider": "anthropic",
        "api_key": ANT_PRIMARY,
        "fallbacks": [{"provider": "ant-backup", "api_key": ANT_BACKUP}],
    }
    gateway = await probing_gateway({VK: key}, PROBE_INTERVAL_SECONDS=TINY)
    fake.faults[ANT_PRIMARY] = Fault(529)
    body = messages(model="claude-haiku-4-5")
    for _ in range(3):
        response = await gateway.post("/v1/messages", json=body, headers={"x-api-key": VK})
        assert response.status == 200
    assert await state(gateway, "anthropic") == OPEN
    fake.requests.clear()
    del fake.faults[ANT_PRIMARY]
    await a_round(gateway)
    assert await state(gateway, "anthropic") == "closed"
    probe = next(seen for seen in fake.requests if seen.method == "GET")
    assert probe.path == "/v1/models"
    assert probe.headers["x-api-key"] == ANT_PRIMARY and "authorization" not in probe.headers
    assert probe.headers["anthropic-version"] == "2023-06-01"
    assert posts(fake) == []


async def test_a_failing_probe_keeps_the_breaker_open_for_another_cooldown(
    probing_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    gateway = await probing_gateway(
        {VK: {"name": "probed", **WITH_FALLBACK}}, PROBE_INTERVAL_SECONDS=TINY
    )
    clock = gateway.app[FAILOVER].breakers.clock
    assert isinstance(clock, Clock)
    await open_breaker(gateway, fake, VK, PRIMARY)  # the fault stays: probes get 503 too
    clock.advance(29)  # a second before the cooldown would let a client's request through
    await a_round(gateway)
    clock.advance(2)  # 31 s since it opened, 2 s since the probe failed
    assert await state(gateway, "openai") == OPEN
    fake.requests.clear()
    response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
    assert response.status == 200
    assert posts(fake) == [BACKUP]  # not admitted: the failed probe began another cooldown
    health = await (await gateway.get("/health")).json()
    why = health["targets"]["openai"]["last_error"]
    assert why.startswith("probe: 503 from provider 'openai'")
    assert PRIMARY not in json.dumps(health)
    metrics = await (await gateway.get("/metrics")).text()
    assert 'llm_gateway_probes_total{result="failed",target="openai"}' in metrics
    assert PRIMARY not in metrics


async def test_no_probe_is_sent_when_the_interval_is_zero_the_default(
    probing_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    gateway = await probing_gateway({VK: {"name": "probed", **WITH_FALLBACK}})
    assert not gateway.app[PROBES].is_running  # no task at all
    await open_breaker(gateway, fake, VK, PRIMARY)
    del fake.faults[PRIMARY]
    for _ in range(20):
        response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
        await response.read()
    assert gets(fake) == []
    assert posts(fake)[-20:] == [BACKUP] * 20  # open until a client's request is the probe
    assert await state(gateway, "openai") == OPEN


async def test_no_probe_is_sent_while_every_breaker_is_closed(
    probing_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    gateway = await probing_gateway(
        {VK: {"name": "probed", **WITH_FALLBACK}}, PROBE_INTERVAL_SECONDS=TINY
    )
    assert gateway.app[PROBES].is_running
    for _ in range(3):
        response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
        await response.read()
        await a_round(gateway)
    assert gets(fake) == []
    assert "llm_gateway_probes_total{" not in await (await gateway.get("/metrics")).text()


async def test_probes_stop_at_shutdown_a_probe_in_flight_with_them(
    probing_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    gateway = await probing_gateway(
        {VK: {"name": "probed", **WITH_FALLBACK}}, PROBE_INTERVAL_SECONDS=TINY
    )
    await open_breaker(gateway, fake, VK, PRIMARY)
    del fake.faults[PRIMARY]
    fake.slow[PRIMARY] = 3600.0  # the next probe hangs before its answer
    await until(lambda: fake.open_now == 1, what="a probe in flight")
    probes = gateway.app[PROBES]
    await asyncio.wait_for(gateway.close(), 10)  # not held by the hanging probe
    assert not probes.is_running
    await until(lambda: fake.disconnects != [], what="the probe in flight cut")


async def test_when_every_target_is_open_a_client_request_still_tries_the_least_recently_failed(
    probing_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    gateway = await probing_gateway(
        {VK: {"name": "probed", **WITH_FALLBACK}}, PROBE_INTERVAL_SECONDS=TINY
    )
    fake.faults[PRIMARY] = fake.faults[BACKUP] = Fault(503)
    for _ in range(3):  # both fail: both breakers open
        response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
        assert response.status == 503
    assert await state(gateway, "openai") == await state(gateway, "backup") == OPEN
    await a_round(gateway)  # probes failed too, and still open
    assert await state(gateway, "openai") == await state(gateway, "backup") == OPEN
    fake.requests.clear()
    response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
    assert response.status == 503  # a provider's answer, not a refusal without an attempt
    assert len(posts(fake)) == 1


# --- one round, directly: which probes go out ----------------------------------------


def target(name: str, provider: Provider, *keys: str, model: str | None = None) -> Target:
    pool = Pool([Credential(k, f"{name}#{i + 1}") for i, k in enumerate(keys)])
    return Target(name, provider, pool, model)


async def test_targets_sharing_an_origin_and_a_key_get_one_probe_and_a_pool_one_per_round(
    fake_base: str, fake: FakeState
) -> None:
    openai = Provider("openai", URL(f"{fake_base}/v1"), "bearer")
    bedrock = BUILTINS["bedrock"]
    pooled = ("sk-pool-a-1111111111", "sk-pool-b-2222222222", "sk-pool-c-3333333333")
    targets = [
        target("openai", openai, PRIMARY),
        target("openai", openai, PRIMARY),  # another virtual key's target of that name
        target("openai/gpt-4o-mini", openai, PRIMARY, model="gpt-4o-mini"),
        target("pooled", openai, *pooled),
        target("bedrock", bedrock, "unused"),  # a signed cloud: never probed
        target("healthy", openai, BACKUP),
    ]
    breakers = Breakers([t.name for t in targets], BreakerPolicy(failures_in_a_row=1), Clock())
    for name in ("openai", "openai/gpt-4o-mini", "pooled", "bedrock"):
        breakers[name].failed(breakers.clock(), "503")
    results: list[tuple[str, str]] = []
    probes = Probes(
        breakers=breakers,
        targets=lambda: targets,
        interval_seconds=0,
        on_probed=lambda name, result: results.append((name, result)),
    )
    fake.faults[pooled[0]] = Fault(503)
    wire = Wire(connect_timeout=5)
    try:
        await probes.probe_round(wire)
        seen = sorted(str(credential(s.headers)) for s in fake.requests)
        assert seen == sorted([PRIMARY, pooled[0]])  # one per origin and key; bedrock none
        assert sorted(results) == [
            ("openai", "ok"),
            ("openai/gpt-4o-mini", "ok"),  # the same probe's answer, told to both breakers
            ("pooled", "failed"),
        ]
        assert breakers.not_closed() == ["pooled", "bedrock"]
        fake.requests.clear()
        await probes.probe_round(wire)  # another round: the pool's next key
        assert [credential(s.headers) for s in fake.requests] == [pooled[1]]
        assert breakers.not_closed() == ["bedrock"]
        assert all(s.method == "GET" and s.path == "/v1/models" for s in fake.requests)
    finally:
        await wire.close()


async def test_a_probe_answered_4xx_tells_the_breaker_nothing(
    fake_base: str, fake: FakeState
) -> None:
    openai = Provider("openai", URL(f"{fake_base}/v1"), "bearer")
    targets = [target("openai", openai, PRIMARY)]
    breakers = Breakers(["openai"], BreakerPolicy(failures_in_a_row=1), Clock())
    breakers["openai"].failed(breakers.clock(), "503")
    results: list[tuple[str, str]] = []
    probes = Probes(
        breakers=breakers,
        targets=lambda: targets,
        interval_seconds=0,
        on_probed=lambda name, result: results.append((name, result)),
    )
    wire = Wire(connect_timeout=5)
    try:
        for status in (401, 404, 429):
            fake.faults[PRIMARY] = Fault(status)
            await probes.probe_round(wire)
        assert results == [("openai", "inconclusive")] * 3
        assert breakers["openai"].state == OPEN and breakers["openai"].failures_in_a_row == 1
    finally:
        await wire.close()
