//! `convoy demo --lb`: a real load balancer in front of the demo fleet.
//!
//! Every target runs the demo's web app (`convoy-demo-web`, shipped in the
//! release and restarted by its `after_activate` hook), HAProxy spreads
//! requests over the targets and takes each out while its convoyd health
//! endpoint answers 503, `wrk` drives load through HAProxy while the
//! roll-outs run, and a sampler records which versions answer, so the
//! demo can show zero failed requests and the versions each strategy
//! serves.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::bench::fleet::{sibling, Proc};

/// How often HAProxy checks a target's health endpoint, and how many
/// checks take it out or put it back: the pipelines file's
/// `load_balancer` says the same, so drains last long enough.
pub const CHECK_INTERVAL_MS: u64 = 100;
/// Failed checks that take a target out.
pub const FALL: u32 = 2;
/// Good checks that put it back.
pub const RISE: u32 = 2;

/// The variables each target's hooks get (`--hook-env`).
pub const PORT_VAR: &str = "DEMO_WEB_PORT";
/// Where the running app's pid is.
pub const PIDFILE_VAR: &str = "DEMO_WEB_PIDFILE";

/// Finds a program on `PATH`.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// HAProxy, wrk and the demo's app, or an error naming what is missing.
pub struct Tools {
    haproxy: PathBuf,
    wrk: PathBuf,
    /// `convoy-demo-web`, next to this program.
    pub app: PathBuf,
}

impl Tools {
    pub fn find() -> Result<Self> {
        let missing: Vec<&str> = ["haproxy", "wrk"]
            .into_iter()
            .filter(|n| on_path(n).is_none())
            .collect();
        if !missing.is_empty() {
            bail!(
                "--lb needs {} on PATH: apt-get install {} (scripts/demo.sh --lb installs them)",
                missing.join(" and "),
                missing.join(" ")
            );
        }
        Ok(Self {
            haproxy: on_path("haproxy").expect("checked"),
            wrk: on_path("wrk").expect("checked"),
            app: sibling("convoy-demo-web", "cargo build --bins builds it")?,
        })
    }
}

/// A free loopback port (bound and released: the demo's own processes
/// are the only ones it races with).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// The apps the targets' hooks started: they outlive their hooks (and
/// convoyd), so they are stopped here, also when the demo is interrupted.
pub struct Apps {
    pub pidfiles: Vec<PathBuf>,
}

