"""What the gateway reads of a request before it goes upstream: the body, and a peek at it.

`body_at_hand` (a body already there, most) and `read_body` (one still to come) read the
body bounded by MAX_BODY_BYTES; `validate` peeks at the few fields the gateway checks
(`model`, `stream` (or a native API's streamed path), `messages`) or uses (the conversation a pool keeps on one key:
`prompt_cache_key`, `metadata.user_id`) in a JSON body, decoding a compressed upload
(`encodings`) for the peek only. The bytes that go upstream are the bytes the client
sent: the peek is a separate, parsed value (`Peek`), never a re-encoding of the body.

Since the provider parses those bytes itself, the peek reads them as the most lenient
servers would, or refuses what they may read otherwise: a field the gateway decides on
named twice in one object (`check_said_once`: parsers disagree on which copy counts), a
generation body it cannot read for a key that reserves (`_check_readable`); counts and
flags as pydantic's lax types read them (`_whole`, `openai_chat.is_set`), caps and `n`
in any case (Go's encoding/json), the largest cap named.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from functools import partial
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from proxy.encodings import decode_body
from proxy.errors import GatewayError
from proxy.keys.keys import VirtualKey
from proxy.record import Record
from proxy.relay import named
from proxy.upstream import routing
from proxy.usage import estimate
from proxy.usage.openai_chat import is_set
from proxy.usage.prompt import prompt_chars
from proxy.usage.usage import Charged, charged

# Endpoints whose body must name a model and a non-empty list of messages:
# the provider would refuse them anyway, and the gateway refuses them without a round trip.
_NEEDS_MODEL_AND_MESSAGES = frozenset(("chat/completions", "messages", "messages/count_tokens"))
_JSON_TYPES = ("application/json", "+json")
_BOM = b"\xef\xbb\xbf"
# The native APIs' streamed calls, which say so in the path, not the body (AnthropicBedrock
# takes "stream" out of it; Gemini's body has none): Bedrock's, then Vertex's and Gemini's.
_STREAMED_PATHS = (
    "/invoke-with-response-stream",
    "/converse-stream",
    ":streamRawPredict",
    ":streamGenerateContent",
)
# Answers that generate tokens (a background Response's too): what an output cap caps.
_GENERATIONS = frozenset((Charged.TEXT, Charged.LATER))
# Endpoints that take a JSON body, which a reservation reads: generations and embeddings.
_READ_AS_JSON = frozenset((*_GENERATIONS, Charged.PROMPT))
# The fields the gateway decides on, by what reads them: a body naming one twice in an object
# is refused (`check_said_once`), since JSON parsers disagree on which one counts (orjson,
# Python's, Go's and most keep the last; gjson, simdjson and RapidJSON the first). The model,
# at any depth, for allowed_models; what a reservation and the charge read; what the cache reads.
_RESERVED_FIELDS = (
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n",
    "best_of",
    "background",
    "stream",
    "stream_options",
    "generationConfig",
    "generation_config",
    "inferenceConfig",
)
_CACHED_FIELDS = ("store", "background", "conversation")
# What holds a model the check reads besides the body's own (`named.in_document`): a copy of
# one of them read by the provider's parser and not the gateway's hides its model.
_MODEL_HOLDERS = ("tools", "fallbacks", "models", "route", "requests", "grader", "method", "svg")
_DECIDING = frozenset(
    (
        *("model", "modelId", *_RESERVED_FIELDS, *_CACHED_FIELDS),
        *(*_MODEL_HOLDERS, "params", "reinforcement", "type"),
        *("maxOutputTokens", "maxTokens", "candidateCount", "candidate_count"),
    )
)
# A model config object's `id` (`named.in_document`): deciding only in a body whose `model`
# is one (elsewhere an `id` decides nothing, and is in many objects of a body).
_DECIDING_WITH_ID = _DECIDING | {"id"}
_QUOTED = {name: f'"{name}"'.encode() for name in _DECIDING_WITH_ID}
# A JSON escape of a letter or underscore, as a name may be spelt ("mod\u0065l"): so rare in
# bodies that any one sends the body to the full check.
_ESCAPED_LETTER = re.compile(rb"\\u00[4-7][0-9A-Fa-f]")


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs 3x (one per request)
class Peek:
    """The few fields read from a JSON body; the body itself is forwarded untouched."""

    model: str | None = None
    is_stream: bool = False
    # For the tracker's reservation: the prompt's text at about 4 characters a token, and
    # the output cap the body names (max_tokens, max_completion_tokens, max_output_tokens,
    # Gemini's generationConfig.maxOutputTokens, Bedrock's inferenceConfig.maxTokens).
    prompt_tokens_estimate: int = 0
    max_output_tokens: int | None = None
    # The answers it generates, each up to that cap (or the allowance): OpenAI's `n`
    # choices, a text completion's `best_of` (generated and billed, `n` of them returned).
    answers: int = 1
    # It generates tokens (chat, completions, responses, messages...): naming no cap, it
    # reserves the key's output allowance. Read only for a key that reserves.
    is_generation: bool = False
    # The conversation the body names, kept on one pool key for the provider's prompt cache:
    # OpenAI's prompt_cache_key, else Anthropic's metadata.user_id; None when neither.
    affinity: str | None = None
    # The body as the provider reads it, when it came compressed (Content-Encoding): what the
    # usage estimate reads the prompt from. None: the body as it came.
    decoded: bytes | None = None


def body_at_hand(request: web.Request, limit: int, length: int | None) -> bytes | None:
    """The request body when there is nothing to wait for: none, or all of it came with the
    head (most bodies), taken as it lies, where read() would wait on the stream twice and
    copy it. None: it is still to come (`read_body`). Raises 413 past `limit`, 400.

    `length`: the request's Content-Length (None: none, a chunked upload)."""
    if length is not None and length > limit:
        raise _too_large(limit)
    if not request.body_exists:
        return b""
    content = request.content
    if length is None or content.total_bytes != length:
        return None
    try:
        return content.read_nowait()
    except (RequestPayloadError, aiohttp.http_exceptions.HttpProcessingError) as error:
        raise _unreadable(error) from None


