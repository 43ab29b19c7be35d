//! Every message that crosses the wire, in one place.
//!
//! Four protocols run over each libp2p connection (noise encrypted, yamux
//! multiplexed, over TCP or QUIC):
//!
//! - [`HELLO_PROTOCOL`] is the fleet handshake: on each new connection
//!   each side sends a [`Hello`] with a proof of the fleet key bound to
//!   both peer ids ([`fleet_proof`]) and the other answers [`Welcome`].
//!   It is the only protocol a peer may speak before it is admitted, and
//!   its frames are at most [`MAX_HELLO_FRAME`] bytes: a peer without the
//!   fleet key can make a daemon read no more than that.
//! - [`CHUNK_PROTOCOL`] carries chunk bodies: a target asking a peer for a
//!   few chunks ([`ChunkRequest::Get`]), and the origin or an operator
//!   sending one ([`ChunkRequest::Put`]). One long-lived stream per peer
//!   and direction carries requests and answers as [`Tagged`] frames, so
//!   answers come back in the order they are ready. As request–response
//!   (a stream per request, with its negotiation, timer and small writes),
//!   the streams cost more CPU than the chunks: on a 50-target swarm on
//!   two cores (five runs each, in turn) fleet CPU fell from 19.3–20.7 s
//!   to 18.3–18.6 s and p99 from 1.29–1.38× the bound to 1.22–1.25×.
//! - [`CONTROL_PROTOCOL`] is a stream per request, one [`ControlRequest`]
//!   frame one way and one [`ControlResponse`] frame back: registration
//!   and heartbeats, staging orders, have-sets, and the operator's
//!   requests to the coordinator.
//! - [`HAVE_PROTOCOL`] is one long-lived stream each way between two
//!   peers that carries [`Announcement`]s, unanswered: a swarm target
//!   announces every few hundred milliseconds to each of its peers, and as
//!   requests those were the largest count of streams in a 50-target swarm,
//!   each with its own negotiation, timer and wake-ups.
//!
//! A frame is a little-endian `u32` length and a bincode 2 body (standard
//! configuration). The reader refuses a frame over the protocol's limit
//! ([`MAX_HELLO_FRAME`], [`MAX_CHUNK_FRAME`], [`MAX_CONTROL_FRAME`],
//! [`MAX_HAVE_FRAME`]) before it allocates, and bincode checks every inner
//! length against the same limit; a refused or undecodable frame fails
//! that stream only. Requests are enums that leave room to grow: a new
//! variant is a new protocol version (`/1` → `/2`).

use std::collections::BTreeMap;
use std::io;

use convoy_chunker::{ChunkHash, ReleaseId, MAX_CHUNK_SIZE};
use futures::prelude::*;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// The fleet handshake: a [`Hello`], answered by a [`Welcome`].
pub const HELLO_PROTOCOL: &str = "/convoy/hello/1";
/// Chunk bodies.
pub const CHUNK_PROTOCOL: &str = "/convoy/chunk/3";
/// Control messages.
pub const CONTROL_PROTOCOL: &str = "/convoy/control/5";
/// Have announcements: a stream of [`Announcement`] frames.
pub const HAVE_PROTOCOL: &str = "/convoy/have/1";

/// Largest [`Hello`] or [`Welcome`] frame: the most a daemon reads from a
/// peer that has not proved fleet membership.
pub const MAX_HELLO_FRAME: usize = 64;

/// Most chunks one [`ChunkRequest::Get`] asks for: fewer, larger frames
/// cost less CPU per chunk. Four 64 KiB chunks take 128 ms at 2 MiB/s,
/// short enough to keep two batches in flight per peer within the default
/// window of 8.
pub const MAX_GET_BATCH: usize = 4;

/// Largest chunk frame: [`MAX_GET_BATCH`] chunk bodies at their largest
/// (compression never grows a stored chunk past its raw size) plus room
/// for the headers.
pub const MAX_CHUNK_FRAME: usize = MAX_GET_BATCH * (MAX_CHUNK_SIZE + 64) + 1024;
/// Largest control frame. Bounds the manifest a release may have when it
/// is published or staged (about 1.5 million chunks, 100 GiB of package).
pub const MAX_CONTROL_FRAME: usize = 64 << 20;
/// Most chunk hashes in one [`ControlRequest::MissingChunks`].
pub const MAX_HASHES_PER_QUERY: usize = 65_536;
/// Most chunk indices in one [`Announcement`].
pub const MAX_HAVE_BATCH: usize = 65_536;
/// Largest announcement frame: [`MAX_HAVE_BATCH`] indices at their
/// longest varint (5 bytes) plus the release and the lengths.
pub const MAX_HAVE_FRAME: usize = MAX_HAVE_BATCH * 5 + 64;
/// Most peers in one [`ControlRequest::Peers`].
pub const MAX_PEERS_PER_LIST: usize = 4096;
/// Most labels a target may carry, and the longest key or value.
pub const MAX_LABELS: usize = 32;
/// Longest label key or value, in bytes.
pub const MAX_LABEL_BYTES: usize = 64;

