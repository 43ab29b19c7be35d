//! The libp2p network: one event loop owns the `Swarm`.
//!
//! [`start`] builds the swarm (TCP and QUIC, noise, yamux, the three
//! protocols of [`protocol`](crate::protocol), a block list for banned
//! peers) and spawns its loop. The rest of the process talks to it through
//! a cloneable [`NetHandle`] (bounded command channel, a oneshot per reply)
//! and receives [`NetEvent`]s on a bounded channel.
//!
//! Fleet membership: on every new connection each side sends
//! [`ControlRequest::Hello`] with a proof of the fleet key bound to both
//! peer ids ([`fleet_proof`]). A peer is *admitted* once it has proved
//! itself (in its Hello, or in the Welcome that answers ours). Until then
//! its requests wait (a few, for a few seconds) and ours to it wait too; a
//! wrong proof, or none in time, gets every waiting request denied and the
//! connection closed. Nothing else the loop receives reaches the daemon
//! from a peer that is not admitted.
//!
//! Chunk requests ([`NetHandle::chunk`]) go on one [`CHUNK_PROTOCOL`]
//! stream per peer and direction, tagged with an id so that answers may
//! come back in any order: a task writes the requests and another reads
//! the answers; on the serving side a task reads requests and hands them
//! to the loop (parked, as every request, until the peer is admitted) and
//! another writes the answers. A stream per request, as request–response
//! opens, cost a negotiation, a timer thread's wake-ups and several small
//! writes per chunk. A malformed or oversized frame ends that stream
//! only; requests still waiting on it fail and the next opens another.
//!
//! Announcements ([`NetHandle::announce`]) do not go as requests: the loop
//! keeps one outbound [`HAVE_PROTOCOL`] stream per admitted peer, written
//! by a task of its own, and a task per inbound stream reads frames and
//! hands them back to the loop, which treats them as it treats requests
//! (parked until the peer is admitted). An announcement is advisory: one
//! that cannot be queued or written is dropped, as an unanswered request
//! was before.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::{dial_opts::DialOpts, NetworkBehaviour, SwarmEvent};
use libp2p::{
    allow_block_list, connection_limits, identity::Keypair, noise, tcp, yamux, Multiaddr, PeerId,
    StreamProtocol, Swarm,
};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use crate::protocol::{
    self as wire, fleet_proof, read_frame, write_frame, Announcement, ChunkRequest, ChunkResponse,
    ControlRequest, ControlResponse, Tagged, MAX_CHUNK_FRAME, MAX_CONTROL_FRAME, MAX_HAVE_BATCH,
    MAX_HAVE_FRAME,
};

const CHUNK_PROTOCOL: StreamProtocol = StreamProtocol::new(wire::CHUNK_PROTOCOL);
const CONTROL_PROTOCOL: StreamProtocol = StreamProtocol::new(wire::CONTROL_PROTOCOL);
const HAVE_PROTOCOL: StreamProtocol = StreamProtocol::new(wire::HAVE_PROTOCOL);

/// Requests parked per peer while it has not proved membership.
const MAX_PARKED_PER_PEER: usize = 256;
/// How long a connected peer has to prove membership.
const ADMISSION_TIMEOUT: Duration = Duration::from_secs(10);
/// Commands and events waiting between the loop and the daemon.
const CHANNEL_CAPACITY: usize = 4096;
/// Peers whose addresses the loop remembers.
const MAX_ADDRESS_BOOK: usize = 8192;
/// Streams per connection and protocol.
const MAX_STREAMS: usize = 512;
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

/// The way back for one inbound control request. Dropping it without
/// answering resets the stream, which the requester sees as a failure.
#[derive(Debug)]
pub struct Reply<T> {
    channel: ResponseChannel<T>,
    commands: mpsc::Sender<Command>,
}