async def read_body(request: web.Request, limit: int, silence: float) -> bytes:
    """The body `body_at_hand` left to come (still arriving, chunked, or held back by
    Expect), bounded. Raises 413 past `limit`, 400 for a broken upload, 408 when no byte of
    it came for `silence` seconds (CLIENT_BODY_TIMEOUT: a stalled upload holds no
    connection and no buffered body for ever)."""
    content, parts = request.content, bytearray()
    try:
        while True:
            async with asyncio.timeout(silence):
                chunk = await content.readany()
            if not chunk:
                return bytes(parts)
            parts += chunk
            if len(parts) > limit:
                raise _too_large(limit)
    except TimeoutError:
        raise GatewayError(
            408,
            "request_timeout",
            f"The request body stopped arriving: nothing came for {silence:g} seconds.",
        ) from None
    except (RequestPayloadError, aiohttp.http_exceptions.HttpProcessingError) as error:
        raise _unreadable(error) from None


def _unreadable(error: Exception) -> GatewayError:
    return GatewayError(
        400, "invalid_body", f"The request body could not be read: {error.__class__.__name__}."
    )


def _too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        "request_too_large",
        f"The request body is larger than the gateway's limit of {limit} bytes.",
    )


def validate(
    tail: str, request: web.Request, body: bytes, key: VirtualKey, limit: int, record: Record
) -> Peek:
    """Peek at `model` and `stream`; check every model the request names against the key.

    Raises 400 (bad JSON, missing field), 403 (a model not allowed, or one a restricted
    key's request names where the gateway cannot read it), 413, 415. What was read goes
    on `record` before any refusal, so a refused request's log line names its model too.
    """
    is_restricted = key.allowed_models is not None
    method, headers, content_type = request.method, request.headers, request.content_type
    decoded = None
    if "content-encoding" in headers:
        # Every Content-Encoding header counts: the provider undoes them all (two gzips: twice).
        body = decoded = decode_body(body, ", ".join(headers.getall("content-encoding")), limit)
    names: list[Any] = []
    unreadable: str | None = None
    document: dict[str, Any] | None = None
    named.check_outside(key, method, tail)  # 403
    unnamed = named.unnamed(method, tail)
    # The endpoint, also under Azure's roots (`openai/v1/chat/completions`).
    endpoint = routing.endpoint(tail)
    needs_json = endpoint in _NEEDS_MODEL_AND_MESSAGES and method == "POST"
    if (
        endpoint not in _NEEDS_MODEL_AND_MESSAGES
        and content_type in named.FORM_TYPES
        # `curl -d '{...}'` labels JSON a url-encoded form, and providers read it as JSON all
        # the same: a body that opens as a JSON object is read as one, whatever its label.
        and not _opens_object(body)
    ):
        # Parsing a large upload costs time: only where it decides (the check, the price, or
        # the model a video names for the log).
        if is_restricted or endpoint in named.READ_FORMS:
            try:
                names += named.in_form(headers.get("content-type", ""), body, unnamed)
            except named.Unreadable as error:
                unreadable = str(error)
    else:
        document = _document(endpoint, needs_json, content_type, body)
        if document is not None:
            field = named.model_field(method, tail)
            posted_to = endpoint if method == "POST" else None
            names += named.in_document(document, unnamed, field, posted_to)
            if is_restricted:
                names += named.spelt_otherwise(document, field)
        elif body:
            unreadable = "a body that is neither a JSON object nor a form"
    try:
        names += named.in_path(method, tail, request.query)
    except named.Unreadable as error:
        unreadable = unreadable or str(error)
    model = None
    for name in names:
        if isinstance(name, str):
            model = name
            break
    is_stream = is_background = False
    if document is not None:
        is_stream = is_set(document.get("stream"))
        # A background Response answers queued, usage null: its tokens come with a later GET.
        is_background = tail.endswith("responses") and is_set(document.get("background"))
    if not is_stream and tail.endswith(_STREAMED_PATHS):
        is_stream = True
    record.saw_model(model, is_stream, is_background)
    if document is not None:
        check_said_once(body, document, key)
        if needs_json:
            _check_chat(document)
    if is_restricted:
        named.check(key, names, unreadable)
    if document is None:
        if key.reserves and body and charged(method, request.path) in _READ_AS_JSON:
            _check_readable(body, content_type)
        return Peek(model=model, is_stream=is_stream, decoded=decoded)
    affinity = _conversation(document)
    if not key.reserves:  # nothing to reserve: no need to measure
        return Peek(model=model, is_stream=is_stream, affinity=affinity, decoded=decoded)
    return Peek(
        model=model,
        is_stream=is_stream,
        prompt_tokens_estimate=estimate.tokens(prompt_chars(tail, document)),
        max_output_tokens=_output_cap(document),
        answers=_answers(document),
        is_generation=charged(request.method, request.path, is_background) in _GENERATIONS,
        affinity=affinity,
        decoded=decoded,
    )


