#!/usr/bin/env bash
# make run FAKE=1: the gateway on its usual address (0.0.0.0:8080, or what ARGS and the
# environment say) in front of the bundled fake provider, with keys.example.json's virtual
# keys pointed at it. The README's Quick try, its SDK snippets and every `make example-*`
# then work unchanged with no provider account and no network. Ctrl-C stops both.
# Arguments are passed to gateway.py.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
READY_SECONDS=${READY_SECONDS:-15}

work=$(mktemp -d "${TMPDIR:-/tmp}/llm-gateway-fake.XXXXXX")
fake=
gateway=
cleanup() {
    trap - EXIT INT TERM
    [[ -n "$gateway" ]] && kill -TERM "$gateway" 2>/dev/null && wait "$gateway"
    [[ -n "$fake" ]] && kill -TERM "$fake" 2>/dev/null && wait "$fake"
    rm -rf "$work"
}
trap cleanup EXIT
# Ctrl-C reaches every process of the terminal's group; a lone SIGTERM reaches only this
# script: either way the gateway is asked to drain, and the fake provider stops after it.
trap '[[ -n "$gateway" ]] && kill -TERM "$gateway" 2>/dev/null' INT TERM

"$PYTHON" -m tests.support.fake_provider --host 127.0.0.1 --port 0 >"$work/fake.log" 2>&1 &
fake=$!
fake_url=
for _ in $(seq $((READY_SECONDS * 10))); do
    fake_url=$(grep -m1 -oE 'http://[0-9.]+:[0-9]+' "$work/fake.log" 2>/dev/null) && break
    kill -0 "$fake" 2>/dev/null || break
    sleep 0.1
done
if [[ -z "$fake_url" ]]; then
    echo "llm-gateway: the fake provider did not start: $(tail -3 "$work/fake.log")" >&2
    exit 1
fi

# keys.example.json, every provider answered by the fake, every real key a harmless stand-in.
"$PYTHON" - "$fake_url" >"$work/keys.json" <<'PY' || exit 1
import json
import sys

url = sys.argv[1]
with open("keys.example.json") as example:
    keys = json.load(example)


def stand_in(node):
    if isinstance(node, dict):
        if "api_key" in node or "api_key_env" in node:
            node.pop("api_key_env", None)
            node["api_key"] = "sk-fake-provider-needs-no-key"
        for value in node.values():
            stand_in(value)
    elif isinstance(node, list):
        for value in node:
            stand_in(value)


stand_in(keys["virtual_keys"])
declared = keys.get("providers", {})
for name in {"openai", "anthropic", "gemini", "azure", *declared}:
    declared.setdefault(name, {})["base_url"] = f"{url}/v1"
keys["providers"] = declared
json.dump(keys, sys.stdout, indent=2)
PY

echo "llm-gateway: FAKE=1: every provider is the fake provider at $fake_url (no account, no" \
    "network), the keys are keys.example.json's ($work/keys.json); Ctrl-C stops both" >&2
KEYS_FILE_PATH=$work/keys.json "$PYTHON" gateway.py "$@" &
gateway=$!
status=0
while kill -0 "$gateway" 2>/dev/null; do
    wait "$gateway"
    status=$?
done
gateway=
exit "$status"
