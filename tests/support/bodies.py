"""The request bodies tests send, spelt once: an OpenAI chat body and an Anthropic messages body.

CHAT, STREAM and MESSAGES are the smallest bodies each endpoint accepts ("hi", one user turn).
A test that needs another prompt (the fake counts one token per word) or another field
says so with `chat(...)` or `messages(...)` instead of writing the shape out again.
"""

from __future__ import annotations

from typing import Any

OPENAI_MODEL = "gpt-4o-mini"
ANTHROPIC_MODEL = "claude-3-5-haiku-latest"


def chat(content: str = "hi", model: str = OPENAI_MODEL, **fields: Any) -> dict[str, Any]:
    """An OpenAI chat completions body: one user message, then `fields` (stream, max_tokens...)."""
    return {"model": model, "messages": [{"role": "user", "content": content}], **fields}


def messages(
    content: str = "hi", model: str = ANTHROPIC_MODEL, max_tokens: int = 16, **fields: Any
) -> dict[str, Any]:
    """An Anthropic messages body: one user message, the max_tokens the API requires, `fields`."""
    return {
        "model": model,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": content}],
        **fields,
    }


CHAT = chat()
STREAM = chat(stream=True)
MESSAGES = messages()