def _conversation(document: dict[str, Any]) -> str | None:
    """prompt_cache_key (OpenAI), else metadata.user_id (Anthropic): non-empty strings only."""
    key = document.get("prompt_cache_key")
    if isinstance(key, str) and key:
        return key
    metadata = document.get("metadata")
    user = metadata.get("user_id") if isinstance(metadata, dict) else None
    return user if isinstance(user, str) and user else None


# Where the native APIs name an output cap, in an object of their own: Gemini's and
# Vertex's generateContent (either spelling proto JSON takes), Bedrock's Converse.
_NESTED_CAPS = (
    ("generationConfig", "maxOutputTokens"),
    ("generation_config", "max_output_tokens"),
    ("inferenceConfig", "maxTokens"),
)


# The names of an output cap, and of the answers asked for, as they are compared: case-folded,
# since Go's encoding/json (Ollama, LocalAI) reads "MAX_TOKENS" or "N" as them.
_CAPS = frozenset(("max_tokens", "max_completion_tokens", "max_output_tokens"))
_COUNTS = frozenset(("n", "best_of"))


def _output_cap(document: dict[str, Any]) -> int | None:
    """The output cap the body names: the largest of the names the APIs use, in any case,
    since servers differ on which one counts when a body names two (SGLang, vLLM and most
    compatible servers take max_completion_tokens over max_tokens). An Anthropic message's
    server-side `fallbacks` entries may each name a `max_tokens` for the attempt on their
    model, in place of the request's: a larger one is the cap (the answer may be theirs)."""
    cap = _largest(document, _CAPS, _NESTED_CAPS, 0)
    fallbacks = document.get("fallbacks")
    if cap and isinstance(fallbacks, list):
        for entry in fallbacks:
            if isinstance(entry, dict):
                cap = _largest(entry, _CAPS, (), cap)
    return cap or None


