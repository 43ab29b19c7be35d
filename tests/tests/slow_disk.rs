//! A daemon whose disk hangs keeps serving its fleet: a target that
//! accepts an order, reads the manifest of a release it is told to
//! deliver, or of one a peer asks chunks of, goes on heartbeating (the
//! coordinator would otherwise mark it down); a coordinator that looks up
//! an operator's chunks, publishes, or records a roll-out's events goes on
//! answering its targets and operators. What needs the disk runs off their
//! event loops.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use convoy_chunker::{ChunkHash, ChunkRef, Encoding, Manifest, Patch, ReleaseId, StoredChunk};
use convoy_daemon::coordinator::api::{Answer, ApiError, Call, DeployRequest, Op, PromoteRequest};
use convoy_daemon::coordinator::operators::Operators;
use convoy_daemon::coordinator::{self, CoordinatorConfig};
use convoy_daemon::net::client::Client;
use convoy_daemon::net::serve::Chunks;
use convoy_daemon::net::{self, NetConfig, NetEvent};
use convoy_daemon::pipeline::Pipelines;
use convoy_daemon::protocol::{
    signed_bytes, ChunkRequest, ChunkResponse, ControlRequest, ControlResponse, DistributionMode,
    Labels, StageOrder, StageProgress, StageState, TargetReport, WireChunk,
};
use convoy_daemon::store::{
    ChunkInfo, Ingest, MemoryStore, Release, Store, StoreError, StoreSource,
};
use convoy_daemon::target::deliver::Releases;
use convoy_daemon::target::health::Load;
use convoy_daemon::target::{self, TargetConfig};
use convoy_daemon::transfer::crowd::Wait;
use convoy_tests::cutfs::CutFs;
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::mpsc;

/// Shut: whoever passes waits until it opens.
#[derive(Default)]
struct Gate {
    /// Shut, and how many wait at it.
    state: Mutex<(bool, usize)>,
    changed: Condvar,
}

impl Gate {
    fn pass(&self) {
        let mut s = self.state.lock().unwrap();
        if s.0 {
            s.1 += 1;
            self.changed.notify_all();
            s = self.changed.wait_while(s, |s| s.0).unwrap();
            s.1 -= 1;
        }
    }

    fn shut(&self) {
        self.state.lock().unwrap().0 = true;
    }

    fn open(&self) {
        self.state.lock().unwrap().0 = false;
        self.changed.notify_all();
    }

    /// Waits (at most 20 s) until `n` wait at the gate; false if they
    /// did not.
    fn waiting(&self, n: usize) -> bool {
        let s = self.state.lock().unwrap();
        let limit = Duration::from_secs(20);
        let (s, _) = self
            .changed
            .wait_timeout_while(s, limit, |s| s.1 < n)
            .unwrap();
        s.1 >= n
    }
}

/// Opens the gate when dropped: a failing test does not leave blocking
/// threads waiting at it, which would keep its runtime from shutting down.
struct OpensOnDrop(Arc<Gate>);

impl Drop for OpensOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// Shuts the gate, starts `ask` and waits until `n` wait at the gate;
/// the caller checks what goes on meanwhile, opens the gate and takes
/// the outcome of `ask`.
async fn hang<T: Send + 'static>(
    gate: &Arc<Gate>,
    n: usize,
    ask: impl std::future::Future<Output = T> + Send + 'static,
) -> tokio::task::JoinHandle<T> {
    gate.shut();
    let asking = tokio::spawn(ask);
    let gate = gate.clone();
    let waits = tokio::task::spawn_blocking(move || gate.waiting(n));
    assert!(waits.await.unwrap(), "the request never reached the store");
    asking
}

/// Whether three heartbeats come (in 20 s at most) from now on.
async fn three_heartbeats(reports: &mut mpsc::UnboundedReceiver<TargetReport>) -> bool {
    while reports.try_recv().is_ok() {}
    let heartbeats = async {
        for _ in 0..3 {
            reports.recv().await.expect("reports");
        }
    };
    tokio::time::timeout(Duration::from_secs(20), heartbeats)
        .await
        .is_ok()
}

/// A memory store whose chunk and release reads and writes hang while
/// `gate` is shut, whose record appends hang while `records` is, and whose
/// syncs hang while `flushes` is, as a disk that stops answering.
struct Hanging {
    inner: MemoryStore,
    gate: Arc<Gate>,
    records: Arc<Gate>,
    flushes: Arc<Gate>,
}

