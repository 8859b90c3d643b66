"""Issue 22's repro scenarios on the gateways of two checkouts: what each request is charged.

    .venv/bin/python bench/charging.py --before /tmp/before22 --after . [--only P1,P5]

Each scenario runs once on each checkout's gateway.py (a fresh process, its own keys.json,
the log to a file), against this checkout's fake provider (tests/support/fake_provider.py,
a real aiohttp server in this process, so what it generated can be read), and the charge is
read as a user reads it: the key's `GET /usage` (tokens in its window, totals of tokens and
dollars), once nothing is reserved any more. One row per scenario, before and after:

- P1: four streamed chat requests, each generating 400,000 characters of tool-call arguments
  (or `reasoning_content`) in 200-character deltas, a provider that sends no usage; a key
  with a 1,000-token window. And the same with a provider that reports usage when asked.
- P2: `bench/timeouts.py`'s `slow` scenario: REQUEST_TIMEOUT=2, RETRY_ATTEMPTS=2, a fallback
  pool of three keys, one non-streamed request the provider takes 5 s to answer.
- P3: a background + stream Responses POST cut at `response.output_text.done`, then fetched;
  a finished background response fetched by a second key sharing the real key, then by its
  own; an OpenAI batch and an Anthropic message batch created and retrieved finished twice
  (when the fake has batches: tests/support/fake_batches.py). On two workers sharing Redis.
- P4: 300 concurrent requests without max_tokens (the provider answers after 2 s) against a
  key with a 100-token window and a $0.01 budget, on two workers sharing Redis (one worker
  in memory when redis-server is missing: the row says so); and the same with max_tokens.
- P5: a key restricted to one model: the status of requests naming their model elsewhere;
  a metered key's images, speech and transcription: requests, tokens and dollars charged.
- P6: two keys on one provider whose fallback is priced 1,000x higher; key A's three
  requests outlast REQUEST_TIMEOUT=1; where key B's next three requests go, what B pays.
  Then keys A and C time out in turn (the breaker opens on any checkout) and key D, with a
  $0.01 budget, sends five requests at once: what the fallback serving them costs D.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from harness import ROOT, Processes, free_port, healthy, listening, wait_until

sys.path.insert(0, str(ROOT))
import timeouts  # noqa: E402

from tests.support.fake_provider import (  # noqa: E402
    FAKE_STATE,
    FakeState,
    build_fake_provider,
    credential,
)

MODEL = "gpt-4o-mini"
REAL_KEY = "sk-bench-charging-0000000000"
FALLBACK_KEY = "sk-bench-charging-fallback-00"
KEY_A, KEY_B = "vk_bench_charging_a_0123456789", "vk_bench_charging_b_0123456789"
ROOMY = {"requests": 100_000, "tokens": 100_000_000, "window_seconds": 3600}
BUDGET = {"usd": 1000, "window_seconds": 3600}
GENERATED_CHARS = 400_000
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "write_file",
            "description": "Write a file",
            "parameters": {"type": "object", "properties": {"content": {"type": "string"}}},
        },
    }
]
ESSAY = [{"role": "user", "content": "Write a long essay about the sea."}]


class Rig:
    """One scenario on one checkout: the fake provider (in this process), the gateway's
    children and a temp directory; `gateway()` starts a gateway.py with a keys document."""

    def __init__(self, checkout: Path, tmp: Path, procs: Processes) -> None:
        self.checkout, self.tmp, self.procs = checkout, tmp, procs
        self.runner: web.AppRunner | None = None
        self.upstream = ""

    async def __aenter__(self) -> Rig:
        self.runner = web.AppRunner(
            build_fake_provider(), handler_cancellation=True, access_log=None
        )
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.upstream = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    @property
    def app(self) -> web.Application:
        assert self.runner is not None
        return self.runner.app

    @property
    def fake(self) -> FakeState:
        return self.app[FAKE_STATE]

    def providers(self, *names: str) -> dict[str, Any]:
        return {name: {"base_url": f"{self.upstream}/v1"} for name in names}

    async def gateway(
        self,
        keys: dict[str, Any],
        prices: dict[str, Any] | None = None,
        providers: dict[str, Any] | None = None,
        **env: str,
    ) -> str:
        """Start the checkout's gateway.py with these virtual keys; its base URL."""
        document = {"providers": providers or self.providers("openai"), "virtual_keys": keys}
        (self.tmp / "keys.json").write_text(json.dumps(document))
        port = free_port()
        argv = [
            sys.executable, str(self.checkout / "gateway.py"), "--server-host", "127.0.0.1",
            "--server-port", str(port), "--keys-file-path", str(self.tmp / "keys.json"),
            "--log-to-file", "true", "--log-file-path", str(self.tmp / "log.jsonl"),
        ]  # fmt: skip
        if prices is not None:
            (self.tmp / "prices.json").write_text(json.dumps(prices))
            argv += ["--prices-file", str(self.tmp / "prices.json")]
        for name, value in env.items():
            argv += [f"--{name.lower().replace('_', '-')}", value]
        log = self.tmp / "gateway.log"
        child = self.procs.start(argv, None, log)
        await asyncio.to_thread(wait_until, lambda: healthy(port), "the gateway", child, log, 30)
        return f"http://127.0.0.1:{port}"


