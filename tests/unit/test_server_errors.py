"""What the server answers for the requests aiohttp refuses or fails on (`runtime.server.refused`)."""

from __future__ import annotations

import pytest
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    TransferEncodingError,
)

from proxy.runtime.server import CannotListen, check_port_free, refused
from proxy.settings import Settings
from tests.support.processes import free_port


def test_a_head_too_large_is_431_and_names_the_limits_not_the_line() -> None:
    error = refused(400, LineTooLong("Authorization: Bearer vk_secret_0123456789", "4096"))
    assert (error.status, error.code) == (431, "request_head_too_large")
    assert "vk_secret" not in error.message and "4 KiB" in error.message
    many = refused(400, BadHttpMessage("Too many headers received"))
    assert (many.status, many.code) == (431, "request_head_too_large")


def test_a_malformed_head_is_400_with_the_parsers_reason_and_none_of_the_request() -> None:
    error = refused(400, InvalidHeader(b"x-api-key : vk_secret_0123456789"))
    assert (error.status, error.code) == (400, "invalid_http")
    assert "vk_secret" not in error.message
    reason = refused(400, BadHttpMessage("Invalid header token:\n\n  b'x-api-key : vk_s'\n  ^"))
    assert reason.message == "The request is not valid HTTP/1.1 (Invalid header token)."


def test_a_crash_outside_the_exchange_is_a_500_that_says_where_to_look() -> None:
    error = refused(500, RuntimeError("vk_secret_0123456789 in a bug's message"))
    assert (error.status, error.code) == (500, "internal_error")
    assert "vk_secret" not in error.message


@pytest.mark.parametrize(
    "fault",
    [
        # both parsers: an absolute target without a host, as the message
        InvalidURLError("http:///v1/models?key=vk_secret_0123456789"),
        # the pure-Python parser (AIOHTTP_NO_EXTENSIONS=1, or no C extension): a quote of
        # the line, or the bytes of a chunk size, as the message
        BadStatusLine("GET /v1/models?key=vk_secret_0123456789 HTTX/1.1"),
        BadHttpMethod("vk_secret_0123456789 /v1/models HTTP/1.1"),
        InvalidHeader("Authorization: Bearer vk_secret_0123456789"),
        TransferEncodingError("vk_secret_0123456789"),
        TransferEncodingError("vk_secret_0123456789:\n\n  b'x'\n  ^"),
    ],
    ids=lambda fault: type(fault).__name__,
)
def test_a_refusal_whose_message_is_the_request_is_said_by_its_kind(
    fault: HttpProcessingError,
) -> None:
    error = refused(400, fault)
    assert (error.status, error.code) == (400, "invalid_http")
    assert "vk_secret" not in error.message, error.message


def test_llhttps_own_reason_is_kept_whatever_kind_of_refusal_carries_it() -> None:
    fault = InvalidURLError("Invalid char in url path:\n\n  b'/v1/\\x01 HT'\n      ^")
    assert (
        refused(400, fault).message
        == "The request is not valid HTTP/1.1 (Invalid char in url path)."
    )


@pytest.mark.parametrize("host", ["fe80::1", "fe80::1%no-such-interface"])
def test_an_address_the_kernel_refuses_to_bind_is_one_line_not_a_traceback(host: str) -> None:
    # A link-local IPv6 address without its interface (EINVAL) ended the start with an
    # OSError traceback and exit code 1; only 'in use', 'not available' and 'denied' were said.
    settings = Settings.from_env({"SERVER_HOST": host, "SERVER_PORT": "0"})
    with pytest.raises(CannotListen) as refused:
        check_port_free(settings)
    assert str(refused.value).startswith(f"cannot listen on {host}:0: ") or "SERVER_HOST" in str(
        refused.value
    )


def test_server_host_addresses_that_overlap_are_said_to_overlap_not_to_be_in_use() -> None:
    # With several workers the port is tried first (asyncio's loop): 0.0.0.0 and 127.0.0.1 on
    # one free port were refused as "already in use: stop what holds it", which nothing did.
    port = free_port()
    settings = Settings.from_env({"SERVER_HOST": "0.0.0.0,127.0.0.1", "SERVER_PORT": str(port)})
    with pytest.raises(CannotListen) as refused:
        check_port_free(settings)
    assert "overlap" in str(refused.value)
