#!/usr/bin/env bash
# No virtual key at all: 401 in the endpoint's dialect, saying how to send one; own endpoints need none.
# shellcheck source=e2e/lib.sh
source "$(dirname "$0")/lib.sh"

call POST /v1/chat/completions -H 'Content-Type: application/json' --data-binary "$(chat_body)"
expect_openai_error 401 "chat completion without a key"
expect_json 'b["error"]["code"] == "invalid_api_key"' "no key error code"

call POST /v1/messages -H 'anthropic-version: 2023-06-01' -H 'Content-Type: application/json' --data-binary "$(messages_body)"
expect_anthropic_error 401 "messages without a key"
expect_json 'b["error"]["type"] == "authentication_error"' "no key error type"

call POST /v1/chat/completions -H 'Authorization: Bearer ' -H 'Content-Type: application/json' --data-binary "$(chat_body)"
expect_openai_error 401 "chat completion with an empty bearer"

call GET /usage
expect_openai_error 401 "GET /usage without a key"
expect_json 'b["error"]["code"] == "invalid_api_key"' "GET /usage without a key (error code)"

for path in /health /ready /metrics; do
    call GET "$path"
    expect_status 200 "GET $path without a key"
    expect_header x-request-id "GET $path"
done

pass