def key(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "provider": "openai", "api_key": REAL_KEY, **fields}


def session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=120),
    )


def bearer(virtual_key: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {virtual_key}", **headers}


async def post(
    client: aiohttp.ClientSession, url: str, virtual_key: str, body: Any, **headers: str
) -> tuple[int, bytes]:
    async with client.post(url, json=body, headers=bearer(virtual_key, **headers)) as got:
        return got.status, await got.read()


async def usage(client: aiohttp.ClientSession, base: str, virtual_key: str) -> dict[str, Any]:
    """The key's /usage once nothing is reserved and two readings agree (settles run after
    the answer went out, with Redis on another process)."""
    deadline, last = time.monotonic() + 15, None
    while True:
        async with client.get(f"{base}/usage", headers=bearer(virtual_key)) as got:
            report = await got.json()
        tokens, budget = report.get("tokens") or {}, report.get("budget") or {}
        held = tokens.get("reserved", 0) or budget.get("reserved_usd", 0)
        reading = (report["totals"], tokens.get("used"), budget.get("spent_usd"))
        if (not held and reading == last) or time.monotonic() > deadline:
            return report
        last = reading
        await asyncio.sleep(0.2)


def dollars(usd: float) -> str:
    """$0.000008, never 8e-06."""
    return "$" + (f"{usd:.8f}".rstrip("0").rstrip(".") if usd else "0")


def tokens_usd(report: dict[str, Any]) -> tuple[int, float]:
    totals = report["totals"]
    return totals["tokens"], totals["spent_usd"]


def charged(report: dict[str, Any]) -> str:
    tokens, usd = tokens_usd(report)
    return f"{tokens:,} tokens, {dollars(usd)}"


def statuses(codes: list[int]) -> str:
    """200 x3, 429 x1."""
    counted: dict[int, int] = {}
    for code in codes:
        counted[code] = counted.get(code, 0) + 1
    return ", ".join(f"{code} x{n}" if n > 1 else str(code) for code, n in sorted(counted.items()))


async def shared(rig: Rig) -> tuple[dict[str, str], str]:
    """Two workers on a Redis of their own, as a deployment shares its counts; one worker in
    memory when redis-server is missing. The gateway's settings, and those words."""
    if not shutil.which("redis-server"):
        return {}, "one worker in memory: no redis-server here"
    port, log = free_port(), rig.tmp / "redis.log"
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(rig.tmp)]  # fmt: skip
    redis = rig.procs.start(argv, None, log)
    await asyncio.to_thread(wait_until, lambda: listening(port), "redis-server", redis, log)
    return {"REDIS_URL": f"redis://127.0.0.1:{port}", "WORKERS": "2"}, "two workers on Redis"