/// How a release is distributed to targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Hash, PartialOrd, Ord)]
pub enum DistributionMode {
    /// Targets fetch from each other and the origin.
    Swarm,
    /// The origin sends each target the chunks it lacks, K targets at a time.
    Push,
    /// Each target fetches the chunks it lacks from the origin only.
    Pull,
}

impl DistributionMode {
    /// The mode's name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Swarm => "swarm",
            Self::Push => "push",
            Self::Pull => "pull",
        }
    }
}

impl std::str::FromStr for DistributionMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "swarm" => Ok(Self::Swarm),
            "push" => Ok(Self::Push),
            "pull" => Ok(Self::Pull),
            other => Err(format!(
                "unknown mode {other:?}; expected swarm, push or pull"
            )),
        }
    }
}

/// A chunk as stored and sent: the encoding flag and the stored bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireChunk {
    /// [`Encoding`](convoy_chunker::Encoding) flag.
    pub encoding: u8,
    /// The stored bytes.
    #[serde(with = "serde_bytes_vec")]
    pub bytes: Vec<u8>,
}

/// A request or answer on a [`CHUNK_PROTOCOL`] stream, tagged with the
/// request's id (the requester's to choose) so that answers may come back
/// in any order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tagged<T> {
    /// The request this is, or answers.
    pub id: u64,
    /// The request or answer.
    pub body: T,
}

impl<T> Tagged<T> {
    /// `body` tagged with `id`.
    pub fn new(id: u64, body: T) -> Self {
        Self { id, body }
    }
}

/// Requests of [`CHUNK_PROTOCOL`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkRequest {
    /// Send these chunks of `release`'s distinct chunks (one to
    /// [`MAX_GET_BATCH`] indices).
    Get {
        /// The release.
        release: ReleaseId,
        /// Indices in the release's distinct chunks.
        indices: Vec<u32>,
    },
    /// Store this chunk of `release` (push, from the origin).
    Put {
        /// The release.
        release: ReleaseId,
        /// Index in the release's distinct chunks.
        index: u32,
        /// The chunk.
        chunk: WireChunk,
    },
    /// Store this chunk, named by its hash (publish, from an operator).
    Upload {
        /// Its name.
        hash: ChunkHash,
        /// Its raw length.
        len: u32,
        /// The chunk.
        chunk: WireChunk,
    },
}

/// Answers of [`CHUNK_PROTOCOL`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkResponse {
    /// The chunks asked for, in the order asked: `None` where one is not
    /// held (or, from the origin in swarm mode, left to the swarm).
    Chunks(Vec<Option<WireChunk>>),
    /// None of them served: the release is unknown here.
    Refused,
    /// Too many requests queued; ask elsewhere, or again in about
    /// `retry_ms` milliseconds (when this peer's queue will have room).
    Busy {
        /// The peer's estimate; zero when it has none.
        retry_ms: u32,
    },
    /// A put or upload was verified and stored.
    Stored,
    /// A put or upload was refused; the reason says why.
    Rejected(String),
    /// The requester has not proved fleet membership.
    Denied,
}

/// A target's labels (`dc`, `zone`, ...).
pub type Labels = BTreeMap<String, String>;

/// Where a member stands: its `dc` and `zone` labels (empty when unset).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Place {
    /// Its data centre.
    pub dc: String,
    /// Its zone within the data centre.
    pub zone: String,
}

impl Place {
    /// The place `labels` name.
    pub fn of(labels: &Labels) -> Self {
        let get = |key: &str| labels.get(key).cloned().unwrap_or_default();
        Self {
            dc: get("dc"),
            zone: get("zone"),
        }
    }

    /// Whether both names fit a label's length ([`MAX_LABEL_BYTES`]), as
    /// every registered label must: a place a peer claims is kept only then.
    pub fn within_limits(&self) -> bool {
        self.dc.len() <= MAX_LABEL_BYTES && self.zone.len() <= MAX_LABEL_BYTES
    }
}

/// A fleet member another one should connect to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// Its libp2p peer id, as bytes.
    pub peer_id: Vec<u8>,
    /// Where it listens (multiaddrs, as strings).
    pub addrs: Vec<String>,
    /// Its labels.
    pub labels: Labels,
}

