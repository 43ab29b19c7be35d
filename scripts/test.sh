#!/usr/bin/env bash
# Runs every test of the workspace (unit, property, store and integration
# tests through the real binaries), installing RocksDB's build needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/build-deps.sh
ensure_build_deps
exec cargo test --workspace "$@"
