#!/usr/bin/env bash
# Runs every test of the workspace (unit, property, store and integration
# tests through the real binaries), installing RocksDB's build needs first,
# HAProxy and wrk for the load balancer test, systemd-analyze for the
# units' test, iproute2 for the data centres in network namespaces,
# Chromium and Playwright (npm) for the web view's test (each skipped
# without them, unless CONVOY_REQUIRE_LB, CONVOY_REQUIRE_SERVICE,
# CONVOY_REQUIRE_NETNS or CONVOY_REQUIRE_WEB is set).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/build-deps.sh
ensure_build_deps
ensure_rocksdb
ensure_commands "the load balancer test" haproxy wrk ||
    [ -z "${CONVOY_REQUIRE_LB:-}" ]
ensure_commands "the systemd units' test" systemd-analyze:systemd ||
    [ -z "${CONVOY_REQUIRE_SERVICE:-}" ]
ensure_commands "the network namespace tests" ip:iproute2 tc:iproute2 ||
    [ -z "${CONVOY_REQUIRE_NETNS:-}" ]
if ensure_commands "the web view test" chromium:chromium npm:npm; then
    [ -d tests/web/node_modules/playwright-core ] ||
        npm ci --prefix tests/web --no-audit --no-fund --loglevel=error ||
        [ -z "${CONVOY_REQUIRE_WEB:-}" ]
else
    [ -z "${CONVOY_REQUIRE_WEB:-}" ]
fi
exec cargo test --workspace "$@"