# --- P1: streams of tool-call arguments and reasoning ----------------------------------


async def p1(rig: Rig) -> dict[str, str]:
    window = {"requests": 1000, "tokens": 1000, "window_seconds": 3600}
    tools = {"tools": TOOLS, "tool_choice": "required"}
    generated = str(GENERATED_CHARS)
    variants = [
        ("P1 tool-call arguments, no usage", tools, {"x-fake-tool-chars": generated}, False),
        ("P1 reasoning_content, no usage", {}, {"x-fake-reasoning-chars": generated}, False),
        (
            "P1 tool-call arguments, usage sent when asked",
            tools,
            {"x-fake-tool-chars": generated},
            True,
        ),
    ]
    # Each variant on its own key (the same limits), so each starts from an empty window.
    names = [f"vk_bench_charging_p1_{n}_0123456789" for n in range(len(variants))]
    base = await rig.gateway({name: key(name[-14:], quota=window) for name in names})
    rows = {}
    async with session() as client:
        for virtual_key, (label, extra, headers, is_usage_sent) in zip(
            names, variants, strict=False
        ):
            if not is_usage_sent:
                headers = {**headers, "x-fake-no-usage": "1"}
            codes = []
            for _ in range(4):
                body = {"model": MODEL, "messages": ESSAY, "stream": True, **extra}
                url = f"{base}/v1/chat/completions"
                code, _ = await post(
                    client, url, virtual_key, body, **{"x-fake-piece-chars": "200"}, **headers
                )
                codes.append(code)
            report = await usage(client, base, virtual_key)
            tokens = report["tokens"]
            rows[label] = (
                f"{statuses(codes)}; window {tokens['used']:,} of {tokens['limit']:,} tokens, "
                f"{dollars(report['totals']['spent_usd'])}"
            )
    return rows


# --- P2: a timeout and its fallbacks ----------------------------------------------------


async def p2(rig: Rig) -> dict[str, str]:
    got = await timeouts.slow(rig.checkout, rig.tmp, rig.procs)
    return {
        "P2 slow request, timeout 2 s, pool of 3": (
            f"{got['status']} after {got['seconds']:.1f} s; the provider generated "
            f"{got['generated']} answer{'s' if got['generated'] != 1 else ''}; charged {got['tokens']:,} tokens, {dollars(got['usd'])}"
        )
    }


# --- P3: background responses and batches -----------------------------------------------


P3_CUT, P3_OWNER, P3_OTHER, P3_BATCH, P3_MESSAGES = (
    f"vk_bench_charging_{name}_0123456789" for name in ("cut", "owner", "other", "batch", "msgs")
)


async def p3(rig: Rig) -> dict[str, str]:
    # A key per case (each starts from nothing); the owner and the other share a real key.
    keys = {
        name: key(name[18:-11], quota=ROOMY, budget=BUDGET)
        for name in (P3_CUT, P3_OWNER, P3_OTHER, P3_BATCH)
    }
    keys[P3_MESSAGES] = {
        "name": "msgs",
        "provider": "anthropic",
        "api_key": "sk-ant-bench-charging-0000",
        "quota": ROOMY,
        "budget": BUDGET,
    }
    providers = {**rig.providers("openai"), "anthropic": {"base_url": f"{rig.upstream}/v1"}}
    env, where = await shared(rig)
    base = await rig.gateway(keys, providers=providers, **env)
    rows = {}
    async with session() as client:
        rows[
            f"P3 background stream cut at output_text.done, then GET ({where})"
        ] = await cut_background(rig, client, base)
        rows[
            "P3 background response fetched by a 2nd key, then its own"
        ] = await fetched_by_another(rig, client, base)
        if importlib.util.find_spec("tests.support.fake_batches") is None:
            absent = (
                "not measured: the fake provider has no batches (tests/support/fake_batches.py)"
            )
            rows["P3 OpenAI batch, retrieved finished twice"] = absent
            rows["P3 Anthropic message batch, retrieved ended twice"] = absent
        else:
            rows["P3 OpenAI batch, retrieved finished twice"] = await openai_batch(
                rig, client, base
            )
            rows["P3 Anthropic message batch, retrieved ended twice"] = await anthropic_batch(
                rig, client, base
            )
    return rows


