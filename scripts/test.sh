#!/usr/bin/env bash
# Runs every test of the workspace (unit, property, store and integration
# tests through the real binaries), installing RocksDB's build needs first,
# HAProxy and wrk for the load balancer test, systemd-analyze for the
# units' test (each skipped without them, unless CONVOY_REQUIRE_LB or
# CONVOY_REQUIRE_SERVICE is set).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/build-deps.sh
ensure_build_deps
ensure_commands "the load balancer test" haproxy wrk ||
    [ -z "${CONVOY_REQUIRE_LB:-}" ]
ensure_commands "the systemd units' test" systemd-analyze:systemd ||
    [ -z "${CONVOY_REQUIRE_SERVICE:-}" ]
exec cargo test --workspace "$@"
