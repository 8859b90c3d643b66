"""Metrics in multiprocess mode across real processes: workers started without any variable
set before import write one directory whose sums the parent reads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.observe.metrics import Metrics
from tests.support.processes import ROOT
from tests.unit.test_metrics import restore_value_class, summary  # noqa: F401

WORKER = """
import sys
from proxy.observe.metrics import Metrics
from proxy.record import Record, Usage

metrics = Metrics(multiprocess_dir=sys.argv[1])
for _ in range(int(sys.argv[2])):
    record = Record.begin(None, "POST", "/v1/chat/completions")
    record.provider, record.model, record.status = "openai", "gpt-4o-mini", 200
    record.usage, record.duration_ms = Usage(3, 4), 50.0
    metrics.observe(record)
"""


@pytest.mark.usefixtures("restore_value_class")
def test_multiprocess_mode_needs_no_variable_before_import(tmp_path: Path) -> None:
    environment = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    for count in ("5", "7"):
        subprocess.run(
            [sys.executable, "-c", WORKER, str(tmp_path), count],
            cwd=ROOT,
            env=environment,
            check=True,
            timeout=60,
        )

    report = summary(Metrics(multiprocess_dir=str(tmp_path)))
    assert report["total_requests"] == 12
    assert report["tokens"] == {"prompt": 36, "completion": 48, "total": 84}
    assert report["average_response_ms"] == 50.0
