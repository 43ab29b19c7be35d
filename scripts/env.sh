# Source this (`. scripts/env.sh`) to run cargo by hand on the build the
# scripts made: it points cargo at the RocksDB they built (see
# ensure_rocksdb in scripts/build-deps.sh) and at the same target
# directory. Without it, a plain cargo command builds RocksDB the
# rocksdb crate's way (about 14 minutes here) and rebuilds what links it.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || return 1
. scripts/build-deps.sh
ensure_build_deps && ensure_rocksdb
cd - >/dev/null || return 1
