//! The coordinator's book of roll-outs, promotions and history, kept in
//! its store's record logs so a restarted coordinator picks up where it was.
//!
//! - `deploy/<id>`: the events of one roll-out, in order, as JSON
//!   `[millis, event]`; replaying them rebuilds the [`Rollout`] (and the
//!   notices an operator saw).
//! - `promote/<app>`: the promotions of an app's releases.
//! - `history/<app>`: every action on the app, with its time and origin.
//! - `slices/<env>`: which slice of a blue-green environment is in load,
//!   each time it changes (target reports lag a heartbeat behind).
//!
//! An event is written before the engine sees it, so nothing the engine
//! did is forgotten. Ticks that change nothing are not written. The writes
//! go through a [`Recorder`]: one thread that appends in the order it is
//! handed records, so the coordinator's loop never waits on the disk and
//! every log keeps its order; the loop applies an event when the recorder
//! reports it written ([`Deployments::prepare`], [`Deployments::write`],
//! [`Deployments::apply`]).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use convoy_chunker::ReleaseId;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::coordinator::rollout::{
    Command, Event, Millis, Notice, Outcome, Rollout, Spec, TargetId,
};
use crate::pipeline::Pipelines;
use crate::store::Store;

/// Roll-outs kept in memory (older finished ones stay in the store).
const MAX_KEPT: usize = 1000;

/// One roll-out as the coordinator keeps it.
#[derive(Debug, Serialize)]
pub struct Deployment {
    /// Its number.
    pub id: u64,
    /// The release.
    pub release: ReleaseId,
    /// The engine.
    pub rollout: Rollout,
    /// What an operator was told, with times.
    pub notices: Vec<(Millis, Notice)>,
    /// How its targets leave load and come back.
    #[serde(flatten)]
    pub load: LoadTerms,
    /// Chunk bytes the targets received to stage it (this coordinator run).
    pub bytes_moved: u64,
    /// Per target, the chunks it held and the bytes it had received at
    /// its last report.
    #[serde(skip)]
    pub stage_seen: HashMap<TargetId, (u32, u64)>,
    /// Per target, how its activation went: microseconds the switch of
    /// `current` took, milliseconds the whole delivery took.
    pub activations: BTreeMap<TargetId, (u64, u64)>,
}

impl Deployment {
    /// A roll-out's engine started at `at`, and the commands that follow.
    fn start(
        id: u64,
        release: ReleaseId,
        at: Millis,
        spec: Spec,
        load: LoadTerms,
    ) -> (Self, Vec<Command>) {
        let (rollout, cmds) = Rollout::start(at, spec);
        let notices = load
            .warnings
            .iter()
            .map(|w| (at, Notice::Warning(w.clone())))
            .collect();
        let mut dep = Self {
            id,
            release,
            rollout,
            notices,
            load,
            bytes_moved: 0,
            stage_seen: HashMap::new(),
            activations: BTreeMap::new(),
        };
        note(&mut dep, at, &cmds);
        (dep, cmds)
    }

    /// The roll-out in brief.
    pub fn summary(&self) -> serde_json::Value {
        let r = &self.rollout;
        let outcome = match r.phase {
            crate::coordinator::rollout::Phase::Done(o) => Some(o.name()),
            _ => None,
        };
        serde_json::json!({
            "id": self.id,
            "app": r.spec.app,
            "version": r.spec.version,
            "env": r.spec.env,
            "strategy": r.spec.strategy.name(),
            "mode": r.spec.mode.name(),
            "phase": r.phase,
            "outcome": outcome,
            "targets": r.targets.len(),
            "failures": r.failures,
            "started_ms": r.started,
            "ended_ms": r.ended,
            "distribution_seconds": r.distribution_ms.map(|m| m as f64 / 1000.0),
            "delivery_seconds": r.delivery_ms.map(|m| m as f64 / 1000.0),
            "bytes_moved": self.bytes_moved,
        })
    }