def _largest(
    document: dict[str, Any],
    names: frozenset[str],
    nested: tuple[tuple[str, str], ...],
    least: int,
) -> int:
    """The largest count (`_whole`) under `names` at the top, in any case (Go's
    encoding/json), or under a (parent, name) of `nested`; `least` when none is larger."""
    most = least
    for name, value in document.items():
        if name.casefold() in names:
            whole = _whole(value)
            if whole is not None and whole > most:
                most = whole
    for parent, name in nested:
        holder = document.get(parent)
        whole = _whole(holder.get(name)) if isinstance(holder, dict) else None
        if whole is not None and whole > most:
            most = whole
    return most


# Gemini's and Vertex's `n`: candidates, each up to maxOutputTokens (either spelling).
_NESTED_COUNTS = (
    ("generationConfig", "candidateCount"),
    ("generation_config", "candidate_count"),
)
# The most answers a prompt asks for: OpenAI's bound on `n` (its provider refuses more).
_MOST_ANSWERS = 128


def _answers(document: dict[str, Any]) -> int:
    """How many answers the body asks to be generated: `n`, or `best_of` when larger (in any
    case), or Gemini's `candidateCount`, for each prompt of a text completion's list of
    prompts (strings, or lists of tokens)."""
    count = min(_largest(document, _COUNTS, _NESTED_COUNTS, 1), _MOST_ANSWERS)
    prompt = document.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        count *= len(prompt)  # (a list of integers is one prompt, in tokens)
    return count


# The largest count read: more than any provider generates, and where the tracker's sums
# stay exact (window.MAX_COUNT).
_MOST_COUNT = 2**53
# Digits past this many are no count a provider takes (and int() refuses past 4,300).
_MOST_DIGITS = 18


def _whole(value: Any) -> int | None:
    """A count as the most lenient servers read it (pydantic's lax integers, under vLLM and
    SGLang): an integer, a float without a fraction (5000.0, 5e3), a string of digits
    ("5000"); None for anything else, a bool too (a flag, not a count). At most
    `_MOST_COUNT`: a float's whole number (1.7e308) is past what the reservation's price,
    a float, can hold."""
    if isinstance(value, int):
        return None if isinstance(value, bool) else min(value, _MOST_COUNT)
    if isinstance(value, float):
        return min(int(value), _MOST_COUNT) if value.is_integer() else None
    if isinstance(value, str):
        digits = value.strip()
        if digits.isascii() and digits.isdigit() and len(digits) <= _MOST_DIGITS:
            return min(int(digits), _MOST_COUNT)
    return None


def _document(tail: str, needs_json: bool, content_type: str, body: bytes) -> dict[str, Any] | None:
    """The JSON object a body holds, None for another body. Raises 400 where JSON is due
    (`needs_json`: a POST to chat or messages)."""
    declared_json = content_type.endswith(_JSON_TYPES)
    if not body or not (declared_json or body.lstrip()[:1] == b"{"):
        if needs_json:
            raise GatewayError(
                400,
                "missing_field",
                "The request body must be a JSON object with 'model' and 'messages'.",
                "model",
            )
        return None
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        if declared_json or tail in _NEEDS_MODEL_AND_MESSAGES:
            raise GatewayError(
                400, "invalid_json", f"The request body is not valid JSON: {error}."
            ) from None
        return None  # not declared JSON: an opaque body the provider will judge
    if not isinstance(document, dict):
        if tail in _NEEDS_MODEL_AND_MESSAGES:
            raise GatewayError(400, "invalid_json", "The request body must be a JSON object.")
        return None
    return document