/// A coordinator's order to stage a release.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageOrder {
    /// The encoded manifest.
    #[serde(with = "serde_bytes_vec")]
    pub manifest: Vec<u8>,
    /// The coordinator's signature over [`signed_bytes`] of its id.
    #[serde(with = "serde_bytes_vec")]
    pub signature: Vec<u8>,
    /// How to get the chunks.
    pub mode: DistributionMode,
    /// The origin's labels (its `dc` says which chunks are imports).
    pub origin_labels: Labels,
}

/// A busy answer telling the requester to come back in `wait`.
pub fn busy(wait: std::time::Duration) -> ChunkResponse {
    ChunkResponse::Busy {
        retry_ms: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX),
    }
}

/// The bytes a coordinator signs for a release: a domain tag and the id.
pub fn signed_bytes(release: &ReleaseId) -> Vec<u8> {
    let mut out = b"convoy manifest v1 ".to_vec();
    out.extend_from_slice(&release.0);
    out
}

/// How far a target has got with one release.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageProgress {
    /// The release.
    pub release: ReleaseId,
    /// Distinct chunks held.
    pub chunks_held: u32,
    /// Distinct chunks in the release.
    pub chunks_total: u32,
    /// Stored bytes received for this release since the order (this run).
    pub bytes_received: u64,
    /// Of those, from peers in another data centre (or a remote origin).
    pub bytes_received_cross_dc: u64,
    /// Milliseconds from the order reaching the target to completion.
    pub elapsed_ms: u64,
    /// When it ended (staged or failed), in milliseconds since the Unix
    /// epoch by the target's clock; `None` while it runs. Lets a bench
    /// whose processes share one clock time every target from the one
    /// instant it gave the order, rather than from each target's receipt.
    pub finished_unix_ms: Option<u64>,
    /// Where it stands.
    pub state: StageState,
}

/// Where a staging stands on a target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StageState {
    /// Fetching or receiving chunks.
    Running,
    /// Every chunk verified and durable; the release is named in the store.
    Staged,
    /// Gave up; the reason says why.
    Failed(String),
}

/// A target's view of itself, sent on registration and every heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetReport {
    /// Its labels.
    pub labels: Labels,
    /// Where it listens.
    pub addrs: Vec<String>,
    /// Releases staged in its store.
    pub releases: Vec<ReleaseId>,
    /// Stagings in progress or finished since it started.
    pub stagings: Vec<StageProgress>,
    /// Bytes of chunk bodies it has sent to peers since it started.
    pub bytes_sent: u64,
    /// Bytes of chunk bodies it has received since it started.
    pub bytes_received: u64,
    /// Bytes its TCP connections have carried since it started, sent and
    /// received: chunk bodies and all the rest (control messages, have
    /// announcements, bitfields, the handshake and the transport's
    /// framing).
    pub wire_bytes_sent: u64,
    /// See `wire_bytes_sent`.
    pub wire_bytes_received: u64,
    /// The release each app's `current` link names (app → version).
    pub active: BTreeMap<String, String>,
    /// Whether its health endpoint says it is in load (200) or drained (503).
    pub in_load: bool,
    /// Where its health endpoint listens (`host:port`), if it serves one.
    pub health: Option<String>,
}

/// What a target did with a [`ControlRequest::Deliver`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryReport {
    /// The release.
    pub release: ReleaseId,
    /// The version now active, or why the delivery failed (the target is
    /// then back on the release it ran before).
    pub result: Result<String, String>,
    /// Microseconds the switch of `current` took (0 when it failed first).
    pub switch_us: u64,
    /// Milliseconds from the order to the end (drain, hooks included).
    pub total_ms: u64,
}

/// The first message each side of a connection sends, on
/// [`HELLO_PROTOCOL`]: proof that it holds the fleet key ([`fleet_proof`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The proof.
    pub proof: [u8; 32],
}

/// The answer to a [`Hello`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Welcome {
    /// The proof was right; here is ours.
    Member {
        /// The answering side's proof.
        proof: [u8; 32],
    },
    /// The proof was wrong: the connection closes.
    Denied,
}

