# llm-gateway — every target installs what it needs first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test unit e2e demo bench docker-build docker-run docker-stop docker-check lint clean

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

keys.json:
	cp keys.example.json keys.json
	@echo "created keys.json from keys.example.json: put your real provider keys in it"

# run: start the gateway on 0.0.0.0:8080 (settings from the environment or flags)
run: $(STAMP) keys.json
	$(PY) gateway.py $(ARGS)

# test: install everything, then run every test (unit, integration, SDK, e2e scripts)
test: $(STAMP)
	$(PY) -m pytest -q

# unit: the pytest suite alone
unit: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
