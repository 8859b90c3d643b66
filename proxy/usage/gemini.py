"""Gemini's native API (generateContent), on Vertex AI or Google AI: usage, text, prompt.

An answer (a JSON body; each event of `:streamGenerateContent`, as SSE with `alt=sse` or
as one JSON array without) holds `candidates[].content.parts[]` and `usageMetadata`
{promptTokenCount, candidatesTokenCount, thoughtsTokenCount, cachedContentTokenCount,
toolUsePromptTokenCount}. Gemini counts thoughts beside the candidates and a tool's prompt
beside the prompt: the completion is candidates plus thoughts (thoughts its reasoning), the
prompt is prompt plus tool-use prompt (cached content a part of it). The details by modality
(`promptTokensDetails`, `toolUsePromptTokensDetails`, `candidatesTokensDetails`,
`cacheTokensDetails`; an embedding's `promptTokenDetails`) give the parts some models bill at rates of their own: AUDIO as audio,
IMAGE and DOCUMENT as images, VIDEO as video (an image model's output images, a flash model's
input and cached audio, gemini-embedding-2's video, an Omni model's); cached video and TEXT
stay at the cache's and the plain rates. Grounding with Google Search is
billed beside the tokens: per search query (a candidate's `groundingMetadata.webSearchQueries`)
on Gemini 3 and later, per grounded prompt on 2.5 and earlier (by the answer's
`modelVersion`): counted as web searches. Proto JSON leaves out
a count of 0. A stream's counts are cumulative: a `usageMetadata` is taken as the answer's
from an event only when it counts candidates or thoughts; one that counts only the prompt
(Vertex sends that until the last event) is provisional: a stream cut after it is charged
that prompt and at least the completion it delivered, estimated. The stream's last event is
the one whose candidate says why it finished (`finishReason`) with the whole usage (or with
none, from a provider that reports none): a client that leaves after it has the whole answer. A JSON body's is its
answer's (of a body over 1 MiB, an answer with inline images, the last `usageMetadata` in
its tail, taken as a stream event's). The model that answered is `modelVersion`.

What the model generated, counted for an estimate when no usage comes: parts' `text` (a
thought's too, not kept as the logged text), `functionCall` names and `args`, and
`executableCode`. A request's prompt (`prompt_chars`): `contents[].parts[]` (text,
function calls and responses, code and its results), `systemInstruction` and the `tools`'
declarations; an embedding's (`embedded_chars`): the `content` of an embedContent request, of
each of a batchEmbedContents' `requests`, and their `title`. Proto JSON takes camelCase and
snake_case names alike: both are read.
"""

from __future__ import annotations

import re
from typing import Any

from proxy.usage import estimate
from proxy.usage.provider_usage import (
    CACHE_AUDIO_READ,
    CACHE_IMAGE_READ,
    CACHE_READ,
    COMPLETION,
    INPUT_AUDIO,
    INPUT_IMAGE,
    INPUT_VIDEO,
    OUTPUT_AUDIO,
    OUTPUT_IMAGE,
    OUTPUT_VIDEO,
    PROMPT,
    REASONING,
    WEB_SEARCHES,
    UsageFields,
)
from proxy.usage.reading import Reading

