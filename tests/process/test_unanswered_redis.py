"""Work the provider may still be doing, on Redis: two gateway processes share one
redis-server, one answers 504 to a request that outlasted REQUEST_TIMEOUT, the other's client
leaves before its answer; each request is sent once and charged its reservation once, in the
key's one window, whichever process is asked."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import aiohttp

from tests.app.test_unanswered import BODY, CAP, PROMPT, VK, document
from tests.conftest import auth
from tests.support.polling import until
from tests.support.processes import Processes, start_gateway

HANG = {**auth(VK), "x-fake-hang": "headers"}


async def test_two_gateway_processes_charge_each_unanswered_request_once_never_zero(
    processes: Processes, fake_url: str, redis_url: str, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(document(fake_url, fake_url)))
    logs = [tmp_path / f"log{index}.jsonl" for index in range(2)]
    urls = [
        start_gateway(
            processes, keys, log, REDIS_URL=redis_url, REQUEST_TIMEOUT="1", RETRY_ATTEMPTS="2"
        )[1]
        for log in logs
    ]
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{urls[0]}/v1/chat/completions", json=BODY, headers=HANG
        ) as response:
            assert response.status == 504  # REQUEST_TIMEOUT, not retried, not failed over
        # The second process's client gives up after 0.3 s, before the gateway's timeout.
        with contextlib.suppress(TimeoutError):
            await session.post(
                f"{urls[1]}/v1/chat/completions",
                json=BODY,
                headers=HANG,
                timeout=aiohttp.ClientTimeout(total=0.3),
            )

        def lines() -> list[dict[str, Any]]:
            return [
                json.loads(line)
                for log in logs
                if log.exists()
                for line in log.read_text().splitlines()
            ]

        await until(lambda: len(lines()) == 2, within=10, what="both requests logged")
        by_status = {line["status"]: line for line in lines()}
        assert set(by_status) == {504, 499}
        assert len(by_status[504]["attempts"]) == 1  # sent once: not retried, not failed over
        for line in by_status.values():
            assert line["usage"]["prompt_tokens"] == PROMPT
            assert line["usage"]["completion_tokens"] == CAP

        async def charged(url: str) -> int:
            async with session.get(f"{url}/usage", headers=auth(VK)) as got:
                return int((await got.json())["totals"]["tokens"])

        both = 2 * (PROMPT + CAP)

        async def settled() -> bool:
            return await charged(urls[0]) >= both

        await until(settled, within=10, what="both charges in Redis")
        assert [await charged(url) for url in urls] == [both, both]  # once each, in one window
