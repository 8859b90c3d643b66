"""deploy/grafana/llm-gateway.json and deploy/prometheus/alerts.yml, proved against real traffic.

One gateway run for the module (`observed`, see watched_gateway.py): two workers with Redis,
scraped by a real Prometheus, after traffic with every fault the dashboard shows. Then every
query of the dashboard must return a number (and move, but for the idle panels), every alert
rule must evaluate cleanly, and the alerts those faults call for must be pending. The rules'
own unit tests (promtool test rules) are in test_alerts.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import ROOT
from tests.support.prometheus_server import alert_names, has_prometheus, is_finite_result
from tests.support.redis_server import has_redis_server
from tests.support.watched_gateway import Observed, observe, total

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

# Panels at 0 once the traffic is over: nothing is in flight, every instance is up.
IDLE_PANELS = {"Instances down", "In flight", "Requests in flight by instance"}


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


def test_the_traffic_moves_every_panel_but_the_idle_ones(observed: Observed) -> None:
    """A panel stuck at 0 (a label value renamed, a fault no longer counted) fails too."""
    flat = []
    for panel in panels():
        values = [
            float(series["value"][1])
            for target in panel["targets"]
            for series in observed.prometheus.query(expand(target["expr"]))
        ]
        if not any(value > 0 for value in values) and panel["title"] not in IDLE_PANELS:
            flat.append(f"{panel['title']}: {values}")
    assert not flat, "panels at 0:\n" + "\n".join(flat)


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


def test_refusals_over_budget_show_by_key_beside_those_over_quota(observed: Observed) -> None:
    refused = observed.prometheus.query("sum by (key) (llm_gateway_quota_rejections_total)")
    assert {series["metric"]["key"] for series in refused} == {"limited", "budgeted"}


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
        "LLMGatewayBreakerOpen",  # the failover key's primary refuses every connection
    }

    def active() -> set[str]:
        alerts = observed.prometheus.get("/api/v1/alerts")["alerts"]
        return {alert["labels"]["alertname"] for alert in alerts}

    observed.prometheus.wait_for(lambda: expected <= active(), f"alerts {sorted(expected)}")
    assert not active() & {"LLMGatewayDown", "LLMGatewayAbsent", "LLMGatewayRedisLostDenying"}
