"""The OpenAI Responses API: its usage, text and stored response, in bodies and streams.

Answers are a `response` object (a JSON body, or in a stream the `response` of its
`response.*` events): `output` items hold what was generated, `usage` is {input_tokens,
output_tokens, input_tokens_details {cached_tokens}, output_tokens_details
{reasoning_tokens}}, details parts of the totals; beside it `tool_usage` counts the
web_search calls billed on top (`web_search.num_requests`); Perplexity's Agent API counts its
own in the usage, `tool_calls_details.search_web.invocation`. A stream's final usage comes with
`response.completed` (or `.incomplete`, `.failed`); its text with
`response.output_text.delta`, and what else the model generates (refusals, tool calls'
names and arguments, reasoning text and summaries, code, audio transcripts) with their
own deltas: each counted for an estimate, none kept as the logged text. The object's id
and status are noted for a background response's charge (`background.py`): when it
finishes, and for a background stream already when it starts (`response.created`,
`.queued`, `.in_progress`), so a stream cut before its end is owed, not forgotten; of an
answer too large to parse whole, from its head (`read_head`: the object's own `id` and
`status` come before its `output`).

A request's prompt (`prompt_chars`, for the estimate and the reservation; a WebSocket
turn's `response.create` too): its `instructions`, its `input` (a string, or items:
messages' text parts, earlier tool calls' names, arguments and input, tool outputs,
reasoning summaries), its `tools`' definitions and a stored prompt's `variables`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import orjson

from proxy.record import Usage
from proxy.usage import estimate
from proxy.usage.provider_usage import (
    CACHE_READ,
    CACHE_WRITE,
    COMPLETION,
    INPUT_AUDIO,
    OUTPUT_AUDIO,
    PROMPT,
    REASONING,
    TOTAL,
    WEB_SEARCHES,
    UsageFields,
    added,
    last_usage,
    top_level_strings,
)
from proxy.usage.reading import Reading

USAGE = UsageFields(
    counts=(("input_tokens", PROMPT), ("output_tokens", COMPLETION), ("total_tokens", TOTAL)),
    details=(
        ("input_tokens_details", "cached_tokens", CACHE_READ),
        ("input_tokens_details", "cache_write_tokens", CACHE_WRITE),
        ("input_tokens_details", "audio_tokens", INPUT_AUDIO),
        ("output_tokens_details", "reasoning_tokens", REASONING),
        ("output_tokens_details", "audio_tokens", OUTPUT_AUDIO),
    ),
    # Perplexity's Agent API: its web_search tool's calls, each billed.
    nested=(("tool_calls_details", "search_web", "invocation", WEB_SEARCHES),),
)
# Hosted tools' usage, beside `usage` in the object: the web_search calls billed (each
# priced per thousand). Its image_gen tokens are the image model's, not read.
TOOL_USAGE = UsageFields(counts=(), details=(("web_search", "num_requests", WEB_SEARCHES),))
_TOOL_USAGE_KEY = re.compile(rb'"tool_usage"\s*:\s*')


def _text_delta(event: dict[str, Any], reading: Reading) -> None:
    reading.add_text(event.get("delta"))


def _generated_delta(event: dict[str, Any], reading: Reading) -> None:
    reading.add_generated(event.get("delta"))


def _item_added(event: dict[str, Any], reading: Reading) -> None:
    """An output item begins: a tool call's name comes whole here, its arguments as deltas."""
    item = event.get("item")
    if isinstance(item, dict) and is_one_of(item.get("type"), _CALLS):
        reading.add_generated(item.get("name"))


def _finished(event: dict[str, Any], reading: Reading) -> None:
    """The final `response`, with its usage: the stream's last event (Codex stops reading
    there)."""
    reading.is_ended = True
    response = event.get("response")
    if isinstance(response, dict):
        reading.note_model(response.get("model"))
        reading.note_tier(response.get("service_tier"))
        reading.reported.read(response.get("usage"), USAGE)
        reading.reported.read(response.get("tool_usage"), TOOL_USAGE)
        if reading.is_stored_noted:
            reading.note_stored(response)
        if response.get("status") == "failed":
            reading.note_error(response.get("error"))


def _started(event: dict[str, Any], reading: Reading) -> None:
    """A `response` still running: noted for a background stream, owed if it is cut."""
    response = event.get("response")
    if reading.is_started_noted and isinstance(response, dict):
        reading.note_stored(response)


