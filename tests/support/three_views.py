"""A platform team's day of mixed traffic, and the three places it watches it add up.

`drive` sends the day through a gateway with the official SDKs (chat plain and streamed,
Anthropic messages plain and streamed, embeddings, Responses over HTTP and WebSocket, a
count_tokens, a cache miss then its hit, a client leaving mid-stream, a failover, a quota
and a budget refusal, a Realtime session). `disagreements` compares what the interaction
log says per key and per team with `GET /usage`, `/admin/keys`, `/admin/teams` and
`/metrics`, leaving out only what docs/watching.md says is counted differently.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Any

import aiohttp
import anthropic
import httpx2
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.quota.tracker import KINDS
from tests.conftest import auth, keys_document
from tests.support.bodies import ANTHROPIC_MODEL, OPENAI_MODEL, chat, messages

ADMIN = "admin-token-for-three-views-0123456789"
KEYS = {
    "alice": "vk_test_alice_three_views_01",
    "bob": "vk_test_bob_three_views_0002",
    "carol": "vk_test_carol_three_views_03",
    "dave": "vk_test_dave_three_views_004",
    "erin": "vk_test_erin_three_views_005",
    "frank": "vk_test_frank_three_views_06",
}
FRANK_PRIMARY = "sk-frank-primary-real-000111"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}
TURNS = 2  # of alice's Responses WebSocket session: each a request in /usage


def document(base: str, frank_provider: str = "openai") -> dict[str, Any]:
    """Two teams: research (alice, with exact stream usage and a budget; bob, Anthropic)
    and ops (carol, with a cache; dave, 2 requests an hour; frank, failing over); erin in
    none, with a budget of one micro-dollar. `frank_provider`: where frank's primary is."""
    document = keys_document(base)
    document["teams"] = {"research": {"budget": {"usd": 100}}, "ops": {}}
    document["virtual_keys"] = {
        KEYS["alice"]: {
            "provider": "openai",
            "api_key": "sk-alice-real-00000001",
            "name": "alice",
            "team": "research",
            "budget": {"usd": 50},
        },
        KEYS["bob"]: {
            "provider": "anthropic",
            "api_key": "sk-ant-bob-real-0002",
            "name": "bob",
            "team": "research",
        },
        KEYS["carol"]: {
            "provider": "openai",
            "api_key": "sk-carol-real-00000003",
            "name": "carol",
            "team": "ops",
            "cache": {"ttl_seconds": 300},
        },
        KEYS["dave"]: {
            "provider": "openai",
            "api_key": "sk-dave-real-000000004",
            "name": "dave",
            "team": "ops",
            "quota": {"requests": 2, "window_seconds": 3600},
        },
        KEYS["erin"]: {
            "provider": "openai",
            "api_key": "sk-erin-real-000000005",
            "name": "erin",
            "budget": {"usd": 0.000001},
        },
        KEYS["frank"]: {
            "provider": frank_provider,
            "api_key": FRANK_PRIMARY,
            "name": "frank",
            "team": "ops",
            "fallbacks": [{"provider": "openai", "api_key": "sk-frank-fallback-real-0222"}],
        },
    }
    return document


def _fresh() -> httpx2.AsyncClient:
    """No kept-alive connections: with WORKERS, each request may reach either worker."""
    return httpx2.AsyncClient(limits=httpx2.Limits(max_keepalive_connections=0))


def _openai(root: str, name: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        api_key=KEYS[name], base_url=f"{root}/v1", max_retries=0, http_client=_fresh()
    )


