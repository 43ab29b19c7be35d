//! How the CLI meets closed pipes, sockets and its own death: a closed
//! stdout ends it quietly, as it ends other Unix tools; a socket its peer
//! closed is an error it reports, never a signal that kills it silently;
//! killed outright, it leaves no daemon of its fleet running.

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use convoy_tests::bin_dir;

/// `convoy sim ... | true`: the reader is gone before the table is
/// written. The CLI ends by SIGPIPE, printing nothing.
#[test]
fn a_closed_stdout_ends_the_cli_quietly() {
    let work = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin_dir().join("convoy"))
        .arg("--store")
        .arg(work.path().join("store"))
        .args(["sim", "--nodes", "20", "--size", "1MiB", "--modes", "swarm"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGPIPE), "{status:?}: {stderr}");
    // The simulator's progress goes to stderr; no error does.
    assert!(!stderr.contains("error"), "{stderr}");
}

/// `convoy fleet` against a "coordinator" listening on `port` of
/// loopback, with keys of its own made in `work`.
fn fleet_cli(work: &std::path::Path, port: u16) -> Command {
    let fleet_key = work.join("fleet.key");
    let operator_key = work.join("operator.key");
    for (bin, verb, file) in [
        ("convoyd", "fleet-key", &fleet_key),
        ("convoy", "keygen", &operator_key),
    ] {
        let ok = Command::new(bin_dir().join(bin))
            .arg(verb)
            .arg(file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(ok, "{bin} {verb}");
    }
    let peer = "12D3KooWGzh9Lo6SNsdGqjkS3w3bDBYBUQWuv7cfVtrUsGvT5Vdk";
    let mut cli = Command::new(bin_dir().join("convoy"));
    cli.arg("--store")
        .arg(work.join("store"))
        .arg("--coordinator")
        .arg(format!("/ip4/127.0.0.1/tcp/{port}/p2p/{peer}"))
        .arg("--fleet-key-file")
        .arg(&fleet_key)
        .arg("--operator-key-file")
        .arg(&operator_key)
        .arg("fleet");
    cli
}

/// The CLI talking to a coordinator ignores SIGPIPE: with it at the
/// default, `convoy fleet` died of the signal with no word when a
/// coordinator closed the connection of a client with the wrong fleet
/// key while the client was still writing (seen under load in
/// `fleet::without_the_fleet_key_nothing_can_be_fetched_or_ordered`).
#[test]
fn a_client_of_the_coordinator_does_not_die_of_a_closed_socket() {
    let work = tempfile::tempdir().unwrap();
    // A "coordinator" that accepts and never answers: the client waits
    // in its handshake, alive, for as long as this test looks at it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut child = fleet_cli(work.path(), port)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Once it has connected, its main has long begun.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(listener.accept().map(|(stream, _)| stream));
    });
    let _held = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the CLI connects within 30 s")
        .expect("accept");
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let ignored = status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .map(|mask| u64::from_str_radix(mask.trim(), 16).unwrap())
        .expect("SigIgn in /proc status");
    let bit = 1u64 << (libc::SIGPIPE - 1);
    assert_ne!(ignored & bit, 0, "SIGPIPE not ignored: SigIgn {ignored:#x}");
}

/// A coordinator that resets every connection: the error names the
/// address and its cause once (libp2p's own text said "Connection reset
/// by peer" three times, inside "Multistream select failed" twice).
#[test]
fn a_failed_dial_names_its_cause_once() {
    use std::os::fd::AsRawFd;
    let work = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        // Bounded: the CLI dials a few times at most.
        for stream in listener.incoming().take(16).flatten() {
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: a valid socket and option of the right size; a zero
            // linger makes the close a reset.
            unsafe {
                libc::setsockopt(
                    stream.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                );
            }
            let mut first = [0u8; 8];
            let _ = (&stream).read(&mut first);
        }
    });
    let out = fleet_cli(work.path(), port).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(
        stderr.matches("Connection reset by peer").count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains(&format!("tcp/{port}")), "{stderr}");
}

/// Processes whose command line names `dir` (the daemons of a fleet in it).
fn processes_in(dir: &str) -> Vec<libc::pid_t> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(dir))
        })
        .collect()
}

/// `convoy bench` killed with SIGKILL runs no handler and no destructor:
/// its daemons used to run on, serving nothing, until killed by hand.
/// Each now gets SIGTERM from the kernel when the bench dies.
#[test]
fn a_bench_killed_outright_leaves_no_daemon_running() {
    use std::io::BufRead;
    let work = tempfile::tempdir().unwrap();
    let mut bench = Command::new(bin_dir().join("convoy"))
        .arg("--store")
        .arg(work.path().join("store"))
        .args([
            "bench", "--nodes", "3", "--size", "4MiB", "--uplink", "64KiB",
        ])
        .args(["--modes", "pull"])
        .env("TMPDIR", work.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(bench.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let dir = line
        .trim()
        .strip_prefix("starting a coordinator and 3 targets in ")
        .unwrap_or_else(|| panic!("{line}"))
        .to_string();
    // The coordinator and three targets, started one after another.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while processes_in(&dir).len() < 4 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let started = processes_in(&dir).len();
    bench.kill().unwrap();
    bench.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut left = processes_in(&dir);
    while !left.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        left = processes_in(&dir);
    }
    for pid in &left {
        // SAFETY: kill with a pid just read from /proc; the worst case is
        // a signal to a process that has exited.
        unsafe {
            libc::kill(*pid, libc::SIGKILL);
        }
    }
    assert_eq!(started, 4, "the fleet did not start");
    assert!(
        left.is_empty(),
        "{} daemons still ran 30 s after the bench was killed",
        left.len()
    );
}
