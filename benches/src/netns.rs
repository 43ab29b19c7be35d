//! Data centres joined by real links, on one machine: one network
//! namespace per data centre, each joined to a backbone namespace by a
//! veth pair whose two ends may be capped with a `tbf` qdisc (this kernel
//! has no `netem`), and a management link from the host to the backbone so
//! that a bench or test running on the host reaches every daemon.
//!
//! ```text
//!   host ──mgmt── backbone ──dc0── [convoy<s>-dc0]  198.18.x.2
//!                         ├──dc1── [convoy<s>-dc1]  198.18.x.6
//!                         └──…
//! ```
//!
//! Addresses come from 198.18.0.0/15, the range reserved for network
//! benchmarks: the lab in slot `s` (0 to 31) owns the /20 at
//! 198.18.0.0 + 4096·s, data centre `n` the /30 at offset 4·n (the
//! backbone's end `.1`, the data centre's `.2`), the management link the
//! last /30. Slots let labs of several processes (tests running at once)
//! stand side by side; a lab whose owner died (SIGKILL) is swept by the
//! next one to start. Everything is removed when the [`Lab`] drops: its
//! namespaces, and with them their links and the host's route.
//!
//! Needs root (CAP_NET_ADMIN) and iproute2's `ip` and `tc`.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};

/// How many labs can stand at once: 32 slots of a /20 fill 198.18.0.0/15.
const SLOTS: u32 = 32;
/// The first address of 198.18.0.0/15.
const RANGE: u32 = u32::from_be_bytes([198, 18, 0, 0]);
/// Data centres a lab can hold: a /20 less the management link's /30.
pub const MAX_DCS: usize = 1023;
/// Where the owners of labs are written (one `SLOT.pid` file each) and
/// the lock that keeps two processes from taking one slot.
const RUN_DIR: &str = "/run/convoy-lab";

/// Bytes the kernel counted on one link, seen from the backbone's end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkBytes {
    /// Into the data centre (the backbone end's transmitted bytes).
    pub into: u64,
    /// Out of the data centre (the backbone end's received bytes).
    pub out_of: u64,
}

/// A running lab: its namespaces exist until it drops.
pub struct Lab {
    slot: u32,
    dcs: usize,
    /// Each link's cap (bytes per second), both ways; `None`: uncapped.
    link_rate: Option<u64>,
}

impl Lab {
    /// Makes `dcs` data-centre namespaces joined through a backbone, each
    /// link capped at `link_rate` bytes per second each way (`None`: as
    /// fast as veth goes), and a route from the host to them all.
    pub fn new(dcs: usize, link_rate: Option<u64>) -> Result<Self> {
        if dcs == 0 || dcs > MAX_DCS {
            bail!("a lab holds 1 to {MAX_DCS} data centres, not {dcs}");
        }
        check_tools()?;
        std::fs::create_dir_all(RUN_DIR).with_context(|| format!("cannot create {RUN_DIR}"))?;
        let _lock = Lock::take(&Path::new(RUN_DIR).join("lock"))?;
        let existing = namespaces()?;
        sweep_orphans(&existing)?;
        let existing = namespaces()?;
        let slot = (0..SLOTS)
            .find(|s| !existing.iter().any(|n| n.starts_with(&prefix(*s))))
            .ok_or_else(|| anyhow!("all {SLOTS} network labs are in use"))?;
        std::fs::write(owner_file(slot), std::process::id().to_string())
            .with_context(|| format!("cannot write {}", owner_file(slot).display()))?;
        // From here on, a failure removes what was made (Drop).
        let lab = Lab {
            slot,
            dcs,
            link_rate,
        };
        lab.build()?;
        Ok(lab)
    }

