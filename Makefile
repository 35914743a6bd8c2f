# Amperity <-> Braze bridge. Quick start: `make demo`, `make test`.
# Every tool a target needs is installed by the target itself into git-ignored folders
# (.venv for Python tools, infra/node_modules for CDK).

SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
VENV_STAMP := $(VENV)/.installed
CARGO ?= cargo
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: help venv build-dev test lint unit demo bench sim clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

$(VENV_STAMP): testkit/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r testkit/requirements.txt
	touch $@

venv: $(VENV_STAMP) ## Install the pinned Python test tools (moto, cargo-lambda, pyarrow) into .venv

build-dev: ## Build every crate and function binary (debug) once, for tests and the demo
	$(CARGO) build --workspace --bins --tests

lint: ## rustfmt check and clippy with -D warnings
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test: venv lint build-dev ## Everything CI runs: lint, unit and integration tests over the local stack
	$(CARGO) test --workspace --no-fail-fast

demo: venv ## Run the whole job on the local stack (moto + runtime emulator + Braze simulator)
	$(CARGO) build --workspace --bins
	$(CARGO) run --quiet -p harness --bin demo

sim: ## Run the Braze simulator on 127.0.0.1:4010 (key: sim-key)
	$(CARGO) run -p braze-sim -- --port 4010 --api-key sim-key

clean: ## Remove build output and the venv
	$(CARGO) clean
	rm -rf $(VENV)
