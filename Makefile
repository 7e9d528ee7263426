# The two commands of the README. Each sets up what it needs on a fresh machine:
# a virtualenv with the three distributions (gateway/, the operator, devenv/), redis-server (Debian), and
# kube-apiserver/kubectl/etcd built from their Go modules (cached in ~/.cache/secured-endpoint-operator,
# reused afterwards).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint unit e2e setup control-plane services clean

demo: setup control-plane
	$(BIN)/sep-devenv demo

test: setup control-plane lint
	$(BIN)/pytest -p no:cacheprovider --durations=15 tests

lint: setup
	@echo "[test] ruff"
	$(BIN)/ruff check operator gateway devenv tests examples benchmarks
	@echo "[test] mypy (strict)"
	$(BIN)/mypy
	@echo "[test] import layers (import-linter)"
	$(BIN)/lint-imports

unit: setup
	$(BIN)/pytest -p no:cacheprovider -m "not e2e" tests

e2e: setup control-plane
	$(BIN)/pytest -p no:cacheprovider -m e2e tests

setup: $(STAMP) services

$(STAMP): pyproject.toml gateway/pyproject.toml devenv/pyproject.toml
	@echo "[setup] virtualenv $(VENV) with the gateway library, the operator, the dev harness and dev tools"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ./gateway
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet -e ./devenv
	@touch $(STAMP)

services:
	@command -v redis-server >/dev/null || { \
	  echo "[setup] installing redis-server (Debian package)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }

control-plane: $(STAMP)
	@echo "[setup] kube-apiserver, kubectl, etcd (built from source on the first run, then cached)"
	$(BIN)/sep-devenv build-control-plane

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .import_linter_cache

# The operator's image without a registry: a Debian base made with mmdebstrap, the Dockerfile built on it with
# podman, an archive for containerd; all cached in ~/.cache/secured-endpoint-operator/image (see the script).
.PHONY: image
image:
	devenv/build-image.sh
