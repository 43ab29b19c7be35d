#!/usr/bin/env bash
# Runs every test of the workspace (unit, property, store and integration
# tests through the real binaries), installing RocksDB's build needs first,
# and HAProxy and wrk for the load balancer test (which is skipped without
# them, unless CONVOY_REQUIRE_LB is set).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/build-deps.sh
ensure_build_deps
ensure_commands "the load balancer test" haproxy wrk ||
    [ -z "${CONVOY_REQUIRE_LB:-}" ]
exec cargo test --workspace "$@"
