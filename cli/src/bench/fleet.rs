//! The bench's fleet: real `convoyd` processes in a temporary directory,
//! and what /proc says about them.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use convoy_daemon::net::client::Client;
use convoy_daemon::protocol::{ControlRequest, ControlResponse};

use super::{BenchArgs, Cpu, IdleRss, Rates};
use crate::remote::control;

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped.
pub(crate) struct Proc {
    pub child: Child,
    pub name: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

pub(crate) fn stop(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    // SAFETY: kill(2) with a pid we own and a valid signal.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

pub(crate) struct Fleet {
    // Declared before `dir`: processes stop before their directory goes.
    targets: Vec<Proc>,
    /// Each target's health endpoint (`host:port`), which serves `/metrics`.
    target_health: Vec<String>,
    coordinator: Option<Proc>,
    pub coordinator_addr: String,
    /// The coordinator's ready line (its API address, token file...).
    pub coordinator_ready: serde_json::Value,
    pub key_file: PathBuf,
    logs: PathBuf,
    /// The network lab the daemons run in (`--netns`), if any: after the
    /// processes, so that it is removed once they have stopped.
    pub lab: Option<convoy_benches::netns::Lab>,
    pub dir: tempfile::TempDir,
    /// Whether the daemons started from now on get SIGTERM when this
    /// process dies, however it dies (true unless a fleet is meant to
    /// outlive it, as `convoy demo --keep`'s does). Drop stops them when
    /// it runs; this covers a SIGKILL or a crash, after which they ran on.
    pub die_with_us: bool,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // SIGTERM all at once, then wait: stopping one by one takes N times longer.
        for p in self.targets.iter().chain(self.coordinator.iter()) {
            // SAFETY: as in `stop`.
            unsafe {
                libc::kill(p.child.id() as libc::pid_t, libc::SIGTERM);
            }
        }
        self.targets.clear();
        self.coordinator = None;
    }
}

impl Fleet {
    /// Memory of the fleet at rest.
    pub fn idle_rss(&self) -> IdleRss {
        IdleRss {
            origin_bytes: self.coordinator.as_ref().map_or(0, |p| rss(p.child.id()).0),
            target_max_bytes: self
                .targets
                .iter()
                .map(|p| rss(p.child.id()).0)
                .max()
                .unwrap_or(0),
        }
    }

    /// The coordinator's process id, once started.
    pub fn coordinator_pid(&self) -> Option<u32> {
        self.coordinator.as_ref().map(|p| p.child.id())
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.logs.join(format!("{name}.log"))
    }

    pub fn tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.log(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    /// Why a staging may not have finished in time, from the daemons'
    /// logs: a full disk (it happened: a disk filled by earlier runs'
    /// directories), which the targets log but the coordinator, whose
    /// own writes fail, may not hear of.
    pub fn diagnose(&self) -> Option<String> {
        let full: Vec<String> = std::fs::read_dir(&self.logs)
            .ok()?
            .filter_map(|e| e.ok())
            .filter(|e| {
                std::fs::read_to_string(e.path())
                    .is_ok_and(|t| t.contains("No space left on device"))
            })
            .map(|e| {
                e.file_name()
                    .to_string_lossy()
                    .trim_end_matches(".log")
                    .to_string()
            })
            .collect();
        (!full.is_empty()).then(|| {
            format!(
                "the disk under {} is full: {} logged \"No space left on device\"",
                self.dir.path().display(),
                full.join(", ")
            )
        })
    }

    /// A fleet directory with a fresh fleet key, logs under `logs` (or in
    /// the directory), nothing running yet.
    pub fn new(prefix: &str, logs: Option<PathBuf>) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
        let logs = logs.unwrap_or_else(|| dir.path().join("logs"));
        std::fs::create_dir_all(&logs)
            .with_context(|| format!("cannot create {}", logs.display()))?;
        let key_file = dir.path().join("fleet.key");
        convoy_daemon::fleet_key::generate(&key_file)?;
        Ok(Fleet {
            targets: Vec::new(),
            target_health: Vec::new(),
            coordinator: None,
            coordinator_addr: String::new(),
            coordinator_ready: serde_json::Value::Null,
            key_file,
            logs,
            lab: None,
            dir,
            die_with_us: true,
        })
    }

