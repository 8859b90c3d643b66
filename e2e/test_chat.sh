#!/usr/bin/env bash
# Chat completions through the gateway: a JSON answer, and a streamed one that arrives as it is sent.
# shellcheck source=e2e/lib.sh
source "$(dirname "$0")/lib.sh"
need GATEWAY_KEY "a virtual key of an OpenAI provider"
auth=(-H "Authorization: Bearer $GATEWAY_KEY" -H 'Content-Type: application/json')

call POST /v1/chat/completions "${auth[@]}" --data-binary "$(chat_body)"
expect_status 200 "chat completion"
expect_header x-request-id "chat completion"
expect_json 'b["object"] == "chat.completion" and isinstance(b["choices"][0]["message"]["content"], str)' "chat completion body"
expect_json 'b["usage"]["total_tokens"] > 0' "chat completion usage"
expect_header x-ratelimit-remaining-requests "chat completion (the gateway's quota headers)"
expect_body_lacks "$GATEWAY_KEY" "chat completion never echoes the virtual key"

# The client's own request id comes back.
call POST /v1/chat/completions "${auth[@]}" -H 'x-request-id: e2e-chat-own-id' --data-binary "$(chat_body)"
expect_status 200 "chat completion with x-request-id"
[[ "$(header x-request-id)" == e2e-chat-own-id ]] || fail "x-request-id: sent e2e-chat-own-id, got '$(header x-request-id)'"

# Streamed: every line is stamped with the time it arrived.
stream=$E2E_TMP/stream
fake=()
[[ "$E2E_FAKE" == 1 ]] && fake=(-H 'x-fake-chunks: 5' -H 'x-fake-delay-ms: 150')
curl -sS -N --max-time 30 -D "$HEADERS" "$GATEWAY_URL/v1/chat/completions" "${auth[@]}" "${fake[@]}" \
    --data-binary "$(chat_body '"stream": true, "stream_options": {"include_usage": true}')" |
    while IFS= read -r line; do printf '%s %s\n' "$EPOCHREALTIME" "$line"; done >"$stream" ||
    fail "streamed chat completion: curl could not complete the request"
grep -q '^HTTP/[0-9.]* 200' "$HEADERS" || fail "streamed chat completion: $(head -1 "$HEADERS"): $(head -c 400 "$stream")"
[[ "$(header content-type)" == text/event-stream* ]] || fail "streamed chat completion: content-type '$(header content-type)'"
grep -q ' data: {.*"chat.completion.chunk"' "$stream" || fail "streamed chat completion: no chunk: $(head -c 400 "$stream")"
grep -q ' data: \[DONE\]' "$stream" || fail "streamed chat completion: no [DONE] at the end"

if [[ "$E2E_FAKE" == 1 ]]; then
    # The fake sends 5 deltas 150 ms apart: the first must arrive well before [DONE].
    first=$(grep -m1 '"content": *"tok0 ' "$stream" | cut -d' ' -f1) || true
    last=$(grep -m1 ' data: \[DONE\]' "$stream" | cut -d' ' -f1)
    [[ -n "$first" ]] || fail "streamed chat completion: no 'tok0' delta from the fake provider"
    python3 -c 'import sys; sys.exit(float(sys.argv[2]) - float(sys.argv[1]) < 0.4)' "$first" "$last" ||
        fail "streamed chat completion was buffered: first delta at $first, [DONE] at $last"
fi

pass
