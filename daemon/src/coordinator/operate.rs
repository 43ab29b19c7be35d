//! Roll-outs and the operator API, on the coordinator's event loop.
//!
//! The [`Rollout`](crate::coordinator::rollout::Rollout) engines live in
//! [`Deployments`](crate::coordinator::deployments::Deployments); this part feeds them
//! what happens (target reports, delivery reports, answers to orders, the
//! clock, operators) and carries out their commands over the network.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use convoy_chunker::ReleaseId;
use libp2p::PeerId;
use serde_json::json;
use tracing::{error, info, warn};

use super::{label, now_unix_ms, Coordinator, Internal};

/// Where an API call's answer goes.
pub(super) type ApiReply = tokio::sync::oneshot::Sender<Result<Answer, ApiError>>;

/// An operator's promotion, answered once it is written.
pub(super) struct Promoting {
    app: String,
    promotion: crate::coordinator::deployments::Promotion,
    by: String,
    reply: ApiReply,
}

/// An operator's roll-out, answered once its log is open.
pub(super) struct Opening {
    id: u64,
    at: u64,
    spec: Spec,
    release: convoy_chunker::ReleaseId,
    load: LoadTerms,
    summary: String,
    by: String,
    reply: ApiReply,
}

/// An operator's pause, resume or abort, answered once it is written.
pub(super) struct Steered {
    action: &'static str,
    by: String,
    reply: ApiReply,
}
use crate::coordinator::api::{
    Answer, ApiError, Call, DeployRequest, Op, PromoteRequest, RollbackRequest, Steer,
};
use crate::coordinator::deployments::{HistoryEntry, LoadTerms};
use crate::coordinator::rollout::{
    Command, Event, Member, Notice, Phase, Slice, Spec, Strategy, TargetState,
};
use crate::pipeline::{parse_selector, selects};
use crate::protocol::{ControlRequest, ControlResponse, DeliveryReport, StageState};

/// How often roll-outs check deadlines and stragglers.
pub const TICK: Duration = Duration::from_millis(250);

fn split_release(name: &str) -> Result<(&str, &str), ApiError> {
    name.split_once('@')
        .filter(|(a, v)| !a.is_empty() && !v.is_empty())
        .ok_or_else(|| ApiError::bad(format!("{name:?} is not APP@VERSION")))
}

fn json_ok(v: serde_json::Value) -> Result<Answer, ApiError> {
    Ok(Answer::Json(StatusCode::OK, v))
}

impl Coordinator {
    /// Answers one API call.
    pub(super) fn on_api(&mut self, call: Call) {
        // A roll-out waits for a collection pass: it stages a release.
        if matches!(call.op, Op::Deploy(_)) && self.collector.running() {
            if self.collector.full() {
                let refused = ApiError::conflict(super::TOO_MANY_WAITING);
                let _ = call.reply.send(Err(refused));
            } else {
                self.collector.hold(super::Waiting::Api(call));
            }
            return;
        }
        let Call { op, by, reply } = call;
        let answer = match op {
            Op::Rollback(r) => {
                // Answered when every target has: from a task.
                if let Err(e) = self.rollback_env(r, by, reply) {
                    warn!("rollback refused: {}", e.message);
                }
                return;
            }
            // Answered once what they change is written.
            Op::Steer(id, steer) => return self.steer(id, steer, by, reply),
            Op::Promote(r) => return self.promote(r, by, reply),
            Op::Deploy(r) => return self.deploy(r, by, reply),
            op => self.api(op),
        };
        let _ = reply.send(answer);
    }

    fn api(&mut self, op: Op) -> Result<Answer, ApiError> {
        match op {
            Op::Pipelines => json_ok(json!(self.config.pipelines)),
            Op::List => json_ok(json!({
                "deployments": self.deployments.all.values().map(|d| d.summary()).collect::<Vec<_>>()
            })),
            Op::Status(id) => match self.deployments.all.get(&id) {
                Some(d) => json_ok(d.detail()),
                None => Err(ApiError::not_found(format!("no deployment {id}"))),
            },
            Op::History(app) => {
                let entries = self.deployments.history(&app).map_err(ApiError::internal)?;
                json_ok(json!({
                    "app": app,
                    "promotions": self.deployments.promotions(&app),
                    "history": entries,
                }))
            }
            Op::Fleet => json_ok(json!({ "targets": self.fleet() })),
            Op::Metrics => Ok(Answer::Text(self.metrics())),
            Op::Rollback(_) | Op::Steer(..) | Op::Promote(_) | Op::Deploy(_) => {
                unreachable!("answered by on_api")
            }
        }
    }

