//! Helpers for integration tests that run the real `convoy` binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Once;

pub mod cutfs;

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
    /// The exit code (`None` if a signal ended it).
    pub code: Option<i32>,
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
            code: out.status.code(),
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

    /// The releases its store names, as `APP@VERSION`, oldest first.
    pub fn names(&self) -> Vec<String> {
        let list = self.ok(&["list", "--json"]).json();
        list.as_array()
            .expect("a list")
            .iter()
            .map(|r| {
                format!(
                    "{}@{}",
                    r["app"].as_str().expect("an app"),
                    r["version"].as_str().expect("a version")
                )
            })
            .collect()
    }
}

pub use convoy_benches::noise;

/// One HTTP/1.1 request over a fresh connection (bounded: 10 s); returns
/// the status code and the body.
pub fn http(addr: &str, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connecting");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}Content-Length: 0\r\n\r\n"
    )
    .expect("writing the request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("reading the answer");
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// A running `convoyd`, stopped with SIGTERM (then SIGKILL) when dropped.
pub struct Daemon {
    child: std::process::Child,
    /// Its first address, ending in /p2p/PEER_ID.
    pub addr: String,
    /// Times it was restarted.
    restarts: u32,
    /// The log of its first start; restarts log beside it.
    first_log: PathBuf,
    /// Its peer id.
    pub peer_id: String,
    /// Where its stderr goes.
    pub log: PathBuf,
    /// Its ready line (a target's health address, a coordinator's API).
    pub ready: serde_json::Value,
    /// The command it runs under (`ip netns exec NS`), if any.
    wrapper: Vec<String>,
    args: Vec<String>,
}

impl Daemon {
    /// Starts `convoyd ARGS...` with stderr to `log` and waits for its ready line.
    pub fn start(args: &[String], log: &Path) -> Self {
        Self::start_under(&[], args, log)
    }

    /// [`Daemon::start`] under `wrapper` (a command that runs the one
    /// after it, as `ip netns exec NS` does).
    pub fn start_under(wrapper: &[String], args: &[String], log: &Path) -> Self {
        use std::io::BufRead;
        let exe = bin_dir().join("convoyd");
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let mut child = cmd
            .args(args)
            .env_remove("CONVOY_CONFIG")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(log).expect("log file"))
            .spawn()
            .expect("convoyd starts");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("reading the ready line");
        let ready: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!(
                "convoyd {args:?} did not start:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        });
        Self {
            child,
            restarts: 0,
            first_log: log.to_path_buf(),
            addr: ready["addrs"][0].as_str().expect("an address").to_string(),
            peer_id: ready["peer_id"].as_str().expect("a peer id").to_string(),
            log: log.to_path_buf(),
            ready,
            wrapper: wrapper.to_vec(),
            args: args.to_vec(),
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills it at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again with the same arguments (and data directory),
    /// logging to `NAME.restart-N.log` beside its first log.
    pub fn restart(&mut self) {
        self.stop();
        let restarts = self.restarts + 1;
        let log = self
            .first_log
            .with_extension(format!("restart-{restarts}.log"));
        let mut again = Self::start_under(&self.wrapper, &self.args, &log);
        again.restarts = restarts;
        again.first_log = self.first_log.clone();
        *self = again;
    }

    /// Sets `flag` to `value` for the next [`Daemon::restart`] (replacing
    /// the value it had, or adding the flag).
    pub fn set_arg(&mut self, flag: &str, value: &str) {
        match self.args.iter().position(|a| a == flag) {
            Some(i) => self.args[i + 1] = value.to_string(),
            None => self.args.extend([flag.to_string(), value.to_string()]),
        }
    }

    /// Stops it with SIGTERM and waits, bounded; returns whether it exited cleanly.
    pub fn stop(&mut self) -> bool {
        if let Ok(Some(status)) = self.child.try_wait() {
            return status.success();
        }
        // SAFETY: kill(2) on our own child with a valid signal.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A coordinator and targets on loopback in a temporary directory.
pub struct TestFleet {
    /// Its targets, in start order.
    pub targets: Vec<Daemon>,
    /// The coordinator.
    pub coordinator: Daemon,
    /// The fleet key file.
    pub key: PathBuf,
    /// Where daemons run: each data centre's wrapper command and address
    /// (one, loopback, unless the fleet stands in a network lab).
    places: Vec<(Vec<String>, String)>,
    dir: Option<tempfile::TempDir>,
}

impl Drop for TestFleet {
    fn drop(&mut self) {
        // A failed test keeps the fleet's logs and stores for a post-mortem.
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                eprintln!("fleet kept in {}", dir.keep().display());
            }
        }
    }
}

impl TestFleet {
    /// Starts a coordinator with `extra` arguments on a fixed free port.
    pub fn new(extra: &[&str]) -> Self {
        Self::start(tempfile::tempdir().expect("temp dir"), extra)
    }

    /// Starts a coordinator in data centre 0 of `lab`, with `extra`
    /// arguments; [`TestFleet::add_target_in`] places targets in its
    /// data centres.
    pub fn in_lab(lab: &convoy_benches::netns::Lab, extra: &[&str]) -> Self {
        let places = (0..lab.dcs())
            .map(|n| (lab.exec_prefix(n), lab.dc_addr(n).to_string()))
            .collect();
        Self::start_at(tempfile::tempdir().expect("temp dir"), places, extra)
    }

    /// Starts a coordinator that loads `pipelines` (a pipelines file's text).
    pub fn with_pipelines(pipelines: &str, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("pipelines.toml");
        std::fs::write(&path, pipelines).expect("pipelines file");
        let mut all = vec!["--pipelines", path.to_str().expect("UTF-8 path")];
        all.extend_from_slice(extra);
        Self::start(dir, &all)
    }

    fn start(dir: tempfile::TempDir, extra: &[&str]) -> Self {
        Self::start_at(dir, vec![(Vec::new(), "127.0.0.1".into())], extra)
    }

    fn start_at(
        dir: tempfile::TempDir,
        places: Vec<(Vec<String>, String)>,
        extra: &[&str],
    ) -> Self {
        let key = dir.path().join("fleet.key");
        let status = Command::new(bin_dir().join("convoyd"))
            .arg("fleet-key")
            .arg(&key)
            .status()
            .expect("convoyd fleet-key runs");
        assert!(status.success());
        // Fixed ports, so a restarted coordinator is found where it was.
        let free_port = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port()
        };
        let (port, api_port) = (free_port(), free_port());
        let (wrapper, ip) = &places[0];
        let mut args = vec![
            "coordinator".to_string(),
            "--data-dir".into(),
            dir.path().join("coordinator").display().to_string(),
            "--listen".into(),
            format!("/ip4/{ip}/tcp/{port}"),
            "--fleet-key-file".into(),
            key.display().to_string(),
            "--heartbeat-ms".into(),
            "200".into(),
            "--log-level".into(),
            "info".into(),
            "--api-listen".into(),
            format!("{ip}:{api_port}"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let coordinator = Daemon::start_under(wrapper, &args, &dir.path().join("coordinator.log"));
        Self {
            targets: Vec::new(),
            coordinator,
            key,
            places,
            dir: Some(dir),
        }
    }

    /// The fleet's temporary directory.
    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("present until dropped").path()
    }

    /// Starts a target with `extra` arguments (labels, caps, ...).
    pub fn add_target(&mut self, extra: &[&str]) -> usize {
        self.add_target_in(0, extra)
    }

    /// Starts a target in data centre `dc` of the fleet's lab (0 is where
    /// the coordinator runs; on loopback, the only one).
    pub fn add_target_in(&mut self, dc: usize, extra: &[&str]) -> usize {
        let (wrapper, ip) = self.places[dc].clone();
        let i = self.targets.len();
        let name = format!("target-{i}");
        let mut args = vec![
            "target".to_string(),
            "--data-dir".into(),
            self.path().join(&name).display().to_string(),
            "--listen".into(),
            format!("/ip4/{ip}/tcp/0"),
            "--fleet-key-file".into(),
            self.key.display().to_string(),
            "--coordinator".into(),
            self.coordinator.addr.clone(),
            "--log-level".into(),
            "info".into(),
            "--health-listen".into(),
            format!("{ip}:0"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        self.targets.push(Daemon::start_under(
            &wrapper,
            &args,
            &self.path().join(format!("{name}.log")),
        ));
        i
    }

    /// `convoy` run against the coordinator's operator API.
    pub fn operator(&self, args: &[&str]) -> Run {
        let cli = Convoy::new(&self.path().join("cli-store"));
        let api = self.coordinator.ready["api"]
            .as_str()
            .expect("an API address");
        let token = self.coordinator.ready["api_token_file"]
            .as_str()
            .expect("a token file");
        let mut all = vec!["--api", api, "--api-token-file", token];
        all.extend_from_slice(args);
        cli.run(&all)
    }

    /// `convoy deploy web@VERSION --env production --follow --json ARGS`
    /// through the API: the exit code and the final status.
    pub fn deploy_web(&self, version: &str, args: &[&str]) -> (Option<i32>, serde_json::Value) {
        let release = format!("web@{version}");
        let mut all = vec![
            "deploy",
            release.as_str(),
            "--env",
            "production",
            "--follow",
            "--json",
        ];
        all.extend_from_slice(args);
        let run = self.operator(&all);
        let v = serde_json::from_str(&run.stdout).unwrap_or_else(|e| {
            panic!(
                "deploy printed no JSON ({e}):\n{}\n{}",
                run.stdout, run.stderr
            )
        });
        (run.code, v)
    }

    /// What target `i`'s health endpoint answers: status and JSON body.
    pub fn health(&self, i: usize) -> (u16, serde_json::Value) {
        let addr = self.targets[i].ready["health"]
            .as_str()
            .expect("a health address");
        let (status, body) = http(addr, "GET", "/health", None);
        let json = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("health body {body:?} is not JSON: {e}"));
        (status, json)
    }

    /// The version target `i`'s `current` link of `app` names.
    pub fn current(&self, i: usize, app: &str) -> Option<String> {
        let link = self
            .path()
            .join(format!("target-{i}/releases/{app}/current"));
        std::fs::read_link(link)
            .ok()
            .map(|t| t.to_string_lossy().into_owned())
    }

    /// The data directory of target `i`.
    pub fn target_dir(&self, i: usize) -> PathBuf {
        self.path().join(format!("target-{i}"))
    }

    /// `convoy_refused_total{what="WHAT"}` in the coordinator's metrics.
    pub fn refused(&self, what: &str) -> u64 {
        self.metric(&format!("convoy_refused_total{{what=\"{what}\"}}"))
    }

    /// The sample `name` (labels and all) of the coordinator's metrics.
    pub fn metric(&self, name: &str) -> u64 {
        let (status, text) = http(&self.api_addr(), "GET", "/metrics", Some(&self.api_token()));
        assert_eq!(status, 200, "{text}");
        sample(&text, name)
    }

    /// The sample `name` of target `i`'s metrics (on its health endpoint).
    pub fn target_metric(&self, i: usize, name: &str) -> u64 {
        let addr = self.targets[i].ready["health"]
            .as_str()
            .expect("a health address");
        let (status, text) = http(addr, "GET", "/metrics", None);
        assert_eq!(status, 200, "{text}");
        sample(&text, name)
    }

    /// The API's bearer token.
    pub fn api_token(&self) -> String {
        let file = self.coordinator.ready["api_token_file"]
            .as_str()
            .expect("a token file");
        std::fs::read_to_string(file)
            .expect("the token file")
            .trim()
            .to_string()
    }

    /// `host:port` of the API.
    pub fn api_addr(&self) -> String {
        self.coordinator.ready["api"]
            .as_str()
            .expect("an API address")
            .trim_start_matches("http://")
            .to_string()
    }

    /// Writes a small web app `version` under the fleet's directory: an
    /// index naming the version and the hooks given as shell script bodies
    /// (`None`: no such hook).
    pub fn web_app(
        &self,
        version: &str,
        before_activate: Option<&str>,
        after_activate: Option<&str>,
        validate: Option<&str>,
    ) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.path().join(format!("web-{version}"));
        std::fs::create_dir_all(dir.join("convoy/hooks")).expect("package dir");
        std::fs::write(dir.join("index.html"), format!("web {version}\n")).expect("index");
        std::fs::write(dir.join("app.bin"), noise(200_000, 7)).expect("app");
        for (name, body) in [
            ("before_activate", before_activate),
            ("after_activate", after_activate),
            ("validate", validate),
        ] {
            if let Some(body) = body {
                let p = dir.join("convoy/hooks").join(name);
                std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("hook");
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
                    .expect("hook mode");
            }
        }
        dir
    }

    /// Polls `convoy status ID --json` (bounded: 60 s) until `done` says so;
    /// returns that status.
    pub fn wait_status(
        &self,
        id: u64,
        what: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let run = self.operator(&["status", &id.to_string(), "--json"]);
            if run.ok {
                let v = run.json();
                if done(&v) {
                    return v;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "deployment {id}: waited 60 s for {what}:\n{}\n{}",
                run.stdout,
                run.stderr
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// The store directory of target `i`.
    pub fn target_store(&self, i: usize) -> PathBuf {
        self.path().join(format!("target-{i}")).join("store")
    }

    /// A `convoy` with its own store, pointed at this fleet, as the
    /// operator whose key the coordinator made for its own host.
    pub fn convoy(&self, args: &[&str]) -> Run {
        let operator_key = self.coordinator.ready["operator_key_file"]
            .as_str()
            .expect("the coordinator made a local operator key");
        self.convoy_as(operator_key, args)
    }

    /// A `convoy` with its own store, pointed at this fleet, with the
    /// operator key in `operator_key`.
    pub fn convoy_as(&self, operator_key: &str, args: &[&str]) -> Run {
        let cli = Convoy::new(&self.path().join("cli-store"));
        let mut all = vec![
            "--coordinator",
            self.coordinator.addr.as_str(),
            "--fleet-key-file",
            self.key.to_str().expect("UTF-8 path"),
            "--operator-key-file",
            operator_key,
        ];
        all.extend_from_slice(args);
        cli.run(&all)
    }

    /// Publishes `dir` as `release` (`APP@VERSION`); its release id.
    pub fn publish(&self, dir: &Path, release: &str) -> String {
        let dir = dir.to_str().expect("UTF-8 path");
        let run = self.convoy(&["publish", dir, release, "--json"]).success();
        run.json()["release_id"]
            .as_str()
            .expect("a release id")
            .to_string()
    }

    /// Stages `release` on the targets `selector` names in `mode` and
    /// waits (bounded: 120 s); the staging's report (`--json`).
    pub fn stage_and_wait(&self, release: &str, mode: &str, selector: &str) -> serde_json::Value {
        let before = unix_ms();
        let report = self
            .convoy(&[
                "stage",
                release,
                "--mode",
                mode,
                "--targets",
                selector,
                "--wait",
                "--timeout",
                "120",
                "--json",
            ])
            .success()
            .json();
        // Every target that ended says when, by the clock it shares with
        // this test: within the command's run.
        let after = unix_ms();
        for t in report["per_target"].as_array().expect("per_target") {
            if t["state"].as_str().is_some_and(|s| s != "running") {
                let at = t["finished_unix_ms"].as_u64().expect("finished_unix_ms");
                assert!(
                    (before..=after).contains(&at),
                    "{before} <= {at} <= {after}: {t}"
                );
            }
        }
        report
    }

    /// Waits (bounded) until the coordinator sees `n` live targets.
    pub fn wait_for_targets(&self, n: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let run = self.convoy(&["fleet", "--json"]);
            if run.ok {
                let alive = run.json()["targets"]
                    .as_array()
                    .map_or(0, |t| t.iter().filter(|t| t["alive"] == true).count());
                if alive >= n {
                    return;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "only some of {n} targets registered in 30 s:\n{}\n{}",
                run.stdout,
                run.stderr
            );
        }
    }

    /// Writes a package of `bytes` pseudo-random bytes under the fleet's directory.
    pub fn package(&self, name: &str, bytes: usize, seed: u64) -> PathBuf {
        let dir = self.path().join(name);
        std::fs::create_dir_all(dir.join("bin")).expect("package dir");
        std::fs::write(dir.join("bin/app"), noise(bytes, seed)).expect("package file");
        std::fs::write(dir.join("VERSION"), name).expect("package file");
        dir
    }
}

/// Milliseconds since the Unix epoch, now.
fn unix_ms() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since.expect("a clock after 1970").as_millis() as u64
}

/// The value of the sample `name` (labels and all) in a metrics page.
fn sample(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in the metrics:\n{text}"))
        .parse()
        .expect("a count")
}