impl Reply<ControlResponse> {
    /// Sends the answer.
    pub async fn send(self, response: ControlResponse) {
        let _ = self
            .commands
            .send(Command::RespondControl(self.channel, response))
            .await;
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
    RespondControl(ResponseChannel<ControlResponse>, ControlResponse),
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
}

impl NetHandle {
    /// Peers refused so far: wrong or missing fleet key, no proof in
    /// time, too many requests before proving membership.
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
    control: request_response::Behaviour<ControlCodec>,
    /// Chunk streams and announcement streams.
    streams: libp2p_stream::Behaviour,
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

/// Starts the network loop on the current tokio runtime.
pub fn start(config: NetConfig) -> Result<(NetHandle, mpsc::Receiver<NetEvent>), NetError> {
    let rr_config = request_response::Config::default()
        .with_request_timeout(config.request_timeout)
        .with_max_concurrent_streams(MAX_STREAMS);
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(config.keypair.clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| NetError::Transport("tcp", e.to_string()))?
        .with_quic()
        .with_behaviour(|_| Behaviour {
            limits: connection_limits::Behaviour::new(
                connection_limits::ConnectionLimits::default()
                    .with_max_pending_incoming(Some(MAX_PENDING_INCOMING))
                    .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER))
                    .with_max_established_incoming(Some(MAX_ESTABLISHED_INCOMING)),
            ),
            blocked: Default::default(),
            control: request_response::Behaviour::new(
                [(CONTROL_PROTOCOL, ProtocolSupport::Full)],
                rr_config,
            ),
            streams: libp2p_stream::Behaviour::new(),
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
    let mut streams = swarm.behaviour().streams.new_control();
    let incoming = streams
        .accept(HAVE_PROTOCOL)
        .expect("a new behaviour has no protocol registered");
    let incoming_chunks = streams
        .accept(CHUNK_PROTOCOL)
        .expect("each protocol is registered once");
    let (cmd_tx, cmd_rx) = mpsc::channel(CHANNEL_CAPACITY);
    let (ev_tx, ev_rx) = mpsc::channel(CHANNEL_CAPACITY);
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
        control_pending: HashMap::new(),
        hellos: HashMap::new(),
        streams,
        incoming,
        incoming_chunks,
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
        },
        ev_rx,
    ))
}

enum Parked {
    InChunk(ChunkRequest, ChunkAnswer),
    InControl(ControlRequest, ResponseChannel<ControlResponse>),
    OutChunk(ChunkRequest, ChunkReply),
    OutControl(ControlRequest, ControlReply),
    InHave(Announcement),
    OutHave(Announcement),
}

