"""The official Node SDKs (npm's `openai` and `@anthropic-ai/sdk`, pinned in the Makefile's
node-sdks target) against a gateway process in front of the fake provider: their streams,
the gateway's errors as each SDK raises them (its own retries included), and a stream
aborted midway, which the gateway logs and counts as 499. The Node side is
`tests/process/node_sdks.mjs`; docs/frameworks.md says what the SDKs were seen to do."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import ANTHROPIC_VK, OPENAI_VK, keys_document
from tests.support.polling import until
from tests.support.processes import ROOT, Processes, start_gateway

pytestmark = pytest.mark.process

SCRIPT = Path(__file__).with_name("node_sdks.mjs")
SDKS = ROOT / ".node" / "node_modules"
ONE_REQUEST_VK = "vk_test_node_one_request_6e1a"


@pytest.fixture
def node() -> str:
    """The node binary, once the pinned SDKs are installed; a skip saying how otherwise."""
    binary = shutil.which("node")
    if binary is None or not (SDKS / "openai").is_dir() or not (SDKS / "@anthropic-ai").is_dir():
        pytest.skip("node or the Node SDKs are missing (make node-sdks installs them into .node/)")
    return binary


def log_line(log: Path, request_id: str) -> dict[str, Any] | None:
    for line in log.read_text().splitlines() if log.exists() else ():
        record = json.loads(line)
        if record["request_id"] == request_id:
            return record  # type: ignore[no-any-return]
    return None


async def test_the_node_sdks_stream_raise_the_gateways_errors_and_an_abort_is_a_499(
    node: str, processes: Processes, fake_url: str, tmp_path: Path
) -> None:
    document = keys_document(fake_url)
    document["virtual_keys"][ONE_REQUEST_VK] = {
        "provider": "anthropic",
        "api_key": "sk-ant-real-node-one-request-0123456789",
        "name": "one-request",
        "quota": {"requests": 1, "window_seconds": 3600},
    }
    keys, log = tmp_path / "keys.json", tmp_path / "interactions.jsonl"
    keys.write_text(json.dumps(document))
    _, url = start_gateway(processes, keys, log)
    script = await asyncio.create_subprocess_exec(
        node,
        str(SCRIPT),
        env={
            **os.environ,
            "GATEWAY_URL": url,
            "OPENAI_KEY": OPENAI_VK,
            "ANTHROPIC_KEY": ANTHROPIC_VK,
            "ONE_REQUEST_KEY": ONE_REQUEST_VK,
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(script.communicate(), 60)
    finally:
        if script.returncode is None:  # timed out: a retry sleeping out a long wait, say
            script.kill()
            await script.wait()
    assert script.returncode == 0, err.decode()
    steps = {line["step"]: line for line in map(json.loads, out.decode().splitlines())}

    # Streams: the text and the provider's usage, and withResponse()'s request id (the client's).
    chat = steps["openai stream"]
    assert chat["text"] == "tok0 tok1 tok2 " and chat["usage"]["completion_tokens"] == 3
    assert chat["request_id"] == "node-chat"
    assert steps["anthropic stream"]["text"] == "tok0 tok1 tok2 "
    assert steps["anthropic stream"]["usage"]["output_tokens"] == 3
    # The gateway's errors in each dialect, as the SDK's own classes; a 429 whose window
    # opens in an hour fails at once (x-should-retry: false), not after the SDK's retries.
    assert steps["openai 401"]["class"] == "AuthenticationError"
    assert steps["openai 401"]["error"]["code"] == "invalid_api_key"
    assert steps["anthropic 429"]["class"] == "RateLimitError", steps["anthropic 429"]
    assert steps["anthropic 429"]["error"]["error"]["type"] == "rate_limit_error"
    assert steps["anthropic 429"]["attempts"] == 1
    assert int(steps["anthropic 429"]["retry_after"]) > 60
    assert steps["anthropic 529"]["class"] == "OverloadedError"  # the provider's, unchanged
    # The abort: the SDK stopped after two chunks of 200 (its iterator ends quietly) ...
    assert steps["abort"] == {"step": "abort", "chunks": 2}

    # ... and the gateway logged it as the client's leaving, and counts it so.
    await until(lambda: log_line(log, "node-abort") is not None, 10, "the abort's log line")
    aborted = log_line(log, "node-abort")
    assert aborted is not None
    assert (aborted["status"], aborted["error"]) == (499, "client closed the connection")
    assert aborted["usage"]["completion_tokens"] < 200
    streamed = log_line(log, "node-chat")
    assert streamed is not None and streamed["status"] == 200
    assert streamed["usage"]["completion_tokens"] == 3 and not streamed["usage"]["estimated"]
    async with aiohttp.ClientSession() as session:

        async def counted() -> bool:
            async with session.get(f"{url}/metrics") as response:
                metrics = await response.text()
            return (
                'model="gpt-4o-mini",provider="openai",status="499"} 1.0' in metrics
                and "llm_gateway_requests_in_flight 0.0" in metrics
            )

        await until(counted, 10, "the abort counted as a 499, nothing left in flight")
