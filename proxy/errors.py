"""Errors the gateway makes itself, in the OpenAI and the Anthropic dialect.

Steps raise `GatewayError`; the exchange renders it once, in the dialect of the endpoint,
so each SDK raises its usual exception (`AuthenticationError`, `RateLimitError`, ...).
Provider errors are not ours: they pass through unchanged, status, headers and body.
Each error carries its `Outcome` (a refusal by default; a timeout, an unreachable or broken
provider where upstream failed), and the exchange writes it as the record's one ending.

The failure map, by the step that raises (status, OpenAI code):

    route          400 invalid_path           `..`, encoded slashes, an absolute URL, a fragment,
                                              a control character
                   404 unknown_route          not a /v1 path nor a seed path
                   405 method_not_allowed     POST /health and the like (Allow: GET, HEAD);
                                              TRACE, CONNECT, PROPFIND... on a proxied path
    authenticate   401 invalid_api_key        no key, or a key not in keys.json
                   429 too_many_authentication_failures   this address failed too often
    read_body      413 request_too_large      over MAX_BODY_BYTES (Content-Length or counted)
                   400 invalid_body           the client sent a broken body
    validate       400 invalid_json           a JSON body that does not parse
                   400 invalid_body           not what its Content-Encoding says
                   413 request_too_large      a compressed body that inflates past the limit
                   415 unsupported_encoding   a Content-Encoding other than gzip or deflate
                   400 missing_field          chat/messages without model or messages
                   403 model_not_allowed      model outside the key's allowed_models, or one
                                              a restricted key's request names out of sight
    admit          429 rate_limit_exceeded    over the key's quota (Retry-After set)
                   429 insufficient_quota     over the key's budget (x-should-retry: false
                                              unless requests in flight hold it)
                   503 quota_unavailable      Redis lost and QUOTA_ON_REDIS_ERROR=deny
    forward        502 upstream_unreachable   refused, reset or DNS failure before headers
                   504 upstream_timeout       no response headers within REQUEST_TIMEOUT
                   502 upstream_broken        the last target's 429 or 5xx broke off its body
                   503 too_many_open_files    no file descriptor left to reach the provider with
                                              (EMFILE, ENFILE): the gateway's limit, not asked
    stream_back    502 upstream_broken        a small whole body cut short, before we sent anything,
                                              or a message batch's answer (links) or a coded
                                              error answer of no length over 8 MiB
                   504 upstream_timeout       ... or not sent within STREAM_IDLE_TIMEOUT
    exchange       500 internal_error         a bug: logged once, answered in the dialect
    (the server)   400 invalid_http           HTTP aiohttp's parser refuses (runtime.server)
                   431 request_head_too_large a request line over 8 KiB, a header field over
                                              4 KiB, more than 64 of them

On Bedrock's paths the OpenAI body also has a top-level `message`, with `x-amzn-ErrorType`
and `x-amzn-RequestId`: what botocore reads (`ThrottlingException` for a 429, ...).

After the response headers went out, a failure can only end the stream: the relay raises
`Cut` (the provider broke or fell silent, or the client left: 499), and the exchange
records why and closes the connection, with no error body.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from aiohttp import web

from proxy.record import Outcome

_OPENAI_TYPES = {429: "rate_limit_error"}
# Codes whose OpenAI type is the code itself, as OpenAI answers them.
_OPENAI_TYPED_CODES = frozenset({"insufficient_quota"})
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",  # as Anthropic types its own 504
}
# Bedrock's paths (the runtime's model/{id}/..., async-invoke, guardrail/...; also without
# /v1, where a client given the gateway's root gets its 404): botocore reads an error's
# type from `x-amzn-ErrorType`, its message from the body's top-level `message` and its
# request id from `x-amzn-RequestId`; the type picks its exception.
_BEDROCK_PATHS = tuple(
    f"{root}{path}" for root in ("/v1", "") for path in ("/model/", "/async-invoke", "/guardrail/")
)
_BEDROCK_TYPES = {
    401: "UnrecognizedClientException",  # as AWS answers credentials it does not know
    403: "AccessDeniedException",
    404: "ResourceNotFoundException",
    429: "ThrottlingException",
    503: "ServiceUnavailableException",
    504: "ModelTimeoutException",
}


class GatewayError(Exception):
    """A refusal or failure the gateway answers itself; `outcome` and `why` end the record."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
        outcome: Outcome = Outcome.REFUSED,
        why: str | None = None,
    ) -> None:
        """`why`: the record's error, when it says more (or less) than `message`."""
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = dict(headers or {})
        self.outcome = outcome
        self.why = message if why is None else why


class Cut(Exception):
    """An answer already under way ended early: nothing more can be sent, not even an error.

    `status` is what the record says (the provider's, or 499 for a client that left).
    """

    def __init__(self, status: int, outcome: Outcome, why: str) -> None:
        super().__init__(why)
        self.status, self.outcome, self.why = status, outcome, why


def is_anthropic_path(path: str) -> bool:
    """Anthropic's endpoints are /v1/messages and below (and the seed path /messages)."""
    return path.startswith(("/v1/messages", "/messages"))


def openai_type(error: GatewayError) -> str:
    """The error's `type` in OpenAI's dialect (a body, a WebSocket error event)."""
    if error.code in _OPENAI_TYPED_CODES:
        return error.code
    return _OPENAI_TYPES.get(
        error.status, "api_error" if error.status >= 500 else "invalid_request_error"
    )


def _bedrock_type(status: int) -> str:
    """The AWS error type botocore raises for a status of ours on a Bedrock path."""
    default = "InternalServerException" if status >= 500 else "ValidationException"
    return _BEDROCK_TYPES.get(status, default)


def body(error: GatewayError, path: str) -> bytes:
    """The JSON error body in the endpoint's dialect (on Bedrock's paths, OpenAI's with the
    top-level `message` botocore reads)."""
    if is_anthropic_path(path):
        kind = _ANTHROPIC_TYPES.get(
            error.status, "api_error" if error.status >= 500 else "invalid_request_error"
        )
        return orjson.dumps({"type": "error", "error": {"type": kind, "message": error.message}})
    document: dict[str, object] = {
        "error": {
            "message": error.message,
            "type": openai_type(error),
            "param": error.param,
            "code": error.code,
        }
    }
    if path.startswith(_BEDROCK_PATHS):
        document["message"] = error.message
    return orjson.dumps(document)


def render(error: GatewayError, path: str, request_id: str | None = None) -> web.Response:
    """The error as a response, with its headers and the request id (when the caller has one):
    `x-request-id`, and `request-id`, where Anthropic's SDKs read it
    (`APIStatusError.request_id`), on its own paths and the shared ones (`/v1/models`); on
    Bedrock's, the AWS error type and `x-amzn-RequestId`, which botocore reads."""
    response = web.Response(
        status=error.status, body=body(error, path), content_type="application/json"
    )
    response.headers.update(error.headers)
    bedrock = path.startswith(_BEDROCK_PATHS)
    if bedrock:
        response.headers["x-amzn-ErrorType"] = _bedrock_type(error.status)
    if request_id is not None:
        response.headers["x-request-id"] = request_id
        response.headers["request-id"] = request_id
        if bedrock:
            response.headers["x-amzn-RequestId"] = request_id
    return response
