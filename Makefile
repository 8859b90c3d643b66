# llm-gateway — every target installs what it needs first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run
DOCKER ?= docker
DOCKER_PORT ?= 8080

.PHONY: bench-foundations bench-failover run check lint test unit e2e demo bench bench-profile bench-redis bench-tracing bench-connections system-packages docker-build docker-run docker-stop docker-check clean \
	example-openai-chat example-openai-stream example-anthropic example-curl node-sdks

# Python 3.11 or newer (pins such as genai-prices need it), said in one line before a venv is
# made with an older one; a .venv made so before is named, or every make run would keep it.
NEEDS_PYTHON = import sys; sys.exit(None if sys.version_info >= (3, 11) else "llm-gateway needs Python 3.11 or newer; " + sys.argv[1] + " is Python " + sys.version.split()[0] + sys.argv[2])

# Running needs requirements.txt only; tests, examples and the benchmark add requirements-dev.txt.
$(RUN_STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -c '$(NEEDS_PYTHON)' "$(PYTHON)" ": install one, then make run PYTHON=python3.11"
	@test ! -x $(PY) || $(PY) -c '$(NEEDS_PYTHON)' "$(VENV)" ": rm -rf $(VENV), then make run PYTHON=python3.11"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP) requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

keys.json:
	cp keys.example.json keys.json
	@echo "created keys.json from keys.example.json: put your real provider keys in it"

# run: start the gateway on 0.0.0.0:8080 (settings from the environment, or ARGS="--server-port 9000");
# FAKE=1: in front of the bundled fake provider, with keys.example.json's keys (no account needed)
run: $(RUN_STAMP) $(if $(FAKE),,keys.json)
	$(if $(FAKE),PYTHON=$(PY) bash e2e/fake_run.sh,$(PY) gateway.py) $(ARGS)

# check: the settings (environment, ARGS flags) and keys.json checked without starting: every
# problem on its own line, exit code 2 when there is one (ARGS="other.json" checks another file)
check: $(RUN_STAMP)
	$(PY) gateway.py --check $(ARGS)

# lint: ruff (lint rules and formatting) over the code and tests, mypy --strict over proxy/
LINTED := proxy tests bench gateway.py
lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/mypy --strict proxy

# test: install everything (venv, redis-server, prometheus, nginx, podman for the image check, the
# Node SDKs), lint, then run every test, on two pytest-xdist workers: 2,784 tests in 16.6 min on
# loaded cores against 32 min in one worker, under the 15 min CI asks of a quieter machine.
# The Debian packages need root (apt-get); without root, install them yourself or use `make unit`.
test: lint $(STAMP) system-packages node-sdks
	$(PY) -m pytest -q -n 2

# unit: the fast levels (the tests marked unit or app: tests/unit, tests/app, and the memory runs of
# tests/process/test_tracker.py; no real process, no system package), in about five minutes
# on two pytest-xdist workers (2,433 tests in 5.4 min here, another session beside it)
unit: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "unit or app" tests

# system-packages: Debian packages the tests need, installed only when missing
system-packages:
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }
	@command -v promtool >/dev/null || { apt-get update -qq && apt-get install -y -qq prometheus >/dev/null; }
	@command -v nginx >/dev/null || { apt-get update -qq && apt-get install -y -qq nginx >/dev/null; }

# node-sdks: the official Node SDKs that tests/process/test_node_sdks.py drives, pinned, in .node/
# (git-ignored), installed only when .node/ holds other versions or none: 10 to 20 s once, then
# nothing. openai 7 declares Node >= 22; what the test drives runs on Node 20 as well.
NODE_SDKS := openai@7.60.0 @anthropic-ai/sdk@1.17.0
node-sdks:
	@command -v npm >/dev/null || { apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null; }
	@test "$$(cat .node/installed 2>/dev/null)" = "$(NODE_SDKS)" || { \
		npm install --prefix .node --save-exact --no-audit --no-fund --loglevel=error $(NODE_SDKS) \
		&& echo "$(NODE_SDKS)" >.node/installed; }

# e2e: the shell scripts in e2e/ against a real gateway in front of the fake provider
e2e: $(STAMP)
	PYTHON=$(PY) bash e2e/run_all.sh

# demo: a fake provider and a gateway, a tour of calls, the log, the metrics and a 429; no key needed
# (KEEP=1: leave both running afterwards, to try the printed commands)
demo: $(STAMP)
	PYTHON=$(PY) KEEP=$(KEEP) bash e2e/demo.sh

# example-*: run one of examples/ with the project's venv against a running gateway (`make run`):
# GATEWAY_URL (default http://localhost:8080), GATEWAY_KEY (default keys.example.json's key)
GATEWAY_URL ?= http://localhost:8080
example-openai-chat: $(STAMP)
	GATEWAY_URL=$(GATEWAY_URL) GATEWAY_KEY=$(or $(GATEWAY_KEY),vk_user1_openai) $(PY) examples/openai_chat.py

