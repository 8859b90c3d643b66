"""Which models a request names, wherever it names them, for `allowed_models`.

A restricted key may use only its models, so every place a request can name one is read:
the JSON body's `model` (Bedrock's StartAsyncInvoke: `modelId`; the `id` of a model config
object, where Anthropic's managed agents take one; and each `params.model`
of an Anthropic batch), a form's `model`
field (multipart uploads such as audio transcriptions, or url-encoded), a `model` query
parameter (realtime; Azure's: `deployment`), and the path (`models/<name>:generateContent`,
`tunedModels/<id>:generateContent` (named `tunedModels/<id>`), `deployments/<name>/…`,
OpenAI's legacy `engines/<name>/…`, Vertex's `endpoints/<id>:predict` (named `endpoints/<id>`); not Vertex's `models/count-tokens:rawPredict`, whose model is in the
body), and nested models (`svg.model` of an image, the `model` of a
Responses `image_generation` tool, of an Anthropic advisor tool, of a grader (run alone or a
reinforcement fine-tuning job's), and of each of an Anthropic message's `fallbacks`, whose "default" is a model out of sight, and each of OpenRouter's fallback `models`; its `"route": "fallback"` without them is one out of sight). What cannot be read (an OpenAI batch's models, in its file; a managed agent's (Anthropic's, OpenAI's), an eval's graders', a resumed fine-tuning job's, and a remixed, edited or extended video's, stored at the provider) is `Unreadable`: for a restricted
key that is a 403, never a pass: a name the gateway cannot see must not slip past
allowed_models. So is a model a request runs without naming it (`Unnamed`, from `unnamed`):
a stored prompt's (Responses with a `prompt` id), a previous response's (a compaction
with a null `model`), an assistant's (runs), the endpoint's
default (images, videos, audio, moderations, an image tool). A `model` in the body overrides the
prompt's and the assistant's, so one that is allowed passes. This module finds the names and judges them (`check`): the one allowed_models check
of every request, HTTP (`peek.validate`) and WebSocket (`realtime`).

Some requests hand the client a way around the gateway altogether (`check_outside`): an
ephemeral Realtime key (client secrets, the older sessions) or ChatKit key (a ChatKit
session's client secret), or a WebRTC or SIP call (Realtime's
calls; a Live session made, forked or accepting a SIP call), whose
traffic then goes to the provider directly, past every check, quota and meter. They are
refused to a restricted key always, and to any other key unless keys.json allows them
(`allow_client_secrets`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote

from multidict import MultiMapping
from multipart import (  # type: ignore[import-untyped]  # multipart ships no type hints
    MultipartError,
    MultipartSegment,
    PushMultipartParser,
    parse_options_header,
)

from proxy.errors import GatewayError
from proxy.keys.keys import VirtualKey
from proxy.record import shown
from proxy.upstream.routing import endpoint

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
# POSTs that run models the gateway never sees (`in_path`): OpenAI's batches name theirs
# inside an uploaded file; a video remixed, edited or extended is made by its source video's
# model, stored at the provider (the API takes no `model` there).
_MODELS_ELSEWHERE = {
    "batches": "creating batches (their models are inside an uploaded file)",
    "videos/*/remix": "remixing a video (its model is the source video's, at the provider)",
    "videos/edits": "editing a video (its model is the source video's, at the provider)",
    "videos/extensions": "extending a video (its model is the source video's, at the provider)",
    # An eval run samples its data source's model and grades with the eval's stored graders.
    "evals/*/runs": "running an eval (its graders' models are stored at the provider)",
    # A paused fine-tuning job resumed trains its stored model (and grades with its grader's).
    "fine_tuning/jobs/*/resume": "resuming a fine-tuning job (its models are stored with it)",
}
_ELSEWHERE_ROOTS = frozenset(path.partition("/")[0] for path in _MODELS_ELSEWHERE)
# Anthropic's messages run other models beside their own: the advisor tool's (`advisor_…`
# tools name it), and those of `fallbacks` (each entry's `model`, or "default").
_ADVISOR, _FALLBACKS = "advisor_", "fallbacks"
# OpenRouter's fallbacks: the models of `models`, tried in turn when the one before fails
# (`model` need not be named); `"route": "fallback"` without them, one it picks itself.
_ROUTER_MODELS, _ROUTE = "models", "route"
# A grader that scores or labels with a model runs it: one run alone (`grader`), or a
# reinforcement fine-tuning job's (`method.reinforcement.grader`), at each step of training.
_GRADER = "grader"
# Managed agents run the models of an agent stored at the provider (its own, its callable
# agents', its advisor's; OpenAI's inline agent nests its own in `agent`), unseen: the POSTs
# that start (or go on with) their work, `*` an id. Anthropic's: a session made or sent events,
# a deployment made, changed (its agent, events, schedule), run or unpaused; OpenAI's (under
# `agents/`): a session made or sent events, an automation made, changed, invoked or resumed.
_AGENT_RUNS = frozenset(
    (
        "sessions",
        "sessions/*/events",
        "deployments",
        "deployments/*",
        "deployments/*/run",
        "deployments/*/unpause",
        "agents/sessions",
        "agents/sessions/*/events",
        "agents/automations",
        "agents/automations/*",
        "agents/automations/*/invocations",
        "agents/automations/*/resume",
    )
)
_AGENT_ROOTS = frozenset(("sessions", "deployments", "agents"))
# What follows `deployments/<id>` in Anthropic's managed agents' paths (none: the deployment
# itself): no Azure deployment's path, so `<id>` there names no model.
_AGENT_DEPLOYMENT_ACTIONS = frozenset(("run", "pause", "unpause", "archive"))
# Anthropic's managed agents take their model as a string or as a model config object whose
# `id` is the model (beside its `effort`, `speed`, ...): an agent made or changed (also on
# Bedrock's control plane), a dream made. Anywhere else an object in `model` stays unread.
_MODEL_CONFIGS = frozenset(("agents", "agents/*", "dreams"))
# Form fields that name a model: the request's own, and the SVG author of an image.
_FORM_NAMES = frozenset(("model", "svg[model]"))
# Uploads whose form is read whatever the key, not only for a restricted key's check: those
# priced by their model (audio seconds, image tokens), and a video's (the SDK's form), so
# that the log and the metrics name the model it runs.
READ_FORMS = frozenset(
    ("audio/transcriptions", "audio/translations", "images/edits", "images/variations", "videos")
)
# POSTs that may name no model, and whose model is then one the gateway cannot see.
_UNNAMED = {
    "responses": "the model of its stored prompt",
    "responses/compact": "its previous response's model",
    "threads/runs": "its assistant's model",
    "threads/*/runs": "its assistant's model",
    "images/generations": "the endpoint's default model",
    "images/edits": "the endpoint's default model",
    "images/variations": "the endpoint's default model",
    "videos": "the endpoint's default model",
    "audio/speech": "the endpoint's default model",
    "audio/transcriptions": "the endpoint's default model",
    "audio/translations": "the endpoint's default model",
    "moderations": "the endpoint's default model",
}
# RFC 2231's extended parameter `name*=` in a part's Content-Disposition (not `filename*=`).
_EXTENDED_NAME = re.compile(r"(?:^|;)\s*name\*\s*=", re.IGNORECASE)
# Each `name=` parameter of a Content-Disposition (not `filename=`).
_NAME = re.compile(r"(?:^|;)\s*name\s*=", re.IGNORECASE)
# Vertex's deployed endpoints: `endpoints/<id>:predict` runs the model deployed there.
_ENDPOINTS = "endpoints"
# Bedrock's StartAsyncInvoke (a video, an embedding, ... written to S3) names its model in
# the body's `modelId`.
_ASYNC_INVOKE, _MODEL_ID = "async-invoke", "modelId"
# Gemini's tuned models: `tunedModels/<id>:generateContent` runs one as `models/<m>:…` does.
_TUNED = "tunedModels"
# OpenAI's legacy engines paths (openai 0.28's `engine=`): `engines/<model>/chat/completions`,
# `/completions`, `/embeddings` run the model they name, with none in the body.
_ENGINES = "engines"
# Vertex's token count for Claude (the SDK's count_tokens): a path in the place of a model's,
# the model it counts for in the body.
_VERTEX_COUNT_TOKENS = "count-tokens:rawPredict"
# POSTs under realtime/ that hand the client an ephemeral key to the provider (and Azure's
# preview one, realtimeapi/sessions).
_EPHEMERAL_KEYS = frozenset(("client_secrets", "sessions", "transcription_sessions"))
_REALTIME_ROOTS = frozenset(("realtime", "realtimeapi"))
# The Live API's WebRTC sessions: one made (`live/sessions`), a stored one forked onto a new
# connection (`…/{id}/fork`), an incoming SIP call accepted (`…/{id}/accept`).
_LIVE, _LIVE_CALLS = "live", frozenset(("fork", "accept"))
# A Live session's WebSockets past its own: a stored one forked, a server's sideband attached.
_LIVE_SOCKETS = frozenset(("fork", "attach"))
# A ChatKit session's client secret: the browser's ChatKit runs the workflow at the provider.
_CHATKIT_SESSIONS = ["chatkit", "sessions"]


class Unreadable(ValueError):
    """The request may name a model the gateway cannot read; the message says where."""


@dataclass(frozen=True, slots=True)
class Unnamed:
    """In the names of a request: a model it runs without naming it (`where` says whose)."""

    where: str


def in_document(
    document: Any, unnamed: str | None = None, field: str = "model", posted_to: str | None = None
) -> list[Any]:
    """The `model` values of a JSON body: its own (`Unnamed(unnamed)` when it names none and
    `unnamed` says what it then runs), an image's SVG author, a Responses tool's, and those
    of an Anthropic batch's requests. `field`: where the body names its own (`model_field`).
    A null `model` names none, as an absent one: LangChain's AzureChatOpenAI sends one, the
    deployment in the path naming the model. `posted_to`: the endpoint a POSTed body goes
    to, where a model config object's `id` is its model (`_MODEL_CONFIGS`)."""
    if not isinstance(document, dict):
        return []
    if document.get(field) is not None:
        own = document[field]
        if isinstance(own, dict) and posted_to is not None and _takes_model_config(posted_to):
            own = _config_model(own)
        names = [own]
    elif unnamed is not None:
        names = [Unnamed(unnamed)]
    else:
        names = []
    if (
        "svg" in document
        or "tools" in document
        or "requests" in document
        or _FALLBACKS in document
        or _GRADER in document
        or "method" in document
        or _ROUTER_MODELS in document
        or _ROUTE in document
    ):
        names += _nested(document)
    return names