/// Requests of [`CONTROL_PROTOCOL`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlRequest {
    /// A target (re)joins the fleet, or keeps its place (heartbeat).
    Report(TargetReport),
    /// The coordinator orders a target to stage a release.
    Stage(StageOrder),
    /// The coordinator tells a target whom to fetch a release from, and its
    /// import rank in its data centre (see
    /// the daemon's `FetchConfig::import_rank`).
    Peers {
        /// The release.
        release: ReleaseId,
        /// The peers.
        peers: Vec<PeerInfo>,
        /// This target's rank in its data centre.
        rank: u32,
        /// Targets of its data centre staging the release.
        dc_size: u32,
    },
    /// Every chunk of `release` the sender holds, as a bitmap of indices.
    Bitfield {
        /// The release.
        release: ReleaseId,
        /// Number of distinct chunks.
        len: u32,
        /// Bit `i` (LSB first) set when chunk `i` is held.
        #[serde(with = "serde_bytes_vec")]
        bits: Vec<u8>,
        /// The sender's `dc` and `zone` labels, as it registered them: a
        /// peer whose peer lists did not name the sender (they are not
        /// symmetric) ranks it by these, not as another data centre's.
        place: Place,
    },
    /// Operator: which of these chunks does the origin lack?
    MissingChunks(Vec<ChunkHash>),
    /// Operator: store this manifest and name it; its chunks must be held.
    Publish {
        /// The encoded manifest.
        #[serde(with = "serde_bytes_vec")]
        manifest: Vec<u8>,
    },
    /// Operator: stage `app@version` onto the targets matching `selector`.
    StartStaging {
        /// `app@version`.
        release: String,
        /// `key=value` pairs all of which a target's labels must match;
        /// empty for every target.
        selector: Labels,
        /// How.
        mode: DistributionMode,
    },
    /// Operator: how far has staging `id` got?
    StagingStatus {
        /// The staging.
        id: u64,
    },
    /// Operator: the fleet as the coordinator sees it.
    Fleet,
    /// The coordinator orders a target to activate a staged release;
    /// with `drain_ms` it first takes itself out of load and waits that
    /// long, and goes back into load afterwards, then waits `settle_ms`
    /// for its load balancer to see it. Answered at once; the outcome
    /// follows as [`ControlRequest::Delivered`].
    Deliver {
        /// The release (staged on the target).
        release: ReleaseId,
        /// Drain for this many milliseconds before, undrain after.
        drain_ms: Option<u64>,
        /// After the undrain, wait this long before reporting.
        settle_ms: u64,
    },
    /// The coordinator orders a target to make an app's previous release
    /// active again (out of load around it, as [`ControlRequest::Deliver`]
    /// says); answered when done.
    Rollback {
        /// The app.
        app: String,
        /// Drain for this many milliseconds before, undrain after.
        drain_ms: Option<u64>,
        /// After the undrain, wait this long before answering.
        settle_ms: u64,
    },
    /// The coordinator puts a target into load or drains it; a target
    /// whose load changed waits `wait_ms` before it answers, for its load
    /// balancer to see the change.
    SetLoad {
        /// In load (health 200) or drained (503).
        in_load: bool,
        /// After a change, wait this long before answering.
        wait_ms: u64,
    },
    /// A target tells the coordinator how a delivery ended.
    Delivered(DeliveryReport),
    /// An operator's CLI session proves that it acts for an operator key:
    /// the key and its signature of [`operator_proof_bytes`] for this
    /// session's peer id and the coordinator's.
    Operator {
        /// The operator's public key, libp2p protobuf encoding.
        #[serde(with = "serde_bytes_vec")]
        public_key: Vec<u8>,
        /// Its signature.
        #[serde(with = "serde_bytes_vec")]
        signature: Vec<u8>,
    },
    /// The coordinator orders a target that holds release `base` to stage
    /// a release whose manifest is sent as a delta against `base`'s: an
    /// upgrade's manifest repeats most of its base's chunk names. The
    /// target rebuilds the manifest and checks the signature over its id
    /// as for [`ControlRequest::Stage`]; if it cannot (no `base` here), it
    /// answers [`ControlResponse::Error`] and is sent the whole order.
    StageFrom(StageOrderDelta),
    /// The coordinator orders a target holding a patch's base release to
    /// stage the patch's target release, rebuilding the files the patch
    /// covers from their deltas where that moves fewer bytes. The patch's
    /// delta chunks are fetched as a transfer unit of their own, named by
    /// the patch id on the wire ([`patch_unit`]), so every target upgrading
    /// from the same base shares them. A target that cannot take the patch
    /// (no base here, a record it refuses) answers
    /// [`ControlResponse::Error`] and is sent the order without it.
    StagePatched(PatchedOrder),
    /// Operator: the patches into a release the origin holds, and whether
    /// it is still making them.
    Deltas {
        /// The release.
        release: ReleaseId,
    },
}

/// The origin's deltas into one release.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltasReport {
    /// The release.
    pub release: ReleaseId,
    /// Whether the origin is making (or is due to make) its deltas.
    pub pending: bool,
    /// The patches it holds into it.
    pub patches: Vec<PatchSummary>,
}