#[derive(Default)]
struct PeerState {
    connections: usize,
    admitted: bool,
    /// When it connected (or we started dialling) without being admitted yet.
    since: Option<Instant>,
    parked: VecDeque<Parked>,
    dialing: bool,
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
    control_pending: HashMap<OutboundRequestId, ControlReply>,
    /// Our Hello requests in flight, by id, to the peer they went to.
    hellos: HashMap<OutboundRequestId, PeerId>,
    /// Opens announcement streams.
    streams: libp2p_stream::Control,
    /// Announcement streams peers open to us.
    incoming: libp2p_stream::IncomingStreams,
    /// The queue of each peer's announcement stream writer.
    announcers: HashMap<PeerId, mpsc::Sender<Announcement>>,
    /// Chunk streams peers open to us.
    incoming_chunks: libp2p_stream::IncomingStreams,
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
                Some((peer, stream)) = self.incoming.next() => {
                    tokio::spawn(read_announcements(peer, stream, self.commands_tx.clone()));
                }
                Some((peer, stream)) = self.incoming_chunks.next() => {
                    serve_chunk_stream(peer, stream, self.commands_tx.clone());
                }
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
        let tx = self.commands_tx.clone();
        match event {
            NetEvent::Chunk { reply, .. } => reply.send_now(if denied {
                ChunkResponse::Denied
            } else {
                ChunkResponse::Busy { retry_ms: 0 }
            }),
            NetEvent::Control { reply, .. } => {
                let resp = if denied {
                    ControlResponse::Denied
                } else {
                    ControlResponse::Error("busy; try again".into())
                };
                let _ = tx.try_send(Command::RespondControl(reply.channel, resp));
            }
            _ => {}
        }
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
            Command::Chunk(peer, req, reply) => self.outbound(peer, Parked::OutChunk(req, reply)),
            Command::Control(peer, req, reply) => {
                self.outbound(peer, Parked::OutControl(req, reply))
            }
            Command::Announce(peer, a) => self.outbound(peer, Parked::OutHave(a)),
            Command::Announced(peer, a) => self.inbound(peer, Parked::InHave(a)),
            Command::ChunkAsked(peer, req, reply) => {
                self.inbound(peer, Parked::InChunk(req, reply))
            }
            Command::RespondControl(ch, resp) => {
                let _ = self.swarm.behaviour_mut().control.send_response(ch, resp);
            }
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
        if state.admitted {
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
                let reason = e.to_string();
                self.fail_parked(peer, |p| RequestError::Unreachable(p, reason.clone()));
            }
        }
    }

    fn send_now(&mut self, peer: PeerId, request: Parked) {
        let b = self.swarm.behaviour_mut();
        match request {
            Parked::OutChunk(req, reply) => self.send_chunk_request(peer, req, reply),
            Parked::OutControl(req, reply) => {
                let id = b.control.send_request(&peer, req);
                self.control_pending.insert(id, reply);
            }
            Parked::InChunk(request, reply) => self.emit(NetEvent::Chunk {
                peer,
                request,
                reply,
            }),
            Parked::InControl(request, channel) => self.emit(NetEvent::Control {
                peer,
                request,
                reply: Reply {
                    channel,
                    commands: self.commands_tx.clone(),
                },
            }),
            Parked::OutHave(announcement) => self.announce(peer, announcement),
            Parked::InHave(announcement) => {
                self.emit(NetEvent::Have { peer, announcement });
            }
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

    /// Fails or denies everything waiting on `peer`.
    fn fail_parked(&mut self, peer: PeerId, why: impl Fn(PeerId) -> RequestError) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        state.dialing = false;
        state.since = None;
        let parked: Vec<_> = state.parked.drain(..).collect();
        for p in parked {
            match p {
                Parked::InChunk(_, reply) => reply.send_now(ChunkResponse::Denied),
                Parked::InControl(_, ch) => {
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .control
                        .send_response(ch, ControlResponse::Denied);
                }
                other => fail(other, why(peer)),
            }
        }
    }

    fn admit(&mut self, peer: PeerId) {
        let state = self.peers.entry(peer).or_default();
        if state.admitted {
            return;
        }
        state.admitted = true;
        state.since = None;
        let parked: Vec<_> = state.parked.drain(..).collect();
        debug!(%peer, "peer admitted");
        self.emit(NetEvent::Admitted(peer));
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
            .filter(|(_, s)| !s.admitted && s.since.is_some_and(|t| now - t > ADMISSION_TIMEOUT))
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
                    let proof = self.proof_from(&self.local(), &peer_id);
                    let id = self
                        .swarm
                        .behaviour_mut()
                        .control
                        .send_request(&peer_id, ControlRequest::Hello { proof });
                    self.hellos.insert(id, peer_id);
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
                    let was_admitted = std::mem::take(&mut state.admitted);
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
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                ..
            } => {
                let connected = self.peers.get(&peer).is_some_and(|s| s.connections > 0);
                if !connected {
                    let reason = error.to_string();
                    debug!(%peer, "dial failed: {reason}");
                    self.fail_parked(peer, |p| RequestError::Unreachable(p, reason.clone()));
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Control(e)) => self.on_control(e),
            _ => {}
        }
    }

    fn on_control(&mut self, event: request_response::Event<ControlRequest, ControlResponse>) {
        use request_response::{Event, Message};
        match event {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request: ControlRequest::Hello { proof },
                        channel,
                        ..
                    },
                ..
            } => {
                if proof == self.proof_from(&peer, &self.local()) {
                    let answer = self.proof_from(&self.local(), &peer);
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .control
                        .send_response(channel, ControlResponse::Welcome { proof: answer });
                    self.admit(peer);
                } else {
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .control
                        .send_response(channel, ControlResponse::Denied);
                    self.reject(peer, "wrong fleet key");
                }
            }
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => self.inbound(peer, Parked::InControl(request, channel)),
            Event::Message {
                peer,
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if self.hellos.remove(&request_id).is_some() {
                    match response {
                        ControlResponse::Welcome { proof }
                            if proof == self.proof_from(&peer, &self.local()) =>
                        {
                            self.admit(peer)
                        }
                        _ => self.reject(peer, "it refused our fleet key or proved none"),
                    }
                } else if let Some(reply) = self.control_pending.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                }
            }
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if self.hellos.remove(&request_id).is_some() {
                    debug!(%peer, "hello failed: {error}");
                } else if let Some(reply) = self.control_pending.remove(&request_id) {
                    let _ = reply.send(Err(outbound_error(peer, error)));
                }
            }
            Event::InboundFailure { peer, error, .. } => {
                debug!(%peer, "inbound control stream failed: {error}");
            }
            Event::ResponseSent { .. } => {}
        }
    }

    fn inbound(&mut self, peer: PeerId, request: Parked) {
        let state = self.peers.entry(peer).or_default();
        if state.admitted {
            self.send_now(peer, request);
        } else if state.parked.len() < MAX_PARKED_PER_PEER {
            state.since.get_or_insert_with(Instant::now);
            state.parked.push_back(request);
        } else {
            self.reject(peer, "too many requests before proving membership");
        }
    }
}