def _takes_model_config(endpoint: str) -> bool:
    """A POST to `endpoint` may give its model as a model config object (`_MODEL_CONFIGS`)."""
    segments = endpoint.rstrip("/").split("/")
    if len(segments) == 2:
        segments[1] = "*"  # agents/{agent_id}
    return "/".join(segments) in _MODEL_CONFIGS


def _config_model(config: dict[str, Any]) -> Any:
    """The model a model config object names: its `id`, a string. Anything else (no `id`,
    one not a string, a name beside it that folds to `id`, which a server folding case, as
    Go's encoding/json does, may read instead) is the object itself, which `check` refuses."""
    model = config.get("id")
    if not isinstance(model, str) or any(
        name != "id" and name.casefold() == "id" for name in config
    ):
        return config
    return model


def spelt_otherwise(document: dict[str, Any], field: str = "model") -> list[Any]:
    """The values of the body's top-level names that are `field` in another case ("Model",
    "MODEL"; Go also folds the Kelvin sign to k and the long s to s): Go's encoding/json
    (Ollama, LocalAI, Go gateways) and ASP.NET's web defaults read them as `field`, the
    last one in the body winning. A null names none, as for `field` itself."""
    folded = field.casefold()
    return [
        value
        for name, value in document.items()
        if value is not None and name != field and name.casefold() == folded
    ]