/// One patch, as [`DeltasReport`] lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchSummary {
    /// The release it starts from.
    pub base: ReleaseId,
    /// Its `app@version`, if the origin still names it.
    pub base_name: Option<String>,
    /// Files it rebuilds.
    pub files: u32,
    /// Bytes of its deltas (distinct chunks).
    pub delta_bytes: u64,
}

/// A [`StageOrder`] with a signed patch record from a release the target holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchedOrder {
    /// The order. With `manifest_is_delta`, its `manifest` is a delta
    /// against the patch's base's (as in [`StageOrderDelta`]).
    pub order: StageOrder,
    /// Whether the order's manifest is a delta.
    pub manifest_is_delta: bool,
    /// The encoded patch record.
    #[serde(with = "serde_bytes_vec")]
    pub patch: Vec<u8>,
    /// The coordinator's signature over [`signed_patch_bytes`] of its id.
    #[serde(with = "serde_bytes_vec")]
    pub patch_signature: Vec<u8>,
}

/// The bytes a coordinator signs for a patch record: a domain tag and the
/// record's id (BLAKE3 of its encoding).
pub fn signed_patch_bytes(patch: &convoy_chunker::PatchId) -> Vec<u8> {
    let mut out = b"convoy patch v1 ".to_vec();
    out.extend_from_slice(&patch.0);
    out
}

/// The name a patch's delta chunks travel under on the wire, where a
/// release id goes (`Get`, `Put`, `Bitfield`, have announcements): its
/// id. A patch record's encoding starts with its own magic, so no release
/// (BLAKE3 of a manifest) has the same name.
pub fn patch_unit(patch: &convoy_chunker::PatchId) -> ReleaseId {
    ReleaseId(patch.0)
}

/// A [`StageOrder`] whose manifest is a delta against another release's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageOrderDelta {
    /// The release whose encoded manifest the delta is made against.
    pub base: ReleaseId,
    /// The order, its `manifest` the delta (zstd, the base's encoded
    /// manifest as reference prefix).
    pub order: StageOrder,
}

/// Answers of [`CONTROL_PROTOCOL`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlResponse {
    /// Done.
    Ok,
    /// Registration accepted; heartbeat this often.
    Registered {
        /// Milliseconds between heartbeats.
        heartbeat_ms: u64,
    },
    /// The indices (into the query) of the chunks the origin lacks.
    Missing(Vec<u32>),
    /// Published: the release id.
    Published(ReleaseId),
    /// Staging started.
    StagingStarted {
        /// Its id.
        id: u64,
        /// The release.
        release: ReleaseId,
        /// The targets it goes to.
        targets: u32,
    },
    /// A staging's progress.
    Staging(StagingReport),
    /// The fleet.
    Fleet(Vec<FleetMember>),
    /// The request was understood and refused; the reason says why.
    Error(String),
    /// The requester has not proved fleet membership, or is not the
    /// coordinator and gave an order.
    Denied,
    /// The origin's deltas into a release.
    Deltas(DeltasReport),
}

/// A staging as the coordinator sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagingReport {
    /// Its id.
    pub id: u64,
    /// `app@version`.
    pub name: String,
    /// The release.
    pub release: ReleaseId,
    /// How.
    pub mode: DistributionMode,
    /// Distinct chunks in the release.
    pub chunks_total: u32,
    /// Stored bytes of the release's distinct chunks.
    pub release_bytes: u64,
    /// Milliseconds since it started.
    pub elapsed_ms: u64,
    /// Bytes of chunk bodies the origin has sent for it.
    pub origin_bytes_sent: u64,
    /// One entry per target.
    pub targets: Vec<TargetStaging>,
}

/// One target's part in a staging.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetStaging {
    /// Its peer id, as text.
    pub peer_id: String,
    /// Its labels.
    pub labels: Labels,
    /// What it last reported; `None` before its first report.
    pub progress: Option<StageProgress>,
    /// Whether it is connected and heartbeating.
    pub alive: bool,
}

/// A target as the coordinator sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetMember {
    /// Its peer id, as text.
    pub peer_id: String,
    /// Whether it is connected and heartbeating.
    pub alive: bool,
    /// Milliseconds since its last report.
    pub last_seen_ms: u64,
    /// Its last report.
    pub report: TargetReport,
}

/// Chunks of `release` the sender has newly stored: a frame of
/// [`HAVE_PROTOCOL`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// The release.
    pub release: ReleaseId,
    /// Their indices (at most [`MAX_HAVE_BATCH`]).
    pub chunks: Vec<u32>,
}

