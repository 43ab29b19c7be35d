//! The baselines `convoy bench` puts beside the convoy modes: `rsync`, the
//! staging-diff push teams run today, and `tcp`, plain sockets that show
//! what the machine itself can move.
//!
//! Both get the origin's cap as push does: one [`Pacer`] for the origin's
//! side as a whole, shared by the K transfers that run at once (for rsync,
//! through a relay in front of its daemon), so fewer than K running get
//! the whole cap rather than a fixed 1/K each.

use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use convoy_daemon::net::rate::Pacer;

use super::fleet::{cpu_seconds, Fleet, Proc};
use super::{BenchArgs, Cpu, Measured, Rates, RunResult};

/// The staging-diff push of today: rsync from a daemon on loopback into a
/// directory per target, K at a time, the daemon's output capped as a
/// whole at the origin's cap.
pub(super) fn rsync_runs(
    fleet: &Fleet,
    args: &BenchArgs,
    rates: &Rates,
    v1: &Path,
    v2: Option<&Path>,
) -> Result<Vec<RunResult>> {
    let root = fleet.dir.path().join("rsync");
    std::fs::create_dir_all(&root)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let conf = root.join("rsyncd.conf");
    let mut text = format!(
        "use chroot = no\nread only = yes\n[v1]\npath = {}\n",
        v1.display()
    );
    if let Some(v2) = v2 {
        text += &format!("[v2]\npath = {}\n", v2.display());
    }
    std::fs::write(&conf, text)?;
    let daemon = Proc {
        child: Command::new("rsync")
            .args(["--daemon", "--no-detach", "--address=127.0.0.1"])
            .arg(format!("--port={port}"))
            .arg(format!("--config={}", conf.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(fleet.log("rsyncd"))?)
            .spawn()
            .context("cannot start the rsync daemon")?,
        name: "rsyncd".into(),
    };
    // rsync gives no readiness signal: poll its port, bounded.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!(
                "{} did not listen within 10 s:\n{}",
                daemon.name,
                fleet.tail("rsyncd")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut runs = vec![rsync_once(
        &root,
        v1,
        port,
        daemon.child.id(),
        "v1",
        args,
        rates,
        dir_bytes(v1)?,
        false,
    )?];
    if let Some(v2) = v2 {
        let changed = changed_bytes(v1, v2)?;
        runs.push(rsync_once(
            &root,
            v2,
            port,
            daemon.child.id(),
            "v2",
            args,
            rates,
            changed,
            true,
        )?);
    }
    drop(daemon);
    Ok(runs)
}

pub(super) fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut n = 0;
    for p in sorted_files(dir)? {
        n += std::fs::metadata(dir.join(p))?.len();
    }
    Ok(n)
}