    /// The roll-out in full: the summary, every target, waves, notices.
    pub fn detail(&self) -> serde_json::Value {
        let mut v = self.summary();
        let o = v.as_object_mut().expect("an object");
        o.insert("release".into(), self.release.to_hex().into());
        o.insert(
            "spec".into(),
            serde_json::to_value(&self.rollout.spec).expect("encodes"),
        );
        o.insert(
            "waves".into(),
            serde_json::to_value(&self.rollout.waves).expect("encodes"),
        );
        o.insert(
            "target_states".into(),
            serde_json::to_value(&self.rollout.targets).expect("encodes"),
        );
        o.insert(
            "live_slice".into(),
            serde_json::to_value(self.rollout.live_slice).expect("encodes"),
        );
        o.insert("paused".into(), self.rollout.pause_requested.into());
        // How its targets leave load and come back (the environment's
        // load balancer settings, or the drain asked for).
        o.insert(
            "drain_seconds".into(),
            (self.load.drain_ms as f64 / 1000.0).into(),
        );
        o.insert(
            "settle_seconds".into(),
            (self.load.settle_ms as f64 / 1000.0).into(),
        );
        o.insert(
            "notices".into(),
            self.notices
                .iter()
                .map(|(at, n)| serde_json::json!({"at_ms": at, "notice": n}))
                .collect(),
        );
        o.insert(
            "activations".into(),
            self.activations
                .iter()
                .map(|(t, (us, ms))| {
                    (
                        t.clone(),
                        serde_json::json!({"switch_us": us, "total_ms": ms}),
                    )
                })
                .collect::<serde_json::Map<_, _>>()
                .into(),
        );
        v
    }
}

/// The first record of a roll-out's log: what the engine's `Started`
/// does not say.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    release: String,
    #[serde(flatten)]
    load: LoadTerms,
}

/// How a roll-out's targets leave load and come back (from the
/// environment's load balancer settings), and what its operator was
/// warned of about them at its start.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadTerms {
    /// How long rolling targets drain, milliseconds.
    pub drain_ms: u64,
    /// How long a target back in load waits before it answers, so that
    /// its load balancer sends it requests again: milliseconds.
    #[serde(default)]
    pub settle_ms: u64,
    /// What is unsafe about these settings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl LoadTerms {
    /// How long a target whose load changes to `in_load` waits before it
    /// answers: the settle going in, the drain going out.
    pub fn wait_ms(&self, in_load: bool) -> u64 {
        if in_load {
            self.settle_ms
        } else {
            self.drain_ms
        }
    }
}

/// A record of a roll-out's log.
#[derive(Debug, Serialize, Deserialize)]
enum Record {
    Header(Header),
    Event(Millis, Event),
}

/// A promotion.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Promotion {
    /// When.
    pub at_ms: Millis,
    /// The version.
    pub version: String,
    /// To which environment.
    pub env: String,
    /// Whether `--force` skipped the pipeline's order.
    pub forced: bool,
}

/// One line of an app's history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// When.
    pub at_ms: Millis,
    /// `publish`, `promote`, `deploy`, `pause`, `resume`, `abort`,
    /// `finished`, `rollback`.
    pub action: String,
    /// The version concerned.
    pub version: Option<String>,
    /// The environment concerned.
    pub env: Option<String>,
    /// The roll-out concerned.
    pub deployment: Option<u64>,
    /// Who: `api <address>` for an operator, `coordinator` for itself.
    pub by: String,
    /// Details.
    pub detail: String,
}

impl HistoryEntry {
    /// A line stamped now: `action` on `version` in `env` (roll-out
    /// `deployment`), done by `by`.
    pub fn new(
        action: &str,
        by: &str,
        detail: String,
        version: Option<&str>,
        env: Option<&str>,
        deployment: Option<u64>,
    ) -> Self {
        Self {
            at_ms: crate::units::unix_ms(std::time::SystemTime::now()),
            action: action.into(),
            version: version.map(str::to_string),
            env: env.map(str::to_string),
            deployment,
            by: by.into(),
            detail,
        }
    }
}

/// What to do once a record is written (or could not be).
pub type Written = Box<dyn FnOnce(Result<(), String>) + Send>;

struct Job {
    write: Write,
    then: Option<Written>,
}

enum Write {
    /// Appended to `log` in order; the first that fails ends the job.
    Records { log: String, records: Vec<Vec<u8>> },
    /// A file replaced whole, durably.
    File { path: PathBuf, bytes: Vec<u8> },
}

