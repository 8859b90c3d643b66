#!/usr/bin/env bash
# Refused before anything goes upstream: malformed JSON (400), missing fields (400, named), oversized body (413).
# shellcheck source=e2e/lib.sh
source "$(dirname "$0")/lib.sh"
need GATEWAY_KEY "a virtual key of an OpenAI provider"
limit=${MAX_BODY_BYTES:-10485760}
auth=(-H "Authorization: Bearer $GATEWAY_KEY" -H 'Content-Type: application/json')

call POST /v1/chat/completions "${auth[@]}" --data-binary '{"model": "x", "messages": ['
expect_openai_error 400 "malformed JSON"

call POST /v1/chat/completions "${auth[@]}" --data-binary '{"messages": [{"role": "user", "content": "hi"}]}'
expect_openai_error 400 "missing model"
expect_json 'b["error"]["param"] == "model" or "model" in b["error"]["message"]' "missing model names the field"

call POST /v1/chat/completions "${auth[@]}" --data-binary "{\"model\": \"$GATEWAY_MODEL\"}"
expect_openai_error 400 "missing messages"
expect_json 'b["error"]["param"] == "messages" or "messages" in b["error"]["message"]' "missing messages names the field"

# One byte over MAX_BODY_BYTES, still valid JSON.
big=$E2E_TMP/big.json
python3 - "$limit" "$GATEWAY_MODEL" >"$big" <<'PY'
import json, sys
limit, model = int(sys.argv[1]), sys.argv[2]
head = json.dumps({"model": model, "messages": [{"role": "user", "content": ""}]})
pad = limit + 1 - len(head)
sys.stdout.write(head.replace('"content": ""', '"content": "' + "x" * pad + '"'))
PY
(($(wc -c <"$big") == limit + 1)) || fail "could not build a body of $((limit + 1)) bytes"
call POST /v1/chat/completions "${auth[@]}" --data-binary "@$big"
expect_openai_error 413 "a body of MAX_BODY_BYTES + 1 = $((limit + 1)) bytes"

pass