    fn build(&self) -> Result<()> {
        let bb = self.backbone();
        ip(&["netns", "add", &bb])?;
        ip(&["-n", &bb, "link", "set", "lo", "up"])?;
        in_ns(&bb, &["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])?;
        // The management link: the host's end is the only name this lab
        // puts in the host's namespace, so it carries the slot.
        let host_end = self.host_link();
        ip(&[
            "link", "add", &host_end, "type", "veth", "peer", "name", "mgmt", "netns", &bb,
        ])?;
        let (host_addr, bb_addr) = (self.addr(4092 + 1), self.addr(4092 + 2));
        ip(&["addr", "add", &format!("{host_addr}/30"), "dev", &host_end])?;
        ip(&["link", "set", &host_end, "up"])?;
        ip(&[
            "-n",
            &bb,
            "addr",
            "add",
            &format!("{bb_addr}/30"),
            "dev",
            "mgmt",
        ])?;
        ip(&["-n", &bb, "link", "set", "mgmt", "up"])?;
        ip(&[
            "route",
            "add",
            &format!("{}/20", self.addr(0)),
            "via",
            &bb_addr.to_string(),
            "dev",
            &host_end,
        ])?;
        for n in 0..self.dcs {
            let ns = self.dc(n);
            let outer = format!("dc{n}");
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n", &bb, "link", "add", &outer, "type", "veth", "peer", "name", "uplink",
                "netns", &ns,
            ])?;
            let (gw, me) = (self.addr(4 * n as u32 + 1), self.addr(4 * n as u32 + 2));
            ip(&["-n", &bb, "addr", "add", &format!("{gw}/30"), "dev", &outer])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{me}/30"),
                "dev",
                "uplink",
            ])?;
            ip(&["-n", &bb, "link", "set", &outer, "up"])?;
            ip(&["-n", &ns, "link", "set", "uplink", "up"])?;
            ip(&["-n", &ns, "route", "add", "default", "via", &gw.to_string()])?;
            if let Some(rate) = self.link_rate {
                cap(&bb, &outer, rate)?;
                cap(&ns, "uplink", rate)?;
            }
        }
        Ok(())
    }

    /// Data centres in the lab.
    pub fn dcs(&self) -> usize {
        self.dcs
    }

    /// Each link's cap, if any (bytes per second, each way).
    pub fn link_rate(&self) -> Option<u64> {
        self.link_rate
    }

    /// The namespace of data centre `n`.
    pub fn dc(&self, n: usize) -> String {
        format!("{}dc{n}", prefix(self.slot))
    }

    /// The address daemons in data centre `n` listen on.
    pub fn dc_addr(&self, n: usize) -> Ipv4Addr {
        self.addr(4 * n as u32 + 2)
    }

    /// The command line prefix that runs a program in data centre `n`
    /// (`ip netns exec NS`, which then executes the program: its process
    /// id is the program's).
    pub fn exec_prefix(&self, n: usize) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.dc(n)]
    }

    /// `program` to be run in data centre `n` (see [`Lab::exec_prefix`]).
    pub fn command(&self, n: usize, program: &std::path::Path) -> Command {
        let prefix = self.exec_prefix(n);
        let mut c = Command::new(&prefix[0]);
        c.args(&prefix[1..]).arg(program);
        c
    }

    /// Cuts data centre `n` off (its link down) or joins it again. Its
    /// daemons keep running and keep their addresses: a partition, not a
    /// crash.
    pub fn set_link(&self, n: usize, up: bool) -> Result<()> {
        let state = if up { "up" } else { "down" };
        ip(&[
            "-n",
            &self.backbone(),
            "link",
            "set",
            &format!("dc{n}"),
            state,
        ])
    }

    /// What the kernel counted on each data centre's link (index `n`) and,
    /// last, on the management link (its `into` is what the host sent
    /// into the lab).
    pub fn link_bytes(&self) -> Result<Vec<LinkBytes>> {
        let out =
            output(Command::new("ip").args(["-n", &self.backbone(), "-s", "-j", "link", "show"]))?;
        let links: serde_json::Value =
            serde_json::from_str(&out).context("ip -j link show printed no JSON")?;
        let of = |name: &str| -> Result<LinkBytes> {
            let l = links
                .as_array()
                .and_then(|a| a.iter().find(|l| l["ifname"] == name))
                .ok_or_else(|| anyhow!("no link {name} in the backbone"))?;
            let get = |dir: &str| {
                l["stats64"][dir]["bytes"]
                    .as_u64()
                    .ok_or_else(|| anyhow!("no {dir} bytes for {name}"))
            };
            Ok(LinkBytes {
                into: get("tx")?,
                out_of: get("rx")?,
            })
        };
        let mut all = (0..self.dcs)
            .map(|n| of(&format!("dc{n}")))
            .collect::<Result<Vec<_>>>()?;
        // The host's traffic enters the backbone on `mgmt`: what it
        // received there is what the host sent.
        let m = of("mgmt")?;
        all.push(LinkBytes {
            into: m.out_of,
            out_of: m.into,
        });
        Ok(all)
    }

    fn backbone(&self) -> String {
        format!("{}bb", prefix(self.slot))
    }

    fn host_link(&self) -> String {
        format!("convoy-lab{}", self.slot)
    }

    fn addr(&self, offset: u32) -> Ipv4Addr {
        Ipv4Addr::from(RANGE + self.slot * 4096 + offset)
    }
}

