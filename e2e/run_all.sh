#!/usr/bin/env bash
# Start the fake provider and a gateway on free loopback ports with their own keys file,
# run every e2e/test_*.sh against them, print "N passed, M failed" last, and stop what
# was started (also on Ctrl-C or a failing script). --keep leaves both running.
#
#   e2e/run_all.sh [--keep] [test_name …]      PYTHON=… picks the interpreter (.venv/bin/python)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

PYTHON=${PYTHON:-.venv/bin/python}
READY_SECONDS=${READY_SECONDS:-15}
SCRIPT_SECONDS=${SCRIPT_SECONDS:-120}
keep=0
only=()
for arg in "$@"; do
    case $arg in
    --keep) keep=1 ;;
    -h | --help) sed -n '2,6p' "$0" | cut -c3- && exit 0 ;;
    *) only+=("$arg") ;;
    esac
done

work=$(mktemp -d "${TMPDIR:-/tmp}/llm-gateway-e2e.XXXXXX")
started=()
running=

# stop PID: TERM, then KILL after 5 s; only ever a process this script started
stop() {
    kill -TERM "$1" 2>/dev/null || return 0
    for _ in $(seq 50); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$1" 2>/dev/null || true
}

cleanup() {
    trap - EXIT INT TERM
    [[ -n "$running" ]] && stop "$running"
    ((keep)) && ((${#started[@]})) && return
    for pid in "${started[@]}"; do stop "$pid"; done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM

die() {
    echo "run_all: $*" >&2
    echo "0 passed, 1 failed"
    exit 1
}

# wait_for_line FILE PATTERN PID: the first line of FILE matching PATTERN, within READY_SECONDS
wait_for_line() {
    local line
    for _ in $(seq $((READY_SECONDS * 10))); do
        line=$(grep -m1 -E "$2" "$1" 2>/dev/null) && { echo "$line"; return 0; }
        kill -0 "$3" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

[[ -x "$PYTHON" ]] || command -v "$PYTHON" >/dev/null || die "no Python at $PYTHON: run 'make test' (it creates .venv) or set PYTHON"

# The fake provider picks its own free port and prints it.
"$PYTHON" -m tests.fake_provider --host 127.0.0.1 --port 0 >"$work/fake.log" 2>&1 &
started+=($!)
fake_line=$(wait_for_line "$work/fake.log" '^fake provider on http://' "${started[-1]}") ||
    die "the fake provider did not start within ${READY_SECONDS}s: $(tail -5 "$work/fake.log")"
fake_url=${fake_line#fake provider on }

cat >"$work/keys.json" <<JSON
{
  "providers": {
    "openai": {"base_url": "$fake_url/v1"},
    "anthropic": {"base_url": "$fake_url/v1"}
  },
  "virtual_keys": {
    "vk_e2e_openai_7c1d9a3f5b": {"provider": "openai", "api_key": "sk-e2e-real-openai-0000", "name": "e2e-openai"},
    "vk_e2e_anthropic_2e8b4d6f0a": {"provider": "anthropic", "api_key": "sk-ant-e2e-real-1111", "name": "e2e-anthropic"},
    "vk_e2e_limited_9f3a5c7e1d": {
      "provider": "openai", "api_key": "sk-e2e-real-limited-2222", "name": "e2e-limited",
      "quota": {"requests": 3, "window_seconds": 3600}
    }
  }
}
JSON

export KEYS_FILE_PATH=$work/keys.json
export LOG_TO_FILE=true LOG_FILE_PATH=$work/interactions.jsonl
export MAX_BODY_BYTES=65536 SHUTDOWN_GRACE_SECONDS=5 SERVER_HOST=127.0.0.1

# A free port can be taken between the probe and the bind: try a few.
for attempt in 1 2 3; do
    SERVER_PORT=$(free_port)
    export SERVER_PORT
    "$PYTHON" gateway.py >"$work/gateway.log" 2>&1 &
    started+=($!)
    wait_for_line "$work/gateway.log" '^llm-gateway listening on ' "${started[-1]}" >/dev/null && break
    grep -q 'already in use' "$work/gateway.log" && ((attempt < 3)) && continue
    die "the gateway did not start within ${READY_SECONDS}s: $(tail -5 "$work/gateway.log")"
done

export GATEWAY_URL=http://127.0.0.1:$SERVER_PORT
ready=0
for _ in $(seq $((READY_SECONDS * 10))); do
    [[ "$(curl -s -o /dev/null -w '%{http_code}' "$GATEWAY_URL/ready")" == 200 ]] && ready=1 && break
    sleep 0.1
done
((ready)) || die "$GATEWAY_URL/ready did not answer 200 within ${READY_SECONDS}s: $(tail -5 "$work/gateway.log")"

export GATEWAY_KEY=vk_e2e_openai_7c1d9a3f5b
export GATEWAY_ANTHROPIC_KEY=vk_e2e_anthropic_2e8b4d6f0a
export GATEWAY_LIMITED_KEY=vk_e2e_limited_9f3a5c7e1d
export LOG_FILE=$LOG_FILE_PATH
export E2E_FAKE=1

echo "gateway $GATEWAY_URL in front of the fake provider $fake_url (files in $work)"
passed=0
failed=0
failures=()
for script in e2e/test_*.sh; do
    name=$(basename "$script" .sh)
    if ((${#only[@]})) && [[ " ${only[*]} " != *" $name "* && " ${only[*]} " != *" $name.sh "* ]]; then
        continue
    fi
    started_at=$EPOCHREALTIME
    # In the background so that a signal interrupts `wait` at once and reaches cleanup.
    timeout "$SCRIPT_SECONDS" bash "$script" >"$work/$name.out" 2>&1 &
    running=$!
    wait "$running"
    rc=$?
    running=
    took=$(awk -v a="$started_at" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
    if ((rc == 0)); then
        passed=$((passed + 1))
        echo "ok   $name (${took}s)"
    else
        failed=$((failed + 1))
        failures+=("$name")
        ((rc == 124)) && echo "timed out after ${SCRIPT_SECONDS}s" >>"$work/$name.out"
        echo "FAIL $name (${took}s)"
        sed 's/^/     /' "$work/$name.out"
    fi
done

if ((failed)); then
    echo "--- the gateway's output, last lines:"
    tail -20 "$work/gateway.log" | sed 's/^/     /'
fi
if ((keep)); then
    echo "left running (--keep): stop them with: kill ${started[*]}  (files in $work)"
    echo "export GATEWAY_URL=$GATEWAY_URL GATEWAY_KEY=$GATEWAY_KEY GATEWAY_ANTHROPIC_KEY=$GATEWAY_ANTHROPIC_KEY" \
        "GATEWAY_LIMITED_KEY=$GATEWAY_LIMITED_KEY LOG_FILE=$LOG_FILE MAX_BODY_BYTES=$MAX_BODY_BYTES E2E_FAKE=1"
fi
echo "$passed passed, $failed failed"
((failed == 0))
