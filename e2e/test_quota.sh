#!/usr/bin/env bash
# A key over its request quota gets 429 with Retry-After; the refusal is not counted.
# shellcheck source=e2e/lib.sh
source "$(dirname "$0")/lib.sh"
need GATEWAY_LIMITED_KEY "an OpenAI virtual key with a small request quota"
max_calls=${QUOTA_MAX_CALLS:-50}
auth=(-H "Authorization: Bearer $GATEWAY_LIMITED_KEY" -H 'Content-Type: application/json')

for ((i = 1; i <= max_calls; i++)); do
    call POST /v1/chat/completions "${auth[@]}" --data-binary "$(chat_body)"
    [[ "$STATUS" == 200 ]] || break
done
expect_openai_error 429 "call $i with the limited key (within $max_calls calls)"
expect_json 'b["error"]["code"] == "rate_limit_exceeded"' "429 error code"
retry_after=$(header retry-after)
if ! [[ "$retry_after" =~ ^[0-9]+$ ]] || ((retry_after == 0)); then
    fail "429: Retry-After is '$retry_after', not a positive whole number of seconds"
fi
[[ "$(header retry-after-ms)" =~ ^[0-9]+$ ]] || fail "429: retry-after-ms is '$(header retry-after-ms)'"
[[ "$(header x-ratelimit-remaining-requests)" == 0 ]] || fail "429: x-ratelimit-remaining-requests is '$(header x-ratelimit-remaining-requests)'"

# Still refused, and /usage shows the limit reached without counting the refusals.
call POST /v1/chat/completions "${auth[@]}" --data-binary "$(chat_body)"
expect_openai_error 429 "the next call"
call GET /usage -H "Authorization: Bearer $GATEWAY_LIMITED_KEY"
expect_status 200 "GET /usage"
expect_json 'b["requests"]["remaining"] == 0 and b["requests"]["used"] == b["requests"]["limit"]' "GET /usage at the limit"
expect_body_lacks "$GATEWAY_LIMITED_KEY" "GET /usage never echoes the virtual key"

pass "429 after $((i - 1)) admitted calls, Retry-After: $retry_after"
