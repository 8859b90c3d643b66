"""A message through the gateway with the official Anthropic SDK, plain and streamed.

    GATEWAY_URL=http://localhost:8080 GATEWAY_KEY=vk_user2_anthropic python examples/anthropic_messages.py

Only the base URL and the key change: the virtual key goes where the Anthropic key would.
GATEWAY_KEY defaults to keys.example.json's Anthropic key, as `make example-anthropic`'s does.
"""

import os
import sys

from anthropic import Anthropic, APIConnectionError

url = os.environ.get("GATEWAY_URL", "http://localhost:8080").rstrip("/")
client = Anthropic(base_url=url, api_key=os.environ.get("GATEWAY_KEY", "vk_user2_anthropic"))
model = os.environ.get("GATEWAY_MODEL", "claude-haiku-4-5")
question = [{"role": "user", "content": "Say hello in five words."}]

try:
    message = client.messages.create(model=model, max_tokens=100, messages=question)
except APIConnectionError:
    sys.exit(
        f"nothing answers at {url}: is the gateway running? Start it with 'make run' ('make run FAKE=1' needs no provider account)"
    )
print(message.content[0].text)
print(f"tokens: {message.usage.input_tokens} in, {message.usage.output_tokens} out")

with client.messages.stream(model=model, max_tokens=100, messages=question) as stream:
    for text in stream.text_stream:
        print(text, end="", flush=True)
print()