impl Hanging {
    fn new(gate: &Arc<Gate>) -> Self {
        Self {
            inner: MemoryStore::new(),
            gate: gate.clone(),
            records: Default::default(),
            flushes: Default::default(),
        }
    }
}

impl Store for Hanging {
    fn put_chunks(&self, chunks: &[(ChunkRef, StoredChunk)]) -> Result<(), StoreError> {
        self.gate.pass();
        self.inner.put_chunks(chunks)
    }
    fn get_chunk(&self, hash: &ChunkHash) -> Result<Option<StoredChunk>, StoreError> {
        self.inner.get_chunk(hash)
    }
    fn chunk_info(&self, hashes: &[ChunkHash]) -> Result<Vec<Option<ChunkInfo>>, StoreError> {
        self.gate.pass();
        self.inner.chunk_info(hashes)
    }
    fn chunk_hashes(&self) -> Result<Vec<ChunkHash>, StoreError> {
        self.inner.chunk_hashes()
    }
    fn delete_chunks(&self, hashes: &[ChunkHash]) -> Result<(), StoreError> {
        self.inner.delete_chunks(hashes)
    }
    fn flush(&self) -> Result<(), StoreError> {
        self.flushes.pass();
        self.inner.flush()
    }
    fn put_release(&self, manifest: &Manifest) -> Result<ReleaseId, StoreError> {
        self.inner.put_release(manifest)
    }
    fn get_manifest(&self, id: &ReleaseId) -> Result<Option<Manifest>, StoreError> {
        self.gate.pass();
        self.inner.get_manifest(id)
    }
    fn resolve(&self, app: &str, version: &str) -> Result<Option<ReleaseId>, StoreError> {
        self.inner.resolve(app, version)
    }
    fn releases(&self) -> Result<Vec<Release>, StoreError> {
        self.inner.releases()
    }
    fn delete_release(&self, app: &str, version: &str) -> Result<(), StoreError> {
        self.inner.delete_release(app, version)
    }
    fn put_patch(&self, patch: &Patch) -> Result<(), StoreError> {
        self.inner.put_patch(patch)
    }
    fn patches_to(&self, target: &ReleaseId) -> Result<Vec<Patch>, StoreError> {
        self.gate.pass();
        self.inner.patches_to(target)
    }
    fn patch_ends(&self) -> Result<Vec<(ReleaseId, ReleaseId)>, StoreError> {
        self.inner.patch_ends()
    }
    fn delete_patch(&self, base: &ReleaseId, target: &ReleaseId) -> Result<(), StoreError> {
        self.inner.delete_patch(base, target)
    }
    fn compact(&self) -> Result<(), StoreError> {
        self.inner.compact()
    }
    fn append_record(&self, log: &str, record: &[u8]) -> Result<u64, StoreError> {
        self.records.pass();
        self.inner.append_record(log, record)
    }
    fn records(&self, log: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        self.inner.records(log)
    }
    fn logs(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.inner.logs(prefix)
    }
}