/// Whether every file of `a` is in `b` with the same bytes.
fn same_files(a: &Path, b: &Path) -> Result<bool> {
    for p in sorted_files(a)? {
        if std::fs::read(a.join(&p))? != std::fs::read(b.join(&p)).unwrap_or_default() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Bytes that differ between two trees of the same files (64 KiB runs).
pub(super) fn changed_bytes(a: &Path, b: &Path) -> Result<u64> {
    Ok(changed_runs(a, b)?.iter().map(|r| r.len).sum())
}

/// The 64 KiB runs of `b` that differ from the same runs of `a`.
fn changed_runs(a: &Path, b: &Path) -> Result<Vec<Range>> {
    const RUN: usize = 64 << 10;
    let mut out = Vec::new();
    for p in sorted_files(b)? {
        let x = std::fs::read(a.join(&p)).unwrap_or_default();
        let file = b.join(&p);
        let y = std::fs::read(&file)?;
        for (i, y) in y.chunks(RUN).enumerate() {
            if x.chunks(RUN).nth(i) != Some(y) {
                out.push(Range {
                    file: file.clone(),
                    offset: (i * RUN) as u64,
                    len: y.len() as u64,
                });
            }
        }
    }
    Ok(out)
}

/// One rsync pass over every target, K at a time.
#[allow(clippy::too_many_arguments)]
fn rsync_once(
    root: &Path,
    source: &Path,
    port: u16,
    daemon_pid: u32,
    module: &str,
    args: &BenchArgs,
    rates: &Rates,
    package_bytes: u64,
    update: bool,
) -> Result<RunResult> {
    let k = args.push_parallel;
    let pacer = Pacer::new(rates.origin);
    let cpu0 = reaped_children_cpu() + cpu_seconds(daemon_pid);
    let started = Instant::now();
    let (done, received, sent) = paced_relay(port, &pacer, |port| {
        k_at_a_time(args.nodes, k, started, |i| {
            let dest = root.join(format!("target-{i:03}"));
            std::fs::create_dir_all(&dest)?;
            let output = Command::new("rsync")
                // -I: also when size and mtime match (a new build can keep both);
                // --fsync: durable when it exits, as a staged convoy target is;
                // -z: compressed, as a push across data centres runs.
                .args(["-a", "-I", "--stats", "--inplace", "--fsync"])
                .args((!args.rsync_plain).then_some("-z"))
                .arg(format!("rsync://127.0.0.1:{port}/{module}/"))
                .arg(format!("{}/", dest.display()))
                .stdin(Stdio::null())
                .output()
                .context("cannot run rsync")?;
            let at = Instant::now();
            if !output.status.success() {
                bail!(
                    "rsync to target {i} failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            if !same_files(source, &dest)? {
                bail!("rsync to target {i} finished but its tree differs from the package");
            }
            let stats = String::from_utf8_lossy(&output.stdout);
            Ok(Transferred {
                bytes: rsync_stat(&stats, "Total bytes received"),
                back: rsync_stat(&stats, "Total bytes sent"),
                at,
            })
        })
    })??;
    let cpu = reaped_children_cpu() + cpu_seconds(daemon_pid) - cpu0;
    Ok(RunResult::new(
        args,
        rates,
        Measured {
            mode: if args.rsync_plain {
                "rsync-plain"
            } else {
                "rsync"
            },
            package_bytes,
            update,
            deltas: None,
            verified_nodes: done.len(),
            done,
            origin_egress_bytes: received,
            total_bytes: received + sent,
            total_bytes_sent: None,
            chunk_bytes: received,
            cross_dc_bytes: 0,
            cross_dc_link_bytes: None,
            max_target_bytes: 0,
            // The daemon's forks and the clients, not split by side.
            cpu: Cpu {
                fleet: cpu,
                origin: 0.0,
            },
            wall_seconds: started.elapsed().as_secs_f64(),
            peak_rss: None,
        },
    ))
}

/// What one baseline transfer reports: the bytes it moved, and the
/// instant its copy was complete (durable and checked where the mode
/// does that), before any check of the bench's own.
struct Transferred {
    bytes: u64,
    /// What the receiving side sent back (rsync's file list requests and
    /// block checksums).
    back: u64,
    at: Instant,
}

/// Runs `transfer(i)` for every target `i`, at most `k` at once, each on
/// its own thread; returns each target's completion time in seconds since
/// `started` (stamped by the caller before the first transfer starts, as
/// the convoy modes stamp theirs before the order) and the bytes the
/// transfers reported, to the targets and back.
fn k_at_a_time(
    nodes: usize,
    k: usize,
    started: Instant,
    transfer: impl Fn(usize) -> Result<Transferred> + Sync,
) -> Result<(Vec<f64>, u64, u64)> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        let mut next = 0;
        let mut running = 0;
        let mut done = Vec::with_capacity(nodes);
        let (mut bytes, mut back) = (0, 0);
        let mut failure = None;
        while (next < nodes && failure.is_none()) || running > 0 {
            while running < k && next < nodes && failure.is_none() {
                let (tx, transfer, i) = (tx.clone(), &transfer, next);
                scope.spawn(move || {
                    // A panic is reported too: the loop waits for every thread.
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| transfer(i)))
                        .unwrap_or_else(|_| {
                            Err(anyhow::anyhow!("the transfer to target {i} panicked"))
                        });
                    let _ = tx.send(r);
                });
                running += 1;
                next += 1;
            }
            let r = rx.recv().expect("a transfer thread reports");
            running -= 1;
            match r {
                Ok(t) => {
                    done.push(t.at.saturating_duration_since(started).as_secs_f64());
                    bytes += t.bytes;
                    back += t.back;
                }
                Err(e) => failure = failure.or(Some(e)),
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok((done, bytes, back)),
        }
    })
}

/// The ceiling: the same bytes over plain TCP sockets on loopback, from
/// the package's files into one file per target, K at a time, sharing the
/// origin's cap. An update sends only the 64 KiB runs that changed.
pub(super) fn tcp_runs(
    fleet: &Fleet,
    args: &BenchArgs,
    rates: &Rates,
    v1: &Path,
    v2: Option<&Path>,
) -> Result<Vec<RunResult>> {
    let mut runs = Vec::new();
    // Plain, then as a target must receive: every byte hashed and synced.
    for verify in [false, true] {
        let root = fleet.dir.path().join(tcp_mode(verify));
        runs.push(tcp_once(
            &root,
            args,
            rates,
            &whole_files(v1)?,
            false,
            verify,
        )?);
        if let Some(v2) = v2 {
            let ranges = changed_runs(v1, v2)?;
            runs.push(tcp_once(&root, args, rates, &ranges, true, verify)?);
        }
    }
    Ok(runs)
}

/// A byte range of a file to send.
struct Range {
    file: PathBuf,
    offset: u64,
    len: u64,
}