def provider_count(rig: Rig, response_id: str) -> str:
    found = rig.fake.background.get(response_id)
    if found is None or not found.done.get("usage"):
        return "?"
    return f"{found.done['usage']['total_tokens']:,}"


async def cut_background(rig: Rig, client: aiohttp.ClientSession, base: str) -> str:
    body = {"model": MODEL, "input": "Write a long essay about the sea.", "background": True,
            "stream": True}  # fmt: skip
    headers = bearer(P3_CUT, **{"x-fake-chunks": "50", "x-fake-delay-ms": "20"})
    response_id, seen_done = "", False
    async with client.post(f"{base}/v1/responses", json=body, headers=headers) as got:
        status = got.status
        async for line in got.content:
            text = line.decode().strip()
            if not response_id and text.startswith("data: "):
                response_id = json.loads(text[6:]).get("response", {}).get("id", "")
            if text == "event: response.output_text.done":
                seen_done = True
                break
        got.close()  # the client leaves here, before response.completed
    if status != 200 or not seen_done:
        return f"{status}: no output_text.done seen"
    after_cut = await usage(client, base, P3_CUT)
    async with client.get(f"{base}/v1/responses/{response_id}", headers=bearer(P3_CUT)) as got:
        fetched = got.status
        await got.read()
    after_get = await usage(client, base, P3_CUT)
    return (
        f"cut: {charged(after_cut)}; after a GET ({fetched}): {charged(after_get)} "
        f"(the provider's count: {provider_count(rig, response_id)} tokens)"
    )


async def fetched_by_another(rig: Rig, client: aiohttp.ClientSession, base: str) -> str:
    body = {"model": MODEL, "input": "Write a long essay about the sea.", "background": True}
    status, answer = await post(
        client, f"{base}/v1/responses", P3_OWNER, body, **{"x-fake-chunks": "50"}
    )
    if status != 200:
        return f"POST {status}"
    response_id = json.loads(answer)["id"]
    url = f"{base}/v1/responses/{response_id}"
    fetched, finished = await get_json(client, url, bearer(P3_OTHER), "status")
    by_owner, by_other = await usage(client, base, P3_OWNER), await usage(client, base, P3_OTHER)
    again, _ = await get_json(client, url, bearer(P3_OWNER), "status")
    at_last = await usage(client, base, P3_OWNER)
    return (
        f"GET by the other key ({fetched} {finished}): owner charged {charged(by_owner)}, "
        f"other {charged(by_other)}; then a GET by the owner ({again}): owner "
        f"{charged(at_last)} (the provider's count: {provider_count(rig, response_id)} tokens)"
    )


async def get_json(
    client: aiohttp.ClientSession, url: str, headers: dict[str, str], field: str
) -> tuple[int, Any]:
    """A GET's status and one field of its JSON answer."""
    async with client.get(url, headers=headers) as got:
        return got.status, (await got.json(content_type=None)).get(field)


def batch_lines(count: int) -> bytes:
    lines = [
        {"custom_id": f"r{n}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": MODEL, "messages": ESSAY}}
        for n in range(count)
    ]  # fmt: skip
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def batch_tokens(rig: Rig, batch_id: str) -> str:
    from tests.support.fake_batches import FAKE_BATCHES

    found = rig.app[FAKE_BATCHES].batches.get(batch_id)
    return "?" if found is None else f"{found.tokens:,}"


