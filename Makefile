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

.PHONY: help venv build-dev test test-build lint demo bench sim simulate clean fuzz

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

# `make test` lints while it builds: clippy-driver compiles the workspace's own crates (clippy's
# lints with -D warnings, as `make lint`, then the code as rustc would), so the dependencies are
# compiled once instead of once checked for clippy and once built. The Python and Node tools
# install meanwhile. A later `cargo build` without CLIPPY_BUILD rebuilds the workspace's crates,
# not the dependencies.
CLIPPY_BUILD = RUSTC_WORKSPACE_WRAPPER="$$(rustc --print sysroot)/bin/clippy-driver" CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__

test: ## Everything CI runs: lint, unit and integration tests over the local stack, deploy checks
	$(MAKE) --no-print-directory -j --output-sync=line venv infra-tools test-build
	$(CLIPPY_BUILD) $(CARGO) test --workspace --no-fail-fast
	$(MAKE) --no-print-directory infra-test

test-build: # make test's build: rustfmt check, then every crate, binary and test built with clippy -D warnings
	$(CARGO) fmt --all --check
	$(CLIPPY_BUILD) $(CARGO) build --workspace --bins --tests

demo: venv ## Run the whole job on the local stack (moto + runtime emulator + Braze simulator), ending with both status commands
	$(CARGO) build --workspace --bins
	$(CARGO) run --quiet -p harness --bin demo

bench: venv ## Benchmarks (release): diff, send and Currents figures next to their same-run baselines -> target/bench/*.json
	$(CARGO) build --release -p braze-sync -p currents-normalize -p harness --bins --features currents-normalize/dev
	$(CARGO) run --release --quiet -p braze-sync --bin sync-diff-bench
	$(CARGO) run --release --quiet -p braze-sync --bin sync-scale-bench -- --users $(SCALE_USERS)
	$(CARGO) run --release --quiet -p harness --bin sync-send-bench
	MIMALLOC_PURGE_DELAY=-1 $(CARGO) run --release --quiet -p currents-normalize --features dev --bin currents-bench
	@echo "Figures written to target/bench/"; ls target/bench/

# sync-scale-bench route size: 10M users needs ~15 GB of free disk in /tmp (exports, spill,
# checkpoints and state of the first run); `make bench SCALE_USERS=1000000` for a quick run.
SCALE_USERS ?= 10000000

FUZZ_SECONDS ?= 600
fuzz: ## Run every cargo-fuzz target in fuzz/ for FUZZ_SECONDS each (stable via RUSTC_BOOTSTRAP, no sanitizer); findings land in fuzz/artifacts/
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	cd fuzz && for t in $$(cargo fuzz list); do \
		mkdir -p .corpus/$$t && \
		RUSTC_BOOTSTRAP=1 nice -n 19 cargo fuzz run $$t -s none .corpus/$$t corpus/$$t -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 || exit 1; \
	done

sim: ## Run the Braze simulator on 127.0.0.1:4010 (key: sim-key)
	$(CARGO) run -p braze-sim -- --port 4010 --api-key sim-key

# Seeds SEED_START..SEED_START+SEEDS of the protocol simulation (testkit/sim), on every core.
SEEDS ?= 1000
SEED_START ?= 0
simulate: ## Deterministic simulation of braze-sync (crashes, lost answers, races): violations with their replay command -> target/bench/sim.json
	$(CARGO) build --release -p sim --bin simulate
	./target/release/simulate --seeds $(SEEDS) --seed-start $(SEED_START) --out target/bench/sim.json > /dev/null

clean: ## Remove build output, venvs and installed node modules
	$(CARGO) clean
	rm -rf $(VENV) .venv-infra infra/node_modules infra/cdk.out .aws-sam
