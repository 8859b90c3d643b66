#!/usr/bin/env bash
# Sourced by run_all.sh and demo.sh: start the fake provider and a gateway in front of it
# on free loopback ports, with their own keys file in a temp dir, and stop them on exit
# (also on Ctrl-C). Needs PYTHON, READY_SECONDS and keep (1: leave them running) set.
# Exports GATEWAY_URL, GATEWAY_KEY, GATEWAY_ANTHROPIC_KEY, GATEWAY_LIMITED_KEY, LOG_FILE.

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
"$PYTHON" -m tests.support.fake_provider --host 127.0.0.1 --port 0 >"$work/fake.log" 2>&1 &
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
