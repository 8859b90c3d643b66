"""The peek: a compressed upload is inflated for validation only, and bounded."""

from __future__ import annotations

import gzip
import zlib

import pytest

from proxy.encodings import decode_body as readable
from proxy.errors import GatewayError

BODY = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'


@pytest.mark.parametrize(
    ("encoding", "sent"),
    [
        ("", BODY),
        ("identity", BODY),
        ("gzip", gzip.compress(BODY)),
        ("GZIP", gzip.compress(BODY)),
        ("deflate", zlib.compress(BODY)),
        ("deflate", zlib.compress(BODY, wbits=-15)),
    ],
)
def test_a_body_is_read_as_the_provider_will_read_it(encoding: str, sent: bytes) -> None:
    assert readable(sent, encoding, limit=1000) == BODY


def test_an_upload_that_inflates_past_the_limit_gets_413() -> None:
    bomb = gzip.compress(b"{" + b" " * 1_000_000 + b"}")
    with pytest.raises(GatewayError) as refused:
        readable(bomb, "gzip", limit=10_000)
    assert refused.value.status == 413


@pytest.mark.parametrize(
    ("encoding", "sent", "status"),
    [
        ("gzip", BODY, 400),
        ("gzip", gzip.compress(BODY)[:-12], 400),
        ("br", BODY, 400),
        ("zstd", BODY, 400),
        ("compress", BODY, 415),
    ],
)
def test_a_body_that_is_not_what_its_encoding_says_is_refused(
    encoding: str, sent: bytes, status: int
) -> None:
    with pytest.raises(GatewayError) as refused:
        readable(sent, encoding, limit=1000)
    assert refused.value.status == status
