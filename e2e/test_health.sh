#!/usr/bin/env bash
# /health answers 200 with the gateway's status and its providers; /ready answers 200 while serving.
# shellcheck source=e2e/lib.sh
source "$(dirname "$0")/lib.sh"

call GET /health
expect_status 200 "GET /health"
expect_json 'b["status"] == "healthy"' "GET /health status"
expect_json 'isinstance(b["uptime_seconds"], (int, float)) and b["uptime_seconds"] >= 0' "GET /health uptime_seconds"
expect_json 'isinstance(b["providers"], dict) and b["providers"] and all({"keys", "healthy", "last_error"} <= set(p) for p in b["providers"].values())' "GET /health providers"

call GET /ready
expect_status 200 "GET /ready"

pass
