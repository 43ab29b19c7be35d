//! The libp2p network: one event loop owns the `Swarm`.
//!
//! [`start`] builds the swarm (TCP — its streams counted below noise, see
//! [`counted`] — and QUIC, noise, yamux, the four
//! protocols of [`protocol`](crate::protocol) on the stream behaviour of
//! [`streams`], a block list for banned peers) and spawns its loop. The rest of the process talks to it through
//! a cloneable [`NetHandle`] (bounded command channel, a oneshot per reply)
//! and receives [`NetEvent`]s on a bounded channel.
//!
//! Fleet membership: on every new connection each side sends a [`Hello`]
//! ([`HELLO_PROTOCOL`]) with a proof of the fleet key bound to both peer
//! ids ([`fleet_proof`]). A peer is *admitted* once it has proved itself
//! (in its Hello, or in the [`Welcome`] that answers ours): from then on
//! the streams it opens are read. Our requests to it wait until it has
//! also welcomed our Hello, so that it has admitted us before they reach
//! it. Before that, a peer can make the daemon read one Hello of at most
//! [`MAX_HELLO_FRAME`] bytes: the hello is the only protocol offered to
//! it, so any other stream it opens fails its negotiation unread; a
//! wrong, oversized or malformed proof, or none in time, closes the
//! connection.
//!
//! Control requests ([`NetHandle::control`]) go on a [`CONTROL_PROTOCOL`]
//! stream each: one request frame, one answer frame. A peer may have at
//! most [`MAX_CONTROL_IN_FLIGHT`] of them open to us; more are reset.
//!
//! Chunk requests ([`NetHandle::chunk`]) go on one [`CHUNK_PROTOCOL`]
//! stream per peer and direction, tagged with an id so that answers may
//! come back in any order: a task writes the requests and another reads
//! the answers; on the serving side a task reads requests and hands them
//! to the loop and another writes the answers. A stream per request, as
//! request–response opens, cost a negotiation, a timer thread's wake-ups and several small
//! writes per chunk. A malformed or oversized frame ends that stream
//! only; requests still waiting on it fail and the next opens another.
//!
//! Announcements ([`NetHandle::announce`]) do not go as requests: the loop
//! keeps one outbound [`HAVE_PROTOCOL`] stream per admitted peer, written
//! by a task of its own, and a task per inbound stream reads frames and
//! hands them back to the loop. An announcement is advisory: one
//! that cannot be queued or written is dropped, as an unanswered request
//! was before.
//!
//! What lives here, the plumbing both roles share: this loop and its
//! protocols ([`streams`], the security handshake), chunk bodies served
//! from and received into the store ([`serve`]), upload and download caps
//! ([`rate`]), and the operator's short-lived [`client`]. It may use
//! [`store`](crate::store), [`transfer`](crate::transfer)'s busy rule and
//! the crate's root; never a role ([`coordinator`](crate::coordinator),
//! [`target`](crate::target)).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::swarm::{dial_opts::DialOpts, NetworkBehaviour, SwarmEvent};
use libp2p::{
    allow_block_list, connection_limits, identity::Keypair, tcp, yamux, Multiaddr, PeerId,
    StreamProtocol, Swarm,
};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

pub mod client;
mod counted;
pub mod rate;
mod secure;
pub mod serve;
pub mod streams;
mod tls;

pub use counted::{WireBytes, WireCounters};
pub use secure::Security;
pub use streams::OpenError;
use streams::{Inbound, Opener};

use crate::protocol::{
    self as wire, fleet_proof, read_frame, write_frame, Announcement, ChunkRequest, ChunkResponse,
    ControlRequest, ControlResponse, Hello, Tagged, Welcome, MAX_CHUNK_FRAME, MAX_CONTROL_FRAME,
    MAX_HAVE_BATCH, MAX_HAVE_FRAME, MAX_HELLO_FRAME,
};

const HELLO_PROTOCOL: StreamProtocol = StreamProtocol::new(wire::HELLO_PROTOCOL);
const CHUNK_PROTOCOL: StreamProtocol = StreamProtocol::new(wire::CHUNK_PROTOCOL);
const CONTROL_PROTOCOL: StreamProtocol = StreamProtocol::new(wire::CONTROL_PROTOCOL);
const HAVE_PROTOCOL: StreamProtocol = StreamProtocol::new(wire::HAVE_PROTOCOL);

/// Our requests parked per peer until it has admitted us.
const MAX_PARKED_PER_PEER: usize = 256;
/// Control requests one peer may have open to us at once; past this its
/// control streams are reset unread.
pub const MAX_CONTROL_IN_FLIGHT: usize = 32;
/// Hello streams one peer may have open to us at once; more are reset.
const MAX_HELLOS_IN_FLIGHT: usize = 4;
/// How long a connected peer has to prove membership, by default.
pub const ADMISSION_TIMEOUT: Duration = Duration::from_secs(10);
/// Commands waiting for the loop.
const CHANNEL_CAPACITY: usize = 4096;
/// Requests from peers waiting for the daemon: one from every member of a
/// full fleet fits, since a staging order makes each target answer at
/// once (its have-set, then its report). At 4096, a 10,000-target staging
/// overflowed it and 1,440 reports were answered busy.
const EVENTS_CAPACITY: usize = 16_384;
const _: () = assert!(EVENTS_CAPACITY as u32 >= MAX_ESTABLISHED_INCOMING);
/// Peers whose addresses the loop remembers.
const MAX_ADDRESS_BOOK: usize = 8192;
/// Announcements queued for one peer's stream; more are dropped.
const ANNOUNCE_QUEUE: usize = 256;
/// Chunk requests waiting to be written on one peer's chunk stream, and
/// answers waiting to be written on one inbound chunk stream.
const CHUNK_QUEUE: usize = 256;
/// Answers one inbound chunk stream may owe at once: past this its reader
/// reads no more requests until answers have been written, so a peer that
/// asks and never reads stops only itself. Below [`CHUNK_QUEUE`], so an
/// answer always finds room in its stream's queue and answering never
/// waits on the peer.
const MAX_OWED_ANSWERS: usize = 64;
/// Incoming connections still in their handshake, at most: each costs a
/// noise handshake and its buffers before the peer is known.
const MAX_PENDING_INCOMING: u32 = 128;
/// Connections one peer may hold to us (TCP and QUIC, and a dial race;
/// each operator CLI session has an identity of its own).
const MAX_CONNECTIONS_PER_PEER: u32 = 4;
/// Incoming connections, at most: a coordinator's whole fleet and its
/// operators.
const MAX_ESTABLISHED_INCOMING: u32 = 12_000;
const _: () = assert!(MAX_OWED_ANSWERS <= CHUNK_QUEUE);
/// Chunk requests awaiting their answer on one chunk stream.
const MAX_IN_FLIGHT: usize = 512;

/// How the network is set up.
#[derive(Clone)]
pub struct NetConfig {
    /// This process's identity.
    pub keypair: Keypair,
    /// Addresses to listen on (`/ip4/.../tcp/N`, `/ip4/.../udp/N/quic-v1`).
    pub listen: Vec<Multiaddr>,
    /// The fleet key every member holds.
    pub fleet_key: [u8; 32],
    /// A request unanswered this long fails.
    pub request_timeout: Duration,
    /// A connected peer that has not proved membership this long is
    /// refused ([`ADMISSION_TIMEOUT`]).
    pub admission_timeout: Duration,
    /// The handshake this process offers first on the TCP connections it
    /// dials; it accepts either on those dialled to it.
    pub security: Security,
}

/// Why a dial failed, each cause once: per address tried, the innermost
/// error. libp2p's own text repeats each layer's cause inside the next
/// ("Multistream select failed: Multistream select failed: ... I/O
/// error: Connection reset by peer (os error 104): I/O error:
/// Connection reset by peer (os error 104): Connection reset by peer
/// (os error 104)").
fn dial_failure(error: &libp2p::swarm::DialError) -> String {
    use libp2p::swarm::DialError;
    fn innermost(mut e: &dyn std::error::Error) -> String {
        while let Some(next) = e.source() {
            e = next;
        }
        e.to_string()
    }
    match error {
        DialError::Transport(tried) if !tried.is_empty() => tried
            .iter()
            .map(|(addr, e)| format!("{addr}: {}", innermost(e)))
            .collect::<Vec<_>>()
            .join("; "),
        other => other.to_string(),
    }
}

/// Why a request to a peer failed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RequestError {
    /// The peer could not be reached or the connection closed.
    #[error("peer {0} unreachable: {1}")]
    Unreachable(PeerId, String),
    /// The peer did not prove fleet membership, or refused ours.
    #[error("peer {0} is not a member of this fleet (wrong or missing fleet key)")]
    NotAdmitted(PeerId),
    /// No answer in time.
    #[error("peer {0} did not answer in time")]
    Timeout(PeerId),
    /// The stream failed: a malformed or oversized message, or a reset.
    #[error("peer {0}: {1}")]
    Stream(PeerId, String),
    /// The network loop has stopped.
    #[error("the network has shut down")]
    Shutdown,
}