    fn resolve(&self, name: &str) -> Result<(String, String, convoy_chunker::ReleaseId), ApiError> {
        let (app, version) = split_release(name)?;
        match self.chunks.store.resolve(app, version) {
            Ok(Some(id)) => Ok((app.into(), version.into(), id)),
            Ok(None) => Err(ApiError::not_found(format!("{name} is not published"))),
            Err(e) => Err(ApiError::internal(e.to_string())),
        }
    }

    /// Promotes a release; the operator is answered once it is written.
    fn promote(&mut self, r: PromoteRequest, by: String, reply: ApiReply) {
        let checked = self.resolve(&r.release).and_then(|(app, version, _)| {
            let p = self
                .deployments
                .promotion(
                    &self.config.pipelines,
                    now_unix_ms(),
                    &app,
                    &version,
                    &r.env,
                    r.force,
                )
                .map_err(ApiError::bad)?;
            Ok((app, p))
        });
        let (app, p) = match checked {
            Ok(c) => c,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let recorded = self.recorded.clone();
        let promoting = Promoting {
            app: app.clone(),
            promotion: p.clone(),
            by,
            reply,
        };
        let then = Box::new(move |result| {
            let _ = recorded.send(Internal::Promoted { promoting, result });
        });
        self.deployments.write_promotion(&app, &p, then);
    }

    /// A promotion was written (or not).
    pub(super) fn on_promoted(&mut self, p: Promoting, result: Result<(), String>) {
        if let Err(e) = result {
            let e = format!("cannot record the promotion: {e}");
            let _ = p.reply.send(Err(ApiError::internal(e)));
            return;
        }
        let (app, promotion) = (p.app, p.promotion);
        let detail = if promotion.forced {
            "forced past the pipeline's order"
        } else {
            "promoted"
        };
        let (version, env) = (&promotion.version, &promotion.env);
        let h = HistoryEntry::new(
            "promote",
            &p.by,
            detail.into(),
            Some(version),
            Some(env),
            None,
        );
        self.deployments.record(&app, &h);
        info!(app, version, env, forced = promotion.forced, "promoted");
        let _ = p.reply.send(json_ok(json!(promotion)));
        self.deployments.promoted(&app, promotion);
    }

    /// The live targets of an environment, sorted.
    fn env_targets(&self, env: &str) -> Result<(Vec<PeerId>, bool), ApiError> {
        let e = self.config.pipelines.environments.get(env).ok_or_else(|| {
            ApiError::bad(format!("no environment {env:?} in the pipelines file"))
        })?;
        let selector = parse_selector(&e.selector).map_err(ApiError::bad)?;
        let mut targets: Vec<PeerId> = self
            .members
            .iter()
            .filter(|(_, m)| self.alive(m) && selects(&selector, &m.report.labels))
            .map(|(p, _)| *p)
            .collect();
        targets.sort();
        if targets.is_empty() {
            return Err(ApiError::bad(format!(
                "no live target in {env} ({})",
                e.selector
            )));
        }
        Ok((targets, e.blue_green))
    }

    fn slice_of(&self, peer: &PeerId) -> Option<Slice> {
        match label(&self.members.get(peer)?.report.labels, "slice") {
            "blue" => Some(Slice::Blue),
            "green" => Some(Slice::Green),
            _ => None,
        }
    }

    /// The slice of `env` in load: as last recorded, else from the
    /// targets' reports (green if only green targets are, else blue).
    fn live_slice(&self, env: &str, targets: &[PeerId]) -> Slice {
        if let Some(s) = self.deployments.live_slice(env) {
            return s;
        }
        let in_load = |s: Slice| {
            targets.iter().any(|p| {
                self.slice_of(p) == Some(s) && self.members.get(p).is_some_and(|m| m.report.in_load)
            })
        };
        if in_load(Slice::Green) && !in_load(Slice::Blue) {
            Slice::Green
        } else {
            Slice::Blue
        }
    }

    /// Starts a roll-out; the operator is answered once its log is open.
    fn deploy(&mut self, r: DeployRequest, by: String, reply: ApiReply) {
        let (spec, release, load, summary) = match self.plan(&r) {
            Ok(p) => p,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        self.opening
            .insert((spec.app.clone(), spec.env.clone()), release);
        let at = now_unix_ms();
        for w in &load.warnings {
            warn!(app = spec.app, env = spec.env, "roll-out: {w}");
        }
        let (id, records) = self.deployments.open(at, &spec, release, &load);
        let opening = Opening {
            id,
            at,
            spec,
            release,
            load,
            summary,
            by,
            reply,
        };
        let recorded = self.recorded.clone();
        let then = Box::new(move |result| {
            let _ = recorded.send(Internal::Opened { opening, result });
        });
        self.deployments.write_opening(id, records, then);
    }

    /// A roll-out's log was opened (or not): its engine starts.
    pub(super) fn on_opened(&mut self, o: Opening, result: Result<(), String>) {
        self.opening
            .remove(&(o.spec.app.clone(), o.spec.env.clone()));
        if let Err(e) = result {
            let e = format!("cannot record the roll-out: {e}");
            let _ = o.reply.send(Err(ApiError::internal(e)));
            return;
        }
        let (id, app, version, env) = (
            o.id,
            o.spec.app.clone(),
            o.spec.version.clone(),
            o.spec.env.clone(),
        );
        let cmds = self.deployments.opened(id, o.release, o.at, o.spec, o.load);
        let h = HistoryEntry::new(
            "deploy",
            &o.by,
            o.summary,
            Some(&version),
            Some(&env),
            Some(id),
        );
        self.deployments.record(&app, &h);
        info!(id, app, version, env, "roll-out started");
        self.execute(id, cmds);
        self.drain_queue();
        let _ = o.reply.send(Ok(Answer::Json(
            StatusCode::CREATED,
            self.deployments.all[&id].summary(),
        )));
    }

    /// What a deploy request asks for, checked: the roll-out's spec, the
    /// release, the drain and a summary for the history.
    fn plan(
        &self,
        r: &DeployRequest,
    ) -> Result<(Spec, convoy_chunker::ReleaseId, LoadTerms, String), ApiError> {
        let (app, version, release) = self.resolve(&r.release)?;
        if let Some(d) = self.deployments.running(&app, &r.env) {
            return Err(ApiError::conflict(format!(
                "deployment {} ({}@{} to {}) is running; wait for it or abort it",
                d.id, app, d.rollout.spec.version, r.env
            )));
        }
        if self.opening.contains_key(&(app.clone(), r.env.clone())) {
            return Err(ApiError::conflict(format!(
                "a deployment of {app} to {} is being started; try again in a moment",
                r.env
            )));
        }
        let pipelines = &self.config.pipelines;
        self.deployments
            .deployable(pipelines, &app, &version, &r.env)
            .map_err(ApiError::bad)?;
        let o = r.over(&pipelines.app(&app).map_err(ApiError::bad)?.rollout);
        let settings = pipelines
            .settings(&app, &r.env, &o)
            .map_err(ApiError::bad)?;
        let (targets, blue_green) = self.env_targets(&r.env)?;
        let mut members = Vec::new();
        for p in &targets {
            let slice = self.slice_of(p);
            if blue_green && slice.is_none() {
                return Err(ApiError::bad(format!(
                    "target {p} of blue-green environment {} has no slice=blue or slice=green label",
                    r.env
                )));
            }
            members.push(Member {
                id: p.to_string(),
                slice: if blue_green { slice } else { None },
            });
        }
        let spec = Spec {
            app: app.clone(),
            version: version.clone(),
            env: r.env.clone(),
            strategy: settings.strategy,
            waves: settings.waves,
            mode: settings.mode,
            max_failures: settings.max_failures,
            progress_deadline_ms: settings.progress_deadline_ms,
            targets: members,
            live_slice: blue_green.then(|| self.live_slice(&r.env, &targets)),
            ordered_loads: true,
        };
        let summary = format!(
            "{} in {} mode to {} targets",
            spec.strategy.name(),
            spec.mode.name(),
            targets.len()
        );
        let load = LoadTerms {
            drain_ms: settings.drain_ms,
            settle_ms: settings.settle_ms,
            warnings: settings.warnings,
        };
        Ok((spec, release, load, summary))
    }

    /// Pauses, resumes or aborts roll-out `id`; the operator is answered
    /// once the event is written and applied.
    fn steer(&mut self, id: u64, steer: Steer, by: String, reply: ApiReply) {
        let Some(d) = self.deployments.all.get(&id) else {
            let _ = reply.send(Err(ApiError::not_found(format!("no deployment {id}"))));
            return;
        };
        if d.rollout.is_done() {
            let _ = reply.send(Err(ApiError::conflict(format!(
                "deployment {id} has ended ({})",
                d.summary()["outcome"].as_str().unwrap_or("done")
            ))));
            return;
        }
        let (event, action) = match steer {
            Steer::Pause => (Event::Pause, "pause"),
            Steer::Resume => (Event::Resume, "resume"),
            Steer::Abort => (Event::Abort, "abort"),
        };
        let steered = Steered { action, by, reply };
        self.record_event(id, event, Some(steered));
    }

    /// An environment back to its previous release: blue-green swaps the
    /// slices back (the idle one kept it); others roll every target back.
    fn rollback_env(
        &mut self,
        r: RollbackRequest,
        by: String,
        reply: ApiReply,
    ) -> Result<(), ApiError> {
        let refuse = |reply: ApiReply, e: ApiError| {
            let msg = e.message.clone();
            let _ = reply.send(Err(e));
            ApiError::bad(msg)
        };
        if let Some(d) = self.deployments.running(&r.app, &r.env) {
            let e = ApiError::conflict(format!(
                "deployment {} of {} to {} is running: abort it (it rolls back)",
                d.id, r.app, r.env
            ));
            return Err(refuse(reply, e));
        }
        let (targets, blue_green) = match self.env_targets(&r.env) {
            Ok(t) => t,
            Err(e) => return Err(refuse(reply, e)),
        };
        let orders: Vec<(PeerId, ControlRequest)> = if blue_green {
            let live = self.live_slice(&r.env, &targets);
            self.deployments.set_live_slice(&r.env, live.other());
            targets
                .iter()
                .filter_map(|p| {
                    let s = self.slice_of(p)?;
                    let in_load = s != live;
                    Some((
                        *p,
                        ControlRequest::SetLoad {
                            in_load,
                            wait_ms: 0,
                        },
                    ))
                })
                .collect()
        } else {
            targets
                .iter()
                .filter(|p| {
                    self.members
                        .get(p)
                        .is_some_and(|m| m.report.active.contains_key(&r.app))
                })
                .map(|p| {
                    let rollback = ControlRequest::Rollback {
                        app: r.app.clone(),
                        drain_ms: None,
                        settle_ms: 0,
                    };
                    (*p, rollback)
                })
                .collect()
        };
        let what = if blue_green {
            format!("slices swapped back in {}", r.env)
        } else {
            format!("{} targets of {} rolled back", orders.len(), r.env)
        };
        let h = HistoryEntry::new("rollback", &by, what.clone(), None, Some(&r.env), None);
        self.deployments.record(&r.app, &h);
        info!(app = r.app, env = r.env, "{what}");
        let net = self.net.clone();
        tokio::spawn(async move {
            let results = futures::future::join_all(orders.into_iter().map(|(p, req)| {
                let net = net.clone();
                async move {
                    let r = match net.control(p, req).await {
                        Ok(ControlResponse::Ok) => Ok(()),
                        Ok(ControlResponse::Error(e)) => Err(e),
                        Ok(other) => Err(format!("unexpected answer {other:?}")),
                        Err(e) => Err(e.to_string()),
                    };
                    (p.to_string(), r)
                }
            }))
            .await;
            let failed: BTreeMap<String, String> = results
                .iter()
                .filter_map(|(p, r)| r.clone().err().map(|e| (p.clone(), e)))
                .collect();
            let _ = reply.send(Ok(Answer::Json(
                StatusCode::OK,
                json!({
                    "app": r.app,
                    "env": r.env,
                    "what": what,
                    "targets": results.len(),
                    "failed": failed,
                }),
            )));
        });
        Ok(())
    }

    /// Feeds an event to roll-out `id` and carries out what follows.
    pub(super) fn rollout_event(&mut self, id: u64, event: Event) {
        self.queue.push_back((id, event));
        self.drain_queue();
    }

    /// Hands every queued event to the recorder; each is applied when it
    /// is written ([`Coordinator::on_recorded`]), so the loop never waits
    /// on the disk and the engine sees events in the order they are written.
    pub(super) fn drain_queue(&mut self) {
        while let Some((id, event)) = self.queue.pop_front() {
            self.record_event(id, event, None);
        }
    }

    /// Writes `event` of roll-out `id`, then applies it; `steered` answers
    /// the operator who asked for it.
    fn record_event(&mut self, id: u64, event: Event, steered: Option<Steered>) {
        let waiting = self.recording.get(&id).copied().unwrap_or(0);
        // A tick must see what the events before it make; the next one will.
        if event == Event::Tick && waiting > 0 {
            return;
        }
        let at = now_unix_ms();
        let Some(record) = self.deployments.prepare(id, at, &event) else {
            if let Some(s) = steered {
                let _ = s.reply.send(json_ok(self.deployments.all[&id].detail()));
            }
            return;
        };
        *self.recording.entry(id).or_default() += 1;
        let recorded = self.recorded.clone();
        let then = Box::new(move |result: Result<(), String>| {
            // The loop has stopped if this fails: nothing waits for it.
            let _ = recorded.send(Internal::Recorded {
                id,
                at,
                event,
                result,
                steered,
            });
        });
        self.deployments.write(id, record, then);
    }

    /// An event of roll-out `id` was written (or not): the engine sees it
    /// and what it commands is carried out.
    pub(super) fn on_recorded(
        &mut self,
        id: u64,
        at: u64,
        event: Event,
        result: Result<(), String>,
        steered: Option<Steered>,
    ) {
        if let Some(n) = self.recording.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                self.recording.remove(&id);
            }
        }
        match result {
            Ok(()) => {
                let cmds = self.deployments.apply(id, at, event);
                self.execute(id, cmds);
                if let Some(s) = steered {
                    let d = &self.deployments.all[&id];
                    let (app, version, env) = (
                        &d.rollout.spec.app,
                        &d.rollout.spec.version,
                        &d.rollout.spec.env,
                    );
                    let detail = format!("deployment {id}");
                    let h = HistoryEntry::new(
                        s.action,
                        &s.by,
                        detail,
                        Some(version),
                        Some(env),
                        Some(id),
                    );
                    self.deployments.record(&app.clone(), &h);
                    info!(id, action = s.action, "operator steers a roll-out");
                    let _ = s.reply.send(json_ok(self.deployments.all[&id].detail()));
                }
            }
            Err(e) => {
                let e =
                    format!("cannot record an event of roll-out {id}, so it is not applied: {e}");
                error!("{e}");
                if let Some(s) = steered {
                    let _ = s.reply.send(Err(ApiError::internal(e)));
                }
            }
        }
        self.drain_queue();
    }