example-openai-stream: $(STAMP)
	GATEWAY_URL=$(GATEWAY_URL) GATEWAY_KEY=$(or $(GATEWAY_KEY),vk_user1_openai) $(PY) examples/openai_stream.py

example-anthropic: $(STAMP)
	GATEWAY_URL=$(GATEWAY_URL) GATEWAY_KEY=$(or $(GATEWAY_KEY),vk_user2_anthropic) $(PY) examples/anthropic_messages.py

example-curl:
	GATEWAY_URL=$(GATEWAY_URL) GATEWAY_KEY=$(or $(GATEWAY_KEY),vk_user1_openai) \
		GATEWAY_ANTHROPIC_KEY=$(or $(GATEWAY_ANTHROPIC_KEY),vk_user2_anthropic) bash examples/curl.sh

# bench: the gateway against the floor, the best bare foundation and a direct call (issue 30's targets,
# HOLDS or MISSES), the scale figures (10,000 keys, routes and pools, reloads, Redis, WORKERS=2), pricing,
# tap memory, the cache's hits; the full run adds failover and tracing (QUICK=1: about 2 minutes)
bench: $(STAMP)
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
	$(PY) bench/run.py $(if $(QUICK),--quick)
	$(PY) bench/scale.py $(if $(QUICK),--quick)
	@if command -v redis-server >/dev/null; then $(PY) bench/workers.py $(if $(QUICK),--quick --reps 2); \
	else echo "bench: redis-server is not installed: WORKERS=2 against 1 skipped (make system-packages)"; fi
	$(PY) bench/pricing.py $(if $(QUICK),--quick)
	$(PY) bench/cache.py $(if $(QUICK),--quick)
	$(PY) bench/tap_memory.py $(if $(QUICK),--quick)
	$(if $(QUICK),,$(PY) bench/failover.py)
	$(if $(QUICK),,$(PY) bench/tracing.py)

# bench-profile: py-spy on the gateway and the floor under load: CPU per request, step by step (QUICK=1: ~30 s)
bench-profile: $(STAMP)
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
	$(PY) bench/profile_steps.py $(if $(QUICK),--quick)

# bench-foundations: the bare passthrough on each server and upstream client, interleaved (bench/foundations.py)
bench-foundations: $(STAMP)
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
	$(PY) -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	$(PY) bench/ab.py --check-stream floor floor-gc foundation:app+session foundation:lowlevel+session+gc \
		foundation:lowlevel+aiosonic+gc foundation:lowlevel+pyreqwest+gc foundation:app+wire+gc foundation:lowlevel+wire+gc

# bench-failover: the no-failure path against a failover (primary refusing at once), one gateway, one run
bench-failover: $(STAMP)
	$(PY) bench/failover.py $(if $(QUICK),--quick)

# bench-redis: Redis admission against memory, and WORKERS=2 against WORKERS=1
bench-redis: $(STAMP) system-packages
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
	$(PY) bench/redis_admit.py
	$(PY) bench/workers.py $(if $(QUICK),--quick)

# bench-tracing: the gateway with OpenTelemetry traces on against off, CPU µs per request (QUICK=1: ~20 s)
bench-tracing: $(STAMP)
	$(PY) bench/tracing.py $(if $(QUICK),--quick)

# bench-connections: RSS and latency while 300 connections dribble request heads
bench-connections: $(STAMP)
	$(PY) bench/connections.py

# docker-build: build the image (DOCKER=podman where there is no Docker engine). BUILDAH_FORMAT:
# podman builds OCI images by default and drops the HEALTHCHECK, which only Docker's format holds
docker-build:
	BUILDAH_FORMAT=docker $(DOCKER) build -t llm-gateway .

# docker-run: the gateway in a container on :8080 (DOCKER_PORT=9000: another host port), keys.json
# mounted read-only (DOCKER_ARGS="-e QUOTA_LIMIT=10" adds settings; DOCKER=podman without Docker)
docker-run: keys.json
	$(DOCKER) run -d --name llm-gateway -p $(DOCKER_PORT):8080 -v $(CURDIR)/keys.json:/app/keys.json:ro $(DOCKER_ARGS) llm-gateway

# docker-stop: SIGTERM, time to drain (SHUTDOWN_GRACE_SECONDS + margin), then remove
docker-stop:
	$(DOCKER) stop -t 35 llm-gateway && $(DOCKER) rm llm-gateway

# docker-check: verify the Dockerfile without a Docker engine (podman + buildah as root, see e2e/docker_check.sh)
docker-check: $(STAMP)
	PYTHON=$(PY) bash e2e/docker_check.sh

clean:
	rm -rf $(VENV) .pytest_cache
