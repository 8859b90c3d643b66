"""Bedrock through the gateway: the client speaks native Bedrock with its virtual key, the
gateway signs each request with SigV4 over the exact bytes it forwards, and meters it.

The fake Bedrock (tests/support/fake_bedrock.py) recomputes every signature with botocore
from the same credentials, so a request the gateway signed wrong, or whose body changed by
one byte after signing, is refused there with 403.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anthropic
import pytest
from aiohttp.test_utils import TestClient, TestServer
from anthropic import AsyncAnthropicBedrock
from botocore import UNSIGNED
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSPreparedRequest, AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.eventstream import EventStreamBuffer  # type: ignore[import-untyped]
from botocore.exceptions import ClientError
from botocore.session import get_session

from proxy.keys.fields import Defaults
from proxy.keys.keys import KeyRing, KeysFileError
from tests.conftest import auth
from tests.support.fake_bedrock import (
    BEDROCK_STATE,
    EVENT_STREAM,
    INPUT_TOKENS,
    BedrockState,
    bedrock_app,
    exception_frame,
    signed_region,
)
from tests.support.observed import assert_views_agree
from tests.support.polling import until

ACCESS_KEY = "AKIAFAKEGATEWAY0001"
SECRET_KEY = "fake-secret-access-key-0123456789abcdef"
SESSION_TOKEN = "fake-session-token-9876543210"
REGION = "us-west-2"
BEDROCK_VK = "vk_test_bedrock_6c1d9e3a7f"
NARROW_VK = "vk_test_bedrock_narrow_2f8b"
SMALL_VK = "vk_test_bedrock_small_7a3c"  # a window of 1,000 tokens
ONCE_VK = "vk_test_bedrock_once_4e9d"  # a window of one request
CLAUDE = "anthropic.claude-3-5-sonnet-20240620-v1:0"
MESSAGES = [{"role": "user", "content": "say hello please"}]


def bedrock_keys(base: str, environ_names: bool = False) -> dict[str, Any]:
    target: dict[str, Any] = {"provider": "bedrock", "region": REGION}
    if environ_names:
        target |= {
            "aws_access_key_id_env": "T_AWS_ID",
            "aws_secret_access_key_env": "T_AWS_SECRET",
            "aws_session_token_env": "T_AWS_TOKEN",
        }
    else:
        target |= {
            "aws_access_key_id": ACCESS_KEY,
            "aws_secret_access_key": SECRET_KEY,
            "aws_session_token": SESSION_TOKEN,
        }
    return {
        "providers": {"bedrock": {"base_url": base}},
        "virtual_keys": {
            BEDROCK_VK: {"name": "bedrock", **target},
            NARROW_VK: {"name": "narrow", "allowed_models": ["anthropic.claude-*"], **target},
            SMALL_VK: {"name": "small", "quota": {"requests": 100, "tokens": 1000}, **target},
            ONCE_VK: {"name": "once", "quota": {"requests": 1}, **target},
        },
    }


@pytest.fixture
async def fake_bedrock(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> TestServer:
    return await aiohttp_server(bedrock_app(ACCESS_KEY, SECRET_KEY, SESSION_TOKEN, REGION))


@pytest.fixture
def bedrock(fake_bedrock: TestServer) -> BedrockState:
    return fake_bedrock.app[BEDROCK_STATE]


@pytest.fixture
async def gateway(
    tmp_path: Path, fake_bedrock: TestServer, make_gateway: Callable[..., Awaitable[TestClient]]
) -> TestClient:
    path = tmp_path / "keys-bedrock.json"
    path.write_text(json.dumps(bedrock_keys(str(fake_bedrock.make_url("")).rstrip("/"))))
    return await make_gateway(KEYS_FILE_PATH=str(path))


@pytest.fixture
async def sdk(gateway: TestClient) -> AsyncIterator[AsyncAnthropicBedrock]:
    """The anthropic SDK's Bedrock client in gateway mode: its virtual key as the API key."""
    client = AsyncAnthropicBedrock(
        api_key=BEDROCK_VK,
        aws_region="us-east-1",  # the client's region does not matter: the target's does
        base_url=str(gateway.make_url("/v1")),
        max_retries=0,
    )
    yield client
    await client.close()


async def test_the_sdk_gets_an_answer_signed_over_its_own_bytes(
    sdk: AsyncAnthropicBedrock, bedrock: BedrockState, records
) -> None:
    message = await sdk.messages.create(model=CLAUDE, max_tokens=50, messages=MESSAGES)
    assert message.content[0].text == "tok0 tok1 tok2 "  # type: ignore[union-attr]
    assert bedrock.refused == []
    path, headers, body = bedrock.seen[0]
    assert path == f"/model/{CLAUDE}/invoke"
    assert "anthropic_version" in json.loads(body) and "model" not in json.loads(body)
    assert BEDROCK_VK not in str(dict(headers))  # the virtual key stayed at the gateway
    line = (await records(1))[0]
    assert line["model"] == CLAUDE and line["provider"] == "bedrock"
    assert line["stream"] is False
    usage = line["usage"]
    assert usage["prompt_tokens"] == INPUT_TOKENS and usage["completion_tokens"] == 3
    assert usage["estimated"] is False