fn fail(request: Parked, error: RequestError) {
    match request {
        Parked::OutChunk(_, reply) => {
            let _ = reply.send(Err(error));
        }
        Parked::OutControl(_, reply) => {
            let _ = reply.send(Err(error));
        }
        Parked::InChunk(..) | Parked::InControl(..) | Parked::InHave(..) | Parked::OutHave(..) => {}
    }
}

/// Writes `peer`'s announcements on one stream until the queue closes or
/// the stream fails (the next announcement then starts another writer).
async fn write_announcements(
    mut streams: libp2p_stream::Control,
    peer: PeerId,
    mut queue: mpsc::Receiver<Announcement>,
) {
    let mut stream = match streams.open_stream(peer, HAVE_PROTOCOL).await {
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
    mut streams: libp2p_stream::Control,
    peer: PeerId,
    mut queue: mpsc::Receiver<(ChunkRequest, ChunkReply)>,
) {
    use futures::AsyncReadExt;
    let stream = match streams.open_stream(peer, CHUNK_PROTOCOL).await {
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

/// The libp2p codec of [`CONTROL_PROTOCOL`]: one frame each way.
#[derive(Clone, Copy, Debug, Default)]
pub struct ControlCodec;

impl request_response::Codec for ControlCodec {
    type Protocol = StreamProtocol;
    type Request = ControlRequest;
    type Response = ControlResponse;

    async fn read_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<ControlRequest>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        read_frame::<ControlRequest, T, { MAX_CONTROL_FRAME }>(io).await
    }

    async fn read_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<ControlResponse>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        read_frame::<ControlResponse, T, { MAX_CONTROL_FRAME }>(io).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: ControlRequest,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        write_frame::<ControlRequest, T, { MAX_CONTROL_FRAME }>(io, &req).await?;
        futures::AsyncWriteExt::close(io).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        resp: ControlResponse,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        write_frame::<ControlResponse, T, { MAX_CONTROL_FRAME }>(io, &resp).await?;
        futures::AsyncWriteExt::close(io).await
    }
}

fn outbound_error(peer: PeerId, error: request_response::OutboundFailure) -> RequestError {
    use request_response::OutboundFailure as F;
    match error {
        F::DialFailure => RequestError::Unreachable(peer, "dial failed".into()),
        F::Timeout => RequestError::Timeout(peer),
        F::ConnectionClosed => RequestError::Unreachable(peer, "connection closed".into()),
        F::UnsupportedProtocols => {
            RequestError::Stream(peer, "does not speak the Convoy protocol".into())
        }
        F::Io(e) => RequestError::Stream(peer, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{encode_frame, WireChunk};
    use futures::{AsyncReadExt, AsyncWriteExt};

    /// Writes requests as the raw bytes given: what no correct peer sends.
    #[derive(Clone, Default)]
    struct RawCodec;

    impl request_response::Codec for RawCodec {
        type Protocol = StreamProtocol;
        type Request = Vec<u8>;
        type Response = Vec<u8>;

        async fn read_request<T>(
            &mut self,
            _: &StreamProtocol,
            io: &mut T,
        ) -> std::io::Result<Vec<u8>>
        where
            T: futures::AsyncRead + Unpin + Send,
        {
            let mut v = Vec::new();
            io.take(1 << 20).read_to_end(&mut v).await?;
            Ok(v)
        }

        async fn read_response<T>(
            &mut self,
            p: &StreamProtocol,
            io: &mut T,
        ) -> std::io::Result<Vec<u8>>
        where
            T: futures::AsyncRead + Unpin + Send,
        {
            self.read_request(p, io).await
        }

        async fn write_request<T>(
            &mut self,
            _: &StreamProtocol,
            io: &mut T,
            req: Vec<u8>,
        ) -> std::io::Result<()>
        where
            T: futures::AsyncWrite + Unpin + Send,
        {
            io.write_all(&req).await?;
            io.close().await
        }

        async fn write_response<T>(
            &mut self,
            p: &StreamProtocol,
            io: &mut T,
            r: Vec<u8>,
        ) -> std::io::Result<()>
        where
            T: futures::AsyncWrite + Unpin + Send,
        {
            self.write_request(p, io, r).await
        }
    }

    fn framed<T: serde::Serialize>(v: &T) -> Vec<u8> {
        encode_frame::<_, MAX_CONTROL_FRAME>(v).unwrap()
    }

    /// A peer that writes whatever bytes it is given.
    #[derive(NetworkBehaviour)]
    struct RawPeer {
        control: request_response::Behaviour<RawCodec>,
        streams: libp2p_stream::Behaviour,
    }

    /// Sends one raw request and waits for its outcome.
    async fn exchange(
        swarm: &mut Swarm<RawPeer>,
        peer: PeerId,
        bytes: Vec<u8>,
        welcome: &[u8],
    ) -> Result<Vec<u8>, String> {
        use request_response::{Event, Message};
        let id = swarm.behaviour_mut().control.send_request(&peer, bytes);
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::Behaviour(RawPeerEvent::Control(Event::Message {
                    message: Message::Request { channel, .. },
                    ..
                })) => {
                    // The server's own Hello: answer it as a member would.
                    let _ = swarm
                        .behaviour_mut()
                        .control
                        .send_response(channel, welcome.to_vec());
                }
                SwarmEvent::Behaviour(RawPeerEvent::Control(Event::Message {
                    message:
                        Message::Response {
                            request_id,
                            response,
                        },
                    ..
                })) if request_id == id => return Ok(response),
                SwarmEvent::Behaviour(RawPeerEvent::Control(Event::OutboundFailure {
                    request_id,
                    error,
                    ..
                })) if request_id == id => return Err(error.to_string()),
                _ => {}
            }
        }
    }

    /// Opens a `protocol` stream, writes `bytes` and says whether the
    /// other side then reset or closed it.
    async fn write_raw(
        streams: &mut libp2p_stream::Control,
        peer: PeerId,
        protocol: StreamProtocol,
        bytes: &[u8],
    ) -> bool {
        let mut stream = streams.open_stream(peer, protocol).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        stream.flush().await.unwrap();
        let mut rest = Vec::new();
        // A reset is an error, a close an empty read: either ends it.
        let ended = stream.read_to_end(&mut rest).await;
        ended.is_err() || rest.is_empty()
    }

    /// A peer that speaks raw bytes, connected to `them` at `addr` and
    /// admitted to the fleet of `key`; returns it and the welcome it gives
    /// to the server's own hello.
    async fn raw_member(key: [u8; 32], them: PeerId, addr: Multiaddr) -> (Swarm<RawPeer>, Vec<u8>) {
        let mut client = libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(
                tcp::Config::default(),
                noise::Config::new,
                yamux::Config::default,
            )
            .unwrap()
            .with_behaviour(|_| RawPeer {
                control: request_response::Behaviour::<RawCodec>::new(
                    [(CONTROL_PROTOCOL, ProtocolSupport::Full)],
                    request_response::Config::default(),
                ),
                streams: libp2p_stream::Behaviour::new(),
            })
            .unwrap()
            // Connections stay open unused: only the server closes them.
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build();
        let me = *client.local_peer_id();
        client.dial(addr).unwrap();
        loop {
            if let SwarmEvent::ConnectionEstablished { .. } = client.select_next_some().await {
                break;
            }
        }
        let welcome = framed(&ControlResponse::Welcome {
            proof: fleet_proof(&key, &me.to_bytes(), &them.to_bytes()),
        });
        let hello = framed(&ControlRequest::Hello {
            proof: fleet_proof(&key, &me.to_bytes(), &them.to_bytes()),
        });
        let answer = exchange(&mut client, them, hello, &welcome).await.unwrap();
        assert!(!answer.is_empty(), "no welcome");
        (client, welcome)
    }

    /// A new identity on a free loopback port, in the fleet of `fleet_key`.
    fn loopback(fleet_key: [u8; 32]) -> NetConfig {
        NetConfig {
            keypair: Keypair::generate_ed25519(),
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
            fleet_key,
            request_timeout: Duration::from_secs(10),
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
            let (mut client, welcome) = raw_member(key, them, addr).await;
            // A length over the limit: the stream fails, nothing is allocated.
            let oversized =
                exchange(&mut client, them, u32::MAX.to_le_bytes().to_vec(), &welcome).await;
            assert!(
                oversized.is_err() || oversized == Ok(Vec::new()),
                "{oversized:?}"
            );
            // A body that is not a message.
            let malformed = exchange(
                &mut client,
                them,
                vec![3, 0, 0, 0, 0xff, 0xff, 0xff],
                &welcome,
            )
            .await;
            assert!(
                malformed.is_err() || malformed == Ok(Vec::new()),
                "{malformed:?}"
            );
            // The same peer, on the same connection, is still served.
            let fleet = exchange(&mut client, them, framed(&ControlRequest::Fleet), &welcome)
                .await
                .unwrap();
            assert_eq!(fleet, framed(&ControlResponse::Fleet(Vec::new())));

            // Announcements: each bad stream is ended, a good one still heard.
            let mut streams = client.behaviour().streams.new_control();
            let driver = tokio::spawn(async move {
                loop {
                    client.select_next_some().await;
                }
            });
            let oversized = ((MAX_HAVE_FRAME + 1) as u32).to_le_bytes();
            let malformed = [3, 0, 0, 0, 0xff, 0xff, 0xff];
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
            let (mut flooder, _) = raw_member(key, them, addr.clone()).await;
            let flooder_id = *flooder.local_peer_id();
            let mut streams = flooder.behaviour().streams.new_control();
            let driver = tokio::spawn(async move {
                loop {
                    flooder.select_next_some().await;
                }
            });
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
            let (mut client, _) = raw_member(key, them, addr.clone()).await;
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
