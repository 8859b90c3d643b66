"""A gateway under traffic, watched by a real Prometheus: what test_dashboard.py checks against.

`observe` starts redis-server, the fake provider and a gateway with WORKERS=2 as processes,
and a Prometheus scraping it every second with the shipped rules loaded. Traffic goes through
in two rounds (so every series has grown between two scrapes, and rates are not zero), with
refusals over quota and over budget, provider 5xx, an unreachable provider, a stream cut short, an unknown
key, a model without a price, a key whose primary refuses connections (a retry, a failover to
its fallback, in both rounds; then a breaker that opens), a reload (POST /admin/reload); the log goes to /dev/full
(every line lost); then keys.json is broken before another reload, and Redis is killed before
a last few requests. Every wait polls Prometheus until it has scraped what was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import ANTHROPIC_VK, LIMITED_VK, OPENAI_REAL, OPENAI_VK, keys_document
from tests.support.bodies import CHAT, messages
from tests.support.processes import Processes, start_fake_provider, start_gateway
from tests.support.prometheus_server import PrometheusServer
from tests.support.redis_server import RedisServer

METRICS_TOKEN = "metrics-token-for-the-scrape"
ADMIN_TOKEN = "admin-token-for-the-reloads"
FAILOVER_VK = "vk_test_watch_failover_7d2b9e4a"
BUDGET_VK = "vk_test_watch_budget_3f8a1c6e"
# One quick retry per target. A breaker opens after 5 failures in a row, and each request on
# the failover key fails twice on its primary: one request a round counts a retry and a
# failover in both rounds, and four more in a row on one worker open that worker's breaker.
FAILOVER_SETTINGS = {
    "RETRY_ATTEMPTS": "1",
    "RETRY_MAX_WAIT_SECONDS": "0.1",
    "BREAKER_FAILURES": "5",
}

MESSAGES = messages(max_tokens=5)
Call = tuple[str, str, dict[str, Any], dict[str, str]]  # path, virtual key, body, headers
CHAT_PATH, MESSAGES_PATH = "/v1/chat/completions", "/v1/messages"
ROUND: list[Call] = [
    *[(CHAT_PATH, OPENAI_VK, CHAT, {})] * 4,
    *[(CHAT_PATH, OPENAI_VK, {**CHAT, "stream": True}, {"x-fake-chunks": "4"})] * 2,
    *[(MESSAGES_PATH, ANTHROPIC_VK, MESSAGES, {})] * 3,
    (MESSAGES_PATH, ANTHROPIC_VK, {**MESSAGES, "stream": True}, {}),
    *[(CHAT_PATH, OPENAI_VK, CHAT, {"x-fake-status": "503"})] * 2,  # the provider's 5xx
    (MESSAGES_PATH, ANTHROPIC_VK, MESSAGES, {"x-fake-drop": "headers"}),  # unreachable: 502
    (CHAT_PATH, OPENAI_VK, {**CHAT, "stream": True}, {"x-fake-drop": "midstream"}),  # broken
    *[(CHAT_PATH, LIMITED_VK, CHAT, {})] * 3,  # quota: 3 requests an hour
    *[(CHAT_PATH, BUDGET_VK, CHAT, {})] * 2,  # a budget of a millionth of a dollar
    (CHAT_PATH, OPENAI_VK, {**CHAT, "model": "fake-model"}, {}),  # no price known
    (CHAT_PATH, "vk_nobody", CHAT, {}),  # 401
]
FAILING_OVER: Call = (CHAT_PATH, FAILOVER_VK, CHAT, {})  # a retry, then a failover
FIRST_ROUND = [*ROUND, *[(CHAT_PATH, LIMITED_VK, CHAT, {})] * 2]  # refusals in both rounds
WITHOUT_REDIS: list[Call] = [(CHAT_PATH, OPENAI_VK, CHAT, {})] * 4


def watched_keys(base: str, dead: str) -> dict[str, Any]:
    """The test keys, one whose primary refuses every connection (it has a fallback), and one
    whose budget the first request spends."""
    document = keys_document(base)
    document["providers"]["dead"] = {"base_url": f"{dead}/v1"}
    document["virtual_keys"][FAILOVER_VK] = {
        "name": "failover",
        "provider": "dead",
        "api_key": "sk-real-dead-8888888888",
        "fallbacks": [{"provider": "openai", "api_key": OPENAI_REAL}],
    }
    document["virtual_keys"][BUDGET_VK] = {
        "name": "budgeted",
        "provider": "openai",
        "api_key": OPENAI_REAL,
        "budget": {"usd": 0.000001, "window_seconds": 3600},
    }
    return document


@dataclass(frozen=True, slots=True)
class Observed:
    prometheus: PrometheusServer
    sent: int
    statuses: list[int]
    exposition: str
    metrics_dir: Path


async def send(session: aiohttp.ClientSession, url: str, call: Call) -> int:
    path, key, body, headers = call
    headers = {"Authorization": f"Bearer {key}", **headers}
    async with session.post(f"{url}{path}", json=body, headers=headers) as response:
        try:
            await response.read()
        except aiohttp.ClientPayloadError:
            pass  # the stream cut short on purpose; the gateway records it
        return response.status


async def drive(url: str, calls: list[Call], in_a_row: list[Call]) -> list[int]:
    """Send `calls` at once, each on a new connection (the kernel spreads them over both
    workers), and `in_a_row` one after the other on one kept-alive connection (one worker)."""
    spread = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
    one = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
    async with spread, one:

        async def one_by_one() -> list[int]:
            return [await send(one, url, call) for call in in_a_row]

        together = asyncio.gather(*(send(spread, url, call) for call in calls))
        statuses, sequential = await asyncio.gather(together, one_by_one())
    return [*statuses, *sequential]


def stop_gracefully(gateway: subprocess.Popen[str]) -> None:
    """SIGTERM: the parent stops its workers and waits for them (SIGKILL would orphan them).
    Workers still there after the grace period are killed all the same, and the test fails."""
    path = Path(f"/proc/{gateway.pid}/task/{gateway.pid}/children")
    workers = [int(pid) for pid in path.read_text().split()] if path.exists() else []
    gateway.send_signal(signal.SIGTERM)
    try:
        gateway.wait(timeout=30)
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):  # it exited, as it should
                os.kill(pid, signal.SIGKILL)


def reload(url: str) -> int:
    """POST /admin/reload (the worker that answers reloads): its status."""
    request = urllib.request.Request(
        f"{url}/admin/reload", method="POST", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def total(prometheus: PrometheusServer, expr: str) -> float:
    result = prometheus.query(expr)
    return float(result[0]["value"][1]) if result else 0.0


def wait_until_scraped(prometheus: PrometheusServer, sent: int, *also: str) -> None:
    """Wait until Prometheus has scraped all `sent` requests, and each query in `also` has data."""
    prometheus.wait_for(
        lambda: (
            total(prometheus, "sum(llm_gateway_requests_total)") == sent
            and all(prometheus.query(expr) for expr in also)
        ),
        f"Prometheus to see {sent} requests and {also}",
    )


def observe(directory: Path, cleanup: ExitStack) -> Observed:
    """Start Redis, the fake provider, the gateway and Prometheus (each stopped by `cleanup`);
    send the traffic; wait until Prometheus has scraped it."""
    processes, redis = Processes(), RedisServer(directory)
    cleanup.callback(processes.stop)
    cleanup.callback(redis.kill)
    redis.start()
    fake_url = start_fake_provider(processes)
    keys = directory / "keys.json"
    # A port bound but not listening: every connection to it is refused, and no one else gets it.
    dead = socket.socket()
    cleanup.callback(dead.close)
    dead.bind(("127.0.0.1", 0))
    dead_url = f"http://127.0.0.1:{dead.getsockname()[1]}"
    keys.write_text(json.dumps(watched_keys(fake_url, dead_url)))
    metrics_dir = directory / "metrics"
    gateway, url = start_gateway(
        processes,
        keys,
        Path("/dev/full"),  # every log write fails: llm_gateway_log_write_errors_total
        WORKERS="2",
        REDIS_URL=redis.url,
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
        METRICS_TOKEN=METRICS_TOKEN,
        ADMIN_TOKEN=ADMIN_TOKEN,
        **FAILOVER_SETTINGS,
    )
    cleanup.callback(stop_gracefully, gateway)
    prometheus = PrometheusServer(directory, url.removeprefix("http://"), METRICS_TOKEN)
    cleanup.callback(prometheus.stop)
    prometheus.start()
    prometheus.wait_for(lambda: bool(prometheus.query("up == 1")), "a first scrape")
    statuses = asyncio.run(drive(url, FIRST_ROUND, [FAILING_OVER]))
    wait_until_scraped(prometheus, len(statuses))
    assert reload(url) == 200  # the same keys again: result="ok"
    statuses += asyncio.run(drive(url, ROUND, [FAILING_OVER] * 4))  # the breaker opens
    wait_until_scraped(
        prometheus, len(statuses), 'llm_gateway_config_reloads_total{result="ok"} > 0'
    )
    keys.write_text("{")
    assert reload(url) == 422  # result="failed": the previous keys stay in force
    redis.kill()
    statuses += asyncio.run(drive(url, WITHOUT_REDIS, []))
    wait_until_scraped(
        prometheus,
        len(statuses),
        'llm_gateway_redis_errors_total{decision="allow"} > 0',
        'llm_gateway_config_reloads_total{result="failed"} > 0',
    )
    scrape = urllib.request.Request(
        f"{url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
    )
    with urllib.request.urlopen(scrape, timeout=10) as response:
        exposition = response.read().decode()
    return Observed(prometheus, len(statuses), statuses, exposition, metrics_dir)