/// Something the network tells the daemon.
#[derive(Debug)]
pub enum NetEvent {
    /// A listen address is ready.
    Listening(Multiaddr),
    /// `peer` proved fleet membership; requests to and from it flow.
    Admitted(PeerId),
    /// The last connection to `peer` closed.
    Disconnected(PeerId),
    /// An admitted peer asks for or sends a chunk.
    Chunk {
        /// Who asks.
        peer: PeerId,
        /// What.
        request: ChunkRequest,
        /// Where the answer goes.
        reply: ChunkAnswer,
    },
    /// An admitted peer announces chunks it has newly stored.
    Have {
        /// Who.
        peer: PeerId,
        /// What.
        announcement: Announcement,
    },
    /// An admitted peer sends a control request.
    Control {
        /// Who asks.
        peer: PeerId,
        /// What.
        request: ControlRequest,
        /// Where the answer goes.
        reply: Reply<ControlResponse>,
    },
}

/// The way back for one inbound control request: the task that holds its
/// stream writes the answer. Dropping it without answering resets the
/// stream, which the requester sees as a failure.
#[derive(Debug)]
pub struct Reply<T> {
    answer: oneshot::Sender<T>,
}

impl<T> Reply<T> {
    /// Sends the answer.
    pub async fn send(self, response: T) {
        self.answer(response);
    }

    /// Sends the answer from synchronous code.
    pub fn answer(self, response: T) {
        let _ = self.answer.send(response);
    }
}

/// The way back for one chunk request: a frame tagged with the request's
/// id, queued for the writer of the chunk stream it came on. It holds one
/// of the stream's [`MAX_OWED_ANSWERS`] permits until the answer is
/// written, so the queue always has room: answering never waits on the
/// peer. Dropping it without answering answers busy.
#[derive(Debug)]
pub struct ChunkAnswer {
    id: u64,
    answers: Option<(mpsc::Sender<OwedAnswer>, OwnedSemaphorePermit)>,
}

/// An answer on its way out, with the permit its request took.
type OwedAnswer = (Tagged<ChunkResponse>, OwnedSemaphorePermit);

impl ChunkAnswer {
    /// Sends the answer. Never waits on the peer (see [`ChunkAnswer`]).
    pub async fn send(self, response: ChunkResponse) {
        self.send_now(response);
    }

    /// Sends the answer from synchronous code.
    fn send_now(mut self, response: ChunkResponse) {
        if let Some((answers, permit)) = self.answers.take() {
            // Full only if the writer is gone; then nobody reads it anyway.
            let _ = answers.try_send((Tagged::new(self.id, response), permit));
        }
    }
}

impl Drop for ChunkAnswer {
    fn drop(&mut self) {
        if let Some((answers, permit)) = self.answers.take() {
            let busy = Tagged::new(self.id, ChunkResponse::Busy { retry_ms: 0 });
            let _ = answers.try_send((busy, permit));
        }
    }
}

type ChunkReply = oneshot::Sender<Result<ChunkResponse, RequestError>>;
type ControlReply = oneshot::Sender<Result<ControlResponse, RequestError>>;

#[derive(Debug)]
enum Command {
    AddAddresses(PeerId, Vec<Multiaddr>),
    Chunk(PeerId, ChunkRequest, ChunkReply),
    Control(PeerId, ControlRequest, ControlReply),
    /// Ours, to a peer.
    Announce(PeerId, Announcement),
    /// A peer's, read from its stream.
    Announced(PeerId, Announcement),
    /// A peer's chunk request, read from its chunk stream.
    ChunkAsked(PeerId, ChunkRequest, ChunkAnswer),
    /// A peer's control request, read from its control stream.
    ControlAsked(PeerId, ControlRequest, Reply<ControlResponse>),
    /// A peer's Hello, read (or not) from the stream it opened; the
    /// Welcome goes back on that stream.
    HelloRead(PeerId, std::io::Result<Hello>, libp2p::Stream),
    /// The peer's answer to our Hello.
    Welcomed(PeerId, std::io::Result<Welcome>),
    Ban(PeerId),
    Shutdown,
}

/// A cloneable handle to the network loop.
#[derive(Clone, Debug)]
pub struct NetHandle {
    commands: mpsc::Sender<Command>,
    peer_id: PeerId,
    request_timeout: Duration,
    refused: Arc<AtomicU64>,
    wire: Arc<WireCounters>,
}

impl NetHandle {
    /// Bytes its TCP connections have carried each way since it started:
    /// chunk bodies, control, announcements, framing and all.
    pub fn wire_bytes(&self) -> WireBytes {
        self.wire.get()
    }

    /// The counters behind [`NetHandle::wire_bytes`], to read elsewhere.
    pub fn wire_counters(&self) -> Arc<WireCounters> {
        self.wire.clone()
    }

    /// Peers refused so far: wrong, malformed or missing fleet key proof,
    /// or none in time.
    pub fn peers_refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// This process's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Where `peer` may be dialled; requests to it dial when needed.
    pub async fn add_addresses(&self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let _ = self.commands.send(Command::AddAddresses(peer, addrs)).await;
    }

    /// As [`NetHandle::add_addresses`], without waiting: the addresses are
    /// queued before any request sent after this call.
    pub fn learn_addresses(&self, peer: PeerId, addrs: Vec<Multiaddr>) {
        if self
            .commands
            .try_send(Command::AddAddresses(peer, addrs))
            .is_err()
        {
            warn!(%peer, "network command queue full: peer addresses dropped");
        }
    }

    /// Sends a chunk request and waits for the answer, at most the
    /// configured request timeout.
    pub async fn chunk(
        &self,
        peer: PeerId,
        request: ChunkRequest,
    ) -> Result<ChunkResponse, RequestError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Chunk(peer, request, tx))
            .await
            .map_err(|_| RequestError::Shutdown)?;
        match tokio::time::timeout(self.request_timeout, rx).await {
            Ok(answer) => answer.map_err(|_| RequestError::Shutdown)?,
            Err(_) => Err(RequestError::Timeout(peer)),
        }
    }

    /// Sends a control request and waits for the answer.
    pub async fn control(
        &self,
        peer: PeerId,
        request: ControlRequest,
    ) -> Result<ControlResponse, RequestError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Control(peer, request, tx))
            .await
            .map_err(|_| RequestError::Shutdown)?;
        rx.await.map_err(|_| RequestError::Shutdown)?
    }

    /// Tells `peer` which chunks this process has newly stored, on the
    /// stream kept open to it, without waiting. Dropped (with a log line)
    /// when the network is not keeping up: announcements are advisory.
    pub fn announce(&self, peer: PeerId, announcement: Announcement) {
        if self
            .commands
            .try_send(Command::Announce(peer, announcement))
            .is_err()
        {
            debug!(%peer, "network command queue full: announcement dropped");
        }
    }

    /// Disconnects `peer` and refuses it from now on.
    pub async fn ban(&self, peer: PeerId) {
        let _ = self.commands.send(Command::Ban(peer)).await;
    }

    /// Stops the loop, closing every connection.
    pub async fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown).await;
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    /// Bounds connections before anything else sees them.
    limits: connection_limits::Behaviour,
    blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    /// Hello, control, chunk and announcement streams.
    streams: streams::Behaviour,
}

/// Why the network could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// A transport could not be set up.
    #[error("cannot set up the {0} transport: {1}")]
    Transport(&'static str, String),
    /// An address could not be listened on.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
}

/// Raises this process's soft limit of open files to its hard limit, as
/// servers of many connections do: a coordinator holds a socket per
/// target, and the usual soft limit (1024) would cap a fleet far below
/// [`MAX_ESTABLISHED_INCOMING`]. Returns the limit now in force.
pub fn raise_open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit with a valid resource and a pointer
    // to a live rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

/// Starts the network loop on the current tokio runtime.
pub fn start(config: NetConfig) -> Result<(NetHandle, mpsc::Receiver<NetEvent>), NetError> {
    let wire = Arc::new(WireCounters::default());
    let counters = wire.clone();
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(config.keypair.clone())
        .with_tokio()
        .with_quic()
        // TCP as `with_tcp` builds it, its streams counted below the
        // security handshake, which offers both, the configured one first.
        .with_other_transport(|key| {
            use libp2p::Transport as _;
            let handshakes = secure::Handshakes::new(key, config.security)?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                    .map(move |s, _| counted::Counted::new(s, counters.clone()))
                    .upgrade(libp2p::core::upgrade::Version::V1Lazy)
                    .authenticate(handshakes)
                    .multiplex(yamux::Config::default()),
            )
        })
        .map_err(|e| NetError::Transport("tcp", e.to_string()))?
        .with_behaviour(|_| Behaviour {
            limits: connection_limits::Behaviour::new(
                connection_limits::ConnectionLimits::default()
                    .with_max_pending_incoming(Some(MAX_PENDING_INCOMING))
                    .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER))
                    .with_max_established_incoming(Some(MAX_ESTABLISHED_INCOMING)),
            ),
            blocked: Default::default(),
            streams: streams::Behaviour::new(
                vec![HELLO_PROTOCOL],
                vec![CONTROL_PROTOCOL, CHUNK_PROTOCOL, HAVE_PROTOCOL],
            ),
        })
        .map_err(|e| NetError::Transport("behaviour", e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build();
    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
    }
    let streams = swarm.behaviour().streams.opener();
    let (cmd_tx, cmd_rx) = mpsc::channel(CHANNEL_CAPACITY);
    let (ev_tx, ev_rx) = mpsc::channel(EVENTS_CAPACITY);
    let peer_id = *swarm.local_peer_id();
    let refused = Arc::new(AtomicU64::new(0));
    let event_loop = EventLoop {
        refused: refused.clone(),
        swarm,
        fleet_key: config.fleet_key,
        commands: cmd_rx,
        commands_tx: cmd_tx.clone(),
        events: ev_tx,
        peers: HashMap::new(),
        addresses: HashMap::new(),
        streams,
        request_timeout: config.request_timeout,
        admission_timeout: config.admission_timeout,
        announcers: HashMap::new(),
        links: HashMap::new(),
    };
    tokio::spawn(event_loop.run());
    Ok((
        NetHandle {
            commands: cmd_tx,
            peer_id,
            request_timeout: config.request_timeout,
            refused,
            wire,
        },
        ev_rx,
    ))
}