# usageMetadata's counts summed into the gateway's kinds (`_read_usage`), read by these.
_SUMMED = UsageFields(
    counts=(
        ("prompt", PROMPT),
        ("completion", COMPLETION),
        ("reasoning", REASONING),
        ("cache_read", CACHE_READ),
        ("input_audio", INPUT_AUDIO),
        ("input_image", INPUT_IMAGE),
        ("output_audio", OUTPUT_AUDIO),
        ("output_image", OUTPUT_IMAGE),
        ("input_video", INPUT_VIDEO),
        ("output_video", OUTPUT_VIDEO),
        ("cache_audio_read", CACHE_AUDIO_READ),
        ("cache_image_read", CACHE_IMAGE_READ),
    )
)
# Parts' fields in both spellings proto JSON takes.
_FUNCTION_CALL = ("functionCall", "function_call")
_FUNCTION_RESPONSE = ("functionResponse", "function_response")
_CODE = ("executableCode", "executable_code")
_CODE_RESULT = ("codeExecutionResult", "code_execution_result")
_SYSTEM = ("systemInstruction", "system_instruction")
_USAGE = ("usageMetadata", "usage_metadata")
# Where a JSON answer too large to parse whole keeps its usage (`provider_usage.last_usage`).
USAGE_KEY = re.compile(rb'"(?:usageMetadata|usage_metadata)"\s*:\s*')
_PROMPT = ("promptTokenCount", "prompt_token_count")
_TOOL_PROMPT = ("toolUsePromptTokenCount", "tool_use_prompt_token_count")
_CANDIDATES = ("candidatesTokenCount", "candidates_token_count")
_THOUGHTS = ("thoughtsTokenCount", "thoughts_token_count")
_CACHED = ("cachedContentTokenCount", "cached_content_token_count")
# The counts by modality ([{modality, tokenCount}]): of the prompt (and the tool-use prompt's,
# a part of it), the candidates and the cached content; the modalities priced at rates of
# their own, by the summed kind's prefix (DOCUMENT as images, as genai-prices takes it).
_PROMPT_DETAILS = (
    ("promptTokensDetails", "prompt_tokens_details"),
    ("toolUsePromptTokensDetails", "tool_use_prompt_tokens_details"),
    ("promptTokenDetails", "prompt_token_details"),  # an embedding's (EmbeddingUsageMetadata)
)
_CANDIDATES_DETAILS = ("candidatesTokensDetails", "candidates_tokens_details")
_CACHE_DETAILS = ("cacheTokensDetails", "cache_tokens_details")
_TOKEN_COUNT = ("tokenCount", "token_count")
_MODALITIES = {"AUDIO": "audio", "IMAGE": "image", "DOCUMENT": "image", "VIDEO": "video"}
# Grounding with Google Search: a candidate's `groundingMetadata.webSearchQueries`, billed
# per query, but per grounded prompt (one an answer) by the models matching `_PER_PROMPT`.
_GROUNDING = ("groundingMetadata", "grounding_metadata")
_QUERIES = ("webSearchQueries", "web_search_queries")
_PER_PROMPT = re.compile(r"gemini-[12]\.")
_SEARCHES = UsageFields(counts=(("web_searches", WEB_SEARCHES),))


def is_answer(document: dict[str, Any]) -> bool:
    """A generateContent answer (or stream event): candidates, or usage metadata."""
    return "candidates" in document or any(name in document for name in _USAGE)


def read_event(event: dict[str, Any], reading: Reading) -> None:
    """One stream event: a partial answer, its usage cumulative."""
    if reading.model is None:
        reading.note_model(event.get("modelVersion"))
    _read_usage(event, reading, is_final=False)
    _read_grounding(event, reading)
    if _read_candidates(event, reading) and not reading.is_usage_provisional:
        # Why the candidate finished, with the whole usage (or none at all): the last event.
        reading.is_ended = True


def read_answer(document: dict[str, Any], reading: Reading) -> None:
    """One JSON answer."""
    reading.note_model(document.get("modelVersion"))
    _read_usage(document, reading, is_final=True)
    _read_grounding(document, reading)
    if reading.reported.is_reported:
        return  # only an estimate needs the answer's length
    _read_candidates(document, reading)


def read_answers(answers: list[Any], reading: Reading) -> None:
    """A stream sent as one JSON array (no `alt=sse`): each element an event, or Google's
    error (`{"error": {"code", "message", "status"}}`: how the OpenAI-compatible API sends
    every error, in a list of one)."""
    for answer in answers:
        if not isinstance(answer, dict):
            continue
        if is_answer(answer):
            read_event(answer, reading)
        elif isinstance(answer.get("error"), dict):
            reading.note_error(answer["error"])


def prompt_chars(document: dict[str, Any]) -> int:
    """Characters of a generateContent request's prompt, every string of it."""
    contents = document.get("contents")
    chars = sum(_parts_chars(content) for content in _dicts(contents))
    for name in _SYSTEM:  # a Content, or (Google AI's) a plain string
        system = document.get(name)
        chars += estimate.string_chars(system) + _parts_chars(system)
    return chars + estimate.json_chars(document.get("tools"))


def embedded_chars(document: dict[str, Any]) -> int:
    """Characters an embedContent request embeds (its `content`, and `title`), or a
    batchEmbedContents request (each of its `requests`)."""
    chars = _parts_chars(document.get("content")) + estimate.string_chars(document.get("title"))
    for request in _dicts(document.get("requests")):
        chars += _parts_chars(request.get("content")) + estimate.string_chars(request.get("title"))
    return chars


def _parts_chars(content: object) -> int:
    """A Content's parts: text, function calls and responses, code and its results."""
    parts = content.get("parts") if isinstance(content, dict) else None
    chars = 0
    for part in _dicts(parts):
        chars += estimate.string_chars(part.get("text"))
        call = _either(part, _FUNCTION_CALL)
        if call is not None:
            chars += estimate.string_chars(call.get("name")) + estimate.json_chars(call.get("args"))
        answer = _either(part, _FUNCTION_RESPONSE)
        if answer is not None:
            chars += estimate.string_chars(answer.get("name"))
            chars += estimate.json_chars(answer.get("response"))
        code = _either(part, _CODE)
        if code is not None:
            chars += estimate.string_chars(code.get("code"))
        result = _either(part, _CODE_RESULT)
        if result is not None:
            chars += estimate.string_chars(result.get("output"))
    return chars


