"""What LOG_BODIES puts in a line for bodies that are not JSON: an upload as its form's fields
(a file as its name, type and size, never its bytes), other bytes as their type and size.

Before, every body was logged as its bytes decoded as text: 20 KB of audio in a
transcription's form became a 40 KB line of replacement characters that showed nothing.
"""

from __future__ import annotations

import io
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
from aiohttp.test_utils import TestClient

from tests.conftest import OPENAI_REAL, OPENAI_VK, auth

# 20 KB of audio: a WAV header, then samples that are no UTF-8 text.
AUDIO = b"RIFF\x24\x50\x00\x00WAVEfmt " + bytes(range(128, 256)) * 160
LINES = b'{"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n'


def sdk(gateway: TestClient) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=str(gateway.make_url("/v1")), api_key=OPENAI_VK, max_retries=0
    )


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_a_transcription_is_logged_as_its_form_fields_and_its_file_as_a_placeholder(
    make_gateway: Callable[..., Awaitable[TestClient]], log_path: Path
) -> None:
    gateway = await make_gateway(LOG_BODIES="true")
    async with sdk(gateway) as client:
        heard = await client.audio.transcriptions.create(
            model="whisper-1",
            file=("speech.wav", AUDIO, "audio/wav"),
            language="en",
            timestamp_granularities=["word", "segment"],
            response_format="verbose_json",
        )
    assert heard.text == "fake words"
    await gateway.close()  # every line written

    [line] = read_log(log_path)
    assert line["request"] == {
        "model": "whisper-1",
        "language": "en",
        "timestamp_granularities[]": ["word", "segment"],
        "response_format": "verbose_json",
        "file": {"filename": "speech.wav", "content_type": "audio/wav", "bytes": len(AUDIO)},
    }
    assert "\ufffd" not in log_path.read_text()
    assert len(log_path.read_bytes()) < 2000


async def test_a_file_upload_is_logged_as_its_purpose_and_a_placeholder_never_its_bytes(
    make_gateway: Callable[..., Awaitable[TestClient]], log_path: Path
) -> None:
    """A file's bytes are not logged even when they are text: an upload holds a whole
    dataset (a batch's requests, fine-tuning examples), not a prompt of this request."""
    gateway = await make_gateway(LOG_BODIES="true")
    async with sdk(gateway) as client:
        uploaded = await client.files.create(
            file=("input.jsonl", io.BytesIO(LINES)), purpose="batch"
        )
    assert uploaded.id
    await gateway.close()

    [line] = read_log(log_path)
    assert line["request"] == {
        "purpose": "batch",
        "file": {
            "filename": "input.jsonl",
            "content_type": "application/octet-stream",
            "bytes": len(LINES),
        },
    }
    assert "custom_id" not in log_path.read_text()


async def test_a_key_written_in_a_form_field_is_masked_in_the_logged_form(
    make_gateway: Callable[..., Awaitable[TestClient]], log_path: Path
) -> None:
    gateway = await make_gateway(LOG_BODIES="true")
    async with sdk(gateway) as client:
        await client.audio.transcriptions.create(
            model="whisper-1",
            file=(f"{OPENAI_VK}.wav", AUDIO, "audio/wav"),
            prompt=f"my key is {OPENAI_VK}, theirs {OPENAI_REAL}",
            extra_body={"api_key": "sk-third-party-0000000000"},
        )
    await gateway.close()

    text = log_path.read_text()
    assert OPENAI_VK not in text and OPENAI_REAL not in text
    assert "sk-third-party-0000000000" not in text
    [line] = read_log(log_path)
    mask = line["key"]  # the key's default name is its mask
    assert line["request"]["prompt"] == f"my key is {mask}, theirs [redacted]"
    assert line["request"]["file"]["filename"] == f"{mask}.wav"
    assert line["request"]["api_key"] == "[redacted]"


async def test_a_body_of_bytes_that_are_no_text_is_logged_as_its_type_and_size(
    make_gateway: Callable[..., Awaitable[TestClient]], log_path: Path
) -> None:
    gateway = await make_gateway(LOG_BODIES="true")
    headers = {**auth(OPENAI_VK), "Content-Type": "application/octet-stream"}
    response = await gateway.post("/v1/uploads/upload_1/raw", data=AUDIO, headers=headers)
    assert response.status == 200, await response.text()
    text_headers = {**auth(OPENAI_VK), "Content-Type": "text/plain"}
    response = await gateway.post("/v1/echo", data="plain words", headers=text_headers)
    assert response.status == 200, await response.text()
    await gateway.close()

    binary, text = read_log(log_path)
    assert binary["request"] == {"content_type": "application/octet-stream", "bytes": len(AUDIO)}
    assert text["request"] == "plain words"  # text stays text
