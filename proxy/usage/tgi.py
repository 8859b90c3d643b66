"""Hugging Face Text Generation Inference (TGI), its native API: /generate, /generate_stream.

Beside its OpenAI-compatible Messages API (`/v1/chat/completions`, read as OpenAI's), TGI
answers its own `POST /generate` with `{"generated_text"}` and `POST /generate_stream` with
an event stream of `{"token": {"text", "special"}, "generated_text": null, "details": null}`,
one token each, the last carrying the whole `generated_text` again (not counted twice).
Counts come only when the request asks for `parameters.details`: `details.generated_tokens`
(the completion) and, in TGI 2 and later, `details.input_length` (the prompt); both are read
as the provider's usage, and only together (a completion alone would charge the prompt
nothing): otherwise the answer is estimated from its text. The Inference API's shape, a
JSON list of such answers, is read too. A request's prompt is its `inputs`
(`estimate.unknown_prompt_chars`).
"""

from __future__ import annotations

from typing import Any

from proxy.usage.provider_usage import COMPLETION, PROMPT, UsageFields
from proxy.usage.reading import Reading

USAGE = UsageFields(counts=(("input_length", PROMPT), ("generated_tokens", COMPLETION)))
# Paths (their ends) of the answers that generate.
GENERATIONS = ("/generate", "/generate_stream")


def is_answer(document: dict[str, Any]) -> bool:
    """A TGI answer (a whole one, or a stream's event): it names its `generated_text`."""
    return "generated_text" in document


def read_answer(document: dict[str, Any], reading: Reading) -> None:
    """A whole answer: its text, its details' counts."""
    reading.add_text(document.get("generated_text"))
    _read_details(document.get("details"), reading)


def read_answers(answers: list[Any], reading: Reading) -> None:
    """The Inference API's list of answers (one per input): texts only, estimated."""
    for answer in answers:
        if isinstance(answer, dict):
            reading.add_text(answer.get("generated_text"))


def read_event(event: dict[str, Any], reading: Reading) -> None:
    """A stream's event: its token's text; the last one's details (its text is the whole)."""
    token = event.get("token")
    if isinstance(token, dict) and token.get("special") is not True:
        reading.add_text(token.get("text"))
    if event.get("generated_text") is not None:
        reading.is_ended = True
        _read_details(event.get("details"), reading)


def _read_details(details: object, reading: Reading) -> None:
    if isinstance(details, dict) and "input_length" in details:
        reading.reported.read(details, USAGE)