fn loopback(keypair: Keypair, fleet_key: [u8; 32]) -> NetConfig {
    NetConfig {
        keypair,
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        fleet_key,
        request_timeout: Duration::from_secs(30),
        admission_timeout: net::ADMISSION_TIMEOUT,
        security: net::Security::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_whose_disk_hangs_under_its_orders_keeps_heartbeating() {
    let fleet_key = [6u8; 32];
    let dir = tempfile::tempdir().unwrap();

    // A coordinator of our own: answers reports, counts them.
    let coordinator_key = Keypair::generate_ed25519();
    let (coordinator, mut events) =
        net::start(loopback(coordinator_key.clone(), fleet_key)).unwrap();
    let addr = loop {
        if let Some(NetEvent::Listening(a)) = events.recv().await {
            break a;
        }
    };
    let (reports_tx, mut reports) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            if let NetEvent::Control { request, reply, .. } = event {
                if let ControlRequest::Report(report) = request {
                    let _ = reports_tx.send(report);
                    reply
                        .send(ControlResponse::Registered { heartbeat_ms: 50 })
                        .await;
                } else {
                    reply.send(ControlResponse::Ok).await;
                }
            }
        }
    });

    // The target, on a store whose lookups may hang, that holds a
    // release it has not read since it started.
    let gate = Arc::new(Gate::default());
    let _opens = OpensOnDrop(gate.clone());
    let store = Hanging::new(&gate);
    let flushes = store.flushes.clone();
    let _opens_flushes = OpensOnDrop(flushes.clone());
    let older = Manifest::new("web", "0", vec![]).unwrap();
    let older_id = store.inner.put_release(&older).unwrap();
    let chunks = Chunks::new(Arc::new(store), None, None);
    let target_key = Keypair::generate_ed25519();
    let target_id = target_key.public().to_peer_id();
    let (target_net, target_events) = net::start(loopback(target_key, fleet_key)).unwrap();
    let config = TargetConfig {
        coordinator: coordinator.peer_id(),
        coordinator_addrs: vec![addr],
        listening: Vec::new(),
        labels: Labels::new(),
        data_dir: dir.path().to_path_buf(),
        releases: Arc::new(
            Releases::open(&dir.path().join("releases"), 5, Duration::from_secs(60)).unwrap(),
        ),
        load: Arc::new(Load::open(&dir.path().join("load")).unwrap()),
        health_addr: None,
        gc_every: None,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(target::run(
        config,
        chunks,
        target_net,
        target_events,
        async {
            let _ = stopped.await;
        },
    ));

    let test = async {
        reports.recv().await.expect("the target registers");
        // Its disk hangs as the order comes.
        let manifest = Manifest::new("web", "1", vec![]).unwrap();
        let release = manifest.release_id();
        let order = StageOrder {
            signature: coordinator_key.sign(&signed_bytes(&release)).unwrap(),
            manifest: manifest.encode(),
            mode: DistributionMode::Pull,
            origin_labels: Labels::new(),
        };
        let ordering = hang(&gate, 1, {
            let coordinator = coordinator.clone();
            async move {
                let order = ControlRequest::Stage(order);
                coordinator.control(target_id, order).await
            }
        })
        .await;
        let went_on = three_heartbeats(&mut reports).await;
        gate.open();
        assert!(went_on, "no heartbeat while the disk hung under an order");
        assert_eq!(ordering.await.unwrap(), Ok(ControlResponse::Ok));
        // Staged: then told to deliver it, as its disk hangs again.
        loop {
            let report = reports.recv().await.expect("reports");
            let staged = |s: &StageProgress| s.release == release && s.state == StageState::Staged;
            if report.stagings.iter().any(staged) {
                break;
            }
        }
        let delivering = hang(&gate, 1, {
            let coordinator = coordinator.clone();
            async move {
                let deliver = ControlRequest::Deliver {
                    release,
                    drain_ms: None,
                    settle_ms: 0,
                };
                coordinator.control(target_id, deliver).await
            }
        })
        .await;
        let went_on = three_heartbeats(&mut reports).await;
        gate.open();
        assert!(went_on, "no heartbeat while the disk hung under a delivery");
        assert_eq!(delivering.await.unwrap(), Ok(ControlResponse::Ok));
        // A peer asks for chunks of the release not read yet.
        let asking = hang(&gate, 1, {
            let coordinator = coordinator.clone();
            async move {
                let get = ChunkRequest::Get {
                    release: older_id,
                    indices: vec![0],
                };
                coordinator.chunk(target_id, get).await
            }
        })
        .await;
        let went_on = three_heartbeats(&mut reports).await;
        gate.open();
        assert!(
            went_on,
            "no heartbeat while the disk hung under a chunk request"
        );
        let answer = asking.await.unwrap().unwrap();
        assert!(matches!(answer, ChunkResponse::Busy { .. }), "{answer:?}");
        // A pushed chunk is synced within a second: the sync hangs, the
        // target heartbeats.
        let bytes = b"the one chunk of web@2".to_vec();
        let chunk = ChunkRef {
            hash: ChunkHash::of(&bytes),
            len: bytes.len() as u32,
        };
        let file = convoy_chunker::Entry {
            path: "index.html".into(),
            kind: convoy_chunker::EntryKind::File {
                mode: 0o644,
                size: bytes.len() as u64,
                chunks: vec![chunk],
            },
        };
        let manifest = Manifest::new("web", "2", vec![file]).unwrap();
        let release = manifest.release_id();
        let order = ControlRequest::Stage(StageOrder {
            signature: coordinator_key.sign(&signed_bytes(&release)).unwrap(),
            manifest: manifest.encode(),
            mode: DistributionMode::Push,
            origin_labels: Labels::new(),
        });
        assert_eq!(
            coordinator.control(target_id, order).await,
            Ok(ControlResponse::Ok)
        );
        flushes.shut();
        let put = ChunkRequest::Put {
            release,
            index: 0,
            chunk: WireChunk {
                encoding: Encoding::Raw.flag(),
                bytes,
            },
        };
        let pushed = coordinator.chunk(target_id, put).await;
        assert!(matches!(pushed, Ok(ChunkResponse::Stored)), "{pushed:?}");
        let waits = tokio::task::spawn_blocking({
            let flushes = flushes.clone();
            move || flushes.waiting(1)
        });
        assert!(waits.await.unwrap(), "the pushed chunk was never synced");
        let went_on = three_heartbeats(&mut reports).await;
        flushes.open();
        assert!(went_on, "no heartbeat while a sync hung");
    };
    tokio::time::timeout(Duration::from_secs(90), test)
        .await
        .expect("bounded");
    let _ = stop.send(());
    running.await.unwrap().unwrap();
    coordinator.shutdown().await;
}