async def test_a_stream_is_relayed_and_its_event_stream_usage_read(
    sdk: AsyncAnthropicBedrock, bedrock: BedrockState, records
) -> None:
    async with sdk.messages.stream(model=CLAUDE, max_tokens=50, messages=MESSAGES) as stream:
        text = "".join([piece async for piece in stream.text_stream])
    assert text == "tok0 tok1 tok2 "
    assert bedrock.seen[0][0] == f"/model/{CLAUDE}/invoke-with-response-stream"
    line = (await records(1))[0]
    assert line["stream"] is True  # the SDK takes "stream" out of the body: the path says it
    usage = line["usage"]
    assert usage["prompt_tokens"] == INPUT_TOKENS and usage["completion_tokens"] == 3
    assert usage["estimated"] is False


GLOBAL_SONNET = "global.anthropic.claude-sonnet-4-5-20250929-v1:0"
US_SONNET = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"


@pytest.mark.parametrize(
    ("model", "input_mtok", "output_mtok"),
    [(GLOBAL_SONNET, 3.0, 15.0), (US_SONNET, 3.3, 16.5)],  # the regional 10% premium
)
@pytest.mark.parametrize("stream", [False, True])
async def test_a_claude_answer_is_priced_at_the_endpoint_the_path_names(
    sdk: AsyncAnthropicBedrock,
    records,
    model: str,
    input_mtok: float,
    output_mtok: float,
    stream: bool,
) -> None:
    """Bedrock prices a global inference profile 10% below a regional one; the answer names
    only Anthropic's model (`claude-sonnet-4-5-20250929`). The global one was priced by that
    name, at the regional rates."""
    if stream:
        async with sdk.messages.stream(model=model, max_tokens=5, messages=MESSAGES) as events:
            await events.get_final_message()
    else:
        await sdk.messages.create(model=model, max_tokens=5, messages=MESSAGES)
    line = (await records(1))[0]
    expected = (INPUT_TOKENS * input_mtok + 3 * output_mtok) / 1e6
    assert line["cost_usd"] == pytest.approx(expected)


PROFILE = f"arn:aws:bedrock:{REGION}:123456789012:application-inference-profile/a1b2c3d4e5f6"


async def test_an_inference_profile_arn_is_a_model_id(
    sdk: AsyncAnthropicBedrock, bedrock: BedrockState, records
) -> None:
    """An application inference profile (or a provisioned model) is invoked by its ARN, whose
    '/' the SDK and boto3 send encoded (%2F) in the model's path segment: it is one segment,
    forwarded and signed as sent. It was refused 400 as an encoded slash."""
    message = await sdk.messages.create(model=PROFILE, max_tokens=5, messages=MESSAGES)
    assert message.content[0].text == "tok0 tok1 tok2 "  # type: ignore[union-attr]
    assert bedrock.refused == []  # the signature over the encoded path holds
    assert bedrock.seen[0][0] == "/model/" + PROFILE.replace("/", "%2F") + "/invoke"
    assert (await records(1))[0]["model"] == PROFILE


@pytest.mark.parametrize(
    ("model", "body"),
    [
        ("meta.llama3-1-70b-instruct-v1:0", {"prompt": "say hello please", "max_gen_len": 50}),
        ("amazon.titan-text-express-v1", {"inputText": "say hello please"}),
    ],
)
async def test_an_invoke_answer_of_another_family_is_charged_its_counted_tokens(
    gateway: TestClient, bedrock: BedrockState, records, model: str, body: dict[str, Any]
) -> None:
    """A Llama's or a Titan's invoke answer is the model's own body, with no usage object the
    gateway reads: it was charged the prompt's estimate and no completion at all (the text
    under `generation` or `results` unread). Bedrock counts every InvokeModel answer's tokens
    in its X-Amzn-Bedrock-Input-Token-Count and -Output-Token-Count headers: those are
    charged, exactly."""
    headers = {**auth(BEDROCK_VK), "x-fake-chunks": "5"}
    response = await gateway.post(f"/v1/model/{model}/invoke", json=body, headers=headers)
    assert response.status == 200, await response.text()
    (line,) = await records(1)
    assert line["usage"]["prompt_tokens"] == INPUT_TOKENS
    assert line["usage"]["completion_tokens"] == 5
    assert line["usage"]["estimated"] is False


def botocore_client(gateway: TestClient, key: str, endpoint: str = "/v1") -> Any:
    """boto3's bedrock-runtime client in gateway mode (at `endpoint`): unsigned, its virtual
    key as a bearer token."""
    client = get_session().create_client(
        "bedrock-runtime",
        region_name=REGION,
        endpoint_url=str(gateway.make_url(endpoint)),
        config=Config(signature_version=UNSIGNED, retries={"max_attempts": 1}),
    )

    def bearer(request: AWSPreparedRequest, **_: object) -> None:
        request.headers["Authorization"] = f"Bearer {key}"

    client.meta.events.register("before-send.bedrock-runtime.*", bearer)
    return client


INVOCATION = f"arn:aws:bedrock:{REGION}:123456789012:async-invoke/q2n4r6t8v0x1"
GUARDRAIL = f"arn:aws:bedrock:{REGION}:123456789012:guardrail/gr1a2b3c4d5e"


