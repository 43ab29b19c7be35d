# Sourced by the other scripts: makes sure what RocksDB's build needs is
# here (libclang for bindgen, C++ compilers), installing it with apt-get
# when it is missing and we may, and builds RocksDB once (ensure_rocksdb).

# Prints the first libclang that bindgen (clang-sys, loading at run time as
# the rocksdb crate's `bindgen-runtime` feature does) would load, and fails
# when there is none. It follows clang-sys's own rules: LIBCLANG_PATH alone
# when set; else `llvm-config --prefix`, LD_LIBRARY_PATH, LIBRARY_PATH and
# the usual directories; files named libclang.so, libclang-*.so,
# libclang.so.* or libclang-*.so.*, but never libclang-cpp (a different
# library that Debian's libclang-cpp14 ships on its own), and only 64-bit
# ELF objects. An optional ROOT prefixes the usual directories, so the rules
# can be tested against a fake tree.
find_libclang() {
    local root="${1:-}" dirs=() dir name file
    if [ -n "${LIBCLANG_PATH:-}" ]; then
        if [ -f "$LIBCLANG_PATH" ]; then
            dirs=("$(dirname "$LIBCLANG_PATH")")
        else
            dirs=("$LIBCLANG_PATH")
        fi
    else
        local prefix
        if prefix=$("${LLVM_CONFIG_PATH:-llvm-config}" --prefix 2>/dev/null); then
            dirs+=("$prefix/bin" "$prefix/lib" "$prefix/lib64")
        fi
        local IFS=:
        dirs+=(${LD_LIBRARY_PATH:-} ${LIBRARY_PATH:-})
        unset IFS
        shopt -s nullglob
        dirs+=("$root"/usr/local/llvm*/lib* "$root"/usr/local/lib*/*/* "$root"/usr/local/lib*/*
               "$root"/usr/local/lib* "$root"/usr/lib*/*/* "$root"/usr/lib*/* "$root"/usr/lib*)
        shopt -u nullglob
    fi
    for dir in "${dirs[@]}"; do
        [ -d "$dir" ] || continue
        for file in "$dir"/libclang.so "$dir"/libclang-*.so "$dir"/libclang.so.* "$dir"/libclang-*.so.*; do
            [ -f "$file" ] || continue
            name=${file##*/}
            case "$name" in *-cpp.*) continue ;; esac
            if [ -n "${LIBCLANG_PATH:-}" ] && [ -f "$LIBCLANG_PATH" ] && [ "$file" != "$LIBCLANG_PATH" ]; then
                continue
            fi
            # ELF magic, then class 2 (64-bit) at byte 4.
            [ "$(head -c 5 "$file" 2>/dev/null | od -An -tx1 | tr -d ' \n')" = "7f454c4602" ] || continue
            printf '%s\n' "$file"
            return 0
        done
    done
    return 1
}

