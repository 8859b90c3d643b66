"""The gateway's /metrics in front of the fake provider: what a scrape shows after requests."""

from __future__ import annotations

import gzip
from typing import Any

import aiohttp
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

# What Prometheus asks for on every scrape (2.x's default scrape protocols), and its encoding.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


async def test_the_overhead_histogram_excludes_the_time_spent_waiting_on_the_provider(
    gateway,
) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import OPENAI_VK, auth

    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    response = await gateway.post(
        "/v1/chat/completions",
        json=body,
        headers={**auth(OPENAI_VK), "x-fake-chunks": "5", "x-fake-delay-ms": "100"},
    )
    await response.read()  # about 0.5 s, nearly all of it the provider's
    text = await (await gateway.get("/metrics")).text()
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(("llm_gateway_overhead_seconds", "llm_gateway_request_duration_seconds"))
    }
    assert samples['llm_gateway_overhead_seconds_count{provider="openai"}'] == 1
    assert samples['llm_gateway_request_duration_seconds_sum{provider="openai"}'] > 0.4
    # Half the provider's 0.5 s: room for a loaded machine's stalls, none for the provider's time.
    assert samples['llm_gateway_overhead_seconds_sum{provider="openai"}'] < 0.25


async def test_upstream_errors_are_exported_at_zero_for_every_provider_from_the_start(
    gateway: Any,
) -> None:
    text = await (await gateway.get("/metrics")).text()
    found = {
        (sample.labels["provider"], sample.labels["kind"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "llm_gateway_upstream_errors_total"
    }
    providers = {"openai", "anthropic", "azure", "local"}  # the test keys file's
    kinds = {"status", "unreachable", "timeout", "broken", "error_event"}
    assert found == {(provider, kind): 0.0 for provider in providers for kind in kinds}


async def test_a_stream_cut_for_the_providers_silence_is_not_counted_as_the_gateways_overhead(
    make_gateway: Any, records: Any
) -> None:
    from tests.conftest import OPENAI_VK, auth

    gateway = await make_gateway(STREAM_IDLE_TIMEOUT="0.5")
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    response = await gateway.post(
        "/v1/chat/completions", json=body, headers={**auth(OPENAI_VK), "x-fake-hang": "midstream"}
    )
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()  # cut after the provider's 0.5 s of silence
    (line,) = await records(1)
    assert line["error"] == "the provider sent nothing for 0.5 seconds"
    text = await (await gateway.get("/metrics")).text()
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(("llm_gateway_overhead_seconds", "llm_gateway_request_duration_seconds"))
    }
    assert samples['llm_gateway_request_duration_seconds_sum{provider="openai"}'] >= 0.5
    assert samples['llm_gateway_overhead_seconds_count{provider="openai"}'] == 1
    assert samples['llm_gateway_overhead_seconds_sum{provider="openai"}'] < 0.25  # as above


async def test_made_up_models_the_provider_refuses_never_take_the_label_of_a_real_one(
    make_gateway: Any,
) -> None:
    """A client with a valid key sends more made-up model names than the model label holds
    (the provider answers each 404, as it does a model it does not serve): a model the
    provider does serve, asked afterwards, is still counted under its own name."""
    from proxy.observe.metrics import MODEL_LABEL_UNANSWERED, MODEL_LABEL_VALUES
    from tests.conftest import OPENAI_VK, auth
    from tests.support.bodies import chat

    gateway = await make_gateway(QUOTA_ENABLED="false")
    refused = {**auth(OPENAI_VK), "x-fake-status": "404"}
    for n in range(MODEL_LABEL_VALUES + 10):
        response = await gateway.post(
            "/v1/chat/completions", json=chat(model=f"junk-{n}"), headers=refused
        )
        assert response.status == 404
    response = await gateway.post(
        "/v1/chat/completions", json=chat(model="gpt-4o-mini"), headers=auth(OPENAI_VK)
    )
    assert response.status == 200

    text = await (await gateway.get("/metrics")).text()
    found = {
        (sample.labels["model"], sample.labels["status"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "llm_gateway_requests_total"
    }
    # A few refused names keep theirs (a typo shows as itself); the rest are `other`.
    named = {(f"junk-{n}", "404"): 1.0 for n in range(MODEL_LABEL_UNANSWERED)}
    rest = MODEL_LABEL_VALUES + 10 - MODEL_LABEL_UNANSWERED
    assert found == {**named, ("other", "404"): rest, ("gpt-4o-mini", "200"): 1}


async def test_made_up_models_a_keys_target_model_replaces_never_take_the_label_of_a_real_one(
    gateway_with_keys: Any,
) -> None:
    """A key whose target names the model (keys.json `model`) has any name a client sends
    answered, as the target's model: the made-up names are not what the provider served, and
    a model another key asks afterwards by its own name is still counted under it."""
    from proxy.observe.metrics import MODEL_LABEL_UNANSWERED, MODEL_LABEL_VALUES
    from tests.conftest import OPENAI_VK, auth
    from tests.support.bodies import chat

    pinned = "vk_test_pinned_3c5e7a9b1d"
    key = {"provider": "openai", "api_key": "sk-pinned-real-1234567", "model": "gpt-4o-mini"}
    gateway = await gateway_with_keys({pinned: key}, QUOTA_ENABLED="false")
    for n in range(MODEL_LABEL_VALUES + 10):
        response = await gateway.post(
            "/v1/chat/completions", json=chat(model=f"junk-{n}"), headers=auth(pinned)
        )
        assert response.status == 200
    for model, vk in (("gpt-4o-mini", pinned), ("gpt-4o", OPENAI_VK)):
        response = await gateway.post(
            "/v1/chat/completions", json=chat(model=model), headers=auth(vk)
        )
        assert response.status == 200

    text = await (await gateway.get("/metrics")).text()
    found = {
        sample.labels["model"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "llm_gateway_requests_total"
    }
    named = {f"junk-{n}": 1.0 for n in range(MODEL_LABEL_UNANSWERED)}
    rest = MODEL_LABEL_VALUES + 10 - MODEL_LABEL_UNANSWERED
    assert found == {**named, "other": rest, "gpt-4o-mini": 1, "gpt-4o": 1}


async def test_every_quota_refusal_is_counted_by_its_limit_for_a_key_of_its_own_too(
    gateway_with_keys: Any,
) -> None:
    """A key in no team (no slots, no model groups) refused over its window or its budget,
    again when known to be refused before a large body is read: each refusal in
    llm_gateway_limit_refusals_total by its limit, as for a key in a team, so the two
    refusal counters add up to the same."""
    from tests.conftest import LIMITED_VK, auth
    from tests.support.bodies import CHAT, chat

    budgeted = "vk_test_metrics_budgeted_0a9b8c7d"
    gateway = await gateway_with_keys(
        {
            budgeted: {
                "provider": "openai",
                "api_key": "sk-metrics-budgeted-real-0001",
                "name": "budgeted",
                "budget": {"usd": 0.000001},
            }
        }
    )
    statuses = [
        (await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(LIMITED_VK))).status
        for _ in range(4)
    ]
    large = chat("word " * 20_000)  # over 64 KiB: refused before it is read
    refused = await gateway.post("/v1/chat/completions", json=large, headers=auth(LIMITED_VK))
    statuses.append(refused.status)
    for _ in range(2):
        response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(budgeted))
        statuses.append(response.status)
    assert statuses == [200, 200, 200, 429, 429, 200, 429]
    text = await (await gateway.get("/metrics")).text()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "llm_gateway_limit_refusals_total":
                found[f"{labels['scope']}/{labels['limit']}/{labels['team']}"] = sample.value
            if sample.name == "llm_gateway_quota_rejections_total":
                found[labels["key"]] = sample.value
    assert found == {"limited": 2, "budgeted": 1, "key/requests/": 2, "key/budget/": 1}


async def test_a_spent_key_refused_before_its_100_continue_is_counted_once(
    gateway_with_keys: Any,
) -> None:
    """A client holding its body back (Expect: 100-continue, as curl does past 1 KiB) with a
    key known to be refused gets its 429 without sending the body: one request refused,
    counted once by each refusal counter, which add up to the same."""
    import asyncio

    from tests.conftest import LIMITED_VK, auth
    from tests.support.bodies import CHAT

    gateway = await gateway_with_keys({})
    statuses = [
        (await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(LIMITED_VK))).status
        for _ in range(4)
    ]
    assert statuses == [200, 200, 200, 429]
    reader, writer = await asyncio.open_connection(gateway.server.host, gateway.server.port)
    try:
        head = [
            b"POST /v1/chat/completions HTTP/1.1",
            b"Host: gateway",
            f"Authorization: Bearer {LIMITED_VK}".encode(),
            b"Content-Type: application/json",
            b"Content-Length: 100",
            b"Expect: 100-continue",
        ]
        writer.write(b"\r\n".join([*head, b"", b""]))
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
    assert line.startswith(b"HTTP/1.1 429"), line
    text = await (await gateway.get("/metrics")).text()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "llm_gateway_limit_refusals_total":
                found[f"{sample.labels['scope']}/{sample.labels['limit']}"] = sample.value
            if sample.name == "llm_gateway_quota_rejections_total":
                found[sample.labels["key"]] = sample.value
    assert found == {"limited": 2, "key/requests": 2}


async def test_a_scrape_that_accepts_gzip_gets_the_metrics_gzipped(gateway: Any) -> None:
    """Prometheus sends `Accept-Encoding: gzip` with every scrape, and prometheus-client's own
    exposition answers it gzipped: /metrics came back uncompressed, about six times the bytes
    on every scrape of every instance. A scraper that asks for no encoding gets plain text."""
    from tests.conftest import OPENAI_VK, auth
    from tests.support.bodies import CHAT

    answered = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(OPENAI_VK))
    assert answered.status == 200
    scrape = {"accept": PROMETHEUS_ACCEPT, "accept-encoding": "gzip"}
    response = await gateway.get("/metrics", headers=scrape, auto_decompress=False)
    assert response.status == 200
    assert response.headers["content-encoding"] == "gzip"
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    text = gzip.decompress(await response.read()).decode()
    assert text.endswith("# EOF\n")
    requests = {
        sample.labels["model"]: sample.value
        for family in openmetrics_families(text)
        for sample in family.samples
        if sample.name == "llm_gateway_requests_total"
    }
    assert requests == {"gpt-4o-mini": 1}
    plain = await gateway.get(
        "/metrics", headers={"accept-encoding": "identity"}, auto_decompress=False
    )
    assert "content-encoding" not in plain.headers
    assert (await plain.text()).startswith("# HELP llm_gateway_requests_total ")