/// Our request to a peer that has not admitted us yet.
enum Parked {
    Chunk(ChunkRequest, ChunkReply),
    Control(ControlRequest, ControlReply),
    Have(Announcement),
}

struct PeerState {
    connections: usize,
    /// It proved the fleet key: the streams it opens are read.
    admitted: bool,
    /// It welcomed our Hello, so it has admitted us: our requests go.
    /// Implies `admitted` (the welcome carries its proof).
    welcomed: bool,
    /// When it connected (or we started dialling) without both yet.
    since: Option<Instant>,
    parked: VecDeque<Parked>,
    dialing: bool,
    /// Its control requests being read or answered.
    control_slots: Arc<Semaphore>,
    /// Its Hello streams being read.
    hellos_in_flight: usize,
}

impl Default for PeerState {
    fn default() -> Self {
        Self {
            connections: 0,
            admitted: false,
            welcomed: false,
            since: None,
            parked: VecDeque::new(),
            dialing: false,
            control_slots: Arc::new(Semaphore::new(MAX_CONTROL_IN_FLIGHT)),
            hellos_in_flight: 0,
        }
    }
}

struct EventLoop {
    /// Shared with [`NetHandle::peers_refused`].
    refused: Arc<AtomicU64>,
    swarm: Swarm<Behaviour>,
    fleet_key: [u8; 32],
    commands: mpsc::Receiver<Command>,
    commands_tx: mpsc::Sender<Command>,
    events: mpsc::Sender<NetEvent>,
    peers: HashMap<PeerId, PeerState>,
    addresses: HashMap<PeerId, Vec<Multiaddr>>,
    /// Opens streams.
    streams: Opener,
    /// The queue of each peer's announcement stream writer.
    announcers: HashMap<PeerId, mpsc::Sender<Announcement>>,
    /// Our control requests unanswered this long fail.
    request_timeout: Duration,
    /// See [`NetConfig::admission_timeout`].
    admission_timeout: Duration,
    /// The queue of each peer's chunk stream writer.
    links: HashMap<PeerId, mpsc::Sender<(ChunkRequest, ChunkReply)>>,
}

