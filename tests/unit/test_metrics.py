"""Prometheus series and the JSON summary, in one process and summed over workers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import values
from prometheus_client.parser import text_string_to_metric_families

from proxy.observe.metrics import MODEL_LABEL_VALUES, Metrics
from proxy.observe.worker_metrics import ProcessId, forget_worker
from proxy.record import CLIENT_CLOSED, Outcome, Record, Usage

ROOT = Path(__file__).resolve().parents[2]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def finished_record(**changes: object) -> Record:
    """A record as relay leaves it after a successful call."""
    record = Record.begin(None, "POST", "/v1/chat/completions")
    record.key, record.provider, record.model = "user1", "openai", "gpt-4o-mini"
    record.status, record.usage = 200, Usage(10, 5)
    record.ttft_ms, record.duration_ms = 40.0, 300.0
    for name, value in changes.items():
        setattr(record, name, value)
    return record


def ended(record: Record, status: int, outcome: Outcome) -> Record:
    record.outcome = None
    record.end(status, outcome)
    return record


def samples(metrics: Metrics) -> Samples:
    """Every sample of the Prometheus text, by name and labels."""
    body, _ = metrics.render("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def summary(metrics: Metrics) -> dict[str, Any]:
    body, content_type = metrics.render("application/json")
    assert content_type == "application/json"
    return orjson.loads(body)


@pytest.fixture
def restore_value_class(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Undo the process-wide multiprocess switch after the test, so other tests stay in memory."""
    monkeypatch.setattr(values, "ValueClass", values.ValueClass)
    # setenv first records the variable's original state, so delenv's removal is undone too.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    yield


def test_a_finished_request_is_counted_by_provider_model_and_status() -> None:
    metrics = Metrics()
    metrics.observe(finished_record())
    metrics.observe(finished_record())
    metrics.observe(finished_record(provider="anthropic", model="claude-x", status=400))

    found = samples(metrics)
    total = "llm_gateway_requests_total"
    assert value(found, total, provider="openai", model="gpt-4o-mini", status="200") == 2
    assert value(found, total, provider="anthropic", model="claude-x", status="400") == 1


def test_duration_and_first_byte_histograms_count_each_request() -> None:
    metrics = Metrics()
    metrics.observe(finished_record(duration_ms=300.0, ttft_ms=40.0))
    metrics.observe(finished_record(duration_ms=7000.0, ttft_ms=2000.0))
    metrics.observe(finished_record(status=429, duration_ms=1.0, ttft_ms=None))

    found = samples(metrics)
    duration = "llm_gateway_request_duration_seconds"
    assert value(found, f"{duration}_count", provider="openai") == 3
    assert value(found, f"{duration}_sum", provider="openai") == pytest.approx(7.301)
    assert value(found, f"{duration}_bucket", provider="openai", le="0.5") == 2
    assert value(found, f"{duration}_bucket", provider="openai", le="10.0") == 3
    ttfb = "llm_gateway_time_to_first_byte_seconds"
    assert value(found, f"{ttfb}_count", provider="openai") == 2  # the 429 never reached one
    assert value(found, f"{ttfb}_bucket", provider="openai", le="0.05") == 1


def test_a_series_appears_with_its_first_count_and_not_before() -> None:
    metrics = Metrics()
    metrics.observe(finished_record(ttft_ms=None, usage=None))  # no first byte, no usage
    names = {name for name, _ in samples(metrics)}
    assert "llm_gateway_requests_total" in names
    assert not any(name.startswith("llm_gateway_time_to_first_byte") for name in names)
    assert "llm_gateway_prompt_tokens_total" not in names

    metrics.observe(finished_record())  # the same provider, model and status, with both
    found = samples(metrics)
    assert value(found, "llm_gateway_time_to_first_byte_seconds_count", provider="openai") == 1
    tokens = value(found, "llm_gateway_prompt_tokens_total", provider="openai", model="gpt-4o-mini")
    assert tokens == 10
    assert (
        value(
            found,
            "llm_gateway_requests_total",
            provider="openai",
            model="gpt-4o-mini",
            status="200",
        )
        == 2
    )


