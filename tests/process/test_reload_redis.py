"""Reloading keys.json with quotas on Redis: a rotated key keeps its window under its name and a
raised limit applies at once, as it does on the memory tracker (tests/app/test_reload.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp.test_utils import TestClient

from tests.app.test_reload import TOKEN, rotate_and_raise_the_limited_key


async def test_a_rotated_key_keeps_its_window_on_redis_and_a_raised_limit_applies_at_once(
    make_gateway: Callable[..., Awaitable[TestClient]], keys_file: Path, redis_url: str
) -> None:
    gateway = await make_gateway(ADMIN_TOKEN=TOKEN, REDIS_URL=redis_url)
    await rotate_and_raise_the_limited_key(gateway, keys_file)
