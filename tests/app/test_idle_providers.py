"""Providers that close idle keep-alive connections sooner than the gateway would keep them
(uvicorn's and Node.js's 5 s against KEEPALIVE 30 s), driven through a gateway with steady
requests at intervals around that time; the loop's clock is moved, nothing sleeps."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import auth
from tests.support.clock import LoopClock
from tests.support.idle_closing import IdleClosing

VK = "vk_test_idle_closing_5e6f7a"


@pytest.fixture
async def node_like() -> AsyncIterator[IdleClosing]:
    provider = IdleClosing(idle=5, hint=True)
    await provider.start()
    yield provider
    await provider.close()


async def test_steady_posts_to_a_provider_that_says_its_idle_timeout_never_get_502(
    node_like: IdleClosing,
    tmp_path: Path,
    make_gateway: Callable[..., Awaitable[TestClient]],
    loop_clock: LoopClock,
) -> None:
    """A POST on a connection the provider closes as it is written was answered 502 ("closed
    the connection before answering"): it is never sent again, the provider may have read
    it. Told `Keep-Alive: timeout=5`, the gateway leaves such a connection before then."""
    keys = {
        "providers": {"node": {"base_url": f"{node_like.url}/v1", "auth": "none"}},
        "virtual_keys": {VK: {"provider": "node", "api_key": "none", "name": "node"}},
    }
    path = tmp_path / "idle-keys.json"
    path.write_text(json.dumps(keys))
    gateway = await make_gateway(KEYS_FILE_PATH=str(path))
    waits = (0.0, 3.5, 4.5, 5.0, 5.5, 6.0, 4.0, 3.0, 4.9)
    for n, waited in enumerate(waits):
        loop_clock.advance(waited)
        response = await gateway.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": f"request {n}"}]},
            headers=auth(VK),
        )
        assert response.status == 200, (waited, await response.text())
        await response.read()
    assert node_like.dropped == 0
    bodies = [json.loads(body)["messages"][0]["content"] for _, body in node_like.answered]
    assert bodies == [f"request {n}" for n in range(len(waits))]  # each once, none again