impl EventLoop {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(Command::Shutdown) | None => break,
                    Some(c) => self.on_command(c),
                },
                _ = tick.tick() => self.expire_admissions(),
            }
        }
        debug!("network loop stopped");
    }

    fn local(&self) -> PeerId {
        *self.swarm.local_peer_id()
    }

    fn proof_from(&self, sender: &PeerId, receiver: &PeerId) -> [u8; 32] {
        fleet_proof(&self.fleet_key, &sender.to_bytes(), &receiver.to_bytes())
    }

    fn emit(&self, event: NetEvent) {
        use mpsc::error::TrySendError;
        match self.events.try_send(event) {
            Ok(()) => {}
            Err(TrySendError::Full(event)) => {
                warn!("daemon is not keeping up with the network; answering busy, dropping announcements");
                self.refuse(event, false);
            }
            Err(TrySendError::Closed(_)) => {}
        }
    }

    /// Answers an inbound request the daemon will not see.
    fn refuse(&self, event: NetEvent, denied: bool) {
        match event {
            NetEvent::Chunk { reply, .. } => reply.send_now(if denied {
                ChunkResponse::Denied
            } else {
                ChunkResponse::Busy { retry_ms: 0 }
            }),
            NetEvent::Control { reply, .. } => reply.answer(if denied {
                ControlResponse::Denied
            } else {
                ControlResponse::Error("busy; try again".into())
            }),
            _ => {}
        }
    }

    /// Takes a stream a peer opened.
    fn on_inbound(
        &mut self,
        Inbound {
            peer,
            protocol,
            stream,
        }: Inbound,
    ) {
        if protocol == HELLO_PROTOCOL {
            self.read_hello(peer, stream);
        } else if protocol == CONTROL_PROTOCOL {
            self.serve_control(peer, stream);
        } else if protocol == CHUNK_PROTOCOL {
            if self.reads_from(peer, "chunk") {
                serve_chunk_stream(peer, stream, self.commands_tx.clone());
            }
        } else if protocol == HAVE_PROTOCOL && self.reads_from(peer, "announcement") {
            tokio::spawn(read_announcements(peer, stream, self.commands_tx.clone()));
        }
    }

    /// Whether the streams `peer` opens are read; when not, the caller
    /// drops (resets) the stream unread.
    fn reads_from(&self, peer: PeerId, what: &str) -> bool {
        let admitted = self.peers.get(&peer).is_some_and(|s| s.admitted);
        if !admitted {
            debug!(%peer, "{what} stream before proof of fleet membership: reset unread");
        }
        admitted
    }

    /// Reads one control request from a stream `peer` opened, hands it to
    /// the daemon and writes the answer, in a task of its own.
    fn serve_control(&mut self, peer: PeerId, stream: libp2p::Stream) {
        if !self.reads_from(peer, "control") {
            return;
        }
        let slots = &self
            .peers
            .get(&peer)
            .expect("admitted peers are known")
            .control_slots;
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "more than {MAX_CONTROL_IN_FLIGHT} control requests at once: one reset unread");
            return;
        };
        let commands = self.commands_tx.clone();
        let timeout = self.request_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            answer_control(peer, stream, commands, timeout).await;
        });
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::AddAddresses(peer, addrs) => {
                if self.addresses.len() >= MAX_ADDRESS_BOOK && !self.addresses.contains_key(&peer) {
                    warn!(%peer, "address book full: not remembering this peer's addresses");
                    return;
                }
                let known = self.addresses.entry(peer).or_default();
                for a in addrs {
                    if !known.contains(&a) {
                        known.push(a);
                    }
                }
                known.truncate(16);
            }
            Command::Chunk(peer, req, reply) => self.outbound(peer, Parked::Chunk(req, reply)),
            Command::Control(peer, req, reply) => self.outbound(peer, Parked::Control(req, reply)),
            Command::Announce(peer, a) => self.outbound(peer, Parked::Have(a)),
            Command::Announced(peer, announcement) => {
                if self.peers.get(&peer).is_some_and(|s| s.admitted) {
                    self.emit(NetEvent::Have { peer, announcement });
                }
            }
            Command::ChunkAsked(peer, request, reply) => {
                let event = NetEvent::Chunk {
                    peer,
                    request,
                    reply,
                };
                if self.peers.get(&peer).is_some_and(|s| s.admitted) {
                    self.emit(event);
                } else {
                    self.refuse(event, true);
                }
            }
            Command::ControlAsked(peer, request, reply) => {
                let event = NetEvent::Control {
                    peer,
                    request,
                    reply,
                };
                if self.peers.get(&peer).is_some_and(|s| s.admitted) {
                    self.emit(event);
                } else {
                    self.refuse(event, true);
                }
            }
            Command::HelloRead(peer, hello, stream) => self.on_hello(peer, hello, stream),
            Command::Welcomed(peer, welcome) => self.on_welcome(peer, welcome),
            Command::Ban(peer) => {
                warn!(%peer, "banning peer");
                self.swarm.behaviour_mut().blocked.block_peer(peer);
                self.announcers.remove(&peer);
                self.links.remove(&peer);
                self.fail_parked(peer, |p| RequestError::Unreachable(p, "banned".into()));
            }
            Command::Shutdown => unreachable!("handled by the loop"),
        }
    }

    fn outbound(&mut self, peer: PeerId, request: Parked) {
        if peer == self.local() {
            fail(
                request,
                RequestError::Unreachable(peer, "that is this process".into()),
            );
            return;
        }
        let state = self.peers.entry(peer).or_default();
        if state.welcomed {
            self.send_now(peer, request);
            return;
        }
        if state.parked.len() >= MAX_PARKED_PER_PEER {
            fail(
                request,
                RequestError::Unreachable(peer, "too many requests waiting".into()),
            );
            return;
        }
        state.parked.push_back(request);
        state.since.get_or_insert_with(Instant::now);
        if state.connections == 0 && !state.dialing {
            state.dialing = true;
            let addrs = self.addresses.get(&peer).cloned().unwrap_or_default();
            let opts = DialOpts::peer_id(peer).addresses(addrs).build();
            if let Err(e) = self.swarm.dial(opts) {
                let reason = dial_failure(&e);
                self.fail_parked(peer, |p| RequestError::Unreachable(p, reason.clone()));
            }
        }
    }

    fn send_now(&mut self, peer: PeerId, request: Parked) {
        match request {
            Parked::Chunk(req, reply) => self.send_chunk_request(peer, req, reply),
            Parked::Control(req, reply) => {
                let streams = self.streams.clone();
                let timeout = self.request_timeout;
                tokio::spawn(async move {
                    let answer = tokio::time::timeout(timeout, ask(streams, peer, req)).await;
                    let _ = reply.send(answer.unwrap_or(Err(RequestError::Timeout(peer))));
                });
            }
            Parked::Have(announcement) => self.announce(peer, announcement),
        }
    }

    /// Queues a chunk request on `peer`'s chunk stream, opening one when
    /// there is none (or the last one failed).
    fn send_chunk_request(&mut self, peer: PeerId, request: ChunkRequest, reply: ChunkReply) {
        use mpsc::error::TrySendError;
        let queue = match self.links.get(&peer) {
            Some(q) if !q.is_closed() => q,
            _ => {
                let (tx, rx) = mpsc::channel(CHUNK_QUEUE);
                tokio::spawn(run_chunk_link(self.streams.clone(), peer, rx));
                self.links.entry(peer).insert_entry(tx).into_mut()
            }
        };
        match queue.try_send((request, reply)) {
            Ok(()) => {}
            Err(TrySendError::Full((_, reply))) => {
                let why = "too many chunk requests waiting to be sent".into();
                let _ = reply.send(Err(RequestError::Unreachable(peer, why)));
            }
            Err(TrySendError::Closed((_, reply))) => {
                let why = "chunk stream closed".into();
                let _ = reply.send(Err(RequestError::Stream(peer, why)));
            }
        }
    }

    /// Queues an announcement on `peer`'s stream, starting its writer
    /// when there is none (or the last one stopped).
    fn announce(&mut self, peer: PeerId, announcement: Announcement) {
        use mpsc::error::TrySendError;
        let queue = match self.announcers.get(&peer) {
            Some(q) if !q.is_closed() => q,
            _ => {
                let (tx, rx) = mpsc::channel(ANNOUNCE_QUEUE);
                tokio::spawn(write_announcements(self.streams.clone(), peer, rx));
                self.announcers.entry(peer).insert_entry(tx).into_mut()
            }
        };
        match queue.try_send(announcement) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                debug!(%peer, "peer is not reading its announcements: one dropped");
            }
            Err(TrySendError::Closed(_)) => {
                debug!(%peer, "announcement stream closed: one dropped");
            }
        }
    }

    /// Fails everything waiting on `peer`.
    fn fail_parked(&mut self, peer: PeerId, why: impl Fn(PeerId) -> RequestError) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        state.dialing = false;
        state.since = None;
        for p in state.parked.drain(..) {
            fail(p, why(peer));
        }
    }

    /// `peer` proved the fleet key: its streams are read from now on.
    fn admit(&mut self, peer: PeerId) {
        let state = self.peers.entry(peer).or_default();
        if state.admitted {
            return;
        }
        state.admitted = true;
        self.swarm.behaviour_mut().streams.admit(peer);
        debug!(%peer, "peer admitted");
        self.emit(NetEvent::Admitted(peer));
    }

    /// `peer` welcomed our Hello, proving itself in the welcome: both sides
    /// have admitted each other, and what waits for it is sent.
    fn welcomed(&mut self, peer: PeerId) {
        self.admit(peer);
        let state = self.peers.entry(peer).or_default();
        state.welcomed = true;
        state.since = None;
        let parked: Vec<_> = state.parked.drain(..).collect();
        for p in parked {
            self.send_now(peer, p);
        }
    }

    fn reject(&mut self, peer: PeerId, why: &str) {
        warn!(%peer, "refusing peer: {why}");
        self.refused.fetch_add(1, Ordering::Relaxed);
        self.fail_parked(peer, RequestError::NotAdmitted);
        let _ = self.swarm.disconnect_peer_id(peer);
    }

    fn expire_admissions(&mut self) {
        let now = Instant::now();
        let late: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, s)| !s.welcomed)
            .filter(|(_, s)| s.since.is_some_and(|t| now - t > self.admission_timeout))
            .map(|(p, _)| *p)
            .collect();
        for peer in late {
            self.reject(peer, "no proof of fleet membership in time");
        }
        self.peers
            .retain(|_, s| s.connections > 0 || !s.parked.is_empty() || s.dialing);
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, "listening");
                self.emit(NetEvent::Listening(address));
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                num_established,
                endpoint,
                ..
            } => {
                if let Some(known) = self.addresses.get_mut(&peer_id) {
                    let addr = endpoint.get_remote_address().clone();
                    if endpoint.is_dialer() && !known.contains(&addr) {
                        known.push(addr);
                    }
                }
                let state = self.peers.entry(peer_id).or_default();
                state.connections = num_established.get() as usize;
                state.dialing = false;
                if num_established.get() == 1 {
                    state.since.get_or_insert_with(Instant::now);
                    let hello = Hello {
                        proof: self.proof_from(&self.local(), &peer_id),
                    };
                    let streams = self.streams.clone();
                    let commands = self.commands_tx.clone();
                    let timeout = self.admission_timeout;
                    tokio::spawn(async move {
                        let welcome = say_hello(streams, peer_id, hello, timeout).await;
                        let _ = commands.send(Command::Welcomed(peer_id, welcome)).await;
                    });
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                ..
            } if num_established > 0 => {
                if let Some(state) = self.peers.get_mut(&peer_id) {
                    state.connections = num_established as usize;
                }
            }
            SwarmEvent::ConnectionClosed { peer_id, .. } => {
                self.announcers.remove(&peer_id);
                self.links.remove(&peer_id);
                if let Some(state) = self.peers.get_mut(&peer_id) {
                    state.connections = 0;
                    state.welcomed = false;
                    let was_admitted = std::mem::take(&mut state.admitted);
                    self.swarm.behaviour_mut().streams.forget(peer_id);
                    // A member proves itself as soon as it connects: a
                    // connection that closes first is a refusal.
                    self.fail_parked(peer_id, |p| {
                        if was_admitted {
                            RequestError::Unreachable(p, "connection closed".into())
                        } else {
                            RequestError::NotAdmitted(p)
                        }
                    });
                    if was_admitted {
                        self.emit(NetEvent::Disconnected(peer_id));
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Streams(inbound)) => self.on_inbound(inbound),
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                ..
            } => {
                let connected = self.peers.get(&peer).is_some_and(|s| s.connections > 0);
                if !connected {
                    let reason = dial_failure(&error);
                    debug!(%peer, "dial failed: {reason}");
                    self.fail_parked(peer, |p| RequestError::Unreachable(p, reason.clone()));
                }
            }
            _ => {}
        }
    }

    /// Reads the Hello of a stream `peer` opened, in a task of its own.
    fn read_hello(&mut self, peer: PeerId, mut stream: libp2p::Stream) {
        let state = self.peers.entry(peer).or_default();
        if state.hellos_in_flight >= MAX_HELLOS_IN_FLIGHT {
            debug!(%peer, "more than {MAX_HELLOS_IN_FLIGHT} hellos at once: one reset unread");
            return;
        }
        state.hellos_in_flight += 1;
        let commands = self.commands_tx.clone();
        let timeout = self.admission_timeout;
        tokio::spawn(async move {
            let hello = tokio::time::timeout(
                timeout,
                read_frame::<Hello, _, MAX_HELLO_FRAME>(&mut stream),
            )
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
            let _ = commands.send(Command::HelloRead(peer, hello, stream)).await;
        });
    }

    /// Answers a Hello that was read: welcome and admit, or deny and refuse.
    fn on_hello(&mut self, peer: PeerId, hello: std::io::Result<Hello>, stream: libp2p::Stream) {
        if let Some(state) = self.peers.get_mut(&peer) {
            state.hellos_in_flight = state.hellos_in_flight.saturating_sub(1);
        }
        let welcome = match hello {
            Ok(Hello { proof }) if proof == self.proof_from(&peer, &self.local()) => {
                // Admitted before it is welcomed: what it sends once
                // welcomed finds it admitted.
                self.admit(peer);
                Welcome::Member {
                    proof: self.proof_from(&self.local(), &peer),
                }
            }
            Ok(_) => {
                self.reject(peer, "wrong fleet key");
                Welcome::Denied
            }
            Err(e) => {
                // Oversized, malformed or late: no member sends that.
                self.reject(peer, &format!("no hello read: {e}"));
                return;
            }
        };
        tokio::spawn(async move {
            let mut stream = stream;
            if write_frame::<_, _, MAX_HELLO_FRAME>(&mut stream, &welcome)
                .await
                .is_ok()
            {
                let _ = futures::AsyncWriteExt::close(&mut stream).await;
            }
        });
    }

    /// Takes `peer`'s answer to our Hello.
    fn on_welcome(&mut self, peer: PeerId, welcome: std::io::Result<Welcome>) {
        match welcome {
            Ok(Welcome::Member { proof }) if proof == self.proof_from(&peer, &self.local()) => {
                self.welcomed(peer)
            }
            Ok(_) => self.reject(peer, "it refused our fleet key or proved none"),
            // The connection closed, or the stream failed: the admission
            // timer decides.
            Err(e) => debug!(%peer, "hello failed: {e}"),
        }
    }
}

fn fail(request: Parked, error: RequestError) {
    match request {
        Parked::Chunk(_, reply) => {
            let _ = reply.send(Err(error));
        }
        Parked::Control(_, reply) => {
            let _ = reply.send(Err(error));
        }
        Parked::Have(..) => {}
    }
}