/// What an operator key signs to let one CLI session (`session`, its peer
/// id) act for it towards one coordinator: a domain tag and both ids.
pub fn operator_proof_bytes(session: &[u8], coordinator: &[u8]) -> Vec<u8> {
    let mut out = b"convoy operator session v1 ".to_vec();
    out.extend_from_slice(&(session.len() as u32).to_le_bytes());
    out.extend_from_slice(session);
    out.extend_from_slice(&(coordinator.len() as u32).to_le_bytes());
    out.extend_from_slice(coordinator);
    out
}

/// Proof that the sender of a [`Hello`] holds the fleet
/// key: a keyed BLAKE3 hash of a domain tag and both peer ids (which noise
/// has authenticated), so it cannot be replayed on another connection.
pub fn fleet_proof(fleet_key: &[u8; 32], sender: &[u8], receiver: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(fleet_key);
    h.update(b"convoy fleet hello v1");
    h.update(&(sender.len() as u32).to_le_bytes());
    h.update(sender);
    h.update(&(receiver.len() as u32).to_le_bytes());
    h.update(receiver);
    *h.finalize().as_bytes()
}

/// Why a frame could not be read.
fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn config<const LIMIT: usize>() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<LIMIT>()
}

/// Encodes one message as a frame body (no length prefix).
pub fn encode<T: Serialize, const LIMIT: usize>(value: &T) -> io::Result<Vec<u8>> {
    let body = bincode::serde::encode_to_vec(value, config::<LIMIT>())
        .map_err(|e| invalid(format!("cannot encode message: {e}")))?;
    if body.len() > LIMIT {
        return Err(invalid(format!(
            "message of {} bytes exceeds the limit of {LIMIT}",
            body.len()
        )));
    }
    Ok(body)
}

/// Decodes one frame body of at most `LIMIT` bytes, refusing trailing bytes.
/// A length inside the body can make the decoder allocate at most a small
/// multiple of the body ([`convoy_chunker::codec::decode_slice`]).
pub fn decode<T: DeserializeOwned, const LIMIT: usize>(body: &[u8]) -> io::Result<T> {
    if body.len() > LIMIT {
        return Err(invalid(format!(
            "message of {} bytes exceeds the limit of {LIMIT}",
            body.len()
        )));
    }
    let (value, read) = convoy_chunker::codec::decode_slice(body)
        .map_err(|e| invalid(format!("malformed message: {e}")))?;
    if read != body.len() {
        return Err(invalid(format!(
            "malformed message: {} trailing bytes",
            body.len() - read
        )));
    }
    Ok(value)
}

/// Reads one length-prefixed frame of at most `LIMIT` bytes.
pub async fn read_frame<T, R, const LIMIT: usize>(io: &mut R) -> io::Result<T>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin + Send,
{
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > LIMIT {
        return Err(invalid(format!(
            "message of {len} bytes exceeds the limit of {LIMIT}"
        )));
    }
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await?;
    decode::<T, LIMIT>(&body)
}