def botocore_follow_up(gateway: TestClient, key: str) -> tuple[str, str]:
    """An async invocation's state (GetAsyncInvoke) and a guardrail applied by its ARN
    (ApplyGuardrail), as boto3 sends them: each ARN in its path segment, '/' encoded."""
    client = botocore_client(gateway, key)
    try:
        invocation = client.get_async_invoke(invocationArn=INVOCATION)
        applied = client.apply_guardrail(
            guardrailIdentifier=GUARDRAIL,
            guardrailVersion="1",
            source="INPUT",
            content=[{"text": {"text": "hello"}}],
        )
    finally:
        client.close()
    return invocation["status"], applied["action"]


async def test_an_invocation_or_a_guardrail_named_by_its_arn_passes(
    gateway: TestClient, bedrock: BedrockState
) -> None:
    """After StartAsyncInvoke, a client polls its invocation by ARN (GetAsyncInvoke,
    `GET /async-invoke/<ARN>`), and a guardrail may be named by its ARN (ApplyGuardrail):
    boto3 sends each ARN's '/' encoded in its one path segment, as a model ARN's. Both were
    refused 400 invalid_path as an encoded slash."""
    answered = await asyncio.to_thread(botocore_follow_up, gateway, BEDROCK_VK)
    assert answered == ("InProgress", "NONE")
    assert bedrock.refused == []  # the signature over the encoded path holds
    encoded = [arn.replace(":", "%3A").replace("/", "%2F") for arn in (INVOCATION, GUARDRAIL)]
    assert [seen[0] for seen in bedrock.seen] == [
        f"/async-invoke/{encoded[0]}",
        f"/guardrail/{encoded[1]}/version/1/apply",
    ]


MARKETPLACE = f"arn:aws:sagemaker:{REGION}:123456789012:endpoint/my-marketplace-endpoint"


def botocore_converse(gateway: TestClient, key: str, model: str) -> dict[str, Any]:
    """boto3's bedrock-runtime Converse in gateway mode (unsigned, its virtual key as a bearer
    token): the answer."""
    client = botocore_client(gateway, key)
    messages = [{"role": "user", "content": [{"text": "hi"}]}]
    try:
        answer: dict[str, Any] = client.converse(modelId=model, messages=messages)
    finally:
        client.close()
    return answer