impl Write {
    fn run(&self, store: &dyn Store) -> Result<(), String> {
        match self {
            Write::Records { log, records } => records.iter().try_for_each(|record| {
                store
                    .append_record(log, record)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }),
            Write::File { path, bytes } => {
                crate::durable::write_atomically(path, bytes).map_err(|e| e.to_string())
            }
        }
    }

    fn name(&self) -> String {
        match self {
            Write::Records { log, .. } => log.clone(),
            Write::File { path, .. } => path.display().to_string(),
        }
    }
}

/// Appends records on a thread of its own, in the order it is handed them.
/// Dropping it waits for what it was handed to be written.
pub struct Recorder {
    jobs: Option<std::sync::mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Recorder {
    /// Starts the writer thread on `store`; it ends when the recorder is
    /// dropped, after writing what it was handed.
    pub fn start(store: Arc<dyn Store>) -> Self {
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("convoy-records".into())
            .spawn(move || {
                for job in queue {
                    let r = job.write.run(&*store);
                    match job.then {
                        Some(then) => then(r),
                        None => {
                            if let Err(e) = r {
                                warn!(log = job.write.name(), "cannot record: {e}");
                            }
                        }
                    }
                }
            })
            .expect("spawning the record writer");
        Self {
            jobs: Some(jobs),
            thread: Some(thread),
        }
    }

    /// Appends `records` to `log` in order, then calls `then` (if any)
    /// with how it went.
    pub fn append(&self, log: String, records: Vec<Vec<u8>>, then: Option<Written>) {
        self.send(Write::Records { log, records }, then);
    }

    /// Replaces the file at `path` with `bytes` (synced, by rename), in
    /// turn with the records, then calls `then` with how it went.
    pub fn replace(&self, path: PathBuf, bytes: Vec<u8>, then: Written) {
        self.send(Write::File { path, bytes }, Some(then));
    }

    fn send(&self, write: Write, then: Option<Written>) {
        let job = Job { write, then };
        let jobs = self.jobs.as_ref().expect("present until dropped");
        if let Err(std::sync::mpsc::SendError(job)) = jobs.send(job) {
            // The thread is gone only if a write panicked.
            if let Some(then) = job.then {
                then(Err(
                    "the record writer has stopped after a failed write (see the log); restart the coordinator".into(),
                ));
            }
        }
    }
}

/// Every roll-out, promotion and history line.
pub struct Deployments {
    store: Arc<dyn Store>,
    recorder: Recorder,
    /// Roll-outs by id.
    pub all: BTreeMap<u64, Deployment>,
    promotions: HashMap<String, Vec<Promotion>>,
    live_slices: HashMap<String, crate::coordinator::rollout::Slice>,
    /// The number the next roll-out takes.
    next_id: u64,
}

fn log_name(id: u64) -> String {
    format!("deploy/{id:012}")
}

impl Deployments {
    /// Loads everything from the store, replaying each roll-out.
    pub fn load(store: Arc<dyn Store>) -> Result<Self, String> {
        let mut d = Self {
            recorder: Recorder::start(store.clone()),
            store,
            all: BTreeMap::new(),
            promotions: HashMap::new(),
            live_slices: HashMap::new(),
            next_id: 1,
        };
        for log in d.store.logs("slices/").map_err(|e| e.to_string())? {
            let last = d.store.records(&log).map_err(|e| e.to_string())?.pop();
            if let Some(slice) = last.and_then(|r| serde_json::from_slice(&r).ok()) {
                d.live_slices
                    .insert(log["slices/".len()..].to_string(), slice);
            }
        }
        for log in d.store.logs("promote/").map_err(|e| e.to_string())? {
            let app = log["promote/".len()..].to_string();
            let list = d
                .store
                .records(&log)
                .map_err(|e| e.to_string())?
                .iter()
                .filter_map(|r| serde_json::from_slice(r).ok())
                .collect();
            d.promotions.insert(app, list);
        }
        let logs = d.store.logs("deploy/").map_err(|e| e.to_string())?;
        d.next_id = logs.len() as u64 + 1;
        let skip = logs.len().saturating_sub(MAX_KEPT);
        for log in logs.into_iter().skip(skip) {
            let Some(id) = log["deploy/".len()..].parse().ok() else {
                continue;
            };
            match d.replay(id, &log) {
                Ok(dep) => {
                    d.all.insert(id, dep);
                }
                Err(e) => warn!(
                    log,
                    "cannot replay this roll-out ({e}); it is left out, the others go on"
                ),
            }
        }
        Ok(d)
    }

