#!/usr/bin/env bash
# The interaction log holds one JSON line per request, found by the x-request-id the client sent.
# shellcheck source=e2e/lib.sh
source "$(dirname "$0")/lib.sh"
need GATEWAY_KEY "a virtual key of an OpenAI provider"
need LOG_FILE "the gateway's LOG_FILE_PATH (it must run with LOG_TO_FILE=true)"
ok_id="e2e-log-ok-$RANDOM$RANDOM"
refused_id="e2e-log-refused-$RANDOM$RANDOM"

call POST /v1/chat/completions -H "Authorization: Bearer $GATEWAY_KEY" -H 'Content-Type: application/json' \
    -H "x-request-id: $ok_id" --data-binary "$(chat_body)"
expect_status 200 "chat completion"
call POST /v1/chat/completions -H 'Authorization: Bearer vk_e2e_not_a_key' -H 'Content-Type: application/json' \
    -H "x-request-id: $refused_id" --data-binary "$(chat_body)"
expect_status 401 "chat completion with an unknown key"

# log_line ID: the log line of that request, waiting up to 5 s for it to be written
log_line() {
    for _ in $(seq 50); do
        if [[ -f "$LOG_FILE" ]] && grep -F "\"$1\"" "$LOG_FILE" >"$BODY"; then
            (($(wc -l <"$BODY") == 1)) || fail "request $1 has $(wc -l <"$BODY") log lines, not 1"
            return 0
        fi
        sleep 0.1
    done
    fail "no line with request_id $1 in $LOG_FILE after 5 s"
}

log_line "$ok_id"
expect_json "b['request_id'] == '$ok_id' and b['status'] == 200 and b['method'] == 'POST' and b['path'] == '/v1/chat/completions'" "the log line of a call"
expect_json "b['model'] == '$GATEWAY_MODEL' and b['stream'] is False and b['provider']" "the log line's model, stream and provider"
expect_json 'b["timestamp"].endswith(("Z", "+00:00")) and b["duration_ms"] >= 0 and b["ttft_ms"] is not None' "the log line's timings"
expect_json 'b["usage"]["total_tokens"] > 0 and "estimated" in b["usage"]' "the log line's usage"
expect_json 'isinstance(b["key"], str) and b["key"]' "the log line's key name"

log_line "$refused_id"
expect_json "b['status'] == 401 and b['error']" "the log line of a refused call"

! grep -qF -- "$GATEWAY_KEY" "$LOG_FILE" || fail "the log contains a full virtual key"
! grep -qF -- vk_e2e_not_a_key "$LOG_FILE" || fail "the log contains the unknown key that was sent"

pass
