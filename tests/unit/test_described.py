"""What a failed attempt says of its cause (`described.described`): the 502's message, the log
line's error, /health's last_error. The errors are the wire's own (aiohttp's types)."""

from __future__ import annotations

import socket

import aiohttp
from aiohttp.client_reqrep import ConnectionKey

from proxy.upstream.described import described

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