async def openai_batch(rig: Rig, client: aiohttp.ClientSession, base: str) -> str:
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", batch_lines(3), filename="batch.jsonl", content_type="application/jsonl")
    async with client.post(f"{base}/v1/files", data=form, headers=bearer(P3_BATCH)) as got:
        uploaded = await got.json()
        if got.status != 200 or "id" not in uploaded:
            return f"file upload {got.status}"
    body = {"input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions",
            "completion_window": "24h"}  # fmt: skip
    status, answer = await post(client, f"{base}/v1/batches", P3_BATCH, body)
    if status != 200:
        return f"POST /v1/batches {status}: {answer[:120]!r}"
    batch_id = json.loads(answer)["id"]
    url = f"{base}/v1/batches/{batch_id}"
    _, finished = await get_json(client, url, bearer(P3_BATCH), "status")
    _, again = await get_json(client, url, bearer(P3_BATCH), "status")
    report = await usage(client, base, P3_BATCH)
    return (
        f"3 requests, GET {finished}, GET {again}: charged {charged(report)} "
        f"(the provider's count: {batch_tokens(rig, batch_id)} tokens)"
    )


async def anthropic_batch(rig: Rig, client: aiohttp.ClientSession, base: str) -> str:
    params = {"model": "claude-3-5-haiku-latest", "max_tokens": 100, "messages": ESSAY}
    body = {"requests": [{"custom_id": f"r{n}", "params": params} for n in range(3)]}
    headers = {"x-api-key": P3_MESSAGES, "anthropic-version": "2023-06-01"}
    async with client.post(f"{base}/v1/messages/batches", json=body, headers=headers) as got:
        status, answer = got.status, await got.read()
    if status != 200:
        return f"POST /v1/messages/batches {status}: {answer[:120]!r}"
    batch_id = json.loads(answer)["id"]
    url = f"{base}/v1/messages/batches/{batch_id}"
    _, finished = await get_json(client, url, headers, "processing_status")
    _, again = await get_json(client, url, headers, "processing_status")
    report = await usage(client, base, P3_MESSAGES)
    return (
        f"3 requests, GET {finished}, GET {again}: charged {charged(report)} "
        f"(the provider's count: {batch_tokens(rig, batch_id)} tokens)"
    )


# --- P4: uncapped requests at once ------------------------------------------------------

CONCURRENT = 300
EXPENSIVE = {"openai": {"*": {"input_mtok": 100.0, "output_mtok": 100.0}}}
# Three words in, 64 out: 67 tokens a request, $0.0067 at $100 a million.
SHORT = [{"role": "user", "content": "Say something long."}]


async def p4(rig: Rig) -> dict[str, str]:
    limits = {
        "quota": {"requests": 100_000, "tokens": 100, "window_seconds": 3600},
        "budget": {"usd": 0.01, "window_seconds": 3600},
    }
    keys = {KEY_A: key("uncapped", **limits), KEY_B: key("capped", **limits)}
    env, where = await shared(rig)
    base = await rig.gateway(keys, prices=EXPENSIVE, **env)
    rows = {}
    async with session() as client:
        for virtual_key, cap, label in (
            (KEY_A, {}, f"P4 300 at once, no max_tokens ({where})"),
            (KEY_B, {"max_tokens": 64}, "P4 the same with max_tokens 64"),
        ):
            body = {"model": MODEL, "messages": SHORT, **cap}
            url = f"{base}/v1/chat/completions"
            knobs = {"x-fake-chunks": "64", "x-fake-think-ms": "2000"}
            answers = await asyncio.gather(
                *(post(client, url, virtual_key, body, **knobs) for _ in range(CONCURRENT))
            )
            report = await usage(client, base, virtual_key)
            tokens, usd = tokens_usd(report)
            rows[label] = (
                f"{statuses([code for code, _ in answers])}; {tokens:,} tokens against 100, "
                f"{dollars(usd)} against $0.01"
            )
    return rows


# --- P5: requests that name their model elsewhere; endpoints without token usage --------