async def test_a_marketplace_endpoint_arn_is_a_model_id(
    gateway: TestClient, bedrock: BedrockState, records
) -> None:
    """A Bedrock Marketplace model is called by its SageMaker endpoint's ARN
    (`aws bedrock-runtime converse --model-id arn:aws:sagemaker:…:endpoint/<name>`), its '/'
    sent encoded as an inference profile's is: it was refused 400 as an encoded slash."""
    answer = await asyncio.to_thread(botocore_converse, gateway, BEDROCK_VK, MARKETPLACE)
    assert answer["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert bedrock.refused == []  # the signature over the encoded path holds
    encoded = MARKETPLACE.replace(":", "%3A").replace("/", "%2F")  # as botocore sends it
    assert bedrock.seen[0][0] == f"/model/{encoded}/converse"
    assert (await records(1))[0]["model"] == MARKETPLACE


def botocore_count(gateway: TestClient, key: str, text: str) -> dict[str, Any]:
    """boto3's bedrock-runtime CountTokens (of a Converse request) in gateway mode."""
    client = botocore_client(gateway, key)
    messages = [{"role": "user", "content": [{"text": text}]}]
    try:
        counted: dict[str, Any] = client.count_tokens(
            modelId=CLAUDE, input={"converse": {"messages": messages}}
        )
    finally:
        client.close()
    return counted


async def test_a_token_count_is_charged_nothing(gateway: TestClient, records) -> None:
    """Bedrock's CountTokens (`model/<id>/count-tokens`, boto3's count_tokens) generates
    nothing and costs nothing, as Anthropic's and Vertex's token counts: a prompt as large as
    the key's window of 1,000 tokens is counted twice, and the window stays empty."""
    for _ in range(2):
        counted = await asyncio.to_thread(botocore_count, gateway, SMALL_VK, "x" * 3600)
        assert counted["inputTokens"] == INPUT_TOKENS
    lines = await records(2)
    assert [(line["status"], line["usage"], line["cost_usd"]) for line in lines] == [
        (200, None, None)
    ] * 2
    async with gateway.get("/usage", headers=auth(SMALL_VK)) as usage:
        assert (await usage.json())["tokens"]["used"] == 0


@pytest.mark.parametrize(
    "path",
    [
        "/v1/model/arn:aws:bedrock:us-west-2:1:application-inference-profile%2F..%2F..%2Fx/invoke",
        "/v1/model/arn:aws:bedrock:us-west-2:1:application-inference-profile%2Fa%2Fb/invoke",
        "/v1/model/arn:aws:bedrock:us-west-2:1:application-inference-profile%2Fa/x%2Fy",
        "/v1/chat/arn:aws:bedrock:us-west-2:1:application-inference-profile%2Fa/invoke",
        "/v1/model/not-an-arn%2Fa/invoke",
        "/v1/model/arn:aws:sagemaker:us-west-2:1:notebook-instance%2Fa/invoke",
        "/v1/async-invoke/arn:aws:bedrock:us-west-2:1:async-invoke%2F..%2Fx",
        "/v1/async-invoke/not-an-arn%2Fa",
        "/v1/guardrail/arn:aws:bedrock:us-west-2:1:guardrail%2Fa/x%2Fy",
    ],
)
async def test_an_encoded_slash_elsewhere_is_still_refused(
    gateway: TestClient, bedrock: BedrockState, path: str
) -> None:
    response = await gateway.post(path, data=b"{}", headers=auth(BEDROCK_VK))
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "invalid_path"
    assert bedrock.seen == []


@pytest.mark.parametrize("action", ["converse", "converse-stream"])
async def test_converse_passes_through_and_its_usage_is_read(
    gateway: TestClient, bedrock: BedrockState, records, action: str
) -> None:
    body = b'{"messages":[{"role":"user","content":[{"text":"hi"}]}],  "inferenceConfig":{}}'
    headers = {**auth(BEDROCK_VK), "content-type": "application/json", "x-fake-chunks": "5"}
    response = await gateway.post(f"/v1/model/{CLAUDE}/{action}", data=body, headers=headers)
    assert response.status == 200, await response.text()
    raw = await response.read()
    assert bedrock.seen[0][2] == body  # byte for byte: the signature covers these
    if action == "converse-stream":
        assert response.headers["content-type"] == EVENT_STREAM
        assert b"tok4" in raw
    line = (await records(1))[0]
    assert line["stream"] is (action == "converse-stream")
    usage = line["usage"]
    assert usage["prompt_tokens"] == INPUT_TOKENS and usage["completion_tokens"] == 5
    assert usage["estimated"] is False


@pytest.mark.parametrize(
    ("action", "last"),
    [("converse-stream", "metadata"), ("invoke-with-response-stream", "message_stop")],
)
async def test_a_client_that_leaves_at_the_streams_last_frame_was_answered_not_cut(
    gateway: TestClient, records, action: str, last: str
) -> None:
    # A client that stops reading at the stream's last frame (converse's `metadata`, with the
    # usage; invoke's chunk of message_stop, with the invocation metrics) has the whole
    # answer, also when the provider's body end comes after it.
    body = b'{"messages":[{"role":"user","content":[{"text":"hi"}]}]}'
    if action == "invoke-with-response-stream":
        body = json.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 64,
                           "messages": MESSAGES}).encode()  # fmt: skip
    headers = {**auth(BEDROCK_VK), "content-type": "application/json", "x-fake-hang": "end"}
    response = await gateway.post(f"/v1/model/{CLAUDE}/{action}", data=body, headers=headers)
    assert response.status == 200, await response.text()
    frames, seen = EventStreamBuffer(), ""
    while seen != last:
        chunk = await response.content.readany()
        assert chunk, f"the stream ended before its {last}"
        frames.add_data(chunk)
        for message in frames:
            seen = message.headers[":event-type"]
            if seen == "chunk":
                seen = json.loads(base64.b64decode(json.loads(message.payload)["bytes"]))["type"]
    response.close()
    (line,) = await records(1)
    assert line["status"] == 200 and "error" not in line, line
    usage = line["usage"]
    assert usage["prompt_tokens"] == INPUT_TOKENS and usage["completion_tokens"] == 3
    assert usage["estimated"] is False
    await assert_views_agree(gateway, BEDROCK_VK, line)


@pytest.mark.parametrize("action", ["converse", "converse-stream"])
async def test_converse_one_hour_cache_writes_are_priced_at_their_rate(
    gateway: TestClient, records, action: str
) -> None:
    """Converse splits its cache writes by lifetime in `usage.cacheDetails`; Bedrock bills
    the 1-hour ones at 2x the input rate, the 5-minute ones at 1.25x. All were priced as
    5-minute writes."""
    body = b'{"messages":[{"role":"user","content":[{"text":"hi"}]}]}'
    headers = {
        **auth(BEDROCK_VK),
        "content-type": "application/json",
        "x-fake-cache-write-tokens": "3000",
        "x-fake-cache-write-1h-tokens": "2000",
    }
    response = await gateway.post(f"/v1/model/{GLOBAL_SONNET}/{action}", data=body, headers=headers)
    assert response.status == 200, await response.text()
    await response.read()
    line = (await records(1))[0]
    usage = line["usage"]
    assert usage["prompt_tokens"] == INPUT_TOKENS + 3000
    assert usage["cache_write_tokens"] == 3000
    # global Sonnet 4.5: $3 input, $3.75 5-minute writes, $6 1-hour writes, $15 output
    expected = (INPUT_TOKENS * 3.0 + 1000 * 3.75 + 2000 * 6.0 + 3 * 15.0) / 1e6
    assert line["cost_usd"] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("action", "exception"),
    [
        ("invoke-with-response-stream", "throttlingException"),
        ("converse-stream", "modelStreamErrorException"),
    ],
)
async def test_a_stream_ended_by_an_exception_frame_logs_its_type(
    gateway: TestClient, bedrock: BedrockState, records, action: str, exception: str
) -> None:
    """Bedrock ends a stream that fails under its 200 with an exception frame: it reaches the
    client as sent, and the log line's error names its type (never its message), as an
    Anthropic stream's error event is logged. It was logged as a stream that ended well."""
    body = b'{"anthropic_version":"bedrock-2023-05-31","max_tokens":5,"messages":[]}'
    headers = {
        **auth(BEDROCK_VK),
        "content-type": "application/json",
        "x-fake-exception": exception,
    }
    response = await gateway.post(f"/v1/model/{CLAUDE}/{action}", data=body, headers=headers)
    assert response.status == 200
    raw = await response.read()
    ending = exception_frame(exception, "Try again later.")
    assert raw.endswith(ending) and len(raw) > len(ending)  # after some of the answer
    line = (await records(1))[0]
    assert line["status"] == 200 and line["stream"] is True
    assert exception in line["error"] and "Try again" not in line["error"]
    assert line["usage"]["estimated"] is True  # cut before the count of its end