    fn replay(&self, id: u64, log: &str) -> Result<Deployment, String> {
        let records = self.store.records(log).map_err(|e| e.to_string())?;
        let mut records = records.iter().map(|r| {
            serde_json::from_slice::<Record>(r).map_err(|e| format!("record unreadable: {e}"))
        });
        let Some(Ok(Record::Header(h))) = records.next() else {
            return Err("its first record is not the roll-out's header".into());
        };
        let release = ReleaseId::from_hex(&h.release)
            .ok_or_else(|| format!("{:?} in its header is not a release id", h.release))?;
        let Some(Ok(Record::Event(at, Event::Started(spec)))) = records.next() else {
            return Err("its second record is not the roll-out's start".into());
        };
        let (mut dep, _) = Deployment::start(id, release, at, spec, h.load);
        for r in records {
            if let Record::Event(at, e) = r? {
                let cmds = dep.rollout.handle(at, e);
                note(&mut dep, at, &cmds);
            }
        }
        Ok(dep)
    }

    /// A new roll-out's number, and the records that start its log (to be
    /// written, with [`Deployments::write_opening`], before
    /// [`Deployments::opened`] starts its engine).
    pub fn open(
        &mut self,
        at: Millis,
        spec: &Spec,
        release: ReleaseId,
        load: &LoadTerms,
    ) -> (u64, Vec<Vec<u8>>) {
        let id = self
            .next_id
            .max(self.all.keys().next_back().map_or(1, |k| k + 1));
        self.next_id = id + 1;
        let header = Record::Header(Header {
            release: release.to_hex(),
            load: load.clone(),
        });
        let records = [&header, &Record::Event(at, Event::Started(spec.clone()))]
            .iter()
            .map(|r| serde_json::to_vec(r).expect("records encode"))
            .collect();
        (id, records)
    }

    /// Replaces a file of the coordinator's through the recorder, in turn
    /// with its records: writes of one file land in the order they are
    /// handed over.
    pub fn write_file(&self, path: PathBuf, bytes: Vec<u8>, then: Written) {
        self.recorder.replace(path, bytes, then);
    }

    /// Hands the records that open roll-out `id`'s log to the recorder.
    pub fn write_opening(&self, id: u64, records: Vec<Vec<u8>>, then: Written) {
        self.recorder.append(log_name(id), records, Some(then));
    }

    /// Roll-out `id`'s log is open: its engine starts; the commands that
    /// follow.
    pub fn opened(
        &mut self,
        id: u64,
        release: ReleaseId,
        at: Millis,
        spec: Spec,
        load: LoadTerms,
    ) -> Vec<Command> {
        let (dep, cmds) = Deployment::start(id, release, at, spec, load);
        self.all.insert(id, dep);
        while self.all.len() > MAX_KEPT {
            let oldest = *self.all.keys().next().expect("not empty");
            self.all.remove(&oldest);
        }
        cmds
    }

    /// Starts a roll-out, written to the store first (on the caller's
    /// thread).
    #[cfg(test)]
    pub fn create(
        &mut self,
        at: Millis,
        spec: Spec,
        release: ReleaseId,
        load: LoadTerms,
    ) -> Result<(u64, Vec<Command>), String> {
        let (id, records) = self.open(at, &spec, release, &load);
        for r in records {
            self.store
                .append_record(&log_name(id), &r)
                .map_err(|e| format!("cannot record the roll-out: {e}"))?;
        }
        Ok((id, self.opened(id, release, at, spec, load)))
    }

    /// The record of `event` for roll-out `id`, to be written before the
    /// engine sees it; `None` when there is nothing to write: no such
    /// roll-out, or a tick that changes nothing (tried on a copy of the
    /// engine). A tick is only prepared with nothing of its roll-out
    /// waiting to be written: it must see the state those events make.
    pub fn prepare(&self, id: u64, at: Millis, event: &Event) -> Option<Vec<u8>> {
        let dep = self.all.get(&id)?;
        if *event == Event::Tick && dep.rollout.clone().handle(at, Event::Tick).is_empty() {
            return None;
        }
        Some(serde_json::to_vec(&Record::Event(at, event.clone())).expect("encodes"))
    }