def test_tokens_are_counted_by_provider_and_model() -> None:
    metrics = Metrics()
    metrics.observe(finished_record(usage=Usage(10, 5)))
    metrics.observe(finished_record(usage=Usage(7, 3, estimated=True)))
    metrics.observe(finished_record(usage=None))

    found = samples(metrics)
    labels = {"provider": "openai", "model": "gpt-4o-mini"}
    assert value(found, "llm_gateway_prompt_tokens_total", **labels) == 17
    assert value(found, "llm_gateway_completion_tokens_total", **labels) == 8


def test_a_request_refused_before_a_provider_is_labelled_none() -> None:
    metrics = Metrics()
    metrics.observe(finished_record(key=None, provider=None, model=None, status=401, usage=None))

    found = samples(metrics)
    labels = {"provider": "none", "model": "none", "status": "401"}
    assert value(found, "llm_gateway_requests_total", **labels) == 1


def test_client_made_up_models_cannot_explode_the_series() -> None:
    metrics = Metrics()
    metrics.observe(finished_record(model="m" * 1000))
    for n in range(MODEL_LABEL_VALUES + 50):
        metrics.observe(finished_record(model=f"junk-{n}"))

    found = samples(metrics)
    models = {
        dict(labels)["model"] for name, labels in found if name == "llm_gateway_requests_total"
    }
    assert "m" * 64 in models
    assert max(len(model) for model in models) == 64
    assert len(models) == MODEL_LABEL_VALUES + 1  # the first 100 values, then "other"
    assert (
        value(found, "llm_gateway_requests_total", provider="openai", model="other", status="200")
        == 51
    )


def test_upstream_failures_are_counted_by_kind() -> None:
    metrics = Metrics()
    metrics.observe(ended(finished_record(ttft_ms=None, usage=None), 502, Outcome.UNREACHABLE))
    metrics.observe(ended(finished_record(ttft_ms=None, usage=None), 504, Outcome.TIMEOUT))
    metrics.observe(ended(finished_record(), 200, Outcome.BROKEN))
    metrics.observe(ended(finished_record(usage=None), 503, Outcome.ANSWERED))  # provider's 503
    metrics.observe(ended(finished_record(ttft_ms=None), 503, Outcome.REFUSED))  # Redis lost
    metrics.observe(ended(finished_record(), CLIENT_CLOSED, Outcome.CLIENT_LEFT))

    found = samples(metrics)
    errors = "llm_gateway_upstream_errors_total"
    for kind in ("unreachable", "timeout", "broken", "status"):
        assert value(found, errors, provider="openai", kind=kind) == 1
    assert sum(v for (name, _), v in found.items() if name == errors) == 4


def test_in_flight_requests_go_up_and_down() -> None:
    metrics = Metrics()
    metrics.request_started()
    metrics.request_started()
    metrics.request_ended()

    assert value(samples(metrics), "llm_gateway_requests_in_flight") == 1


def test_quota_rejections_lost_log_lines_and_redis_decisions_are_counted() -> None:
    metrics = Metrics()
    metrics.quota_rejected("user1")
    metrics.quota_rejected("user1")
    metrics.log_write_failed()
    metrics.redis_error_decision("allow")
    metrics.redis_error_decision("deny")
    metrics.redis_error_decision("deny")

    found = samples(metrics)
    assert value(found, "llm_gateway_quota_rejections_total", key="user1") == 2
    assert value(found, "llm_gateway_log_write_errors_total") == 1
    assert value(found, "llm_gateway_redis_errors_total", decision="allow") == 1
    assert value(found, "llm_gateway_redis_errors_total", decision="deny") == 2


