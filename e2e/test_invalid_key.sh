#!/usr/bin/env bash
# An unknown virtual key gets 401 in the endpoint's dialect, says why, and is never echoed.
# shellcheck source=e2e/lib.sh
source "$(dirname "$0")/lib.sh"
unknown="vk_e2e_unknown_$RANDOM$RANDOM"

call POST /v1/chat/completions -H "Authorization: Bearer $unknown" -H 'Content-Type: application/json' --data-binary "$(chat_body)"
expect_openai_error 401 "chat completion with an unknown key"
expect_json 'b["error"]["code"] == "invalid_api_key"' "unknown key error code"
expect_json '"not found" in b["error"]["message"]' "unknown key message says the key was not found"
expect_body_lacks "$unknown" "unknown key error"

call POST /v1/messages -H "x-api-key: $unknown" -H 'anthropic-version: 2023-06-01' -H 'Content-Type: application/json' \
    --data-binary "$(messages_body)"
expect_anthropic_error 401 "messages with an unknown key"
expect_json 'b["error"]["type"] == "authentication_error"' "unknown key error type"
expect_body_lacks "$unknown" "unknown key error"

call GET /v1/models -H "Authorization: Bearer $unknown"
expect_openai_error 401 "models with an unknown key"

pass
