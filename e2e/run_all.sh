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

# shellcheck source=e2e/stack.sh
source "$(dirname "$0")/stack.sh"

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
