#!/usr/bin/env bash
# make demo: the tour for a newcomer, with no provider account and no network. A bundled
# fake provider (the tests' own) and a gateway in front of it; a plain and a streamed call,
# a refused call and an over-quota call, each answer printed; then the log lines and an
# excerpt of /metrics. Each command is printed as it runs, ready to paste. Everything it
# started is stopped at the end (KEEP=1: left running, with how to stop it).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
READY_SECONDS=${READY_SECONDS:-15}
keep=${KEEP:-0} # KEEP=1: leave the fake provider and the gateway running at the end
[[ "$keep" == 1 ]] || keep=0
# shellcheck source=e2e/stack.sh
source e2e/stack.sh

# Bold headings on a terminal only (and never with NO_COLOR): piped or logged, plain text.
if [[ -t 1 && -z "${NO_COLOR:-}" ]]; then bold=$'\033[1m' plain=$'\033[0m'; else bold='' plain=''; fi

step() { printf '\n%s== %s%s\n$ %s\n' "$bold" "$1" "$plain" "$2"; }
show() { # show WHAT CURL-ARGS…: print the command (quoted, ready to paste), run it, print status and body
    local what=$1
    shift
    set -- -sS -w '\n[HTTP %{http_code}]\n' "$@"
    step "$what" "$(quoted curl "$@")"
    curl "$@"
}
run() { # run WHAT COMMAND: print the command line, then run exactly that line
    step "$1" "$2"
    bash -c "$2"
}
quoted() { "$PYTHON" -c 'import shlex, sys; print(shlex.join(sys.argv[1:]))' "$@"; }

echo "A fake provider at $fake_url and the gateway at $GATEWAY_URL, keys in $KEYS_FILE_PATH."
if ((keep)); then
    echo "Both keep running after the demo (KEEP=1): paste any command below to try it again."
else
    echo "Both stop when the demo ends, so the commands below will not answer afterwards: run"
    echo "'make demo KEEP=1' to keep them, or use http://localhost:8080 and a key of keys.json with 'make run'."
fi
chat='{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello!"}]}'

show "A plain chat completion: the client's SDK only changes base URL and key" \
    "$GATEWAY_URL/v1/chat/completions" -H "Authorization: Bearer $GATEWAY_KEY" \
    -H 'Content-Type: application/json' -d "$chat"

show "The same, streamed: events arrive as the provider sends them (x-fake-delay-ms is the fake provider's own header, spacing its events 50 ms apart; the gateway passes it on like any other header)" \
    -N "$GATEWAY_URL/v1/chat/completions" -H "Authorization: Bearer $GATEWAY_KEY" \
    -H 'Content-Type: application/json' -H 'x-fake-delay-ms: 50' \
    -d '{"model": "gpt-4o-mini", "stream": true, "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": "Hi"}]}'

show "An Anthropic message with the Anthropic key" \
    "$GATEWAY_URL/v1/messages" -H "x-api-key: $GATEWAY_ANTHROPIC_KEY" -H 'Content-Type: application/json' \
    -d '{"model": "claude-haiku-4-5", "max_tokens": 32, "messages": [{"role": "user", "content": "Hi"}]}'

show "A refused call: a key the keys file does not hold (401, OpenAI dialect)" \
    "$GATEWAY_URL/v1/chat/completions" -H 'Authorization: Bearer vk_not_in_the_file' \
    -H 'Content-Type: application/json' -d "$chat"

limited=$(quoted "$GATEWAY_URL/v1/chat/completions" -H "Authorization: Bearer $GATEWAY_LIMITED_KEY" \
    -H 'Content-Type: application/json' -d "$chat")
run "Over quota: the limited key allows 3 requests an hour" \
    "for n in 1 2 3; do curl -sS -o /dev/null -w \"request \$n: HTTP %{http_code}\\n\" $limited; done"
run "The fourth: 429, and its headers say when to retry" \
    "curl -sS -i $limited | grep -i -E '^(HTTP/|retry-after|x-should-retry|x-ratelimit-[a-z-]+:|\\{)'"

show "What the limited key sees of its own usage" "$GATEWAY_URL/usage" -H "Authorization: Bearer $GATEWAY_LIMITED_KEY"

# The log is written off the request path: wait (boundedly) until every request so far has its line.
for _ in $(seq 50); do
    (($(wc -l <"$LOG_FILE" 2>/dev/null || echo 0) >= 8)) && break
    sleep 0.1
done
run "The interaction log: one JSON line per request (never a key, only its name)" "cat $(quoted "$LOG_FILE")"

run "/metrics, an excerpt" \
    "curl -sS $GATEWAY_URL/metrics | grep -E '^llm_gateway_(requests_total|quota_rejections_total|prompt_tokens_total|completion_tokens_total)'"

show "/health" "$GATEWAY_URL/health"

if ((keep)); then
    printf '\nDone. Still running: the gateway at %s and the fake provider at %s.\n' "$GATEWAY_URL" "$fake_url"
    printf 'Its settings: KEYS_FILE_PATH=%s LOG_TO_FILE=%s LOG_FILE_PATH=%s MAX_BODY_BYTES=%s SHUTDOWN_GRACE_SECONDS=%s SERVER_HOST=%s SERVER_PORT=%s (the rest: defaults)\n' \
        "$KEYS_FILE_PATH" "$LOG_TO_FILE" "$LOG_FILE_PATH" "$MAX_BODY_BYTES" "$SHUTDOWN_GRACE_SECONDS" "$SERVER_HOST" "$SERVER_PORT"
    printf 'Its keys: %s (OpenAI), %s (Anthropic), %s (3 requests an hour).\n' \
        "$GATEWAY_KEY" "$GATEWAY_ANTHROPIC_KEY" "$GATEWAY_LIMITED_KEY"
    printf 'Run the examples against it:\n'
    for target in example-openai-chat example-openai-stream; do
        printf '  make %s GATEWAY_URL=%s GATEWAY_KEY=%s\n' "$target" "$GATEWAY_URL" "$GATEWAY_KEY"
    done
    printf '  make example-anthropic GATEWAY_URL=%s GATEWAY_KEY=%s\n' "$GATEWAY_URL" "$GATEWAY_ANTHROPIC_KEY"
    printf '  make example-curl GATEWAY_URL=%s GATEWAY_KEY=%s GATEWAY_ANTHROPIC_KEY=%s\n' \
        "$GATEWAY_URL" "$GATEWAY_KEY" "$GATEWAY_ANTHROPIC_KEY"
    # rm once they have exited: a gateway still draining would write its last log lines
    # again into a log it finds removed, and the directory would stay behind.
    printf 'Stop them with: kill %s; while kill -0 %s 2>/dev/null; do sleep 0.2; done; rm -rf %s\n' \
        "${started[*]}" "${started[*]}" "$work"
else
    printf '\nDone: stopping the gateway and the fake provider.\n'
fi
