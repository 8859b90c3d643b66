"""Ollama's native API: its usage and text, in bodies and newline-delimited JSON streams.

Beside its OpenAI-compatible `/v1` (read as OpenAI's), Ollama serves its own API at its
root (a provider whose `base_url` has no `/v1`): `POST /api/chat` and `/api/generate`
stream unless the body says `"stream": false`, as newline-delimited JSON
(`application/x-ndjson`), one object a line: the text in `message.content` (chat; its
`thinking` and `tool_calls` beside it) or `response` (generate; `thinking` too), and in the
last line (`"done": true`) the counts: `prompt_eval_count` (the prompt's tokens evaluated)
and `eval_count` (the completion's), read only together (Ollama's releases of early 2024
left the prompt's out when the prompt was in its cache: the completion's alone would charge
the prompt nothing), else the answer is estimated. A whole answer (`"stream": false`) is that last line
with the whole text. `POST /api/embed` reports its input's `prompt_eval_count`; the older
`/api/embeddings` nothing. A failure is `{"error": "<a sentence>"}`: a string, not an
object, also as a stream's last line under its 200.

A request's prompt is read by its shape (`estimate.unknown_prompt_chars`: `messages`,
`prompt`, `system`, `input`), as for any API no dialect reads.
"""

from __future__ import annotations

from typing import Any

from proxy.usage import estimate
from proxy.usage.provider_usage import COMPLETION, PROMPT, UsageFields
from proxy.usage.reading import Reading

USAGE = UsageFields(counts=(("prompt_eval_count", PROMPT), ("eval_count", COMPLETION)))
# Paths (their ends) of the answers that generate, and of those that embed a prompt.
GENERATIONS = ("/api/chat", "/api/generate")
EMBEDDINGS = ("/api/embed", "/api/embeddings")
# The media type of its streams.
NDJSON = "application/x-ndjson"


def is_answer(document: dict[str, Any]) -> bool:
    """A whole answer of Ollama's own API: a generation (`done`, `created_at`), or an
    embedding (its `prompt_eval_count`)."""
    return ("done" in document and "created_at" in document) or "prompt_eval_count" in document


def read_line(event: dict[str, Any], reading: Reading) -> None:
    """One line of a stream, or a whole answer: its text, its counts, its error."""
    if reading.model is None:
        reading.note_model(event.get("model"))
    message = event.get("message")
    if isinstance(message, dict):
        reading.add_text(message.get("content"))
        reading.add_generated(message.get("thinking"))
        calls = message.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):  # its arguments are an object, not a string
                reading.add_generated(function.get("name"))
                reading.chars += estimate.json_chars(function.get("arguments"))
    reading.add_text(event.get("response"))
    reading.add_generated(event.get("thinking"))
    if event.get("done") is True:
        reading.is_ended = True
    if "prompt_eval_count" in event:  # a generation's last line, or an embedding
        reading.reported.read(event, USAGE)
    if "error" in event:
        reading.note_error(event["error"])
