#!/usr/bin/env bash
# The quick-start demo: builds convoy (installing RocksDB's build needs
# first), then runs `convoy demo` — a coordinator and 12 convoyd targets on
# loopback in 3 data centres with blue and green slices take three
# roll-outs of a generated web app: v1.0 rolling in swarm mode, v1.1 (a
# small patch) blue-green in push mode, v1.2 whose validate hook fails,
# halts and rolls back. Arguments go to `convoy demo` (--nodes N, --json,
# --keep, --lb, ...). Everything runs in a temporary directory removed at
# the end. With --lb, HAProxy and wrk are installed first when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/build-deps.sh
ensure_build_deps
ensure_rocksdb
for arg in "$@"; do
    if [ "$arg" = --lb ]; then
        ensure_commands "convoy demo --lb" haproxy wrk
    fi
done
# The same build the integration tests use, so the two share artifacts.
cargo build --quiet --workspace --bins
exec "${CARGO_TARGET_DIR:-target}/debug/convoy" demo "$@"
