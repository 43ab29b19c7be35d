#!/usr/bin/env bash
# Runs every test of the workspace (unit, property, store and integration
# tests through the real binaries), installing RocksDB's build needs first,
# HAProxy and wrk for the load balancer test, systemd-analyze for the
# units' test, iproute2 for the data centres in network namespaces (each
# skipped without them, unless CONVOY_REQUIRE_LB, CONVOY_REQUIRE_SERVICE or
# CONVOY_REQUIRE_NETNS is set).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/build-deps.sh
ensure_build_deps
ensure_commands "the load balancer test" haproxy wrk ||
    [ -z "${CONVOY_REQUIRE_LB:-}" ]
ensure_commands "the systemd units' test" systemd-analyze:systemd ||
    [ -z "${CONVOY_REQUIRE_SERVICE:-}" ]
ensure_commands "the network namespace tests" ip:iproute2 tc:iproute2 ||
    [ -z "${CONVOY_REQUIRE_NETNS:-}" ]
exec cargo test --workspace "$@"
