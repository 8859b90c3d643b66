"""A streamed chat completion through the gateway: tokens print as the provider sends them.

GATEWAY_URL=http://localhost:8080 GATEWAY_KEY=vk_user1_openai python examples/openai_stream.py

GATEWAY_KEY defaults to keys.example.json's OpenAI key, as `make example-openai-stream`'s does.
"""

import os
import sys

from openai import APIConnectionError, OpenAI

url = os.environ.get("GATEWAY_URL", "http://localhost:8080").rstrip("/")  # not //v1
client = OpenAI(base_url=url + "/v1", api_key=os.environ.get("GATEWAY_KEY", "vk_user1_openai"))
try:
    stream = client.chat.completions.create(
        model=os.environ.get("GATEWAY_MODEL", "gpt-4o-mini"),
        messages=[{"role": "user", "content": "Count from one to five."}],
        stream=True,
        stream_options={"include_usage": True},  # the last chunk carries the token counts
    )
except APIConnectionError:
    sys.exit(
        f"nothing answers at {url}: is the gateway running? Start it with 'make run' ('make run FAKE=1' needs no provider account)"
    )
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
    if chunk.usage:
        print(f"\ntokens: {chunk.usage.prompt_tokens} in, {chunk.usage.completion_tokens} out")