/// A report as a target with nothing sends it.
/// A coordinator running in this process.
struct Started {
    id: PeerId,
    addr: Multiaddr,
    calls: mpsc::Sender<Call>,
    stop: tokio::sync::oneshot::Sender<()>,
    running: tokio::task::JoinHandle<()>,
}

impl Started {
    /// Starts a coordinator on `store` with its data in `dir`.
    async fn coordinator(
        store: Hanging,
        dir: &std::path::Path,
        fleet_key: [u8; 32],
        operators: Operators,
        pipelines: Pipelines,
    ) -> Self {
        let chunks = Chunks::new(Arc::new(store), None, None);
        let keypair = Keypair::generate_ed25519();
        let id = keypair.public().to_peer_id();
        let (net, mut events) = net::start(loopback(keypair.clone(), fleet_key)).unwrap();
        let addr = loop {
            if let Some(NetEvent::Listening(a)) = events.recv().await {
                break a;
            }
        };
        let config = CoordinatorConfig {
            keypair,
            data_dir: dir.to_path_buf(),
            labels: Labels::new(),
            push_parallel: 4,
            swarm_degree: 4,
            heartbeat: Duration::from_millis(50),
            max_reports_per_second: 1000,
            pipelines,
            operators,
            refusals: Default::default(),
            retain: 10,
            gc_every: None,
            delta_bases: 0,
        };
        let (calls, calls_rx) = mpsc::channel(16);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            coordinator::run(config, chunks, net, events, calls_rx, shutdown)
                .await
                .expect("the coordinator stops cleanly");
        });
        Self {
            id,
            addr,
            calls,
            stop,
            running,
        }
    }

    /// Asks the operator API, as an HTTP request would.
    async fn call(&self, op: Op) -> Result<Answer, ApiError> {
        ask(self.calls.clone(), op).await
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.running.await.unwrap();
    }
}

/// Asks the operator API of the coordinator that takes `calls`.
async fn ask(calls: mpsc::Sender<Call>, op: Op) -> Result<Answer, ApiError> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let by = "token test from 127.0.0.1".to_string();
    calls.send(Call { op, by, reply }).await.unwrap();
    answer.await.unwrap()
}

