"""deploy/grafana/llm-gateway.json and deploy/prometheus/alerts.yml, proved against real traffic.

One run for the module (`observed`): redis-server, the fake provider and a gateway with
WORKERS=2 as processes, scraped every second by a real Prometheus that loads the shipped rules.
Traffic goes through in two rounds (so every series has grown between two scrapes, and rates
are not zero), with refusals over quota, provider 5xx, an unreachable provider, a stream cut
short, an unknown key, a model without a price, a reload (POST /admin/reload); the log goes
to /dev/full (every line lost); then keys.json is broken before another reload, and Redis is
killed before a last few requests. Then every query of the dashboard must return a number, every alert rule
must evaluate cleanly, and the alerts those faults call for must be pending.
The rules' own unit tests (promtool test rules) are in test_alerts.py.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import ANTHROPIC_VK, LIMITED_VK, OPENAI_VK, keys_document
from tests.processes import ROOT, Processes, start_gateway
from tests.prometheus_server import (
    PrometheusServer,
    alert_names,
    has_prometheus,
    is_finite_result,
)
from tests.redis_server import RedisServer, has_redis_server

DASHBOARD = ROOT / "deploy" / "grafana" / "llm-gateway.json"
ROWS = [
    "Is it up?",
    "Is a provider failing?",
    "Is it fast?",
    "Who is spending?",
    "Quotas and budgets",
]
# What Grafana puts in for its variables; "All" of a multi-value variable is its allValue.
VARIABLES = {
    "__rate_interval": "1m",
    "__range": "5m",
    "__interval": "15s",
    "job": ".+",
    "instance": ".+",
    "provider": ".+",
}

METRICS_TOKEN = "metrics-token-for-the-scrape"
ADMIN_TOKEN = "admin-token-for-the-reloads"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {
    "model": "claude-3-5-haiku-latest",
    "max_tokens": 5,
    "messages": [{"role": "user", "content": "hi"}],
}
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
    (CHAT_PATH, OPENAI_VK, {**CHAT, "model": "fake-model"}, {}),  # no price known
    (CHAT_PATH, "vk_nobody", CHAT, {}),  # 401
]
FIRST_ROUND = [*ROUND, *[(CHAT_PATH, LIMITED_VK, CHAT, {})] * 2]  # refusals in both rounds
WITHOUT_REDIS: list[Call] = [(CHAT_PATH, OPENAI_VK, CHAT, {})] * 4


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


async def drive(url: str, calls: list[Call]) -> list[int]:
    # A new connection per request, so the kernel spreads them over both workers.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        return list(await asyncio.gather(*(send(session, url, call) for call in calls)))


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
        lambda: total(prometheus, "sum(llm_gateway_requests_total)") == sent
        and all(prometheus.query(expr) for expr in also),
        f"Prometheus to see {sent} requests and {also}",
    )


def observe(directory: Path, cleanup: ExitStack) -> Observed:
    """Start Redis, the fake provider, the gateway and Prometheus (each stopped by `cleanup`);
    send the traffic; wait until Prometheus has scraped it."""
    processes, redis = Processes(), RedisServer(directory)
    cleanup.callback(processes.stop)
    cleanup.callback(redis.kill)
    redis.start()
    fake = processes.start([sys.executable, "-m", "tests.fake_provider", "--port", "0"])
    assert fake.stdout is not None
    keys = directory / "keys.json"
    keys.write_text(json.dumps(keys_document(fake.stdout.readline().split()[-1])))
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
    )
    # SIGTERM first: the parent stops its workers and waits for them (SIGKILL would orphan them).
    cleanup.callback(gateway.wait, timeout=30)
    cleanup.callback(gateway.send_signal, signal.SIGTERM)
    prometheus = PrometheusServer(directory, url.removeprefix("http://"), METRICS_TOKEN)
    cleanup.callback(prometheus.stop)
    prometheus.start()
    prometheus.wait_for(lambda: bool(prometheus.query("up == 1")), "a first scrape")
    statuses = asyncio.run(drive(url, FIRST_ROUND))
    wait_until_scraped(prometheus, len(statuses))
    assert reload(url) == 200  # the same keys again: result="ok"
    statuses += asyncio.run(drive(url, ROUND))
    wait_until_scraped(
        prometheus, len(statuses), 'llm_gateway_config_reloads_total{result="ok"} > 0'
    )
    keys.write_text("{")
    assert reload(url) == 422  # result="failed": the previous keys stay in force
    redis.kill()
    statuses += asyncio.run(drive(url, WITHOUT_REDIS))
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


@pytest.fixture(scope="module")
def observed() -> Iterator[Observed]:
    if not (has_prometheus() and has_redis_server()):
        pytest.skip("prometheus, promtool or redis-server is missing (make test installs them)")
    with ExitStack() as cleanup:  # stops everything in reverse order, also on failure
        directory = Path(tempfile.mkdtemp(prefix="llm-gateway-dashboard-"))
        cleanup.callback(shutil.rmtree, directory, ignore_errors=True)
        yield observe(directory, cleanup)


# --- the dashboard ---------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict[str, Any]]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def expand(expr: str) -> str:
    """The expression as Grafana sends it, each $variable or ${variable} replaced."""
    return re.sub(r"\$\{?(\w+)\}?", lambda match: VARIABLES[match[1]], expr)


def test_the_dashboard_is_importable_with_a_datasource_input() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 42 and board["uid"] and board["title"] == "llm-gateway"
    (declared,) = board["__inputs"]
    assert declared["name"] == "DS_PROMETHEUS" and declared["pluginId"] == "prometheus"
    source = board["templating"]["list"][0]
    assert source["type"] == "datasource" and source["query"] == "prometheus"
    assert source["current"]["value"] == "${DS_PROMETHEUS}"  # what the import dialog replaces
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    assert [p["title"] for p in board["panels"] if p["type"] == "row"] == ROWS
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["description"] and panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        assert all(t["datasource"] == panel["datasource"] for t in panel["targets"])


def test_no_two_panels_overlap() -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]
        for x in range(box["x"], box["x"] + box["w"]):
            for y in range(box["y"], box["y"] + box["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]


def test_every_dashboard_query_returns_a_number(observed: Observed) -> None:
    blank = []
    for panel in panels():
        for target in panel["targets"]:
            result = observed.prometheus.query(expand(target["expr"]))
            if not is_finite_result(result):
                blank.append(f"{panel['title']} [{target['refId']}]: {target['expr']} -> {result}")
    assert not blank, "panels without data:\n" + "\n".join(blank)


def test_every_dashboard_variable_has_values(observed: Observed) -> None:
    for variable in dashboard()["templating"]["list"][1:]:
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]["query"])
        assert match, variable["query"]
        values = observed.prometheus.get(
            f"/api/v1/label/{match[2]}/values", **{"match[]": expand(match[1])}
        )
        assert values, variable["name"]


def test_prometheus_scrapes_the_sum_of_both_workers(observed: Observed) -> None:
    pids = {path.stem.rsplit("_", 1)[-1] for path in observed.metrics_dir.glob("counter_*.db")}
    assert len(pids) == 2, f"the requests reached only {pids}"
    assert total(observed.prometheus, "sum(llm_gateway_requests_total)") == observed.sent
    # What the traffic was meant to be: served, refused over quota, failed, unknown key.
    assert {200, 429, 502, 503, 401} <= set(observed.statuses)


def test_the_exposition_passes_promtool_check_metrics(observed: Observed) -> None:
    checked = subprocess.run(
        ["promtool", "check", "metrics"],
        input=observed.exposition,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert checked.returncode == 0 and not checked.stdout + checked.stderr, checked


# --- the alert rules -------------------------------------------------------------------


def test_every_rule_evaluates_without_error_against_the_gateway(observed: Observed) -> None:
    def rules() -> list[dict[str, Any]]:
        groups = observed.prometheus.get("/api/v1/rules")["groups"]
        return [rule for group in groups for rule in group["rules"]]

    observed.prometheus.wait_for(
        lambda: all(rule["health"] != "unknown" for rule in rules()), "every rule to be evaluated"
    )
    assert {rule["name"]: rule["health"] for rule in rules()} == {
        name: "ok" for name in alert_names()
    }


def test_the_faults_injected_make_their_alerts_pending(observed: Observed) -> None:
    expected = {
        "LLMGatewayHighErrorRatio",  # 3 of 22 requests a round end in 5xx
        "LLMGatewayUpstreamErrorRatio",  # both providers fail about one request in five
        "LLMGatewayLogWritesFailing",  # the log is /dev/full
        "LLMGatewayRedisLostAllowing",  # Redis was killed, QUOTA_ON_REDIS_ERROR=allow
        "LLMGatewayUnpricedRequests",  # fake-model has no price
        "LLMGatewayReloadFailed",  # keys.json was broken before a reload
    }

    def active() -> set[str]:
        alerts = observed.prometheus.get("/api/v1/alerts")["alerts"]
        return {alert["labels"]["alertname"] for alert in alerts}

    observed.prometheus.wait_for(lambda: expected <= active(), f"alerts {sorted(expected)}")
    assert not active() & {"LLMGatewayDown", "LLMGatewayAbsent", "LLMGatewayRedisLostDenying"}
