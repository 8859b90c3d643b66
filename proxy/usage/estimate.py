"""Estimated token counts: about 4 characters a token, of a request's text and an answer's.

Used where a provider reported no usage, and for what admission reserves. A request's text
is every string of its prompt, read by its dialect (`prompt`: each dialect module knows its
request's shape); an answer's is every string the provider generated (its text, tool
calls, reasoning, refusals, transcripts), which each dialect module counts as it reads.
This module holds the arithmetic and the readings the dialects share: text in strings and
lists of parts, JSON values (a tool's arguments or definition) at their written length, and
the body of an API no dialect knows (`unknown_prompt_chars`). What it does not do: tokenize
(no tokenizer matches every model), count images or audio, or read a compressed request
body.
"""

from __future__ import annotations

import math

import orjson

CHARS_PER_TOKEN = 4
_TEXT_KEYS = ("text", "content", "message")
_REQUEST_TEXT = ("messages", "input", "inputs", "prompt", "system")  # inputs: Hugging Face's
# Bounded, because a client's body may nest as deep as orjson allows.
_TEXT_DEPTH = 8


def tokens(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)


def unknown_prompt_chars(document: dict[str, object]) -> int:
    """Characters of text in a request of an API no dialect knows: the strings under the keys
    that hold a prompt (messages, input, inputs, prompt, system), and under text, content
    and message within them."""
    return sum(_text_length(document.get(key)) for key in _REQUEST_TEXT)


def text_chars(value: object) -> int:
    """Characters of text in a string, or in a list of parts (`{"text": …}`)."""
    return _text_length(value)


def string_chars(value: object) -> int:
    """The length of a string; 0 for anything else."""
    return len(value) if isinstance(value, str) else 0


def json_chars(value: object) -> int:
    """A JSON value (a tool's arguments or definitions) at its written length; 0 for none."""
    if value is None:
        return 0
    try:
        return len(orjson.dumps(value))
    except orjson.JSONEncodeError:  # nested deeper than orjson writes (it reads deeper)
        return 0


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