# --- Deployment: template.yaml (SAM) and the CDK construct in infra/ -------------------------
VENV_INFRA := .venv-infra
INFRA_SAM_STAMP := $(VENV_INFRA)/sam/.installed
INFRA_CHECKOV_STAMP := $(VENV_INFRA)/checkov/.installed
INFRA_NODE_STAMP := infra/node_modules/.installed
# Offline and quiet: SAM needs a region (and credential-shaped values) even to validate; the CDK
# CLI must not look for new versions or notices, nor send telemetry.
SAM_ENV := AWS_DEFAULT_REGION=us-east-1 AWS_ACCESS_KEY_ID=offline AWS_SECRET_ACCESS_KEY=offline SAM_CLI_TELEMETRY=0
CDK_ENV := CDK_DISABLE_VERSION_CHECK=1 CDK_DISABLE_CLI_TELEMETRY=true
CFN_LINT := $(VENV_INFRA)/sam/bin/cfn-lint --include-checks I --
CHECKOV := $(VENV_INFRA)/checkov/bin/checkov --quiet --compact --skip-download --framework cloudformation -f
LAMBDA_TARGET := aarch64-unknown-linux-gnu

.PHONY: infra-tools infra-test build deploy dashboard

$(INFRA_SAM_STAMP): testkit/requirements-infra.txt
	$(PYTHON) -m venv $(VENV_INFRA)/sam
	$(VENV_INFRA)/sam/bin/pip install --quiet --disable-pip-version-check -r testkit/requirements-infra.txt
	touch $@

$(INFRA_CHECKOV_STAMP): testkit/requirements-checkov.txt
	$(PYTHON) -m venv $(VENV_INFRA)/checkov
	$(VENV_INFRA)/checkov/bin/pip install --quiet --disable-pip-version-check -r testkit/requirements-checkov.txt
	touch $@

$(INFRA_NODE_STAMP): infra/package.json infra/package-lock.json
	cd infra && npm ci --no-audit --no-fund
	touch $@

dashboard: ## Paste infra/dashboard.json (the operations dashboard the CDK construct reads) into template.yaml
	$(PYTHON) infra/scripts/paste-dashboard.py

infra-tools: $(INFRA_SAM_STAMP) $(INFRA_CHECKOV_STAMP) $(INFRA_NODE_STAMP) ## Install the pinned deployment checkers (.venv-infra, infra/node_modules)

infra-test: infra-tools ## template.yaml and the CDK construct: cfn-lint, sam validate --lint, checkov, tsc, construct and parity tests, cdk synth
	$(SAM_ENV) $(CFN_LINT) template.yaml
	$(SAM_ENV) $(VENV_INFRA)/sam/bin/sam validate --lint --template template.yaml
	$(CHECKOV) template.yaml
	cd infra && npx tsc --noEmit
	cd infra && node --import tsx --test test/*.test.ts
	cd infra && rm -rf cdk.out && $(CDK_ENV) npx cdk synth --quiet --no-notices -c stubAssets=true
	$(SAM_ENV) $(CFN_LINT) infra/cdk.out/BrazeBridge.template.json
	$(CHECKOV) infra/cdk.out/BrazeBridge.template.json

build: venv ## Build both functions for Lambda (release, arm64): target/lambda/<function>/bootstrap.zip
	rustup target add $(LAMBDA_TARGET)
	$(CARGO) lambda build --release --arm64 --output-format zip --bin braze-sync --bin currents-normalize
	@$(PYTHON) -c 'import glob, os, zipfile; [print(f"{p}: {os.path.getsize(p):,} bytes zipped, {sum(i.file_size for i in zipfile.ZipFile(p).infolist()):,} bytes unzipped") for p in sorted(glob.glob("target/lambda/*/bootstrap.zip"))]'

deploy: venv $(INFRA_SAM_STAMP) ## sam build + sam deploy of template.yaml (guided the first time, or with GUIDED=1)
	rustup target add $(LAMBDA_TARGET)
	SAM_CLI_TELEMETRY=0 $(VENV_INFRA)/sam/bin/sam build --template template.yaml
	if [ -f samconfig.toml ] && [ -z "$(GUIDED)" ]; then \
		SAM_CLI_TELEMETRY=0 $(VENV_INFRA)/sam/bin/sam deploy; \
	else \
		SAM_CLI_TELEMETRY=0 $(VENV_INFRA)/sam/bin/sam deploy --guided; \
	fi