def test_keys_appear_only_as_names_in_the_key_label() -> None:
    metrics = Metrics()
    metrics.observe(finished_record(key="vk_user1…cret"))
    metrics.quota_rejected("user2")

    body, _ = metrics.render("text/plain")
    assert b"vk_user1" not in body
    label_names = {name for _, labels in samples(metrics) for name, _ in labels}
    assert label_names <= {
        "provider",
        "model",
        "status",
        "key",
        "kind",
        "decision",
        "outcome",
        "result",
        "reason",
        "le",
    }


def test_the_json_summary_has_the_seed_shape() -> None:
    metrics = Metrics()
    metrics.observe(finished_record(duration_ms=100.0, usage=Usage(10, 5)))
    metrics.observe(finished_record(duration_ms=300.0, usage=Usage(1, 2)))
    metrics.observe(finished_record(provider="anthropic", duration_ms=200.0, usage=None))
    metrics.quota_rejected("user1")

    found = summary(metrics)
    last_updated = found.pop("last_updated")
    assert found == {
        "total_requests": 3,
        "requests_by_provider": {"anthropic": 1, "openai": 2},
        "average_response_ms": 200.0,
        "tokens": {"prompt": 11, "completion": 7, "total": 18},
        "rate_limited": 1,
    }
    assert isinstance(last_updated, str) and last_updated.endswith("Z")


def test_the_json_summary_before_any_request_is_zero_and_null() -> None:
    assert summary(Metrics()) == {
        "total_requests": 0,
        "requests_by_provider": {},
        "average_response_ms": 0.0,
        "tokens": {"prompt": 0, "completion": 0, "total": 0},
        "rate_limited": 0,
        "last_updated": None,
    }


def test_prometheus_text_by_default_and_openmetrics_when_asked() -> None:
    metrics = Metrics()
    body, content_type = metrics.render("")
    assert content_type.startswith("text/plain") and b"llm_gateway_requests_in_flight" in body
    body, content_type = metrics.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")


def test_two_apps_in_one_process_keep_separate_numbers() -> None:
    first, second = Metrics(), Metrics()
    first.observe(finished_record())

    assert summary(first)["total_requests"] == 1
    assert summary(second)["total_requests"] == 0


def test_multiprocess_mode_sums_two_workers(tmp_path: Path, restore_value_class: None) -> None:
    # Two workers in one process: each gets the value class its own pid would give it.
    directory = str(tmp_path)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    values.ValueClass = values.MultiProcessValue(lambda: 101)
    first = Metrics(multiprocess_dir=directory)
    first.observe(finished_record(duration_ms=100.0, usage=Usage(10, 5)))
    first.quota_rejected("user1")
    first.request_started()
    first.request_started()
    values.ValueClass = values.MultiProcessValue(lambda: 102)
    second = Metrics(multiprocess_dir=directory)
    second.observe(finished_record(duration_ms=300.0, usage=Usage(1, 2)))
    second.observe(finished_record(provider="anthropic", duration_ms=200.0, usage=None))
    second.request_started()

    for metrics in (first, second):
        found = samples(metrics)
        labels = {"provider": "openai", "model": "gpt-4o-mini", "status": "200"}
        assert value(found, "llm_gateway_requests_total", **labels) == 2
        assert value(found, "llm_gateway_request_duration_seconds_count", provider="openai") == 2
        assert value(found, "llm_gateway_requests_in_flight") == 3
        report = summary(metrics)
        assert report["total_requests"] == 3
        assert report["requests_by_provider"] == {"anthropic": 1, "openai": 2}
        assert report["average_response_ms"] == 200.0
        assert report["tokens"] == {"prompt": 11, "completion": 7, "total": 18}
        assert report["rate_limited"] == 1
        assert report["last_updated"] is not None

    forget_worker(directory, 101)
    assert value(samples(second), "llm_gateway_requests_in_flight") == 1
    assert summary(second)["total_requests"] == 3  # counters outlive the worker


