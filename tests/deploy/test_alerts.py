"""deploy/prometheus/alerts.yml: valid for promtool, and each alert unit-tested both ways.

deploy/prometheus/alerts.test.yml feeds each alert series that must fire it and series that
must not; `promtool test rules` runs it. Whether the rules evaluate against a real gateway's
series is tested in test_dashboard.py.
"""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from tests.support.processes import ROOT
from tests.support.prometheus_server import RULES, alert_names, has_prometheus

RULES_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if not has_prometheus():
        pytest.skip("promtool is missing (make test installs it: apt-get install -y prometheus)")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)


def test_promtool_check_rules_passes() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in checked.stdout


def test_the_unit_tests_of_the_alerts_pass() -> None:
    tested = promtool("test", "rules", str(RULES_TESTS))
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_every_alert_has_a_case_that_fires_and_one_that_stays_quiet() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULES_TESTS.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    assert fires == set(alert_names()) and quiet == set(alert_names())


def test_every_alert_has_a_severity_a_summary_and_a_description() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    for rule in (rule for group in groups for rule in group["rules"]):
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]
        assert all(text.strip() for text in rule["annotations"].values()), rule["alert"]


def test_the_example_prometheus_configuration_passes_promtool() -> None:
    checked = promtool("check", "config", str(RULES.parent / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_watching_page_lists_every_alert_with_its_severity() -> None:
    page = (ROOT / "docs" / "watching.md").read_text()
    rows = re.findall(r"^\| `(LLMGateway\w+)` \| (\w+) \|", page, re.M)
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rules = {r["alert"]: r["labels"]["severity"] for group in groups for r in group["rules"]}
    assert dict(rows) == rules and len(rows) == len(rules)
