//! Whether a target is in load, and the HTTP endpoint load balancers poll.
//!
//! `GET /health` answers 200 while the target is in load and 503 while it
//! is drained; the JSON body names the active release of every app:
//! `{"in_load": true, "active": {"web": "1.4.2"}}`. The coordinator's
//! word (blue-green slices) is kept in `DATA/load`, so a target it drained
//! stays drained across a restart; the drain of a rolling delivery lasts
//! as long as the delivery, in memory, so a target killed mid-delivery
//! comes back in load as it was before (the delivery did not finish: the
//! coordinator sends it again, or has rolled back).
//!
//! `GET /metrics` on the same port gives the target's traffic counters in
//! Prometheus' text format: chunk bytes sent and received, and the bytes
//! its connections carried (`convoy_wire_bytes_total`, control traffic
//! and framing included).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::durable::write_atomically;
use crate::target::deliver::Releases;

const IN_LOAD: &str = "in load\n";
const DRAINED: &str = "drained\n";

/// The in-load flag, persisted.
pub struct Load {
    path: PathBuf,
    in_load: AtomicBool,
    /// Drained for a delivery (see [`Load::drain`]).
    draining: AtomicBool,
}

impl Load {
    /// Reads the state kept at `path`; a target that never drained is in load.
    pub fn open(path: &Path) -> io::Result<Self> {
        let in_load = match std::fs::read_to_string(path) {
            Ok(s) if s == IN_LOAD => true,
            Ok(s) if s == DRAINED => false,
            Ok(s) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: expected {IN_LOAD:?} or {DRAINED:?}, found {s:?}",
                        path.display()
                    ),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => true,
            Err(e) => return Err(e),
        };
        Ok(Self {
            path: path.to_path_buf(),
            in_load: AtomicBool::new(in_load),
            draining: AtomicBool::new(false),
        })
    }

    /// Whether the target is in load: put there, and not drained for a
    /// delivery.
    pub fn in_load(&self) -> bool {
        self.in_load.load(Ordering::SeqCst) && !self.draining.load(Ordering::SeqCst)
    }

    /// Drains the target for a delivery until the guard is dropped; not
    /// persisted (see the module's documentation).
    pub fn drain(&self) -> Drained<'_> {
        self.draining.store(true, Ordering::SeqCst);
        Drained(self)
    }

    /// Puts the target into load or drains it, durably first.
    pub fn set(&self, in_load: bool) -> io::Result<()> {
        write_atomically(
            &self.path,
            if in_load { IN_LOAD } else { DRAINED }.as_bytes(),
        )?;
        self.in_load.store(in_load, Ordering::SeqCst);
        Ok(())
    }
}

/// A delivery's drain: the target goes back into load when it is dropped.
pub struct Drained<'a>(&'a Load);

impl Drop for Drained<'_> {
    fn drop(&mut self) {
        self.0.draining.store(false, Ordering::SeqCst);
    }
}

/// The body of `GET /health`.
#[derive(Debug, Serialize)]
pub struct Health {
    /// In load (200) or drained (503).
    pub in_load: bool,
    /// The version each app's `current` link names.
    pub active: std::collections::BTreeMap<String, String>,
}

/// The health state a target reports.
pub fn health(load: &Load, releases: &Releases) -> Health {
    let mut active = std::collections::BTreeMap::new();
    for app in releases.apps().unwrap_or_default() {
        if let Ok(Some(v)) = releases.active(&app) {
            active.insert(app, v);
        }
    }
    Health {
        in_load: load.in_load(),
        active,
    }
}

#[derive(Clone)]
struct Shared {
    load: Arc<Load>,
    releases: Arc<Releases>,
    counters: Counters,
}

/// The traffic counters `/metrics` shows.
#[derive(Clone)]
pub struct Counters {
    /// The store's chunk traffic.
    pub chunks: Arc<crate::net::serve::Chunks>,
    /// The network's bytes on the wire.
    pub wire: Arc<crate::net::WireCounters>,
}

impl Counters {
    /// The counters in Prometheus' text format.
    pub fn text(&self) -> String {
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let wire = self.wire.get();
        format!(
            "# HELP convoy_chunk_bytes_total Chunk bytes this target sent to peers and received, by direction.\n\
             # TYPE convoy_chunk_bytes_total counter\n\
             convoy_chunk_bytes_total{{direction=\"sent\"}} {}\n\
             convoy_chunk_bytes_total{{direction=\"received\"}} {}\n\
             # HELP convoy_wire_bytes_total Bytes this target's TCP connections carried, by direction: chunk bodies, control, announcements, framing and all.\n\
             # TYPE convoy_wire_bytes_total counter\n\
             convoy_wire_bytes_total{{direction=\"sent\"}} {}\n\
             convoy_wire_bytes_total{{direction=\"received\"}} {}\n",
            load(&self.chunks.bytes_sent),
            load(&self.chunks.bytes_received),
            wire.sent,
            wire.received,
        )
    }
}

async fn get_metrics(State(s): State<Shared>) -> String {
    s.counters.text()
}

async fn get_health(State(s): State<Shared>) -> (StatusCode, Json<Health>) {
    let h = health(&s.load, &s.releases);
    let status = if h.in_load {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(h))
}

/// Serves `GET /health` and `GET /metrics` on `listener` until
/// `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    load: Arc<Load>,
    releases: Arc<Releases>,
    counters: Counters,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let app = Router::new()
        .route("/health", get(get_health))
        .route("/metrics", get(get_metrics))
        .with_state(Shared {
            load,
            releases,
            counters,
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivery_drain_ends_with_the_delivery_or_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("load");
        let load = Load::open(&path).unwrap();
        let drained = load.drain();
        assert!(!load.in_load(), "drained while the delivery runs");
        drop(drained);
        assert!(load.in_load(), "back in load after it");
        // Killed mid-delivery: the drain is not kept.
        std::mem::forget(load.drain());
        assert!(!load.in_load());
        assert!(Load::open(&path).unwrap().in_load());
        // The coordinator's drain is kept, and outlasts a delivery's.
        load.set(false).unwrap();
        drop(load.drain());
        assert!(!load.in_load());
        assert!(!Load::open(&path).unwrap().in_load());
    }

    #[test]
    fn drained_state_survives_a_reopen_and_garbage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("load");
        let load = Load::open(&path).unwrap();
        assert!(load.in_load(), "a fresh target is in load");
        load.set(false).unwrap();
        assert!(!Load::open(&path).unwrap().in_load());
        Load::open(&path).unwrap().set(true).unwrap();
        assert!(Load::open(&path).unwrap().in_load());
        std::fs::write(&path, "maybe").unwrap();
        let err = Load::open(&path).err().expect("garbage refused");
        assert!(err.to_string().contains("expected"), "{err}");
    }
}