/// Sends one control request on a stream of its own and reads the answer.
async fn ask(
    streams: Opener,
    peer: PeerId,
    request: ControlRequest,
) -> Result<ControlResponse, RequestError> {
    let mut stream = match streams.open(peer, CONTROL_PROTOCOL).await {
        Ok(s) => s,
        Err(OpenError::Unsupported(_)) => {
            let why = "does not speak the Convoy protocol".into();
            return Err(RequestError::Stream(peer, why));
        }
        Err(e) => return Err(RequestError::Unreachable(peer, e.to_string())),
    };
    let stream_error = |e: std::io::Error| RequestError::Stream(peer, e.to_string());
    write_frame::<_, _, MAX_CONTROL_FRAME>(&mut stream, &request)
        .await
        .map_err(stream_error)?;
    futures::AsyncWriteExt::close(&mut stream)
        .await
        .map_err(stream_error)?;
    read_frame::<ControlResponse, _, MAX_CONTROL_FRAME>(&mut stream)
        .await
        .map_err(stream_error)
}

/// Reads the one control request of a stream `peer` opened, hands it to
/// the loop and writes the answer. A malformed or oversized frame, or a
/// request not read or answered in `timeout`, resets the stream.
async fn answer_control(
    peer: PeerId,
    mut stream: libp2p::Stream,
    commands: mpsc::Sender<Command>,
    timeout: Duration,
) {
    let request = tokio::time::timeout(
        timeout,
        read_frame::<ControlRequest, _, MAX_CONTROL_FRAME>(&mut stream),
    )
    .await;
    let request = match request {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            debug!(%peer, "control stream failed: {e}");
            return;
        }
        Err(_) => {
            debug!(%peer, "control request not sent in time");
            return;
        }
    };
    let (answer, answered) = oneshot::channel();
    let asked = Command::ControlAsked(peer, request, Reply { answer });
    if commands.send(asked).await.is_err() {
        return;
    }
    let Ok(Ok(response)) = tokio::time::timeout(timeout, answered).await else {
        return;
    };
    let written = write_frame::<_, _, MAX_CONTROL_FRAME>(&mut stream, &response).await;
    if let Err(e) = written {
        debug!(%peer, "control answer not written: {e}");
        return;
    }
    let _ = futures::AsyncWriteExt::close(&mut stream).await;
}