def _ask(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


async def drive(root: str) -> int:
    """The day's traffic through the gateway at `root`; the number of log lines it makes."""
    alice = _openai(root, "alice")
    await alice.chat.completions.create(  # with cache reads and reasoning in its usage
        model=OPENAI_MODEL,
        messages=_ask("hello there"),
        extra_headers={"x-fake-cached-tokens": "4", "x-fake-reasoning-tokens": "5"},
    )
    stream = await alice.chat.completions.create(
        model=OPENAI_MODEL, messages=_ask("hello stream"), stream=True
    )
    async for _ in stream:
        pass
    await alice.embeddings.create(model="text-embedding-3-small", input="some words here")
    await alice.responses.create(model=OPENAI_MODEL, input="a question")
    async with alice.responses.connect() as connection:
        for _ in range(TURNS):
            await connection.response.create(model=OPENAI_MODEL, input="hi")
            async for event in connection:
                if event.type == "response.completed":
                    break
    bob = anthropic.AsyncAnthropic(
        api_key=KEYS["bob"], base_url=root, max_retries=0, http_client=_fresh()
    )
    await bob.messages.create(  # with cache writes and reads
        **messages("hello claude", max_tokens=20),
        extra_headers={"x-fake-cache-write-tokens": "7", "x-fake-cached-tokens": "3"},
    )
    async with bob.messages.stream(**messages("hello stream", max_tokens=20)) as events:
        async for _ in events:
            pass
    await bob.messages.count_tokens(model=ANTHROPIC_MODEL, messages=_ask("count these"))
    carol = _openai(root, "carol")
    for _ in range(2):  # a miss, then its hit
        await carol.chat.completions.create(model=OPENAI_MODEL, messages=_ask("cache me"))
    async with aiohttp.ClientSession() as session:
        async with session.post(  # a client that leaves after the first chunk: 499
            f"{root}/v1/chat/completions",
            json=chat("leave early", stream=True),
            headers={**auth(KEYS["carol"]), "x-fake-chunks": "50", "x-fake-delay-ms": "50"},
        ) as response:
            assert response.status == 200
            await response.content.readany()
        socket = await session.ws_connect(
            f"{root}/v1/realtime?model=gpt-4o-realtime-preview",
            headers=auth(KEYS["carol"]),
            protocols=["realtime"],
        )
        await socket.send_str('{"type": "response.create"}')
        while json.loads((await socket.receive()).data)["type"] != "response.done":
            pass
        await socket.close()
    dave = _openai(root, "dave")
    for text in ("one", "two"):
        await dave.chat.completions.create(model=OPENAI_MODEL, messages=_ask(text))
    with pytest.raises(openai.RateLimitError):
        await dave.chat.completions.create(model=OPENAI_MODEL, messages=_ask("three"))
    erin = _openai(root, "erin")
    await erin.chat.completions.create(model=OPENAI_MODEL, messages=_ask("spend it"))
    with pytest.raises(openai.RateLimitError):
        await erin.chat.completions.create(model=OPENAI_MODEL, messages=_ask("more"))
    frank = _openai(root, "frank")
    await frank.chat.completions.create(model=OPENAI_MODEL, messages=_ask("fail over"))
    return 18


async def more(root: str) -> int:
    """A request each of carol and dave after a change; the log lines it makes."""
    await _openai(root, "carol").chat.completions.create(
        model=OPENAI_MODEL, messages=_ask("a new team")
    )
    await _openai(root, "dave").chat.completions.create(
        model=OPENAI_MODEL, messages=_ask("a new quota")
    )
    return 2


async def usages(root: str) -> dict[str, Any]:
    """Each key's own `/usage`, `/admin/keys` and `/admin/teams`, and `/metrics`."""
    async with aiohttp.ClientSession() as session:
        own = {}
        for name, secret in KEYS.items():
            async with session.get(f"{root}/usage", headers=auth(secret)) as response:
                own[name] = await response.json()
        async with session.get(f"{root}/admin/keys", headers=ADMIN_HEADERS) as response:
            keys = {key["name"]: key for key in (await response.json())["keys"]}
        async with session.get(f"{root}/admin/teams", headers=ADMIN_HEADERS) as response:
            teams = {team["name"]: team for team in (await response.json())["teams"]}
        async with session.get(f"{root}/metrics") as response:
            text = await response.text()
    metrics: dict[tuple[str, str], float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            metrics[(sample.name, sample.labels.get("key", ""))] += sample.value
    return {"own": own, "keys": keys, "teams": teams, "metrics": metrics}


def _from_log(lines: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """What the log says per key and per team, as docs/watching.md says to add it up."""
    sums: dict[str, dict[str, dict[str, float]]] = {
        "key": defaultdict(Counter),
        "team": defaultdict(Counter),
        "all": defaultdict(Counter),
    }
    for line in lines:
        if "audit" in line:
            continue
        usage = line["usage"]
        is_hit = line.get("cache") == "hit"
        admitted = 0 if line["status"] == 429 else 1  # every 429 here is the gateway's
        if line["path"] == "/v1/responses" and line["status"] == 101:
            admitted = TURNS  # each turn is a request, the upgrade none
        for bucket in (sums["key"][line["key"]], sums["team"][str(line["team"])], sums["all"][""]):
            bucket["lines"] += 1
            bucket["requests"] += admitted
            bucket["refused"] += line["status"] == 429
            bucket["hits"] += is_hit
            if usage is not None and not is_hit:  # a hit spent nothing
                for kind in KINDS:  # prompt and completion tokens, and their parts
                    bucket[kind] += usage[kind]
                bucket["cost_usd"] += line["cost_usd"] or 0.0
    return sums


def disagreements(
    lines: list[dict[str, Any]], seen: dict[str, Any], processes: int = 1
) -> list[str]:
    """Every way the log and the other views disagree (empty: they add up). Dollars in the
    tracker are whole micro-dollars, each key carrying its fraction in each process: they
    may stay under the log's sum by less than one micro-dollar per key and process."""
    found = []
    logged = _from_log(lines)
    carry = 1e-6 * processes
    for name, own in seen["own"].items():
        expected = logged["key"][name]
        totals = own["totals"]
        if seen["keys"][name]["usage"]["totals"] != totals:
            found.append(f"{name}: /admin/keys {seen['keys'][name]['usage']} != /usage {totals}")
        for field in ("requests", *KINDS):
            if totals[field] != expected[field]:
                found.append(f"{name}: /usage {field} {totals[field]} != log {expected[field]}")
        if not -1e-9 <= expected["cost_usd"] - totals["spent_usd"] < carry:
            found.append(f"{name}: /usage ${totals['spent_usd']} != log ${expected['cost_usd']}")
        cache = own.get("cache")
        if cache is not None and cache["hits"] != expected["hits"]:
            found.append(f"{name}: /usage {cache['hits']} cache hits != log {expected['hits']}")
        rejections = seen["metrics"][("llm_gateway_quota_rejections_total", name)]
        if rejections != expected["refused"]:
            found.append(f"{name}: {rejections} quota rejections != {expected['refused']} 429s")
        team = own.get("team")
        if team is not None and team["totals"] != seen["teams"][team["name"]]["usage"]["totals"]:
            found.append(f"{name}: its /usage team differs from /admin/teams {team['name']}")
    for name, team in seen["teams"].items():
        expected, totals = logged["team"][name], team["usage"]["totals"]
        for field in ("requests", *KINDS):
            if totals[field] != expected[field]:
                found.append(f"team {name}: {field} {totals[field]} != log {expected[field]}")
        members = {line["key"] for line in lines if line.get("team") == name}
        if not -1e-9 <= expected["cost_usd"] - totals["spent_usd"] < carry * len(members):
            found.append(f"team {name}: ${totals['spent_usd']} != log ${expected['cost_usd']}")
    everything, metrics = logged["all"][""], seen["metrics"]
    for metric, field in (
        ("llm_gateway_requests_total", "lines"),
        ("llm_gateway_prompt_tokens_total", "prompt_tokens"),
        ("llm_gateway_completion_tokens_total", "completion_tokens"),
        ("llm_gateway_cache_hits_total", "hits"),
    ):
        if metrics[(metric, "")] != everything[field]:
            found.append(f"{metric} {metrics[(metric, '')]} != log {field} {everything[field]}")
    by_limit = metrics[("llm_gateway_limit_refusals_total", "")]
    if by_limit != everything["refused"]:
        found.append(f"llm_gateway_limit_refusals_total {by_limit} != {everything['refused']} 429s")
    cost = metrics[("llm_gateway_cost_usd_total", "")]
    if cost != pytest.approx(everything["cost_usd"], rel=1e-9):
        found.append(f"llm_gateway_cost_usd_total {cost} != log ${everything['cost_usd']}")
    return found


def totals(seen: dict[str, Any]) -> dict[str, Any]:
    """Every key's and team's totals: what no reload or change may reset or count twice."""
    return {
        "keys": {name: own["totals"] for name, own in seen["own"].items()},
        "teams": {name: team["usage"]["totals"] for name, team in seen["teams"].items()},
    }