fn whole_files(dir: &Path) -> Result<Vec<Range>> {
    let mut out = Vec::new();
    for e in sorted_files(dir)? {
        let file = dir.join(e);
        let len = std::fs::metadata(&file)?.len();
        out.push(Range {
            file,
            offset: 0,
            len,
        });
    }
    Ok(out)
}

/// The regular files under `dir`, as paths relative to it, sorted.
fn sorted_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel) = dirs.pop() {
        for e in std::fs::read_dir(dir.join(&rel))? {
            let e = e?;
            let kind = e.file_type()?;
            if kind.is_dir() {
                dirs.push(rel.join(e.file_name()));
            } else if kind.is_file() {
                files.push(rel.join(e.file_name()));
            }
        }
    }
    files.sort();
    Ok(files)
}

/// The tcp baseline's name: plain, or verifying like a target.
pub(super) fn tcp_mode(verify: bool) -> &'static str {
    if verify {
        "tcp-verify"
    } else {
        "tcp"
    }
}

/// What a receiver does with the bytes: plain, the file written; with
/// `verify`, as a convoy target does with a chunk, each block BLAKE3-hashed
/// as it is written and the file synced before it counts as received.
fn receive(conn: &mut TcpStream, file: &mut std::fs::File, verify: bool) -> Result<u64> {
    if !verify {
        return Ok(std::io::copy(conn, file)?);
    }
    // Blocks of a chunk's average size.
    let mut buf = vec![0u8; 64 << 10];
    let mut n = 0u64;
    loop {
        let k = conn.read(&mut buf)?;
        if k == 0 {
            break;
        }
        std::hint::black_box(convoy_chunker::ChunkHash::of(&buf[..k]));
        file.write_all(&buf[..k])?;
        n += k as u64;
    }
    file.sync_all()?;
    Ok(n)
}

fn tcp_once(
    root: &Path,
    args: &BenchArgs,
    rates: &Rates,
    ranges: &[Range],
    update: bool,
    verify: bool,
) -> Result<RunResult> {
    let package_bytes: u64 = ranges.iter().map(|r| r.len).sum();
    let pacer = Pacer::new(rates.origin);
    std::fs::create_dir_all(root)?;
    let sender_cpu = std::sync::Mutex::new(0.0f64);
    let receiver_cpu = std::sync::Mutex::new(0.0f64);
    let started = Instant::now();
    let (done, received, _) = k_at_a_time(args.nodes, args.push_parallel, started, |i| {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let dest = root.join(format!("target-{i:03}.bin"));
        // Connected before the receiver waits, so a failed connect cannot
        // leave it blocked in accept (the listener's backlog holds it).
        let conn = TcpStream::connect(addr)?;
        std::thread::scope(|scope| {
            let receiver = scope.spawn(|| -> Result<Transferred> {
                let (mut conn, _) = listener.accept()?;
                let mut file = std::fs::File::create(&dest)?;
                let bytes = receive(&mut conn, &mut file, verify)?;
                let at = Instant::now();
                *receiver_cpu.lock().expect("not poisoned") += thread_cpu_seconds();
                Ok(Transferred { bytes, back: 0, at })
            });
            let sent = send_ranges(conn, ranges, &pacer);
            *sender_cpu.lock().expect("not poisoned") += thread_cpu_seconds();
            let received = receiver.join().expect("the receiver does not panic")?;
            let sent = sent?;
            if received.bytes != sent {
                bail!("target {i} received {} of {sent} bytes", received.bytes);
            }
            Ok(received)
        })
    })?;
    let origin = *sender_cpu.lock().expect("not poisoned");
    let targets = *receiver_cpu.lock().expect("not poisoned");
    Ok(RunResult::new(
        args,
        rates,
        Measured {
            mode: tcp_mode(verify),
            package_bytes,
            update,
            deltas: None,
            verified_nodes: done.len(),
            done,
            origin_egress_bytes: received,
            total_bytes: received,
            total_bytes_sent: None,
            chunk_bytes: received,
            cross_dc_bytes: 0,
            cross_dc_link_bytes: None,
            max_target_bytes: package_bytes,
            cpu: Cpu {
                fleet: origin + targets,
                origin,
            },
            wall_seconds: started.elapsed().as_secs_f64(),
            peak_rss: None,
        },
    ))
}

/// Sends the ranges over one connection through the origin's pacer: 64 KiB
/// writes (a chunk's average size, as push paces chunks) when capped,
/// 256 KiB when not.
fn send_ranges(mut conn: TcpStream, ranges: &[Range], pacer: &Pacer) -> Result<u64> {
    let mut buf = vec![
        0u8;
        if pacer.rate().is_some() {
            64 << 10
        } else {
            256 << 10
        }
    ];
    let mut sent = 0u64;
    for r in ranges {
        let mut file = std::fs::File::open(&r.file)?;
        file.seek(SeekFrom::Start(r.offset))?;
        let mut left = r.len;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            file.read_exact(&mut buf[..n])?;
            pace(pacer, n);
            conn.write_all(&buf[..n])?;
            sent += n as u64;
            left -= n as u64;
        }
    }
    conn.shutdown(std::net::Shutdown::Write)?;
    Ok(sent)
}