def _read_candidates(answer: dict[str, Any], reading: Reading) -> bool:
    """Every string the model generated in an answer's candidates; True: one of them says
    why it finished (its `finishReason`)."""
    is_finished = False
    for candidate in _dicts(answer.get("candidates")):
        if "finishReason" in candidate or "finish_reason" in candidate:
            is_finished = True
        content = candidate.get("content")
        parts = content.get("parts") if isinstance(content, dict) else None
        for part in _dicts(parts):
            text = part.get("text")
            if part.get("thought") is True:
                reading.add_generated(text)
            else:
                reading.add_text(text)
            call = _either(part, _FUNCTION_CALL)
            if call is not None:
                reading.add_generated(call.get("name"))
                reading.chars += estimate.json_chars(call.get("args"))
            code = _either(part, _CODE)
            if code is not None:
                reading.add_generated(code.get("code"))
    return is_finished


def _read_grounding(answer: dict[str, Any], reading: Reading) -> None:
    """The Google searches an answer's candidates made (a stream's last count stands)."""
    searches = 0
    for candidate in _dicts(answer.get("candidates")):
        grounding = _either(candidate, _GROUNDING)
        if grounding is not None:
            queries = next((grounding[name] for name in _QUERIES if name in grounding), None)
            searches += len(queries) if isinstance(queries, list) else 0
    if searches:
        if reading.model is not None and _PER_PROMPT.search(reading.model):
            searches = 1
        reading.reported.read({"web_searches": searches}, _SEARCHES)


def _read_usage(answer: dict[str, Any], reading: Reading, is_final: bool) -> None:
    metadata = _either(answer, _USAGE)
    if metadata is not None:
        read_usage(metadata, reading, is_final)


def read_usage(metadata: object, reading: Reading, is_final: bool = True) -> None:
    """usageMetadata, summed into the gateway's kinds (see the module's docstring)."""
    if not isinstance(metadata, dict):
        return
    prompt, tool_prompt = _count(metadata, _PROMPT), _count(metadata, _TOOL_PROMPT)
    candidates, thoughts = _count(metadata, _CANDIDATES), _count(metadata, _THOUGHTS)
    is_prompt_only = not is_final and candidates is None and thoughts is None
    if is_prompt_only:
        if reading.reported.is_reported and not reading.is_usage_provisional:
            return  # a full count came already: it stands
        # The prompt's count is final, the completion's still to come: a stream cut here is
        # charged that prompt and at least what it delivered (`Reading.is_usage_provisional`).
        reading.is_usage_provisional = True
    else:
        reading.is_usage_provisional = False
    summed = {
        "prompt": (prompt or 0) + (tool_prompt or 0),
        "completion": (candidates or 0) + (thoughts or 0),
        "reasoning": thoughts or 0,
        "cache_read": _count(metadata, _CACHED) or 0,
    }
    for names in _PROMPT_DETAILS:
        _add_modalities(metadata, names, "input_", summed)
    _add_modalities(metadata, _CANDIDATES_DETAILS, "output_", summed)
    _add_modalities(metadata, _CACHE_DETAILS, "cache_", summed, suffix="_read")
    reading.reported.read(summed, _SUMMED)


def _add_modalities(
    metadata: dict[str, Any],
    names: tuple[str, str],
    prefix: str,
    summed: dict[str, int],
    suffix: str = "",
) -> None:
    """A details list's counts of the modalities priced on their own, into `summed`."""
    details = next((metadata[name] for name in names if name in metadata), None)
    for detail in _dicts(details):
        modality = detail.get("modality")
        modality = _MODALITIES.get(modality) if isinstance(modality, str) else None
        count = _count(detail, _TOKEN_COUNT)
        if modality is not None and count:
            kind = prefix + modality + suffix
            summed[kind] = summed.get(kind, 0) + count


def _count(metadata: dict[str, Any], names: tuple[str, str]) -> int | None:
    """A count under either spelling; None when neither holds one."""
    for name in names:
        value = metadata.get(name)
        if type(value) is int and value >= 0:
            return value
    return None


def _either(document: dict[str, Any], names: tuple[str, str]) -> dict[str, Any] | None:
    """The object under either spelling of a name; None when neither holds one."""
    for name in names:
        value = document.get(name)
        if isinstance(value, dict):
            return value
    return None


def _dicts(value: object) -> list[dict[str, Any]]:
    return [each for each in value if isinstance(each, dict)] if isinstance(value, list) else []