# Output items that call a tool: their name, and their arguments or input, are generated.
_CALLS = frozenset({"function_call", "custom_tool_call", "mcp_call"})


def is_one_of(kind: object, kinds: frozenset[str]) -> bool:
    """Whether a provider's `type` is one of `kinds`: a string, not a list or an object
    (unhashable: `in` a frozenset would raise, and a tap never raises)."""
    return type(kind) is str and kind in kinds


# The stream events read, by type; every other type carries nothing metered (a `.done`
# event repeats what its deltas said).
EVENTS: Mapping[str, Callable[[dict[str, Any], Reading], None]] = {
    "response.output_text.delta": _text_delta,
    "response.refusal.delta": _generated_delta,
    "response.function_call_arguments.delta": _generated_delta,
    "response.custom_tool_call_input.delta": _generated_delta,
    "response.mcp_call_arguments.delta": _generated_delta,
    "response.code_interpreter_call_code.delta": _generated_delta,
    "response.reasoning_text.delta": _generated_delta,
    "response.reasoning_summary_text.delta": _generated_delta,
    "response.audio.transcript.delta": _generated_delta,
    "response.output_item.added": _item_added,
    "response.completed": _finished,
    "response.incomplete": _finished,
    "response.failed": _finished,
    "response.created": _started,
    "response.queued": _started,
    "response.in_progress": _started,
}


# Events that end a response, with its usage (or without, from a provider that sends none).
_FINISHED = frozenset(kind for kind, read in EVENTS.items() if read is _finished)


class OnResponse(Protocol):
    """Told each response's usage as it ends, with the OpenAI service tier that served it
    ("priority", "flex": priced at its own rates; None: not said) and the model the provider
    says ran it (`answered`, priced first as an HTTP answer's is; None: not said)."""

    def __call__(
        self, usage: Usage, *, service_tier: str | None = None, answered: str | None = None
    ) -> None: ...


class SocketUsage:
    """The usage of a WebSocket-mode session (`/v1/responses`): each response's charged as
    its `response.completed` (`.incomplete`, `.failed`) arrives, all summed; a response that
    ends without usage, or is cut by the session's end, is estimated from what it generated.

    Responses multiplexed on one socket (`stream_id`) share the estimate's count: a response
    finishing with its usage also clears what another still running generated so far.

    `on_begun` is told each `response.created` (a turn the provider runs), `on_error` each
    `error` event (the provider refusing a turn it will not run, or another client event):
    what the session's turns need to settle a refused turn at once (`realtime.turns`).
    """

    __slots__ = ("_model", "_on_begun", "_on_error", "_on_response", "_reading", "_total")

    def __init__(
        self,
        on_response: OnResponse,
        on_begun: Callable[[], None] = lambda: None,
        on_error: Callable[[], None] = lambda: None,
    ) -> None:
        self._on_response = on_response
        self._on_begun, self._on_error = on_begun, on_error
        self._reading = Reading(keep_text=False)
        self._total: Usage | None = None
        self._model: str | None = None  # the first the provider says ran a response

    def read(self, frame: bytes) -> None:
        """One provider text frame (one event), already sent on; most are read for a delta."""
        if (
            frame.find(b'.delta"') < 0
            and frame.find(b'"usage"') < 0
            and frame.find(b'"error"') < 0
            and frame.find(b"response.created") < 0
        ):
            return  # an item or part begins or ends: nothing metered
        try:
            event = orjson.loads(frame)
        except orjson.JSONDecodeError:
            return
        if isinstance(event, dict):
            self.read_event(event)

    def read_event(self, event: dict[str, Any]) -> None:
        """One event, parsed (`read`; a Live session's delegated Responses events)."""
        kind = event.get("type")
        if kind == "error":
            self._on_error()
            return
        read = EVENTS.get(kind) if type(kind) is str else None
        if read is None:
            return
        read(event, self._reading)
        if kind in _FINISHED:
            self._charge()
        elif kind == "response.created":
            self._on_begun()

    def finish(self) -> None:
        """At the session's end: a response cut before it finished is estimated."""
        if self._reading.chars:
            self._charge()

    def _charge(self) -> None:
        reading, self._reading = self._reading, Reading(keep_text=False)
        usage = reading.reported.usage()
        if usage is None:  # none reported: what it generated (the prompt is the provider's)
            usage = Usage(0, estimate.tokens(reading.chars), estimated=True)
        self._total = usage if self._total is None else added(self._total, usage)
        if self._model is None:
            self._model = reading.model
        self._on_response(usage, service_tier=reading.service_tier, answered=reading.model)

    @property
    def total(self) -> Usage | None:
        """The session's usage; None when no response finished and nothing was generated."""
        return self._total

    @property
    def model(self) -> str | None:
        """The model the provider says ran the session's first response; None: none said."""
        return self._model


