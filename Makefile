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
# decode: our WAL decoder beside pg_waldump --stats and --quiet on the same files.
# walredo: redo requests beside PostgreSQL's own crash recovery of the same kind of records (per
#   record); Neon's published bench_walredo figures are printed apart as published, with no ratio.
# ingest: ingest of a pgbench run's WAL beside pgbench's WAL rate with nothing of ours running and
#   a standby's replay of the same WAL; lag is measured in a second pgbench run beside the follower.
# basebackup: a backup at a past LSN beside pg_basebackup (now) and restore + replay to the LSN,
#   both copies of the LSN booted and checked against the compute's state there.
# sql: neon_get_page from SQL beside get_raw_page; a past-LSN sequential read, prefetch off vs on.
# branch: a branch's first answer beside base backup + boot, restore + replay and pg_basebackup
#   of now + boot, same run; a cold scan on the branch beside one on a local copy.
# timetravel: neon_lsn_at from SQL with a year of transaction ends in the index, beside a sidecar
#   round trip without a lookup and a call with no sidecar at all.
# remote: uploads to an object store (SeaweedFS) beside the local layer-writing rate, their lag;
#   a cold page read (byte ranges of the files that hold it) beside a local one; attach-remote of ~1 GB to
#   its first page beside fetching the whole history.
bench: deps install-ext
	bash bench/decode
	bash bench/walredo
	bash bench/ingest
	bash bench/basebackup
	bash bench/sql
	bash bench/branch
	bash bench/timetravel
	bash bench/remote

# The fuzz target must keep compiling; running it is `cd sidecar/fuzz && cargo fuzz run decode_wal`.
fuzz-check:
	cd sidecar/fuzz && cargo check --quiet

fmt:
	cargo fmt --all

clippy:
	cargo clippy --workspace --all-targets

clean:
	cargo clean
