# shellcheck shell=bash
# Shared by every e2e script: source it, then `call`, then assert. Needs bash, curl, python3.
#
# Environment (e2e/run_all.sh exports all of it; set it yourself to test any gateway):
#   GATEWAY_URL            the running gateway, e.g. http://127.0.0.1:8080
#   GATEWAY_KEY            a virtual key of an OpenAI(-compatible) provider
#   GATEWAY_ANTHROPIC_KEY  a virtual key of the Anthropic provider
#   GATEWAY_LIMITED_KEY    an OpenAI virtual key with a small request quota (test_quota.sh)
#   LOG_FILE               the gateway's LOG_FILE_PATH, when it logs to a file (test_logging.sh)
#   MAX_BODY_BYTES         the gateway's body limit (default: the gateway's default)
#   GATEWAY_MODEL / GATEWAY_ANTHROPIC_MODEL   models to ask for
#   E2E_FAKE=1             the provider is tests/support/fake_provider.py: also check what only it can show

set -euo pipefail
export LC_ALL=C

NAME=$(basename "$0" .sh)
GATEWAY_URL=${GATEWAY_URL:-}
if [[ -z "$GATEWAY_URL" ]]; then
    echo "FAIL $NAME: set GATEWAY_URL to a running gateway (e2e/run_all.sh --keep starts one and prints the variables)" >&2
    exit 1
fi
GATEWAY_URL=${GATEWAY_URL%/}
GATEWAY_MODEL=${GATEWAY_MODEL:-gpt-4o-mini}
GATEWAY_ANTHROPIC_MODEL=${GATEWAY_ANTHROPIC_MODEL:-claude-haiku-4-5}
E2E_FAKE=${E2E_FAKE:-0}

E2E_TMP=$(mktemp -d "${TMPDIR:-/tmp}/e2e-$NAME.XXXXXX")
trap 'rm -rf "$E2E_TMP"' EXIT
BODY=$E2E_TMP/body
HEADERS=$E2E_TMP/headers
STATUS=

fail() {
    echo "FAIL $NAME: $*" >&2
    exit 1
}

pass() {
    echo "PASS $NAME${1:+: $1}"
}

# need VAR why: the variable must be set
need() {
    [[ -n "${!1:-}" ]] || fail "set $1 ($2)"
}

# call METHOD PATH [curl args…]: STATUS, $HEADERS and $BODY hold the answer
call() {
    local method=$1 path=$2
    shift 2
    STATUS=$(curl -sS --max-time 30 -X "$method" -o "$BODY" -D "$HEADERS" -w '%{http_code}' "$@" "$GATEWAY_URL$path") ||
        fail "$method $path: curl could not complete the request"
}

# chat_body [extra JSON members]: a small chat completions request for GATEWAY_MODEL
chat_body() {
    printf '{"model": "%s", "max_tokens": 16, "messages": [{"role": "user", "content": "Say hello."}]%s}' \
        "$GATEWAY_MODEL" "${1:+, $1}"
}

# messages_body [extra JSON members]: a small Anthropic messages request
messages_body() {
    printf '{"model": "%s", "max_tokens": 16, "messages": [{"role": "user", "content": "Say hello."}]%s}' \
        "$GATEWAY_ANTHROPIC_MODEL" "${1:+, $1}"
}

# header NAME: the value of the last header of that name in the answer ("" when absent)
header() {
    tr -d '\r' <"$HEADERS" | awk -v name="$1" '
        index($0, ":") { key = tolower(substr($0, 1, index($0, ":") - 1))
                         if (key == tolower(name)) { value = substr($0, index($0, ":") + 1); sub(/^ +/, "", value) } }
        END { print value }'
}

# expect_status CODE WHAT
expect_status() {
    [[ "$STATUS" == "$1" ]] || fail "$2: expected HTTP $1, got $STATUS: $(head -c 400 "$BODY")"
}

# expect_header NAME WHAT: the answer carries that header
expect_header() {
    [[ -n "$(header "$1")" ]] || fail "$2: no $1 header in the answer"
}

# expect_json PYTHON-EXPRESSION WHAT: the expression over `b` (the parsed body) is true
expect_json() {
    python3 - "$BODY" "$1" <<'EOF' || fail "$2: $1 does not hold for $(head -c 400 "$BODY")"
import json, sys
try:
    b = json.load(open(sys.argv[1], encoding="utf-8"))
    ok = eval(sys.argv[2], {"b": b})
except Exception as error:
    print(f"  {type(error).__name__}: {error}", file=sys.stderr)
    ok = False
sys.exit(0 if ok else 1)
EOF
}

# expect_body_has TEXT WHAT: the raw body contains the text
expect_body_has() {
    grep -qF -- "$1" "$BODY" || fail "$2: body lacks '$1': $(head -c 400 "$BODY")"
}

# expect_body_lacks TEXT WHAT: the raw body (and headers) never contain the text
expect_body_lacks() {
    ! grep -qF -- "$1" "$BODY" "$HEADERS" || fail "$2: the answer contains '$1'"
}

# expect_openai_error STATUS WHAT: that status, the OpenAI error shape, an x-request-id
expect_openai_error() {
    expect_status "$1" "$2"
    expect_header x-request-id "$2"
    expect_json 'set(b) == {"error"} and set(b["error"]) == {"message", "type", "param", "code"} and b["error"]["message"]' "$2 (OpenAI error shape)"
}

# expect_anthropic_error STATUS WHAT: that status, the Anthropic error shape, an x-request-id
expect_anthropic_error() {
    expect_status "$1" "$2"
    expect_header x-request-id "$2"
    expect_json 'b["type"] == "error" and set(b["error"]) == {"type", "message"} and b["error"]["message"]' "$2 (Anthropic error shape)"
}