def _nested(document: dict[str, Any]) -> Iterator[Any]:
    """The models of a body's parts that run their own (for `in_document`)."""
    yield from _svg_author(document)
    tools = document.get("tools")
    if isinstance(tools, list):
        for tool in tools:
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind == "image_generation":  # the Responses API's image tool runs its own model
                yield (
                    tool["model"] if "model" in tool else Unnamed("the image tool's default model")
                )
                yield from _svg_author(tool)
            elif isinstance(kind, str) and kind.startswith(_ADVISOR):  # Anthropic's advisor
                yield tool["model"] if "model" in tool else Unnamed("the advisor tool's model")
    fallbacks = document.get(_FALLBACKS)
    if fallbacks is not None:  # Anthropic's models tried when the message's own declines
        if not isinstance(fallbacks, list):  # "default": the model's own, out of sight
            yield Unnamed("its model's default fallbacks")
        else:
            for entry in fallbacks:
                yield entry.get("model") if isinstance(entry, dict) else entry
    models = document.get(_ROUTER_MODELS)
    if models is not None:  # OpenRouter's models, tried in turn when the one before fails
        yield from models if isinstance(models, list) else (models,)
    elif document.get(_ROUTE) == "fallback":  # OpenRouter picks a fallback model itself
        yield Unnamed("a fallback model the router picks")
    grader = document.get(_GRADER)  # run alone: fine_tuning/alpha/graders/run
    method = document.get("method")  # a fine-tuning job's; reinforcement's is graded
    if isinstance(method, dict) and isinstance(method.get("reinforcement"), dict):
        grader = method["reinforcement"].get(_GRADER)
    if isinstance(grader, dict):
        yield from _grader_models(grader)
    requests = document.get("requests")
    if isinstance(requests, list):
        for item in requests:
            params = item.get("params") if isinstance(item, dict) else None
            if isinstance(params, dict):  # each request of a message batch: a message's body
                if "model" in params:
                    yield params["model"]
                yield from _nested(params)