async def p5(rig: Rig) -> dict[str, str]:
    restricted = "vk_bench_charging_r_0123456789"
    keys = {
        restricted: key("restricted", allowed_models=[MODEL]),
        KEY_A: key("metered", quota=ROOMY, budget=BUDGET),
    }
    base = await rig.gateway(keys)  # the bundled prices: tts-1, whisper-1, gpt-image-1
    rows = {}
    asks = [
        ("P5 restricted: POST /v1/realtime/client_secrets", "/v1/realtime/client_secrets",
         {"session": {"type": "realtime", "model": "gpt-realtime"}}),
        ("P5 restricted: /v1/responses with a stored prompt id", "/v1/responses",
         {"prompt": {"id": "pmpt_bench0123"}, "input": "hello"}),
        ("P5 restricted: /v1/threads/{id}/runs with assistant_id",
         "/v1/threads/thread_bench0123/runs", {"assistant_id": "asst_bench0123"}),
        ("P5 restricted: /v1/images/generations without model", "/v1/images/generations",
         {"prompt": "a lighthouse at dusk"}),
    ]  # fmt: skip
    async with session() as client:
        for label, path, body in asks:
            status, answer = await post(client, f"{base}{path}", restricted, body)
            minted = b'"ek_' in answer
            rows[label] = f"{status}" + ("; an ephemeral provider key minted" if minted else "")
        media: list[tuple[str, str, Any]] = [
            ("P5 metered: image, gpt-image-1", "/v1/images/generations",
             {"model": "gpt-image-1", "prompt": "a lighthouse at dusk"}),
            ("P5 metered: image, dall-e-3", "/v1/images/generations",
             {"model": "dall-e-3", "prompt": "a lighthouse at dusk"}),
            ("P5 metered: speech, tts-1, 44 characters", "/v1/audio/speech",
             {"model": "tts-1", "voice": "alloy",
              "input": "The quick brown fox jumps over the lazy dog."}),
            ("P5 metered: transcription, whisper-1 (90 s)", "/v1/audio/transcriptions", None),
        ]  # fmt: skip
        before = await usage(client, base, KEY_A)
        for label, path, body in media:
            if body is None:
                form = aiohttp.FormData()
                form.add_field("model", "whisper-1")
                form.add_field("file", b"\0" * 2048, filename="a.mp3", content_type="audio/mpeg")
                async with client.post(f"{base}{path}", data=form, headers=bearer(KEY_A)) as got:
                    status = got.status
                    await got.read()
            else:
                status, _ = await post(client, f"{base}{path}", KEY_A, body)
            after = await usage(client, base, KEY_A)
            was, now = before["totals"], after["totals"]
            rows[label] = (
                f"{status}; +{now['requests'] - was['requests']} request, "
                f"+{now['tokens'] - was['tokens']:,} tokens, "
                f"+{dollars(now['spent_usd'] - was['spent_usd'])}"
            )
            before = after
    return rows


# --- P6: one key's timeouts and everyone's fallback --------------------------------------


P6_C, P6_D = "vk_bench_charging_c_0123456789", "vk_bench_charging_d_0123456789"
THINK_5S = {"x-fake-think-ms": "5000"}


