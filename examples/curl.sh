#!/usr/bin/env bash
# The gateway with nothing but curl: a chat completion, a streamed one, an Anthropic message,
# this key's usage, and the gateway's health.
#
#   GATEWAY_URL=http://localhost:8080 GATEWAY_KEY=vk_user1_openai examples/curl.sh
#   (GATEWAY_KEY defaults to keys.example.json's OpenAI key, as `make example-curl`'s does;
#   GATEWAY_ANTHROPIC_KEY=vk_user2_anthropic also sends the Anthropic message)
set -euo pipefail
url=${GATEWAY_URL:-http://localhost:8080}
url=${url%/} # a trailing slash would make //v1, which the gateway refuses
key=${GATEWAY_KEY:-vk_user1_openai}
model=${GATEWAY_MODEL:-gpt-4o-mini}

if ! curl -s -o /dev/null "$url/ready"; then
    echo "nothing answers at $url: is the gateway running? Start it with 'make run' ('make run FAKE=1' needs no provider account)" >&2
    exit 1
fi

echo "== chat completion"
curl -sS --fail-with-body "$url/v1/chat/completions" \
    -H "Authorization: Bearer $key" \
    -H "Content-Type: application/json" \
    -d "{\"model\": \"$model\", \"messages\": [{\"role\": \"user\", \"content\": \"Say hello.\"}]}"
echo

echo "== streamed chat completion"
curl -sS --fail-with-body -N "$url/v1/chat/completions" \
    -H "Authorization: Bearer $key" \
    -H "Content-Type: application/json" \
    -d "{\"model\": \"$model\", \"stream\": true, \"messages\": [{\"role\": \"user\", \"content\": \"Say hello.\"}]}"

if [[ -n "${GATEWAY_ANTHROPIC_KEY:-}" ]]; then
    echo "== Anthropic message"
    curl -sS --fail-with-body "$url/v1/messages" \
        -H "x-api-key: $GATEWAY_ANTHROPIC_KEY" \
        -H "anthropic-version: 2023-06-01" \
        -H "Content-Type: application/json" \
        -d "{\"model\": \"${GATEWAY_ANTHROPIC_MODEL:-claude-haiku-4-5}\", \"max_tokens\": 100, \"messages\": [{\"role\": \"user\", \"content\": \"Say hello.\"}]}"
    echo
fi

echo "== usage of this key"
curl -sS --fail-with-body "$url/usage" -H "Authorization: Bearer $key"
echo

echo "== health"
curl -sS --fail-with-body "$url/health"
echo