/// Encodes one message as a whole frame: the length, then the body.
pub fn encode_frame<T: Serialize, const LIMIT: usize>(value: &T) -> io::Result<Vec<u8>> {
    let mut frame = vec![0u8; 4];
    bincode::serde::encode_into_std_write(value, &mut frame, config::<LIMIT>())
        .map_err(|e| invalid(format!("cannot encode message: {e}")))?;
    let len = frame.len() - 4;
    if len > LIMIT {
        return Err(invalid(format!(
            "message of {len} bytes exceeds the limit of {LIMIT}"
        )));
    }
    frame[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(frame)
}

/// Writes one length-prefixed frame in one write; the stream stays open.
pub async fn write_frame<T, W, const LIMIT: usize>(io: &mut W, value: &T) -> io::Result<()>
where
    T: Serialize,
    W: AsyncWrite + Unpin + Send,
{
    io.write_all(&encode_frame::<T, LIMIT>(value)?).await
}

/// Byte vectors as one bincode length and the raw bytes (serde's default
/// for `Vec<u8>` is a sequence, which bincode also writes compactly; this
/// keeps the intent visible and the encoding pinned).
mod serde_bytes_vec {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_byte_buf(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame<T: Serialize, const LIMIT: usize>(v: &T) -> Vec<u8> {
        let body = encode::<T, LIMIT>(v).unwrap();
        let mut out = (body.len() as u32).to_le_bytes().to_vec();
        out.extend(body);
        assert_eq!(out, encode_frame::<T, LIMIT>(v).unwrap());
        out
    }

    /// Pins the encoding of a chunk request: a change here is a protocol
    /// version change.
    #[test]
    fn golden_get_request() {
        let req = ChunkRequest::Get {
            release: ReleaseId([7; 32]),
            indices: vec![300, 2],
        };
        let bytes = frame::<_, MAX_CHUNK_FRAME>(&req);
        let mut expected = vec![38, 0, 0, 0, 0];
        expected.extend([7; 32]);
        expected.extend([2, 251, 44, 1, 2]);
        assert_eq!(bytes, expected);
    }

    #[test]
    fn golden_chunk_response() {
        let resp = ChunkResponse::Chunks(vec![
            Some(WireChunk {
                encoding: 1,
                bytes: vec![1, 2, 3],
            }),
            None,
        ]);
        assert_eq!(
            frame::<_, MAX_CHUNK_FRAME>(&resp),
            vec![9, 0, 0, 0, 0, 2, 1, 1, 3, 1, 2, 3, 0]
        );
    }

    #[test]
    fn golden_announcement() {
        let a = Announcement {
            release: ReleaseId([5; 32]),
            chunks: vec![1, 300],
        };
        let mut expected = vec![37, 0, 0, 0];
        expected.extend([5; 32]);
        expected.extend([2, 1, 251, 44, 1]);
        assert_eq!(frame::<_, MAX_HAVE_FRAME>(&a), expected);
    }

    #[test]
    fn the_largest_announcement_fits_its_frame() {
        let a = Announcement {
            release: ReleaseId([5; 32]),
            chunks: vec![u32::MAX; MAX_HAVE_BATCH],
        };
        assert!(encode_frame::<_, MAX_HAVE_FRAME>(&a).is_ok());
    }

    #[test]
    fn golden_hello() {
        let bytes = frame::<_, MAX_HELLO_FRAME>(&Hello { proof: [9; 32] });
        assert_eq!(&bytes[..4], &[32, 0, 0, 0]);
        assert_eq!(&bytes[4..], &[9; 32]);
        let bytes = frame::<_, MAX_HELLO_FRAME>(&Welcome::Member { proof: [8; 32] });
        assert_eq!(&bytes[..5], &[33, 0, 0, 0, 0]);
        assert_eq!(&bytes[5..], &[8; 32]);
        assert!(bytes.len() <= MAX_HELLO_FRAME);
    }

    fn sample_bitfield() -> ControlRequest {
        ControlRequest::Bitfield {
            release: ReleaseId([3; 32]),
            len: 9,
            bits: vec![0xff, 1],
            place: Place {
                dc: "ams".into(),
                zone: "a".into(),
            },
        }
    }

    #[test]
    fn a_place_is_kept_only_within_a_labels_length() {
        let mut p = Place::of(&Labels::from([("dc".into(), "a".repeat(MAX_LABEL_BYTES))]));
        assert!(p.within_limits());
        p.zone = "z".repeat(MAX_LABEL_BYTES + 1);
        assert!(!p.within_limits());
    }

    /// Pins a have-set (control/5 added the sender's place).
    #[test]
    fn golden_bitfield() {
        let bytes = frame::<_, MAX_CONTROL_FRAME>(&sample_bitfield());
        let variant = bytes[4];
        assert_eq!(&bytes[5..37], &[3; 32]);
        // len 9; two bytes of bits; "ams"; "a".
        assert_eq!(&bytes[37..], &[9, 2, 0xff, 1, 3, b'a', b'm', b's', 1, b'a']);
        assert_eq!(bytes[..4], ((bytes.len() - 4) as u32).to_le_bytes());
        assert_eq!(variant, 3, "Bitfield is the fourth control request");
    }

    /// Pins a target's progress report (control/4 added its finishing
    /// time): a change here is a protocol version change.
    #[test]
    fn golden_stage_progress() {
        let p = StageProgress {
            release: ReleaseId([3; 32]),
            chunks_held: 2,
            chunks_total: 300,
            bytes_received: 7,
            bytes_received_cross_dc: 0,
            elapsed_ms: 1,
            finished_unix_ms: Some(1000),
            state: StageState::Staged,
        };
        let mut expected = vec![44, 0, 0, 0];
        expected.extend([3; 32]);
        // Varints: 2, 300, 7, 0, 1; Some(1000); the second variant.
        expected.extend([2, 251, 44, 1, 7, 0, 1, 1, 251, 232, 3, 1]);
        assert_eq!(frame::<_, MAX_CONTROL_FRAME>(&p), expected);
        let running = StageProgress {
            finished_unix_ms: None,
            state: StageState::Running,
            ..p
        };
        assert_eq!(
            &frame::<_, MAX_CONTROL_FRAME>(&running)[36..],
            &[2, 251, 44, 1, 7, 0, 1, 0, 0]
        );
    }

    #[test]
    fn every_control_message_round_trips() {
        let order = StageOrder {
            manifest: vec![1, 2, 3],
            signature: vec![4; 64],
            mode: DistributionMode::Swarm,
            origin_labels: Labels::new(),
        };
        let progress = StageProgress {
            release: ReleaseId([1; 32]),
            chunks_held: 3,
            chunks_total: 9,
            bytes_received: 1 << 40,
            bytes_received_cross_dc: 5,
            elapsed_ms: 12,
            finished_unix_ms: Some(1_700_000_000_123),
            state: StageState::Failed("disk full".into()),
        };
        let report = TargetReport {
            labels: [("dc".to_string(), "eu1".to_string())].into(),
            addrs: vec!["/ip4/127.0.0.1/tcp/1".into()],
            releases: vec![ReleaseId([2; 32])],
            stagings: vec![progress],
            bytes_sent: 1,
            bytes_received: 2,
            wire_bytes_sent: 3,
            wire_bytes_received: 4,
            active: [("web".to_string(), "1.2".to_string())].into(),
            in_load: false,
            health: Some("127.0.0.1:7480".into()),
        };
        let reqs = vec![
            ControlRequest::Report(report),
            ControlRequest::StageFrom(StageOrderDelta {
                base: ReleaseId([3; 32]),
                order: order.clone(),
            }),
            ControlRequest::StagePatched(PatchedOrder {
                order: order.clone(),
                manifest_is_delta: true,
                patch: vec![5; 40],
                patch_signature: vec![6; 64],
            }),
            ControlRequest::Stage(order),
            sample_bitfield(),
            ControlRequest::StartStaging {
                release: "web@1".into(),
                selector: Labels::new(),
                mode: DistributionMode::Pull,
            },
            ControlRequest::Deliver {
                release: ReleaseId([4; 32]),
                drain_ms: Some(1500),
                settle_ms: 400,
            },
            ControlRequest::Rollback {
                app: "web".into(),
                drain_ms: None,
                settle_ms: 0,
            },
            ControlRequest::SetLoad {
                in_load: false,
                wait_ms: 400,
            },
            ControlRequest::Delivered(DeliveryReport {
                release: ReleaseId([5; 32]),
                result: Err("validate failed".into()),
                switch_us: 0,
                total_ms: 7,
            }),
        ];
        for r in reqs {
            let body = encode::<_, MAX_CONTROL_FRAME>(&r).unwrap();
            let back: ControlRequest = decode::<_, MAX_CONTROL_FRAME>(&body).unwrap();
            assert_eq!(back, r);
        }
    }

    #[test]
    fn oversized_frame_is_refused_before_reading_the_body() {
        let mut bytes = ((MAX_CHUNK_FRAME + 1) as u32).to_le_bytes().to_vec();
        bytes.extend([0u8; 16]);
        let mut io = futures::io::Cursor::new(bytes);
        let err =
            futures::executor::block_on(read_frame::<ChunkRequest, _, MAX_CHUNK_FRAME>(&mut io))
                .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("exceeds the limit"), "{err}");
    }

    #[test]
    fn a_length_inside_the_body_over_the_limit_is_refused() {
        // A Put whose chunk claims 2^31 bytes in a small frame.
        let mut body = vec![1u8];
        body.extend([0; 32]);
        body.push(0);
        body.push(0);
        body.push(252);
        body.extend(0x8000_0000u32.to_le_bytes());
        assert!(decode::<ChunkRequest, MAX_CHUNK_FRAME>(&body).is_err());
    }

    #[test]
    fn malformed_and_trailing_bytes_are_refused() {
        assert!(decode::<ChunkRequest, MAX_CHUNK_FRAME>(&[9, 9, 9]).is_err());
        let mut body = encode::<_, MAX_CHUNK_FRAME>(&ChunkResponse::Busy { retry_ms: 5 }).unwrap();
        body.push(0);
        let err = decode::<ChunkResponse, MAX_CHUNK_FRAME>(&body).unwrap_err();
        assert!(err.to_string().contains("trailing"), "{err}");
    }

    #[test]
    fn fleet_proof_depends_on_key_and_direction() {
        let k = [1; 32];
        let a = fleet_proof(&k, b"alice", b"bob");
        assert_ne!(a, fleet_proof(&k, b"bob", b"alice"));
        assert_ne!(a, fleet_proof(&[2; 32], b"alice", b"bob"));
        assert_eq!(a, fleet_proof(&k, b"alice", b"bob"));
    }
}