@pytest.mark.parametrize(
    ("kind", "raised"),
    [
        ("ThrottlingException", anthropic.RateLimitError),
        ("ValidationException", anthropic.BadRequestError),
        ("AccessDeniedException", anthropic.PermissionDeniedError),
    ],
)
@pytest.mark.parametrize("stream", [False, True], ids=["invoke", "stream"])
async def test_bedrocks_error_answered_whole_logs_the_type_its_header_names(
    sdk: AsyncAnthropicBedrock,
    records,
    log_path: Path,
    kind: str,
    raised: type[anthropic.APIStatusError],
    stream: bool,
) -> None:
    """Bedrock names an error's type in `x-amzn-ErrorType` (`ThrottlingException:http://…`),
    its body holds only a `message`: the SDK raises its exception with AWS's message, and the
    log line's error names the type, not `(unknown)`, which told a throttled request from a
    refused one by its status only."""
    fake = {"extra_headers": {"x-fake-error": kind}}
    with pytest.raises(raised) as error:
        if stream:
            async with sdk.messages.stream(
                model=CLAUDE, max_tokens=50, messages=MESSAGES, **fake
            ) as events:
                async for _ in events:
                    pass
        else:
            await sdk.messages.create(model=CLAUDE, max_tokens=50, messages=MESSAGES, **fake)
    assert f"{kind}: the fake's message." in str(error.value)
    (line,) = await records(1)
    assert line["status"] == error.value.status_code and line["cost_usd"] is None
    assert line["error"] == f"the provider sent an error in its answer ({kind})"
    assert SECRET_KEY not in log_path.read_text() and BEDROCK_VK not in log_path.read_text()


@pytest.mark.parametrize("log_bodies", ["false", "true"])
async def test_a_provider_echoing_the_session_token_hands_it_to_no_client(
    tmp_path: Path,
    fake_bedrock: TestServer,
    make_gateway: Callable[..., Awaitable[TestClient]],
    records,
    log_bodies: str,
) -> None:
    """The session token goes in every signed request (`x-amz-security-token`): a proxy in
    front of Bedrock that echoes it has that header dropped and the token masked in the body,
    as the secret key and a Vertex access token are, in what the client gets and in the log.
    It reached the client and the log line as sent."""
    path = tmp_path / "keys-bedrock.json"
    path.write_text(json.dumps(bedrock_keys(str(fake_bedrock.make_url("")).rstrip("/"))))
    gateway = await make_gateway(KEYS_FILE_PATH=str(path), LOG_BODIES=log_bodies)
    response = await gateway.post(
        f"/v1/model/{CLAUDE}/invoke",
        json={"anthropic_version": "bedrock-2023-05-31", "max_tokens": 5, "messages": MESSAGES},
        headers={**auth(BEDROCK_VK), "x-fake-reflect": "1"},
    )
    assert response.status == 200
    body = await response.text()
    assert "x-echo-security-token" not in response.headers
    assert SESSION_TOKEN not in body and '"sent"' in body
    (line,) = await records(1)
    assert ("response" in line) == (log_bodies == "true")
    assert SESSION_TOKEN not in json.dumps(line)


def with_east_fallback(tmp_path: Path, fake_bedrock: TestServer) -> Path:
    """keys.json whose Bedrock key in REGION falls back to the same model in us-east-1."""
    document = bedrock_keys(str(fake_bedrock.make_url("")).rstrip("/"))
    entry = document["virtual_keys"][BEDROCK_VK]
    credentials = {name: value for name, value in entry.items() if name.startswith("aws_")}
    entry["fallbacks"] = [{"provider": "bedrock", "region": "us-east-1", **credentials}]
    path = tmp_path / "keys-bedrock-regions.json"
    path.write_text(json.dumps(document))
    return path


async def test_a_fallback_in_another_region_serves_while_the_first_region_is_down(
    tmp_path: Path,
    fake_bedrock: TestServer,
    bedrock: BedrockState,
    make_gateway: Callable[..., Awaitable[TestClient]],
    records,
) -> None:
    """A key in us-west-2 with a fallback in us-east-1 keeps being served from us-east-1
    while us-west-2 answers 503: each region is a target of its own, with its own breaker.
    Both were the one target 'bedrock': once us-west-2's failures opened its breaker, it was
    us-east-1's too, and every request went to us-west-2 alone (503) until the cooldown."""
    bedrock.more_regions, bedrock.down = {"us-east-1"}, {REGION}
    path = with_east_fallback(tmp_path, fake_bedrock)
    gateway = await make_gateway(KEYS_FILE_PATH=str(path), BREAKER_MIN_REQUESTS="4")
    body = b'{"messages":[{"role":"user","content":[{"text":"hi"}]}]}'
    for _ in range(4):
        response = await gateway.post(
            f"/v1/model/{CLAUDE}/converse", data=body, headers=auth(BEDROCK_VK)
        )
        assert response.status == 200, await response.text()
    assert signed_region(bedrock.seen[-1][1]) == "us-east-1"
    health = await (await gateway.get("/health")).json()
    states = {name: target["state"] for name, target in health["targets"].items()}
    assert states == {f"bedrock/{REGION}": "open", "bedrock/us-east-1": "closed"}
    line = (await records(4))[-1]
    assert line["target"] == "bedrock/us-east-1"
    assert [attempt["key"] for attempt in line["attempts"]] == ["bedrock/us-east-1#1"]


