"""A request's prompt in characters, read by the dialect of the endpoint it is sent to.

What admission reserves (`peek`) and what an answer without usage is charged (`usage`)
count every string of the prompt; where each string sits is its dialect's knowledge, one
module each (`openai_chat`: chat, completions, embeddings; `responses`; `anthropic`;
`bedrock`: Converse; `gemini`: generateContent, embedContent). This module only picks the dialect: by the
path's end, as `charged` picks what an answer is charged, and for a path whose body is the
model's own API (Bedrock's invoke, Vertex's rawPredict) or an unknown one, by the body's
shape: `anthropic_version` (Claude on Bedrock and Vertex), `contents` (Gemini), else the
keys that hold a prompt in most APIs (`estimate.unknown_prompt_chars`). A body that is not
a JSON object is 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from proxy.usage import anthropic, bedrock, estimate, gemini, openai_chat, responses

_Reader = Callable[[dict[str, Any]], int]
# By the path's end, the first match; each also without a leading /v1.
_BY_PATH: tuple[tuple[tuple[str, ...], _Reader], ...] = (
    (("completions", "embeddings"), openai_chat.prompt_chars),  # chat/completions too
    (("responses", "responses/input_tokens"), responses.prompt_chars),
    (("messages", "messages/count_tokens"), anthropic.prompt_chars),
    (("/converse", "/converse-stream"), bedrock.prompt_chars),
    ((":generateContent", ":streamGenerateContent", ":countTokens"), gemini.prompt_chars),
    ((":embedContent", ":batchEmbedContents"), gemini.embedded_chars),
)


def prompt_chars(path: str, document: dict[str, Any]) -> int:
    """Characters of the prompt of a parsed JSON request sent to `path`."""
    for ends, read in _BY_PATH:
        if path.endswith(ends):
            return read(document)
    return _by_shape(document)


def request_chars(path: str, body: bytes) -> int:
    """Characters of the prompt of a request body; 0 for a body that is not a JSON object."""
    if not body:
        return 0
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return 0
    return prompt_chars(path, document) if isinstance(document, dict) else 0


def _by_shape(document: dict[str, Any]) -> int:
    if "anthropic_version" in document:
        return anthropic.prompt_chars(document)
    if "contents" in document:
        return gemini.prompt_chars(document)
    return estimate.unknown_prompt_chars(document)
