"""No real key and no full virtual key ever leaves the gateway: not in a response, a log line,
a metric, stdout or stderr. A real gateway process is driven through every kind of answer,
everything it wrote is collected, and every secret of the keys file is searched for."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import aiohttp
import anthropic
import openai

from tests.conftest import (
    ANTHROPIC_VK,
    AZURE_VK,
    CUSTOM_VK,
    LIMITED_VK,
    OPENAI_VK,
    RESTRICTED_VK,
    SECRETS,
)
from tests.support.bodies import CHAT, MESSAGES
from tests.support.processes import Processes, start_gateway


async def collect(session: aiohttp.ClientSession, method: str, url: str, **kwargs: object) -> str:
    async with session.request(method, url, **kwargs) as response:  # type: ignore[arg-type]
        received = bytearray()
        try:
            async for chunk in response.content.iter_any():
                received += chunk
        except aiohttp.ClientPayloadError:
            pass  # a stream the provider broke: what arrived still counts
        return json.dumps(list(response.headers.items())) + received.decode("utf-8", "replace")


async def test_no_secret_appears_in_anything_the_gateway_writes(
    processes: Processes,
    process_keys: Path,
    tmp_path: Path,  # noqa: F811
) -> None:
    log = tmp_path / "log.jsonl"
    process, url = start_gateway(
        processes,
        process_keys,
        log,
        LOG_BODIES="true",
        MAX_BODY_BYTES="4096",
        REQUEST_TIMEOUT="0.5",
        STREAM_IDLE_TIMEOUT="0.5",
    )
    seen: list[str] = []
    async with aiohttp.ClientSession() as session:
        for key in (OPENAI_VK, AZURE_VK, CUSTOM_VK, LIMITED_VK):
            for extra in (
                {},
                {"x-fake-status": "401"},
                {"x-fake-status": "500"},
                {"x-fake-hang": "headers"},
                {"x-fake-drop": "midstream"},
                {"x-fake-reflect": "headers"},
            ):
                headers = {"Authorization": f"Bearer {key}", **extra}
                seen.append(
                    await collect(
                        session, "POST", f"{url}/v1/chat/completions", json=CHAT, headers=headers
                    )
                )
                seen.append(
                    await collect(
                        session,
                        "POST",
                        f"{url}/v1/chat/completions",
                        json={**CHAT, "stream": True},
                        headers=headers,
                    )
                )
            seen.append(
                await collect(
                    session, "GET", f"{url}/usage", headers={"Authorization": f"Bearer {key}"}
                )
            )
            seen.append(
                await collect(
                    session,
                    "POST",
                    f"{url}/v1/anything/echo?q=1",
                    data=b"x",
                    headers={"Authorization": f"Bearer {key}"},
                )
            )
        for key in (ANTHROPIC_VK, RESTRICTED_VK):
            for model in ("claude-3-5-haiku-latest", "claude-opus-4-1"):
                seen.append(
                    await collect(
                        session,
                        "POST",
                        f"{url}/v1/messages",
                        json={**MESSAGES, "model": model},
                        headers={"x-api-key": key},
                    )
                )
        for bad in (OPENAI_VK + "x", OPENAI_VK[:-1], "Bearer " + OPENAI_VK):
            seen.append(
                await collect(
                    session,
                    "POST",
                    f"{url}/v1/chat/completions",
                    json=CHAT,
                    headers={"Authorization": f"Bearer {bad}"},
                )
            )
        seen.append(
            await collect(
                session,
                "POST",
                f"{url}/v1/chat/completions",
                data=b"{" + b"x" * 5000,
                headers={"x-api-key": OPENAI_VK},
            )
        )
        seen.append(
            await collect(
                session,
                "POST",
                f"{url}/v1/chat/completions",
                data=b"{bad",
                headers={"x-api-key": OPENAI_VK, "Content-Type": "application/json"},
            )
        )
        for path in ("/health", "/ready", "/metrics"):
            seen.append(await collect(session, "GET", f"{url}{path}"))
        seen.append(
            await collect(session, "GET", f"{url}/metrics", headers={"Accept": "application/json"})
        )
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=OPENAI_VK, max_retries=0)
    completion = await client.chat.completions.with_raw_response.create(**CHAT)  # type: ignore[call-overload]
    seen.append(completion.http_response.text)
    try:
        await openai.AsyncOpenAI(
            base_url=f"{url}/v1", api_key=LIMITED_VK, max_retries=0
        ).models.list()
    except openai.APIStatusError as error:
        seen.append(error.response.text)
    message = await anthropic.AsyncAnthropic(
        base_url=url, api_key=ANTHROPIC_VK, max_retries=0
    ).messages.with_raw_response.create(**{**MESSAGES, "model": "claude-haiku-4-5"})  # type: ignore[call-overload]
    seen.append(message.http_response.text)
    process.send_signal(signal.SIGTERM)
    out, err = await asyncio.to_thread(process.communicate, None, 15)
    written = {"responses": "\n".join(seen), "stdout": out, "stderr": err, "log": log.read_text()}
    assert len(log.read_text().splitlines()) > 40
    for secret in SECRETS:
        for where, text in written.items():
            assert secret not in text, f"{secret!r} leaked into {where}"
