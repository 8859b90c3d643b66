#!/usr/bin/env bash
# Anthropic messages through the gateway with x-api-key: a JSON answer, a stream, and errors in Anthropic's shape.
# shellcheck source=e2e/lib.sh
source "$(dirname "$0")/lib.sh"
need GATEWAY_ANTHROPIC_KEY "a virtual key of the Anthropic provider"
auth=(-H "x-api-key: $GATEWAY_ANTHROPIC_KEY" -H 'anthropic-version: 2023-06-01' -H 'Content-Type: application/json')

call POST /v1/messages "${auth[@]}" --data-binary "$(messages_body)"
expect_status 200 "messages"
expect_header x-request-id "messages"
expect_json 'b["type"] == "message" and b["role"] == "assistant" and b["content"][0]["type"] == "text"' "messages body"
expect_json 'b["usage"]["input_tokens"] > 0 and b["usage"]["output_tokens"] > 0' "messages usage"
expect_body_lacks "$GATEWAY_ANTHROPIC_KEY" "messages never echoes the virtual key"

call POST /v1/messages "${auth[@]}" --data-binary "$(messages_body '"stream": true')"
expect_status 200 "streamed messages"
[[ "$(header content-type)" == text/event-stream* ]] || fail "streamed messages: content-type '$(header content-type)'"
for event in message_start content_block_delta message_delta message_stop; do
    expect_body_has "event: $event" "streamed messages"
done

# The gateway's own errors on /v1/messages speak Anthropic's dialect.
call POST /v1/messages "${auth[@]}" --data-binary '{"max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}'
expect_anthropic_error 400 "messages without a model"
expect_json 'b["error"]["type"] == "invalid_request_error" and "model" in b["error"]["message"]' "messages without a model names the field"

pass