    fn execute(&mut self, id: u64, cmds: Vec<Command>) {
        let Some(d) = self.deployments.all.get(&id) else {
            return;
        };
        let (release, app, mode) = (d.release, d.rollout.spec.app.clone(), d.rollout.spec.mode);
        let load = d.load.clone();
        let (drain_ms, settle_ms) = (load.drain_ms, load.settle_ms);
        // Rolling targets leave load around a change of release; the
        // others are out of load already (blue-green's idle slice) or
        // change in load (live).
        let rolling = d.rollout.spec.strategy == Strategy::Rolling;
        let name = format!("{}@{}", app, d.rollout.spec.version);
        for c in cmds {
            let order = match c {
                Command::Stage(targets) => {
                    self.stage_for(id, &name, release, mode, targets);
                    continue;
                }
                Command::Notice(n) => {
                    self.on_notice(id, n);
                    continue;
                }
                Command::Deliver { target, drain } => (
                    target,
                    ControlRequest::Deliver {
                        release,
                        drain_ms: drain.then_some(drain_ms),
                        settle_ms,
                    },
                ),
                Command::SetLoad { target, in_load } => {
                    let wait_ms = load.wait_ms(in_load);
                    (target, ControlRequest::SetLoad { in_load, wait_ms })
                }
                Command::Rollback(target) => {
                    let rollback = ControlRequest::Rollback {
                        app: app.clone(),
                        drain_ms: rolling.then_some(drain_ms),
                        settle_ms,
                    };
                    (target, rollback)
                }
            };
            self.send_order(id, order.0, order.1);
        }
    }

