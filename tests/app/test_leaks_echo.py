"""No secret leaves a gateway in front of a provider that echoes the credentials it was sent:
neither its response headers nor the interaction log carry one (the whole-process search of
everything a gateway writes is tests/process/test_leaks.py)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from tests.conftest import ANTHROPIC_VK, AZURE_VK, CUSTOM_VK, OPENAI_VK, SECRETS, auth
from tests.support.bodies import CHAT, MESSAGES
from tests.support.fake_provider import FakeState


async def test_a_provider_that_echoes_the_real_key_hands_it_to_no_client_and_no_log(
    make_gateway: Callable[..., Awaitable[TestClient]],
    fake: FakeState,
    log_path: Path,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    gateway = await make_gateway(LOG_BODIES="true")
    cases = [
        ("/v1/chat/completions", auth(OPENAI_VK), CHAT, {}),
        ("/v1/chat/completions", auth(OPENAI_VK), {**CHAT, "stream": True}, {}),
        ("/v1/chat/completions", auth(AZURE_VK), CHAT, {}),
        ("/v1/chat/completions", auth(CUSTOM_VK), CHAT, {}),
        ("/v1/messages", {"x-api-key": ANTHROPIC_VK}, MESSAGES, {}),
        ("/v1/chat/completions", auth(OPENAI_VK), CHAT, {"x-fake-status": "401"}),
        ("/v1/messages", {"x-api-key": ANTHROPIC_VK}, MESSAGES, {"x-fake-status": "401"}),
    ]
    for path, credential, body, extra in cases:
        response = await gateway.post(
            path, json=body, headers={**credential, **extra, "x-fake-reflect": "body"}
        )
        await response.read()
        assert response.status in (200, 401)
        # The provider did echo it: the gateway dropped those headers, kept the others.
        assert "x-echo-authorization" not in response.headers
        assert "x-echo-x-api-key" not in response.headers
        assert "x-echo-api-key" not in response.headers
        assert "x-echo-x-goog-api-key" not in response.headers
        assert "x-debug-request" not in response.headers
        assert "x-request-id" in response.headers and "content-type" in response.headers
        headers = json.dumps(list(response.headers.items()))
        for secret in SECRETS:
            assert secret not in headers, f"{secret!r} in the headers of {path} {extra}"
    credentials = ("authorization", "x-api-key", "api-key", "x-goog-api-key")
    assert all(any(name in seen.headers for name in credentials) for seen in fake.requests)
    lines = await records(len(cases))
    assert len(lines) == len(cases)
    errors = [line["response"] for line in lines if line["status"] == 401]
    assert errors and all("[redacted]" in json.dumps(error) for error in errors)
    text = log_path.read_text()
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} leaked into the log"
