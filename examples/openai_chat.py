"""A chat completion through the gateway with the official OpenAI SDK.

    GATEWAY_URL=http://localhost:8080 GATEWAY_KEY=vk_user1_openai python examples/openai_chat.py

Only the base URL and the key change: the virtual key goes where the OpenAI key would.
"""

import os

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("GATEWAY_URL", "http://localhost:8080") + "/v1",
    api_key=os.environ["GATEWAY_KEY"],
)
reply = client.chat.completions.create(
    model=os.environ.get("GATEWAY_MODEL", "gpt-4o-mini"),
    messages=[{"role": "user", "content": "Say hello in five words."}],
)
print(reply.choices[0].message.content)
print(f"tokens: {reply.usage.prompt_tokens} in, {reply.usage.completion_tokens} out")