    /// Hands a prepared record of roll-out `id` to the recorder; `then`
    /// learns whether it was written.
    pub fn write(&self, id: u64, record: Vec<u8>, then: Written) {
        self.recorder.append(log_name(id), vec![record], Some(then));
    }

    /// Feeds a written event to roll-out `id`; the commands that follow.
    pub fn apply(&mut self, id: u64, at: Millis, event: Event) -> Vec<Command> {
        let Some(dep) = self.all.get_mut(&id) else {
            return Vec::new();
        };
        let cmds = dep.rollout.handle(at, event);
        note(dep, at, &cmds);
        cmds
    }

    /// Feeds an event to roll-out `id`, written to the store first (on the
    /// caller's thread): an event that cannot be written is not applied,
    /// so what a restart replays is what ran.
    #[cfg(test)]
    pub fn handle(&mut self, id: u64, at: Millis, event: Event) -> Result<Vec<Command>, String> {
        let Some(record) = self.prepare(id, at, &event) else {
            return Ok(Vec::new());
        };
        self.store
            .append_record(&log_name(id), &record)
            .map_err(|e| {
                format!("cannot record an event of roll-out {id}, so it is not applied: {e}")
            })?;
        Ok(self.apply(id, at, event))
    }

    /// The roll-out running for `app` in `env`, if any.
    pub fn running(&self, app: &str, env: &str) -> Option<&Deployment> {
        self.all.values().find(|d| {
            !d.rollout.is_done() && d.rollout.spec.app == app && d.rollout.spec.env == env
        })
    }

    /// The environments where a roll-out of `app` `version` succeeded.
    pub fn succeeded_in(&self, app: &str, version: &str) -> Vec<String> {
        self.all
            .values()
            .filter(|d| {
                d.rollout.spec.app == app
                    && d.rollout.spec.version == version
                    && d.rollout.phase
                        == crate::coordinator::rollout::Phase::Done(Outcome::Succeeded)
            })
            .map(|d| d.rollout.spec.env.clone())
            .collect()
    }

    /// Whether `version` of `app` may be deployed to `env`: the pipeline's
    /// first environment always, the others once promoted there.
    pub fn deployable(
        &self,
        pipelines: &Pipelines,
        app: &str,
        version: &str,
        env: &str,
    ) -> Result<(), String> {
        let a = pipelines.app(app)?;
        if !a.pipeline.iter().any(|e| e == env) {
            return Err(format!(
                "{env} is not in {app}'s pipeline ({})",
                a.pipeline.join(" → ")
            ));
        }
        let promoted = self
            .promotions
            .get(app)
            .is_some_and(|ps| ps.iter().any(|p| p.version == version && p.env == env));
        if a.pipeline[0] == env || promoted {
            Ok(())
        } else {
            Err(format!(
                "{app}@{version} is not promoted to {env}: run `convoy promote {app}@{version} --to {env}`"
            ))
        }
    }

    /// The promotion of `version` of `app` to `env`, if the pipeline allows
    /// it or `force` says so (recorded either way): to be written with
    /// [`Deployments::write_promotion`], then kept with
    /// [`Deployments::promoted`].
    pub fn promotion(
        &self,
        pipelines: &Pipelines,
        at: Millis,
        app: &str,
        version: &str,
        env: &str,
        force: bool,
    ) -> Result<Promotion, String> {
        let allowed = pipelines.may_promote(app, env, &self.succeeded_in(app, version));
        match allowed {
            Err(e) if !force || !pipelines.app(app)?.pipeline.iter().any(|x| x == env) => {
                return Err(e)
            }
            _ => {}
        }
        Ok(Promotion {
            at_ms: at,
            version: version.into(),
            env: env.into(),
            forced: force && allowed.is_err(),
        })
    }

    /// Hands a promotion of `app` to the recorder.
    pub fn write_promotion(&self, app: &str, p: &Promotion, then: Written) {
        let record = serde_json::to_vec(p).expect("encodes");
        self.recorder
            .append(format!("promote/{app}"), vec![record], Some(then));
    }

