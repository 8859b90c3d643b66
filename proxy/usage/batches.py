"""Batches: which answers are batches, what a batch says, and what its output used.

OpenAI (`/v1/batches`): a POST makes a batch of requests (a JSONL file uploaded before);
GET /v1/batches/{id} and POST /v1/batches/{id}/cancel answer the batch object (`"object":
"batch"`): its `status` (validating, in_progress, finalizing, completed, failed, expired,
cancelling, cancelled), its `output_file_id` once it ended, and on batches made since
September 2025 its own `usage` (the Responses API's fields) and `model`. Its output file
(GET /v1/files/{id}/content) holds one JSON line per request answered: `response.body` is
that endpoint's answer with its `usage` and `model` (chat completions, completions and
embeddings in their fields, Responses in its own).

Anthropic (`/v1/messages/batches`): a POST makes a batch of `requests`; GET
/v1/messages/batches/{id} and POST .../cancel answer it (`"type": "message_batch"`): its
`processing_status` (in_progress, canceling, ended) and `results_url` once ended. Its
results (GET /v1/messages/batches/{id}/results) hold one JSON line per request:
`result.type` succeeded (`result.message` with its `usage` and `model`), errored,
canceled or expired; only succeeded requests are billed.

`Output` reads an output file as its bytes arrive, one line at a time: it holds at most one
unfinished line (a line over MAX_LINE_BYTES is skipped, and counted as such), and sums the
usage by the model each line names. A list of batches (GET /v1/batches) is not read: a
batch is seen by its id. Where the charge is decided: `batch_charges`.
"""

from __future__ import annotations

import enum
import re

import orjson

from proxy.record import Batch, Usage
from proxy.usage import anthropic, openai_chat, responses
from proxy.usage.provider_usage import ProviderUsage, UsageFields, added

OPENAI, ANTHROPIC = "openai", "anthropic"
# One line of an output file, at most: a line past it (no answer is near that) is skipped.
MAX_LINE_BYTES = 16 * 1024 * 1024
# Ids that go into a URL path the gateway asks itself: a provider's own, never a path.
_ID = re.compile(r"[A-Za-z0-9_\-]{1,200}")
# OpenAI batches that ended; "failed" ran nothing (its input did not validate).
_OPENAI_ENDED = frozenset(("completed", "expired", "cancelled", "failed"))
_NL = b"\n"


class Call(enum.Enum):
    """What a request does to a batch."""

    MAKE = "make"  # POST /v1/batches, POST /v1/messages/batches
    SEE = "see"  # GET one batch by its id, or cancel it


def call(method: str, path: str) -> Call | None:
    """What `method path` does to a batch; None: nothing (not a batch, or a list)."""
    if path.endswith("/batches"):
        return Call.MAKE if method == "POST" else None
    if method == "POST" and path.endswith("/cancel"):
        path = path[:-7]
    elif method != "GET":
        return None
    parent, _, batch_id = path.rpartition("/")
    return Call.SEE if batch_id and parent.endswith("/batches") else None


def read_batch(document: dict[str, object], is_new: bool) -> Batch | None:
    """The batch an answer holds; None when it holds none (an error, another object)."""
    batch_id = document.get("id")
    if not isinstance(batch_id, str) or _ID.fullmatch(batch_id) is None:
        return None
    if document.get("type") == "message_batch":
        is_ended = document.get("processing_status") == "ended"
        return Batch(batch_id, ANTHROPIC, is_new, is_ended)
    if document.get("object") != "batch":
        return None
    output = document.get("output_file_id")
    model = document.get("model")
    usage = ProviderUsage()
    usage.read(document.get("usage"), responses.USAGE)
    return Batch(
        batch_id,
        OPENAI,
        is_new,
        responses.is_one_of(document.get("status"), _OPENAI_ENDED),
        output if isinstance(output, str) and _ID.fullmatch(output) else None,
        usage.usage(),
        model[:200] if isinstance(model, str) and model else None,
    )


def output_tail(batch: Batch) -> str | None:
    """Where the batch's output is, under the provider's base URL; None: it has none."""
    if batch.dialect == ANTHROPIC:
        return f"messages/batches/{batch.id}/results"
    if batch.output_file_id is None:
        return None
    return f"files/{batch.output_file_id}/content"


class Output:
    """The usage of a batch's output by model (None: a line naming none), fed as it arrives."""

    __slots__ = ("_held", "_is_skipping", "_reader", "by_model", "lines", "skipped")

    def __init__(self, dialect: str) -> None:
        self._reader = _read_anthropic if dialect == ANTHROPIC else _read_openai
        self._held = bytearray()  # the unfinished last line
        self._is_skipping = False  # inside a line past MAX_LINE_BYTES, until its end
        self.by_model: dict[str | None, Usage] = {}
        self.lines = 0  # requests whose usage was read
        self.skipped = 0  # lines past MAX_LINE_BYTES, not read

    def feed(self, data: bytes) -> None:
        """The next bytes of the output file."""
        start = 0
        while (end := data.find(_NL, start)) >= 0:
            if self._is_skipping:
                self._is_skipping = False
            elif self._held:
                self._held += data[start:end]
                self._line(self._held)
                self._held = bytearray()
            else:
                self._line(data[start:end])
            start = end + 1
        if self._is_skipping or start == len(data):
            return
        if len(self._held) + len(data) - start > MAX_LINE_BYTES:
            self._held, self._is_skipping = bytearray(), True
            self.skipped += 1
            return
        self._held += data[start:]

    def end(self) -> dict[str | None, Usage]:
        """The usage by model, once the whole file was fed (a last line without its end too)."""
        if self._held:
            self._line(self._held)
            self._held = bytearray()
        return self.by_model

    def _line(self, line: bytes | bytearray) -> None:
        if len(line) > MAX_LINE_BYTES:
            self.skipped += 1
            return
        try:
            document = orjson.loads(line)
        except orjson.JSONDecodeError:
            return  # a blank line, or not JSON: no answer to count
        if not isinstance(document, dict):
            return
        found = self._reader(document)
        if found is None:
            return
        model, usage = found
        self.lines += 1
        held = self.by_model.get(model)
        self.by_model[model] = usage if held is None else added(held, usage)


def _read_openai(line: dict[str, object]) -> tuple[str | None, Usage] | None:
    """`response.body`: the endpoint's answer, with its usage and model."""
    response = line.get("response")
    body = response.get("body") if isinstance(response, dict) else None
    if not isinstance(body, dict):
        return None  # a request that failed: its error, no usage
    usage = body.get("usage")
    fields = responses.USAGE if isinstance(usage, dict) and "input_tokens" in usage else None
    return _read(body, fields or openai_chat.USAGE)


def _read_anthropic(line: dict[str, object]) -> tuple[str | None, Usage] | None:
    """`result.message` of a succeeded request; errored, canceled, expired: not billed."""
    result = line.get("result")
    if not isinstance(result, dict) or result.get("type") != "succeeded":
        return None
    message = result.get("message")
    return _read(message, anthropic.USAGE) if isinstance(message, dict) else None


def _read(answer: dict[str, object], fields: UsageFields) -> tuple[str | None, Usage] | None:
    reported = ProviderUsage()
    reported.read(answer.get("usage"), fields)
    usage = reported.usage()
    if usage is None:
        return None
    model = answer.get("model")
    return (model[:200] if isinstance(model, str) and model else None), usage
