# bertserve: `make test` and `make build` set up .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
STORE  ?= model_store
RECIPE ?= build_models/recipes/minilm.yaml
# What `make run` needs before it can serve: the recipe's default served variant only.
SERVED ?= minilm

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test test-fast test-docker build run bench list report clean

venv: $(STAMP)

# Reinstall when the project's dependencies change: uv when the package index has it, pip otherwise
# (scripts/install_venv.py; BERTSERVE_INSTALLER=pip forces pip).
$(STAMP): pyproject.toml scripts/install_venv.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) scripts/install_venv.py $(PY) --extras cpu,build,tracing,grpc,dev
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

# Serve the store. When the default model is missing, build it alone first (with its quality gate);
# `make build` adds the recipe's other variants.
run: $(STAMP)
	ls $(STORE)/$(SERVED)/*/manifest.json >/dev/null 2>&1 || $(VENV)/bin/build-models build $(RECIPE) --store $(STORE) --variant $(SERVED)
	BERTSERVE_MODEL_STORE=$(STORE) $(VENV)/bin/bertserve

# Serving benchmark (needs the built store); writes bench/reports/serving.md, never asserts timings.
bench: $(STAMP)
	ls $(STORE)/$(SERVED)/*/manifest.json >/dev/null 2>&1 || $(VENV)/bin/build-models build $(RECIPE) --store $(STORE) --variant $(SERVED)
	$(PY) -m bench.run --store $(STORE)

list: $(STAMP)
	$(VENV)/bin/build-models list --store $(STORE)

report: $(STAMP)
	$(VENV)/bin/build-models report --store $(STORE)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
