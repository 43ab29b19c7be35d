//! Stamps the binary with the commit it was built from, so that figures
//! `convoy bench` writes say which code made them: `CONVOY_COMMIT` is the
//! short hash, with `-dirty` when tracked files differ from it, or
//! `unknown` outside a git checkout.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    let commit = match git(&["rev-parse", "--short=7", "HEAD"]) {
        Some(c) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            format!("{c}{}", if dirty { "-dirty" } else { "" })
        }
        None => "unknown".to_string(),
    };
    println!("cargo:rustc-env=CONVOY_COMMIT={commit}");
    // Again after a commit, a checkout, or an edit to any crate's code.
    if let Some(git_dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        for f in ["HEAD", "index"] {
            println!("cargo:rerun-if-changed={git_dir}/{f}");
        }
    }
    for dir in ["src", "../daemon/src", "../protocol/src", "../chunker/src"] {
        println!("cargo:rerun-if-changed={dir}");
    }
}
