"""Breakers judge the provider, not one client (issue 22, point 6): two virtual keys share a
primary and its fallback. One key's requests that outlast REQUEST_TIMEOUT, or whose streams
the provider cuts, leave the other on its primary; requests of both failing so open the
primary's breaker."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient

from proxy.app import FAILOVER, build_app
from proxy.settings import Settings
from tests.support.bodies import chat
from tests.support.clock import Clock
from tests.support.fake_provider import FakeState, credential

KEY_A = "vk_test_breaker_a_5d7f9b1c3e"
KEY_B = "vk_test_breaker_b_8e0a2c4f6d"
PRIMARY = "sk-breaker-primary-1111111111"
BACKUP = "sk-breaker-backup-2222222222"  # priced far higher, in the story
BODY = chat("hello", max_tokens=16)
Records = Callable[..., Awaitable[list[dict[str, Any]]]]


def target(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "provider": "openai",
        "api_key": PRIMARY,
        "fallbacks": [{"provider": "backup", "api_key": BACKUP}],
    }


@pytest.fixture
async def gateway(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    tmp_path: Path,
    fake_base: str,
    log_path: Path,
) -> TestClient:
    path = tmp_path / "keys.json"
    document = {
        "providers": {
            "openai": {"base_url": f"{fake_base}/v1"},
            "backup": {"base_url": f"{fake_base}/v1"},
        },
        "virtual_keys": {KEY_A: target("a"), KEY_B: target("b")},
    }
    path.write_text(json.dumps(document))
    settings = Settings.from_env(
        {
            "KEYS_FILE_PATH": str(path),
            "LOG_TO_FILE": "true",
            "LOG_FILE_PATH": str(log_path),
            "REQUEST_TIMEOUT": "1.0",  # an ordinary answer on a loaded machine is well within it
        }
    )
    client = await aiohttp_client(build_app(settings), server_kwargs={"handler_cancellation": True})
    client.app[FAILOVER].breakers.clock = Clock()  # no cooldown passes unless a test says so
    return client


async def times_out(gateway: TestClient, key: str) -> None:
    sdk = openai.AsyncOpenAI(api_key=key, base_url=str(gateway.make_url("/v1")), max_retries=0)
    with pytest.raises(openai.InternalServerError) as raised:
        await sdk.chat.completions.create(**BODY, extra_headers={"x-fake-hang": "headers"})
    assert raised.value.status_code == 504


async def is_cut(gateway: TestClient, key: str) -> None:
    """A stream the provider cuts after its first events (a cut after the request went)."""
    sdk = openai.AsyncOpenAI(api_key=key, base_url=str(gateway.make_url("/v1")), max_retries=0)
    stream = await sdk.chat.completions.create(
        **BODY, stream=True, extra_headers={"x-fake-drop": "midstream", "x-fake-chunks": "6"}
    )
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass


async def served_by(gateway: TestClient, fake: FakeState, key: str) -> str | None:
    """The real key of the target that answered `key`'s ordinary request."""
    fake.requests.clear()
    sdk = openai.AsyncOpenAI(api_key=key, base_url=str(gateway.make_url("/v1")), max_retries=0)
    answer = await sdk.chat.completions.create(**BODY)
    assert answer.choices[0].message.content == "tok0 tok1 tok2 "
    (seen,) = fake.requests
    return credential(seen.headers)


async def breaker_state(gateway: TestClient) -> str:
    health = await (await gateway.get("/health")).json()
    return str(health["targets"]["openai"]["state"])


async def test_three_timeouts_of_one_key_leave_the_other_key_on_its_primary(
    gateway: TestClient, fake: FakeState
) -> None:
    for _ in range(3):
        await times_out(gateway, KEY_A)
    assert await served_by(gateway, fake, KEY_B) == PRIMARY
    assert await breaker_state(gateway) == "closed"
    for _ in range(3):  # however many: one client cannot open it
        await times_out(gateway, KEY_A)
    assert await served_by(gateway, fake, KEY_B) == PRIMARY
    assert await served_by(gateway, fake, KEY_A) == PRIMARY


async def test_timeouts_of_two_keys_open_the_breaker(gateway: TestClient, fake: FakeState) -> None:
    await times_out(gateway, KEY_A)
    await times_out(gateway, KEY_B)
    assert await breaker_state(gateway) == "closed"  # two failures so far: A's and B's
    await times_out(gateway, KEY_A)
    assert await breaker_state(gateway) == "open"
    assert await served_by(gateway, fake, KEY_B) == BACKUP


async def test_streams_of_one_key_cut_by_the_provider_leave_the_breaker_closed(
    gateway: TestClient, fake: FakeState, records: Records
) -> None:
    # Each answers 200, then is cut: half the attempts failed, past BREAKER_MIN_REQUESTS
    # (20) at BREAKER_ERROR_RATIO (0.5), had they counted.
    for _ in range(12):
        await is_cut(gateway, KEY_A)
    await records(12)  # every settle ran (the log line is written after the breaker's report)
    assert await breaker_state(gateway) == "closed"
    assert await served_by(gateway, fake, KEY_B) == PRIMARY


async def test_streams_of_two_keys_cut_by_the_provider_open_the_breaker(
    gateway: TestClient, fake: FakeState, records: Records
) -> None:
    for _ in range(6):
        await is_cut(gateway, KEY_A)
        await is_cut(gateway, KEY_B)
    await records(12)
    assert await breaker_state(gateway) == "open"
    assert await served_by(gateway, fake, KEY_B) == BACKUP