    /// A promotion of `app`, written, counts.
    pub fn promoted(&mut self, app: &str, p: Promotion) {
        self.promotions.entry(app.into()).or_default().push(p);
    }

    /// The slice of blue-green environment `env` last put in load, if known.
    pub fn live_slice(&self, env: &str) -> Option<crate::coordinator::rollout::Slice> {
        self.live_slices.get(env).copied()
    }

    /// Records which slice of `env` is in load.
    pub fn set_live_slice(&mut self, env: &str, slice: crate::coordinator::rollout::Slice) {
        if self.live_slices.get(env) == Some(&slice) {
            return;
        }
        let bytes = serde_json::to_vec(&slice).expect("encodes");
        self.recorder
            .append(format!("slices/{env}"), vec![bytes], None);
        self.live_slices.insert(env.into(), slice);
    }

    /// The promotions of `app`.
    pub fn promotions(&self, app: &str) -> &[Promotion] {
        self.promotions.get(app).map_or(&[], Vec::as_slice)
    }

    /// Appends a line to an app's history, through the recorder (a
    /// failure is logged).
    pub fn record(&self, app: &str, entry: &HistoryEntry) {
        let bytes = serde_json::to_vec(entry).expect("encodes");
        self.recorder
            .append(format!("history/{app}"), vec![bytes], None);
    }

