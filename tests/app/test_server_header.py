"""The gateway's own answers name it and no Python or aiohttp version (an operator exposing it
should not advertise what to attack)."""

from __future__ import annotations

from aiohttp.test_utils import TestClient

from tests.conftest import OPENAI_VK, auth
from tests.support.bodies import CHAT


async def test_the_gateway_s_own_answers_name_no_python_or_aiohttp_version(
    gateway: TestClient,
) -> None:
    answers = [
        await gateway.get("/health"),
        await gateway.get("/ready"),
        await gateway.get("/metrics"),
        await gateway.get("/usage", headers=auth(OPENAI_VK)),
        await gateway.post("/v1/chat/completions", json=CHAT),  # 401
        await gateway.post("/v1/chat/completions", json={"model": 1}, headers=auth(OPENAI_VK)),
    ]
    for answer in answers:
        assert answer.headers.get("Server") == "llm-gateway", (answer.status, answer.headers)