async def p6(rig: Rig) -> dict[str, str]:
    def two_targets(name: str, budget: dict[str, Any] = BUDGET) -> dict[str, Any]:
        fallback = [{"provider": "backup", "api_key": FALLBACK_KEY}]
        return key(name, fallbacks=fallback, quota=ROOMY, budget=budget)

    prices = {
        "openai": {"*": {"input_mtok": 1.0, "output_mtok": 4.0}},
        "backup": {"*": {"input_mtok": 1000.0, "output_mtok": 4000.0}},
    }
    keys = {KEY_A: two_targets("a"), KEY_B: two_targets("b"), P6_C: two_targets("c")}
    keys[P6_D] = two_targets("d", {"usd": 0.01, "window_seconds": 3600})
    base = await rig.gateway(
        keys,
        prices=prices,
        providers=rig.providers("openai", "backup"),
        REQUEST_TIMEOUT="1",
        RETRY_DEADLINE_SECONDS="0.5",
    )
    body = {"model": MODEL, "messages": ESSAY, "max_tokens": 100}
    url = f"{base}/v1/chat/completions"
    rows = {}
    async with session() as client:
        slow = [(await post(client, url, KEY_A, body, **THINK_5S))[0] for _ in range(3)]
        rig.fake.requests.clear()
        codes = [(await post(client, url, KEY_B, body))[0] for _ in range(3)]
        served = [credential(seen.headers) for seen in rig.fake.requests]
        breaker = await breaker_state(client, base)
        report = await usage(client, base, KEY_B)
        primary, fallback = served.count(REAL_KEY), served.count(FALLBACK_KEY)
        rows["P6 A: 3 timeouts; B's next 3 requests"] = (
            f"A {statuses(slow)}; B {statuses(codes)}: {primary} primary, {fallback} fallback; "
            f"B charged {dollars(tokens_usd(report)[1])}; primary's breaker {breaker}"
        )
        # Two keys' timeouts open the breaker on any checkout; then a key with a $0.01
        # budget sends five requests at once, all served by the fallback: what they reserve
        # is priced at the primary or at the fallback that serves them.
        for virtual_key in (KEY_A, P6_C, KEY_A, P6_C):
            await post(client, url, virtual_key, body, **THINK_5S)
        breaker = await breaker_state(client, base)
        rig.fake.requests.clear()
        answers = await asyncio.gather(
            *(post(client, url, P6_D, body, **{"x-fake-think-ms": "500"}) for _ in range(5))
        )
        served = [credential(seen.headers) for seen in rig.fake.requests]
        report = await usage(client, base, P6_D)
        rows["P6 then A and C time out; D ($0.01 budget) sends 5 at once"] = (
            f"primary's breaker {breaker}; D {statuses([code for code, _ in answers])}, "
            f"{served.count(FALLBACK_KEY)} at the fallback; "
            f"D charged {dollars(tokens_usd(report)[1])} against $0.01"
        )
    return rows


async def breaker_state(client: aiohttp.ClientSession, base: str) -> str:
    async with client.get(f"{base}/health") as got:
        return str((await got.json())["targets"]["openai"]["state"])


SCENARIOS: dict[str, Callable[[Rig], Awaitable[dict[str, str]]]] = {
    "P1": p1,
    "P2": p2,
    "P3": p3,
    "P4": p4,
    "P5": p5,
    "P6": p6,
}


async def scenario_on(name: str, checkout: Path) -> dict[str, str]:
    procs = Processes()
    with tempfile.TemporaryDirectory() as directory:
        try:
            async with Rig(checkout, Path(directory), procs) as rig:
                return await SCENARIOS[name](rig)
        except Exception as error:
            traceback.print_exc(file=sys.stderr)
            return {name: f"failed: {type(error).__name__}: {str(error)[:200]}"}
        finally:
            procs.stop_all()


def commit(checkout: Path) -> str:
    return subprocess.run(
        ["git", "-C", str(checkout), "log", "-1", "--format=%h %s"],
        capture_output=True,
        text=True,
    ).stdout.strip()[:90]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="checkout before the change")
    parser.add_argument("--after", type=Path, default=ROOT, help="checkout after (default: this)")
    parser.add_argument("--only", default=",".join(SCENARIOS), help="e.g. P1,P5")
    args = parser.parse_args()
    chosen = [name.strip().upper() for name in args.only.split(",") if name.strip()]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; there are {list(SCENARIOS)}")
    print(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    print(f"before: {commit(args.before)}")
    print(f"after:  {commit(args.after)}")
    print("fake provider: this checkout's tests/support/fake_provider.py\n")
    print("| scenario | before | after |")
    print("| --- | --- | --- |")
    for name in chosen:
        before = asyncio.run(scenario_on(name, args.before.resolve()))
        after = asyncio.run(scenario_on(name, args.after.resolve()))
        for label in dict.fromkeys([*before, *after]):
            print(f"| {label} | {before.get(label, '-')} | {after.get(label, '-')} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