/// Bytes that crossed between data centres, from [`Lab::link_bytes`]
/// read before and after: all that entered the data centres, less what
/// the host sent in (its orders and its reading of metrics).
pub fn cross_dc_bytes(before: &[LinkBytes], after: &[LinkBytes]) -> u64 {
    let delta = |i: usize| after[i].into.saturating_sub(before[i].into);
    // The host's link is last.
    let host = after.len() - 1;
    (0..host)
        .map(delta)
        .sum::<u64>()
        .saturating_sub(delta(host))
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = remove_slot(self.slot) {
            eprintln!("warning: cannot remove network lab {}: {e:#}", self.slot);
        }
    }
}

/// The names of this lab's namespaces start with this.
fn prefix(slot: u32) -> String {
    format!("convoy{slot}-")
}

fn owner_file(slot: u32) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{slot}.pid"))
}

/// Removes every namespace of `slot` (their links go with them, and the
/// host's end of the management link and its route with the backbone's).
fn remove_slot(slot: u32) -> Result<()> {
    for ns in namespaces()?
        .iter()
        .filter(|n| n.starts_with(&prefix(slot)))
    {
        ip(&["netns", "delete", ns])?;
    }
    let _ = std::fs::remove_file(owner_file(slot));
    Ok(())
}

/// Removes the labs whose owners are gone.
fn sweep_orphans(existing: &[String]) -> Result<()> {
    for slot in 0..SLOTS {
        if !existing.iter().any(|n| n.starts_with(&prefix(slot))) {
            continue;
        }
        let owner = std::fs::read_to_string(owner_file(slot))
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok());
        // SAFETY: kill(2) with signal 0 only checks that the process exists.
        let alive = owner.is_some_and(|pid| unsafe { libc::kill(pid, 0) } == 0);
        if !alive {
            eprintln!("removing network lab {slot}, left by a process that is gone");
            remove_slot(slot)?;
        }
    }
    Ok(())
}

fn namespaces() -> Result<Vec<String>> {
    let out = output(Command::new("ip").args(["netns", "list"]))?;
    // Each line: NAME, or NAME (id: N).
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// Caps the egress of `dev` in `ns` at `rate` bytes per second. The
/// bucket holds at least 256 KiB: veth hands the qdisc segments of up to
/// 64 KiB (GSO), and a bucket smaller than a segment would never pass it.
fn cap(ns: &str, dev: &str, rate: u64) -> Result<()> {
    let burst = (rate / 10).max(256 << 10);
    tc(&[
        "-n",
        ns,
        "qdisc",
        "add",
        "dev",
        dev,
        "root",
        "tbf",
        "rate",
        &format!("{}bit", rate * 8),
        "burst",
        &burst.to_string(),
        "latency",
        "200ms",
    ])
}

fn check_tools() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("network namespaces need root (CAP_NET_ADMIN)");
    }
    for tool in ["ip", "tc"] {
        let found = Command::new(tool)
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            bail!("{tool} is not installed (Debian package iproute2)");
        }
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    output(Command::new("ip").args(args)).map(drop)
}

fn tc(args: &[&str]) -> Result<()> {
    output(Command::new("tc").args(args)).map(drop)
}

fn in_ns(ns: &str, cmd: &[&str]) -> Result<()> {
    output(Command::new("ip").args(["netns", "exec", ns]).args(cmd)).map(drop)
}

/// Runs `cmd`; its stdout, or an error naming the command and what it printed.
fn output(cmd: &mut Command) -> Result<String> {
    let line = format!("{cmd:?}").replace('"', "");
    let out = cmd.output().with_context(|| format!("cannot run {line}"))?;
    if !out.status.success() {
        bail!(
            "{line} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An exclusive lock on a file (flock), held until dropped.
struct Lock {
    _file: std::fs::File,
}

impl Lock {
    fn take(path: &Path) -> Result<Self> {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: flock on a descriptor we own; blocks until it is ours.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot lock {}", path.display()));
        }
        Ok(Lock { _file: f })
    }
}