def _grader_models(grader: dict[str, Any]) -> Iterator[Any]:
    """The models a grader scores or labels with (`score_model`, `label_model`: `model`),
    a multi grader's among its `graders` (a map of graders, or one) too."""
    pending = [grader]
    while pending:  # a loop, not recursion: a body nests graders as deep as it likes
        holder = pending.pop()
        if "model" in holder:
            yield holder["model"]
        graders = holder.get("graders")
        if isinstance(graders, dict):
            pending.append(graders)  # one grader
            pending += (child for child in graders.values() if isinstance(child, dict))


def _svg_author(holder: dict[str, Any]) -> Iterator[Any]:
    """An image's SVG output is authored by a model of its own (`svg.model`)."""
    svg = holder.get("svg")
    if isinstance(svg, dict) and "model" in svg:
        yield svg["model"]


def model_field(method: str, tail: str) -> str:
    """Where a JSON body names the model it runs: `model`, but Bedrock's StartAsyncInvoke
    (POST async-invoke) names it `modelId`."""
    return _MODEL_ID if method == "POST" and tail == _ASYNC_INVOKE else "model"


def in_form(content_type: str, body: bytes, unnamed: str | None = None) -> list[str | Unnamed]:
    """The `model` fields of a form body (`Unnamed(unnamed)` when it has none and `unnamed`
    says what it then runs). Raises Unreadable for a broken multipart body."""
    found = _form_models(content_type, body)
    if unnamed is not None and "model" not in (name for name, _ in found):
        return [*(value for _, value in found), Unnamed(unnamed)]
    return [value for _, value in found]