@pytest.mark.parametrize(
    ("action", "exception", "fails_over"),
    [
        ("invoke-with-response-stream", "throttlingException", True),
        ("converse-stream", "serviceUnavailableException", True),
        ("converse-stream", "modelStreamErrorException", True),
        ("invoke-with-response-stream", "validationException", False),
    ],
)
async def test_a_stream_failing_at_its_start_fails_over_to_the_fallback(
    tmp_path: Path,
    fake_bedrock: TestServer,
    bedrock: BedrockState,
    make_gateway: Callable[..., Awaitable[TestClient]],
    records,
    action: str,
    exception: str,
    fails_over: bool,
) -> None:
    """Bedrock answers a throttled or unavailable stream with a 200, its start, then an
    exception frame (LiteLLM's #38606: such streams never fell over). With a fallback
    beside it, the client gets the fallback's stream whole, and no exception frame; an
    exception that fails everywhere (a validation) is passed on as it came, not retried.
    The gateway read only SSE for a stream's first event: these went to the client."""
    bedrock.more_regions, bedrock.failing_at_start = {"us-east-1"}, {REGION: exception}
    gateway = await make_gateway(KEYS_FILE_PATH=str(with_east_fallback(tmp_path, fake_bedrock)))
    body = b'{"anthropic_version":"bedrock-2023-05-31","max_tokens":5,"messages":[]}'
    if action == "converse-stream":
        body = b'{"messages":[{"role":"user","content":[{"text":"hi"}]}]}'
    response = await gateway.post(
        f"/v1/model/{CLAUDE}/{action}", data=body, headers=auth(BEDROCK_VK)
    )
    assert response.status == 200
    raw = await response.read()
    assert (exception.encode() in raw) is not fails_over
    line = (await records(1))[0]
    regions = [signed_region(seen[1]) for seen in bedrock.seen]
    if fails_over:
        assert regions == [REGION, "us-east-1"]
        assert line["target"] == "bedrock/us-east-1" and "error" not in line
        assert [attempt["status"] for attempt in line["attempts"]] == [200, 200]
        assert exception in line["attempts"][0]["error"]
        assert line["usage"]["estimated"] is False  # the fallback's whole answer, counted
    else:
        assert regions == [REGION]
        assert exception in line["error"]


async def reserved_beside(
    gateway: TestClient, bedrock: BedrockState, send: Callable[[], Awaitable[object]]
) -> tuple[int, int]:
    """Start `send` (held at the fake), then ask for the small key's reservation and send a
    small Converse request beside it; (tokens reserved, the small request's status)."""
    large = asyncio.create_task(send())
    await until(lambda: len(bedrock.seen) == 1)
    async with gateway.get("/usage", headers=auth(SMALL_VK)) as usage:
        reserved = (await usage.json())["tokens"]["reserved"]
    small = await gateway.post(
        f"/v1/model/{CLAUDE}/converse",
        json={"messages": [{"role": "user", "content": [{"text": "hi"}]}]},
        headers=auth(SMALL_VK),
    )
    bedrock.release.set()
    await large
    assert len(bedrock.seen) == 1 + (small.status == 200)
    return reserved, small.status


async def test_a_converse_prompt_counts_its_tool_results_and_tool_config(
    gateway: TestClient, bedrock: BedrockState
) -> None:
    """A Converse request whose prompt is mostly a tool's result and the tools' definitions
    (about 1,100 tokens, read as 0 before) fills the key's window of 1,000 while it runs."""
    tool_config = {
        "tools": [{"toolSpec": {"name": "search", "description": "d" * 1200,
                                "inputSchema": {"json": {"type": "object"}}}}]
    }  # fmt: skip
    body = {
        "system": [{"text": "Be brief."}],
        "messages": [
            {"role": "user", "content": [{"text": "find it"}]},
            {"role": "assistant", "content": [
                {"toolUse": {"toolUseId": "t1", "name": "search", "input": {"q": "it"}}}]},
            {"role": "user", "content": [{"toolResult": {"toolUseId": "t1", "content": [
                {"text": "r" * 3000}, {"json": {"rows": ["x" * 100]}}]}}]},
        ],
        "toolConfig": tool_config,
        "inferenceConfig": {"maxTokens": 50},
    }  # fmt: skip

    async def send() -> object:
        headers = {**auth(SMALL_VK), "x-fake-hold": "1"}
        async with gateway.post(
            f"/v1/model/{CLAUDE}/converse", json=body, headers=headers
        ) as answer:
            assert answer.status == 200
            return await answer.read()

    reserved, status = await reserved_beside(gateway, bedrock, send)
    compact = {"separators": (",", ":")}
    chars = (
        len("Be brief.") + len("find it") + len("search") + len(json.dumps({"q": "it"}, **compact))
        + 3000 + len(json.dumps({"rows": ["x" * 100]}, **compact))
        + len(json.dumps(tool_config, **compact))
    )  # fmt: skip
    assert reserved == math.ceil(chars / 4) + 50
    assert status == 429