_STORED_FIELDS = frozenset(("id", "status"))


def read_head(head: bytes | bytearray, reading: Reading) -> None:
    """The first bytes of a JSON answer too large to parse whole: a `response` object's id
    and status (its usage is read from the tail), for a background response's charge."""
    reading.note_stored(top_level_strings(head, _STORED_FIELDS))


def read_tail(tail: bytes | bytearray, reading: Reading) -> None:
    """The end of an answer too large to parse whole (its `usage` read already): its hosted
    tools' usage, beside it."""
    reading.reported.read(last_usage(tail, _TOOL_USAGE_KEY), TOOL_USAGE)


def read_answer(document: dict[str, Any], reading: Reading) -> None:
    """One JSON answer: a `response` object."""
    reading.note_model(document.get("model"))
    reading.note_tier(document.get("service_tier"))
    reading.reported.read(document.get("usage"), USAGE)
    reading.reported.read(document.get("tool_usage"), TOOL_USAGE)
    if reading.is_stored_noted:
        reading.note_stored(document)
    if reading.reported.is_reported:
        return  # only an estimate needs the answer's length
    output = document.get("output")
    if isinstance(output, list):
        for item in output:
            if isinstance(item, dict):
                _read_item(item, reading)


def _read_item(item: dict[str, Any], reading: Reading) -> None:
    """Every string an output item holds that the model generated."""
    kind = item.get("type")
    if kind == "message":  # output_text parts' text, refusal parts' refusal
        for part in _dicts(item.get("content")):
            reading.add_generated(part.get("text"))
            reading.add_generated(part.get("refusal"))
    elif is_one_of(kind, _CALLS):
        for field in ("name", "arguments", "input"):
            reading.add_generated(item.get(field))
    elif kind == "reasoning":  # its summary, and its text where the provider shows it
        for part in (*_dicts(item.get("summary")), *_dicts(item.get("content"))):
            reading.add_generated(part.get("text"))
    elif kind == "code_interpreter_call":
        reading.add_generated(item.get("code"))


def prompt_chars(document: dict[str, Any]) -> int:
    """Characters of a request's prompt, every string of it (images and files not counted)."""
    chars = _input_chars(document.get("instructions")) + _input_chars(document.get("input"))
    chars += estimate.json_chars(document.get("tools"))
    prompt = document.get("prompt")  # a stored prompt: its variables are text of the prompt
    variables = prompt.get("variables") if isinstance(prompt, dict) else None
    if isinstance(variables, dict):
        chars += sum(_parts_chars(value) for value in variables.values())
    return chars


# What an input item holds of the prompt: strings, or lists of parts.
_ITEM_STRINGS = ("name", "arguments", "input", "code", "text", "refusal")
_ITEM_PARTS = ("content", "output", "summary")


def _input_chars(value: object) -> int:
    """`input` or `instructions`: a string, or a list of items."""
    if isinstance(value, str):
        return len(value)
    chars = 0
    for item in _dicts(value):
        chars += sum(estimate.string_chars(item.get(field)) for field in _ITEM_STRINGS)
        chars += sum(_parts_chars(item.get(field)) for field in _ITEM_PARTS)
    return chars


def _parts_chars(value: object) -> int:
    """A string, a part, or a list of parts (input_text, output_text, refusal, summary…)."""
    if isinstance(value, str):
        return len(value)
    return sum(
        estimate.string_chars(part.get("text")) + estimate.string_chars(part.get("refusal"))
        for part in _dicts([value] if isinstance(value, dict) else value)
    )


def _dicts(value: object) -> list[dict[str, Any]]:
    return [each for each in value if isinstance(each, dict)] if isinstance(value, list) else []
