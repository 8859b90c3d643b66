"""Shared fixtures: the fake provider, a keys file pointing at it, settings, the gateway, its log."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from proxy.app import build_app
from proxy.settings import Settings
from tests.support.clock import LoopClock
from tests.support.fake_provider import FAKE_STATE, FakeState, build_fake_provider
from tests.support.processes import Processes, start_fake_provider

# Fixtures that live beside what they serve: a real redis-server (redis_server, redis_url,
# raw_redis) and the OTLP receiver (receiver, received).
pytest_plugins = ["tests.support.redis_server", "tests.support.otlp_receiver"]

# Every secret of the test keys file: no output of the gateway may ever contain one.
OPENAI_VK = "vk_test_openai_4f7a9c2e1b"
ANTHROPIC_VK = "vk_test_anthropic_8d3e6f0a2c"
LIMITED_VK = "vk_test_limited_5b1c7e9d3f"
RESTRICTED_VK = "vk_test_restricted_2a6d8f4e0b"
CUSTOM_VK = "vk_test_custom_9e2f4a6c8d"
AZURE_VK = "vk_test_azure_1c3e5a7b9d"
OPENAI_REAL = "sk-real-openai-0123456789abcdef"
ANTHROPIC_REAL = "sk-ant-real-anthropic-fedcba9876543210"
LIMITED_REAL = "sk-real-limited-5555555555"
RESTRICTED_REAL = "sk-ant-real-restricted-7777777777"
CUSTOM_REAL = "custom-real-key-3333333333"
AZURE_REAL = "azure-real-key-4444444444"
ENV_REAL = "sk-real-from-env-6666666666"
SECRETS = (
    OPENAI_VK,
    ANTHROPIC_VK,
    LIMITED_VK,
    RESTRICTED_VK,
    CUSTOM_VK,
    AZURE_VK,
    OPENAI_REAL,
    ANTHROPIC_REAL,
    LIMITED_REAL,
    RESTRICTED_REAL,
    CUSTOM_REAL,
    AZURE_REAL,
    ENV_REAL,
)


def keys_document(base: str) -> dict[str, Any]:
    """A keys.json whose providers all point at the fake provider at `base`."""
    return {
        "providers": {
            "openai": {"base_url": f"{base}/v1"},
            "anthropic": {"base_url": f"{base}/v1"},
            "azure": {"base_url": f"{base}/v1"},
            "local": {"base_url": f"{base}/v1", "auth": "x-goog-api-key"},
        },
        "virtual_keys": {
            OPENAI_VK: {"provider": "openai", "api_key": OPENAI_REAL},
            ANTHROPIC_VK: {
                "provider": "anthropic",
                "api_key": ANTHROPIC_REAL,
                "name": "team-anthropic",
            },
            LIMITED_VK: {
                "provider": "openai",
                "api_key": LIMITED_REAL,
                "name": "limited",
                "quota": {"requests": 3, "window_seconds": 3600},
            },
            RESTRICTED_VK: {
                "provider": "anthropic",
                "api_key": RESTRICTED_REAL,
                "name": "restricted",
                "allowed_models": ["claude-3-5-haiku-*", "claude-sonnet-4-*"],
            },
            CUSTOM_VK: {"provider": "local", "api_key": CUSTOM_REAL, "name": "custom"},
            AZURE_VK: {"provider": "azure", "api_key": AZURE_REAL, "name": "azure"},
        },
    }


@pytest.fixture
async def fake_provider(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> TestServer:
    return await aiohttp_server(build_fake_provider())


@pytest.fixture
def fake(fake_provider: TestServer) -> FakeState:
    """What the fake provider observed."""
    return fake_provider.app[FAKE_STATE]


@pytest.fixture
def fake_base(fake_provider: TestServer) -> str:
    return str(fake_provider.make_url("")).rstrip("/")


@pytest.fixture
def keys_file(tmp_path: Path, fake_base: str) -> Path:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(keys_document(fake_base)))
    return path


@pytest.fixture
async def loop_clock() -> AsyncIterator[LoopClock]:
    """The running loop's clock, which the test moves on (`advance`): idle times pass at once."""
    clock = LoopClock(asyncio.get_running_loop())
    yield clock
    clock.restore()


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "interactions.jsonl"


