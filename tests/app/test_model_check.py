"""allowed_models sees every way a request names its model, with the official openai SDK in
front of the fake provider: what the gateway cannot see (an ephemeral key, a stored prompt's or
an assistant's model, an endpoint's default) is refused to a restricted key, never passed."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp.test_utils import TestClient
from yarl import URL

from tests.conftest import (
    ANTHROPIC_VK,
    OPENAI_VK,
    RESTRICTED_VK,
    assert_openai_error,
    auth,
)
from tests.support.fake_provider import FakeState

ONE_MODEL_VK = "vk_test_one_model_3c5e7a9b1d"
SECRETS_VK = "vk_test_client_secrets_8a6c4e2f0b"
TUNED_VK = "vk_test_fine_tuned_6d2b8f4a0c"
# An OpenAI fine-tuned model's id: colons separate its parts, none of them a method.
TUNED_MODEL = "ft:gpt-4o-mini-2024-07-18:my-org:custom:abc123"
KEYS = {
    ONE_MODEL_VK: {
        "provider": "openai",
        "api_key": "sk-real-one-model-1212121212",
        "name": "one-model",
        "allowed_models": ["gpt-4o-mini"],
    },
    SECRETS_VK: {
        "provider": "openai",
        "api_key": "sk-real-secrets-3434343434",
        "name": "secrets",
        "allow_client_secrets": True,
    },
    TUNED_VK: {
        "provider": "openai",
        "api_key": "sk-real-fine-tuned-5656565656",
        "name": "tuned",
        "allowed_models": ["ft:gpt-4o-mini-*"],
    },
}
WAV = ("a.wav", b"RIFF....WAVEfmt ", "audio/wav")
PNG = ("a.png", b"\x89PNG\r\n\x1a\n....", "image/png")
SCORED_BY_O3: Any = {
    "type": "score_model",
    "name": "score",
    "model": "o3",
    "input": [{"role": "user", "content": "Score {{sample.output_text}}"}],
}
MP4 = ("a.mp4", b"....ftypmp42", "video/mp4")


@pytest.fixture
async def gateway(gateway_with_keys: Callable[..., Awaitable[TestClient]]) -> TestClient:
    return await gateway_with_keys(KEYS)


def sdk(gateway: TestClient, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(gateway.make_url("/v1")), api_key=key, max_retries=0)


def form(**fields: Any) -> aiohttp.FormData:
    data = aiohttp.FormData()
    for name, value in fields.items():
        if isinstance(value, tuple):
            data.add_field(name, value[1], filename=value[0], content_type=value[2])
        else:
            data.add_field(name, value)
    return data


# Each way a request can run a model the key may not use, as the SDK (or a raw form) sends it.
REFUSED: dict[str, Callable[[openai.AsyncOpenAI], Awaitable[object]]] = {
    "realtime client secret": lambda c: c.realtime.client_secrets.create(
        session={"type": "realtime", "model": "gpt-4o-mini"}
    ),
    "realtime session (beta)": lambda c: c.beta.realtime.sessions.create(model="gpt-realtime"),
    "realtime transcription session (beta)": lambda c: (
        c.beta.realtime.transcription_sessions.create()
    ),
    "responses with a prompt id": lambda c: c.responses.create(prompt={"id": "pmpt_123"}),
    # A compaction's model is required but nullable: null runs the previous response's.
    "compaction without a model": lambda c: c.responses.compact(
        model=None, previous_response_id="resp_1"
    ),
    "run with an assistant": lambda c: c.beta.threads.runs.create(
        "thread_1", assistant_id="asst_1"
    ),
    "create and run with an assistant": lambda c: c.beta.threads.create_and_run(
        assistant_id="asst_1"
    ),
    "responses with a prompt id and an image tool": lambda c: c.responses.create(
        prompt={"id": "pmpt_123"}, tools=[{"type": "image_generation", "model": "gpt-4o-mini"}]
    ),
    "responses with another image tool model": lambda c: c.responses.create(
        model="gpt-4o-mini", input="draw", tools=[{"type": "image_generation", "model": "x"}]
    ),
    "responses with an image tool's default model": lambda c: c.responses.create(
        model="gpt-4o-mini", input="draw", tools=[{"type": "image_generation"}]
    ),
    "images without a model": lambda c: c.images.generate(prompt="a cat"),
    "images with another model": lambda c: c.images.generate(prompt="a cat", model="gpt-image-1"),
    "images with another svg author": lambda c: c.images.generate(
        prompt="a cat", model="gpt-4o-mini", extra_body={"svg": {"model": "o3"}}
    ),
    "image edit without a model": lambda c: c.images.edit(image=PNG, prompt="a hat"),
    "image variation without a model": lambda c: c.images.create_variation(image=PNG),
    "speech with another model": lambda c: c.audio.speech.create(
        model="tts-1", voice="alloy", input="hello"
    ),
    "transcription with another model": lambda c: c.audio.transcriptions.create(
        model="whisper-1", file=WAV
    ),
    "translation with another model": lambda c: c.audio.translations.create(
        model="whisper-1", file=WAV
    ),
    "moderation without a model": lambda c: c.moderations.create(input="hello"),
    "moderation with another model": lambda c: c.moderations.create(
        input="hello", model="omni-moderation-latest"
    ),
    "fine-tuning another model": lambda c: c.fine_tuning.jobs.create(
        model="gpt-4o", training_file="file-1"
    ),
    # A paused job resumed trains (and grades with) the models stored with it.
    "fine-tuning job resumed": lambda c: c.fine_tuning.jobs.resume("ftjob_1"),
    # A grader that scores or labels with a model runs it: in a reinforcement fine-tuning
    # job (every step of training), and run alone.
    "reinforcement fine-tuning graded by another model": lambda c: c.fine_tuning.jobs.create(
        model="gpt-4o-mini",
        training_file="file-1",
        method={"type": "reinforcement", "reinforcement": {"grader": SCORED_BY_O3}},
    ),
    "grader run with another model": lambda c: c.fine_tuning.alpha.graders.run(
        grader=SCORED_BY_O3, model_sample="4"
    ),
    "multi grader run with another model": lambda c: c.fine_tuning.alpha.graders.run(
        grader={
            "type": "multi",
            "name": "m",
            "calculate_output": "a",
            "graders": {"a": {**SCORED_BY_O3, "type": "label_model", "labels": ["y"]}},
        },
        model_sample="4",
    ),
    # A ChatKit session's client secret: the browser runs the workflow at the provider.
    "chatkit session": lambda c: c.beta.chatkit.sessions.create(
        user="user_1", workflow={"id": "wf_1"}
    ),
    # A Live session over WebRTC (made, forked) or a SIP call accepted: its media and model
    # run at the provider, past the gateway.
    "live WebRTC session": lambda c: c.live.create(
        session={"model": "gpt-4o-mini"}, transport={"type": "webrtc", "sdp": "v=0"}
    ),
    "live session forked": lambda c: c.live.sessions.fork(
        "live_1", transport={"type": "webrtc", "sdp": "v=0"}
    ),
    "live SIP call accepted": lambda c: c.live.sessions.accept(
        "live_1", session={"model": "gpt-4o-mini"}
    ),
    # A video remixed, edited or extended runs its source video's model, stored at the provider.
    "video remix": lambda c: c.videos.remix("video_1", prompt="more cats"),
    "video edit": lambda c: c.videos.edit(prompt="more cats", video=MP4),
    "video extension": lambda c: c.videos.extend(prompt="more cats", seconds="4", video=MP4),
    # An eval run samples its data source's model and grades with the eval's stored graders.
    "eval run": lambda c: c.evals.runs.create(
        "eval_1",
        data_source={
            "type": "completions",
            "model": "gpt-4o-mini",
            "source": {"type": "file_id", "id": "file-1"},
        },
    ),
}


@pytest.mark.parametrize("call", REFUSED.values(), ids=REFUSED.keys())
async def test_a_key_restricted_to_one_model_is_refused_what_it_cannot_see(
    gateway: TestClient,
    fake: FakeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    call: Callable[[openai.AsyncOpenAI], Awaitable[object]],
) -> None:
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await call(sdk(gateway, ONE_MODEL_VK))
    assert refused.value.status_code == 403
    assert_openai_error(refused.value.response.json(), refused.value.code or "")
    assert refused.value.code in ("model_not_allowed", "client_secrets_not_allowed")
    assert "gpt-4o-mini" in refused.value.message  # it says what the key may use
    assert fake.requests == []
    (line,) = await records(1)
    assert line["status"] == 403 and line["key"] == "one-model"


@pytest.mark.parametrize(
    ("path", "fields"),
    [
        ("/v1/audio/transcriptions", {"file": WAV}),
        ("/v1/audio/translations", {"file": WAV, "response_format": "json"}),
        ("/v1/images/edits", {"image": PNG, "prompt": "a hat"}),
        ("/v1/images/edits", {"image": PNG, "model": "gpt-4o-mini", "svg[model]": "o3"}),
    ],
)
async def test_a_multipart_upload_without_an_allowed_model_is_refused(
    gateway: TestClient, fake: FakeState, path: str, fields: dict[str, Any]
) -> None:
    response = await gateway.post(path, data=form(**fields), headers=auth(ONE_MODEL_VK))
    assert response.status == 403
    assert_openai_error(await response.json(), "model_not_allowed")
    assert fake.requests == []


async def test_a_prompt_or_an_assistant_with_an_allowed_model_named_passes(
    gateway: TestClient, fake: FakeState
) -> None:
    # The body's model overrides the stored prompt's and the assistant's (the openai SDK's
    # ResponseCreateParams.model, RunCreateParams.model), so the gateway can check it.
    client = sdk(gateway, ONE_MODEL_VK)
    response = await client.responses.create(prompt={"id": "pmpt_123"}, model="gpt-4o-mini")
    assert response.model == "gpt-4o-mini"
    run = await client.beta.threads.runs.create(
        "thread_1", assistant_id="asst_1", model="gpt-4o-mini"
    )
    assert run.model == "gpt-4o-mini"
    both = await client.beta.threads.create_and_run(assistant_id="asst_1", model="gpt-4o-mini")
    assert both.status == "queued"
    # A tool that names no model is no model: the request's own is checked.
    tools = [{"type": "function", "name": "f", "parameters": {}}]
    await client.responses.create(model="gpt-4o-mini", input="hi", tools=tools)
    assert [seen.path for seen in fake.requests] == [
        "/v1/responses",
        "/v1/threads/thread_1/runs",
        "/v1/threads/runs",
        "/v1/responses",
    ]


async def test_an_unrestricted_key_still_runs_prompts_assistants_and_default_models(
    gateway: TestClient, fake: FakeState
) -> None:
    client = sdk(gateway, OPENAI_VK)
    await client.responses.create(prompt={"id": "pmpt_123"})
    await client.beta.threads.runs.create("thread_1", assistant_id="asst_1")
    await client.images.generate(prompt="a cat")
    await client.images.edit(image=PNG, prompt="a hat")
    assert len(fake.requests) == 4


async def test_client_secrets_are_refused_unless_keys_json_allows_them(
    gateway: TestClient, fake: FakeState
) -> None:
    with pytest.raises(openai.PermissionDeniedError, match="allow_client_secrets") as refused:
        await sdk(gateway, OPENAI_VK).realtime.client_secrets.create()
    assert refused.value.code == "client_secrets_not_allowed"
    call = await gateway.post("/v1/realtime/calls", data=form(sdp="v=0"), headers=auth(OPENAI_VK))
    assert call.status == 403
    assert_openai_error(await call.json(), "client_secrets_not_allowed")
    assert fake.requests == []
    allowed = sdk(gateway, SECRETS_VK)
    secret = await allowed.realtime.client_secrets.create(
        session={"type": "realtime", "model": "gpt-realtime"}
    )
    assert secret.value.startswith("ek_fake_")
    session = await allowed.beta.realtime.sessions.create(model="gpt-realtime")
    assert session.client_secret.value.startswith("ek_fake_")
    assert len(fake.requests) == 2


async def test_live_webrtc_and_sip_sessions_are_refused_unless_keys_json_allows_them(
    gateway: TestClient, fake: FakeState
) -> None:
    # A Live session's media goes between the browser (or the SIP trunk) and the provider:
    # no quota, log line or cost would see it, as a Realtime call's.
    webrtc = {"type": "webrtc", "sdp": "v=0"}
    client = sdk(gateway, OPENAI_VK)
    calls = (
        lambda c: c.live.create(session={"model": "gpt-live-1"}, transport=webrtc),
        lambda c: c.live.sessions.fork("live_1", transport=webrtc),
        lambda c: c.live.sessions.accept("live_1", session={"model": "gpt-live-1"}),
    )
    for call in calls:
        with pytest.raises(openai.PermissionDeniedError, match="allow_client_secrets") as refused:
            await call(client)
        assert refused.value.code == "client_secrets_not_allowed"
        assert_openai_error(refused.value.response.json(), "client_secrets_not_allowed")
    assert fake.requests == []
    # What passes the gateway: the session's other controls, and all of it when allowed.
    await client.live.sessions.hangup("live_1")
    allowed = sdk(gateway, SECRETS_VK)
    for call in calls:
        await call(allowed)
    assert [(seen.method, seen.path) for seen in fake.requests] == [
        ("POST", "/v1/live/sessions/live_1/hangup"),
        ("POST", "/v1/live/sessions"),
        ("POST", "/v1/live/sessions/live_1/fork"),
        ("POST", "/v1/live/sessions/live_1/accept"),
    ]


async def test_chatkit_sessions_are_refused_unless_keys_json_allows_them(
    gateway: TestClient, fake: FakeState
) -> None:
    # A ChatKit session's client secret lets the browser's ChatKit run the workflow (its
    # models) at the provider directly: no quota, log line or cost would see it.
    client = sdk(gateway, OPENAI_VK)
    with pytest.raises(openai.PermissionDeniedError, match="allow_client_secrets") as refused:
        await client.beta.chatkit.sessions.create(user="user_1", workflow={"id": "wf_1"})
    assert_openai_error(refused.value.response.json(), "client_secrets_not_allowed")
    assert "ChatKit" in refused.value.message
    assert fake.requests == []
    # Its other calls pass (a session cancelled, a thread read), and all of it when allowed.
    await client.beta.chatkit.sessions.cancel("cksess_1")
    await client.beta.chatkit.threads.retrieve("cthr_1")
    await sdk(gateway, SECRETS_VK).beta.chatkit.sessions.create(
        user="user_1", workflow={"id": "wf_1"}
    )
    assert [(seen.method, seen.path) for seen in fake.requests] == [
        ("POST", "/v1/chatkit/sessions/cksess_1/cancel"),
        ("GET", "/v1/chatkit/threads/cthr_1"),
        ("POST", "/v1/chatkit/sessions"),
    ]


async def test_a_fine_tuned_model_in_the_path_is_read_whole(
    gateway: TestClient,
    fake: FakeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    # models/<id>: an OpenAI fine-tuned id holds colons; only Gemini's one method is cut off.
    model = await sdk(gateway, TUNED_VK).models.retrieve(TUNED_MODEL)
    assert model.id == TUNED_MODEL
    assert [seen.path for seen in fake.requests] == [f"/v1/models/{TUNED_MODEL}"]
    (line,) = await records(1)
    assert line["status"] == 200 and line["model"] == TUNED_MODEL


async def test_a_json_body_with_a_bom_sent_with_a_form_content_type_is_refused(
    gateway: TestClient, fake: FakeState
) -> None:
    # Python's json.loads skips a UTF-8 BOM; the gateway cannot read such a body, and refuses.
    body = b'\xef\xbb\xbf{"model": "gpt-4o", "input": "hi"}'
    headers = {**auth(ONE_MODEL_VK), "Content-Type": "application/x-www-form-urlencoded"}
    response = await gateway.post("/v1/embeddings", data=body, headers=headers)
    assert response.status == 403
    assert_openai_error(await response.json(), "model_not_allowed")
    assert fake.requests == []


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/completions", "/v1/moderations"])
@pytest.mark.parametrize(
    "content_type", ["application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]
)
async def test_a_json_body_sent_with_a_form_content_type_has_its_model_checked(
    gateway: TestClient, fake: FakeState, path: str, content_type: str
) -> None:
    # `curl -d '{...}'` labels its JSON a url-encoded form; providers read the bytes as JSON
    # all the same, so the model in them is the one that runs.
    body = b'{"model": "gpt-4o", "input": "hi", "prompt": "hi"}'
    headers = {**auth(ONE_MODEL_VK), "Content-Type": content_type}
    response = await gateway.post(path, data=body, headers=headers)
    assert response.status == 403
    payload = await response.json()
    assert_openai_error(payload, "model_not_allowed")
    assert "'gpt-4o'" in payload["error"]["message"]
    assert fake.requests == []
    allowed = body.replace(b'"gpt-4o"', b'"gpt-4o-mini"')
    response = await gateway.post(path, data=allowed, headers=headers)
    assert response.status != 403
    assert [seen.body for seen in fake.requests] == [allowed]


@pytest.mark.parametrize(
    "disposition",
    [
        # RFC 2231's extended name: python-multipart (FastAPI servers) reads it as `model`.
        b"Content-Disposition: form-data; name*=UTF-8''model",
        # Two dispositions: which names the part is the provider's parser's choice.
        b'Content-Disposition: form-data; name="model"\r\nContent-Disposition: form-data; name="x"',
        # One disposition naming it twice: multipart's and python-multipart's parsers read
        # the last, a parser that looks for the first `name=` (a regex) the first.
        b'Content-Disposition: form-data; name="model"; name="x"',
        b'Content-Disposition: form-data; NAME="model"; name=x',
    ],
)
async def test_a_form_part_whose_name_the_gateway_may_read_otherwise_is_refused(
    gateway: TestClient, fake: FakeState, disposition: bytes
) -> None:
    body = (
        b'--zz\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-4o-mini\r\n'
        b"--zz\r\n" + disposition + b"\r\n\r\ngpt-4o\r\n"
        b'--zz\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        b"Content-Type: audio/wav\r\n\r\nRIFF\r\n--zz--\r\n"
    )
    headers = {**auth(ONE_MODEL_VK), "Content-Type": "multipart/form-data; boundary=zz"}
    response = await gateway.post("/v1/audio/transcriptions", data=body, headers=headers)
    assert response.status == 403
    assert_openai_error(await response.json(), "model_not_allowed")
    assert fake.requests == []


async def test_a_non_ascii_filename_in_rfc_2231_form_still_passes(
    gateway: TestClient, fake: FakeState
) -> None:
    body = (
        b'--zz\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-4o-mini\r\n'
        b"--zz\r\nContent-Disposition: form-data; name=\"file\"; filename*=UTF-8''%C3%A9.wav\r\n"
        b"Content-Type: audio/wav\r\n\r\nRIFF\r\n--zz--\r\n"
    )
    headers = {**auth(ONE_MODEL_VK), "Content-Type": "multipart/form-data; boundary=zz"}
    response = await gateway.post("/v1/audio/transcriptions", data=body, headers=headers)
    assert response.status == 200
    assert len(fake.requests) == 1


@pytest.mark.parametrize(
    ("key", "path", "body"),
    [
        (OPENAI_VK, "/v1/realtime/client_secret%73", {"session": {"type": "realtime"}}),
        (ONE_MODEL_VK, "/v1/realtime/%63lient_secrets", {"session": {"type": "realtime"}}),
        (ONE_MODEL_VK, "/v1/batche%73", {"input_file_id": "file-1", "endpoint": "/v1/responses"}),
        (ONE_MODEL_VK, "/v1/respon%73es", {"prompt": {"id": "pmpt_123"}}),
        (ONE_MODEL_VK, "/v1/videos/video_1/remi%78", {"prompt": "more cats"}),
        (ONE_MODEL_VK, "/v1/evals/eval_1/run%73/", {"data_source": {"type": "jsonl"}}),
        (ONE_MODEL_VK, "/v1/moderation%73", {"input": "hello"}),
    ],
)
async def test_a_path_spelled_with_percent_escapes_is_checked_as_the_provider_reads_it(
    gateway: TestClient, fake: FakeState, key: str, path: str, body: dict[str, Any]
) -> None:
    # encoded=True: yarl would otherwise decode the escapes before they reach the gateway.
    url = URL(str(gateway.make_url("/")).rstrip("/") + path, encoded=True)
    response = await gateway.session.post(url, json=body, headers=auth(key))
    assert response.status == 403
    payload = await response.json()
    assert payload["error"]["code"] in ("client_secrets_not_allowed", "model_not_allowed")
    assert fake.requests == []


# A message runs other models than its own: the advisor tool's, and its fallbacks (named, or
# "default": the model's server-side fallbacks, which the gateway cannot see); so does each
# request of a message batch. RESTRICTED_VK may use claude-3-5-haiku-* and claude-sonnet-4-*.
SONNET, OPUS = "claude-sonnet-4-6", "claude-opus-4-8"
ADVISOR = {"type": "advisor_20260301", "name": "advisor", "model": OPUS}
HELLO = [{"role": "user", "content": "hello"}]
REFUSED_MESSAGES: dict[str, dict[str, Any]] = {
    "advisor tool": {"tools": [ADVISOR]},
    "named fallback": {"fallbacks": [{"model": OPUS}]},
    "default fallbacks": {"fallbacks": "default"},
}


@pytest.mark.parametrize("extra", REFUSED_MESSAGES.values(), ids=REFUSED_MESSAGES.keys())
async def test_a_message_running_another_model_beside_its_own_is_refused(
    gateway: TestClient, fake: FakeState, extra: dict[str, Any]
) -> None:
    client = anthropic.AsyncAnthropic(
        base_url=str(gateway.make_url("")), api_key=RESTRICTED_VK, max_retries=0
    )
    async with client:
        with pytest.raises(anthropic.PermissionDeniedError, match="claude-sonnet-4-"):
            await client.beta.messages.create(model=SONNET, max_tokens=64, messages=HELLO, **extra)
        batch = {"custom_id": "a", "params": {"model": SONNET, "max_tokens": 64, "messages": HELLO}}
        batch["params"].update(extra)
        with pytest.raises(anthropic.PermissionDeniedError, match="claude-sonnet-4-"):
            await client.messages.batches.create(requests=[batch])  # type: ignore[list-item]
        # Allowed models there pass.
        allowed = {"tools": [{**ADVISOR, "model": SONNET}], "fallbacks": [{"model": SONNET}]}
        await client.beta.messages.create(model=SONNET, max_tokens=64, messages=HELLO, **allowed)
    assert [seen.path for seen in fake.requests] == ["/v1/messages"]


# A managed agent runs its own models (its model, its callable agents', its advisor's), stored
# at the provider where the gateway cannot see them: what starts its work is refused to a
# restricted key, as an OpenAI batch is.
SAY_HELLO: Any = [{"type": "user.message", "content": [{"type": "text", "text": "hello"}]}]
AGENT_RUNS: dict[str, Callable[[anthropic.AsyncAnthropic], Awaitable[object]]] = {
    "session": lambda c: c.beta.sessions.create(agent="agent_1", environment_id="env_1"),
    "session event": lambda c: c.beta.sessions.events.send("sesn_1", events=SAY_HELLO),
    "deployment": lambda c: c.beta.deployments.create(
        agent="agent_1", environment_id="env_1", initial_events=SAY_HELLO, name="nightly"
    ),
    "deployment run": lambda c: c.beta.deployments.run("depl_1"),
    # A deployment changed (its agent, events, schedule) or unpaused runs on its schedule.
    "deployment updated": lambda c: c.beta.deployments.update("depl_1", agent="agent_2"),
    "deployment unpaused": lambda c: c.beta.deployments.unpause("depl_1"),
}


@pytest.mark.parametrize("call", AGENT_RUNS.values(), ids=AGENT_RUNS.keys())
async def test_a_managed_agent_run_is_refused_to_a_restricted_key(
    gateway: TestClient,
    fake: FakeState,
    call: Callable[[anthropic.AsyncAnthropic], Awaitable[object]],
) -> None:
    base = str(gateway.make_url(""))
    restricted = anthropic.AsyncAnthropic(base_url=base, api_key=RESTRICTED_VK, max_retries=0)
    async with restricted:
        with pytest.raises(anthropic.PermissionDeniedError, match="agent"):
            await call(restricted)
    assert fake.requests == []
    # A key that may use any model runs it; and a restricted key still reads a session.
    anyone = anthropic.AsyncAnthropic(base_url=base, api_key=ANTHROPIC_VK, max_retries=0)
    async with anyone:
        await call(anyone)
    reader = anthropic.AsyncAnthropic(base_url=base, api_key=RESTRICTED_VK, max_retries=0)
    async with reader:
        await reader.beta.sessions.retrieve("sesn_1")
    assert len(fake.requests) == 2


# OpenAI's managed agents alike: a session runs its agent's models (a saved agent's, stored at
# the provider; an inline one's, nested in `agent`; its subagents'), and so does input sent to
# it, an automation on its schedule, and an automation invoked.
OPENAI_AGENT_RUNS: dict[str, Callable[[openai.AsyncOpenAI], Awaitable[object]]] = {
    "session": lambda c: c.beta.agents.sessions.create(
        environment={"type": "none"}, agent={"model": "o3"}, input="hello"
    ),
    "session of a saved agent": lambda c: c.beta.agents.sessions.create(
        environment={"type": "none"}, agent_id="agent_1", input="hello"
    ),
    "session event": lambda c: c.beta.agents.sessions.events.create(
        "sess_1", events=[{"type": "message", "role": "user", "content": "hello"}]
    ),
    "automation": lambda c: c.beta.agents.automations.create(
        expression="0 * * * *",
        name="hourly",
        target={"type": "session", "session_id": "sess_1"},
        timezone="UTC",
        type="periodic",
    ),
    "automation invoked": lambda c: c.beta.agents.automations.invocations.create("auto_1"),
    # An automation changed or resumed runs on its schedule.
    "automation updated": lambda c: c.beta.agents.automations.update("auto_1", name="daily"),
    "automation resumed": lambda c: c.beta.agents.automations.resume("auto_1"),
}


@pytest.mark.parametrize("call", OPENAI_AGENT_RUNS.values(), ids=OPENAI_AGENT_RUNS.keys())
async def test_an_openai_managed_agent_run_is_refused_to_a_restricted_key(
    gateway: TestClient,
    fake: FakeState,
    call: Callable[[openai.AsyncOpenAI], Awaitable[object]],
) -> None:
    with pytest.raises(openai.PermissionDeniedError, match="agent") as refused:
        await call(sdk(gateway, ONE_MODEL_VK))
    assert_openai_error(refused.value.response.json(), "model_not_allowed")
    assert fake.requests == []
    # A key that may use any model runs it; a restricted key still reads a session, and
    # makes an agent whose model it names.
    await call(sdk(gateway, OPENAI_VK))
    reader = sdk(gateway, ONE_MODEL_VK)
    await reader.beta.agents.sessions.retrieve("sess_1")
    await reader.beta.agents.create(model="gpt-4o-mini", name="helper")
    with pytest.raises(openai.PermissionDeniedError):
        await reader.beta.agents.create(model="o3", name="helper")
    assert [seen.path for seen in fake.requests][1:] == [
        "/v1/agents/sessions/sess_1",
        "/v1/agents",
    ]


async def test_a_restricted_key_reads_and_stops_managed_agents(
    gateway: TestClient, fake: FakeState
) -> None:
    # An Anthropic deployment's id is no model (as Azure's deployments/<name> is): read,
    # paused or archived, nothing runs.
    base = str(gateway.make_url(""))
    async with anthropic.AsyncAnthropic(
        base_url=base, api_key=RESTRICTED_VK, max_retries=0
    ) as restricted:
        await restricted.beta.deployments.retrieve("depl_1")
        await restricted.beta.deployments.pause("depl_1")
        await restricted.beta.deployments.archive("depl_1")
    openai_restricted = sdk(gateway, ONE_MODEL_VK)
    await openai_restricted.beta.agents.automations.retrieve("auto_1")
    await openai_restricted.beta.agents.automations.pause("auto_1")
    assert [(seen.method, seen.path) for seen in fake.requests] == [
        ("GET", "/v1/deployments/depl_1"),
        ("POST", "/v1/deployments/depl_1/pause"),
        ("POST", "/v1/deployments/depl_1/archive"),
        ("GET", "/v1/agents/automations/auto_1"),
        ("POST", "/v1/agents/automations/auto_1/pause"),
    ]


# Anthropic's managed agents take their model as a string or as a model config object, its
# `id` the model (`{"id": ..., "effort": "high"}`): an agent made or changed, a dream made.
MODEL_CONFIGS: dict[str, Callable[[anthropic.AsyncAnthropic, Any], Awaitable[object]]] = {
    "agent made": lambda c, model: c.beta.agents.create(name="helper", model=model),
    "agent changed": lambda c, model: c.beta.agents.update("agent_1", version=1, model=model),
    "dream made": lambda c, model: c.beta.dreams.create(
        inputs=[{"type": "memory_store", "memory_store_id": "memstore_1"}], model=model
    ),
}


@pytest.mark.parametrize("call", MODEL_CONFIGS.values(), ids=MODEL_CONFIGS.keys())
async def test_a_model_config_object_is_checked_by_its_id(
    gateway: TestClient,
    fake: FakeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    call: Callable[[anthropic.AsyncAnthropic, Any], Awaitable[object]],
) -> None:
    """Before: a restricted key got 403 "'model' here is not a string" for an allowed model
    given as an object, as the SDK sends `model={"id": ..., "effort": ...}`."""
    base = str(gateway.make_url(""))
    async with anthropic.AsyncAnthropic(
        base_url=base, api_key=RESTRICTED_VK, max_retries=0
    ) as restricted:
        await call(restricted, {"id": SONNET, "effort": "high"})
        with pytest.raises(
            anthropic.PermissionDeniedError, match=f"may not use the model '{OPUS}'"
        ):
            await call(restricted, {"id": OPUS, "effort": "high"})
    (seen,) = fake.requests
    assert json.loads(seen.body)["model"] == {"id": SONNET, "effort": "high"}  # as sent
    lines = await records(2)
    assert [(line["status"], line["model"]) for line in lines] == [(200, SONNET), (403, OPUS)]


# Any other object in `model`, or a model config object elsewhere than where the API takes
# one, is refused to a restricted key as before: the gateway cannot tell which model it names.
NOT_A_MODEL_CONFIG: dict[str, tuple[str, dict[str, Any]]] = {
    "no id": ("/v1/agents", {"name": "h", "model": {"effort": "high"}}),
    "id not a string": ("/v1/agents", {"name": "h", "model": {"id": [SONNET]}}),
    "null id": ("/v1/agents", {"name": "h", "model": {"id": None}}),
    "id spelt otherwise beside it": (
        "/v1/agents",
        {"name": "h", "model": {"id": SONNET, "ID": OPUS}},
    ),
    "an id of another case alone": ("/v1/agents", {"name": "h", "model": {"Id": SONNET}}),
    "a list": ("/v1/agents", {"name": "h", "model": [SONNET]}),
    "on another endpoint": (
        "/v1/complete",
        {"model": {"id": SONNET}, "prompt": "\n\nHuman: hello\n\nAssistant:"},
    ),
    "an agent's archive": ("/v1/agents/agent_1/archive", {"model": {"id": SONNET}}),
    "an advisor tool's": (
        "/v1/agents",
        {"name": "h", "model": SONNET, "tools": [{**ADVISOR, "model": {"id": SONNET}}]},
    ),
}


@pytest.mark.parametrize(
    ("path", "body"), NOT_A_MODEL_CONFIG.values(), ids=NOT_A_MODEL_CONFIG.keys()
)
async def test_any_other_object_in_model_is_still_refused(
    gateway: TestClient, fake: FakeState, path: str, body: dict[str, Any]
) -> None:
    response = await gateway.post(path, json=body, headers=auth(RESTRICTED_VK))
    assert response.status == 403
    assert "and 'model' here is not a string" in (await response.json())["error"]["message"]
    assert fake.requests == []


async def test_a_model_config_naming_its_id_twice_is_refused(
    gateway: TestClient, fake: FakeState
) -> None:
    """JSON parsers disagree on which of two `id`s counts: the provider could read the other."""
    for body in (
        b'{"name": "h", "model": {"id": "%s", "id": "%s"}}' % (OPUS.encode(), SONNET.encode()),
        b'{"name": "h", "model": {"id": "%s", "i\\u0064": "%s"}}'
        % (OPUS.encode(), SONNET.encode()),
    ):
        headers = {**auth(RESTRICTED_VK), "content-type": "application/json"}
        response = await gateway.post("/v1/agents", data=body, headers=headers)
        assert response.status == 400
        payload = await response.json()
        assert_openai_error(payload, "duplicate_field")  # the dialect of every path but messages
        assert "'id'" in payload["error"]["message"]
    assert fake.requests == []


async def test_what_runs_no_model_passes_a_restricted_key(
    gateway: TestClient, fake: FakeState
) -> None:
    # Making an eval, cancelling its run, reading a video: no model runs, nothing to refuse.
    headers = auth(ONE_MODEL_VK)
    criteria = [
        {"type": "string_check", "name": "s", "input": "a", "reference": "a", "operation": "eq"}
    ]
    for path, body in [
        (
            "/v1/evals",
            {
                "data_source_config": {"type": "custom", "item_schema": {}},
                "testing_criteria": criteria,
            },
        ),
        ("/v1/evals/eval_1/runs/evalrun_1", {}),
        ("/v1/videos/video_1", None),
        ("/v1/fine_tuning/jobs/ftjob_1/pause", {}),
    ]:
        if body is None:
            response = await gateway.get(path, headers=headers)
        else:
            response = await gateway.post(path, json=body, headers=headers)
        assert response.status == 200, path
    assert [seen.path for seen in fake.requests] == [
        "/v1/evals",
        "/v1/evals/eval_1/runs/evalrun_1",
        "/v1/videos/video_1",
        "/v1/fine_tuning/jobs/ftjob_1/pause",
    ]
    # A key that may use any model runs an eval and remixes a video.
    anyone = sdk(gateway, OPENAI_VK)
    await anyone.videos.remix("video_1", prompt="more cats")
    await anyone.evals.runs.create(
        "eval_1", data_source={"type": "jsonl", "source": {"type": "file_id", "id": "file-1"}}
    )
    assert len(fake.requests) == 6


async def test_a_grader_of_an_allowed_model_or_none_passes_a_restricted_key(
    gateway: TestClient, fake: FakeState
) -> None:
    client = sdk(gateway, ONE_MODEL_VK)
    check: Any = {
        "type": "string_check",
        "name": "s",
        "input": "a",
        "reference": "a",
        "operation": "eq",
    }
    await client.fine_tuning.alpha.graders.run(grader=check, model_sample="a")
    await client.fine_tuning.alpha.graders.run(
        grader={**SCORED_BY_O3, "model": "gpt-4o-mini"}, model_sample="a"
    )
    await client.fine_tuning.jobs.create(
        model="gpt-4o-mini",
        training_file="file-1",
        method={"type": "reinforcement", "reinforcement": {"grader": check}},
    )
    assert len(fake.requests) == 3


async def test_a_restricted_key_may_cancel_a_batch(gateway: TestClient, fake: FakeState) -> None:
    # Creating a batch is refused (its models are in its file); cancelling one runs no model,
    # and stops one that another key of the project started from spending.
    response = await gateway.post("/v1/batches/batch_1/cancel", headers=auth(ONE_MODEL_VK))
    assert response.status != 403
    assert [seen.path for seen in fake.requests] == ["/v1/batches/batch_1/cancel"]


# What openai 0.28 sends for `openai.ChatCompletion.create(engine=..., messages=...)` (and
# `Completion`/`Embedding` with `engine=`): the model only in the path, `/v1/engines/<model>/…`.
LEGACY_HEADERS = {
    "User-Agent": "OpenAI/v1 PythonBindings/0.28.1",
    "Accept": "*/*",
    "X-OpenAI-Client-User-Agent": '{"bindings_version": "0.28.1", "httplib": "requests", '
    '"lang": "python", "lang_version": "3.11.7", "publisher": "openai"}',
    "Content-Type": "application/json",
}
LEGACY_BODIES = {
    "chat/completions": b'{"messages": [{"role": "user", "content": "hi"}]}',
    "completions": b'{"prompt": "hi"}',
    "embeddings": b'{"input": "hi", "encoding_format": "base64"}',
}


@pytest.mark.parametrize("endpoint", sorted(LEGACY_BODIES))
async def test_a_model_named_by_a_legacy_engine_path_is_checked(
    gateway: TestClient,
    fake: FakeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    endpoint: str,
) -> None:
    # The engines path of openai 0.28's `engine=` runs the model it names; a key restricted
    # to gpt-4o-mini must not run gpt-4 through it, and its log line names the model.
    headers = {**LEGACY_HEADERS, **auth(ONE_MODEL_VK)}
    body = LEGACY_BODIES[endpoint]
    refused = await gateway.post(f"/v1/engines/gpt-4/{endpoint}", data=body, headers=headers)
    assert refused.status == 403, await refused.text()
    assert_openai_error(await refused.json(), "model_not_allowed")
    assert fake.requests == []
    allowed = await gateway.post(f"/v1/engines/gpt-4o-mini/{endpoint}", data=body, headers=headers)
    assert allowed.status == 200, await allowed.text()
    assert [seen.path for seen in fake.requests] == [f"/v1/engines/gpt-4o-mini/{endpoint}"]
    lines = await records(2)
    assert [(line["status"], line["model"]) for line in lines] == [
        (403, "gpt-4"),
        (200, "gpt-4o-mini"),
    ]