def _opens_object(body: bytes) -> bool:
    """The body opens as a JSON object, after whitespace or a UTF-8 BOM (which Python's
    json.loads skips: a provider may read it as JSON)."""
    return body.lstrip().removeprefix(_BOM).lstrip()[:1] == b"{"


def _check_readable(body: bytes, content_type: str) -> None:
    """A body of a generation or an embedding that the gateway read as no JSON object (not
    labelled JSON, and not strict UTF-8 JSON: NaN, a BOM, UTF-16, a comment), for a key that
    reserves: lenient servers may read it all the same (Python's json.loads takes the first
    three, and FastAPI reads a body without Content-Type as JSON), generating what the
    gateway reserved nothing for. Raises 400, unless it is a form (the provider's to judge)."""
    if content_type in named.FORM_TYPES and not _opens_object(body):
        return
    raise GatewayError(
        400,
        "invalid_json",
        "The request body is not JSON the gateway can read: send a JSON object in UTF-8, "
        "without a byte order mark, NaN, Infinity or comments.",
    )


def check_said_once(body: bytes, document: dict[str, Any], key: VirtualKey) -> None:
    """No object of the body names twice a field the gateway decides on for this key: the
    provider's parser may read the other one. Raises 400 duplicate_field.

    Each name is counted in the bytes only where this key's checks read it (and, but for
    the model, only when the body names it), and the body is parsed again, object by
    object, only when a name comes up twice or may be spelt with escapes."""
    names: list[str] = []
    deciding = _DECIDING
    if key.allowed_models is not None:
        names.append("model")  # counted nested too: an image tool's, an advisor's, ...
        if "modelId" in document:
            names.append("modelId")
        if isinstance(document.get("model"), dict):  # a model config object's `id` is read
            names.append("id")
            deciding = _DECIDING_WITH_ID
        names += (name for name in _MODEL_HOLDERS if name in document)
    if key.reserves:
        names += (name for name in _RESERVED_FIELDS if name in document)
        nested = (*_NESTED_CAPS, *_NESTED_COUNTS)
        names += (name for parent, name in nested if parent in document)
    if key.cache is not None:
        names += (name for name in _CACHED_FIELDS if name in document)
    if not names:
        return
    if not _ESCAPED_LETTER.search(body) and all(body.count(_QUOTED[name]) < 2 for name in names):
        return
    try:
        json.loads(body, object_pairs_hook=partial(_refuse_repeats, deciding))
    except _Repeated as repeated:
        name = repeated.args[0]
        raise GatewayError(
            400,
            "duplicate_field",
            f"The request body names '{name}' more than once in one object; JSON parsers "
            "disagree on which one counts, so the gateway does not pass it on. Name it once.",
            name,
        ) from None
    except (ValueError, RecursionError):
        # orjson read it; Python's parser nests less deep (about 1,000 levels)
        raise GatewayError(
            400, "invalid_json", "The request body is nested too deeply to be checked."
        ) from None


class _Repeated(Exception):
    """An object of the body names a deciding field twice (its name the argument)."""


def _refuse_repeats(deciding: frozenset[str], pairs: list[tuple[str, Any]]) -> None:
    """`json.loads`' hook for each object read: raises _Repeated for a field of `deciding`
    named twice. Returns nothing: the parsed body is orjson's."""
    if len(pairs) < 2:
        return
    seen: set[str] = set()
    for name, _ in pairs:
        if name in deciding:
            if name in seen:
                raise _Repeated(name)
            seen.add(name)


def _check_chat(document: dict[str, Any]) -> None:
    """Chat and messages need a model and messages: a 400 here, not a round trip upstream."""
    model = document.get("model")
    if not isinstance(model, str) or not model.strip():
        raise GatewayError(400, "missing_field", "'model' must be a non-empty string.", "model")
    messages = document.get("messages")
    if not isinstance(messages, list) or not messages:
        raise GatewayError(
            400, "missing_field", "'messages' must be a non-empty array.", "messages"
        )