    /// Sends an order; the target's answer comes back as an event. An
    /// order that cannot reach its target (not connected, the coordinator
    /// just restarted) waits for the target's next report; a target that
    /// never comes back fails by its progress deadline.
    pub(super) fn send_order(&mut self, id: u64, target: String, req: ControlRequest) {
        let answer_event = |target: String, req: &ControlRequest, r: Result<(), String>| match req {
            ControlRequest::Deliver { .. } => r.err().map(|e| Event::Delivered(target, Err(e))),
            ControlRequest::SetLoad { .. } => Some(Event::LoadSet(target, r)),
            _ => Some(Event::RolledBack(target, r)),
        };
        let Ok(peer) = target.parse::<PeerId>() else {
            let ev = answer_event(
                target.clone(),
                &req,
                Err(format!("{target:?} is not a peer id")),
            );
            if let Some(ev) = ev {
                self.queue.push_back((id, ev));
            }
            return;
        };
        if !self.members.get(&peer).is_some_and(|m| self.alive(m)) {
            info!(id, %peer, "target away: its order waits for its next report");
            self.defer(peer, id, req);
            return;
        }
        let net = self.net.clone();
        let tx = self.internal.clone();
        tokio::spawn(async move {
            let r = match net.control(peer, req.clone()).await {
                Ok(ControlResponse::Ok) => Ok(()),
                Ok(ControlResponse::Error(e)) => Err(e),
                Ok(other) => Err(format!("unexpected answer {other:?}")),
                Err(e) => {
                    warn!(id, %peer, "order not delivered ({e}); sent again on its next report");
                    let _ = tx
                        .send(Internal::Undelivered {
                            id,
                            peer,
                            request: req,
                        })
                        .await;
                    return;
                }
            };
            if let Some(event) = answer_event(target, &req, r) {
                let _ = tx.send(Internal::Rollout { id, event }).await;
            }
        });
    }