@pytest.fixture
def settings(keys_file: Path, log_path: Path) -> Callable[..., Settings]:
    """A factory: Settings for the test keys file, logging to a file, plus any overrides."""

    def make(**env: str) -> Settings:
        base = {
            "KEYS_FILE_PATH": str(keys_file),
            "LOG_TO_FILE": "true",
            "LOG_FILE_PATH": str(log_path),
        }
        return Settings.from_env({**base, **env})

    return make


@pytest.fixture
def make_gateway(
    aiohttp_client: Callable[..., Awaitable[TestClient]], settings: Callable[..., Settings]
) -> Callable[..., Awaitable[TestClient]]:
    """A factory: a gateway test client with these setting overrides."""

    async def make(**env: str) -> TestClient:
        app = build_app(settings(**env))
        return await aiohttp_client(app, server_kwargs={"handler_cancellation": True})

    return make


@pytest.fixture
async def gateway(make_gateway: Callable[..., Awaitable[TestClient]]) -> TestClient:
    return await make_gateway()


@pytest.fixture
def gateway_with_keys(
    tmp_path: Path, fake_base: str, make_gateway: Callable[..., Awaitable[TestClient]]
) -> Callable[..., Awaitable[TestClient]]:
    """A factory: a gateway whose keys file is the test one plus these virtual keys (secret to
    entry), priced by `prices` when given, with these setting overrides. Each call writes its
    own files, so two gateways of one test never share a keys file by accident."""
    written = itertools.count()

    async def make(
        keys: dict[str, dict[str, Any]], prices: dict[str, Any] | None = None, **env: str
    ) -> TestClient:
        number = next(written)
        document = keys_document(fake_base)
        document["virtual_keys"].update(keys)
        path = tmp_path / f"keys-{number}.json"
        path.write_text(json.dumps(document))
        if prices is not None:
            prices_path = tmp_path / f"prices-{number}.json"
            prices_path.write_text(json.dumps(prices))
            env = {"PRICES_FILE": str(prices_path), **env}
        return await make_gateway(KEYS_FILE_PATH=str(path), **env)

    return make


@pytest.fixture
def records(log_path: Path) -> Callable[..., Awaitable[list[dict[str, Any]]]]:
    """Read the interaction log, waiting (bounded) until it holds at least `count` lines."""

    async def read(count: int = 1, timeout: float = 3.0) -> list[dict[str, Any]]:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            lines = log_path.read_text().splitlines() if log_path.exists() else []
            if len(lines) >= count or asyncio.get_running_loop().time() > deadline:
                return [json.loads(line) for line in lines]
            await asyncio.sleep(0.01)

    return read


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_openai_error(body: dict[str, Any], code: str) -> None:
    """The OpenAI error shape, with this code."""
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["code"] == code, error


def assert_anthropic_error(body: dict[str, Any], kind: str) -> None:
    """The Anthropic error shape, with this type."""
    assert body.get("type") == "error", body
    assert set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == kind, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


# --- real processes (tests/support/processes.py) ---


@pytest.fixture
def processes() -> Iterator[Processes]:
    running = Processes()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def fake_url(processes: Processes) -> str:
    """The fake provider as a process of its own."""
    return start_fake_provider(processes)


@pytest.fixture
def process_keys(tmp_path: Path, fake_url: str) -> Path:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(keys_document(fake_url)))
    return path


# --- levels: each test is marked by the folder it lives in (pytest -m unit, -m "unit or app"),
# unless it names its level itself: the tracker's parity suite (tests/process/test_tracker.py)
# marks its memory runs unit, so `make unit` runs them without a redis-server.
LEVELS = ("unit", "app", "process", "deploy")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        level = item.path.parent.name
        named = any(mark.name in LEVELS for mark in item.iter_markers())
        if level in LEVELS and not named:
            item.add_marker(getattr(pytest.mark, level))
