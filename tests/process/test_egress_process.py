"""A real gateway process behind an outbound proxy: HTTP_PROXY read from its environment."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.conftest import OPENAI_VK, auth
from tests.support.bodies import CHAT
from tests.support.connect_proxy import ConnectProxy
from tests.support.processes import Processes, start_gateway


async def test_the_process_reads_the_proxy_variables_and_forwards_through_the_proxy(
    processes: Processes, process_keys: Path, fake_url: str, tmp_path: Path
) -> None:
    async with ConnectProxy(credentials="egress:pw") as proxy:
        _, url = start_gateway(
            processes, process_keys, tmp_path / "log.jsonl", http_proxy=proxy.url("egress:pw@")
        )
        async with aiohttp.ClientSession() as client:  # trust_env off: the test goes direct
            for _ in range(2):
                async with client.post(
                    f"{url}/v1/chat/completions", json=CHAT, headers=auth(OPENAI_VK)
                ) as response:
                    assert response.status == 200, await response.text()
    assert proxy.forwarded == [f"{fake_url}/v1/chat/completions"] * 2
    assert proxy.connections == 1  # kept alive
