"""A gateway with quotas in memory whose every admission first waits for one Redis PING.

    .venv/bin/python bench/ping_gateway.py REDIS_URL path/to/gateway.py [gateway flags...]

The floor of any admission shared through Redis: the same in-memory admission as the plain
gateway, plus one round trip to Redis over the tracker's own connection
(`proxy/quota/redis_wire.py`) that does nothing (PING). `bench/redis_cost.py` races it as
the contender `ping=CHECKOUT`: its p50 at concurrency 1 over the memory gateway's is what
one more round trip costs a request in the gateway's process on this machine (the loop
sleeping and waking once more, the two writes and reads), before Redis runs any script and
before the tracker's own work.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Any

url, gateway, *flags = sys.argv[1:]
sys.path.insert(0, str(Path(gateway).resolve().parent))

from proxy.quota import quota  # noqa: E402
from proxy.quota.redis_wire import RedisWire, pack  # noqa: E402

admit = quota.Quota.admit
wires: list[RedisWire] = []


async def admit_after_ping(self: quota.Quota, *args: Any, **kwargs: Any) -> Any:
    if not wires:
        wires.append(RedisWire(url, 1.0, "llm-gateway-ping", 30))
    await wires[0].call(pack("PING"))
    return await admit(self, *args, **kwargs)


quota.Quota.admit = admit_after_ping  # type: ignore[method-assign]
sys.argv = [gateway, *flags]
runpy.run_path(gateway, run_name="__main__")
