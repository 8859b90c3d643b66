"""llama.cpp's server, its native API: usage and text of /completion and /infill.

Beside its OpenAI-compatible `/v1` (read as OpenAI's: a stream's usage, with `timings`, in
its finishing chunk), llama.cpp's server (llama-server) answers its own `POST /completion`
(also spelt `/completions` at its root) and `/infill` with result objects: the text in
`content`, the counts in `tokens_evaluated` (the prompt's tokens) and `tokens_predicted` (the
completion's), `stop` true on the last. `"stream": true` makes it an event stream of such
objects (`data:` lines, no `type`, no `[DONE]`), each with the running counts (the last
value wins, as for every stream; older builds sent them only in the last event). Several
prompts answer a JSON list of results (their `index`), each counted. `/tokenize`, `/detokenize` and `/embedding` generate nothing.

A request's prompt (`prompt`, `input_prefix`, `input_suffix`, `input_extra` chunks' `text`)
is read by its shape (`estimate.unknown_prompt_chars`): `prompt` only.
"""

from __future__ import annotations

from typing import Any

from proxy.usage.provider_usage import COMPLETION, PROMPT, UsageFields
from proxy.usage.reading import Reading

USAGE = UsageFields(counts=(("tokens_evaluated", PROMPT), ("tokens_predicted", COMPLETION)))
# Paths (their ends) of the answers that generate (`/completions` is OpenAI's already).
GENERATIONS = ("/completion", "/infill")


def is_answer(document: dict[str, Any]) -> bool:
    """A result object of llama.cpp's own API (a whole answer, or a stream's event; in older
    builds (2024) a partial one held only `content`, `stop` and its slot, the counts only
    the last)."""
    return "tokens_predicted" in document or ("stop" in document and "content" in document)


def read_answer(result: dict[str, Any], reading: Reading) -> None:
    """One result object: a whole answer, or a stream's event (its counts running)."""
    if reading.model is None:
        reading.note_model(result.get("model"))
    reading.add_text(result.get("content"))
    reading.reported.read(result, USAGE)
    if result.get("stop") is True:
        reading.is_ended = True


def read_answers(results: list[Any], reading: Reading) -> None:
    """Several prompts' results (a JSON list): each one's counts added to the others'."""
    prompt = completion = 0
    for result in results:
        if isinstance(result, dict):
            reading.add_text(result.get("content"))
            evaluated, predicted = result.get("tokens_evaluated"), result.get("tokens_predicted")
            prompt += evaluated if type(evaluated) is int and evaluated >= 0 else 0
            completion += predicted if type(predicted) is int and predicted >= 0 else 0
            if reading.model is None:
                reading.note_model(result.get("model"))
    reading.reported.read({"tokens_evaluated": prompt, "tokens_predicted": completion}, USAGE)
