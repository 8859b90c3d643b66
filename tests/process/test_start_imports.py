"""What a gateway loads: the clouds' signers, Redis and OpenTelemetry only when configured.

botocore, google-auth, redis and opentelemetry are ~25 MB of a process's memory together
(bench/README.md, RSS idle): a gateway whose keys.json has no Bedrock or Vertex target,
with no REDIS_URL and traces off, serves a request without importing any of them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path

from tests.conftest import OPENAI_REAL, OPENAI_VK
from tests.support.bodies import CHAT
from tests.support.processes import Processes, free_port, gateway_command

HEAVY = ("botocore", "google.auth", "redis", "opentelemetry")


def test_a_plain_gateway_never_imports_the_clouds_redis_or_tracing(
    processes: Processes, fake_url: str, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(
        json.dumps(
            {
                "providers": {"openai": {"base_url": f"{fake_url}/v1"}},
                "virtual_keys": {OPENAI_VK: {"provider": "openai", "api_key": OPENAI_REAL}},
            }
        )
    )
    port, imports = free_port(), tmp_path / "imports.txt"
    env = {
        **os.environ,
        "KEYS_FILE_PATH": str(keys),
        "SERVER_HOST": "127.0.0.1",
        "LOG_TO_FILE": "true",  # the listening line on stdout, which this test reads
        "LOG_FILE_PATH": str(tmp_path / "log.jsonl"),
        "SERVER_PORT": str(port),
        "QUOTA_ENABLED": "true",
        "PYTHONPROFILEIMPORTTIME": "1",  # one stderr line per module imported
    }
    with open(imports, "wb") as stderr:
        gateway = subprocess.Popen(
            gateway_command(), env=env, stdout=subprocess.PIPE, stderr=stderr, text=True
        )
    processes.started.append(gateway)
    assert gateway.stdout is not None
    while "listening on" not in (line := gateway.stdout.readline()):
        assert line, imports.read_text()[-2000:]
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(CHAT).encode(),
        headers={"Authorization": f"Bearer {OPENAI_VK}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert reply.status == 200
    gateway.send_signal(signal.SIGTERM)
    gateway.communicate(timeout=20)
    loaded = {
        line.rsplit("|", 1)[1].strip() for line in imports.read_text().splitlines() if "|" in line
    }
    assert "proxy.app" in loaded and "genai_prices" in loaded  # the log was read
    heavy = [name for name in loaded for h in HEAVY if name == h or name.startswith(h + ".")]
    assert not heavy
