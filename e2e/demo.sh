#!/usr/bin/env bash
# make demo: the tour for a newcomer, with no provider account and no network. A bundled
# fake provider (the tests' own) and a gateway in front of it; a plain and a streamed call,
# a refused call and an over-quota call, each answer printed; then the log lines and an
# excerpt of /metrics. Everything it started is stopped at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
READY_SECONDS=${READY_SECONDS:-15}
keep=0
# shellcheck source=e2e/stack.sh
source e2e/stack.sh

step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "$2"; }
show() { # show WHAT CURL-ARGS…: print the command (quoted, ready to paste), run it, print status and body
    local what=$1
    shift
    step "$what" "$("$PYTHON" -c 'import shlex, sys; print(shlex.join(sys.argv[1:]))' curl "$@")"
    curl -sS -w '\n[HTTP %{http_code}]\n' "$@"
}

echo "A fake provider at $fake_url and the gateway at $GATEWAY_URL, keys in $KEYS_FILE_PATH."
chat='{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello!"}]}'

show "A plain chat completion: the client's SDK only changes base URL and key" \
    "$GATEWAY_URL/v1/chat/completions" -H "Authorization: Bearer $GATEWAY_KEY" \
    -H 'Content-Type: application/json' -d "$chat"

show "The same, streamed: events arrive as the provider sends them (50 ms apart here)" \
    -N "$GATEWAY_URL/v1/chat/completions" -H "Authorization: Bearer $GATEWAY_KEY" \
    -H 'Content-Type: application/json' -H 'x-fake-delay-ms: 50' \
    -d '{"model": "gpt-4o-mini", "stream": true, "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": "Hi"}]}'

show "An Anthropic message with the Anthropic key" \
    "$GATEWAY_URL/v1/messages" -H "x-api-key: $GATEWAY_ANTHROPIC_KEY" -H 'Content-Type: application/json' \
    -d '{"model": "claude-haiku-4-5", "max_tokens": 32, "messages": [{"role": "user", "content": "Hi"}]}'

show "A refused call: a key the keys file does not hold (401, OpenAI dialect)" \
    "$GATEWAY_URL/v1/chat/completions" -H 'Authorization: Bearer vk_not_in_the_file' \
    -H 'Content-Type: application/json' -d "$chat"

step "Over quota: the limited key allows 3 requests an hour" "curl … ×4 with $GATEWAY_LIMITED_KEY"
for n in 1 2 3 4; do
    curl -sS -o "$work/quota.out" -D "$work/quota.head" -w "request $n: HTTP %{http_code}\n" \
        "$GATEWAY_URL/v1/chat/completions" -H "Authorization: Bearer $GATEWAY_LIMITED_KEY" \
        -H 'Content-Type: application/json' -d "$chat"
done
grep -i -E '^(retry-after|x-should-retry|x-ratelimit-[a-z-]+):' "$work/quota.head"
cat "$work/quota.out"
echo

show "What the limited key sees of its own usage" "$GATEWAY_URL/usage" -H "Authorization: Bearer $GATEWAY_LIMITED_KEY"

step "The interaction log: one JSON line per request (never a key, only its name)" "cat $LOG_FILE"
sleep 0.2
cat "$LOG_FILE"

step "/metrics, an excerpt" "curl -s $GATEWAY_URL/metrics | grep -E '^llm_gateway_(requests_total|quota|prompt|completion)'"
curl -sS "$GATEWAY_URL/metrics" | grep -E '^llm_gateway_(requests_total|quota_rejections|prompt_tokens_total|completion_tokens_total)'

step "/health" "curl -s $GATEWAY_URL/health"
curl -sS "$GATEWAY_URL/health"
printf '\n\nDone: stopping the gateway and the fake provider.\n'
