# aimesh developer entry points. On a fresh Debian/Ubuntu machine with a Rust toolchain:
#   make run    start the dev servers, then the whole mesh in the foreground
#   make test   start the dev servers, then every test of the workspace
#   make stop   stop the dev servers
#   make check  formatting and clippy
#   make deps   only start the dev servers (and install what they need)
#   make bench  the whole bench, each figure beside a same-run baseline; report, Markdown summary and
#               charts in target/bench (BENCH_ARGS="--seconds 5 --scenario usage-record", "--mode open --rate 500")
#   make k8s-check  the Helm chart and the kustomize manifests, validated offline (part of test)
#   make fuzz   every cargo-fuzz target for FUZZ_SECONDS each (default 60), random seeds; `make test`
#               replays each target's committed corpus deterministically (scripts/fuzz.sh --replay)
#
# The dev servers are described in scripts/deps.sh; it writes their addresses to .dev/env,
# which each recipe below loads itself, so no shell state is needed.

SHELL := /bin/bash
CARGO ?= cargo
# Loads the addresses scripts/deps.sh wrote; a recipe line starts with it.
LOAD_ENV := set -a && . ./.dev/env && set +a

.PHONY: run test stop check deps status bench k8s-check fuzz

deps:
	scripts/deps.sh up

status:
	scripts/deps.sh status

stop:
	scripts/deps.sh stop

run: deps
	$(LOAD_ENV) && $(CARGO) build -p aimesh
	@$(LOAD_ENV) && \
	  echo "aimesh: gRPC identity $${AIMESH_IDENTITY__LISTEN:-127.0.0.1:7101}," \
	       "chat $${AIMESH_CHAT__LISTEN:-127.0.0.1:7102}, usage $${AIMESH_USAGE__LISTEN:-127.0.0.1:7103}," \
	       "files $${AIMESH_FILES__LISTEN:-127.0.0.1:7104}, analytics $${AIMESH_ANALYTICS__LISTEN:-127.0.0.1:7105};" \
	       "REST gateway http://$${AIMESH_GATEWAY__LISTEN:-127.0.0.1:8080};" \
	       "metrics on http://$${AIMESH_METRICS__LISTEN:-127.0.0.1:7190}/metrics (Ctrl-C stops the mesh)"
	$(LOAD_ENV) && exec $(CARGO) run -q -p aimesh -- all

# cargo-nextest when present (installed if possible), else cargo test. Doc tests are not run.
test: deps k8s-check
	@if ! $(CARGO) nextest --version >/dev/null 2>&1; then \
	  echo "make: cargo-nextest is missing; installing it (cargo install --locked cargo-nextest)"; \
	  $(CARGO) install --locked cargo-nextest || echo "make: could not install cargo-nextest; using cargo test"; \
	fi
	$(LOAD_ENV) && \
	if $(CARGO) nextest --version >/dev/null 2>&1; then \
	  $(CARGO) nextest run --workspace --no-fail-fast; \
	else \
	  $(CARGO) test --workspace --no-fail-fast; \
	fi
	scripts/fuzz.sh --replay

# Building the proto crate needs protoc and its well-known types: deps.sh installs both.
check:
	@if ! command -v protoc >/dev/null || ! [ -e /usr/include/google/protobuf/timestamp.proto ]; then \
	  scripts/deps.sh up; \
	fi
	@if ! $(CARGO) fmt --version >/dev/null 2>&1 || ! $(CARGO) clippy --version >/dev/null 2>&1; then \
	  rustup component add rustfmt clippy; \
	fi
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# helm lint, helm template and kubectl kustomize validated against the Kubernetes schemas,
# hardening and probe checks (scripts/k8s-check.sh); tools go to .dev/k8s on first use.
k8s-check:
	scripts/k8s-check.sh

# The fuzz targets in fuzz/ (installs cargo-fuzz when missing; see scripts/fuzz.sh). Longer:
# `make fuzz FUZZ_SECONDS=600`; one target: `scripts/fuzz.sh transcode`.
fuzz:
	scripts/fuzz.sh

# Release build; report.json, report.md and a latency chart per scenario in target/bench
# (see bench/src/main.rs and README "Benchmarks").
# The usage-scaling scenario runs the release aimesh binary as processes: it is built first.
bench: deps
	$(CARGO) build --release -p aimesh
	$(LOAD_ENV) && $(CARGO) run --release -p aimesh-bench -- $(BENCH_ARGS)
