"""What a provider reports of a response's usage, read into the gateway's token kinds.

The shapes read (every other field is ignored):

- OpenAI chat, completions, embeddings: {prompt_tokens, completion_tokens,
  prompt_tokens_details {cached_tokens, audio_tokens}, completion_tokens_details
  {reasoning_tokens, audio_tokens}} (embeddings: prompt only);
- the Responses API: {input_tokens, output_tokens, input_tokens_details {cached_tokens},
  output_tokens_details {reasoning_tokens}}; transcriptions: input_token_details;
- Anthropic: {input_tokens, output_tokens, cache_creation_input_tokens,
  cache_read_input_tokens}, whose cache counts are *not* in input_tokens: they are added
  to the prompt here (OpenAI's cached and audio tokens are parts of its totals already).

A stream may report several times (Anthropic's `message_start`, then cumulative
`message_delta`s): the last value of each field wins; nothing is summed. Counts are
non-negative integers; anything else (a bool, a float, a string) is not a count.

`last_usage` finds the usage object of a JSON body without parsing the whole body.
"""

from __future__ import annotations

import re

import orjson

from proxy.record import Usage

# Every count a usage object may carry at its top level that we read.
_COUNTS = (
    "prompt_tokens",
    "completion_tokens",
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)
# Counts inside a usage object's details: (details object, count there, our field).
_DETAILS = (
    ("prompt_tokens_details", "cached_tokens", "cached_tokens"),
    ("prompt_tokens_details", "cache_write_tokens", "cache_write_tokens"),
    ("prompt_tokens_details", "audio_tokens", "input_audio_tokens"),
    ("completion_tokens_details", "reasoning_tokens", "reasoning_tokens"),
    ("completion_tokens_details", "audio_tokens", "output_audio_tokens"),
    ("input_tokens_details", "cached_tokens", "cached_tokens"),
    ("input_tokens_details", "cache_write_tokens", "cache_write_tokens"),
    ("input_tokens_details", "audio_tokens", "input_audio_tokens"),
    ("input_token_details", "audio_tokens", "input_audio_tokens"),  # transcriptions
    ("output_tokens_details", "reasoning_tokens", "reasoning_tokens"),
    ("output_tokens_details", "audio_tokens", "output_audio_tokens"),
)
_TOTALS = frozenset({"prompt_tokens", "completion_tokens", "input_tokens", "output_tokens"})
_USAGE_KEY = re.compile(rb'"usage"\s*:\s*')
# Braces outside strings, and strings whole (skipped, escapes and all).
_BRACES = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}]', re.DOTALL)


class ProviderUsage:
    """The usage fields a response reported so far."""

    __slots__ = ("_fields",)

    def __init__(self) -> None:
        self._fields: dict[str, int] = {}  # the last value seen of each field

    def read(self, usage: object) -> None:
        """Take one usage object (anything else is ignored)."""
        if not isinstance(usage, dict):
            return
        fields = self._fields
        for field in _COUNTS:
            value = usage.get(field)
            if _is_count(value):
                fields[field] = value  # type: ignore[assignment]
        for details, name, field in _DETAILS:
            found = usage.get(details)
            if isinstance(found, dict):
                value = found.get(name)
                if _is_count(value):
                    fields[field] = value  # type: ignore[assignment]

    def clear(self) -> None:
        self._fields.clear()

    def usage(self) -> Usage | None:
        """The reported usage, every kind; None when no total was reported."""
        fields = self._fields
        if not fields.keys() & _TOTALS:
            return None
        get = fields.get
        cache_read, cache_write = get("cached_tokens", 0), get("cache_write_tokens", 0)
        if "prompt_tokens" in fields or "completion_tokens" in fields:  # OpenAI chat, embeddings
            prompt, completion = get("prompt_tokens", 0), get("completion_tokens", 0)
        else:
            # Anthropic's cache counts are beside input_tokens; the Responses API has none.
            anthropic_read = get("cache_read_input_tokens", 0)
            anthropic_write = get("cache_creation_input_tokens", 0)
            prompt = get("input_tokens", 0) + anthropic_read + anthropic_write
            completion = get("output_tokens", 0)
            cache_read += anthropic_read
            cache_write += anthropic_write
        return Usage(
            prompt,
            completion,
            cache_read_tokens=cache_read,
            cache_write_tokens=cache_write,
            input_audio_tokens=get("input_audio_tokens", 0),
            reasoning_tokens=get("reasoning_tokens", 0),
            output_audio_tokens=get("output_audio_tokens", 0),
        )


def last_usage(body: bytes | bytearray) -> object:
    """The object under the body's last `"usage"` key, parsed alone; None if there is none.

    A quote inside a JSON string is escaped, so `"usage":` occurs only as a key; every
    provider puts the top-level usage after the content (where a tool's input may hold a
    `usage` key of its own), so the last one is the answer's.
    """
    keys = list(_USAGE_KEY.finditer(body))
    if not keys or body[keys[-1].end() : keys[-1].end() + 1] != b"{":
        return None  # none, or the last is null
    start, depth = keys[-1].end(), 0
    for token in _BRACES.finditer(body, start):
        if token.group() == b"{":
            depth += 1
        elif token.group() == b"}":
            depth -= 1
            if depth == 0:
                try:
                    return orjson.loads(body[start : token.end()])
                except orjson.JSONDecodeError:
                    return None
    return None  # cut short inside it


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0  # bool and float are not counts