async def test_an_invoke_prompt_counts_its_tools_definitions(
    gateway: TestClient, bedrock: BedrockState
) -> None:
    """The anthropic SDK's Bedrock client with 4,000 characters of tool definitions: about
    1,000 tokens (read as 0 before) besides a short message fill the key's window."""
    tools = [{"name": "search", "description": "d" * 4000,
              "input_schema": {"type": "object", "properties": {}}}]  # fmt: skip
    client = AsyncAnthropicBedrock(
        api_key=SMALL_VK,
        aws_region="us-east-1",
        base_url=str(gateway.make_url("/v1")),
        max_retries=0,
    )

    async def send() -> object:
        return await client.messages.create(
            model=CLAUDE, max_tokens=50, messages=MESSAGES, tools=tools,  # type: ignore[arg-type]
            extra_headers={"x-fake-hold": "1"},
        )  # fmt: skip

    reserved, status = await reserved_beside(gateway, bedrock, send)
    await client.close()
    chars = len(MESSAGES[0]["content"]) + len(json.dumps(tools, separators=(",", ":")))
    assert reserved == math.ceil(chars / 4) + 50
    assert status == 429


async def test_the_clients_own_aws_credentials_never_reach_bedrock(
    gateway: TestClient, bedrock: BedrockState
) -> None:
    headers = {
        **auth(BEDROCK_VK),
        "content-type": "application/json",
        "X-Amz-Security-Token": "clients-own-session-token",
        "X-Amz-Date": "20200101T000000Z",
        "X-Amz-Content-Sha256": "0" * 64,
    }
    body = b'{"anthropic_version":"bedrock-2023-05-31","max_tokens":5,"messages":[]}'
    response = await gateway.post(f"/v1/model/{CLAUDE}/invoke", data=body, headers=headers)
    assert response.status == 200, await response.text()
    _, seen, _ = bedrock.seen[0]
    assert seen["X-Amz-Security-Token"] == SESSION_TOKEN
    assert seen["X-Amz-Date"] != "20200101T000000Z"
    assert "X-Amz-Content-Sha256" not in seen
    assert all("clients-own" not in value for value in seen.values())


async def test_allowed_models_reads_the_model_in_the_path(
    gateway: TestClient, bedrock: BedrockState
) -> None:
    body = b'{"anthropic_version":"bedrock-2023-05-31","max_tokens":5,"messages":[]}'
    headers = {**auth(NARROW_VK), "content-type": "application/json"}
    refused = await gateway.post("/v1/model/meta.llama3-70b-instruct-v1:0/invoke", data=body, headers=headers)  # fmt: skip
    assert refused.status == 403
    allowed = await gateway.post(f"/v1/model/{CLAUDE}/invoke", data=body, headers=headers)
    assert allowed.status == 200
    assert len(bedrock.seen) == 1


async def test_an_async_invocation_is_checked_by_the_model_its_body_names(
    gateway: TestClient, bedrock: BedrockState, records
) -> None:
    """StartAsyncInvoke (POST /async-invoke) names its model in the body's `modelId`: a key
    allowed only anthropic.claude-* may not start Nova Reel's videos with it. It went up,
    past allowed_models."""
    body = {
        "modelInput": {"taskType": "TEXT_VIDEO", "textToVideoParams": {"text": "a cat"}},
        "outputDataConfig": {"s3OutputDataConfig": {"s3Uri": "s3://bucket/videos/"}},
    }
    video = {"modelId": "amazon.nova-reel-v1:1", **body}
    refused = await gateway.post("/v1/async-invoke", json=video, headers=auth(NARROW_VK))
    assert refused.status == 403
    assert (await refused.json())["error"]["code"] == "model_not_allowed"
    assert bedrock.seen == []
    claude = {"modelId": CLAUDE, **body}
    allowed = await gateway.post("/v1/async-invoke", json=claude, headers=auth(NARROW_VK))
    assert allowed.status == 200, await allowed.text()
    assert len(bedrock.seen) == 1
    refused_line, allowed_line = await records(2)
    assert refused_line["model"] == "amazon.nova-reel-v1:1" and allowed_line["model"] == CLAUDE


def botocore_error(gateway: TestClient, key: str, model: str, endpoint: str = "/v1") -> ClientError:
    """botocore's bedrock-runtime client in gateway mode (unsigned, its virtual key as a
    bearer token) calling Converse at `endpoint`: the error it raises."""
    client = botocore_client(gateway, key, endpoint)
    messages = [{"role": "user", "content": [{"text": "hi"}]}]
    with pytest.raises(ClientError) as raised:
        client.converse(modelId=model, messages=messages)
    client.close()
    return raised.value


