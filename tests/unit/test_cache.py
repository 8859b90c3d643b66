"""The cache's pieces without a server: entry names, what is cacheable and storable, the
entry's stored form, the memory store's LRU and TTL (an injected clock), flights."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import tracemalloc

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.cache.cache import Pending
from proxy.cache.entry import CorruptEntry, Entry, decode, encode
from proxy.cache.flights import Flights
from proxy.cache.lookup import (
    Directive,
    directive,
    entry_name,
    is_cacheable,
    scope_of,
    shared_scope,
)
from proxy.cache.memory_store import MemoryStore
from proxy.cache.verdict import is_storable
from proxy.keys.fields import CachePolicy
from proxy.record import Outcome, Record, Usage

BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


SERVED = "* -> openai https://api.openai.com/v1  "


def name(body: bytes = BODY, scope: str = "k:abc", served: str = SERVED, **extra: str) -> str:
    return entry_name(scope, served, "POST", "chat/completions", "", body, headers(*extra.items()))


def test_an_entry_name_is_the_same_in_another_process_with_another_hash_seed() -> None:
    code = (
        "from multidict import CIMultiDict, CIMultiDictProxy;"
        "from proxy.cache.lookup import entry_name;"
        f"print(entry_name('k:abc', {SERVED!r}, 'POST', 'chat/completions', '', {BODY!r}, "
        "CIMultiDictProxy(CIMultiDict())))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    assert other.stdout.strip() == name()


def test_every_part_of_a_request_that_changes_the_answer_changes_the_name() -> None:
    base = name()
    assert name() == base
    assert name(BODY + b" ") != base  # the exact bytes, not the parsed document
    assert name(scope="k:other") != base
    assert name(served="* -> openai https://api.openai.com/v1 gpt-4o ") != base
    assert name(**{"anthropic-beta": "tools-2024"}) != base
    assert name(**{"Accept-Encoding": "gzip"}) != base
    assert name(**{"openai-beta": "assistants=v2"}) != base
    assert name(**{"anthropic-version": "2023-06-01"}) != base
    # The organization and project a request is made in: what its stored prompts, previous
    # responses and files are, and the openai-organization / openai-project it is answered with.
    assert name(**{"OpenAI-Organization": "org-b"}) != base
    assert name(**{"OpenAI-Project": "proj_b"}) != base
    assert name(**{"x-request-id": "abc", "user-agent": "sdk"}) == base  # these do not
    stream = entry_name("k:abc", SERVED, "POST", "chat/completions", "stream=1", BODY, headers())
    assert stream != base


def test_a_header_whose_bytes_are_not_utf8_names_an_entry_of_its_own() -> None:
    # aiohttp hands `anthropic-beta: \xff` over as the lone surrogate U+DCFF, which
    # str.encode() refused: the request of a key with a cache was a 500.
    odd = name(**{"anthropic-beta": "\udcff"})
    assert odd == name(**{"anthropic-beta": "\udcff"}) != name(**{"anthropic-beta": "\udcfe"})
    assert odd != name()


def test_a_shared_scope_is_never_a_keys_own() -> None:
    private = scope_of("docs-bot", CachePolicy(300))
    shared = scope_of("anything", CachePolicy(300, "docs-bot"))
    assert private == "k:docs-bot" and shared == shared_scope("docs-bot") != private


def test_cache_control_no_store_beats_no_cache() -> None:
    assert directive(headers()) == (Directive.USE, None)
    assert directive(headers(("Cache-Control", "max-age=0, No-Cache")))[0] is Directive.REFRESH
    both = headers(("Cache-Control", "no-cache"), ("cache-control", "no-store"))
    assert directive(both)[0] is Directive.SKIP


@pytest.mark.parametrize(
    ("value", "asked"),
    [
        # What fetch() sends for cache: "no-cache", and a browser's reload: revalidate.
        ("max-age=0", (Directive.REFRESH, None)),
        ('Max-Age="0"', (Directive.REFRESH, None)),
        ("max-age=60", (Directive.USE, 60)),
        ("private, max-age=600", (Directive.USE, 600)),
        ("max-age=ten", (Directive.USE, None)),  # not a number: ignored (RFC 9111 §4.2.1)
        ("max-age=-1", (Directive.USE, None)),
        ("max-stale=60", (Directive.USE, None)),
    ],
)
def test_cache_control_max_age_bounds_the_age_of_a_hit(
    value: str, asked: tuple[Directive, int | None]
) -> None:
    assert directive(headers(("Cache-Control", value))) == asked


@pytest.mark.parametrize(
    ("method", "tail", "document", "expected"),
    [
        ("POST", "chat/completions", {"model": "m"}, True),
        ("POST", "chat/completions", {"model": "m", "store": False}, True),
        ("POST", "chat/completions", {"model": "m", "store": True}, False),
        ("POST", "embeddings", {"input": "x"}, True),
        ("POST", "messages", {"model": "m"}, True),
        ("POST", "openai/deployments/d/chat/completions", {}, True),
        ("POST", "openai/deployments/d/embeddings", {}, True),
        # Azure's v1 API under the resource's endpoint, and under its openai/.
        ("POST", "openai/v1/chat/completions", {"model": "d"}, True),
        ("POST", "openai/v1/embeddings", {"model": "d"}, True),
        ("POST", "v1/chat/completions", {"model": "d"}, True),
        ("POST", "openai/v1/responses", {"input": "x", "store": False}, True),
        ("POST", "openai/v1/responses", {"input": "x", "store": True}, False),
        ("POST", "openai/v1/threads/thread_abc/messages", {"role": "user"}, False),
        # The Assistants API adds a message to a thread: a write, whose answer is a new object.
        ("POST", "threads/thread_abc/messages", {"role": "user", "content": "yes"}, False),
        ("POST", "openai/threads/thread_abc/messages", {"role": "user", "content": "yes"}, False),
        ("POST", "responses", {"input": "x", "store": False}, True),
        ("POST", "responses", {"input": "x", "store": True}, False),
        ("POST", "responses", {"input": "x", "background": True}, False),
        # A turn of a conversation reads and appends to the conversation's items.
        ("POST", "responses", {"input": "x", "conversation": "conv_1"}, False),
        ("POST", "responses", {"input": "x", "conversation": {"id": "conv_1"}}, False),
        ("POST", "responses", {"input": "x", "conversation": None}, True),
        ("POST", "messages/count_tokens", {"model": "m"}, False),
        ("POST", "audio/transcriptions", {}, False),
        ("GET", "chat/completions", {}, False),
        ("POST", "chat/completions", None, False),
    ],
)
def test_what_is_cacheable(method: str, tail: str, document: dict | None, expected: bool) -> None:
    assert is_cacheable(method, tail, document) is expected


def ended(status: int = 200, outcome: Outcome = Outcome.ANSWERED) -> Record:
    record = Record.begin("r", "POST", "/v1/chat/completions")
    record.end(status, outcome)
    return record


SSE = "text/event-stream; charset=utf-8"
DONE_STREAM = [b'data: {"choices":[]}\n\n', b"data: [DONE]\n\n"]


def test_only_a_whole_200_of_json_or_a_stream_that_ended_well_is_storable() -> None:
    assert is_storable(ended(), "application/json", "", [b"{}"], 1000)
    assert is_storable(ended(), SSE, "", DONE_STREAM, 1000)
    assert not is_storable(ended(500), "application/json", "", [b"{}"], 1000)
    assert not is_storable(ended(outcome=Outcome.BROKEN), SSE, "", DONE_STREAM, 1000)
    assert not is_storable(ended(outcome=Outcome.CLIENT_LEFT), SSE, "", DONE_STREAM, 1000)
    assert not is_storable(ended(), "application/octet-stream", "", [b"raw"], 1000)
    assert not is_storable(ended(), "multipart/form-data; boundary=x", "", [b"--x"], 1000)
    assert not is_storable(ended(), SSE, "", DONE_STREAM[:1], 1000)  # no normal end


def test_a_stream_with_an_error_event_under_its_200_is_not_storable() -> None:
    anthropic = [
        b'event: message_start\ndata: {"type":"message_start"}\n\n',
        b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error"}}\n\n',
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
    ]
    assert not is_storable(ended(), SSE, "", anthropic, 10_000)
    openai = [b'data: {"error":{"message":"boom"}}\n\n', b"data: [DONE]\n\n"]
    assert not is_storable(ended(), SSE, "", openai, 10_000)


def test_a_stream_is_storable_only_when_its_last_event_is_its_end() -> None:
    """The end named in the text of a stream cut short (ended cleanly by a proxy upstream whose
    own upstream broke) is not its end: such an answer was stored and replayed for its ttl."""

    def delta(text: str) -> bytes:
        return b'data: {"type":"content_block_delta","delta":{"text":"' + text.encode() + b'"}}'

    anthropic_cut = [
        b'event: message_start\ndata: {"type":"message_start"}\n\n',
        b"event: content_block_delta\n" + delta("the last event is message_stop") + b"\n\n",
    ]
    assert not is_storable(ended(), SSE, "", anthropic_cut, 10_000)
    chat_cut = [b'data: {"choices":[{"delta":{"content":"then data: [DONE] ends it"}}]}\n\n']
    assert not is_storable(ended(), SSE, "", chat_cut, 10_000)
    responses_cut = [
        b'event: response.output_text.done\ndata: {"type":"response.output_text.done",'
        b'"text":"wait for response.completed"}\n\n'
    ]
    assert not is_storable(ended(), SSE, "", responses_cut, 10_000)
    # Each normal end, with or without its event line, with CRLF lines, is one.
    ends = [
        b"data: [DONE]\n\n",
        b"data:[DONE]\r\n\r\n",
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
        b'data: {"type": "message_stop"}\n\n',
        b'event: response.completed\r\ndata: {"type":"response.completed","response":{}}\r\n\r\n',
        b'data: {"type":"response.incomplete","response":{}}\n\n',
        # Bare CR line ends, which the SSE specification allows as well.
        b'event: message_stop\rdata: {"type":"message_stop"}\r\r',
        b'event: response.completed\rdata: {"type":"response.completed","response":{}}\r\r',
    ]
    for end in ends:
        assert is_storable(ended(), SSE, "", [anthropic_cut[1], end], 10_000), end
        assert is_storable(ended(), SSE, "", [end], 10_000), end


def test_a_compressed_stream_is_read_to_judge_it() -> None:
    import gzip

    packed = gzip.compress(b"".join(DONE_STREAM))
    assert is_storable(ended(), SSE, "gzip", [packed[:10], packed[10:]], 1000)
    assert not is_storable(ended(), SSE, "gzip", [packed[:10]], 1000)  # cut short


def an_entry(chunks: tuple[bytes, ...] = (b"data: 1\n\n", b"data: [DONE]\n\n")) -> Entry:
    return Entry(
        200,
        "OK",
        (("Content-Type", SSE), ("openai-processing-ms", "12")),
        chunks,
        Usage(10, 5, cache_read_tokens=2),
        "gpt-4o-mini",
        1_765_000_000.25,
        provider="azure",  # a fallback's answer, priced at its rates
        cost_usd=0.0000375,
    )


def test_an_entry_survives_its_stored_form_chunk_for_chunk() -> None:
    entry = an_entry((b"a", b"", b"\x00\xff binary", b"data: [DONE]\n\n"))
    assert decode(encode(entry)) == entry
    with pytest.raises(CorruptEntry):
        decode(b"\x02" + encode(entry)[1:])
    with pytest.raises(CorruptEntry):
        decode(encode(entry)[:-1])


def test_an_entry_stored_before_its_provider_and_price_were_kept_still_reads() -> None:
    """Redis holds entries of the gateway before the upgrade until they expire: hits still,
    priced as any request (provider None)."""
    entry = an_entry()
    blob = encode(entry)
    end = 5 + int.from_bytes(blob[1:5], "big")
    head = json.loads(blob[5:end])
    del head["provider"], head["cost_usd"]
    older = json.dumps(head).encode()
    blob = blob[:1] + len(older).to_bytes(4, "big") + older + blob[end:]
    assert decode(blob) == dataclasses.replace(entry, provider=None, cost_usd=None)


def test_an_entry_whose_header_bytes_are_not_utf8_survives_its_stored_form_byte_for_byte() -> None:
    # As the wire holds them: each byte that is not UTF-8 a lone surrogate, which JSON (and
    # so Redis's form) cannot hold as such.
    headers = (
        ("Content-Type", SSE),
        ("X-Note", b"caf\xe9 \x80\xff".decode("utf-8", "surrogateescape")),
        ("X-Utf8", "résumé"),
    )
    entry = dataclasses.replace(an_entry(), headers=headers, has_raw_bytes=True)
    assert decode(encode(entry)) == entry
    assert b'"raw"' not in encode(an_entry())  # every other entry's form is as it was


@pytest.mark.parametrize(
    "headers",
    [(("Content-Type", SSE),), (("X-Note", b"caf\xe9".decode("utf-8", "surrogateescape")),)],
    ids=["utf8-headers", "raw-headers"],
)
def test_a_reason_phrase_that_is_not_utf8_survives_its_stored_form_byte_for_byte(
    headers: tuple[tuple[str, str], ...],
) -> None:
    # The wire holds a phrase's obs-text (RFC 9112 §4) as lone surrogates, as a header's.
    reason = b"Fresh Caf\xe9 \x80".decode("utf-8", "surrogateescape")
    entry = dataclasses.replace(an_entry(), reason=reason, headers=headers, has_raw_bytes=True)
    assert decode(encode(entry)) == entry
    plain = dataclasses.replace(an_entry(), reason="Fresh Café")
    assert decode(encode(plain)) == plain
    assert b'"raw"' not in encode(plain)


async def test_the_memory_store_evicts_the_least_recently_used_past_its_bound() -> None:
    size = an_entry().size
    store = MemoryStore(max_bytes=2 * size)
    await store.put("a", an_entry(), 60, "a", 0)
    await store.put("b", an_entry(), 60, "b", 0)
    assert await store.get("a") is not None  # a is now the most recently used
    await store.put("c", an_entry(), 60, "c", 0)
    assert await store.get("b") is None
    assert await store.get("a") is not None and await store.get("c") is not None
    assert store.size() == (2, 2 * size)
    await store.put("huge", an_entry((b"x" * (3 * size),)), 60, "huge", 0)  # larger than the bound
    assert await store.get("huge") is None and store.size() == (2, 2 * size)


async def test_the_memory_store_expires_entries_by_its_clock() -> None:
    now = [0.0]
    store = MemoryStore(max_bytes=10**6, clock=lambda: now[0])
    await store.put("a", an_entry(), 10, "a", 0)
    now[0] = 9.999
    assert await store.get("a") is not None
    now[0] = 10.0
    assert await store.get("a") is None
    assert store.size() == (0, 0)


async def test_the_memory_store_drops_a_scopes_entries_and_keeps_out_answers_asked_before() -> None:
    store = MemoryStore(max_bytes=10**6)
    for entry_name_ in ("k:a:1", "k:a:2", "k:ab:1", "s:x:1"):
        await store.put(entry_name_, an_entry(), 60, entry_name_[: entry_name_.rindex(":") + 1], 0)
    assert await store.drop("k:a:", 10) == 2
    assert await store.get("k:ab:1") is not None and store.size()[0] == 2
    await store.put("k:a:1", an_entry(), 60, "k:a:", 9.5)  # in flight when it was dropped
    await store.put("k:ab:2", an_entry(), 60, "k:ab:", 9.5)  # another scope
    assert await store.get("k:a:1") is None and await store.get("k:ab:2") is not None
    await store.put("k:a:1", an_entry(), 60, "k:a:", 10.5)  # asked for after the drop
    assert await store.get("k:a:1") is not None


async def test_a_flight_serves_its_waiters_and_a_late_one_too() -> None:
    flights = Flights()
    flight = flights.lead("n", 0.0)
    waiters = [asyncio.create_task(flights.wait(flight, 5)) for _ in range(3)]
    await asyncio.sleep(0)
    assert flights.waiting() == 3
    entry = an_entry()
    flights.land(flight, entry)
    assert await asyncio.gather(*waiters) == [entry] * 3
    assert flights.joined("n") is flight  # landed, not yet stored: a late one is served
    assert await flights.wait(flight, 5) is entry
    flights.end("n", flight)
    assert flights.joined("n") is None


async def test_a_waiter_goes_on_its_own_after_its_wait_or_a_failed_flight() -> None:
    flights = Flights()
    flight = flights.lead("n", 0.0)
    assert await flights.wait(flight, 0.01) is None  # its own bound
    waiter = asyncio.create_task(flights.wait(flight, 5))
    await asyncio.sleep(0)
    flights.end("n", flight)  # ended without an entry
    assert await waiter is None


def wire_headers(index: int) -> CIMultiDict[str]:
    """An answer's headers as the wire hands them over: each name and value a str of its own,
    decoded from the bytes read, in a case-blind multidict."""
    fields: CIMultiDict[str] = CIMultiDict()
    for name, value in (
        (b"Content-Type", b"application/json"),
        (b"Content-Length", b"%d" % (300 + index % 7)),
        (b"Date", b"Mon, 07 Dec 2026 16:00:00 GMT"),
        (b"openai-organization", b"org-abcdef"),
        (b"openai-processing-ms", b"%d" % (100 + index)),
        (b"openai-version", b"2020-10-01"),
        (b"x-request-id", b"req_%032x" % index),
        (b"x-ratelimit-limit-requests", b"10000"),
        (b"x-ratelimit-remaining-requests", b"%d" % (9999 - index)),
        (b"x-ratelimit-reset-requests", b"6ms"),
        (b"cf-cache-status", b"DYNAMIC"),
        (b"Server", b"cloudflare"),
    ):
        fields.add(name.decode("latin-1"), value.decode())
    return fields


async def test_what_the_memory_store_counts_is_at_least_what_its_entries_hold() -> None:
    # Entries made from real answers held about 2.6 times the bytes CACHE_MAX_BYTES counted
    # for them (each header's name a str of its own and multidict's case-blind copy of it, on
    # top of the value and the pair): a 256 MiB cache of chat answers took ~670 MB.
    count = 300
    bodies = [
        b'{"id":"chatcmpl-%06d","choices":[{"message":{"content":"hi"}}]}' % n for n in range(count)
    ]
    store = MemoryStore(max_bytes=1 << 40)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for index, body in enumerate(bodies):
            pending = Pending(f"k:abc:{index:064x}", 3600, 1 << 20, None, "k:abc:", 0.0)
            pending.begin(200, "OK", wire_headers(index))
            pending.collect(body)
            entry = pending.entry(ended(), 1.0)
            assert entry is not None
            await store.put(pending.name, entry, 3600, pending.prefix, 0.0)
            del pending, entry
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    held = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    entries, counted = store.size()
    assert entries == count
    assert held <= counted, (held / count, counted / count)
