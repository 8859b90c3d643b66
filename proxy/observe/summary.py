"""The seed's JSON summary of /metrics (`Accept: application/json`), from collected series.

It reads the same families Prometheus gets, so one process and the sum over workers
(WORKERS > 1) summarise the same way; it keeps no state of its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from prometheus_client.metrics_core import Metric


def summary(families: Iterable[Metric]) -> dict[str, object]:
    """The seed's JSON summary, computed from collected families (one process or all)."""
    total = 0.0
    by_provider: dict[str, float] = {}
    duration_sum = duration_count = prompt = completion = rate_limited = 0.0
    last_request: float | None = None
    for family in families:
        for sample in family.samples:
            name, value = sample.name, sample.value
            if name == "llm_gateway_requests_total":
                total += value
                provider = sample.labels["provider"]
                by_provider[provider] = by_provider.get(provider, 0) + value
            elif name == "llm_gateway_request_duration_seconds_sum":
                duration_sum += value
            elif name == "llm_gateway_request_duration_seconds_count":
                duration_count += value
            elif name == "llm_gateway_prompt_tokens_total":
                prompt += value
            elif name == "llm_gateway_completion_tokens_total":
                completion += value
            elif name == "llm_gateway_quota_rejections_total":
                rate_limited += value
            elif name == "llm_gateway_last_request_timestamp_seconds" and value > 0:
                last_request = max(value, last_request or 0.0)
    average_ms = duration_sum / duration_count * 1000.0 if duration_count else 0.0
    return {
        "total_requests": int(total),
        "requests_by_provider": {name: int(n) for name, n in sorted(by_provider.items())},
        "average_response_ms": round(average_ms, 1),
        "tokens": {
            "prompt": int(prompt),
            "completion": int(completion),
            "total": int(prompt + completion),
        },
        "rate_limited": int(rate_limited),
        "last_updated": (
            None
            if last_request is None
            else datetime.fromtimestamp(last_request, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z")
        ),
    }
