"""Estimated token counts: about 4 characters a token, of a request's text and an answer's.

Used where a provider reported no usage. A request's text is the strings under the keys
that hold it: messages, input, prompt and system; within them, strings under text, content
and message, in lists and parts. An answer's is every string the provider generated (its
text, tool calls, reasoning, refusals, transcripts), which each dialect module counts as it
reads (`openai_chat`, `responses`, `anthropic`, `realtime_events`). What it does not do:
tokenize (no tokenizer matches every model), count images or audio, or read a compressed
request body.
"""

from __future__ import annotations

import math

import orjson

CHARS_PER_TOKEN = 4
_TEXT_KEYS = ("text", "content", "message")
_REQUEST_TEXT = ("messages", "input", "prompt", "system")
# Bounded, because a client's body may nest as deep as orjson allows.
_TEXT_DEPTH = 8


def tokens(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)


def request_chars(request_body: bytes) -> int:
    """Characters of text in a JSON request body; 0 for anything else."""
    if not request_body:
        return 0
    try:
        document = orjson.loads(request_body)
    except orjson.JSONDecodeError:
        return 0
    if not isinstance(document, dict):
        return 0
    return prompt_chars(document)


def prompt_chars(document: dict[str, object]) -> int:
    """Characters of text in a parsed JSON request (peek reads it once, for the reservation)."""
    return sum(_text_length(document.get(key)) for key in _REQUEST_TEXT)


def text_chars(value: object) -> int:
    """Characters of text in a string, or in a list of parts (`{"text": …}`)."""
    return _text_length(value)


def _text_length(value: object, depth: int = 0) -> int:
    """Characters of text in strings, lists of parts and dicts under the text keys."""
    if isinstance(value, str):
        return len(value)
    if depth >= _TEXT_DEPTH:
        return 0
    if isinstance(value, list):
        return sum(_text_length(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return sum(_text_length(value.get(key), depth + 1) for key in _TEXT_KEYS)
    return 0
