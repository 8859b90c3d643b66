"""A request's walk: which of the gateway's modules one request enters, and how often it crosses.

    .venv/bin/python bench/walk.py [--stream] [--websocket] [--verbose]

It builds the gateway in process (`build_app`, quotas on, the log to a file) in front of
the test suite's fake provider, sends one warm-up request, then one more under
`sys.setprofile`, and counts over the frames of `proxy/` the handler's task runs:

- modules entered: distinct modules with a frame of the request;
- crossings: calls from a frame of one module into another (the caller is the nearest
  frame of ours up the stack; a coroutine's resumption is not a call);
- returns: crossings the other way, a call returning into another module;
- per module: how often it was entered (record.py's count is the blackboard's);
- calls, all code: every Python function called (any module: aiohttp, the standard
  library) and every C function, in the handler's task once it began: a count, unlike a
  time, that other work on the machine cannot blur, to weigh a change of the path.

A reader following the request in an editor makes the same jumps: fewer is easier.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aiohttp import ClientSession  # noqa: E402
from aiohttp.test_utils import TestServer  # noqa: E402

from proxy.app import build_app  # noqa: E402
from proxy.settings import Settings  # noqa: E402
from tests.support.fake_provider import build_fake_provider  # noqa: E402

PROXY = str(ROOT / "proxy") + os.sep
KEY = "vk_walk_0123456789"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def module_of(frame: FrameType | None) -> tuple[str | None, FrameType | None]:
    """The nearest frame of ours from `frame` up, and its module (proxy/…)."""
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(PROXY):
            return name[len(PROXY) :], frame
        frame = frame.f_back
    return None, None


class Walk:
    """Calls and returns between the gateway's modules, in the handler's task only."""

    def __init__(self) -> None:
        self.task: asyncio.Task[Any] | None = None
        self.seen: set[int] = set()
        self.alive: list[FrameType] = []  # kept, so no id is reused while walking
        self.entered: Counter[str] = Counter()
        self.returns = 0
        self.modules: set[str] = set()
        self.trail: list[str] = []
        self.python_calls = 0
        self.counted: set[int] = set()
        self.c_calls = 0

    def __call__(self, frame: FrameType, event: str, arg: object) -> None:
        if self.task is not None and event in ("call", "c_call"):
            self._count(frame, event)
        if event not in ("call", "return"):
            return
        module, _ = module_of(frame)
        if module is None or frame.f_code.co_filename[len(PROXY) :] != module:
            return
        try:
            task = asyncio.current_task()
        except RuntimeError:
            return
        if self.task is None:
            if not module.endswith(("relay/relay.py", "exchange.py")):
                return
            self.task = task
        if task is not self.task:
            return
        if event == "call":
            if id(frame) in self.seen:  # a coroutine resumed, not called
                return
            self.seen.add(id(frame))
            self.alive.append(frame)
            self.modules.add(module)
            caller, _ = module_of(frame.f_back)
            if caller is not None and caller != module:
                self.entered[module] += 1
                self.trail.append(f"{caller} -> {module} ({frame.f_code.co_name})")
        elif frame.f_code.co_flags & 0x80 == 0 or _finished(frame):
            caller, _ = module_of(frame.f_back)
            if caller is not None and caller != module:
                self.returns += 1

    def _count(self, frame: FrameType, event: str) -> None:
        try:
            if asyncio.current_task() is not self.task:
                return
        except RuntimeError:
            return
        if event == "c_call":
            self.c_calls += 1
        elif not frame.f_code.co_flags & _SUSPENDABLE:  # a plain function: each call is one
            self.python_calls += 1
        elif id(frame) not in self.counted:  # a coroutine or generator: its first start only
            self.counted.add(id(frame))
            self.alive.append(frame)
            self.python_calls += 1


def _finished(frame: FrameType) -> bool:
    """A coroutine frame's return event is final when it does not sit at a yield."""
    return frame.f_lasti < 0 or frame.f_code.co_code[frame.f_lasti] not in _YIELDS


# Code flags of a frame that can be resumed: generator, coroutine, async generator.
_SUSPENDABLE = 0x20 | 0x80 | 0x200
_YIELDS = {op for name, op in __import__("dis").opmap.items() if "YIELD" in name}


async def walk(stream: bool, websocket: bool) -> Walk:
    fake = TestServer(build_fake_provider())
    await fake.start_server()
    base = str(fake.make_url("")).rstrip("/")
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys.json"
        keys.write_text(
            json.dumps(
                {
                    "providers": {"openai": {"base_url": f"{base}/v1"}},
                    "virtual_keys": {KEY: {"provider": "openai", "api_key": "sk-walk"}},
                }
            )
        )
        settings = Settings.from_env(
            {
                "KEYS_FILE_PATH": str(keys),
                "QUOTA_ENABLED": "true",
                "LOG_TO_FILE": "true",
                "LOG_FILE_PATH": str(Path(tmp) / "log.jsonl"),
            }
        )
        server = TestServer(build_app(settings))
        await server.start_server()
        headers = {"Authorization": f"Bearer {KEY}"}
        body = {**BODY, "stream": stream}
        recorder = Walk()
        async with ClientSession() as session:
            for round_ in range(2):
                if round_:
                    sys.setprofile(recorder)
                try:
                    if websocket:
                        url = server.make_url("/v1/realtime?model=gpt-realtime")
                        async with session.ws_connect(url, headers=headers) as ws:
                            await ws.receive()
                            await ws.close()
                    else:
                        url = server.make_url("/v1/chat/completions")
                        async with session.post(url, json=body, headers=headers) as response:
                            await response.read()
                    await asyncio.sleep(0.05)  # the settle, after the answer
                finally:
                    sys.setprofile(None)
        await server.close()
    await fake.close()
    return recorder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--websocket", action="store_true")
    parser.add_argument("--verbose", action="store_true")
    options = parser.parse_args()
    recorder = asyncio.run(walk(options.stream, options.websocket))
    if options.verbose:
        print("\n".join(recorder.trail))
    print(f"modules entered: {len(recorder.modules)}")
    print(f"crossings into another module: {sum(recorder.entered.values())}")
    print(f"returns into another module: {recorder.returns}")
    print(f"calls, all code: {recorder.python_calls} Python, {recorder.c_calls} C")
    print("entered, by module: " + ", ".join(f"{m} {n}" for m, n in recorder.entered.most_common()))


if __name__ == "__main__":
    main()