@pytest.mark.parametrize(("is_shared", "entries", "size"), [(False, 8, 800), (True, 5, 500)])
def test_cache_gauges_of_two_workers(
    tmp_path: Path, restore_value_class: None, is_shared: bool, entries: int, size: int
) -> None:
    # In memory each worker holds its own entries: the gauges are their sum. In Redis
    # every worker reports the shared totals: the most recent is the answer.
    directory = str(tmp_path)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    workers = []
    for pid, held in ((101, 3), (102, 5)):
        values.ValueClass = values.MultiProcessValue(lambda pid=pid: pid)
        workers.append(Metrics(multiprocess_dir=directory, cache_is_shared=is_shared))
        workers[-1].cache_size(held, held * 100)

    for metrics in workers:
        found = samples(metrics)
        assert value(found, "llm_gateway_cache_entries") == entries
        assert value(found, "llm_gateway_cache_bytes") == size


def test_one_process_cannot_write_two_multiprocess_directories(
    tmp_path: Path, restore_value_class: None
) -> None:
    Metrics(multiprocess_dir=str(tmp_path / "a"))
    with pytest.raises(ValueError, match="already writes"):
        Metrics(multiprocess_dir=str(tmp_path / "b"))


def test_upstream_error_kinds_cover_every_provider_failure() -> None:
    from proxy.observe.metrics import UPSTREAM_ERROR_KINDS
    from proxy.record import PROVIDER_FAILURES

    assert set(UPSTREAM_ERROR_KINDS) == {
        "status",
        "error_event",
        *(outcome.value for outcome in PROVIDER_FAILURES),
    }


def test_the_watching_page_names_every_series() -> None:
    readme = (ROOT / "docs" / "watching.md").read_text()
    names = {
        family.name
        for family in text_string_to_metric_families(Metrics().render("text/plain")[0].decode())
    }
    assert names
    missing = [
        name
        for name in names
        if name not in readme and f"{name}_total" not in readme and f"{name}_seconds" not in readme
    ]
    assert not missing, f"not in docs/watching.md: {missing}"


def test_the_kept_process_id_is_taken_again_in_a_forked_child() -> None:
    process_id = ProcessId()
    assert process_id() == os.getpid()
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # the child: says what it takes for its id, and leaves at once
        os.write(writer, str(process_id()).encode())
        os._exit(0)
    os.close(writer)
    said = os.read(reader, 64)
    os.close(reader)
    os.waitpid(child, 0)
    assert int(said) == child


def test_one_process_keeps_its_values_in_memory_whatever_prometheus_multiproc_dir_says(
    tmp_path: Path, restore_value_class: None
) -> None:
    """PROMETHEUS_MULTIPROC_DIR set for another server (gunicorn, LiteLLM's charts) made
    prometheus-client write every value to files there from its import: a directory that
    did not exist ended a WORKERS=1 start with a FileNotFoundError traceback, one that did
    gathered a file per start. The gateway chooses itself (WORKERS)."""
    missing = tmp_path / "not-there"
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(missing)
    values.ValueClass = values.get_value_class()  # as prometheus-client's import chose it
    metrics = Metrics()
    metrics.log_write_failed()
    metrics.observe(finished_record())
    found = samples(metrics)
    assert value(found, "llm_gateway_log_write_errors_total") == 1
    assert (
        value(
            found,
            "llm_gateway_requests_total",
            provider="openai",
            model="gpt-4o-mini",
            status="200",
        )
        == 1
    )
    assert not missing.exists()


def test_connections_refused_for_want_of_a_file_descriptor_are_counted_from_zero() -> None:
    # Exported at 0 from the start, so an alert on its increase fires at the first one.
    metrics = Metrics()
    refused = "llm_gateway_connections_refused_total"
    assert (refused, frozenset({("reason", "open_files")})) in samples(metrics)
    assert value(samples(metrics), refused, reason="open_files") == 0.0
    metrics.connection_refused("open_files")
    metrics.connection_refused("open_files")
    assert value(samples(metrics), refused, reason="open_files") == 2.0
    assert value(samples(metrics), refused, reason="max_connections") == 0.0
    metrics.connection_refused("max_connections")
    assert value(samples(metrics), refused, reason="max_connections") == 1.0