    /// The address daemons of data centre `dc` listen on: loopback, or
    /// the data centre's own in a lab.
    fn ip(&self, dc: usize) -> String {
        match &self.lab {
            Some(lab) => lab.dc_addr(dc % lab.dcs()).to_string(),
            None => "127.0.0.1".into(),
        }
    }

    /// Leaves the daemons running and the directory in place (`--keep`);
    /// returns their process ids.
    pub fn detach(&mut self) -> Vec<u32> {
        self.dir.disable_cleanup(true);
        let procs: Vec<Proc> = self
            .coordinator
            .take()
            .into_iter()
            .chain(self.targets.drain(..))
            .collect();
        procs
            .into_iter()
            .map(|p| {
                let id = p.child.id();
                // Not dropped: dropping stops it.
                std::mem::forget(p);
                id
            })
            .collect()
    }

    /// Arguments every daemon of a fleet of `daemons` takes: its data
    /// directory, a loopback address, the fleet key, and its share of this
    /// machine's cores as worker threads — each stands for a server of its
    /// own, and dozens of runtimes of one thread per core would spend the
    /// cores waking each other.
    pub fn common_args(
        &self,
        name: &str,
        dc: usize,
        log_level: &str,
        daemons: usize,
    ) -> Vec<String> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        vec![
            "--data-dir".into(),
            self.dir.path().join(name).display().to_string(),
            "--listen".into(),
            format!("/ip4/{}/tcp/0", self.ip(dc)),
            "--fleet-key-file".into(),
            self.key_file.display().to_string(),
            "--log-level".into(),
            log_level.into(),
            "--worker-threads".into(),
            (cores / daemons.max(1)).max(1).to_string(),
        ]
    }

    /// Starts the coordinator (`args` after `coordinator`), its API on a
    /// free port of data centre 0.
    pub fn start_coordinator(&mut self, convoyd: &Path, args: &[String]) -> Result<()> {
        let mut a = vec![
            "coordinator".to_string(),
            "--api-listen".into(),
            format!("{}:0", self.ip(0)),
        ];
        a.extend_from_slice(args);
        let (proc, ready) = self.spawn(convoyd, "coordinator", 0, &a, &[])?;
        self.coordinator_addr = ready["addrs"][0]
            .as_str()
            .ok_or_else(|| anyhow!("the coordinator printed no address"))?
            .to_string();
        self.coordinator = Some(proc);
        self.coordinator_ready = ready;
        Ok(())
    }

    /// Kills the coordinator (SIGKILL, as a crash or power cut would) and
    /// starts it again on the same data directory and address, so the
    /// targets find it where it was.
    pub fn restart_coordinator(&mut self, convoyd: &Path, args: &[String]) -> Result<()> {
        if let Some(mut p) = self.coordinator.take() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        let listen = self
            .coordinator_addr
            .split("/p2p/")
            .next()
            .unwrap_or_default()
            .to_string();
        let mut args = args.to_vec();
        if let Some(i) = args.iter().position(|a| a == "--listen") {
            args[i + 1] = listen;
        }
        self.start_coordinator(convoyd, &args)
    }

    /// Connects to the coordinator as its local operator (the key it made
    /// in its data directory).
    pub async fn operator_client(&self) -> Result<Client> {
        let key = convoy_daemon::fleet_key::read(&self.key_file)?;
        let operator_key = self.coordinator_ready["operator_key_file"]
            .as_str()
            .ok_or_else(|| anyhow!("the coordinator made no local operator key"))?;
        let identity = convoy_daemon::coordinator::operators::read_key(Path::new(operator_key))?;
        Client::connect(&self.coordinator_addr, key, identity)
            .await
            .map_err(|e| anyhow!(e))
    }

    /// Starts a target in data centre `dc` (`args` after `target`),
    /// pointed at the coordinator, its health endpoint on a free port;
    /// returns its ready line.
    pub fn start_target(
        &mut self,
        convoyd: &Path,
        name: &str,
        dc: usize,
        args: &[String],
    ) -> Result<serde_json::Value> {
        self.start_target_with(convoyd, name, dc, args, &[])
    }