    /// Distribution for a roll-out: targets that hold the release already
    /// are staged; the others get a staging run.
    fn stage_for(
        &mut self,
        id: u64,
        name: &str,
        release: convoy_chunker::ReleaseId,
        mode: crate::protocol::DistributionMode,
        targets: Vec<String>,
    ) {
        let mut run_targets = Vec::new();
        for t in targets {
            let peer = t.parse::<PeerId>().ok();
            let held = peer
                .and_then(|p| self.members.get(&p))
                .is_some_and(|m| m.report.releases.contains(&release));
            match peer {
                _ if held => self.queue.push_back((id, Event::Staged(t, Ok(())))),
                Some(p) => run_targets.push(p),
                None => self
                    .queue
                    .push_back((id, Event::Staged(t, Err("not a peer id".into())))),
            }
        }
        // A run restored after a restart, or one being started, may
        // already cover them.
        let covers = |r: ReleaseId, has: &dyn Fn(&PeerId) -> bool| {
            r == release && run_targets.iter().all(has)
        };
        let covered = self
            .runs
            .values()
            .any(|r| !self.run_finished(r) && covers(r.release, &|t| r.targets.contains(t)))
            || self.starting.values().any(|s| {
                let targets: HashSet<&PeerId> = s.targets.iter().collect();
                s.release
                    .is_some_and(|r| covers(r, &|t| targets.contains(t)))
            });
        if run_targets.is_empty() || covered {
            return;
        }
        let begun = super::Begun::Rollout(id);
        self.begin_run(name, Some(release), run_targets, mode, begun);
    }

