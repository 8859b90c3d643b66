"""A chat completion through the gateway with the official OpenAI SDK.

    GATEWAY_URL=http://localhost:8080 GATEWAY_KEY=vk_user1_openai python examples/openai_chat.py

Only the base URL and the key change: the virtual key goes where the OpenAI key would.
GATEWAY_KEY defaults to keys.example.json's OpenAI key, as `make example-openai-chat`'s does.
"""

import os
import sys

from openai import APIConnectionError, OpenAI

url = os.environ.get("GATEWAY_URL", "http://localhost:8080").rstrip("/")  # not //v1
client = OpenAI(base_url=url + "/v1", api_key=os.environ.get("GATEWAY_KEY", "vk_user1_openai"))
try:
    reply = client.chat.completions.create(
        model=os.environ.get("GATEWAY_MODEL", "gpt-4o-mini"),
        messages=[{"role": "user", "content": "Say hello in five words."}],
    )
except APIConnectionError:
    sys.exit(
        f"nothing answers at {url}: is the gateway running? Start it with 'make run' ('make run FAKE=1' needs no provider account)"
    )
print(reply.choices[0].message.content)
print(f"tokens: {reply.usage.prompt_tokens} in, {reply.usage.completion_tokens} out")
