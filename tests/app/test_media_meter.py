"""Endpoints without token usage are metered, with the official openai SDK in front of the
fake provider: images, speech, transcriptions and translations count as requests, and are
priced by their own units where genai-prices has a rate (speech's characters, audio's
seconds, a GPT image model's tokens); where it has none the cost is null, not zero."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestClient

from proxy.record import Usage
from tests.conftest import OPENAI_VK, auth
from tests.support.fake_media import (
    AUDIO_BYTES,
    AUDIO_SECONDS,
    EDIT_IMAGE_TOKENS,
    IMAGE_INPUT_TOKENS,
    IMAGE_OUTPUT_TOKENS,
    SPEECH_INPUT_TOKENS,
    SPEECH_OUTPUT_TOKENS,
    TRANSCRIBE_AUDIO_TOKENS,
    TRANSCRIBE_INPUT_TOKENS,
    TRANSCRIBE_OUTPUT_TOKENS,
)
from tests.support.observed import assert_views_agree
from tests.unit.test_pricing import library_cost

MEDIA_VK = "vk_test_media_7e9a1c3e5f"
MEDIA = {
    "provider": "openai",
    "api_key": "sk-real-media-7878787878",
    "name": "media",
    "allowed_models": [
        "gpt-image-1",
        "dall-e-2",
        "tts-1",
        "gpt-4o-mini-tts",
        "whisper-1",
        "gpt-4o-mini-transcribe",
    ],
    "budget": {"usd": 100, "window_seconds": 3600},
}
WAV = ("a.wav", b"RIFF....WAVEfmt ", "audio/wav")
PNG = ("a.png", b"\x89PNG\r\n\x1a\n....", "image/png")
SPOKEN = "hello world"


@pytest.fixture
async def gateway(gateway_with_keys: Callable[..., Awaitable[TestClient]]) -> TestClient:
    return await gateway_with_keys({MEDIA_VK: MEDIA})


def sdk(gateway: TestClient, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(gateway.make_url("/v1")), api_key=key, max_retries=0)


async def test_allowed_media_requests_pass_count_and_are_priced_by_their_units(
    gateway: TestClient, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    client = sdk(gateway, MEDIA_VK)
    image = await client.images.generate(model="gpt-image-1", prompt="a cat")
    assert image.usage is not None and image.usage.output_tokens == IMAGE_OUTPUT_TOKENS
    await client.images.edit(model="gpt-image-1", image=PNG, prompt="a hat")  # multipart
    await client.images.generate(model="dall-e-2", prompt="a dog")
    speech = await client.audio.speech.create(model="tts-1", voice="alloy", input=SPOKEN)
    assert speech.content.startswith(b"\xff\xfb")
    await client.audio.speech.create(model="gpt-4o-mini-tts", voice="alloy", input=SPOKEN)
    heard = await client.audio.transcriptions.create(model="whisper-1", file=WAV)
    assert heard.text == "fake words"
    await client.audio.translations.create(
        model="whisper-1", file=WAV, response_format="verbose_json"
    )
    lines = await records(7)
    image = Usage(IMAGE_INPUT_TOKENS, IMAGE_OUTPUT_TOKENS, output_image_tokens=IMAGE_OUTPUT_TOKENS)
    edit = Usage(
        IMAGE_INPUT_TOKENS + EDIT_IMAGE_TOKENS,
        IMAGE_OUTPUT_TOKENS,
        input_image_tokens=EDIT_IMAGE_TOKENS,
        output_image_tokens=IMAGE_OUTPUT_TOKENS,
    )
    expected = [
        ("gpt-image-1", library_cost("openai", "gpt-image-1", image)),
        ("gpt-image-1", library_cost("openai", "gpt-image-1", edit)),  # image input at $10/M
        ("dall-e-2", None),  # no price per image in the data: counted, not priced
        ("tts-1", len(SPOKEN) * 15 / 1e6),  # $15 per million characters
        ("gpt-4o-mini-tts", None),  # priced by audio tokens, which the API does not report
        ("whisper-1", AUDIO_SECONDS * 0.36 / 3600),  # $0.36 an hour
        ("whisper-1", AUDIO_SECONDS * 0.36 / 3600),  # verbose_json's duration
    ]
    assert [line["model"] for line in lines] == [model for model, _ in expected]
    for line, (_, cost) in zip(lines, expected, strict=True):
        assert line["status"] == 200 and line["key"] == "media"
        assert line["cost_usd"] == (None if cost is None else pytest.approx(cost, rel=1e-9))
    assert lines[1]["usage"]["input_image_tokens"] == EDIT_IMAGE_TOKENS
    assert lines[3]["usage"]["input_characters"] == len(SPOKEN)
    assert lines[5]["usage"]["input_audio_seconds"] == AUDIO_SECONDS
    usage = await (await gateway.get("/usage", headers=auth(MEDIA_VK))).json()
    assert usage["totals"]["requests"] == 7
    priced = sum(cost for _, cost in expected if cost is not None)
    assert usage["totals"]["spent_usd"] == pytest.approx(priced, abs=1e-5)  # micro-dollars


async def test_a_transcription_reporting_tokens_is_priced_by_them_for_any_key(
    gateway: TestClient, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    # An unrestricted key's upload is read for its model too: the price depends on it.
    client = sdk(gateway, OPENAI_VK)
    await client.audio.transcriptions.create(model="gpt-4o-transcribe", file=WAV)
    await client.audio.transcriptions.create(model="whisper-1", file=WAV)
    tokens, seconds = await records(2)
    reported = Usage(
        TRANSCRIBE_INPUT_TOKENS,
        TRANSCRIBE_OUTPUT_TOKENS,
        input_audio_tokens=TRANSCRIBE_AUDIO_TOKENS,
    )
    assert tokens["model"] == "gpt-4o-transcribe"
    assert tokens["usage"]["input_audio_tokens"] == TRANSCRIBE_AUDIO_TOKENS
    expected = library_cost("openai", "gpt-4o-transcribe", reported)
    assert tokens["cost_usd"] == pytest.approx(expected)
    assert seconds["model"] == "whisper-1"
    assert seconds["cost_usd"] == pytest.approx(AUDIO_SECONDS * 0.36 / 3600)


async def test_a_media_request_over_the_keys_request_quota_is_refused(
    gateway_with_keys: Callable[..., Awaitable[TestClient]],
) -> None:
    quota = {**MEDIA, "quota": {"requests": 2, "window_seconds": 3600}}
    gateway = await gateway_with_keys({MEDIA_VK: quota})
    client = sdk(gateway, MEDIA_VK)
    await client.images.generate(model="dall-e-2", prompt="a dog")
    await client.audio.speech.create(model="tts-1", voice="alloy", input=SPOKEN)
    with pytest.raises(openai.RateLimitError):
        await client.audio.transcriptions.create(model="whisper-1", file=WAV)


async def test_streamed_speech_transcriptions_and_images_are_charged_what_their_streams_report(
    gateway: TestClient, records: Callable[..., Awaitable[list[dict[str, Any]]]], tmp_path: Path
) -> None:
    """The SDKs' streamed forms: speech audio chunked to a file, speech as SSE, a transcription
    and an image edit whose form asks for a stream (no JSON body says so)."""
    client = sdk(gateway, MEDIA_VK)
    async with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input=SPOKEN
    ) as audio:
        assert "content-length" not in audio.headers  # chunked, as the API sends it
        await audio.stream_to_file(tmp_path / "speech.mp3")
    assert (tmp_path / "speech.mp3").stat().st_size == AUDIO_BYTES
    async with client.audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts", voice="alloy", input=SPOKEN, stream_format="sse"
    ) as events:
        assert b"speech.audio.done" in b"".join([chunk async for chunk in events.iter_bytes()])
    heard = await client.audio.transcriptions.create(
        model="gpt-4o-mini-transcribe", file=WAV, stream=True
    )
    assert [event.type async for event in heard][-1] == "transcript.text.done"
    edited = await client.images.edit(
        model="gpt-image-1", image=PNG, prompt="a hat", stream=True, partial_images=2
    )
    assert [event.type async for event in edited][-1] == "image_edit.completed"
    chunked, spoken, transcribed, edit = await records(4)
    assert chunked["usage"]["input_characters"] == len(SPOKEN)
    assert chunked["cost_usd"] == pytest.approx(len(SPOKEN) * 15 / 1e6)
    assert spoken["stream"] is True
    assert (spoken["usage"]["prompt_tokens"], spoken["usage"]["completion_tokens"]) == (
        SPEECH_INPUT_TOKENS,
        SPEECH_OUTPUT_TOKENS,
    )
    assert transcribed["stream"] is True
    assert transcribed["usage"]["input_audio_tokens"] == TRANSCRIBE_AUDIO_TOKENS
    assert edit["stream"] is True
    assert edit["usage"]["input_image_tokens"] == EDIT_IMAGE_TOKENS
    for line in (spoken, transcribed, edit):
        assert line["usage"]["estimated"] is False and line["cost_usd"] > 0


async def test_a_video_is_logged_with_the_model_its_form_names_for_any_key(
    gateway: TestClient, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    # The SDK sends a video's request as a form; its model is the one the log line names,
    # whether or not the key is restricted. Unpriced (billed per second): no usage, no cost.
    video = await sdk(gateway, OPENAI_VK).videos.create(prompt="a cat", model="sora-2-pro")
    assert video.model == "sora-2-pro"
    (line,) = await records(1)
    assert line["path"] == "/v1/videos" and line["model"] == "sora-2-pro"
    assert line["usage"] is None and line["cost_usd"] is None


@pytest.mark.parametrize(
    ("path", "body", "last", "tokens"),
    [
        (
            "/v1/audio/speech",
            {"model": "gpt-4o-mini-tts", "input": SPOKEN, "voice": "alloy", "stream_format": "sse"},
            b"speech.audio.done",
            (SPEECH_INPUT_TOKENS, SPEECH_OUTPUT_TOKENS),
        ),
        (
            "/v1/audio/transcriptions",
            {"model": "gpt-4o-mini-transcribe", "stream": "true"},
            b"transcript.text.done",
            (TRANSCRIBE_INPUT_TOKENS, TRANSCRIBE_OUTPUT_TOKENS),
        ),
        (
            "/v1/images/generations",
            {"model": "gpt-image-1", "prompt": "a cat", "stream": True},
            b"image_generation.completed",
            (IMAGE_INPUT_TOKENS, IMAGE_OUTPUT_TOKENS),
        ),
    ],
)
async def test_a_media_stream_the_client_leaves_at_its_last_event_was_answered_not_cut(
    gateway: TestClient,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    path: str,
    body: dict[str, Any],
    last: bytes,
    tokens: tuple[int, int],
) -> None:
    # A client that stops reading at the stream's last event (with its usage) has the
    # whole answer, also when the provider's body end comes after it.
    headers = {**auth(MEDIA_VK), "x-fake-hang": "end"}
    if "transcriptions" in path:
        form = aiohttp.FormData(body)
        form.add_field("file", WAV[1], filename=WAV[0], content_type=WAV[2])
        response = await gateway.post(path, data=form, headers=headers)
    else:
        response = await gateway.post(path, json=body, headers=headers)
    assert response.status == 200, await response.text()
    received = b""
    while not (last in received and received.endswith(b"\n\n")):
        chunk = await response.content.readany()
        assert chunk, f"the stream ended before its last event: {received[-200:]!r}"
        received += chunk
    response.close()
    (line,) = await records(1)
    assert line["status"] == 200 and "error" not in line, line
    usage = line["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == tokens
    assert usage["estimated"] is False
    await assert_views_agree(gateway, MEDIA_VK, line)
