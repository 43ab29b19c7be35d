# Sourced by the other scripts: makes sure what RocksDB's build needs is
# here (libclang for bindgen, a C++ compiler), installing it with apt-get
# when it is missing and we may.

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
