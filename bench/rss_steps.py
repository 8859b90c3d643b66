"""Where the gateway's idle RSS comes from: VmRSS after each group of imports, in one process.

    .venv/bin/python bench/rss_steps.py

The floor's imports first (asyncio, aiohttp's server and client, uvloop: what
`bench/passthrough.py` loads), then each group of third-party packages the gateway loads at
start (as a running gateway's `sys.modules` lists them), then the gateway's own modules
(`proxy.app`). What is left between the last line and a started gateway's RSS idle
(`bench/run.py`) is the start itself: settings, keys, the price data in use, the app.
Each line: the group, RSS after it, and what it added.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STEPS = (
    ("python", ()),
    ("aiohttp + uvloop (the floor's imports)", ("asyncio", "aiohttp", "aiohttp.web", "uvloop")),
    ("httptools, orjson", ("httptools", "orjson")),
    ("prometheus_client", ("prometheus_client",)),
    ("brotli, zstandard", ("brotli", "zstandard")),
    ("multipart", ("multipart",)),
    ("pydantic (for genai_prices)", ("pydantic",)),
    ("httpx2 (for genai_prices)", ("httpx2",)),
    ("genai_prices (its models and data)", ("genai_prices",)),
    ("proxy.app (the gateway's own modules)", ("proxy.app",)),
)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    last = None
    for name, modules in STEPS:
        for module in modules:
            importlib.import_module(module)
        now = rss_mb()
        added = "" if last is None else f"+{now - last:.1f}"
        print(f"{name:42s} {now:6.1f} MB  {added}")
        last = now
    return 0


if __name__ == "__main__":
    sys.exit(main())
