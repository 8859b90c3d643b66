"""docs/reverse-proxies.md's nginx configuration, run as written in front of a gateway process.

Its `nginx` block is taken from the page, given the gateway's address and a loopback port,
and served by a real nginx (`make test` installs it): a stream comes event by event (also
through nginx's defaults), the SDKs work under the stripped prefix (the rest of the path as
sent), a Realtime session opens, a body over nginx's own 1m default gets through, and failed
authentications are counted per client behind the one nginx.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import shutil
import time
from pathlib import Path
from urllib.parse import quote

import aiohttp
import anthropic
import openai
import pytest

from tests.conftest import ANTHROPIC_VK, OPENAI_VK, auth
from tests.support.processes import Processes, free_port, start_gateway

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "reverse-proxies.md"


def nginx() -> str:
    """nginx's path (`make test` installs it); a skip without it."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if not found:
        pytest.skip("no nginx: `make test` installs it (apt-get install nginx)")
    return found


def documented_config(gateway: str, port: int, bare: int, work: Path) -> str:
    """The page's nginx block, pointed at `gateway` and listening on `port`, made a whole
    configuration that runs in the foreground; and a server of nginx's defaults on `bare`."""
    (block,) = re.findall(r"```nginx\n(.*?)```", PAGE.read_text(), re.DOTALL)
    assert "server 10.0.0.5:8080;" in block and "listen 443 ssl;" in block
    block = block.replace("server 10.0.0.5:8080;", f"server {gateway};")
    block = block.replace("listen 443 ssl;", f"listen 127.0.0.1:{port};")
    # As root, nginx's workers would run as nobody, who cannot reach the test's directory.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return (
        f"{user}daemon off;\npid {work}/nginx.pid;\nerror_log {work}/error.log;\nevents {{}}\n"
        f"http {{\n access_log off;\n client_body_temp_path {work}/body;\n"
        f" proxy_temp_path {work}/proxy;\n{block}"
        # nginx's defaults, for comparison: HTTP/1.0 to the gateway, proxy_buffering on.
        f"server {{ listen 127.0.0.1:{bare}; location / {{ proxy_pass http://{gateway}; }} }}\n}}\n"
    )


def accepts(port: int) -> bool:
    try:
        http.client.HTTPConnection("127.0.0.1", port, timeout=1).connect()
    except OSError:
        return False
    return True


def post(
    port: int, path: str, body: bytes, headers: dict[str, str], source: str = "127.0.0.1"
) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection(
        "127.0.0.1", port, timeout=10, source_address=(source, 0)
    )
    connection.request("POST", path, body, {"Content-Type": "application/json", **headers})
    return connection.getresponse()


def logged(log: Path, request_id: str) -> dict[str, object]:
    """The interaction log's line of `request_id`, once written (the log has its own thread)."""
    deadline = time.monotonic() + 10
    while True:
        for line in log.read_text().splitlines() if log.exists() else ():
            record = json.loads(line)
            if record["request_id"] == request_id:
                return dict(record)
        assert time.monotonic() < deadline, f"no log line for {request_id}"
        time.sleep(0.02)


async def first_frame(url: str) -> str:
    """The type of the first event of a Realtime session opened at `url`."""
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, headers=auth(OPENAI_VK), protocols=["realtime"]) as ws,
    ):
        message = await asyncio.wait_for(ws.receive(), 5)
        return str(json.loads(message.data)["type"])