impl Drop for Apps {
    fn drop(&mut self) {
        for f in &self.pidfiles {
            let pid = std::fs::read_to_string(f)
                .ok()
                .and_then(|s| s.trim().parse::<libc::pid_t>().ok());
            if let Some(pid) = pid.filter(|p| *p > 1) {
                // SAFETY: kill(2) with a valid signal; the pid is the
                // app's, as its pidfile says.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
        }
    }
}

/// The hooks of a release of the app: `after_activate` stops the app
/// running on the target's port (if any) and starts this release's,
/// waiting until it listens; `validate` asks it for its version, or
/// fails on purpose for the release that must roll back.
pub fn hooks(fails: bool) -> Vec<(&'static str, String)> {
    let after = format!(
        r#"# Restarts the app on ${PORT_VAR} with this release (also when a
# failed release switches back to it, or a rollback does).
pidfile="${PIDFILE_VAR}"
if [ -s "$pidfile" ]; then
    kill "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
fi
# The new app waits for the old one's port itself.
setsid "$CONVOY_RELEASE_DIR/bin/server" serve --port "${PORT_VAR}" \
    --version "$CONVOY_VERSION" --pidfile "$pidfile" </dev/null >/dev/null 2>&1 &
i=0
while [ ! -s "$pidfile" ]; do
    i=$((i + 1))
    if [ "$i" -gt 200 ]; then echo "the app did not start in 10 s" >&2; exit 1; fi
    sleep 0.05
done
echo "$CONVOY_APP $CONVOY_VERSION serving on port ${PORT_VAR} (was ${{CONVOY_PREVIOUS_VERSION:-none}})"
"#
    );
    let validate = if fails {
        "echo \"GET / answered 500\" >&2\nexit 1\n".to_string()
    } else {
        format!(
            "exec \"$CONVOY_RELEASE_DIR/bin/server\" check --port \"${PORT_VAR}\" --version \"$CONVOY_VERSION\"\n"
        )
    };
    vec![("after_activate", after), ("validate", validate)]
}

/// One backend server: a target's app port and its convoyd health port.
pub struct Server {
    pub name: String,
    pub app_port: u16,
    pub health: String,
}

/// HAProxy's configuration: one frontend on `front`, the targets behind
/// it, each checked on its convoyd health endpoint.
pub fn haproxy_config(front: u16, servers: &[Server]) -> Result<String> {
    let mut cfg = format!(
        "# Written by `convoy demo --lb`.
global
    maxconn 4096

defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s

frontend web
    bind 127.0.0.1:{front}
    default_backend targets

backend targets
    balance roundrobin
    # A target is in load while convoyd's health endpoint answers 200.
    option httpchk GET /health
    http-check expect status 200
    default-server inter {CHECK_INTERVAL_MS}ms fall {FALL} rise {RISE}
"
    );
    for s in servers {
        let (host, port) = s
            .health
            .rsplit_once(':')
            .with_context(|| format!("health address {:?} has no port", s.health))?;
        cfg.push_str(&format!(
            "    server {} 127.0.0.1:{} check addr {host} port {port}\n",
            s.name, s.app_port
        ));
    }
    Ok(cfg)
}

/// HAProxy in the foreground, stopped when dropped.
pub struct Haproxy {
    _proc: Proc,
    pub front: u16,
}

impl Haproxy {
    pub fn start(tools: &Tools, dir: &Path, front: u16, servers: &[Server]) -> Result<Self> {
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(&cfg, haproxy_config(front, servers)?)?;
        let log = std::fs::File::create(dir.join("haproxy.log"))?;
        let child = Command::new(&tools.haproxy)
            .args(["-db", "-f"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", tools.haproxy.display()))?;
        let mut proc = Proc {
            child,
            name: "haproxy".into(),
        };
        // Up once a request through it is answered (bounded: 10 s).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if ask(front).is_ok() {
                break;
            }
            if let Ok(Some(status)) = proc.child.try_wait() {
                let log = std::fs::read_to_string(dir.join("haproxy.log")).unwrap_or_default();
                bail!("haproxy exited ({status}):\n{log}");
            }
            if Instant::now() > deadline {
                bail!("haproxy on port {front} answered nothing within 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self { _proc: proc, front })
    }
}

/// Asks the app behind `port` (HAProxy's front) for its version over a
/// new connection: `Ok(version)` for a 200, else why not.
pub fn ask(port: u16) -> Result<String> {
    let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.1\r\nhost: demo\r\nconnection: close\r\n\r\n")?;
    let mut answer = String::new();
    s.take(64 * 1024).read_to_string(&mut answer)?;
    let status = answer.lines().next().unwrap_or("").to_string();
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b.trim());
    match body.strip_prefix("web ") {
        Some(v) if status.starts_with("HTTP/1.1 200") => Ok(v.to_string()),
        _ => Err(anyhow!("{status:?} {body:?}")),
    }
}

/// What the sampler saw in one phase: answers per version, and failures.
#[derive(Default, Clone, Debug)]
pub struct Seen {
    pub versions: BTreeMap<String, u64>,
    pub failed: u64,
    pub first_failure: Option<String>,
}

impl Seen {
    pub fn json(&self) -> Value {
        json!({"versions": self.versions, "failed": self.failed, "first_failure": self.first_failure})
    }

    pub fn only(&self, version: &str) -> bool {
        self.failed == 0 && self.versions.keys().all(|v| v == version) && !self.versions.is_empty()
    }
}

/// Asks through the load balancer in a loop (one request at a time, each
/// on its own connection so that every answer is HAProxy's latest
/// choice), recording the versions per phase.
pub struct Sampler {
    phases: Arc<Mutex<Vec<(String, Seen)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    pub fn start(front: u16, first_phase: &str) -> Self {
        let phases = Arc::new(Mutex::new(vec![(first_phase.to_string(), Seen::default())]));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (phases.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let answer = ask(front);
                let mut phases = p.lock().expect("not poisoned");
                let seen = &mut phases.last_mut().expect("a phase").1;
                match answer {
                    Ok(v) => *seen.versions.entry(v).or_default() += 1,
                    Err(e) => {
                        seen.failed += 1;
                        seen.first_failure.get_or_insert(e.to_string());
                    }
                }
                drop(phases);
                // About 100 samples a second, beside wrk's load.
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Self {
            phases,
            stop,
            thread: Some(thread),
        }
    }

    /// Samples from now on count for `name`.
    pub fn phase(&self, name: &str) {
        let mut phases = self.phases.lock().expect("not poisoned");
        phases.push((name.to_string(), Seen::default()));
    }

    /// What `name` saw so far.
    pub fn seen(&self, name: &str) -> Seen {
        let phases = self.phases.lock().expect("not poisoned");
        phases
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s.clone())
            .unwrap_or_default()
    }

    /// Waits until the current phase holds `n` answers (bounded: 30 s).
    pub fn wait_for(&self, n: u64) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = {
                let phases = self.phases.lock().expect("not poisoned");
                let s = &phases.last().expect("a phase").1;
                s.versions.values().sum::<u64>() + s.failed
            };
            if got >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the sampler got {got} of {n} answers within 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(mut self) -> Vec<(String, Seen)> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.phases.lock().expect("not poisoned").clone()
    }
}

/// wrk's summary, from the Lua `done` hook below.
const WRK_SCRIPT: &str = r#"-- Written by `convoy demo --lb`: wrk's own counts, as JSON.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout))
end
"#;

/// wrk driving load through HAProxy until stopped.
pub struct Load {
    proc: Option<Proc>,
    out: PathBuf,
}

impl Load {
    pub fn start(tools: &Tools, dir: &Path, front: u16) -> Result<Self> {
        let script = dir.join("wrk.lua");
        std::fs::write(&script, WRK_SCRIPT)?;
        let out = dir.join("wrk.out");
        let child = Command::new(&tools.wrk)
            .args([
                "--threads",
                "1",
                "--connections",
                "8",
                "--duration",
                "3600s",
                "--script",
            ])
            .arg(&script)
            .arg(format!("http://127.0.0.1:{front}/"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out)?)
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", tools.wrk.display()))?;
        Ok(Self {
            proc: Some(Proc {
                child,
                name: "wrk".into(),
            }),
            out,
        })
    }

