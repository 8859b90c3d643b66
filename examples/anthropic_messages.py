"""A message through the gateway with the official Anthropic SDK, plain and streamed.

    GATEWAY_URL=http://localhost:8080 GATEWAY_KEY=vk_user2_anthropic python examples/anthropic_messages.py

Only the base URL and the key change: the virtual key goes where the Anthropic key would.
"""

import os

from anthropic import Anthropic

client = Anthropic(
    base_url=os.environ.get("GATEWAY_URL", "http://localhost:8080"),
    api_key=os.environ["GATEWAY_KEY"],
)
model = os.environ.get("GATEWAY_MODEL", "claude-haiku-4-5")
question = [{"role": "user", "content": "Say hello in five words."}]

message = client.messages.create(model=model, max_tokens=100, messages=question)
print(message.content[0].text)
print(f"tokens: {message.usage.input_tokens} in, {message.usage.output_tokens} out")

with client.messages.stream(model=model, max_tokens=100, messages=question) as stream:
    for text in stream.text_stream:
        print(text, end="", flush=True)
print()