/// Waits, on this thread, for the pacer's slot for `bytes`.
fn pace(pacer: &Pacer, bytes: usize) {
    let now = Instant::now();
    std::thread::sleep(
        pacer
            .reserve(now, bytes as u64)
            .saturating_duration_since(now),
    );
}

/// Runs `body` with the port of a relay in front of the loopback port
/// `upstream`: each connection to the relay is copied both ways, and what
/// `upstream` sends goes through `pacer`, shared by every connection (the
/// origin's cap as a whole). Returns once every relayed connection has
/// closed (each side is bounded by a read timeout).
fn paced_relay<R>(upstream: u16, pacer: &Pacer, body: impl FnOnce(u16) -> R) -> Result<R> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let r = std::thread::scope(|scope| {
        scope.spawn(|| {
            for down in listener.incoming() {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                // A failed connection drops the client's: rsync reports it.
                let Ok(down) = down else { continue };
                let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let (Ok(down2), Ok(up2)) = (down.try_clone(), up.try_clone()) else {
                    continue;
                };
                scope.spawn(move || relay(down, up, None));
                scope.spawn(move || relay(up2, down2, Some(pacer)));
            }
        });
        let r = body(port);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // Wakes the accept loop, which sees `stop`.
        let _ = TcpStream::connect(("127.0.0.1", port));
        r
    });
    Ok(r)
}

/// Copies `from` to `to` until either ends (or `from` is silent for a
/// minute), through `pacer` if given; then ends `to`'s writing side.
fn relay(mut from: TcpStream, mut to: TcpStream, pacer: Option<&Pacer>) {
    let _ = from.set_read_timeout(Some(Duration::from_secs(60)));
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(p) = pacer {
            pace(p, n);
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// CPU seconds the calling thread has used.
fn thread_cpu_seconds() -> f64 {
    rusage_seconds(libc::RUSAGE_THREAD)
}

/// CPU seconds of this process's children that have been waited for.
fn reaped_children_cpu() -> f64 {
    rusage_seconds(libc::RUSAGE_CHILDREN)
}

/// User and system seconds of getrusage(2) for `who`.
fn rusage_seconds(who: libc::c_int) -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(who, &mut u);
        u
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// A figure of `rsync --stats`, 0 if it is not there.
fn rsync_stat(stats: &str, name: &str) -> u64 {
    stats
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
        .map(|v| v.replace(',', "").trim().parse().unwrap_or(0))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The relay caps its connections together, not each: three clients
    /// reading 256 KiB each at once through a 1 MiB/s pacer cannot all be
    /// done before 0.75 MiB has had its 0.75 s (less one 50 ms burst).
    #[test]
    fn the_relay_caps_every_connection_together() {
        const EACH: usize = 256 << 10;
        let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = upstream.local_addr().unwrap().port();
        let body: Vec<u8> = (0..EACH).map(|i| (i % 251) as u8).collect();
        let server = std::thread::spawn({
            let body = body.clone();
            move || {
                for _ in 0..3 {
                    let (mut c, _) = upstream.accept().unwrap();
                    c.write_all(&body).unwrap();
                }
            }
        });
        let pacer = Pacer::new(Some(1 << 20));
        let started = Instant::now();
        let got = paced_relay(port, &pacer, |relay| {
            std::thread::scope(|s| {
                let clients: Vec<_> = (0..3)
                    .map(|_| {
                        s.spawn(move || {
                            let mut c = TcpStream::connect(("127.0.0.1", relay)).unwrap();
                            c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                            let mut got = Vec::new();
                            c.read_to_end(&mut got).unwrap();
                            got
                        })
                    })
                    .collect();
                clients
                    .into_iter()
                    .map(|c| c.join().unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .unwrap();
        let took = started.elapsed();
        server.join().unwrap();
        assert!(got.iter().all(|g| *g == body), "every client got its bytes");
        assert!(took >= Duration::from_millis(690), "done in {took:?}");
    }

    #[test]
    fn rsync_stats_parse() {
        let s = "Number of files: 3\nTotal bytes sent: 1,024\nTotal bytes received: 16,777,216\n";
        assert_eq!(rsync_stat(s, "Total bytes received"), 16_777_216);
        assert_eq!(rsync_stat(s, "Total bytes sent"), 1_024);
        assert_eq!(rsync_stat("nothing", "Total bytes sent"), 0);
    }
}