    /// Stops wrk (SIGINT: it prints its summary) and reads its counts.
    pub fn stop(mut self) -> Result<WrkSummary> {
        let mut proc = self.proc.take().expect("running");
        // SAFETY: kill(2) on our child with a valid signal.
        unsafe {
            libc::kill(proc.child.id() as libc::pid_t, libc::SIGINT);
        }
        let status = proc.child.wait()?;
        let file = std::fs::File::open(&self.out)?;
        let line = BufReader::new(file)
            .lines()
            .map_while(Result::ok)
            .filter(|l| l.starts_with('{'))
            .last()
            .ok_or_else(|| anyhow!("wrk ({status}) printed no summary"))?;
        let v: Value = serde_json::from_str(&line).context("wrk's summary")?;
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        Ok(WrkSummary {
            requests: n("requests"),
            seconds: n("duration_us") as f64 / 1e6,
            connect: n("connect"),
            read: n("read"),
            write: n("write"),
            status: n("status"),
            timeout: n("timeout"),
        })
    }
}

/// What wrk counted.
#[derive(Debug, Clone)]
pub struct WrkSummary {
    pub requests: u64,
    pub seconds: f64,
    pub connect: u64,
    pub read: u64,
    pub write: u64,
    /// Answers that were not 2xx or 3xx.
    pub status: u64,
    pub timeout: u64,
}

impl WrkSummary {
    pub fn failed(&self) -> u64 {
        self.connect + self.read + self.write + self.status + self.timeout
    }

    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.seconds.max(1e-9)
    }

    pub fn json(&self) -> Value {
        json!({
            "requests": self.requests,
            "seconds": self.seconds,
            "requests_per_second": self.rate(),
            "failed": self.failed(),
            "errors": {
                "connect": self.connect, "read": self.read, "write": self.write,
                "status": self.status, "timeout": self.timeout,
            },
        })
    }
}
