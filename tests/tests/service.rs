//! Service plumbing: the systemd units (checked by `systemd-analyze
//! verify`), readiness and stopping as `Type=notify` expects them, the
//! default config, completions and man pages, and the Debian package that
//! holds them all (built with `scripts/deb.sh` when cargo-deb is here).
//!
//! `systemd-analyze` and cargo-deb are required when
//! `CONVOY_REQUIRE_SERVICE` is set (as `.ci/run` sets it); elsewhere their
//! tests say they did not run.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use convoy_tests::bin_dir;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

/// Whether `program` runs here; if not, the test is skipped, or fails
/// when CI requires it.
fn available(program: &str, version_args: &[&str]) -> bool {
    let here = Command::new(program)
        .args(version_args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !here {
        assert!(
            std::env::var_os("CONVOY_REQUIRE_SERVICE").is_none(),
            "{program} is not installed"
        );
        eprintln!("no {program} here: skipped");
    }
    here
}

/// Runs `systemd-analyze verify` on the units in `units`, their
/// `ExecStart=/usr/bin/convoyd` pointed at `convoyd`; fails on any
/// complaint.
fn verify_units(units: &Path, convoyd: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let mut names = Vec::new();
    for name in ["convoy-coordinator.service", "convoy-target.service"] {
        let text = std::fs::read_to_string(units.join(name)).unwrap();
        assert!(text.contains("ExecStart=/usr/bin/convoyd "), "{name}");
        let text = text.replace("/usr/bin/convoyd", convoyd.to_str().unwrap());
        std::fs::write(dir.path().join(name), text).unwrap();
        names.push(dir.path().join(name));
    }
    // The man pages the units name are not installed here.
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&names)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // It exits 0 on unknown keys and bad values; they show on stderr.
    let complaints: Vec<&str> = stderr.lines().filter(|l| l.contains("convoy-")).collect();
    assert!(
        out.status.success() && complaints.is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
}

#[test]
fn the_systemd_units_verify_and_are_hardened() {
    if !available("systemd-analyze", &["--version"]) {
        return;
    }
    let units = repo().join("dist/systemd");
    verify_units(&units, &bin_dir().join("convoyd"));
    for name in ["convoy-coordinator.service", "convoy-target.service"] {
        let text = std::fs::read_to_string(units.join(name)).unwrap();
        for line in [
            "Type=notify",
            "User=convoy",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ReadWritePaths=/var/lib/convoy",
            "--config /etc/convoy/convoyd.toml",
        ] {
            assert!(text.contains(line), "{name} lacks {line}");
        }
    }
}

/// A convoyd with `NOTIFY_SOCKET` pointing at a socket of this test.
struct Notified {
    child: std::process::Child,
    socket: UnixDatagram,
    dir: tempfile::TempDir,
}

impl Notified {
    fn start(role_args: &[&str]) -> (Self, serde_json::Value) {
        let dir = tempfile::tempdir().unwrap();
        let convoyd = bin_dir().join("convoyd");
        let key = dir.path().join("fleet.key");
        assert!(Command::new(&convoyd)
            .arg("fleet-key")
            .arg(&key)
            .status()
            .unwrap()
            .success());
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        // The shipped config, with what this test must change as flags
        // (flags win over the file).
        let mut child = Command::new(&convoyd)
            .args(role_args)
            .arg("--config")
            .arg(repo().join("dist/convoyd.toml"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--fleet-key-file")
            .arg(&key)
            .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
            .env("NOTIFY_SOCKET", &path)
            .env_remove("CONVOY_CONFIG")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join("log")).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let log = std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
        let ready = serde_json::from_str(&line)
            .unwrap_or_else(|_| panic!("no ready line ({line:?}):\n{log}"));
        (Self { child, socket, dir }, ready)
    }

    /// The next message convoyd sent to the service manager.
    fn next(&self) -> String {
        let mut buf = [0u8; 512];
        let n = self.socket.recv(&mut buf).unwrap_or_else(|e| {
            let log = std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default();
            panic!("no notification within 30 s ({e}); its log:\n{log}")
        });
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

impl Drop for Notified {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn convoyd_tells_systemd_when_it_is_ready_and_when_it_stops_on_sigterm() {
    let (mut coordinator, ready) = Notified::start(&["coordinator", "--api-listen", "127.0.0.1:0"]);
    // Ready once it listens (its ready line is out first).
    assert_eq!(ready["role"], "coordinator");
    assert_eq!(coordinator.next().trim(), "READY=1");
    let addr = ready["addrs"][0].as_str().unwrap().to_string();
    let (mut target, ready) = Notified::start(&[
        "target",
        "--coordinator",
        &addr,
        "--health-listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(ready["role"], "target");
    assert_eq!(target.next().trim(), "READY=1");
    for (name, d) in [("target", &mut target), ("coordinator", &mut coordinator)] {
        // SAFETY: kill(2) on our own child with a valid signal.
        unsafe {
            libc::kill(d.child.id() as libc::pid_t, libc::SIGTERM);
        }
        assert_eq!(d.next().trim(), "STOPPING=1", "{name}");
        let status = d.child.wait().unwrap();
        assert!(status.success(), "{name} stopped with {status}");
    }
}

#[test]
fn completions_and_man_pages_describe_both_commands() {
    let bin = bin_dir();
    for (program, shell, says) in [
        ("convoy", "bash", "_convoy()"),
        ("convoy", "zsh", "#compdef convoy"),
        ("convoy", "fish", "complete -c convoy"),
        ("convoyd", "bash", "_convoyd()"),
        ("convoyd", "fish", "complete -c convoyd"),
    ] {
        let out = Command::new(bin.join(program))
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{program} completions {shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains(says), "{program} {shell}: {script:.200}");
        // Subcommands and their flags are completed too.
        assert!(
            script.contains("deploy") || script.contains("coordinator"),
            "{program} {shell}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    for (program, pages) in [
        (
            "convoy",
            &["convoy.1", "convoy-deploy.1", "convoy-demo.1"][..],
        ),
        ("convoyd", &["convoyd.1", "convoyd-target.1"][..]),
    ] {
        let out = Command::new(bin.join(program))
            .arg("man")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{program} man");
        for page in pages {
            let text = std::fs::read_to_string(dir.path().join(page)).unwrap();
            assert!(text.starts_with(".ie") || text.contains(".TH"), "{page}");
        }
    }
    let target = std::fs::read_to_string(dir.path().join("convoyd-target.1")).unwrap();
    assert!(
        target.contains("health"),
        "the target's page names its flags"
    );
}

#[test]
fn the_debian_package_holds_the_binaries_units_config_completions_and_man_pages() {
    if !available("cargo", &["deb", "--version"]) || !available("systemd-analyze", &["--version"]) {
        return;
    }
    let out_dir = tempfile::tempdir().unwrap();
    let built = Command::new(repo().join("scripts/deb.sh"))
        .arg("--from")
        .arg(bin_dir())
        .args(["--fast", "-o"])
        .arg(out_dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&built.stdout);
    assert!(
        built.status.success(),
        "scripts/deb.sh: {}\n{}",
        String::from_utf8_lossy(&built.stderr),
        stdout
    );
    let deb = PathBuf::from(stdout.lines().last().expect("the .deb's path").trim());
    assert!(deb.is_file(), "{}", deb.display());
    let root = out_dir.path().join("root");
    assert!(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&root)
        .status()
        .unwrap()
        .success());
    for path in [
        "usr/bin/convoy",
        "usr/bin/convoyd",
        "lib/systemd/system/convoy-coordinator.service",
        "lib/systemd/system/convoy-target.service",
        "etc/convoy/convoyd.toml",
        "usr/share/bash-completion/completions/convoy",
        "usr/share/bash-completion/completions/convoyd",
        "usr/share/zsh/vendor-completions/_convoyd",
        "usr/share/fish/vendor_completions.d/convoy.fish",
        "usr/share/man/man1/convoy.1.gz",
        "usr/share/man/man1/convoyd-coordinator.1.gz",
    ] {
        assert!(root.join(path).is_file(), "the package lacks {path}");
    }
    // The settings may name secrets' files: not readable by everyone.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(root.join("etc/convoy/convoyd.toml"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o640, "{mode:o}");
    // The packaged binary runs, and the packaged units verify against it.
    let version = Command::new(root.join("usr/bin/convoyd"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("convoyd "));
    verify_units(
        &root.join("lib/systemd/system"),
        &root.join("usr/bin/convoyd"),
    );
    let control = Command::new("dpkg-deb")
        .args(["-f"])
        .arg(&deb)
        .args(["Package", "Depends"])
        .output()
        .unwrap();
    let control = String::from_utf8_lossy(&control.stdout);
    assert!(control.contains("Package: convoy"), "{control}");
    assert!(control.contains("adduser"), "{control}");
    let conffiles = Command::new("dpkg-deb")
        .args(["--info"])
        .arg(&deb)
        .arg("conffiles")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&conffiles.stdout).trim(),
        "/etc/convoy/convoyd.toml"
    );
}