def _form_models(content_type: str, body: bytes) -> list[tuple[str, str]]:
    """(field, value) of each form field that names a model."""
    media_type, options = parse_options_header(content_type)
    if media_type == "application/x-www-form-urlencoded":
        # Split at ";" too: python-multipart (Starlette's and FastAPI's forms) splits there a
        # form's tail after its last "&", so "prompt=x;model=o1" names a model to those servers.
        text = body.decode("utf-8", "replace").replace(";", "&")
        fields = parse_qsl(text, keep_blank_values=True)
        return [(name, value) for name, value in fields if name in _FORM_NAMES]
    boundary = options.get("boundary")
    if not boundary:
        raise Unreadable("a multipart body without a boundary")
    models: list[tuple[str, str]] = []
    name, value = "", None
    try:
        with PushMultipartParser(boundary) as parser:
            for event in (*parser.parse(body), *parser.parse(b"")):
                if isinstance(event, MultipartSegment):
                    _check_named_once(event.headerlist)
                    name, value = event.name, bytearray() if event.name in _FORM_NAMES else None
                elif event and value is not None:
                    value += event
                elif event is None and value is not None:
                    models.append((name, value.decode("utf-8", "replace")))
                    value = None
    except MultipartError as error:
        raise Unreadable(f"a multipart body that does not parse ({error})") from None
    return models


def _check_named_once(headerlist: list[tuple[str, str]]) -> None:
    """A part names its field once, plainly: an RFC 2231 `name*=` (which python-multipart,
    under FastAPI servers, reads as the name), a second Content-Disposition or a second
    `name=` in one (the provider's parser picks one: the gateway's reads the last, a regex
    the first) could name a `model` field the gateway does not see. Raises Unreadable."""
    dispositions = [value for name, value in headerlist if name == "Content-Disposition"]
    if len(dispositions) > 1 or any(
        _EXTENDED_NAME.search(value) or len(_NAME.findall(value)) > 1 for value in dispositions
    ):
        raise Unreadable("a form part named twice, or in RFC 2231 form (name*=)")


def in_path(method: str, tail: str, query: MultiMapping[str]) -> list[str]:
    """Models named by the path (`models/<m>`, `deployments/<m>`, `engines/<m>`, Gemini's
    `tunedModels/<m>`, Vertex's `endpoints/<id>:<method>`, Bedrock's `model/<m>/…`) or a `model`
    query parameter (or `deployment`: Azure's Realtime WebSocket, `openai/realtime?deployment=<d>`).

    Raises Unreadable for a request whose models are where the gateway cannot see them.
    """
    first = endpoint(tail).partition("/")[0]
    if method == "POST" and first in _ELSEWHERE_ROOTS:
        elsewhere = _models_elsewhere(endpoint(tail))
        if elsewhere is not None:
            raise Unreadable(elsewhere)
    if method == "POST" and first in _AGENT_ROOTS and _runs_agent(endpoint(tail)):
        raise Unreadable(
            "running a managed agent (its models are the agent's, stored at the provider)"
        )
    models = list(query.getall("model", ()))
    if "deployment" in query:
        models += query.getall("deployment")
    if first == _ENGINES:
        engine = endpoint(tail).partition("/")[2].partition("/")[0]
        return [*models, unquote(engine)] if engine else models
    if (
        "model" not in tail
        and "deployments" not in tail
        and _TUNED not in tail
        and _ENDPOINTS not in tail
    ):
        return models  # no segment below can name one
    segments = tail.split("/")
    if segments[0] == "deployments" and _is_agent_deployment(segments):
        return models  # Anthropic's managed agents' deployment: an id, not a model
    if segments[0] == "model" and len(segments) > 1 and segments[1]:
        # Bedrock's native paths: model/<id>/invoke, /converse...; an id may hold a colon.
        models.append(unquote(segments[1]))
    for before, segment in zip(segments, segments[1:], strict=False):
        if segment == _VERTEX_COUNT_TOKENS:
            continue  # Vertex's Claude token count: no model of its own, the body names it
        if before in ("models", "deployments") and segment:
            models.append(_path_model(unquote(segment)))
        elif before == _TUNED and segment:
            # Its own name, whole: a tuned model's id is the tuner's choice, so 'gemini-…'
            # could be any model; a pattern allows it as `tunedModels/<id>`.
            models.append(f"{_TUNED}/{_path_model(unquote(segment))}")
        elif before == _ENDPOINTS and ":" in segment:
            # Vertex's deployed endpoint called (`<id>:predict`, `:generateContent`...): it
            # runs whatever is deployed there; a pattern allows it as `endpoints/<id>`.
            models.append(f"{_ENDPOINTS}/{unquote(segment).partition(':')[0]}")
    return models


