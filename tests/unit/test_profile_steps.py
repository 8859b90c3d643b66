"""bench/profile_steps.py puts each py-spy sample under the step its innermost own frame names,
or a profile's table of steps says nothing true."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.support.processes import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import profile_steps  # noqa: E402

GATEWAY = "<module> (gateway.py:66);serve (proxy/runtime/server.py:43);run_app (aiohttp/web.py:502)"


HANDLE = f"{GATEWAY};RequestHandler._handle_request (aiohttp/web_protocol.py:577);relay (proxy/relay/relay.py:56)"


def test_each_sample_goes_under_the_step_its_innermost_own_frame_names(tmp_path: Path) -> None:
    raw = tmp_path / "gateway.txt"
    raw.write_text(
        "\n".join(
            [
                f"{HANDLE};KeyRing.authenticate (proxy/keys/keys.py:80) 3",
                f"{HANDLE};Metrics.observe (proxy/observe/metrics.py:200);Counter.inc (prometheus_client/metrics.py:300) 2",
                f"{HANDLE};forward (proxy/relay/relay.py:99);ClientSession._request (aiohttp/client.py:900) 4",
                f"{HANDLE};forward (proxy/relay/relay.py:99);upstream_headers (proxy/upstream/providers.py:70) 1",
                f"{HANDLE};stream_back (proxy/relay/relay.py:140);stamp (proxy/quota/quota.py:156) 1",
                f"{HANDLE};forward (proxy/relay/relay.py:99);Wire.request (proxy/upstream/wire.py:281) 2",
                f"{HANDLE};Record.begin (proxy/record.py:95);own_request_id (proxy/record.py:25) 1",
                f"{GATEWAY};RequestHandler.finish_response (aiohttp/web_protocol.py:700) 2",
                f"{GATEWAY};RequestHandler.data_received (aiohttp/web_protocol.py:400) 5",
                f"{GATEWAY} 1",
                "Thread._bootstrap (threading.py:1002);Logbook._drain (proxy/observe/logbook.py:167) 3",
            ]
        )
        + "\n"
    )
    one = profile_steps.Round(cpu={"main": 220.0, "threads": 30.0}, rps=0.0)
    one.add(raw)
    steps = one.steps["main"]
    assert sum(steps.values()) == 22
    assert dict(steps) == {
        "authentication": 3,
        "metrics": 2,
        profile_steps.CLIENT: 4,
        "send the request, read the answer (the wire, proxy/upstream/wire.py)": 2,
        "header building": 2,
        "request id": 1,
        profile_steps.RESPONSE: 2,
        profile_steps.SERVER: 5,
        profile_steps.LOOP: 1,
    }
    # 22 samples of the loop's thread for its 220 us; the writer thread's 3 for its own 30 us.
    assert one.us("authentication") == pytest.approx(30.0)
    assert one.us("log record") == pytest.approx(30.0)
    assert one.us("Counter.inc (prometheus_client/metrics.py)", "leaves") == pytest.approx(20.0)


def test_the_duties_floor_is_read_like_the_other_bare_handlers(tmp_path: Path) -> None:
    """bench/duties.py's own code is one step, what it calls into goes under aiohttp's or
    the wire's steps, and the frames that start its loop are not its own code."""
    start = "<module> (duties.py:300);main (duties.py:290);run (uvloop/__init__.py:105)"
    handle = f"{start};RequestHandler._handle_request (aiohttp/web_protocol.py:577);handler.<locals>.forward (duties.py:180)"
    raw = tmp_path / "duties.txt"
    raw.write_text(
        "\n".join(
            [
                f"{handle} 4",
                f"{handle};Wire.request (proxy/upstream/wire.py:351) 3",
                f"{handle};StreamResponse.prepare (aiohttp/web_response.py:464) 2",
                f"{start} 1",
            ]
        )
        + "\n"
    )
    one = profile_steps.Round(cpu={"main": 100.0, "threads": 0.0}, rps=0.0)
    one.add(raw)
    assert dict(one.steps["main"]) == {
        "duties.py: its own code": 4,
        "send the request, read the answer (the wire, proxy/upstream/wire.py)": 3,
        profile_steps.RESPONSE: 2,
        profile_steps.LOOP: 1,
    }
