# The two commands a newcomer needs: `make demo` and `make test`. Both install whatever is
# missing first (Debian packages, cargo-pgrx 0.18.0, its pg15 configuration) and are quick when
# everything is already there.

SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)
PG_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config
# `cargo pgrx install` writes into the system's PostgreSQL directories.
PGRX_SUDO := $(if $(filter 0,$(shell id -u)),,--sudo)

.PHONY: all deps build install-ext test demo bench fuzz-check fmt clippy clean

all: build

deps:
	@bash scripts/install-deps.sh

build: deps
	cargo build --workspace --all-targets

# Build and install the `neon` extension into Debian's PostgreSQL 15.
install-ext: deps
	cd pg_ext && cargo pgrx install --release --pg-config $(PG_CONFIG) $(PGRX_SUDO)

test: deps install-ext
	cargo test --workspace --no-fail-fast
	$(MAKE) --no-print-directory fuzz-check

demo: deps install-ext
	cargo run --quiet -p neon-tests --bin demo

# Benchmarks that print tables, each figure beside its anchor measured in the same run:
# WAL decoding beside pg_waldump, wal-redo beside Neon's published bench_walredo figures, page store
# ingest beside pgbench's WAL rate and a standby's replay.
bench: deps install-ext
	bash bench/decode
	bash bench/walredo
	bash bench/ingest
	bash bench/basebackup
	bash bench/sql

# The fuzz target must keep compiling; running it is `cd sidecar/fuzz && cargo fuzz run decode_wal`.
fuzz-check:
	cd sidecar/fuzz && cargo check --quiet

fmt:
	cargo fmt --all

clippy:
	cargo clippy --workspace --all-targets

clean:
	cargo clean