    /// [`Fleet::start_target`] with these variables in its environment
    /// (for its hooks, see `--hook-env`).
    pub fn start_target_with(
        &mut self,
        convoyd: &Path,
        name: &str,
        dc: usize,
        args: &[String],
        envs: &[(String, String)],
    ) -> Result<serde_json::Value> {
        let mut a = vec![
            "target".to_string(),
            "--coordinator".into(),
            self.coordinator_addr.clone(),
            "--health-listen".into(),
            format!("{}:0", self.ip(dc)),
        ];
        a.extend_from_slice(args);
        let (proc, ready) = self.spawn(convoyd, name, dc, &a, envs)?;
        self.targets.push(proc);
        if let Some(h) = ready["health"].as_str() {
            self.target_health.push(h.to_string());
        }
        Ok(ready)
    }

    /// Starts a convoyd in data centre `dc` and waits for its ready line.
    fn spawn(
        &self,
        convoyd: &Path,
        name: &str,
        dc: usize,
        args: &[String],
        envs: &[(String, String)],
    ) -> Result<(Proc, serde_json::Value)> {
        let log = std::fs::File::create(self.log(name))?;
        // In a lab, `ip netns exec NS` runs it (and becomes it: the pid is
        // convoyd's).
        let mut cmd = match &self.lab {
            Some(lab) => lab.command(dc % lab.dcs(), convoyd),
            None => Command::new(convoyd),
        };
        if self.die_with_us {
            die_with_parent(&mut cmd);
        }
        let mut child = cmd
            .args(args)
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .env_remove("CONVOY_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", convoyd.display()))?;
        let stdout = child.stdout.take().expect("piped");
        let proc = Proc {
            child,
            name: name.to_string(),
        };
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let ready: serde_json::Value = serde_json::from_str(&line)
            .map_err(|_| anyhow!("{} did not start:\n{}", proc.name, self.tail(name)))?;
        Ok((proc, ready))
    }
}

/// Makes the child `cmd` starts get SIGTERM when its parent dies
/// (Linux's parent-death signal; it survives the `ip netns exec` in
/// front of a lab's daemon, which execs it). The signal follows the
/// thread that spawns, not the process: bench, demo and load-test start
/// their fleets from the thread that runs their runtime's `block_on`,
/// the main thread. A parent that died before the child set it up is
/// caught by the parent's pid changing.
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: between fork and exec the closure calls only prctl and
    // getppid, which are async-signal-safe, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(std::io::Error::other(
                    "the process starting it exited first",
                ));
            }
            Ok(())
        });
    }
}

/// Bytes the fleet's daemons carried, summed over them: on the wire (as
/// the senders count them and as the receivers do) and chunk bodies.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct Traffic {
    pub wire_sent: u64,
    pub wire_received: u64,
    pub chunks_sent: u64,
    pub chunks_received: u64,
}

impl std::ops::Sub for Traffic {
    type Output = Traffic;
    fn sub(self, o: Traffic) -> Traffic {
        Traffic {
            wire_sent: self.wire_sent.saturating_sub(o.wire_sent),
            wire_received: self.wire_received.saturating_sub(o.wire_received),
            chunks_sent: self.chunks_sent.saturating_sub(o.chunks_sent),
            chunks_received: self.chunks_received.saturating_sub(o.chunks_received),
        }
    }
}

/// The value of the sample `name` (labels and all) in a Prometheus text page.
fn sample(page: &str, name: &str) -> Result<u64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow!("no {name} in the metrics page"))
}

