#!/usr/bin/env bash
# /metrics: Prometheus text by default, the JSON summary with Accept: application/json; a call counts.
# shellcheck source=e2e/lib.sh
source "$(dirname "$0")/lib.sh"
need GATEWAY_KEY "a virtual key of an OpenAI provider"

call GET /metrics
expect_status 200 "GET /metrics"
[[ "$(header content-type)" == text/plain* ]] || fail "GET /metrics: content-type is '$(header content-type)', not text/plain"
for metric in requests_total request_duration_seconds time_to_first_byte_seconds prompt_tokens_total \
    completion_tokens_total quota_rejections_total upstream_errors_total requests_in_flight; do
    expect_body_has "# TYPE llm_gateway_$metric " "GET /metrics declares llm_gateway_$metric"
done

call GET /metrics -H 'Accept: application/json'
expect_status 200 "GET /metrics as JSON"
expect_json '{"total_requests", "requests_by_provider", "average_response_ms", "tokens", "rate_limited", "last_updated"} <= set(b)' "GET /metrics as JSON fields"
before=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["total_requests"])' "$BODY")

call POST /v1/chat/completions -H "Authorization: Bearer $GATEWAY_KEY" -H 'Content-Type: application/json' --data-binary "$(chat_body)"
expect_status 200 "a chat completion"

# The request is counted when it ends, which may be a moment after its last byte.
for _ in $(seq 50); do
    call GET /metrics -H 'Accept: application/json'
    python3 -c 'import json, sys; sys.exit(json.load(open(sys.argv[1]))["total_requests"] <= int(sys.argv[2]))' "$BODY" "$before" && break
    sleep 0.1
done
expect_json "b['total_requests'] > $before and b['requests_by_provider'] and b['last_updated']" "total_requests after one call"

call GET /metrics
expect_status 200 "GET /metrics"
grep -E '^llm_gateway_requests_total\{.*status="200".*\} [1-9]' "$BODY" >/dev/null ||
    fail "GET /metrics: no llm_gateway_requests_total sample with status=\"200\" after a call"
expect_body_lacks "$GATEWAY_KEY" "GET /metrics never shows a virtual key"

pass
