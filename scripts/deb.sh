#!/usr/bin/env bash
# Builds the Debian package `convoy` (both binaries, the systemd units,
# /etc/convoy/convoyd.toml, shell completions and man pages) with
# cargo-deb, installing cargo-deb first if it is missing.
#
#   scripts/deb.sh [--profile PROFILE | --from BINDIR] [--fast] [-o DIR]
#
# PROFILE is `release` unless given; --from packages the convoy and
# convoyd already built in BINDIR (the tests package their debug build
# so); --fast compresses less; the .deb goes to DIR (default: the cargo
# target directory's `debian/`). Prints its path.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/build-deps.sh
profile=release from="" out="" fast=()
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) profile="$2"; shift 2 ;;
        --from) from="$2"; shift 2 ;;
        --fast) fast=(--fast); shift ;;
        -o) out="$2"; shift 2 ;;
        *) echo "deb.sh: unknown argument $1 (see the comment at its top)" >&2; exit 2 ;;
    esac
done
if ! cargo deb --version >/dev/null 2>&1; then
    echo "installing cargo-deb" >&2
    cargo install --locked cargo-deb >&2
fi
if [ -n "$from" ]; then
    # cargo-deb takes binaries from TARGET/release: a target directory of
    # its own holds copies of the given ones.
    staging=$(mktemp -d)
    trap 'rm -rf "$staging"' EXIT
    export CARGO_TARGET_DIR="$staging/target"
    mkdir -p "$CARGO_TARGET_DIR/release"
    cp "$from/convoy" "$from/convoyd" "$CARGO_TARGET_DIR/release/"
    profile=release
    [ -n "$out" ] || out="$PWD/target/debian"
else
    ensure_build_deps
    # The dev profile links the RocksDB the other scripts build (-O0);
    # another profile leaves RocksDB to the crate, at its own level.
    if [ "$profile" = dev ]; then ensure_rocksdb; fi
    cargo build --profile "$profile" -p convoy-cli -p convoy-daemon --bins >&2
fi
target="${CARGO_TARGET_DIR:-$PWD/target}"
# Cargo names the dev profile's directory `debug`.
dir="$target/$([ "$profile" = dev ] && echo debug || echo "$profile")"
# What the binaries say of themselves, generated as cargo-deb's assets
# expect them (target/PROFILE/dist/...).
rm -rf "$dir/dist"
mkdir -p "$dir/dist/completions" "$dir/dist/man"
for bin in convoy convoyd; do
    "$dir/$bin" completions bash >"$dir/dist/completions/$bin.bash"
    "$dir/$bin" completions zsh >"$dir/dist/completions/_$bin"
    "$dir/$bin" completions fish >"$dir/dist/completions/$bin.fish"
    "$dir/$bin" man "$dir/dist/man" >/dev/null
done
gzip -9n "$dir"/dist/man/*.1
args=(-p convoy-daemon --no-build --profile "$profile" --no-strip "${fast[@]}")
[ -n "$out" ] && args+=(-o "$out")
cargo deb "${args[@]}"