def _models_elsewhere(tail: str) -> str | None:
    """Where the models of a POST under a `_MODELS_ELSEWHERE` root are, or None: it runs none."""
    segments = tail.rstrip("/").split("/")
    if len(segments) == 3:
        segments[1] = "*"  # videos/{video_id}/remix, evals/{eval_id}/runs
    elif len(segments) == 4:
        segments[2] = "*"  # fine_tuning/jobs/{job_id}/resume
    return _MODELS_ELSEWHERE.get("/".join(segments))


def _runs_agent(tail: str) -> bool:
    """A POST to `tail` starts (or goes on with) a managed agent's work (`_AGENT_RUNS`)."""
    segments = tail.rstrip("/").split("/")
    at = 2 if segments[0] == "agents" else 1  # where the id is
    if len(segments) > at:
        segments[at] = "*"
    return "/".join(segments) in _AGENT_RUNS


def _is_agent_deployment(segments: list[str]) -> bool:
    """`deployments/<id>` is Anthropic's managed agents' deployment: the path ends there or
    goes on with one of its actions, as no Azure deployment's path does."""
    if segments[-1] == "":
        segments = segments[:-1]  # a trailing slash
    return len(segments) == 2 or (len(segments) == 3 and segments[2] in _AGENT_DEPLOYMENT_ACTIONS)


def _path_model(segment: str) -> str:
    """The model a `models/` or `deployments/` segment names.

    Gemini's native paths add one method after a colon (`gemini-pro:generateContent`); an
    OpenAI fine-tuned model's id is colons throughout (`ft:gpt-4o-mini:org:suffix:id`) and
    names no method: with more than one colon the segment is the model, whole.
    """
    model, colon, _ = segment.partition(":")
    return model if colon and segment.count(":") == 1 else segment


def unnamed(method: str, tail: str) -> str | None:
    """The model a request runs when its body names none, where the gateway cannot see it
    (for `in_document`, `in_form`); None: it needs none, or the provider refuses it without."""
    if method != "POST":
        return None
    tail = endpoint(tail)
    if not tail.startswith("threads/"):  # the path as it is names the endpoint
        return _UNNAMED.get(tail.rstrip("/"))
    segments = tail.rstrip("/").split("/")
    if len(segments) == 3 and segments[0] == "threads":
        segments[1] = "*"  # threads/{thread_id}/runs
    return _UNNAMED.get("/".join(segments))


def in_frames(tail: str) -> str | None:
    """Why a WebSocket session's models are out of sight (for `check`): a Live session's
    (`live/sessions`, a session's `…/fork`, a sideband's `…/attach`) are named in its frames
    (`session.start`; a `session.update` changes its delegations'), whatever the URL says;
    None: the URL names it."""
    if _LIVE not in tail:  # most sessions: at once
        return None
    segments = endpoint(tail).rstrip("/").split("/")
    if segments[0] == _LIVE and (
        segments[1:] == ["sessions"]
        or (len(segments) == 4 and segments[1] == "sessions" and segments[3] in _LIVE_SOCKETS)
    ):
        return "a Live session, whose models its frames name"
    return None