ensure_build_deps() {
    local missing=()
    find_libclang >/dev/null || missing+=(libclang-dev)
    command -v c++ >/dev/null 2>&1 || missing+=(g++)
    # RocksDB's unity build (ensure_rocksdb) compiles about a third faster
    # with clang++ than with g++ at -O0 (measured here on db_impl.cc and
    # block_based_table_reader.cc: 13.2 and 8.2 CPU-s against 20.4 and
    # 11.5); without it, c++ does.
    if ! command -v clang++ >/dev/null 2>&1 && ! apt_install "a faster RocksDB build" clang; then
        echo "(RocksDB will be built with c++ instead of clang++)" >&2
    fi
    command -v cargo >/dev/null 2>&1 || {
        echo "cargo not found: install the Rust toolchain (https://rustup.rs) first" >&2
        return 1
    }
    [ ${#missing[@]} -eq 0 ] && return 0
    apt_install "building RocksDB" "${missing[@]}" || {
        [ -n "${LIBCLANG_PATH:-}" ] ||
            echo "(bindgen loads libclang.so, libclang-N.so or libclang.so.N; libclang-cpp is not it; LIBCLANG_PATH may name a directory holding it)" >&2
        return 1
    }
    if [[ " ${missing[*]} " == *" libclang-dev "* ]] && ! find_libclang >/dev/null; then
        echo "libclang-dev is installed but no libclang that bindgen loads was found; set LIBCLANG_PATH to the directory holding libclang.so and retry" >&2
        return 1
    fi
}

# apt_install WHY PACKAGE...: installs Debian packages (as root, or with
# sudo), saying what needs them; fails with what to run by hand.
apt_install() {
    local why="$1" sudo=""
    shift
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo="sudo"
        else
            echo "$why needs $*: run 'apt-get install $*' as root and retry" >&2
            return 1
        fi
    fi
    echo "installing what $why needs: $*" >&2
    if ! { $sudo apt-get update -qq >&2 &&
           DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >&2; }; then
        echo "could not install $*, which $why needs: install them by hand ('apt-get install $*') and retry" >&2
        return 1
    fi
}

# ensure_commands WHY COMMAND[:PACKAGE]...: installs the Debian package of
# each command missing from PATH (PACKAGE, or the command's own name).
ensure_commands() {
    local why="$1" missing=() c
    shift
    for c in "$@"; do
        command -v "${c%%:*}" >/dev/null 2>&1 ||
            PATH="$PATH:/usr/sbin:/sbin" command -v "${c%%:*}" >/dev/null 2>&1 ||
            missing+=("${c#*:}")
    done
    [ ${#missing[@]} -eq 0 ] || apt_install "$why" "${missing[@]}"
}

# ensure_rocksdb: builds the RocksDB that the rocksdb crate bundles once,
# as a unity build, and points cargo at it (exports ROCKSDB_LIB_DIR and
# ROCKSDB_STATIC, which librocksdb-sys's build script reads: it then only
# generates its bindings and links). The crate's own build compiles
# RocksDB's 343 files one by one with g++ (836 s of a first build here,
# on its critical path); compiled eight to a unit with clang++, the same
# sources with the same definitions and -O0 (the dev profile's level)
# take about a fifth of that. The library is kept under the cargo target
# directory, named by the crate's version and the compiler's, so it is
# built once. Every cargo command on that target directory must see the
# same two variables, or librocksdb-sys is built again the crate's way:
# the scripts call this; in a shell, `. scripts/env.sh` does. Set
# CONVOY_ROCKSDB_FROM_CRATE=1 to leave RocksDB to the crate. For other
# targets than x86_64 Linux, or with RUSTFLAGS (whose target features the
# crate passes on to the C++ compiler), the crate builds it as before.
ensure_rocksdb() {
    [ -z "${CONVOY_ROCKSDB_FROM_CRATE:-}" ] || return 0
    [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ] || return 0
    [ -z "${RUSTFLAGS:-}${CARGO_ENCODED_RUSTFLAGS:-}${CARGO_BUILD_RUSTFLAGS:-}" ] || return 0
    local src ver cxx=clang++ target dir id
    command -v clang++ >/dev/null 2>&1 || cxx=c++
    # The crate's version from the lock file: its sources are fetched and
    # looked up only when the library is to be built.
    ver=$(awk '$0 == "name = \"librocksdb-sys\"" { getline; gsub(/^version = "|"$/, ""); print; exit }' Cargo.lock)
    [ -n "$ver" ] || { echo "no librocksdb-sys in Cargo.lock" >&2; return 1; }
    target=${CARGO_TARGET_DIR:-target}
    mkdir -p "$target" && target=$(cd "$target" && pwd -P) || return 1
    id=$({ echo "librocksdb-sys-$ver"; "$cxx" --version | head -1; echo unity-1; } | sha256sum | cut -c1-12)
    dir="$target/rocksdb-unity/$id"
    if [ ! -f "$dir/librocksdb.a" ]; then
        src=$(rocksdb_sources) || return 1
        build_rocksdb_unity "$src" "$dir" "$cxx" || return 1
    fi
    export ROCKSDB_LIB_DIR="$dir" ROCKSDB_STATIC=1
}

# Prints the directory of the librocksdb-sys crate the lock file names,
# fetching it first.
rocksdb_sources() {
    local manifest
    cargo fetch --locked --quiet >&2 || return 1
    manifest=$(cargo metadata --format-version 1 --locked 2>/dev/null |
        grep -o '"manifest_path":"[^"]*/librocksdb-sys-[^"]*/Cargo.toml"' | head -1 |
        sed 's/^"manifest_path":"//; s/"$//')
    [ -n "$manifest" ] || { echo "cannot find the librocksdb-sys crate's sources (cargo metadata)" >&2; return 1; }
    dirname "$manifest"
}

# build_rocksdb_unity SRC DIR CXX: compiles the crate's RocksDB sources
# (its rocksdb_lib_sources.txt, with its pre-generated build_version.cc,
# as its build script does on Linux) eight files to a unit into
# DIR/librocksdb.a, as many units at once as there are cores.
build_rocksdb_unity() {
    local src="$1" dir="$2" cxx="$3" tmp="$2.tmp.$$" n=0 f jobs
    rm -rf "$tmp" && mkdir -p "$tmp" || return 1
    while read -r f; do
        [ -n "$f" ] && [ "$f" != util/build_version.cc ] || continue
        printf '#include "%s"\n' "$src/rocksdb/$f" >>"$tmp/unit-$(printf %03d $((n / 8))).cc"
        n=$((n + 1))
    done <"$src/rocksdb_lib_sources.txt"
    printf '#include "%s"\n' "$src/build_version.cc" >>"$tmp/unit-$(printf %03d $((n / 8))).cc"
    # librocksdb-sys's definitions and flags for x86_64 Linux (build.rs),
    # at -O0 without debug information as the dev profile builds it here.
    printf '%s\n' -I"$src/rocksdb/include" -I"$src/rocksdb" \
        -I"$src/rocksdb/third-party/gtest-1.8.1/fused-src" -I"$src" \
        -DNDEBUG=1 -DHAVE_ALIGNED_NEW -DHAVE_UINT128_EXTENSION -DOS_LINUX \
        -DROCKSDB_PLATFORM_POSIX -DROCKSDB_LIB_IO_POSIX -DROCKSDB_SCHED_GETCPU_PRESENT \
        -DROCKSDB_AUXV_GETAUXVAL_PRESENT -DROCKSDB_FALLOCATE_PRESENT \
        -DROCKSDB_RANGESYNC_PRESENT -std=c++20 -msse2 -include cstdint -O0 \
        -ffunction-sections -fdata-sections -fPIC -m64 -w >"$tmp/flags"
    jobs=$(nproc 2>/dev/null || echo 2)
    echo "building RocksDB once: $(ls "$tmp"/unit-*.cc | wc -l) units of $n files with $cxx, $jobs at a time (about 4 minutes on 2 cores)" >&2
    export CONVOY_CXX="$cxx" CONVOY_FLAGS="$tmp/flags"
    # shellcheck disable=SC2016
    if ! ls "$tmp"/unit-*.cc | xargs -P "$jobs" -I{} sh -c \
        'xargs -a "$CONVOY_FLAGS" -d "\n" "$CONVOY_CXX" -c "$1" -o "$1.o" 2>"$1.err" || { cat "$1.err" >&2; exit 255; }' _ {}; then
        echo "building RocksDB failed (above); CONVOY_ROCKSDB_FROM_CRATE=1 leaves it to the crate" >&2
        unset CONVOY_CXX CONVOY_FLAGS
        rm -rf "$tmp"
        return 1
    fi
    unset CONVOY_CXX CONVOY_FLAGS
    ar crs "$tmp/librocksdb.a" "$tmp"/unit-*.o || return 1
    rm -f "$tmp"/unit-*.o "$tmp"/*.err
    rm -rf "$dir" && mv "$tmp" "$dir"
}
