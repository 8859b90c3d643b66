"""What the gateway's exception handler makes of asyncio's accept failures
(`runtime.server.accept_failures`): one out-of-files notice each, no traceback; any other
context goes to the loop's default handler, as before."""

from __future__ import annotations

import errno
from typing import Any

from proxy.runtime.server import accept_failures


class Loop:
    """The loop as the handler reads it: its default handler, recording what it was given."""

    def __init__(self) -> None:
        self.defaults: list[dict[str, Any]] = []

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        self.defaults.append(context)


def _accept_failed(code: int) -> dict[str, Any]:
    # asyncio's own context (selector_events.BaseSelectorEventLoop._accept_connection)
    return {
        "message": "socket.accept() out of system resource",
        "exception": OSError(code, "Too many open files"),
    }


def test_an_accept_out_of_descriptors_is_told_as_the_gateways_own_want() -> None:
    told: list[str] = []
    loop = Loop()
    handle = accept_failures(told.append)
    handle(loop, _accept_failed(errno.EMFILE))  # type: ignore[arg-type]
    handle(loop, _accept_failed(errno.ENFILE))  # type: ignore[arg-type]
    assert len(told) == 2 and not loop.defaults
    assert told[0].startswith("the gateway is out of file descriptors (its limit on open files")
    assert told[0].endswith(": new client connections wait to be accepted")
    assert "fs.file-max" in told[1]


def test_every_other_context_goes_to_the_loops_default_handler() -> None:
    told: list[str] = []
    loop = Loop()
    handle = accept_failures(told.append)
    out_of_memory = {**_accept_failed(errno.ENOMEM)}
    other = {"message": "Task exception was never retrieved", "exception": ValueError("x")}
    for context in (out_of_memory, other):
        handle(loop, context)  # type: ignore[arg-type]
    assert loop.defaults == [out_of_memory, other] and not told
