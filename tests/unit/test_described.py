"""What a failed attempt says of its cause (`described.described`): the 502's message, the log
line's error, /health's last_error. The errors are the wire's own (aiohttp's types)."""

from __future__ import annotations

import socket

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey

from proxy.upstream.described import described

REAL = "sk-real-openai-0123456789abcdef"
KEY = ConnectionKey("llm.corp.internal", 443, True, True, None, None, None)


def test_a_name_that_does_not_exist_is_not_found() -> None:
    error = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert described(aiohttp.ClientConnectorDNSError(KEY, error)) == (
        "the host name was not found (DNS)"
    )


def test_a_resolver_that_failed_is_not_a_name_not_found() -> None:
    """DNS unreachable or failing (EAI_AGAIN, EAI_FAIL: a container whose resolver is down)
    said "the host name was not found", sending the operator to check a name that is right."""
    for code, words in (
        (socket.EAI_AGAIN, "Temporary failure in name resolution"),
        (socket.EAI_FAIL, "Non-recoverable failure in name resolution"),
    ):
        said = described(aiohttp.ClientConnectorDNSError(KEY, socket.gaierror(code, words)))
        assert "not found" not in said
        assert said == f"the DNS lookup of its host name failed ({words})"


@pytest.mark.parametrize(
    ("message", "words"),
    [
        # aiohttp's C parser (llhttp): its reason, then the refused line quoted as bytes
        (
            "Bad status line:\n  Invalid status code:\n\n  b'HTTP/1.1 4x1 " + REAL + "'\n   ^",
            "Bad status line: Invalid status code",
        ),
        ("Invalid header token:\n\n  b'X-Echo " + REAL + "'\n       ^", "Invalid header token"),
        # its pure-Python parser (AIOHTTP_NO_EXTENSIONS=1): the line quoted after its words
        ("Bad status line 'HTTP/1.1 4x1 " + REAL + "'", "Bad status line"),
        ("Invalid HTTP header: b'X-Echo " + REAL + "'", "Invalid HTTP header"),
        # the wire's own words quote nothing: kept as they are
        ("Invalid header value char", "Invalid header value char"),
        ("status 600", "status 600"),
    ],
)
def test_an_answer_that_is_not_http_is_said_without_the_bytes_the_parser_quotes(
    message: str, words: str
) -> None:
    """A handshake's answer (aiohttp's parser, not the wire's) whose line the parser refused:
    its message quotes that line, which may hold the key the provider was sent (a broken
    server reflecting it). The 502, the log line and /health say the refusal, not the line."""
    said = described(aiohttp.ClientResponseError(None, (), message=message))  # type: ignore[arg-type]
    assert said == f"sent an answer that is not valid HTTP ({words})"
