"""A real Prometheus for tests: Debian's `prometheus` on a free loopback port, in a temp dir.

It runs from deploy/prometheus/prometheus.yml with its scrape target, intervals and rule file
replaced, so the shipped example is what gets proved. `query` and `wait_for` speak its HTTP
API; `make test` installs the package (apt-get install prometheus) when it is missing.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.support.processes import ROOT, free_port

CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
START_SECONDS = 30.0
POLL_SECONDS = 0.1


def alert_names() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"]]


def has_prometheus() -> bool:
    return shutil.which("prometheus") is not None and shutil.which("promtool") is not None


def is_finite_result(result: list[dict[str, Any]]) -> bool:
    """True when at least one series holds a number (histogram_quantile over nothing is NaN)."""
    return any(math.isfinite(float(series["value"][1])) for series in result)


class PrometheusServer:
    """One Prometheus process scraping `target` every `interval`, with the gateway's
    METRICS_TOKEN as `token`; its files live in `directory`."""

    def __init__(self, directory: Path, target: str, token: str, interval: str = "1s") -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        config = yaml.safe_load(CONFIG.read_text())
        config["global"] = {"scrape_interval": interval, "evaluation_interval": interval}
        config["rule_files"] = [str(RULES)]
        (job,) = config["scrape_configs"]
        job["static_configs"] = [{"targets": [target]}]
        job["authorization"] = {"credentials": token}  # the example's commented-out lines
        self.config = directory / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start and wait until /-/ready answers."""
        log = (self.directory / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={self.config}",
                f"--storage.tsdb.path={self.directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()  # the child holds its own descriptor
        self.wait_for(self._is_ready, "Prometheus to answer /-/ready", START_SECONDS)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait(timeout=10)
        self.process = None

    def get(self, path: str, **params: str) -> Any:
        """GET an API path; the `data` member of a successful answer."""
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query at now: the result's series (a vector, or a scalar as one series)."""
        data = self.get("/api/v1/query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def wait_for(self, condition: Callable[[], bool], what: str, seconds: float = 30.0) -> None:
        """Poll `condition` until it holds; fail naming `what` (and Prometheus's log) if it never does."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                break
            if condition():
                return
            time.sleep(POLL_SECONDS)
        log = (self.directory / "prometheus.log").read_text(errors="replace")[-2000:]
        raise AssertionError(f"timed out after {seconds} s waiting for {what}\n{log}")

    def _is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False