    fn on_notice(&mut self, id: u64, n: Notice) {
        match &n {
            Notice::Failed { target, reason } => {
                warn!(id, target, "roll-out target failed: {reason}")
            }
            Notice::Halted(why) => warn!(id, "roll-out halts: {why}"),
            other => info!(id, notice = ?other, "roll-out"),
        }
        let Notice::Finished(outcome) = n else {
            return;
        };
        let Some(d) = self.deployments.all.get(&id) else {
            return;
        };
        let (spec, live) = (d.rollout.spec.clone(), d.rollout.live_slice);
        let detail = format!(
            "deployment {id} {}: {} targets, {} failed",
            outcome.name(),
            d.rollout.targets.len(),
            d.rollout.failures
        );
        let h = HistoryEntry::new(
            "finished",
            "coordinator",
            detail,
            Some(&spec.version),
            Some(&spec.env),
            Some(id),
        );
        self.deployments.record(&spec.app, &h);
        if let Some(live) = live {
            self.deployments.set_live_slice(&spec.env, live);
        }
    }

    /// Staging progress from a target's report, for the roll-outs it is in.
    pub(super) fn rollout_progress(&mut self, peer: PeerId) {
        let Some(m) = self.members.get(&peer) else {
            return;
        };
        let tid = peer.to_string();
        let mut events = Vec::new();
        for d in self.deployments.all.values_mut() {
            let Some(t) = d.rollout.targets.get(&tid) else {
                continue;
            };
            // Given up on, yet running the release (a delivery that timed
            // out, or a target killed after its switch and restarted): a
            // late delivery, which the engine keeps or sends back.
            let running_it =
                m.report.active.get(&d.rollout.spec.app) == Some(&d.rollout.spec.version);
            if running_it
                && matches!(t.state, TargetState::Failed(_))
                && t.deliver_sent
                && !t.activated
            {
                events.push((d.id, Event::Delivered(tid.clone(), Ok(()))));
            }
            let staging = t.state == TargetState::Staging && !d.rollout.is_done();
            if let Some(p) = m.report.stagings.iter().find(|p| p.release == d.release) {
                let seen = d.stage_seen.entry(tid.clone()).or_default();
                d.bytes_moved += p.bytes_received.saturating_sub(seen.1);
                let gained = p.chunks_held > seen.0;
                *seen = (p.chunks_held.max(seen.0), p.bytes_received.max(seen.1));
                if staging {
                    match &p.state {
                        StageState::Staged => {
                            events.push((d.id, Event::Staged(tid.clone(), Ok(()))))
                        }
                        StageState::Failed(e) => {
                            events.push((d.id, Event::Staged(tid.clone(), Err(e.clone()))))
                        }
                        StageState::Running if gained => {
                            events.push((d.id, Event::StageProgress(tid.clone())))
                        }
                        StageState::Running => {}
                    }
                    continue;
                }
            }
            if staging && m.report.releases.contains(&d.release) {
                events.push((d.id, Event::Staged(tid.clone(), Ok(()))));
            }
        }
        self.queue.extend(events);
        self.drain_queue();
    }

    /// A target's report of how a delivery ended.
    pub(super) fn on_delivered(&mut self, peer: PeerId, report: DeliveryReport) {
        let tid = peer.to_string();
        let ids: Vec<u64> = self
            .deployments
            .all
            .values_mut()
            .filter(|d| d.release == report.release && d.rollout.targets.contains_key(&tid))
            .map(|d| {
                if report.result.is_ok() {
                    d.activations
                        .insert(tid.clone(), (report.switch_us, report.total_ms));
                }
                d.id
            })
            .collect();
        for id in ids {
            let r = report.result.clone().map(|_| ());
            self.queue.push_back((id, Event::Delivered(tid.clone(), r)));
        }
        self.drain_queue();
    }