async def test_a_scrape_after_mixed_traffic_parses_as_prometheus_text_and_openmetrics(
    make_gateway: Any, fake_base: str, tmp_path: Any
) -> None:
    """What Prometheus and prometheus-client's parsers read after answers, streams, refusals
    over a team's window and an unknown key, with a key, a team and a model named
    with a quote, a backslash, a line break and non-ASCII: OpenMetrics when the scrape asks
    as Prometheus does (its counters declared without `_total`, no `_created`, `# EOF`),
    Prometheus text otherwise; each name read back as written (the model's line break
    replaced), and no key of the file anywhere."""
    import json

    from tests.conftest import OPENAI_VK, SECRETS, auth, keys_document
    from tests.support.bodies import CHAT, STREAM, chat

    odd_key, odd_team, odd_model = 'we"ird\\name ✓', 'te"am\\x ünï', 'm"o\\d\nel ✓'
    odd_vk = "vk_test_metrics_odd_0123456789"
    document = keys_document(fake_base)
    document["teams"] = {odd_team: {"quota": {"requests": 1}}}
    document["virtual_keys"][odd_vk] = {
        "provider": "openai",
        "api_key": "sk-metrics-odd-real-0123456789",
        "name": odd_key,
        "team": odd_team,
    }
    keys = tmp_path / "odd-keys.json"
    keys.write_text(json.dumps(document))
    gateway = await make_gateway(KEYS_FILE_PATH=str(keys))
    statuses = []
    for key, body in (
        (OPENAI_VK, CHAT),
        (OPENAI_VK, STREAM),
        (OPENAI_VK, chat(model=odd_model)),
        (odd_vk, CHAT),
        (odd_vk, CHAT),  # over its team's window
        ("vk_unknown_0123456789", CHAT),
    ):
        response = await gateway.post("/v1/chat/completions", json=body, headers=auth(key))
        await response.read()
        statuses.append(response.status)
    assert statuses == [200, 200, 200, 200, 429, 401]
    scraped = await gateway.get("/metrics", headers={"accept": PROMETHEUS_ACCEPT})
    assert scraped.headers["content-type"].startswith("application/openmetrics-text")
    openmetrics = await scraped.text()
    assert openmetrics.endswith("# EOF\n")
    plain = await (await gateway.get("/metrics")).text()
    for text, parse in (
        (openmetrics, openmetrics_families),
        (plain, text_string_to_metric_families),
    ):
        assert not [secret for secret in [*SECRETS, odd_vk] if secret in text]
        families = list(parse(text))
        names = {sample.name for family in families for sample in family.samples}
        assert not [name for name in names if name.endswith("_created")]
        counters = [family for family in families if family.type == "counter"]
        assert all(not family.name.endswith("_total") for family in counters)
        assert all(s.name.endswith("_total") for family in counters for s in family.samples)
        labels = {
            (sample.name, name, value)
            for family in families
            for sample in family.samples
            for name, value in sample.labels.items()
        }
        assert ("llm_gateway_quota_rejections_total", "key", odd_key) in labels
        assert ("llm_gateway_requests_total", "model", 'm"o\\d\ufffdel ✓') in labels
        assert ("llm_gateway_limit_refusals_total", "team", odd_team) in labels