def test_the_documented_nginx_configuration_streams_strips_the_prefix_and_names_each_client(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    binary = nginx()
    _, gateway = start_gateway(
        processes,
        process_keys,
        tmp_path / "interactions.jsonl",
        TRUSTED_PROXIES="127.0.0.1",  # nginx
        AUTH_FAILURE_LIMIT="2",
    )
    port, bare = free_port(), free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(documented_config(gateway.removeprefix("http://"), port, bare, tmp_path))
    processes.start([binary, "-c", str(conf)])
    deadline = time.monotonic() + 10
    while not accepts(port):  # nginx says nothing when it listens
        assert time.monotonic() < deadline, (tmp_path / "error.log").read_text()
        time.sleep(0.02)
    base = f"http://127.0.0.1:{port}/llm"

    # A stream: 5 events 200 ms apart come as they are sent, not whole at the end; also
    # through nginx's defaults, which held it whole until the gateway said not to.
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    for through, path in ((port, "/llm/v1/chat/completions"), (bare, "/v1/chat/completions")):
        answer = post(
            through,
            path,
            json.dumps({**chat, "stream": True}).encode(),
            {**auth(OPENAI_VK), "x-fake-chunks": "5", "x-fake-delay-ms": "200"},
        )
        assert answer.status == 200
        arrivals = []
        while answer.read1(65536):
            arrivals.append(time.monotonic())
        assert len(arrivals) >= 5 and arrivals[-1] - arrivals[0] > 0.6, (path, arrivals)
        assert "x-accel-buffering" not in {name.lower() for name, _ in answer.getheaders()}

    # A stream the provider breaks off reaches the client cut, not ended, through both:
    # over nginx's default HTTP/1.0 a close ends a body of unknown length, so nginx passed
    # the half stream on as whole until the gateway reset the connection instead.
    for through, path in ((port, "/llm/v1/chat/completions"), (bare, "/v1/chat/completions")):
        answer = post(
            through,
            path,
            json.dumps({**chat, "stream": True}).encode(),
            {**auth(OPENAI_VK), "x-fake-chunks": "6", "x-fake-drop": "midstream"},
        )
        assert answer.status == 200
        with pytest.raises(http.client.IncompleteRead):
            answer.read()

    # The SDKs, with the prefix in their base URL.
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=OPENAI_VK, max_retries=0)
    completion = client.chat.completions.create(model="gpt-4o-mini", messages=chat["messages"])
    assert completion.choices[0].message.content
    claude = anthropic.Anthropic(base_url=base, api_key=ANTHROPIC_VK, max_retries=0)
    message = claude.messages.create(
        model="claude-sonnet-4-6-20260101",
        max_tokens=10,
        messages=[{"role": "user", "content": "hi"}],
    )
    assert message.content

    # A Realtime session opens through it (Upgrade and Connection passed over HTTP/1.1).
    assert asyncio.run(first_frame(f"{base}/v1/realtime?model=gpt-realtime")) == "session.created"

    # The rest of the path goes as the client encoded it: a Bedrock model ARN's %2F stays
    # one segment, so the model read is the whole ARN.
    arn = "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/abc123"
    path = f"/llm/v1/model/{quote(arn, safe='')}/converse"
    answer = post(port, path, b"{}", {**auth(OPENAI_VK), "x-request-id": "arn-1"})
    answer.read()
    assert logged(tmp_path / "interactions.jsonl", "arn-1")["model"] == arn

    # A 2 MB prompt: over nginx's default client_max_body_size (1m), under MAX_BODY_BYTES.
    big = {**chat, "messages": [{"role": "user", "content": "x" * 2_000_000}]}
    answer = post(port, "/llm/v1/chat/completions", json.dumps(big).encode(), auth(OPENAI_VK))
    assert answer.status == 200, answer.read()[:300]

    # Two clients behind the one nginx: one guessing (writing its own X-Forwarded-For,
    # which nginx appends its peer to) is locked out alone.
    for n in range(3):
        headers = {**auth(f"vk_guess_{n:08d}"), "X-Forwarded-For": f"198.51.100.{n}"}
        answer = post(port, "/llm/v1/chat/completions", b"{}", headers, source="127.0.0.2")
        answer.read()
        assert answer.status == (429 if n == 2 else 401)
    answer = post(
        port, "/llm/v1/chat/completions", b"{}", auth("vk_guess_00000009"), source="127.0.0.3"
    )
    assert answer.status == 401  # another client: not locked