impl Fleet {
    /// Reads every daemon's counters now (the origin's through its API,
    /// the targets' from their health endpoints), leaving out the bench's
    /// own session with the coordinator (`client`): what it sent, the
    /// coordinator received, and the other way round.
    pub(super) async fn traffic(&self, client: &Client) -> Result<Traffic> {
        let api = self.coordinator_ready["api"]
            .as_str()
            .ok_or_else(|| anyhow!("the coordinator printed no API address"))?
            .to_string();
        let token_file = self.coordinator_ready["api_token_file"]
            .as_str()
            .map(PathBuf::from);
        let targets = self.target_health.clone();
        let own = client.wire_bytes();
        let mut t = tokio::task::spawn_blocking(move || -> Result<Traffic> {
            let origin = crate::operate::Api::new(Some(api), token_file).get_text("/metrics")?;
            let mut t = Traffic {
                wire_sent: sample(&origin, "convoy_wire_bytes_total{direction=\"sent\"}")?,
                wire_received: sample(&origin, "convoy_wire_bytes_total{direction=\"received\"}")?,
                chunks_sent: sample(&origin, "convoy_origin_bytes_sent_total")?,
                chunks_received: 0,
            };
            let agent = ureq::Agent::new_with_defaults();
            for h in &targets {
                let page = agent
                    .get(&format!("http://{h}/metrics"))
                    .call()
                    .and_then(|mut r| r.body_mut().read_to_string())
                    .with_context(|| format!("cannot read the metrics of the target at {h}"))?;
                let get = |what: &str, dir: &str| {
                    sample(
                        &page,
                        &format!("convoy_{what}_bytes_total{{direction=\"{dir}\"}}"),
                    )
                };
                t.wire_sent += get("wire", "sent")?;
                t.wire_received += get("wire", "received")?;
                t.chunks_sent += get("chunk", "sent")?;
                t.chunks_received += get("chunk", "received")?;
            }
            Ok(t)
        })
        .await??;
        t.wire_sent = t.wire_sent.saturating_sub(own.received);
        t.wire_received = t.wire_received.saturating_sub(own.sent);
        Ok(t)
    }

    /// Waits until chunk traffic has stopped — no chunk body sent or
    /// received between two readings half a second apart (bounded: 30 s)
    /// — and returns the last reading.
    pub(super) async fn traffic_once_quiet(&self, client: &Client) -> Result<Traffic> {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.tick().await;
        let mut last = self.traffic(client).await?;
        for _ in 0..60 {
            tick.tick().await;
            let now = self.traffic(client).await?;
            if (now.chunks_sent, now.chunks_received) == (last.chunks_sent, last.chunks_received) {
                return Ok(now);
            }
            last = now;
        }
        bail!("chunk traffic had not stopped 30 s after the staging ended")
    }
}

pub(crate) fn convoyd_path(given: Option<&Path>) -> Result<PathBuf> {
    match given {
        Some(p) => Ok(p.to_path_buf()),
        None => sibling("convoyd", "pass --convoyd PATH"),
    }
}

/// The program `name` next to this one; `hint` says what to do if it is
/// not there.
pub(crate) fn sibling(name: &str, hint: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let p = exe.with_file_name(name);
    if !p.is_file() {
        bail!("{name} is not next to {}; {hint}", exe.display());
    }
    Ok(p)
}

/// The processes a run measures: the origin's side and the targets'.
pub(super) struct ProcStats {
    origin: Vec<u32>,
    targets: Vec<u32>,
}

impl ProcStats {
    pub fn of_fleet(fleet: &Fleet) -> Self {
        Self {
            origin: fleet.coordinator.iter().map(|p| p.child.id()).collect(),
            targets: fleet.targets.iter().map(|p| p.child.id()).collect(),
        }
    }

    pub fn cpu(&self) -> Cpu {
        let origin: f64 = self.origin.iter().map(|p| cpu_seconds(*p)).sum();
        let targets: f64 = self.targets.iter().map(|p| cpu_seconds(*p)).sum();
        Cpu {
            fleet: origin + targets,
            origin,
        }
    }

    /// Starts a new peak-memory window (`/proc/PID/clear_refs`, Linux ≥ 4.0).
    pub fn reset_peak_rss(&self) {
        for pid in self.origin.iter().chain(&self.targets) {
            let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
        }
    }

    /// Peak resident bytes since the last reset: the origin's, the largest target's.
    pub fn peak_rss(&self) -> (u64, u64) {
        let peak = |pids: &[u32]| pids.iter().map(|p| rss(*p).1).max().unwrap_or(0);
        (peak(&self.origin), peak(&self.targets))
    }
}

