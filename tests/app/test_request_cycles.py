"""What a request leaves behind is freed by reference counting, not left in cycles.

The gateway collects young garbage seldom and freezes what it holds long (`server.tune_gc`,
and again after each keys reload, `keys/reload.py`): a cycle left by a request waits for a
collection, and one a reload froze while its request was in flight is never freed (a long
run under reloads grew by every cut stream's body, error and record). So a request of each
ending leaves no object of the gateway's own in a cycle.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import OPENAI_VK, auth
from tests.support.bodies import CHAT

Records = Callable[..., Awaitable[list[dict[str, Any]]]]


@contextlib.contextmanager
def cycles_kept() -> Iterator[list[str]]:
    """No cyclic collection inside; then the gateway's objects found only in cycles, by type."""
    gc.collect()
    gc.disable()
    found: list[str] = []
    try:
        yield found
    finally:
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            found.extend(
                sorted(
                    {
                        f"{type(thing).__module__}.{type(thing).__qualname__}"
                        for thing in gc.garbage
                        if type(thing).__module__.startswith("proxy.")
                    }
                )
            )
        finally:
            gc.garbage.clear()
            gc.set_debug(0)
            gc.enable()


@pytest.mark.parametrize(
    ("fault", "is_stream"),
    [
        ({}, True),
        ({}, False),
        ({"x-fake-drop": "midstream"}, True),
        ({"x-fake-drop": "midstream"}, False),
        ({"x-fake-hang": "midstream", "x-fake-delay-ms": "1"}, True),
    ],
    ids=["stream", "json", "stream-provider-cut", "json-provider-cut", "stream-client-left"],
)
async def test_a_request_leaves_none_of_the_gateways_objects_in_a_cycle(
    gateway: TestClient, records: Records, fault: dict[str, str], is_stream: bool
) -> None:
    """A cut body kept its exception, whose traceback held the reader's frame and the body
    (a cycle holding the request's record, usage tap and connection); a closed upstream
    connection and its parser held each other."""
    headers = {**auth(OPENAI_VK), "x-fake-chunks": "6", **fault}
    with cycles_kept() as found:
        response = await gateway.post(
            "/v1/chat/completions", json={**CHAT, "stream": is_stream}, headers=headers
        )
        if "x-fake-hang" in fault:
            await response.content.readany()
            response.close()  # the client leaves
        else:
            with contextlib.suppress(aiohttp.ClientPayloadError):
                await response.read()
        (line,) = await records(1)
        del response
    assert line["status"] in (200, 499, 502), line
    assert found == [], found
