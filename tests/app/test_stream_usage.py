"""Exact stream usage: asked for per key, withheld from the client.

With the official openai SDK through the gateway, compared with the same call made
directly to the fake provider; and the pieces (`amend`, `UsageChunkFilter`) fed directly.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from openai import AsyncOpenAI

from proxy.keys.fields import Defaults
from proxy.keys.keys import KeyRing, KeysFileError
from proxy.usage.openai_chat import USAGE_LINE_BYTES, UsageChunkFilter, amend
from proxy.usage.usage import UsageTap
from tests.conftest import OPENAI_REAL, OPENAI_VK
from tests.support.fake_provider import FakeState

EXACT_VK = "vk_test_exact_usage_7c1d9e3b5a"
DEFAULTS = Defaults(quota_enabled=False, requests=100, tokens=None, window_seconds=60.0)
MESSAGES = [{"role": "user", "content": "say hello please"}]
Records = Callable[..., Awaitable[list[dict[str, Any]]]]
_ids = itertools.count()


@pytest.fixture
async def exact_gateway(gateway_with_keys: Callable[..., Awaitable[TestClient]]) -> TestClient:
    exact = {"provider": "openai", "api_key": OPENAI_REAL, "name": "exact", "stream_usage": "exact"}
    return await gateway_with_keys({EXACT_VK: exact})


@pytest.fixture
async def clients(
    exact_gateway: TestClient, fake_base: str
) -> AsyncIterator[Callable[[str | None], AsyncOpenAI]]:
    """A factory: the SDK on the gateway with this key, or (None) directly on the fake."""
    made: list[AsyncOpenAI] = []

    def make(key: str | None) -> AsyncOpenAI:
        if key is None:
            client = AsyncOpenAI(base_url=f"{fake_base}/v1", api_key="direct", max_retries=0)
        else:
            base = str(exact_gateway.make_url("/v1"))
            client = AsyncOpenAI(base_url=base, api_key=key, max_retries=0)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


def tagged(what: str) -> tuple[str, dict[str, Any]]:
    rid = f"req_stream_usage_{what}_{next(_ids)}"
    return rid, {"extra_headers": {"x-request-id": rid}}


async def client_view(client: AsyncOpenAI, **options: Any) -> tuple[list[dict], bytes]:
    """What the SDK yields (ids and times left out: the fake makes new ones) and the raw bytes."""
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, **options
    )
    chunks = [chunk.model_dump(exclude={"id", "created"}) async for chunk in stream]
    async with client.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, **options
    ) as response:
        raw = b"".join([piece async for piece in response.iter_bytes()])
    return chunks, raw


async def test_exact_mode_asks_for_usage_reads_it_and_the_client_sees_what_it_asked_for(
    clients: Callable[[str | None], AsyncOpenAI], fake: FakeState, records: Records
) -> None:
    direct, _ = await client_view(clients(None))
    rid, options = tagged("exact")
    through, raw = await client_view(clients(EXACT_VK), **options)
    assert through == direct  # no usage chunk; the `usage: null` fields parse as absent
    assert all(chunk["usage"] is None and chunk["choices"] for chunk in through)
    # Upstream: the client's bytes with one insertion, the documented one.
    sent_up = fake.requests[-1].body
    client_body = sent_up.replace(b'"stream_options":{"include_usage":true},', b"", 1)
    assert orjson.loads(client_body) == {
        "model": "gpt-4o-mini",
        "messages": MESSAGES,
        "stream": True,
    }
    # Downstream: the provider's bytes less the usage event, nothing else.
    sent = fake.sent[rid]
    usage_event = next(
        event + b"\n\n" for event in sent.split(b"\n\n") if b'"choices":[],"usage":{' in event
    )
    assert raw == sent.replace(usage_event, b"")
    lines = await records(2)
    assert all(line["usage"]["estimated"] is False for line in lines)
    usage = lines[-1]["usage"]
    assert usage["estimated"] is False
    reported = fake.usage[rid]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (
        reported["prompt_tokens"],
        reported["completion_tokens"],
    )


@pytest.mark.parametrize("flag", [1, "true", "yes"])
async def test_a_stream_flag_a_lenient_server_reads_as_true_is_asked_for_its_usage(
    exact_gateway: TestClient, fake: FakeState, records: Records, flag: object
) -> None:
    """vLLM and SGLang read "stream" as pydantic's lax booleans do, and stream: the gateway
    read only `true`, asked for no usage chunk, and charged the stream an estimate."""
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": flag}
    headers = {"Authorization": f"Bearer {EXACT_VK}"}
    async with exact_gateway.post("/v1/chat/completions", json=body, headers=headers) as response:
        assert response.status == 200
        raw = await response.read()
    assert b'"stream_options":{"include_usage":true}' in fake.requests[-1].body
    assert b'"usage":{' not in raw  # asked by the gateway: withheld
    (line,) = await records(1)
    assert line["stream"] is True and line["usage"]["estimated"] is False


async def test_without_the_setting_the_stream_is_byte_identical_and_estimated(
    clients: Callable[[str | None], AsyncOpenAI], fake: FakeState, records: Records
) -> None:
    direct, _ = await client_view(clients(None))
    rid, options = tagged("default")
    through, raw = await client_view(clients(OPENAI_VK), **options)
    assert through == direct
    assert raw == fake.sent[rid]
    assert b"stream_options" not in fake.requests[-1].body
    lines = await records(2)
    assert lines[-1]["usage"]["estimated"] is True


async def test_a_client_that_asks_for_usage_itself_gets_its_chunk_untouched(
    clients: Callable[[str | None], AsyncOpenAI], fake: FakeState, records: Records
) -> None:
    asked = {"stream_options": {"include_usage": True}}
    direct, _ = await client_view(clients(None), **asked)
    rid, options = tagged("asked")
    through, raw = await client_view(clients(EXACT_VK), **asked, **options)
    assert through == direct
    assert through[-1]["choices"] == [] and through[-1]["usage"]["completion_tokens"] == 3
    assert raw == fake.sent[rid]
    lines = await records(2)
    assert lines[-1]["usage"]["estimated"] is False


async def test_exact_mode_withholds_its_chunk_from_a_provider_that_compresses_streams(
    clients: Callable[[str | None], AsyncOpenAI], fake: FakeState, records: Records
) -> None:
    """Providers behind a compressing edge (OpenRouter, nginx's or Cloudflare's gzip) code an
    event stream when the client accepts it, as the SDKs do (`Accept-Encoding: gzip, ...`).
    The gateway cannot cut its usage chunk out of coded bytes, so the chunk it had asked for
    reached a client that never did (`choices: []`), and the loop every SDK example writes,
    `chunk.choices[0].delta.content`, failed with IndexError on it."""
    rid = f"req_stream_usage_coded_{next(_ids)}"
    headers = {"x-fake-encoding": "gzip", "x-request-id": rid}
    stream = await clients(EXACT_VK).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers=headers
    )
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    assert text == "tok0 tok1 tok2 "
    assert fake.requests[-1].headers["Accept-Encoding"] == "identity"  # asked, to cut it out
    (line,) = await records(1)
    assert line["usage"]["estimated"] is False
    assert line["usage"]["completion_tokens"] == fake.usage[rid]["completion_tokens"]


async def test_a_stream_not_asked_for_keeps_the_clients_accept_encoding(
    clients: Callable[[str | None], AsyncOpenAI], fake: FakeState
) -> None:
    """Only a stream whose usage chunk the gateway asked for is asked to come uncoded."""
    asked = {"stream_options": {"include_usage": True}}
    headers = {"x-fake-encoding": "gzip"}
    stream = await clients(EXACT_VK).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers=headers, **asked
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].usage is not None  # its own usage chunk, as it asked
    assert "gzip" in fake.requests[-1].headers["Accept-Encoding"]


async def test_exact_mode_leaves_other_requests_alone(
    clients: Callable[[str | None], AsyncOpenAI], fake: FakeState
) -> None:
    client = clients(EXACT_VK)
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert b"stream_options" not in fake.requests[-1].body
    stream = await client.responses.create(model="gpt-4o-mini", input="hi", stream=True)
    [event async for event in stream]
    assert b"stream_options" not in fake.requests[-1].body


async def test_a_stream_whose_options_cannot_be_rewritten_goes_up_as_sent(
    exact_gateway: TestClient, fake: FakeState, records: Records
) -> None:
    """A body naming stream_options is re-serialised to ask for usage; one nested deeper than
    orjson writes (255 levels; it reads 1024) failed the request with a 500. It now goes up
    as the client sent it, its usage estimated."""
    deep = b'{"a":' * 300 + b"1" + b"}" * 300
    body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], '
    body += b'"stream": true, "stream_options": {}, "metadata": ' + deep + b"}"
    headers = {"Authorization": f"Bearer {EXACT_VK}", "Content-Type": "application/json"}
    async with exact_gateway.post("/v1/chat/completions", data=body, headers=headers) as response:
        assert response.status == 200, await response.text()
        await response.read()
    assert fake.requests[-1].body == body
    (line,) = await records(1)
    assert line["status"] == 200 and line["usage"]["estimated"] is True


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b'{"model":"m","stream":true}',
            b'{"stream_options":{"include_usage":true},"model":"m","stream":true}',
        ),
        (  # every other byte stays: spacing, key order, escapes
            b' \n{ "stream" : true,\t"model": "\\u00e9" }',
            b' \n{"stream_options":{"include_usage":true}, "stream" : true,\t"model": "\\u00e9" }',
        ),
    ],
)
def test_amend_inserts_the_option_and_keeps_every_other_byte(body: bytes, expected: bytes) -> None:
    assert amend(body) == expected
    assert orjson.loads(expected)["stream_options"] == {"include_usage": True}


def test_amend_rewrites_only_a_body_that_names_stream_options_already() -> None:
    for options in (b"null", b'{"include_usage": false}', b"{}"):
        changed = amend(b'{"stream": true, "stream_options": ' + options + b', "n": 1}')
        assert changed is not None
        assert orjson.loads(changed) == {
            "stream": True,
            "stream_options": {"include_usage": True},
            "n": 1,
        }
    assert amend(b'{"stream": true, "stream_options": {"include_usage": true}}') is None
    assert amend(b'{"stream": false}') is None
    assert amend(b'{"model": "m"}') is None
    assert amend(b"not json") is None
    assert amend(b"[1]") is None
    assert amend(b'{"stream": true, "stream_options": 5}') is None  # the provider's 400


def chunk(content: str | None, usage: dict | None = None) -> bytes:
    choices = [] if content is None else [{"index": 0, "delta": {"content": content}}]
    return b"data: " + orjson.dumps({"choices": choices, "usage": usage}) + b"\n\n"


STREAM = (
    chunk("Hel")
    + chunk("lo")
    + chunk(None, {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
    + b"data: [DONE]\n\n"
)
WITHOUT_USAGE = chunk("Hel") + chunk("lo") + b"data: [DONE]\n\n"


def test_the_filter_withholds_only_the_usage_chunk_wherever_the_stream_is_cut() -> None:
    for cut in range(len(STREAM) + 1):
        for second in (cut, min(len(STREAM), cut + 7)):
            withheld = UsageChunkFilter()
            parts = [STREAM[:cut], STREAM[cut:second], STREAM[second:]]
            passed = b"".join(withheld(part) for part in parts) + withheld.rest()
            assert passed == WITHOUT_USAGE, f"cut at {cut}, {second}"


def test_the_filter_reads_crlf_and_cr_line_ends_wherever_the_stream_is_cut() -> None:
    for line_end in (b"\r\n", b"\r"):
        stream, expected = (body.replace(b"\n", line_end) for body in (STREAM, WITHOUT_USAGE))
        for cut in range(len(stream) + 1):
            withheld = UsageChunkFilter()
            passed = withheld(stream[:cut]) + withheld(stream[cut:]) + withheld.rest()
            assert passed == expected, f"{line_end!r} cut at {cut}"


def test_the_filter_holds_back_no_whole_line() -> None:
    withheld = UsageChunkFilter()
    assert withheld(chunk("Hel")) == chunk("Hel")
    assert withheld(b"data: {") == b""  # a line cut in two waits for its end
    assert withheld(b'"choices": []}\n') == b'data: {"choices": []}\n'
    assert withheld.rest() == b""


def test_the_filter_passes_a_line_ending_with_a_cr_with_its_own_chunk() -> None:
    # A bare CR ends a line (and a second one its event): the client's event must not wait
    # for the provider's next chunk, which may come seconds later.
    withheld = UsageChunkFilter()
    event = chunk("Hel").replace(b"\n", b"\r")
    assert withheld(event) == event
    # A CRLF cut between its CR and its LF: the LF goes where its CR went.
    assert withheld(b"data: {}\r") == b"data: {}\r"
    assert withheld(b"\n\r") == b"\n\r"
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert withheld(chunk(None, usage).replace(b"\n\n", b"\r")) == b""
    assert withheld(b"\n\r\n") == b""  # the usage line's LF, then the blank line after it
    assert withheld(b"data: [DONE]\r\n\r\n") == b"data: [DONE]\r\n\r\n"
    assert withheld.rest() == b""
    for line_end in (b"\r\n", b"\r"):  # one byte at a time: each line out with its last byte
        stream, expected = (body.replace(b"\n", line_end) for body in (STREAM, WITHOUT_USAGE))
        withheld = UsageChunkFilter()
        assert b"".join(withheld(bytes([byte])) for byte in stream) == expected, line_end


def test_a_line_too_long_to_be_the_usage_chunk_goes_out_as_it_comes() -> None:
    # A 1 MB event in 64 KiB pieces: the filter held it whole (the client got nothing of it
    # until its end) and copied what it held once per piece.
    piece = 64 * 1024
    for line_end in (b"\n", b"\r\n", b"\r"):
        long_event = chunk("y" * 1_000_000).replace(b"\n", line_end)
        stream = long_event + STREAM.replace(b"\n", line_end)
        expected = long_event + WITHOUT_USAGE.replace(b"\n", line_end)
        for end in (len(long_event) - 1, len(long_event), len(long_event) + 1):
            cuts = [*range(0, len(long_event) - piece, piece), end, len(stream)]
            withheld, passed, most_held = UsageChunkFilter(), b"", 0
            for start, stop in itertools.pairwise(cuts):
                passed += withheld(stream[start:stop])
                most_held = max(most_held, stop - len(passed))
            assert passed + withheld.rest() == expected, (line_end, end)
            assert most_held <= USAGE_LINE_BYTES + piece, (line_end, end)


def test_the_tap_still_reads_the_withheld_usage() -> None:
    tap = UsageTap("text/event-stream", None, keep_text=False)
    withheld = UsageChunkFilter()
    for index in range(len(STREAM)):
        piece = STREAM[index : index + 1]
        withheld(piece)
        tap.feed(piece)
    usage = tap.usage(b"")
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (3, 2)


def test_the_filter_applies_only_to_an_uncompressed_stream_of_unknown_length() -> None:
    assert UsageChunkFilter.applies({"content-type": "text/event-stream; charset=utf-8"})
    assert not UsageChunkFilter.applies(
        {"content-type": "text/event-stream", "content-encoding": "gzip"}
    )
    assert not UsageChunkFilter.applies(
        {"content-type": "text/event-stream", "content-length": "9"}
    )
    assert not UsageChunkFilter.applies({"content-type": "application/json"})


def test_keys_json_takes_exact_or_estimate_and_refuses_anything_else(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    for value, is_exact in (("exact", True), ("estimate", False)):
        entry = {"provider": "openai", "api_key": "sk-x", "stream_usage": value}
        path.write_text(json.dumps({"virtual_keys": {"vk_stream_usage_1": entry}}))
        [key] = KeyRing.load(str(path), {}, DEFAULTS)
        assert key.exact_stream_usage is is_exact
    entry = {"provider": "openai", "api_key": "sk-x", "stream_usage": "always"}
    path.write_text(json.dumps({"virtual_keys": {"vk_stream_usage_1": entry}}))
    with pytest.raises(KeysFileError, match='stream_usage must be "exact" or "estimate"'):
        KeyRing.load(str(path), {}, DEFAULTS)


@pytest.mark.parametrize(
    ("entry", "is_exact"),
    [
        pytest.param({}, False, id="unmetered"),
        pytest.param({"quota": {"requests": 5}}, False, id="requests-only"),
        pytest.param({"quota": {"tokens": 1000}}, True, id="token-limit"),
        pytest.param({"budget": {"usd": 5}}, True, id="budget"),
        pytest.param({"team": "metered"}, True, id="team-token-limit"),
        pytest.param({"quota": {"tokens": 1000}, "stream_usage": "estimate"}, False, id="opt-out"),
        pytest.param({"stream_usage": "exact"}, True, id="opt-in"),
    ],
)
def test_a_metered_key_asks_for_exact_stream_usage_unless_keys_json_says_estimate(
    tmp_path: Path, entry: dict[str, Any], is_exact: bool
) -> None:
    path = tmp_path / "keys.json"
    document = {
        "teams": {"metered": {"quota": {"tokens": 5000}}},
        "virtual_keys": {"vk_stream_usage_1": {"provider": "openai", "api_key": "sk-x", **entry}},
    }
    path.write_text(json.dumps(document))
    quotas_on = Defaults(quota_enabled=True, requests=100, tokens=None, window_seconds=60.0)
    [key] = KeyRing.load(str(path), {}, quotas_on)
    assert key.exact_stream_usage is is_exact


async def test_a_key_with_a_budget_is_charged_the_providers_count_of_a_stream_by_default(
    gateway_with_keys: Callable[..., Awaitable[TestClient]],
    fake: FakeState,
    records: Records,
) -> None:
    keys = {
        "vk_test_budget_exact_01": {"provider": "openai", "api_key": "sk-real-budget-1",
                                    "budget": {"usd": 5}},
        "vk_test_budget_estimate_02": {"provider": "openai", "api_key": "sk-real-budget-2",
                                       "budget": {"usd": 5}, "stream_usage": "estimate"},
    }  # fmt: skip
    gateway = await gateway_with_keys(keys)
    base = str(gateway.make_url("/v1"))
    for key, is_exact in (("vk_test_budget_exact_01", True), ("vk_test_budget_estimate_02", False)):
        async with AsyncOpenAI(base_url=base, api_key=key, max_retries=0) as client:
            stream = await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=MESSAGES,
                stream=True,  # type: ignore[arg-type]
            )
            chunks = [chunk async for chunk in stream]
        assert all(chunk.choices and chunk.usage is None for chunk in chunks)  # none withheld
        assert (b'"include_usage":true' in fake.requests[-1].body) is is_exact
    exact, estimated = (line["usage"] for line in await records(2))
    assert exact["estimated"] is False and estimated["estimated"] is True
    assert exact["completion_tokens"] == 3  # the fake's count: three deltas