/// Sends our Hello on a stream of its own and reads the Welcome.
async fn say_hello(
    streams: Opener,
    peer: PeerId,
    hello: Hello,
    timeout: Duration,
) -> std::io::Result<Welcome> {
    let exchange = async {
        let mut stream = streams
            .open(peer, HELLO_PROTOCOL)
            .await
            .map_err(std::io::Error::other)?;
        write_frame::<_, _, MAX_HELLO_FRAME>(&mut stream, &hello).await?;
        futures::AsyncWriteExt::close(&mut stream).await?;
        read_frame::<Welcome, _, MAX_HELLO_FRAME>(&mut stream).await
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// Writes `peer`'s announcements on one stream until the queue closes or
/// the stream fails (the next announcement then starts another writer).
async fn write_announcements(
    streams: Opener,
    peer: PeerId,
    mut queue: mpsc::Receiver<Announcement>,
) {
    let mut stream = match streams.open(peer, HAVE_PROTOCOL).await {
        Ok(s) => s,
        Err(e) => {
            debug!(%peer, "cannot open an announcement stream: {e}");
            return;
        }
    };
    while let Some(a) = queue.recv().await {
        if let Err(e) = write_frame::<_, _, MAX_HAVE_FRAME>(&mut stream, &a).await {
            debug!(%peer, "announcement stream failed: {e}");
            return;
        }
    }
    let _ = futures::AsyncWriteExt::close(&mut stream).await;
}

/// Reads `peer`'s announcements from one stream and hands them to the
/// loop. A malformed or oversized frame ends (resets) this stream only.
async fn read_announcements(
    peer: PeerId,
    mut stream: libp2p::Stream,
    commands: mpsc::Sender<Command>,
) {
    loop {
        let a: Announcement = match read_frame::<_, _, MAX_HAVE_FRAME>(&mut stream).await {
            Ok(a) => a,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return,
            Err(e) => {
                debug!(%peer, "announcement stream failed: {e}");
                return;
            }
        };
        if a.chunks.len() > MAX_HAVE_BATCH {
            debug!(%peer, "announcement of {} chunks refused", a.chunks.len());
            return;
        }
        if commands.send(Command::Announced(peer, a)).await.is_err() {
            return;
        }
    }
}

/// Requests sent on one chunk stream that await their answer, by id.
#[derive(Default)]
struct InFlight {
    waiting: HashMap<u64, ChunkReply>,
    /// Set when the stream failed: nothing more is sent on it.
    failed: Option<String>,
}

impl InFlight {
    /// Fails everything waiting, and whatever is sent later, with `why`.
    fn fail(&mut self, peer: PeerId, why: String) {
        for (_, reply) in self.waiting.drain() {
            let _ = reply.send(Err(RequestError::Stream(peer, why.clone())));
        }
        self.failed.get_or_insert(why);
    }
}

/// Sends `peer` the chunk requests queued for it on one stream and hands
/// each answer to its requester, until the queue closes (the connection
/// closed) or the stream fails (the next request then opens another).
async fn run_chunk_link(
    streams: Opener,
    peer: PeerId,
    mut queue: mpsc::Receiver<(ChunkRequest, ChunkReply)>,
) {
    use futures::AsyncReadExt;
    let stream = match streams.open(peer, CHUNK_PROTOCOL).await {
        Ok(s) => s,
        Err(e) => {
            let why = format!("cannot open a chunk stream: {e}");
            queue.close();
            while let Ok((_, reply)) = queue.try_recv() {
                let _ = reply.send(Err(RequestError::Unreachable(peer, why.clone())));
            }
            return;
        }
    };
    let (mut reader, mut writer) = stream.split();
    let in_flight = Arc::new(Mutex::new(InFlight::default()));
    let answers = in_flight.clone();
    let read = tokio::spawn(async move {
        loop {
            let answer = read_frame::<Tagged<ChunkResponse>, _, MAX_CHUNK_FRAME>(&mut reader).await;
            let mut in_flight = answers.lock().expect("in-flight lock");
            match answer {
                Ok(Tagged { id, body }) => {
                    if let Some(reply) = in_flight.waiting.remove(&id) {
                        let _ = reply.send(Ok(body));
                    }
                }
                Err(e) => {
                    debug!(%peer, "chunk stream ended: {e}");
                    in_flight.fail(peer, format!("chunk stream failed: {e}"));
                    return;
                }
            }
        }
    });
    let mut read = std::pin::pin!(read);
    let mut reading = true;
    let mut next_id = 0u64;
    loop {
        let (request, reply) = tokio::select! {
            next = queue.recv() => match next {
                Some(next) => next,
                None => break,
            },
            // The stream failed: what is queued fails below.
            _ = &mut read, if reading => {
                reading = false;
                break;
            }
        };
        if reply.is_closed() {
            continue; // The requester gave up waiting.
        }
        let id = next_id;
        next_id += 1;
        {
            let mut in_flight = in_flight.lock().expect("in-flight lock");
            if let Some(why) = &in_flight.failed {
                // The reader failed while this request was being taken.
                let _ = reply.send(Err(RequestError::Stream(peer, why.clone())));
                break;
            }
            if in_flight.waiting.len() >= MAX_IN_FLIGHT {
                in_flight.waiting.retain(|_, r| !r.is_closed());
            }
            if in_flight.waiting.len() >= MAX_IN_FLIGHT {
                let why = "too many chunk requests in flight".into();
                let _ = reply.send(Err(RequestError::Unreachable(peer, why)));
                continue;
            }
            in_flight.waiting.insert(id, reply);
        }
        let frame = Tagged::new(id, request);
        let written = match write_frame::<_, _, MAX_CHUNK_FRAME>(&mut writer, &frame).await {
            Ok(()) if queue.is_empty() => futures::AsyncWriteExt::flush(&mut writer).await,
            other => other,
        };
        if let Err(e) = written {
            debug!(%peer, "chunk stream failed: {e}");
            let why = format!("chunk stream failed: {e}");
            in_flight.lock().expect("in-flight lock").fail(peer, why);
            break;
        }
    }
    queue.close();
    let why = in_flight.lock().expect("in-flight lock").failed.clone();
    if let Some(why) = why {
        while let Ok((_, reply)) = queue.try_recv() {
            let _ = reply.send(Err(RequestError::Stream(peer, why.clone())));
        }
        if reading {
            read.abort();
        }
        return;
    }
    // Closing our half ends the peer's reader; it closes its half once
    // its answers are written, which ends our reader.
    let _ = futures::AsyncWriteExt::close(&mut writer).await;
}

/// Serves one chunk stream a peer opened: a task reads its requests and
/// hands them to the loop, another writes the answers in the order they
/// are ready. A malformed or oversized frame ends the reading; answers
/// already owed are still written, then the stream closes.
fn serve_chunk_stream(peer: PeerId, stream: libp2p::Stream, commands: mpsc::Sender<Command>) {
    use futures::AsyncReadExt;
    let (mut reader, mut writer) = stream.split();
    let (answers, mut queue) = mpsc::channel::<OwedAnswer>(CHUNK_QUEUE);
    let owed = Arc::new(Semaphore::new(MAX_OWED_ANSWERS));
    tokio::spawn(async move {
        loop {
            // A peer that does not read its answers is not read either.
            let Ok(permit) = owed.clone().acquire_owned().await else {
                return;
            };
            let request = read_frame::<Tagged<ChunkRequest>, _, MAX_CHUNK_FRAME>(&mut reader).await;
            let Tagged { id, body } = match request {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return,
                Err(e) => {
                    debug!(%peer, "chunk stream failed: {e}");
                    return;
                }
            };
            let reply = ChunkAnswer {
                id,
                answers: Some((answers.clone(), permit)),
            };
            if commands
                .send(Command::ChunkAsked(peer, body, reply))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    tokio::spawn(async move {
        while let Some((answer, _permit)) = queue.recv().await {
            let written = write_frame::<_, _, MAX_CHUNK_FRAME>(&mut writer, &answer).await;
            let written = match written {
                Ok(()) if queue.is_empty() => futures::AsyncWriteExt::flush(&mut writer).await,
                other => other,
            };
            if let Err(e) = written {
                debug!(%peer, "chunk stream failed: {e}");
                return;
            }
        }
        let _ = futures::AsyncWriteExt::close(&mut writer).await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{encode_frame, WireChunk};
    use futures::{AsyncReadExt, AsyncWriteExt};
    use libp2p::noise;

    fn framed<T: serde::Serialize>(v: &T) -> Vec<u8> {
        encode_frame::<_, MAX_CONTROL_FRAME>(v).unwrap()
    }

    /// A peer that writes whatever bytes it is given, and answers the
    /// server's Hellos with the bytes it was told to.
    struct RawPeer {
        swarm: Swarm<libp2p_stream::Behaviour>,
        streams: libp2p_stream::Control,
        hellos: libp2p_stream::IncomingStreams,
    }

    impl RawPeer {
        /// A new identity, connected to `addr`, that has sent nothing yet.
        async fn connect(addr: Multiaddr) -> Self {
            let mut swarm = libp2p::SwarmBuilder::with_new_identity()
                .with_tokio()
                .with_tcp(
                    tcp::Config::default(),
                    noise::Config::new,
                    yamux::Config::default,
                )
                .unwrap()
                .with_behaviour(|_| libp2p_stream::Behaviour::new())
                .unwrap()
                // Connections stay open unused: only the server closes them.
                .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
                .build();
            let mut streams = swarm.behaviour().new_control();
            let hellos = streams.accept(HELLO_PROTOCOL).unwrap();
            swarm.dial(addr).unwrap();
            loop {
                if let SwarmEvent::ConnectionEstablished { .. } = swarm.select_next_some().await {
                    return Self {
                        swarm,
                        streams,
                        hellos,
                    };
                }
            }
        }

        /// Connected to `them` at `addr` and admitted to the fleet of
        /// `key`; returns it and the welcome it gives the server's hellos.
        async fn member(key: [u8; 32], them: PeerId, addr: Multiaddr) -> (Self, Vec<u8>) {
            let mut peer = Self::connect(addr).await;
            let me = *peer.swarm.local_peer_id();
            let proof = fleet_proof(&key, &me.to_bytes(), &them.to_bytes());
            let welcome = framed(&Welcome::Member { proof });
            let hello = framed(&Hello { proof });
            let answer = peer
                .exchange(them, HELLO_PROTOCOL, &hello, &welcome)
                .await
                .unwrap();
            assert!(!answer.is_empty(), "no welcome");
            (peer, welcome)
        }

        /// Sends `bytes` on a `protocol` stream of their own and returns
        /// the answer, driving the swarm meanwhile.
        async fn exchange(
            &mut self,
            them: PeerId,
            protocol: StreamProtocol,
            bytes: &[u8],
            welcome: &[u8],
        ) -> Result<Vec<u8>, String> {
            let ask = ask_raw(self.streams.clone(), them, protocol, bytes.to_vec());
            let mut ask = std::pin::pin!(ask);
            loop {
                tokio::select! {
                    answer = &mut ask => return answer,
                    _ = self.swarm.select_next_some() => {}
                    Some((_, stream)) = self.hellos.next() => {
                        tokio::spawn(answer_hello(stream, welcome.to_vec()));
                    }
                }
            }
        }

        /// Drives the swarm in a task; returns a handle to open streams.
        fn drive(
            mut self,
            welcome: Vec<u8>,
        ) -> (libp2p_stream::Control, tokio::task::JoinHandle<()>) {
            let streams = self.streams.clone();
            let driver = tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = self.swarm.select_next_some() => {}
                        Some((_, stream)) = self.hellos.next() => {
                            tokio::spawn(answer_hello(stream, welcome.clone()));
                        }
                    }
                }
            });
            (streams, driver)
        }
    }

    /// Answers a server's Hello with `welcome`, whatever it said.
    async fn answer_hello(mut stream: libp2p::Stream, welcome: Vec<u8>) {
        let mut hello = Vec::new();
        let _ = (&mut stream).take(1024).read_to_end(&mut hello).await;
        let _ = stream.write_all(&welcome).await;
        let _ = stream.close().await;
    }

    /// Sends `bytes` on a `protocol` stream of their own, closes our half
    /// and returns what comes back, or why nothing does.
    async fn ask_raw(
        mut streams: libp2p_stream::Control,
        peer: PeerId,
        protocol: StreamProtocol,
        bytes: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        let mut stream = streams
            .open_stream(peer, protocol)
            .await
            .map_err(|e| e.to_string())?;
        stream.write_all(&bytes).await.map_err(|e| e.to_string())?;
        stream.close().await.map_err(|e| e.to_string())?;
        let mut answer = Vec::new();
        stream
            .read_to_end(&mut answer)
            .await
            .map_err(|e| e.to_string())?;
        Ok(answer)
    }

    /// Asks `peer` a raw control request.
    async fn control_raw(
        streams: &libp2p_stream::Control,
        peer: PeerId,
        bytes: &[u8],
    ) -> Result<Vec<u8>, String> {
        ask_raw(streams.clone(), peer, CONTROL_PROTOCOL, bytes.to_vec()).await
    }

    /// Opens a `protocol` stream, writes `bytes` and says whether the
    /// other side then reset or closed it.
    async fn write_raw(
        streams: &mut libp2p_stream::Control,
        peer: PeerId,
        protocol: StreamProtocol,
        bytes: &[u8],
    ) -> bool {
        let Ok(mut stream) = streams.open_stream(peer, protocol).await else {
            return true; // Refused at negotiation: nothing was read.
        };
        if stream.write_all(bytes).await.is_err() || stream.flush().await.is_err() {
            return true; // Reset before it was all written.
        }
        let mut rest = Vec::new();
        // A reset is an error, a close an empty read: either ends it.
        let ended = stream.read_to_end(&mut rest).await;
        ended.is_err() || rest.is_empty()
    }

    /// Answers every control request the network hands over with Ok.
    fn answer_every_control_request(mut events: mpsc::Receiver<NetEvent>) {
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                if let NetEvent::Control { reply, .. } = ev {
                    reply.send(ControlResponse::Ok).await;
                }
            }
        });
    }

    /// A new identity on a free loopback port, in the fleet of `fleet_key`.
    fn loopback(fleet_key: [u8; 32]) -> NetConfig {
        NetConfig {
            keypair: Keypair::generate_ed25519(),
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
            fleet_key,
            request_timeout: Duration::from_secs(10),
            admission_timeout: ADMISSION_TIMEOUT,
            security: Security::default(),
        }
    }

    /// Starts a network on `config` and waits for its listen address.
    async fn listening(config: NetConfig) -> (NetHandle, mpsc::Receiver<NetEvent>, Multiaddr) {
        let (net, mut events) = start(config).unwrap();
        loop {
            if let Some(NetEvent::Listening(a)) = events.recv().await {
                return (net, events, a);
            }
        }
    }

    #[tokio::test]
    async fn malformed_and_oversized_messages_fail_their_stream_and_the_peer_is_still_served() {
        let key = [7u8; 32];
        let (server, mut events, addr) = listening(loopback(key)).await;
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = seen.clone();
        let (have_tx, mut haves) = mpsc::channel(16);
        let (chunk_tx, mut chunk_requests) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                match ev {
                    NetEvent::Control { reply, .. } => {
                        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        reply.send(ControlResponse::Fleet(Vec::new())).await;
                    }
                    NetEvent::Chunk { request, reply, .. } => {
                        let _ = chunk_tx.send(request).await;
                        reply.send(ChunkResponse::Refused).await;
                    }
                    NetEvent::Have { announcement, .. } => {
                        let _ = have_tx.send(announcement).await;
                    }
                    _ => {}
                }
            }
        });
        let them = server.peer_id();
        let test = async {
            let (client, welcome) = RawPeer::member(key, them, addr).await;
            let (mut streams, driver) = client.drive(welcome);
            // A length over the limit: the stream fails, nothing is allocated.
            let oversized = ((MAX_CONTROL_FRAME + 1) as u32).to_le_bytes();
            let answer = control_raw(&streams, them, &oversized).await;
            assert!(answer.is_err() || answer == Ok(Vec::new()), "{answer:?}");
            // A body that is not a message.
            let malformed = [3, 0, 0, 0, 0xff, 0xff, 0xff];
            let answer = control_raw(&streams, them, &malformed).await;
            assert!(answer.is_err() || answer == Ok(Vec::new()), "{answer:?}");
            // The same peer, on the same connection, is still served.
            let fleet = control_raw(&streams, them, &framed(&ControlRequest::Fleet)).await;
            assert_eq!(fleet, Ok(framed(&ControlResponse::Fleet(Vec::new()))));

            // Announcements: each bad stream is ended, a good one still heard.
            let oversized = ((MAX_HAVE_FRAME + 1) as u32).to_le_bytes();
            assert!(write_raw(&mut streams, them, HAVE_PROTOCOL, &oversized).await);
            assert!(write_raw(&mut streams, them, HAVE_PROTOCOL, &malformed).await);
            // Chunk streams: each bad one is ended, a good one still answered.
            let oversized = ((MAX_CHUNK_FRAME + 1) as u32).to_le_bytes();
            assert!(write_raw(&mut streams, them, CHUNK_PROTOCOL, &oversized).await);
            assert!(write_raw(&mut streams, them, CHUNK_PROTOCOL, &malformed).await);
            let get = ChunkRequest::Get {
                release: convoy_chunker::ReleaseId([4; 32]),
                indices: vec![7],
            };
            let mut stream = streams.open_stream(them, CHUNK_PROTOCOL).await.unwrap();
            let frame = encode_frame::<_, MAX_CHUNK_FRAME>(&Tagged::new(41, get.clone())).unwrap();
            stream.write_all(&frame).await.unwrap();
            stream.flush().await.unwrap();
            let answer: Tagged<ChunkResponse> = read_frame::<_, _, MAX_CHUNK_FRAME>(&mut stream)
                .await
                .unwrap();
            assert_eq!(answer, Tagged::new(41, ChunkResponse::Refused));
            assert_eq!(chunk_requests.recv().await, Some(get));
            let good = Announcement {
                release: convoy_chunker::ReleaseId([4; 32]),
                chunks: vec![1, 2, 3],
            };
            let mut stream = streams.open_stream(them, HAVE_PROTOCOL).await.unwrap();
            let frame = encode_frame::<_, MAX_HAVE_FRAME>(&good).unwrap();
            stream.write_all(&frame).await.unwrap();
            stream.flush().await.unwrap();
            assert_eq!(haves.recv().await, Some(good));
            driver.abort();
        };
        tokio::time::timeout(Duration::from_secs(30), test)
            .await
            .expect("bounded");
        assert_eq!(
            seen.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "a bad message reached the daemon"
        );
        assert!(haves.try_recv().is_err(), "a bad announcement was heard");
        assert!(
            chunk_requests.try_recv().is_err(),
            "a bad chunk request was heard"
        );
        server.shutdown().await;
    }

    #[tokio::test]
    async fn before_its_proof_a_peer_is_read_one_small_hello_and_nothing_else() {
        let key = [4u8; 32];
        let config = NetConfig {
            // What refuses a stranger below is what it sent, not the timer.
            admission_timeout: Duration::from_secs(3600),
            ..loopback(key)
        };
        let (server, mut events, addr) = listening(config).await;
        let them = server.peer_id();
        let reached = tokio::spawn(async move {
            let mut n = 0;
            while let Some(ev) = events.recv().await {
                if let NetEvent::Control { reply, .. } = ev {
                    reply.send(ControlResponse::Ok).await;
                    n += 1;
                } else if matches!(ev, NetEvent::Chunk { .. } | NetEvent::Have { .. }) {
                    n += 1;
                }
            }
            n
        });
        let test = async {
            // No Hello first: no other protocol is even offered, so
            // nothing a stranger writes is read.
            let stranger = RawPeer::connect(addr.clone()).await;
            let (mut streams, driver) = stranger.drive(Vec::new());
            for protocol in [CONTROL_PROTOCOL, CHUNK_PROTOCOL, HAVE_PROTOCOL] {
                let opened = streams.open_stream(them, protocol.clone()).await;
                assert!(
                    matches!(
                        opened,
                        Err(libp2p_stream::OpenStreamError::UnsupportedProtocol(_))
                    ),
                    "{protocol} was offered to a stranger"
                );
            }
            driver.abort();
            assert_eq!(server.peers_refused(), 0);

            // A Hello longer than a Hello can be: refused at its length,
            // and the peer with it.
            let mut stranger = RawPeer::connect(addr.clone()).await;
            let mut oversized = ((MAX_HELLO_FRAME + 1) as u32).to_le_bytes().to_vec();
            oversized.extend([0; MAX_HELLO_FRAME + 1]);
            let answer = stranger
                .exchange(them, HELLO_PROTOCOL, &oversized, &[])
                .await;
            assert!(answer.is_err() || answer == Ok(Vec::new()), "{answer:?}");
            while server.peers_refused() < 1 {
                if let SwarmEvent::ConnectionClosed { .. } = stranger.swarm.select_next_some().await
                {
                    break;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(30), test)
            .await
            .expect("bounded");
        assert_eq!(server.peers_refused(), 1);
        server.shutdown().await;
        assert_eq!(reached.await.unwrap(), 0, "a stranger's request was read");
    }

    #[tokio::test]
    async fn our_requests_wait_until_the_peer_has_welcomed_us() {
        let key = [8u8; 32];
        let (server, _events, addr) = listening(loopback(key)).await;
        let them = server.peer_id();
        let test = async {
            let RawPeer {
                mut swarm,
                mut streams,
                mut hellos,
            } = RawPeer::connect(addr).await;
            let me = *swarm.local_peer_id();
            let mut controls = streams.accept(CONTROL_PROTOCOL).unwrap();
            let driver = tokio::spawn(async move {
                loop {
                    swarm.select_next_some().await;
                }
            });
            // The peer proves itself, so the server admits it...
            let proof = fleet_proof(&key, &me.to_bytes(), &them.to_bytes());
            let hello = framed(&Hello { proof });
            let welcome = ask_raw(streams.clone(), them, HELLO_PROTOCOL, hello).await;
            assert!(!welcome.unwrap().is_empty());
            // ...but has not answered the server's Hello yet.
            let (_, unanswered) = hellos.next().await.unwrap();
            let asking = tokio::spawn({
                let server = server.clone();
                async move { server.control(me, ControlRequest::Fleet).await }
            });
            let early = tokio::time::timeout(Duration::from_secs(2), controls.next()).await;
            assert!(
                early.is_err(),
                "a request came before its sender was welcomed"
            );
            answer_hello(unanswered, framed(&Welcome::Member { proof })).await;
            let (_, mut stream) = controls.next().await.unwrap();
            let request = read_frame::<ControlRequest, _, MAX_CONTROL_FRAME>(&mut stream).await;
            assert_eq!(request.unwrap(), ControlRequest::Fleet);
            write_frame::<_, _, MAX_CONTROL_FRAME>(&mut stream, &ControlResponse::Ok)
                .await
                .unwrap();
            stream.close().await.unwrap();
            assert_eq!(asking.await.unwrap(), Ok(ControlResponse::Ok));
            driver.abort();
        };
        tokio::time::timeout(Duration::from_secs(30), test)
            .await
            .expect("bounded");
        server.shutdown().await;
    }

    #[tokio::test]
    async fn a_burst_of_control_requests_from_several_members_is_answered_whole() {
        let key = [2u8; 32];
        let (server, events, addr) = listening(loopback(key)).await;
        let them = server.peer_id();
        answer_every_control_request(events);
        let mut members = Vec::new();
        for _ in 0..4 {
            let (member, _events) = start(loopback(key)).unwrap();
            member.add_addresses(them, vec![addr.clone()]).await;
            assert_eq!(
                member.control(them, ControlRequest::Fleet).await,
                Ok(ControlResponse::Ok)
            );
            members.push((member, _events));
        }
        // All at once: many arrive at the server in the same instant.
        let asks = members.iter().flat_map(|(member, _)| {
            (0..30).map(move |_| member.control(them, ControlRequest::Fleet))
        });
        let answers =
            tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(asks))
                .await
                .expect("bounded");
        let failed: Vec<_> = answers
            .iter()
            .filter(|a| **a != Ok(ControlResponse::Ok))
            .collect();
        assert!(
            failed.is_empty(),
            "{} of 120 failed: {:?}",
            failed.len(),
            failed.first()
        );
        for (member, _) in &members {
            member.shutdown().await;
        }
        server.shutdown().await;
    }

    #[tokio::test]
    async fn control_requests_past_the_limit_are_reset_unread() {
        let key = [3u8; 32];
        let (server, events, addr) = listening(loopback(key)).await;
        let them = server.peer_id();
        answer_every_control_request(events);
        let test = async {
            let (client, welcome) = RawPeer::member(key, them, addr).await;
            let (mut streams, driver) = client.drive(welcome);
            // Requests that never finish: a length and half a body.
            let mut unfinished = framed(&ControlRequest::Fleet);
            unfinished[0] += 8;
            let mut held = Vec::new();
            // Written out, not the constant: a higher limit must fail here.
            for _ in 0..32 {
                let mut stream = streams.open_stream(them, CONTROL_PROTOCOL).await.unwrap();
                stream.write_all(&unfinished).await.unwrap();
                stream.flush().await.unwrap();
                held.push(stream);
            }
            let answer = control_raw(&streams, them, &framed(&ControlRequest::Fleet)).await;
            assert!(answer.is_err() || answer == Ok(Vec::new()), "{answer:?}");
            // One slot free again: served.
            drop(held.pop());
            let mut answer = Err(String::new());
            for _ in 0..100 {
                answer = control_raw(&streams, them, &framed(&ControlRequest::Fleet)).await;
                if answer.is_ok() {
                    break;
                }
                // The reset of the dropped stream reaches the server
                // after our next request may have: ask again.
                tokio::task::yield_now().await;
            }
            assert_eq!(answer, Ok(framed(&ControlResponse::Ok)));
            driver.abort();
        };
        tokio::time::timeout(Duration::from_secs(30), test)
            .await
            .expect("bounded");
        server.shutdown().await;
    }

    #[tokio::test]
    async fn a_member_that_floods_requests_and_never_reads_stalls_nobody_else() {
        let key = [9u8; 32];
        let (server, mut events, addr) = listening(loopback(key)).await;
        let them = server.peer_id();
        let handled: Arc<Mutex<HashMap<PeerId, usize>>> = Default::default();
        let counts = handled.clone();
        // Each answer is large: a few fill the flow-control window of a
        // stream nobody reads.
        let big = WireChunk {
            encoding: 0,
            bytes: vec![7; 128 << 10],
        };
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                match ev {
                    NetEvent::Chunk { peer, reply, .. } => {
                        *counts.lock().unwrap().entry(peer).or_default() += 1;
                        reply
                            .send(ChunkResponse::Chunks(vec![Some(big.clone())]))
                            .await;
                    }
                    NetEvent::Control { reply, .. } => reply.send(ControlResponse::Ok).await,
                    _ => {}
                }
            }
        });
        let test = async {
            let (flooder, welcome) = RawPeer::member(key, them, addr.clone()).await;
            let flooder_id = *flooder.swarm.local_peer_id();
            let (mut streams, driver) = flooder.drive(welcome);
            let mut stream = streams.open_stream(them, CHUNK_PROTOCOL).await.unwrap();
            let get = ChunkRequest::Get {
                release: convoy_chunker::ReleaseId([4; 32]),
                indices: vec![1],
            };
            const FLOOD: u64 = 2000;
            for id in 0..FLOOD {
                let frame =
                    encode_frame::<_, MAX_CHUNK_FRAME>(&Tagged::new(id, get.clone())).unwrap();
                stream.write_all(&frame).await.unwrap();
            }
            stream.flush().await.unwrap();
            // A member that reads its answers is served all the while.
            let (member, _member_events) = start(loopback(key)).unwrap();
            member.add_addresses(them, vec![addr]).await;
            for _ in 0..20 {
                let r = member.chunk(them, get.clone()).await;
                assert!(matches!(r, Ok(ChunkResponse::Chunks(_))), "{r:?}");
                let r = member.control(them, ControlRequest::Fleet).await;
                assert_eq!(r, Ok(ControlResponse::Ok));
            }
            let flooded = handled
                .lock()
                .unwrap()
                .get(&flooder_id)
                .copied()
                .unwrap_or(0);
            // MAX_OWED_ANSWERS (64), and the few answers the unread
            // stream's flow-control window takes.
            assert!(
                flooded <= 80,
                "{flooded} of {FLOOD} requests of a peer that reads nothing were handled"
            );
            member.shutdown().await;
            driver.abort();
            drop(stream);
        };
        tokio::time::timeout(Duration::from_secs(60), test)
            .await
            .expect("bounded");
        server.shutdown().await;
    }

    #[tokio::test]
    async fn one_peer_may_hold_only_a_few_connections() {
        use libp2p::swarm::dial_opts::PeerCondition;
        let key = [5u8; 32];
        let (server, _events, addr) = listening(loopback(key)).await;
        let them = server.peer_id();
        let test = async {
            let (client, _) = RawPeer::member(key, them, addr.clone()).await;
            let mut client = client.swarm;
            const DIALS: u32 = 10;
            for _ in 1..DIALS {
                let opts = DialOpts::peer_id(them)
                    .condition(PeerCondition::Always)
                    .addresses(vec![addr.clone()])
                    .build();
                client.dial(opts).unwrap();
            }
            // The first connection is up already; every further dial ends
            // established or failed, and those past the limit are closed.
            let (mut open, mut ended, mut closed) = (1u32, 1u32, 0u32);
            // Written out, not the constant: a higher limit must fail here.
            while ended < DIALS || open - closed > 4 {
                match client.select_next_some().await {
                    SwarmEvent::ConnectionEstablished { .. } => {
                        open += 1;
                        ended += 1;
                    }
                    SwarmEvent::OutgoingConnectionError { .. } => ended += 1,
                    SwarmEvent::ConnectionClosed { .. } => closed += 1,
                    _ => {}
                }
            }
            assert_eq!(open - closed, MAX_CONNECTIONS_PER_PEER);
        };
        tokio::time::timeout(Duration::from_secs(30), test)
            .await
            .expect("connections past the limit were not refused within 30 s");
        server.shutdown().await;
    }

    #[tokio::test]
    async fn a_peer_with_another_fleet_key_is_refused() {
        let (server, mut events, addr) = listening(loopback([1; 32])).await;
        let reached = tokio::spawn(async move {
            let mut n = 0;
            while let Some(ev) = events.recv().await {
                if matches!(
                    ev,
                    NetEvent::Control { .. } | NetEvent::Chunk { .. } | NetEvent::Have { .. }
                ) {
                    n += 1;
                }
            }
            n
        });
        let (client, _client_events) = start(loopback([2; 32])).unwrap();
        client.add_addresses(server.peer_id(), vec![addr]).await;
        let announcement = Announcement {
            release: convoy_chunker::ReleaseId([1; 32]),
            chunks: vec![0],
        };
        client.announce(server.peer_id(), announcement);
        let r = tokio::time::timeout(
            Duration::from_secs(20),
            client.control(server.peer_id(), ControlRequest::Fleet),
        )
        .await
        .expect("bounded");
        assert!(matches!(r, Err(RequestError::NotAdmitted(_))), "{r:?}");
        server.shutdown().await;
        assert_eq!(
            reached.await.unwrap(),
            0,
            "a non-member's request reached the daemon"
        );
    }

    #[tokio::test]
    async fn chunk_answers_reach_their_own_requests_in_any_order() {
        let config = || loopback([6; 32]);
        let (server, mut events, addr) = listening(config()).await;
        const N: u32 = 20;
        // Holds every request until all have come, then answers them last
        // first, each with a chunk naming its index; drops index 5 unanswered.
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some(ev) = events.recv().await {
                if let NetEvent::Chunk {
                    request: ChunkRequest::Get { indices, .. },
                    reply,
                    ..
                } = ev
                {
                    held.push((indices[0], reply));
                    if held.len() == N as usize {
                        while let Some((i, reply)) = held.pop() {
                            if i == 5 {
                                continue;
                            }
                            let chunk = crate::protocol::WireChunk {
                                encoding: 0,
                                bytes: i.to_le_bytes().to_vec(),
                            };
                            reply.send(ChunkResponse::Chunks(vec![Some(chunk)])).await;
                        }
                    }
                }
            }
        });
        let (client, _client_events) = start(config()).unwrap();
        client.add_addresses(server.peer_id(), vec![addr]).await;
        let asks = (0..N).map(|i| {
            let client = client.clone();
            let peer = server.peer_id();
            async move {
                let get = ChunkRequest::Get {
                    release: convoy_chunker::ReleaseId([3; 32]),
                    indices: vec![i],
                };
                (i, client.chunk(peer, get).await)
            }
        });
        let answers =
            tokio::time::timeout(Duration::from_secs(20), futures::future::join_all(asks))
                .await
                .expect("bounded");
        for (i, answer) in answers {
            let expected = if i == 5 {
                ChunkResponse::Busy { retry_ms: 0 }
            } else {
                ChunkResponse::Chunks(vec![Some(crate::protocol::WireChunk {
                    encoding: 0,
                    bytes: i.to_le_bytes().to_vec(),
                })])
            };
            assert_eq!(answer, Ok(expected), "request {i}");
        }
        client.shutdown().await;
        server.shutdown().await;
    }

    #[tokio::test]
    async fn announcements_between_members_arrive_in_order() {
        let config = || loopback([5; 32]);
        let (server, mut events, addr) = listening(config()).await;
        let (client, _client_events) = start(config()).unwrap();
        client.add_addresses(server.peer_id(), vec![addr]).await;
        let sent: Vec<Announcement> = (0..50u32)
            .map(|i| Announcement {
                release: convoy_chunker::ReleaseId([2; 32]),
                chunks: vec![i, i + 1000],
            })
            .collect();
        for a in &sent {
            client.announce(server.peer_id(), a.clone());
        }
        let heard = async {
            let mut heard = Vec::new();
            while heard.len() < sent.len() {
                match events.recv().await {
                    Some(NetEvent::Have { peer, announcement }) => {
                        assert_eq!(peer, client.peer_id());
                        heard.push(announcement);
                    }
                    Some(_) => {}
                    None => break,
                }
            }
            heard
        };
        let heard = tokio::time::timeout(Duration::from_secs(20), heard)
            .await
            .expect("bounded");
        assert_eq!(heard, sent);
        client.shutdown().await;
        server.shutdown().await;
    }
}
