//! `scripts/build-deps.sh` finds libclang by bindgen's own rules: a fresh
//! Debian machine with only `libclang-cpp.so.14` (a different library) must
//! be told to install libclang-dev, not pass the check and fail in bindgen.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The first bytes of a 64-bit (class 2) or 32-bit (class 1) ELF object.
fn elf(class: u8) -> Vec<u8> {
    let mut b = vec![0x7f, b'E', b'L', b'F', class, 1, 1, 0];
    b.resize(64, 0);
    b
}

fn put(root: &Path, rel: &str, bytes: &[u8]) -> PathBuf {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Runs `find_libclang ROOT` with nothing of this machine's environment
/// that could point it elsewhere; its output, or `None` when it finds none.
fn find(root: &Path, libclang_path: Option<&Path>) -> Option<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-deps.sh");
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(r#". "$1" && find_libclang "$2""#)
        .arg("bash")
        .arg(&script)
        .arg(root)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("LLVM_CONFIG_PATH", "/nonexistent/llvm-config");
    if let Some(p) = libclang_path {
        cmd.env("LIBCLANG_PATH", p);
    }
    let out = cmd.output().expect("bash runs");
    out.status
        .success()
        .then(|| String::from_utf8(out.stdout).unwrap().trim().to_string())
}

#[test]
fn libclang_cpp_alone_is_not_libclang() {
    let root = tempfile::tempdir().unwrap();
    put(
        root.path(),
        "usr/lib/x86_64-linux-gnu/libclang-cpp.so.14",
        &elf(2),
    );
    put(
        root.path(),
        "usr/lib/llvm-14/lib/libclang-cpp.so.14",
        &elf(2),
    );
    assert_eq!(find(root.path(), None), None);
}

#[test]
fn each_name_bindgen_loads_is_found() {
    for name in [
        "usr/lib/llvm-14/lib/libclang.so",
        "usr/lib/llvm-14/lib/libclang-14.so",
        "usr/lib/llvm-14/lib/libclang.so.1",
        "usr/lib/x86_64-linux-gnu/libclang-14.so.14.0.6",
        "usr/local/lib/libclang.so.18",
    ] {
        let root = tempfile::tempdir().unwrap();
        put(
            root.path(),
            "usr/lib/llvm-14/lib/libclang-cpp.so.14",
            &elf(2),
        );
        let lib = put(root.path(), name, &elf(2));
        assert_eq!(
            find(root.path(), None).as_deref(),
            Some(lib.to_str().unwrap()),
            "{name}"
        );
    }
}

#[test]
fn a_32_bit_or_non_elf_libclang_is_not_loadable() {
    let root = tempfile::tempdir().unwrap();
    put(root.path(), "usr/lib/llvm-14/lib/libclang.so.1", &elf(1));
    put(
        root.path(),
        "usr/lib/llvm-14/lib/libclang.so",
        b"INPUT(-lclang)\n",
    );
    assert_eq!(find(root.path(), None), None);
}

#[test]
fn libclang_path_alone_is_searched_when_set() {
    let root = tempfile::tempdir().unwrap();
    put(root.path(), "usr/lib/llvm-14/lib/libclang.so.1", &elf(2));
    let elsewhere = tempfile::tempdir().unwrap();
    // Set but empty: the usual directories are not searched, as bindgen
    // does not search them either.
    assert_eq!(find(root.path(), Some(elsewhere.path())), None);
    let lib = put(elsewhere.path(), "libclang-16.so", &elf(2));
    assert_eq!(
        find(root.path(), Some(elsewhere.path())).as_deref(),
        Some(lib.to_str().unwrap())
    );
    // A file names exactly that library.
    assert_eq!(
        find(root.path(), Some(&lib)).as_deref(),
        Some(lib.to_str().unwrap())
    );
}

/// Runs `ensure_rocksdb` from the repository with `envs` set (and no
/// ROCKSDB_* variables inherited); what it exported as ROCKSDB_LIB_DIR,
/// if anything, and whether it succeeded.
fn ensure_rocksdb(envs: &[(&str, &str)]) -> (bool, Option<String>) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("the repository");
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(r#". scripts/build-deps.sh && ensure_rocksdb && echo "${ROCKSDB_LIB_DIR:-}:${ROCKSDB_STATIC:-}""#)
        .current_dir(&repo)
        .env_remove("ROCKSDB_LIB_DIR")
        .env_remove("ROCKSDB_STATIC")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CONVOY_ROCKSDB_FROM_CRATE");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("bash runs");
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let dir = line
        .strip_suffix(":1")
        .filter(|d| !d.is_empty())
        .map(str::to_string);
    (out.status.success(), dir)
}

/// Where the scripts built RocksDB (they ran these tests: `scripts/test.sh`
/// exports ROCKSDB_LIB_DIR), the same call finds it again without
/// building, under the same name; asked not to, or with RUSTFLAGS (whose
/// target features the crate would pass to its compiler), it leaves
/// RocksDB to the crate.
#[test]
fn the_scripts_rocksdb_is_found_again_and_left_to_the_crate_when_asked() {
    assert_eq!(
        ensure_rocksdb(&[("CONVOY_ROCKSDB_FROM_CRATE", "1")]),
        (true, None)
    );
    assert_eq!(
        ensure_rocksdb(&[("RUSTFLAGS", "-Ctarget-cpu=native")]),
        (true, None)
    );
    let Ok(built) = std::env::var("ROCKSDB_LIB_DIR") else {
        eprintln!("not run by the scripts (no ROCKSDB_LIB_DIR): the reuse is not checked");
        return;
    };
    let lib = Path::new(&built).join("librocksdb.a");
    let modified = || std::fs::metadata(&lib).and_then(|m| m.modified()).ok();
    let before = modified();
    assert!(before.is_some(), "{} is not there", lib.display());
    assert_eq!(ensure_rocksdb(&[]), (true, Some(built)));
    assert_eq!(modified(), before, "found, not built again");
}