/// CPU seconds (user + system) a process and its reaped children used, from /proc.
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name, which is in parentheses.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime, stime, and the same of its reaped children (the rsync
    // daemon forks one per transfer).
    let ticks: f64 = (11..=14)
        .filter_map(|i| f.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks / hz
}

/// Resident bytes of a process now and at its peak (VmRSS, VmHWM).
pub(crate) fn rss(pid: u32) -> (u64, u64) {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return (0, 0);
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(0, |kib| kib << 10)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

pub(super) async fn start_fleet(args: &BenchArgs, rates: &Rates, convoyd: &Path) -> Result<Fleet> {
    let mut fleet = Fleet::new("convoy-bench-", args.logs.clone())?;
    if args.netns {
        let link = rates.dc_link;
        let lab = convoy_benches::netns::Lab::new(args.dcs, link).context("--netns")?;
        eprintln!(
            "{} data centres in network namespaces {}…, links {}",
            args.dcs,
            lab.dc(0),
            link.map_or("uncapped".to_string(), |r| format!(
                "capped at {}/s each way",
                indicatif::BinaryBytes(r)
            ))
        );
        fleet.lab = Some(lab);
    }
    let common = |fleet: &Fleet, name: &str, dc: usize, up: Option<u64>| -> Vec<String> {
        let mut a = fleet.common_args(name, dc, &args.daemon_log_level, args.nodes + 1);
        a.extend(["--security".into(), args.security.name().to_string()]);
        if let Some(u) = up {
            a.extend(["--upload-rate".into(), u.to_string()]);
        }
        if let Some(d) = rates.downlink {
            a.extend(["--download-rate".into(), d.to_string()]);
        }
        a
    };
    eprintln!(
        "starting a coordinator and {} targets in {}",
        args.nodes,
        fleet.dir.path().display()
    );
    let mut cargs = common(&fleet, "coordinator", 0, rates.origin);
    cargs.extend([
        "--label".into(),
        "dc=dc0".into(),
        "--push-parallel".into(),
        args.push_parallel.to_string(),
        "--delta-bases".into(),
        args.delta_bases.to_string(),
    ]);
    fleet.start_coordinator(convoyd, &cargs)?;
    for i in 0..args.nodes {
        let name = format!("target-{i:03}");
        let dc = i % args.dcs;
        let mut targs = common(&fleet, &name, dc, rates.uplink);
        targs.extend([
            "--label".into(),
            format!("dc=dc{dc}"),
            "--label".into(),
            format!("zone=z{}", (i / args.dcs) % 2),
        ]);
        fleet.start_target(convoyd, &name, dc, &targs)?;
    }
    Ok(fleet)
}

pub(crate) async fn wait_for_targets(client: &Client, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        if let ControlResponse::Fleet(m) = control(client, ControlRequest::Fleet).await? {
            let alive = m.iter().filter(|m| m.alive).count();
            if alive >= n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("only {alive} of {n} targets registered within 60 s");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_named_from_the_logs() {
        let fleet = Fleet::new("convoy-diagnose-", None).unwrap();
        std::fs::write(fleet.log("target-000"), "INFO staged\n").unwrap();
        assert_eq!(fleet.diagnose(), None);
        std::fs::write(
            fleet.log("target-001"),
            "WARN cannot store a chunk: writing a pack: No space left on device (os error 28)\n",
        )
        .unwrap();
        let why = fleet.diagnose().unwrap();
        assert!(
            why.contains("target-001") && !why.contains("target-000"),
            "{why}"
        );
    }

    #[test]
    fn a_sample_is_read_with_its_labels() {
        let page = "# HELP x\nconvoy_wire_bytes_total{direction=\"sent\"} 12\nconvoy_wire_bytes_total{direction=\"received\"} 34\n";
        assert_eq!(
            sample(page, "convoy_wire_bytes_total{direction=\"received\"}").unwrap(),
            34
        );
        assert_eq!(
            sample(page, "convoy_wire_bytes_total{direction=\"sent\"}").unwrap(),
            12
        );
        assert!(
            sample(page, "convoy_wire_bytes_total").is_err(),
            "a name without its labels"
        );
    }
}
