//! Helpers for integration tests that run the real `convoy` binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Once;

/// The directory cargo put the workspace's binaries in, after making sure
/// they are built from the current sources: `cargo test` builds only the
/// binaries of the package under test, and these tests run other packages'.
pub fn bin_dir() -> PathBuf {
    static BUILT: Once = Once::new();
    BUILT.call_once(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--workspace", "--bins"]);
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let status = cmd
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("running cargo build for the binaries under test");
        assert!(status.success(), "cargo build --workspace --bins failed");
    });
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps")
        .to_path_buf()
}

/// A `convoy` binary bound to one store directory.
pub struct Convoy {
    exe: PathBuf,
    store: PathBuf,
}

/// What one run printed and how it ended.
pub struct Run {
    /// Exit status was 0.
    pub ok: bool,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    /// Asserts the run succeeded, showing its output if not.
    pub fn success(self) -> Self {
        assert!(self.ok, "convoy failed:\n{}\n{}", self.stdout, self.stderr);
        self
    }

    /// Stdout parsed as JSON; panics with the run's output if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }
}

impl Convoy {
    /// A convoy using the store in `store`.
    pub fn new(store: &Path) -> Self {
        let exe = bin_dir().join("convoy");
        assert!(exe.exists(), "{} was not built", exe.display());
        Self {
            exe,
            store: store.to_path_buf(),
        }
    }

    /// Runs `convoy --store STORE ARGS...`.
    pub fn run(&self, args: &[&str]) -> Run {
        let out: Output = Command::new(&self.exe)
            .arg("--store")
            .arg(&self.store)
            .args(args)
            .env_remove("CONVOY_STORE")
            .output()
            .expect("convoy runs");
        Run {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs `convoy pack DIR --app APP --version VERSION` for `release` =
    /// `APP@VERSION`, with `extra` arguments after.
    pub fn pack(&self, dir: &Path, release: &str, extra: &[&str]) -> Run {
        let (app, version) = release.split_once('@').expect("release is APP@VERSION");
        let dir = dir.to_str().expect("UTF-8 test path");
        let mut args = vec!["pack", dir, "--app", app, "--version", version];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    /// Runs and asserts success, returning the run.
    pub fn ok(&self, args: &[&str]) -> Run {
        let run = self.run(args);
        assert!(
            run.ok,
            "convoy {args:?} failed:\n{}\n{}",
            run.stdout, run.stderr
        );
        run
    }
}

pub use convoy_benches::noise;
