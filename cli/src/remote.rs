//! The commands that talk to a coordinator: publish, stage, fleet.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use convoy_chunker::{ChunkRef, Manifest, ReleaseId};
use convoy_daemon::net::client::Client;
use convoy_daemon::protocol::{
    ChunkRequest, ChunkResponse, ControlRequest, ControlResponse, DeltasReport, DistributionMode,
    StageState, StagingReport, WireChunk, MAX_HASHES_PER_QUERY,
};
use convoy_daemon::store::{RocksStore, Store};
use indicatif::BinaryBytes;
use serde_json::json;

use crate::progress::Bar;
use crate::Output;

/// Uploads in flight at once during publish.
const UPLOAD_WINDOW: usize = 16;
/// How long an upload the coordinator answers busy is tried again.
const UPLOAD_PATIENCE: Duration = Duration::from_secs(120);

/// Where the coordinator is, the key to join its fleet and the operator
/// key it acts for.
pub struct Remote {
    pub coordinator: Option<String>,
    pub fleet_key_file: Option<std::path::PathBuf>,
    pub operator_key_file: Option<std::path::PathBuf>,
}

impl Remote {
    async fn connect(&self) -> Result<Client> {
        let addr = self.coordinator.as_deref().context(
            "no coordinator: pass --coordinator ADDR or set CONVOY_COORDINATOR (the address convoyd coordinator prints)",
        )?;
        let file = self
            .fleet_key_file
            .as_deref()
            .context("no fleet key: pass --fleet-key-file FILE or set CONVOY_FLEET_KEY_FILE")?;
        let key = convoy_daemon::fleet_key::read(file)?;
        let operator = self.operator_key_file.as_deref().context(
            "no operator key: pass --operator-key-file FILE or set CONVOY_OPERATOR_KEY_FILE \
             (make one with `convoy keygen FILE` and list its id in the coordinator's operators file)",
        )?;
        let identity = convoy_daemon::coordinator::operators::read_key(operator)?;
        Client::connect(addr, key, identity)
            .await
            .map_err(|e| anyhow!(e))
    }
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

pub async fn control(client: &Client, req: ControlRequest) -> Result<ControlResponse> {
    match client.control(req).await? {
        ControlResponse::Error(e) => bail!("the coordinator refused: {e}"),
        ControlResponse::Denied => bail!(
            "the coordinator denied the request: this operator key is not in its operators file"
        ),
        other => Ok(other),
    }
}

/// `convoy publish DIR APP@VERSION`.
pub fn publish(
    remote: &Remote,
    store: &RocksStore,
    out: &Output,
    dir: &Path,
    name: &str,
    wait_deltas: Option<Duration>,
) -> Result<ExitCode> {
    let (app, version) = name
        .split_once('@')
        .ok_or_else(|| anyhow!("{name:?} is not APP@VERSION"))?;
    let started = Instant::now();
    let rt = runtime()?;
    let (id, manifest, uploaded, bytes, deltas) = rt.block_on(async {
        let client = remote.connect().await?;
        let r = async {
            let (id, manifest, uploaded, bytes) =
                publish_dir(&client, store, dir, app, version).await?;
            let published = started.elapsed().as_secs_f64();
            let deltas = match wait_deltas {
                Some(t) => {
                    let bar = Bar::spinner("the origin is making deltas");
                    let d = deltas_made(&client, id, t).await;
                    bar.finish();
                    d?
                }
                None => deltas_of(&client, id).await?,
            };
            let waited = started.elapsed().as_secs_f64() - published;
            Ok::<_, anyhow::Error>((id, manifest, uploaded, bytes, (deltas, waited)))
        }
        .await;
        client.close().await;
        r
    })?;
    let (deltas, waited) = deltas;
    let total = manifest.unique_chunks().len();
    if !out.json {
        eprintln!(
            "published {name}: uploaded {uploaded} of {total} chunks ({}), {:.2}s",
            BinaryBytes(bytes),
            started.elapsed().as_secs_f64() - waited
        );
        eprintln!("{}", deltas_line(&deltas, wait_deltas.map(|_| waited)));
    }
    out.emit(
        json!({
            "release_id": id.to_hex(),
            "app": app,
            "version": version,
            "chunks": total,
            "uploaded_chunks": uploaded,
            "uploaded_bytes": bytes,
            "seconds": started.elapsed().as_secs_f64() - waited,
            "deltas": {
                "pending": deltas.pending,
                "waited_seconds": wait_deltas.map(|_| waited),
                "patches": deltas.patches.iter().map(|p| json!({
                    "base_id": p.base.to_hex(),
                    "base": p.base_name,
                    "files": p.files,
                    "delta_bytes": p.delta_bytes,
                })).collect::<Vec<_>>(),
            },
        }),
        || format!("{id}\n"),
    );
    Ok(ExitCode::SUCCESS)
}

/// What `convoy publish` says of the origin's deltas; `waited`: how long
/// it waited for them.
fn deltas_line(d: &DeltasReport, waited: Option<f64>) -> String {
    let list = || {
        d.patches
            .iter()
            .map(|p| {
                format!(
                    "from {} ({} file{}, {})",
                    p.base_name
                        .as_deref()
                        .unwrap_or("a release no longer named"),
                    p.files,
                    if p.files == 1 { "" } else { "s" },
                    BinaryBytes(p.delta_bytes)
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (d.pending, waited) {
        (true, Some(w)) => format!(
            "the origin is still making deltas after {w:.1}s; stagings that start once they are made use them"
        ),
        (true, None) => "the origin is making deltas in the background; stagings that start once they are made use them (--wait-deltas waits)".into(),
        (false, _) if d.patches.is_empty() => {
            "no deltas: no older release of the app, none smaller than its chunks, or delta making off (convoyd coordinator --delta-bases)".into()
        }
        (false, Some(w)) => format!("deltas made by the origin in {w:.2}s: {}", list()),
        (false, None) => format!("deltas: {}", list()),
    }
}

/// The origin's deltas into `release`, now.
pub async fn deltas_of(client: &Client, release: ReleaseId) -> Result<DeltasReport> {
    match control(client, ControlRequest::Deltas { release }).await? {
        ControlResponse::Deltas(d) => Ok(d),
        other => Err(anyhow!("unexpected answer to a deltas query: {other:?}")),
    }
}

/// The origin's deltas into `release` once it has made them, or as they
/// stand after `timeout`.
pub async fn deltas_made(
    client: &Client,
    release: ReleaseId,
    timeout: Duration,
) -> Result<DeltasReport> {
    let deadline = Instant::now() + timeout;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let d = deltas_of(client, release).await?;
        if !d.pending || Instant::now() >= deadline {
            return Ok(d);
        }
    }
}

/// Packs `dir` into the local store, uploads what the coordinator lacks
/// and publishes the manifest. Returns the id, the manifest, and the
/// chunks and stored bytes uploaded.
pub async fn publish_dir(
    client: &Client,
    store: &RocksStore,
    dir: &Path,
    app: &str,
    version: &str,
) -> Result<(convoy_chunker::ReleaseId, Manifest, usize, u64)> {
    let (manifest, id, _) = crate::pack_release(store, dir, app, version)?;
    let (uploaded, bytes) = upload(client, store, &manifest).await?;
    match control(
        client,
        ControlRequest::Publish {
            manifest: manifest.encode(),
        },
    )
    .await?
    {
        ControlResponse::Published(got) if got == id => Ok((id, manifest, uploaded, bytes)),
        other => Err(anyhow!("unexpected answer to publish: {other:?}")),
    }
}

/// Sends the coordinator the chunks of `manifest` it lacks; returns how
/// many and their stored bytes.
async fn upload(client: &Client, store: &RocksStore, manifest: &Manifest) -> Result<(usize, u64)> {
    let unique = manifest.unique_chunks();
    let mut missing: Vec<ChunkRef> = Vec::new();
    for part in unique.chunks(MAX_HASHES_PER_QUERY) {
        let hashes = part.iter().map(|c| c.hash).collect();
        match control(client, ControlRequest::MissingChunks(hashes)).await? {
            ControlResponse::Missing(idx) => {
                for i in idx {
                    let c = part
                        .get(i as usize)
                        .ok_or_else(|| anyhow!("the coordinator named a chunk out of range"))?;
                    missing.push(*c);
                }
            }
            other => bail!("unexpected answer: {other:?}"),
        }
    }
    let total_bytes: u64 = store
        .chunk_info(&missing.iter().map(|c| c.hash).collect::<Vec<_>>())?
        .iter()
        .map(|i| i.map_or(0, |i| u64::from(i.stored_len)))
        .sum();
    let bar = Arc::new(Bar::bytes("uploading"));
    convoy_chunker::Progress::set_total(&*bar, total_bytes);
    let mut tasks = futures::stream::iter(missing.iter().copied().map(|c| {
        let bar = bar.clone();
        async move {
            let stored = store
                .get_chunk(&c.hash)?
                .ok_or_else(|| anyhow!("chunk {} vanished from the local store", c.hash))?;
            let n = stored.bytes.len() as u64;
            let req = ChunkRequest::Upload {
                hash: c.hash,
                len: c.len,
                chunk: WireChunk {
                    encoding: stored.encoding.flag(),
                    bytes: stored.bytes,
                },
            };
            let mut answer = client.chunk(req.clone()).await?;
            let deadline = Instant::now() + UPLOAD_PATIENCE;
            while let ChunkResponse::Busy { retry_ms } = answer {
                if Instant::now() > deadline {
                    bail!(
                        "the coordinator answered busy to chunk {} for {}s (other operators' uploads fill its {} slots); publish again later: chunks already uploaded are not sent twice",
                        c.hash,
                        UPLOAD_PATIENCE.as_secs(),
                        convoy_daemon::net::serve::MAX_UPLOADS
                    );
                }
                let wait = Duration::from_millis(u64::from(retry_ms).clamp(5, 1000));
                tokio::time::sleep(wait).await;
                answer = client.chunk(req.clone()).await?;
            }
            match answer {
                ChunkResponse::Stored => {
                    convoy_chunker::Progress::advance(&*bar, n);
                    Ok(n)
                }
                ChunkResponse::Rejected(why) => {
                    bail!("the coordinator rejected chunk {}: {why}", c.hash)
                }
                ChunkResponse::Denied => {
                    bail!("the coordinator denied the upload: this operator key is not in its operators file")
                }
                other => bail!("unexpected answer to an upload: {other:?}"),
            }
        }
    }))
    .buffer_unordered(UPLOAD_WINDOW);
    use futures::StreamExt;
    let mut bytes = 0;
    while let Some(r) = tasks.next().await {
        bytes += r?;
    }
    bar.finish();
    Ok((missing.len(), bytes))
}

/// `convoy stage RELEASE --targets SELECTOR --mode MODE [--wait]`.
pub fn stage(
    remote: &Remote,
    out: &Output,
    release: &str,
    selector: &str,
    mode: DistributionMode,
    wait: bool,
    timeout: Option<Duration>,
) -> Result<ExitCode> {
    let selector = convoy_daemon::pipeline::parse_selector(selector).map_err(|e| anyhow!(e))?;
    let rt = runtime()?;
    rt.block_on(async {
        let client = remote.connect().await?;
        let started = control(
            &client,
            ControlRequest::StartStaging {
                release: release.to_string(),
                selector,
                mode,
            },
        )
        .await?;
        let ControlResponse::StagingStarted { id, targets, .. } = started else {
            bail!("unexpected answer: {started:?}");
        };
        if !out.json {
            eprintln!(
                "staging {id}: {release} to {targets} targets in {} mode",
                mode.name()
            );
        }
        if !wait {
            out.emit(json!({"staging": id, "targets": targets}), || {
                format!("{id}\n")
            });
            client.close().await;
            return Ok(ExitCode::SUCCESS);
        }
        let report = follow(&client, id, timeout).await;
        client.close().await;
        let report = report?;
        let (staged, failed) = count(&report);
        let value = report_json(&report);
        out.emit(value, || summary(&report));
        Ok(if staged == report.targets.len() {
            ExitCode::SUCCESS
        } else {
            if !out.json {
                eprintln!(
                    "{failed} targets failed, {} did not finish",
                    report.targets.len() - staged - failed
                );
            }
            ExitCode::FAILURE
        })
    })
}

pub fn count(r: &StagingReport) -> (usize, usize) {
    let state = |s: &dyn Fn(&StageState) -> bool| {
        r.targets
            .iter()
            .filter(|t| t.progress.as_ref().is_some_and(|p| s(&p.state)))
            .count()
    };
    (
        state(&|s| *s == StageState::Staged),
        state(&|s| matches!(s, StageState::Failed(_))),
    )
}

/// Polls a staging until every target staged or failed, drawing progress.
pub async fn follow(client: &Client, id: u64, timeout: Option<Duration>) -> Result<StagingReport> {
    let bar = Bar::count("staged");
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        let ControlResponse::Staging(r) =
            control(client, ControlRequest::StagingStatus { id }).await?
        else {
            bail!("unexpected answer to a status request");
        };
        let (staged, failed) = count(&r);
        let held: u64 = r
            .targets
            .iter()
            .filter_map(|t| t.progress.as_ref())
            .map(|p| u64::from(p.chunks_held))
            .sum();
        let all = u64::from(r.chunks_total) * r.targets.len() as u64;
        bar.show(
            staged as u64,
            r.targets.len() as u64,
            &format!("{held}/{all} chunks, {failed} failed"),
        );
        if staged + failed == r.targets.len() {
            bar.finish();
            return Ok(r);
        }
        if deadline.is_some_and(|d| Instant::now() > d) {
            bar.finish();
            bail!(
                "staging {id} not finished within the timeout: {staged} of {} staged",
                r.targets.len()
            );
        }
    }
}

pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Completion seconds of the targets that staged, sorted.
pub fn completion_seconds(r: &StagingReport) -> Vec<f64> {
    let mut v: Vec<f64> = r
        .targets
        .iter()
        .filter_map(|t| t.progress.as_ref())
        .filter(|p| p.state == StageState::Staged)
        .map(|p| p.elapsed_ms as f64 / 1000.0)
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

fn report_json(r: &StagingReport) -> serde_json::Value {
    let secs = completion_seconds(r);
    let (staged, failed) = count(r);
    json!({
        "staging": r.id,
        "release": r.name,
        "release_id": r.release.to_hex(),
        "mode": r.mode.name(),
        "targets": r.targets.len(),
        "staged": staged,
        "failed": failed,
        "release_bytes": r.release_bytes,
        "origin_egress_bytes": r.origin_bytes_sent,
        "total_bytes": r.targets.iter().filter_map(|t| t.progress.as_ref()).map(|p| p.bytes_received).sum::<u64>(),
        "cross_dc_bytes": r.targets.iter().filter_map(|t| t.progress.as_ref()).map(|p| p.bytes_received_cross_dc).sum::<u64>(),
        "completion_seconds": {
            "p50": quantile(&secs, 0.5),
            "p99": quantile(&secs, 0.99),
            "max": secs.last().copied().unwrap_or(0.0),
        },
        "per_target": r.targets.iter().map(|t| json!({
            "peer_id": t.peer_id,
            "labels": t.labels,
            "alive": t.alive,
            "state": t.progress.as_ref().map(|p| stage_state(&p.state)),
            "seconds": t.progress.as_ref().map(|p| p.elapsed_ms as f64 / 1000.0),
            "finished_unix_ms": t.progress.as_ref().and_then(|p| p.finished_unix_ms),
            "chunks_held": t.progress.as_ref().map(|p| p.chunks_held),
            "chunks_total": r.chunks_total,
            "bytes_received": t.progress.as_ref().map(|p| p.bytes_received),
        })).collect::<Vec<_>>(),
    })
}

fn summary(r: &StagingReport) -> String {
    let secs = completion_seconds(r);
    let (staged, failed) = count(r);
    let total: u64 = r
        .targets
        .iter()
        .filter_map(|t| t.progress.as_ref())
        .map(|p| p.bytes_received)
        .sum();
    format!(
        "staging {} of {} ({} mode): {staged}/{} staged, {failed} failed\n\
         completion p50 {:.2}s p99 {:.2}s max {:.2}s\n\
         release {}, origin sent {}, targets received {}\n",
        r.id,
        r.name,
        r.mode.name(),
        r.targets.len(),
        quantile(&secs, 0.5),
        quantile(&secs, 0.99),
        secs.last().copied().unwrap_or(0.0),
        BinaryBytes(r.release_bytes),
        BinaryBytes(r.origin_bytes_sent),
        BinaryBytes(total),
    )
}

/// `convoy staging ID`.
pub fn staging(remote: &Remote, out: &Output, id: u64) -> Result<ExitCode> {
    let rt = runtime()?;
    let report = rt.block_on(async {
        let client = remote.connect().await?;
        let r = control(&client, ControlRequest::StagingStatus { id }).await;
        client.close().await;
        match r? {
            ControlResponse::Staging(r) => Ok(r),
            other => Err(anyhow!("unexpected answer: {other:?}")),
        }
    })?;
    out.emit(report_json(&report), || summary(&report));
    Ok(ExitCode::SUCCESS)
}

/// `convoy fleet`.
pub fn fleet(remote: &Remote, out: &Output) -> Result<ExitCode> {
    let rt = runtime()?;
    let members = rt.block_on(async {
        let client = remote.connect().await?;
        let r = control(&client, ControlRequest::Fleet).await;
        client.close().await;
        match r? {
            ControlResponse::Fleet(m) => Ok(m),
            other => Err(anyhow!("unexpected answer: {other:?}")),
        }
    })?;
    let value = json!({
        "targets": members.iter().map(|m| json!({
            "peer_id": m.peer_id,
            "alive": m.alive,
            "last_seen_ms": m.last_seen_ms,
            "labels": m.report.labels,
            "addrs": m.report.addrs,
            "releases": m.report.releases.iter().map(|r| r.to_hex()).collect::<Vec<_>>(),
            "bytes_sent": m.report.bytes_sent,
            "bytes_received": m.report.bytes_received,
            "wire_bytes_sent": m.report.wire_bytes_sent,
            "wire_bytes_received": m.report.wire_bytes_received,
            "stagings": m.report.stagings.iter().map(|p| json!({
                "release_id": p.release.to_hex(),
                "state": stage_state(&p.state),
                "chunks_held": p.chunks_held,
                "chunks_total": p.chunks_total,
                "bytes_received": p.bytes_received,
            })).collect::<Vec<_>>(),
            "active": m.report.active,
            "in_load": m.report.in_load,
            "health": m.report.health,
        })).collect::<Vec<_>>(),
    });
    out.emit(value, || {
        let mut s = format!(
            "{:<54} {:<6} {:<24} {:>8} {:>10} {:>10}  {:<5} {}\n",
            "TARGET", "ALIVE", "LABELS", "RELEASES", "SENT", "RECEIVED", "LOAD", "ACTIVE"
        );
        for m in &members {
            let labels: Vec<String> = m
                .report
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let active: Vec<String> = m
                .report
                .active
                .iter()
                .map(|(app, v)| format!("{app}@{v}"))
                .collect();
            s += &format!(
                "{:<54} {:<6} {:<24} {:>8} {:>10} {:>10}  {:<5} {}\n",
                m.peer_id,
                if m.alive { "yes" } else { "no" },
                labels.join(","),
                m.report.releases.len(),
                BinaryBytes(m.report.bytes_sent).to_string(),
                BinaryBytes(m.report.bytes_received).to_string(),
                if m.report.in_load { "in" } else { "out" },
                active.join(","),
            );
        }
        s
    });
    Ok(ExitCode::SUCCESS)
}

/// A staging's state as `--json` output names it.
fn stage_state(state: &StageState) -> String {
    match state {
        StageState::Running => "running".to_string(),
        StageState::Staged => "staged".to_string(),
        StageState::Failed(e) => format!("failed: {e}"),
    }
}