    /// An app's history, oldest first.
    pub fn history(&self, app: &str) -> Result<Vec<HistoryEntry>, String> {
        Ok(self
            .store
            .records(&format!("history/{app}"))
            .map_err(|e| e.to_string())?
            .iter()
            .filter_map(|r| serde_json::from_slice(r).ok())
            .collect())
    }
}

/// Appends `entry` to `app`'s history in `store` (blocking: a synced
/// write); a failure is logged.
pub fn record(store: &dyn Store, app: &str, entry: &HistoryEntry) {
    let bytes = serde_json::to_vec(entry).expect("encodes");
    if let Err(e) = store.append_record(&format!("history/{app}"), &bytes) {
        warn!(app, "cannot record history: {e}");
    }
}

fn note(dep: &mut Deployment, at: Millis, cmds: &[Command]) {
    for c in cmds {
        if let Command::Notice(n) = c {
            dep.notices.push((at, n.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::rollout::{Amount, Member, Strategy};
    use crate::protocol::DistributionMode;
    use crate::store::MemoryStore;

    /// Promotes web@2 to `env` as the coordinator does: checked, written
    /// by the recorder, then kept.
    fn promote(
        d: &mut Deployments,
        pipelines: &Pipelines,
        at: Millis,
        env: &str,
        force: bool,
    ) -> Result<Promotion, String> {
        let p = d.promotion(pipelines, at, "web", "2", env, force)?;
        let (tx, rx) = std::sync::mpsc::channel();
        d.write_promotion("web", &p, Box::new(move |r| tx.send(r).unwrap()));
        rx.recv().unwrap()?;
        d.promoted("web", p.clone());
        Ok(p)
    }

    fn spec(targets: &[&str]) -> Spec {
        Spec {
            app: "web".into(),
            version: "2".into(),
            env: "production".into(),
            strategy: Strategy::Rolling,
            waves: vec![Amount::Count(1), Amount::Percent(100.0)],
            mode: DistributionMode::Push,
            max_failures: Amount::Count(0),
            progress_deadline_ms: 10_000,
            targets: targets
                .iter()
                .map(|t| Member {
                    id: t.to_string(),
                    slice: None,
                })
                .collect(),
            live_slice: None,
            ordered_loads: true,
        }
    }

    #[test]
    fn an_event_that_cannot_be_written_is_not_applied() {
        let dir = tempfile::tempdir().unwrap();
        let rocks = Arc::new(crate::store::RocksStore::open(dir.path()).unwrap());
        let store: Arc<dyn Store> = rocks.clone();
        let mut d = Deployments::load(store).unwrap();
        let (id, _) = d
            .create(
                1000,
                spec(&["a", "b"]),
                ReleaseId([1; 32]),
                LoadTerms::default(),
            )
            .unwrap();
        d.handle(id, 1100, Event::Staged("a".into(), Ok(())))
            .unwrap();
        let before = serde_json::to_value(&d.all[&id].rollout).unwrap();
        // The disk fails: the store takes no more writes.
        rocks.fail_syncs_for_tests();
        for event in [
            Event::Staged("b".into(), Ok(())),
            Event::Abort,
            // Past the progress deadline: a tick that would change things.
            Event::Tick,
        ] {
            let e = d.handle(id, 60_000, event.clone()).unwrap_err();
            assert!(e.contains("not applied"), "{event:?}: {e}");
            assert_eq!(
                serde_json::to_value(&d.all[&id].rollout).unwrap(),
                before,
                "{event:?} was applied"
            );
        }
        drop(d);
        drop(rocks);
        let again = Deployments::load(Arc::new(
            crate::store::RocksStore::open(dir.path()).unwrap(),
        ))
        .unwrap();
        assert_eq!(
            serde_json::to_value(&again.all[&id].rollout).unwrap(),
            before
        );
    }

    #[test]
    fn a_reloaded_book_resumes_the_roll_out_where_it_was() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let mut d = Deployments::load(store.clone()).unwrap();
        let load = LoadTerms {
            drain_ms: 300,
            settle_ms: 200,
            warnings: vec!["the drain is short".into()],
        };
        let (id, _) = d
            .create(1000, spec(&["a", "b"]), ReleaseId([1; 32]), load.clone())
            .unwrap();
        d.handle(id, 1100, Event::Staged("a".into(), Ok(())))
            .unwrap();
        let cmds = d
            .handle(id, 1200, Event::Staged("b".into(), Ok(())))
            .unwrap();
        assert!(cmds
            .iter()
            .any(|c| matches!(c, Command::Deliver { target, .. } if target == "a")));
        // A tick that changes nothing is not written.
        assert!(d.handle(id, 1300, Event::Tick).unwrap().is_empty());
        let before = serde_json::to_value(&d.all[&id].rollout).unwrap();

        let again = Deployments::load(store).unwrap();
        let dep = &again.all[&id];
        assert_eq!(serde_json::to_value(&dep.rollout).unwrap(), before);
        assert_eq!(dep.notices, d.all[&id].notices);
        assert_eq!(dep.load, load);
        assert_eq!(
            dep.notices[0],
            (1000, Notice::Warning("the drain is short".into()))
        );
        assert_eq!(
            dep.rollout.resend(),
            vec![Command::Deliver {
                target: "a".into(),
                drain: true
            }]
        );
        assert!(again.running("web", "production").is_some());
    }

    #[test]
    fn a_header_written_before_load_terms_reads_with_no_settle() {
        let h: Header = serde_json::from_str(r#"{"release": "ab", "drain_ms": 500}"#).unwrap();
        assert_eq!(h.load.drain_ms, 500);
        assert_eq!(h.load.settle_ms, 0);
        assert!(h.load.warnings.is_empty());
    }

    #[test]
    fn promotion_follows_the_pipeline_unless_forced_and_is_remembered() {
        let pipelines = Pipelines::parse(
            r#"
            [environments.staging]
            selector = "env=staging"
            [environments.production]
            selector = "env=production"
            [apps.web]
            pipeline = ["staging", "production"]
            "#,
        )
        .unwrap();
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let mut d = Deployments::load(store.clone()).unwrap();
        assert!(d.deployable(&pipelines, "web", "2", "staging").is_ok());
        let err = d
            .deployable(&pipelines, "web", "2", "production")
            .unwrap_err();
        assert!(err.contains("not promoted"), "{err}");
        let err = promote(&mut d, &pipelines, 5, "production", false).unwrap_err();
        assert!(err.contains("must succeed in staging"), "{err}");
        let p = promote(&mut d, &pipelines, 6, "production", true).unwrap();
        assert!(p.forced);
        assert!(promote(&mut d, &pipelines, 7, "qa", true)
            .unwrap_err()
            .contains("not in web's pipeline"));
        let again = Deployments::load(store).unwrap();
        assert!(again
            .deployable(&pipelines, "web", "2", "production")
            .is_ok());
        assert_eq!(again.promotions("web"), &[p]);
    }
}