fn empty_report() -> TargetReport {
    TargetReport {
        labels: Labels::new(),
        addrs: Vec::new(),
        releases: Vec::new(),
        stagings: Vec::new(),
        bytes_sent: 0,
        bytes_received: 0,
        wire_bytes_sent: 0,
        wire_bytes_received: 0,
        active: Default::default(),
        in_load: true,
        health: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_whose_disk_hangs_under_an_operator_keeps_answering_targets() {
    let fleet_key = [7u8; 32];
    let dir = tempfile::tempdir().unwrap();
    let operator_key = Keypair::generate_ed25519();
    let operators =
        Operators::parse(&format!("alice {}", operator_key.public().to_peer_id())).unwrap();

    // The coordinator, on a store whose lookups and syncs may hang.
    let gate = Arc::new(Gate::default());
    let _opens = OpensOnDrop(gate.clone());
    let store = Hanging::new(&gate);
    let flushes = store.flushes.clone();
    let _opens_flushes = OpensOnDrop(flushes.clone());
    let c = Started::coordinator(store, dir.path(), fleet_key, operators, Default::default()).await;
    let (coordinator_id, addr) = (c.id, c.addr.clone());

    // A target, a member of the fleet.
    let (target, mut target_events) =
        net::start(loopback(Keypair::generate_ed25519(), fleet_key)).unwrap();
    tokio::spawn(async move { while target_events.recv().await.is_some() {} });
    target
        .add_addresses(coordinator_id, vec![addr.clone()])
        .await;

    let test = async {
        let report = ControlRequest::Report(empty_report());
        let registered = target.control(coordinator_id, report.clone()).await;
        assert!(
            matches!(registered, Ok(ControlResponse::Registered { .. })),
            "{registered:?}"
        );
        // An operator's session, as the CLI opens it.
        let at = format!("{addr}/p2p/{coordinator_id}");
        let session = Arc::new(Client::connect(&at, fleet_key, operator_key).await.unwrap());
        for request in [
            ControlRequest::MissingChunks(vec![ChunkHash::of(b"a chunk")]),
            ControlRequest::Publish {
                manifest: Manifest::new("web", "1", vec![]).unwrap().encode(),
            },
            // A staging's start reads the release's manifest.
            ControlRequest::StartStaging {
                release: "web@1".into(),
                selector: Labels::new(),
                mode: DistributionMode::Pull,
            },
        ] {
            let asking = hang(&gate, 1, {
                let session = session.clone();
                async move { session.control(request).await }
            })
            .await;
            // The disk hangs under the operator; the target is answered.
            let answered = tokio::time::timeout(
                Duration::from_secs(20),
                target.control(coordinator_id, report.clone()),
            )
            .await;
            gate.open();
            assert!(
                matches!(answered, Ok(Ok(ControlResponse::Registered { .. }))),
                "a target's report was not answered while the disk hung: {answered:?}"
            );
            let answer = asking.await.unwrap().unwrap();
            assert!(
                matches!(
                    answer,
                    ControlResponse::Missing(_)
                        | ControlResponse::Published(_)
                        | ControlResponse::StagingStarted { .. }
                ),
                "{answer:?}"
            );
        }
        // Uploads: 32 at once are stored, the 33rd is answered busy while
        // they are (their writes hang), and nothing waits for a slot.
        let (answers_tx, mut answers) = mpsc::unbounded_channel();
        let uploading = hang(&gate, 32, {
            let session = session.clone();
            async move {
                let uploads = (0..33u32).map(|i| {
                    let (session, answers) = (session.clone(), answers_tx.clone());
                    async move {
                        let bytes = format!("chunk {i}").into_bytes();
                        let upload = ChunkRequest::Upload {
                            hash: ChunkHash::of(&bytes),
                            len: bytes.len() as u32,
                            chunk: WireChunk {
                                encoding: Encoding::Raw.flag(),
                                bytes,
                            },
                        };
                        let _ = answers.send(session.chunk(upload).await);
                    }
                });
                futures::future::join_all(uploads).await;
            }
        })
        .await;
        let first = tokio::time::timeout(Duration::from_secs(20), answers.recv()).await;
        gate.open();
        assert!(
            matches!(first, Ok(Some(Ok(ChunkResponse::Busy { .. })))),
            "the 33rd upload at once: {first:?}"
        );
        uploading.await.unwrap();
        for _ in 0..32 {
            assert_eq!(answers.recv().await, Some(Ok(ChunkResponse::Stored)));
        }
        // The uploads are synced within a second: the sync hangs, the
        // target is answered.
        flushes.shut();
        let waits = tokio::task::spawn_blocking({
            let flushes = flushes.clone();
            move || flushes.waiting(1)
        });
        assert!(waits.await.unwrap(), "the uploads were never synced");
        let answered = tokio::time::timeout(
            Duration::from_secs(20),
            target.control(coordinator_id, report.clone()),
        )
        .await;
        flushes.open();
        assert!(
            matches!(answered, Ok(Ok(ControlResponse::Registered { .. }))),
            "a target's report was not answered while a sync hung: {answered:?}"
        );
    };
    tokio::time::timeout(Duration::from_secs(120), test)
        .await
        .expect("bounded");
    c.stop().await;
}

const PRODUCTION: &str = r#"
[environments.production]
selector = "env=production"

[apps.web]
pipeline = ["production"]

[apps.web.rollout]
strategy = "live"
waves = "100%"
mode = "push"
"#;

/// Target `target`'s state in roll-out `id`, as `convoy status` shows it.
async fn state_in(c: &Started, id: u64, target: &str) -> serde_json::Value {
    match c.call(Op::Status(id)).await {
        Ok(Answer::Json(_, v)) => v["target_states"][target]["state"].clone(),
        other => panic!("status of deployment {id}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_whose_disk_hangs_under_a_roll_out_keeps_answering_targets() {
    let fleet_key = [8u8; 32];
    let dir = tempfile::tempdir().unwrap();
    let operator_key = Keypair::generate_ed25519();
    let operators =
        Operators::parse(&format!("alice {}", operator_key.public().to_peer_id())).unwrap();
    let gate = Arc::new(Gate::default());
    let store = Hanging::new(&gate);
    let records = store.records.clone();
    let _opens = OpensOnDrop(records.clone());
    let pipelines = Pipelines::parse(PRODUCTION).unwrap();
    let c = Started::coordinator(store, dir.path(), fleet_key, operators, pipelines).await;

    // A production target.
    let target_key = Keypair::generate_ed25519();
    let target_id = target_key.public().to_peer_id().to_string();
    let (target, mut target_events) = net::start(loopback(target_key, fleet_key)).unwrap();
    tokio::spawn(async move { while target_events.recv().await.is_some() {} });
    target.add_addresses(c.id, vec![c.addr.clone()]).await;

    let test = async {
        let mut report = empty_report();
        report.labels.insert("env".into(), "production".into());
        let registered = target
            .control(c.id, ControlRequest::Report(report.clone()))
            .await;
        assert!(
            matches!(registered, Ok(ControlResponse::Registered { .. })),
            "{registered:?}"
        );
        // web@1, published and deployed.
        let at = format!("{}/p2p/{}", c.addr, c.id);
        let session = Client::connect(&at, fleet_key, operator_key).await.unwrap();
        let manifest = Manifest::new("web", "1", vec![]).unwrap().encode();
        let published = session.control(ControlRequest::Publish { manifest }).await;
        let Ok(ControlResponse::Published(release)) = published else {
            panic!("{published:?}");
        };
        let deploy = DeployRequest {
            release: "web@1".into(),
            env: "production".into(),
            strategy: None,
            waves: None,
            mode: None,
            max_failures: None,
            drain_seconds: None,
            progress_deadline_seconds: None,
        };
        // The disk hangs under the record of a promotion: the target is
        // answered; the operator is once the promotion is written.
        let promote = PromoteRequest {
            release: "web@1".into(),
            env: "production".into(),
            force: true,
        };
        let promoting = hang(&records, 1, ask(c.calls.clone(), Op::Promote(promote))).await;
        let answered = tokio::time::timeout(
            Duration::from_secs(20),
            target.control(c.id, ControlRequest::Report(report.clone())),
        )
        .await;
        records.open();
        assert!(
            matches!(answered, Ok(Ok(ControlResponse::Registered { .. }))),
            "a target's report was not answered while the disk hung: {answered:?}"
        );
        let promoted = promoting.await.unwrap();
        assert!(matches!(promoted, Ok(Answer::Json(..))), "{promoted:?}");
        // Its history line is written (through the same queue) before the
        // disk hangs again.
        let mut written = false;
        for _ in 0..400 {
            match c.call(Op::History("web".into())).await {
                Ok(Answer::Json(_, v)) if v["history"].to_string().contains("\"promote\"") => {
                    written = true;
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        assert!(written, "the promotion's history line was never written");
        // The disk hangs under the record that opens the roll-out: the
        // loop answers the target, and refuses a second roll-out of web to
        // production meanwhile.
        let deploying = hang(
            &records,
            1,
            ask(c.calls.clone(), Op::Deploy(deploy.clone())),
        )
        .await;
        let answered = tokio::time::timeout(
            Duration::from_secs(20),
            target.control(c.id, ControlRequest::Report(report.clone())),
        )
        .await;
        let second = tokio::time::timeout(Duration::from_secs(20), c.call(Op::Deploy(deploy)));
        let second = second.await;
        records.open();
        assert!(
            matches!(answered, Ok(Ok(ControlResponse::Registered { .. }))),
            "a target's report was not answered while the disk hung: {answered:?}"
        );
        match second.expect("a second deploy was not answered while the disk hung") {
            Err(e) => assert!(e.message.contains("being started"), "{}", e.message),
            Ok(a) => panic!("a second roll-out of web to production started: {a:?}"),
        }
        let id = match deploying.await.unwrap() {
            Ok(Answer::Json(_, v)) => v["id"].as_u64().expect("an id"),
            other => panic!("deploy: {other:?}"),
        };
        assert_eq!(state_in(&c, id, &target_id).await, "Staging");

        // The target reports it holds the release; the disk hangs under
        // the roll-out's record of that.
        report.releases = vec![release];
        let staged = hang(&records, 1, {
            let (target, report) = (target.clone(), report.clone());
            async move { target.control(c.id, ControlRequest::Report(report)).await }
        })
        .await;
        // The loop goes on: it answers the operator, and the event is not
        // applied before it is written...
        let state = tokio::time::timeout(Duration::from_secs(20), state_in(&c, id, &target_id));
        let state = state.await;
        // ...and it answers the target's heartbeats.
        let answered = tokio::time::timeout(
            Duration::from_secs(20),
            target.control(c.id, ControlRequest::Report(report.clone())),
        )
        .await;
        records.open();
        assert_eq!(
            state.expect("the status was not answered while the disk hung"),
            "Staging"
        );
        assert!(
            matches!(answered, Ok(Ok(ControlResponse::Registered { .. }))),
            "a target's report was not answered while the disk hung: {answered:?}"
        );
        assert!(matches!(
            staged.await.unwrap(),
            Ok(ControlResponse::Registered { .. })
        ));
        // Written, the event is applied: the roll-out goes on.
        for _ in 0..400 {
            if state_in(&c, id, &target_id).await != "Staging" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the roll-out did not go on once the disk answered");
    };
    tokio::time::timeout(Duration::from_secs(120), test)
        .await
        .expect("bounded");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_releases_not_in_memory_read_at_most_sixteen_manifests_at_once() {
    let gate = Arc::new(Gate::default());
    let _opens = OpensOnDrop(gate.clone());
    let store = Hanging::new(&gate);
    let chunks = Chunks::new(Arc::new(store), None, None);
    gate.shut();
    for i in 0..100u8 {
        let peer = libp2p::PeerId::random();
        let answer = chunks.admit(peer, &ReleaseId([i; 32]), &[0], Wait::Backlog);
        assert!(
            matches!(answer, Err(ChunkResponse::Busy { .. })),
            "{answer:?}"
        );
    }
    // Written out, not the constant: a higher bound must fail here.
    assert_eq!(chunks.manifests_loading(), 16);
    let reading = tokio::task::spawn_blocking({
        let gate = gate.clone();
        move || gate.waiting(16)
    });
    assert!(reading.await.unwrap());
    gate.open();
}

/// A target's activation (the switch of `current`, removing retired
/// releases) blocks on its disk; the runtime's other tasks (the event
/// loop, heartbeats) go on meanwhile, even with one worker thread. The
/// disk is a [`CutFs`] armed to stall at its next change.
#[test]
fn an_activation_stalled_on_its_disk_holds_up_no_other_task() {
    if !CutFs::available() {
        assert!(
            std::env::var_os("CONVOY_REQUIRE_POWER_CUTS").is_none(),
            "this test needs root and /dev/fuse"
        );
        eprintln!("not run: needs root and /dev/fuse");
        return;
    }
    let mnt = tempfile::tempdir().unwrap();
    let fs = CutFs::mount(mnt.path()).expect("mounting a file system that can stall");
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("index.html"), "web 1\n").unwrap();
    let store = MemoryStore::new();
    let manifest =
        convoy_chunker::pack(src.path(), "web", "1", &&Ingest::new(&store), &()).unwrap();
    let releases =
        Arc::new(Releases::open(&mnt.path().join("releases"), 3, Duration::from_secs(30)).unwrap());
    let linked = releases
        .materialise(&manifest, &StoreSource(&store))
        .unwrap();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    fs.arm(1);
    let activating = rt.spawn({
        let releases = releases.clone();
        async move { releases.activate(&manifest, linked).await }
    });
    assert!(
        fs.wait_for_cut(Duration::from_secs(20)),
        "the activation never reached the disk"
    );
    let (ran, runs) = std::sync::mpsc::channel();
    rt.spawn(async move { ran.send(()).unwrap() });
    let other_task_ran = runs.recv_timeout(Duration::from_secs(20)).is_ok();
    fs.release();
    let _ = rt.block_on(activating);
    assert!(
        other_task_ran,
        "while the activation waited on the disk no other task ran"
    );
}
