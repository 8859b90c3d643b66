"""A message batch's results_url, pointed back at the gateway (proxy/relay/links.py)."""

from __future__ import annotations

import gzip

from multidict import CIMultiDict

from proxy.relay.links import ResultsLinks

PAGE = (
    b'{"data": [{"id": "msgbatch_a", "results_url": '
    b'"https://api.anthropic.com/v1/messages/batches/msgbatch_a/results", "x": 1},'
    b'{"id":"msgbatch_b","results_url":"https://api.anthropic.com/v1/messages/batches/msgbatch_b/results"},'
    b'{"id":"msgbatch_c","results_url":null}], "has_more": false}'
)


async def test_every_link_of_a_page_becomes_the_gateways_and_nothing_else_changes() -> None:
    links = ResultsLinks.of("GET", "/v1/messages/batches", 200, "application/json")
    assert links is not None
    headers = CIMultiDict({"content-length": str(len(PAGE))})
    rewritten = await links(PAGE, headers)
    assert rewritten == PAGE.replace(b"https://api.anthropic.com", b"")
    assert "content-length" not in headers


async def test_a_compressed_answer_goes_out_decoded_only_when_a_link_changed() -> None:
    links = ResultsLinks.of("GET", "/messages/batches/msgbatch_a", 200, "application/json")
    assert links is not None
    headers = CIMultiDict({"content-encoding": "gzip"})
    assert await links(gzip.compress(PAGE), headers) == PAGE.replace(
        b"https://api.anthropic.com/v1", b""
    )
    assert "content-encoding" not in headers
    running = gzip.compress(b'{"id": "msgbatch_c", "results_url": null}')
    headers = CIMultiDict({"content-encoding": "gzip"})
    assert await links(running, headers) == running and headers["content-encoding"] == "gzip"


def test_only_a_batchs_json_answer_is_rewritten() -> None:
    assert ResultsLinks.of("GET", "/v1/messages/batches/b/results", 200, "application/json") is None
    assert ResultsLinks.of("GET", "/v1/messages/batches/b", 404, "application/json") is None
    assert ResultsLinks.of("GET", "/v1/messages", 200, "application/json") is None
    assert ResultsLinks.of("POST", "/v1/messages/batches", 200, "application/json") is not None
