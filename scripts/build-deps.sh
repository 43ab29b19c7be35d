# Sourced by the other scripts: makes sure what RocksDB's build needs is
# here (libclang for bindgen, a C++ compiler), installing it with apt-get
# when it is missing and we may.
ensure_build_deps() {
    local missing=()
    if ! ls /usr/lib/llvm-*/lib/libclang*.so* /usr/lib/*/libclang*.so* >/dev/null 2>&1; then
        missing+=(libclang-dev)
    fi
    command -v c++ >/dev/null 2>&1 || missing+=(g++)
    command -v cargo >/dev/null 2>&1 || {
        echo "cargo not found: install the Rust toolchain (https://rustup.rs) first" >&2
        return 1
    }
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo="sudo"
        else
            echo "building RocksDB needs: ${missing[*]}; install them (apt-get install ${missing[*]}) and retry" >&2
            return 1
        fi
    fi
    echo "installing build dependencies: ${missing[*]}" >&2
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >&2
}