def check_outside(key: VirtualKey, method: str, tail: str) -> None:
    """Refuse a request that would let the client reach the provider past the gateway (an
    ephemeral Realtime or ChatKit key, a WebRTC or SIP call), unless keys.json allows it.
    Raises 403."""
    # Most requests at once: a POST whose tail names none of the roots `_outside` reads.
    if method != "POST" or ("realtime" not in tail and _LIVE not in tail and "chatkit" not in tail):
        return
    outside = _outside(endpoint(tail).rstrip("/").split("/"))
    if outside is None:
        return
    what, instead = outside
    if key.allowed_models is not None:
        allowed = ", ".join(key.model_patterns or ())
        raise GatewayError(
            403,
            "client_secrets_not_allowed",
            f"This key may use only some models ({allowed}), and {what} would let its holder "
            f"use any model, past the gateway: {instead}.",
        )
    if not key.allows_client_secrets:
        raise GatewayError(
            403,
            "client_secrets_not_allowed",
            f"This key may not open {what}: its traffic would go to the provider directly, "
            f"past the gateway's quotas and log. {instead[0].upper()}{instead[1:]}, or ask "
            "for allow_client_secrets.",
        )


def _outside(segments: list[str]) -> tuple[str, str] | None:
    """(what it opens, what to do instead) for a POST whose traffic then goes past the
    gateway; None for any other."""
    through = "connect through the gateway instead (wss://<gateway>/v1/realtime?model=...)"
    if segments[0] == _LIVE:
        if segments[1:] == ["sessions"] or (
            len(segments) == 4 and segments[1] == "sessions" and segments[3] in _LIVE_CALLS
        ):
            return "a WebRTC or SIP call", through
        return None
    if segments == _CHATKIT_SESSIONS:
        return (
            "an ephemeral ChatKit key",
            "serve ChatKit from your own backend, its model calls through the gateway, instead",
        )
    if segments[0] not in _REALTIME_ROOTS:
        return None
    if segments[1:] == ["calls"] or (
        len(segments) == 4 and segments[1] == "calls" and segments[3] == "accept"
    ):
        return "a WebRTC or SIP call", through
    return ("an ephemeral Realtime key", through) if segments[-1] in _EPHEMERAL_KEYS else None


def check(key: VirtualKey, names: list[Any], unreadable: str | None = None) -> None:
    """Every model named is one the key may use, and none is out of sight. Raises 403.

    `unreadable`: where the request may name a model the gateway could not read; an
    `Unnamed` among `names`: a model it runs without naming it. A key without
    allowed_models may use any model.
    """
    if key.allowed_models is None:
        return
    allowed = ", ".join(key.model_patterns or ())  # as keys.json writes them
    for name in names:
        if isinstance(name, Unnamed):
            raise GatewayError(
                403,
                "model_not_allowed",
                f"This key may use only some models ({allowed}), and this request names none "
                f"where it would run {name.where}, which the gateway cannot check: name the "
                "'model'.",
                "model",
            )
        if not isinstance(name, str):
            raise GatewayError(
                403,
                "model_not_allowed",
                f"This key may use only some models ({allowed}), and 'model' here is not a string.",
                "model",
            )
        if not key.allows(name):
            raise GatewayError(
                403,
                "model_not_allowed",
                f"This key may not use the model '{shown(name)}'. It may use: {allowed}.",
                "model",
            )
    if unreadable is not None:
        raise GatewayError(
            403,
            "model_not_allowed",
            f"This key may use only some models ({allowed}), and the gateway cannot check the model of "
            f"this request ({unreadable}): send JSON, or a form with a 'model' field.",
            "model",
        )
