//! What a peer without the fleet key costs a daemon: a thousand
//! connections, each sending the largest frames each other protocol
//! allows and then an oversized Hello, before proving anything, leave the
//! coordinator's memory within 32 MiB of idle; each is refused, and the
//! coordinator still serves its operators. (Were those frames read, fifty
//! strangers at once would hold over 100 MiB.)

use std::time::{Duration, Instant};

use convoy_daemon::net::client::parse_peer_addr;
use convoy_tests::TestFleet;
use futures::{AsyncWriteExt, StreamExt};
use libp2p::swarm::SwarmEvent;
use libp2p::{noise, tcp, yamux, Multiaddr, PeerId, StreamProtocol};

const ATTEMPTS: usize = 1000;
/// Attempts under way at once: below the daemon's 128 pending handshakes,
/// so that each attempt gets as far as its frames.
const AT_ONCE: usize = 50;
const BUDGET: u64 = 32 << 20;

/// Resident set of `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib << 10
}

/// Opens `protocol` and writes `bytes`, ignoring a reset: the daemon may
/// drop the stream before it is all written. The stream is returned to be
/// held open: the daemon, not us, ends it.
async fn send(
    streams: &mut libp2p_stream::Control,
    peer: PeerId,
    protocol: &'static str,
    bytes: &[u8],
) -> Option<libp2p::Stream> {
    let protocol = StreamProtocol::new(protocol);
    let mut stream = streams.open_stream(peer, protocol).await.ok()?;
    let _ = stream.write_all(bytes).await;
    let _ = stream.flush().await;
    Some(stream)
}

/// One stranger: connects with a new identity, writes on the control,
/// chunk and have protocols a frame as long as each allows (up to 1 MiB of
/// it), then a Hello that claims 4 GiB, and waits for the daemon to close
/// the connection. Returns whether it did.
async fn stranger(them: PeerId, addr: Multiaddr) -> bool {
    use convoy_daemon::protocol as wire;
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .expect("tcp")
        .with_behaviour(|_| libp2p_stream::Behaviour::new())
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    let mut streams = swarm.behaviour().new_control();
    if swarm.dial(addr).is_err() {
        return false;
    }
    // A length prefix and as much of the body as the limit allows.
    let frame = |claimed: usize| {
        let mut f = (claimed as u32).to_le_bytes().to_vec();
        f.resize(4 + claimed.min(1 << 20), 0xab);
        f
    };
    let attack = async move {
        let mut held = Vec::new();
        for (protocol, claimed) in [
            (wire::CONTROL_PROTOCOL, wire::MAX_CONTROL_FRAME),
            (wire::CHUNK_PROTOCOL, wire::MAX_CHUNK_FRAME),
            (wire::HAVE_PROTOCOL, wire::MAX_HAVE_FRAME),
            (wire::HELLO_PROTOCOL, u32::MAX as usize - 1),
        ] {
            held.extend(send(&mut streams, them, protocol, &frame(claimed)).await);
        }
        std::future::pending::<()>().await;
        drop(held);
    };
    let mut attack = std::pin::pin!(attack);
    let closed = async {
        loop {
            tokio::select! {
                _ = &mut attack => {}
                event = swarm.select_next_some() => match event {
                    SwarmEvent::ConnectionClosed { num_established: 0, .. } => return true,
                    SwarmEvent::OutgoingConnectionError { .. } => return false,
                    _ => {}
                },
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), closed)
        .await
        .unwrap_or(false)
}

#[test]
fn a_thousand_strangers_with_oversized_frames_cost_the_coordinator_little() {
    let fleet = TestFleet::new(&[]);
    let pid = fleet.coordinator.pid();
    let (them, addr) = parse_peer_addr(&fleet.coordinator.addr).expect("its address");
    let refused_before = fleet.refused("not_member");
    let idle = rss(pid);

    // A thread samples the coordinator's memory all the while.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = std::thread::spawn({
        let done = done.clone();
        move || {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss(pid));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak.max(rss(pid))
        }
    });
    let started = Instant::now();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let closed = rt.block_on(async {
        futures::stream::iter(0..ATTEMPTS)
            .map(|_| stranger(them, addr.clone()))
            .buffer_unordered(AT_ONCE)
            .filter(|closed| std::future::ready(*closed))
            .count()
            .await
    });
    let took = started.elapsed();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().expect("sampler");
    let after = rss(pid);
    let refused = fleet.refused("not_member") - refused_before;
    eprintln!(
        "{ATTEMPTS} strangers in {:.1} s: {closed} closed by the coordinator, {refused} refused; \
         coordinator RSS idle {:.1} MiB, peak {:.1} MiB (+{:.1}), after {:.1} MiB",
        took.as_secs_f64(),
        idle as f64 / 1048576.0,
        peak as f64 / 1048576.0,
        (peak.saturating_sub(idle)) as f64 / 1048576.0,
        after as f64 / 1048576.0,
    );
    assert_eq!(
        closed, ATTEMPTS,
        "every stranger's connection is closed by the coordinator"
    );
    assert_eq!(
        refused as usize, ATTEMPTS,
        "every stranger is refused and counted"
    );
    assert!(
        peak <= idle + BUDGET,
        "coordinator RSS rose from {idle} to {peak} bytes: more than {BUDGET} over idle"
    );
    // And it still serves its operators.
    fleet.convoy(&["fleet"]).success();
}