@pytest.mark.parametrize(
    ("key", "model", "status", "code", "says"),
    [
        ("vk_unknown_0000", CLAUDE, 401, "UnrecognizedClientException", "Virtual key"),
        (NARROW_VK, "meta.llama3-70b-instruct-v1:0", 403, "AccessDeniedException", "may not use"),
        (ONCE_VK, CLAUDE, 429, "ThrottlingException", "Quota exceeded"),
    ],
)
async def test_botocore_reads_the_gateways_own_errors(
    gateway: TestClient,
    bedrock: BedrockState,
    key: str,
    model: str,
    status: int,
    code: str,
    says: str,
) -> None:
    """boto3's bedrock-runtime client raises its own exception for the gateway's refusal, by
    the AWS error type, with the gateway's message and request id (its `RequestId`), not an
    empty `An error occurred (401)`; the key that may send one request has sent it."""
    if key == ONCE_VK:
        async with gateway.post(f"/v1/model/{CLAUDE}/converse", json={}, headers=auth(key)):
            bedrock.seen.clear()
    error = await asyncio.to_thread(botocore_error, gateway, key, model)
    meta = error.response["ResponseMetadata"]
    assert meta["HTTPStatusCode"] == status
    assert error.response["Error"]["Code"] == code
    assert says in error.response["Error"]["Message"]
    assert meta["RequestId"] == meta["HTTPHeaders"]["x-request-id"]
    assert bedrock.seen == []


async def test_botocore_pointed_at_the_gateways_root_is_told_to_use_v1(
    gateway: TestClient, bedrock: BedrockState
) -> None:
    """An endpoint_url without /v1 (as Bedrock's own has none): a 404 botocore reads as
    ResourceNotFoundException, saying where Bedrock's paths are, not an empty message."""
    error = await asyncio.to_thread(botocore_error, gateway, BEDROCK_VK, CLAUDE, "/")
    assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    assert error.response["Error"]["Code"] == "ResourceNotFoundException"
    assert "/v1" in error.response["Error"]["Message"]
    assert "Bedrock" in error.response["Error"]["Message"]
    assert bedrock.seen == []


async def test_the_fake_refuses_a_signature_over_one_changed_byte(
    fake_bedrock: TestServer, aiohttp_client: Callable[..., Awaitable[TestClient]]
) -> None:
    """The fake's check can fail: a body changed after signing is refused, the same is not."""
    client = await aiohttp_client(fake_bedrock)
    url = str(fake_bedrock.make_url(f"/model/{CLAUDE}/invoke"))
    body = b'{"anthropic_version":"bedrock-2023-05-31","max_tokens":5,"messages":[]}'
    signed = AWSRequest(method="POST", url=url, data=body)
    credentials = Credentials(ACCESS_KEY, SECRET_KEY, SESSION_TOKEN)
    SigV4Auth(credentials, "bedrock", REGION).add_auth(signed)
    headers = dict(signed.headers)
    same = await client.post(f"/model/{CLAUDE}/invoke", data=body, headers=headers)
    assert same.status == 200
    changed = await client.post(
        f"/model/{CLAUDE}/invoke", data=body.replace(b"5", b"6"), headers=headers
    )
    assert changed.status == 403
    assert fake_bedrock.app[BEDROCK_STATE].refused == ["the signature does not match"]


def test_credentials_may_come_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(bedrock_keys("http://127.0.0.1:1", environ_names=True)))
    defaults = Defaults(quota_enabled=False, requests=0, tokens=None, window_seconds=60.0)
    environ = {"T_AWS_ID": ACCESS_KEY, "T_AWS_SECRET": SECRET_KEY, "T_AWS_TOKEN": SESSION_TOKEN}
    ring = KeyRing.load(str(path), environ, defaults)
    assert SECRET_KEY in ring.real_keys()  # no answer header may echo it
    with pytest.raises(KeysFileError, match="T_AWS_SECRET"):
        KeyRing.load(str(path), {"T_AWS_ID": ACCESS_KEY}, defaults)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"region": None}, "region must be"),
        ({"api_key": "sk-x"}, "api_key does not apply"),
        ({"model": "x"}, "model does not apply"),
        ({"aws_secret_access_key": None}, "needs aws_access_key_id and aws_secret_access_key"),
    ],
)
def test_a_wrong_bedrock_target_stops_the_start(
    tmp_path: Path, change: dict[str, Any], says: str
) -> None:
    document = bedrock_keys("http://127.0.0.1:1")
    entry = document["virtual_keys"][BEDROCK_VK]
    for name, value in change.items():
        if value is None:
            del entry[name]
        else:
            entry[name] = value
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(document))
    defaults = Defaults(quota_enabled=False, requests=0, tokens=None, window_seconds=60.0)
    with pytest.raises(KeysFileError, match=says):
        KeyRing.load(str(path), {}, defaults)


def test_a_bedrock_key_cannot_fall_back_to_another_api(tmp_path: Path) -> None:
    document = bedrock_keys("http://127.0.0.1:1")
    entry = document["virtual_keys"][BEDROCK_VK]
    entry["fallbacks"] = [{"provider": "anthropic", "api_key": "sk-ant-x"}]
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(document))
    defaults = Defaults(quota_enabled=False, requests=0, tokens=None, window_seconds=60.0)
    with pytest.raises(KeysFileError, match="same API"):
        KeyRing.load(str(path), {}, defaults)