    /// The clock: deadlines, stragglers, and after a restart the orders
    /// that were in flight.
    pub(super) fn tick_rollouts(&mut self) {
        if let Some(at) = self.resend_at {
            if Instant::now() < at {
                return;
            }
            self.resend_at = None;
            let running: Vec<u64> = self
                .deployments
                .all
                .values()
                .filter(|d| !d.rollout.is_done())
                .map(|d| d.id)
                .collect();
            for id in running {
                let d = &self.deployments.all[&id];
                info!(id, "resuming a roll-out after a restart");
                // Deadlines count from now: the coordinator was away.
                let targets: Vec<String> = d.rollout.targets.keys().cloned().collect();
                let resend = d.rollout.resend();
                for t in targets {
                    self.queue.push_back((id, Event::StageProgress(t)));
                }
                self.drain_queue();
                self.execute(id, resend);
            }
        }
        let running: Vec<u64> = self
            .deployments
            .all
            .values()
            .filter(|d| !d.rollout.is_done() && !matches!(d.rollout.phase, Phase::Paused(_)))
            .map(|d| d.id)
            .collect();
        for id in running {
            self.queue.push_back((id, Event::Tick));
        }
        self.drain_queue();
    }

    /// Prometheus text: targets by state, bytes by mode, roll-outs and
    /// their wave durations.
    fn metrics(&self) -> String {
        let mut out = String::new();
        let (mut alive, mut down, mut drained) = (0, 0, 0);
        for m in self.members.values() {
            if !self.alive(m) {
                down += 1;
            } else if !m.report.in_load {
                drained += 1;
            } else {
                alive += 1;
            }
        }
        out.push_str(
            "# HELP convoy_targets Registered targets by state.\n# TYPE convoy_targets gauge\n",
        );
        for (s, n) in [("in_load", alive), ("drained", drained), ("down", down)] {
            let _ = writeln!(out, "convoy_targets{{state=\"{s}\"}} {n}");
        }
        out.push_str("# HELP convoy_bytes_moved_total Chunk bytes targets received, by distribution mode.\n# TYPE convoy_bytes_moved_total counter\n");
        for mode in ["swarm", "push", "pull"] {
            let n = self.bytes_by_mode.get(mode).copied().unwrap_or(0);
            let _ = writeln!(out, "convoy_bytes_moved_total{{mode=\"{mode}\"}} {n}");
        }
        out.push_str("# HELP convoy_origin_bytes_sent_total Chunk bytes the origin sent.\n# TYPE convoy_origin_bytes_sent_total counter\n");
        let _ = writeln!(
            out,
            "convoy_origin_bytes_sent_total {}",
            self.chunks
                .bytes_sent
                .load(std::sync::atomic::Ordering::Relaxed)
        );
        let wire = self.net.wire_bytes();
        out.push_str("# HELP convoy_wire_bytes_total Bytes the origin's TCP connections carried, by direction: chunk bodies, control, announcements, framing and all.\n# TYPE convoy_wire_bytes_total counter\n");
        for (direction, n) in [("sent", wire.sent), ("received", wire.received)] {
            let _ = writeln!(
                out,
                "convoy_wire_bytes_total{{direction=\"{direction}\"}} {n}"
            );
        }
        let d = &self.deltas.counters;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        out.push_str("# HELP convoy_delta_patches_total Patches (a release's deltas from one older release) by outcome: made, reused (found in the store), failed.\n# TYPE convoy_delta_patches_total counter\n");
        for (what, n) in [
            ("made", &d.made),
            ("reused", &d.reused),
            ("failed", &d.failed),
        ] {
            let _ = writeln!(
                out,
                "convoy_delta_patches_total{{result=\"{what}\"}} {}",
                load(n)
            );
        }
        out.push_str("# HELP convoy_delta_bytes_total Bytes of the deltas made.\n# TYPE convoy_delta_bytes_total counter\n");
        let _ = writeln!(out, "convoy_delta_bytes_total {}", load(&d.delta_bytes));
        out.push_str("# HELP convoy_delta_replaced_wire_bytes_total Wire bytes of the new chunks the deltas made replace, for one target holding each base: what a target upgrading with them saves.\n# TYPE convoy_delta_replaced_wire_bytes_total counter\n");
        let _ = writeln!(
            out,
            "convoy_delta_replaced_wire_bytes_total {}",
            load(&d.replaced_wire_bytes)
        );
        out.push_str("# HELP convoy_delta_input_bytes_total Bytes of the changed files deltas were made from.\n# TYPE convoy_delta_input_bytes_total counter\n");
        let _ = writeln!(
            out,
            "convoy_delta_input_bytes_total {}",
            load(&d.changed_bytes)
        );
        out.push_str("# HELP convoy_delta_cpu_seconds_total CPU time spent making deltas.\n# TYPE convoy_delta_cpu_seconds_total counter\n");
        let _ = writeln!(
            out,
            "convoy_delta_cpu_seconds_total {:.3}",
            load(&d.cpu_micros) as f64 / 1e6
        );
        out.push_str("# HELP convoy_delta_orders_total Staging orders targets took with a patch from a release they hold.\n# TYPE convoy_delta_orders_total counter\n");
        let _ = writeln!(out, "convoy_delta_orders_total {}", load(&d.orders));
        out.push_str("# HELP convoy_delta_spared_wire_bytes_total Wire bytes the targets that took a patch were spared, as planned for a holder of its base: the release's chunks the rebuilt files replace, less the deltas.\n# TYPE convoy_delta_spared_wire_bytes_total counter\n");
        let _ = writeln!(
            out,
            "convoy_delta_spared_wire_bytes_total {}",
            load(&d.spared_wire_bytes)
        );
        out.push_str("# HELP convoy_order_manifest_bytes_total Manifest bytes of the staging orders targets took: as a delta against a release the target holds (delta), or whole.\n# TYPE convoy_order_manifest_bytes_total counter\n");
        for (form, n) in [
            ("delta", &self.order_bytes.delta),
            ("whole", &self.order_bytes.whole),
        ] {
            let _ = writeln!(
                out,
                "convoy_order_manifest_bytes_total{{form=\"{form}\"}} {}",
                load(n)
            );
        }
        out.push_str("# HELP convoy_refused_total Refused attempts: peers without the fleet key (not_member), operator requests from peers that are not operators (not_operator), API requests without a valid token (bad_token).\n# TYPE convoy_refused_total counter\n");
        let r = &self.config.refusals;
        for (what, n) in [
            ("not_member", self.net.peers_refused()),
            (
                "not_operator",
                r.not_operator.load(std::sync::atomic::Ordering::Relaxed),
            ),
            (
                "bad_token",
                r.bad_token.load(std::sync::atomic::Ordering::Relaxed),
            ),
        ] {
            let _ = writeln!(out, "convoy_refused_total{{what=\"{what}\"}} {n}");
        }
        let mut by_state: BTreeMap<&str, usize> = BTreeMap::new();
        for d in self.deployments.all.values() {
            let s = d.summary()["outcome"].as_str().map(str::to_string);
            let key = match s.as_deref() {
                Some("succeeded") => "succeeded",
                Some("rolled_back") => "rolled_back",
                Some("failed") => "failed",
                Some("aborted") => "aborted",
                _ => "running",
            };
            *by_state.entry(key).or_default() += 1;
        }
        out.push_str("# HELP convoy_rollouts Roll-outs by state.\n# TYPE convoy_rollouts gauge\n");
        for s in ["running", "succeeded", "rolled_back", "failed", "aborted"] {
            let _ = writeln!(
                out,
                "convoy_rollouts{{state=\"{s}\"}} {}",
                by_state.get(s).unwrap_or(&0)
            );
        }
        out.push_str("# HELP convoy_rollout_duration_seconds Distribution and delivery time of recent roll-outs.\n# TYPE convoy_rollout_duration_seconds gauge\n");
        let mut waves = String::from("# HELP convoy_wave_duration_seconds Duration of each wave of recent roll-outs.\n# TYPE convoy_wave_duration_seconds gauge\n");
        for d in self.deployments.all.values().rev().take(20) {
            let s = &d.rollout.spec;
            let labels = format!(
                "id=\"{}\",app=\"{}\",env=\"{}\",strategy=\"{}\"",
                d.id,
                s.app,
                s.env,
                s.strategy.name()
            );
            for (phase, ms) in [
                ("distribution", d.rollout.distribution_ms),
                ("delivery", d.rollout.delivery_ms),
            ] {
                if let Some(ms) = ms {
                    let _ = writeln!(
                        out,
                        "convoy_rollout_duration_seconds{{{labels},phase=\"{phase}\"}} {}",
                        ms as f64 / 1000.0
                    );
                }
            }
            for (_, n) in &d.notices {
                if let Notice::WaveDone { wave, ms } = n {
                    let _ = writeln!(
                        waves,
                        "convoy_wave_duration_seconds{{{labels},wave=\"{wave}\"}} {}",
                        *ms as f64 / 1000.0
                    );
                }
            }
        }
        out.push_str(&waves);
        out
    }
}
