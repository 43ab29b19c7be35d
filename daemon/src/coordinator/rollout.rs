//! The roll-out engine: one deployment of a release to an environment, as
//! a sans-I/O state machine.
//!
//! Events go in through [`Rollout::handle`] with the time they happened;
//! commands come out. Nothing here touches a clock, a socket or a disk, so
//! the coordinator persists the events and, after a restart, replays them
//! into a fresh engine ([`Rollout::replay`]) and re-sends what was in
//! flight ([`Rollout::resend`]).
//!
//! A roll-out first distributes the release to every target of the
//! environment, then delivers it wave by wave:
//!
//! - live: each wave's targets activate it while they stay in load;
//! - rolling: each wave's targets are drained, activate it, validate and
//!   go back into load (the target does all four on one `Deliver`);
//! - blue-green: the idle slice's targets activate it out of load, then
//!   the slices swap at once: the idle slice goes into load and the live
//!   one is drained, keeping the previous release for a switch back.
//!   Waves do not apply: the idle slice is one wave.
//!
//! **Failure threshold.** A target fails when its staging or delivery
//! fails, or makes no progress for twice the progress deadline. Failures
//! are counted over the whole roll-out, one per target. The roll-out halts
//! as soon as the count exceeds the threshold: a count `N` tolerates `N`
//! failures; a percentage `P` tolerates `floor(P% × targets)`. The default,
//! 0, halts on the first failure. Halting rolls back every target that
//! activated the release in this roll-out (blue-green after the swap:
//! swaps back), so the environment ends on the release it had before.
//!
//! **Abort** does the same as a halt — every target ends on its previous
//! release — and ends `aborted`. **Pause** takes effect between waves: the
//! running wave finishes, the next one waits for resume.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use convoy_protocol::plan::{parse_waves, wave_ends, Amount, Slice, Strategy};

use crate::protocol::DistributionMode;

/// Milliseconds since the Unix epoch: events are stamped with it.
pub type Millis = u64;

/// A target, by its peer id's text.
pub type TargetId = String;

/// One target of the environment, as the roll-out starts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// Its peer id.
    pub id: TargetId,
    /// Its blue-green slice, if it has one.
    pub slice: Option<Slice>,
}

/// What to roll out, where and how.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    /// The app.
    pub app: String,
    /// The release (`app@version` name).
    pub version: String,
    /// The environment.
    pub env: String,
    /// How it goes live.
    pub strategy: Strategy,
    /// Waves (ignored by blue-green).
    pub waves: Vec<Amount>,
    /// How it is distributed.
    pub mode: DistributionMode,
    /// Failures tolerated before halting.
    pub max_failures: Amount,
    /// A target without progress this long is slow; twice this, failed.
    pub progress_deadline_ms: u64,
    /// The environment's targets.
    pub targets: Vec<Member>,
    /// Blue-green: the slice in load before the roll-out.
    pub live_slice: Option<Slice>,
    /// Blue-green: the idle slice leaves load before it is delivered to,
    /// and a swap drains the old slice only once the new one is in load.
    /// Off in roll-outs recorded before it existed, so that their logs
    /// replay as they ran.
    #[serde(default)]
    pub ordered_loads: bool,
}

/// The events a roll-out reacts to; they are what the coordinator persists.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// The roll-out was created; always the first event.
    Started(Spec),
    /// A target's staging gained chunks.
    StageProgress(TargetId),
    /// A target's staging finished (`Err` with the reason if it failed).
    Staged(TargetId, Result<(), String>),
    /// A target activated the release (or failed to).
    Delivered(TargetId, Result<(), String>),
    /// A target went into or out of load (blue-green swap).
    LoadSet(TargetId, Result<(), String>),
    /// A target went back to its previous release.
    RolledBack(TargetId, Result<(), String>),
    /// An operator paused the roll-out.
    Pause,
    /// An operator resumed it.
    Resume,
    /// An operator aborted it.
    Abort,
    /// Time passed (deadlines and stragglers are checked).
    Tick,
}

/// What the engine wants done.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Distribute the release to these targets.
    Stage(Vec<TargetId>),
    /// Activate the release on a target; `drain` first (rolling).
    Deliver {
        /// The target.
        target: TargetId,
        /// Drain before, undrain after validation.
        drain: bool,
    },
    /// Put a target into load or take it out.
    SetLoad {
        /// The target.
        target: TargetId,
        /// In load (health 200) or drained (503).
        in_load: bool,
    },
    /// Activate the target's previous release again.
    Rollback(TargetId),
    /// Something an operator should see.
    Notice(Notice),
}

/// What an operator sees while a roll-out runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Notice {
    /// Distribution finished: so many targets staged.
    Distributed {
        /// Targets that staged the release.
        staged: usize,
        /// Milliseconds distribution took.
        ms: u64,
    },
    /// A wave began.
    WaveStarted {
        /// Its number, from 0.
        wave: usize,
        /// Its targets.
        targets: Vec<TargetId>,
    },
    /// A wave ended.
    WaveDone {
        /// Its number.
        wave: usize,
        /// Milliseconds it took.
        ms: u64,
    },
    /// No progress for the deadline.
    Slow(TargetId),
    /// Slower than three times its wave's median.
    Straggler {
        /// The target.
        target: TargetId,
        /// Milliseconds it has taken so far.
        ms: u64,
        /// The wave's median.
        median_ms: u64,
    },
    /// A target failed.
    Failed {
        /// The target.
        target: TargetId,
        /// Why.
        reason: String,
    },
    /// The slices swapped (blue-green).
    Switched {
        /// The slice now in load.
        live: Slice,
    },
    /// The roll-out halts and rolls back.
    Halted(String),
    /// Something unsafe about the roll-out's settings (given at its start).
    Warning(String),
    /// Paused between waves.
    Paused,
    /// Resumed.
    Resumed,
    /// The roll-out ended.
    Finished(Outcome),
}

/// How a roll-out ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Every target that staged runs the release.
    Succeeded,
    /// It halted past the failure threshold after a target activated the
    /// release or reported that activating it failed, and every target is
    /// back on its previous release (those whose activation failed
    /// switched back themselves).
    RolledBack,
    /// It halted before any target activated or reported a failed
    /// activation (distribution failed, or deliveries timed out), or a
    /// rollback itself failed.
    Failed,
    /// An operator aborted it; every delivered target is back on its
    /// previous release.
    Aborted,
}

impl Outcome {
    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::RolledBack => "rolled_back",
            Self::Failed => "failed",
            Self::Aborted => "aborted",
        }
    }
}

/// Where the roll-out is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Phase {
    /// Every target stages the release.
    Distributing,
    /// Wave `n` delivers.
    Delivering(usize),
    /// Between waves, paused.
    Paused(usize),
    /// Blue-green: the slices swap.
    Switching,
    /// Halted or aborted: delivered targets go back.
    RollingBack,
    /// Over.
    Done(Outcome),
}

/// Where one target is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum TargetState {
    /// Getting the chunks.
    Staging,
    /// Every chunk held, waiting for its wave.
    Staged,
    /// Activating since `since`.
    Delivering,
    /// Runs the release.
    Delivered,
    /// Going back to its previous release.
    RollingBack,
    /// Back on its previous release.
    RolledBack,
    /// Failed, with the reason.
    Failed(String),
}

/// One target's record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TargetRecord {
    /// Its slice.
    pub slice: Option<Slice>,
    /// Where it is.
    pub state: TargetState,
    /// When its current step started.
    pub since: Millis,
    /// When it last made progress.
    pub progress: Millis,
    /// Reported slow for the current step.
    pub slow: bool,
    /// Reported as a straggler in its wave.
    pub straggler: bool,
    /// Milliseconds its delivery took.
    pub delivery_ms: Option<u64>,
    /// It activated the release in this roll-out (so a halt rolls it back).
    pub activated: bool,
    /// It was told to deliver (so a late success after a timeout counts).
    pub deliver_sent: bool,
    /// It is counted among the failures.
    pub counted: bool,
    /// Blue-green: waiting for its load change.
    pub load_pending: bool,
    /// Blue-green: its drain waits until every target going into load is
    /// (a load balancer must never find both slices out).
    #[serde(default)]
    pub load_deferred: bool,
    /// It reported a failed delivery, so it is back on its previous release.
    #[serde(default)]
    pub switched_back: bool,
}

/// One roll-out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// What is rolled out.
    pub spec: Spec,
    /// Where it is.
    pub phase: Phase,
    /// Every target, by id.
    pub targets: BTreeMap<TargetId, TargetRecord>,
    /// The targets of each wave, filled as waves start.
    pub waves: Vec<Vec<TargetId>>,
    /// The cumulative wave ends over the staged targets.
    wave_ends: Vec<usize>,
    /// Targets that failed, counted once each.
    pub failures: usize,
    /// An operator asked to pause before the next wave.
    pub pause_requested: bool,
    /// An operator aborted.
    pub aborted: bool,
    /// When it started, and when the current wave started.
    pub started: Millis,
    wave_started: Millis,
    /// Blue-green: the slice in load now.
    pub live_slice: Option<Slice>,
    /// Distribution took this long.
    pub distribution_ms: Option<u64>,
    /// Delivery took this long (first wave's start to the end).
    pub delivery_ms: Option<u64>,
    /// When it ended.
    pub ended: Option<Millis>,
}

impl Rollout {
    /// Starts a roll-out: every target stages the release.
    pub fn start(at: Millis, spec: Spec) -> (Self, Vec<Command>) {
        let targets = spec
            .targets
            .iter()
            .map(|m| {
                (
                    m.id.clone(),
                    TargetRecord {
                        slice: m.slice,
                        state: TargetState::Staging,
                        since: at,
                        progress: at,
                        slow: false,
                        straggler: false,
                        delivery_ms: None,
                        activated: false,
                        deliver_sent: false,
                        counted: false,
                        load_pending: false,
                        load_deferred: false,
                        switched_back: false,
                    },
                )
            })
            .collect();
        let mut r = Self {
            live_slice: spec.live_slice,
            spec,
            phase: Phase::Distributing,
            targets,
            waves: Vec::new(),
            wave_ends: Vec::new(),
            failures: 0,
            pause_requested: false,
            aborted: false,
            started: at,
            wave_started: at,
            distribution_ms: None,
            delivery_ms: None,
            ended: None,
        };
        let all: Vec<TargetId> = r.targets.keys().cloned().collect();
        let mut out = vec![Command::Stage(all)];
        // Blue-green: the idle slice leaves load (after a rolling or live
        // roll-out both slices may be in) before it gets the release.
        if r.spec.ordered_loads && r.spec.strategy == Strategy::BlueGreen && r.live_slice.is_some()
        {
            r.set_loads(at, &mut out);
        }
        // An empty environment has nothing to wait for.
        r.advance(at, &mut out);
        (r, out)
    }

    /// Rebuilds a roll-out from its persisted events, discarding the
    /// commands they produced; `None` if the first is not `Started`.
    pub fn replay<'a>(events: impl IntoIterator<Item = &'a (Millis, Event)>) -> Option<Self> {
        let mut events = events.into_iter();
        let (at, Event::Started(spec)) = events.next()? else {
            return None;
        };
        let (mut r, _) = Self::start(*at, spec.clone());
        for (at, e) in events {
            r.handle(*at, e.clone());
        }
        Some(r)
    }

    /// The commands still awaiting an answer: after a restart the
    /// coordinator sends them again (targets treat them idempotently).
    pub fn resend(&self) -> Vec<Command> {
        let mut out = Vec::new();
        let staging: Vec<TargetId> = self
            .targets_in(|s| *s == TargetState::Staging)
            .cloned()
            .collect();
        if !staging.is_empty() && !self.is_done() {
            out.push(Command::Stage(staging));
        }
        for (id, t) in &self.targets {
            match t.state {
                TargetState::Delivering => out.push(Command::Deliver {
                    target: id.clone(),
                    drain: self.spec.strategy == Strategy::Rolling,
                }),
                TargetState::RollingBack => out.push(Command::Rollback(id.clone())),
                _ if t.load_pending && !t.load_deferred => out.push(Command::SetLoad {
                    target: id.clone(),
                    in_load: self.should_be_in_load(t),
                }),
                _ => {}
            }
        }
        out
    }

    /// Whether the roll-out is over.
    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done(_))
    }

    /// Feeds one event at time `at`; returns what to do.
    pub fn handle(&mut self, at: Millis, event: Event) -> Vec<Command> {
        let mut out = Vec::new();
        if let Phase::Done(outcome) = self.phase {
            self.after_the_end(at, outcome, event, &mut out);
            return out;
        }
        match event {
            Event::Started(_) => {}
            Event::StageProgress(id) => {
                if let Some(t) = self.targets.get_mut(&id) {
                    t.progress = at;
                    t.slow = false;
                }
            }
            Event::Staged(id, result) => {
                if self.state_of(&id) == Some(&TargetState::Staging) {
                    match result {
                        Ok(()) => self.set_state(&id, at, TargetState::Staged),
                        Err(e) => self.fail(&id, at, format!("staging failed: {e}"), &mut out),
                    }
                }
            }
            Event::Delivered(id, result) => self.on_delivered(at, id, result, &mut out),
            Event::LoadSet(id, result) => {
                if let Some(t) = self.targets.get_mut(&id) {
                    if t.load_pending && !t.load_deferred {
                        t.load_pending = false;
                        if let Err(e) = result {
                            self.fail(&id, at, format!("load change failed: {e}"), &mut out);
                        }
                        self.drain_deferred(at, &mut out);
                    }
                }
            }
            Event::RolledBack(id, result) => {
                if self.state_of(&id) == Some(&TargetState::RollingBack) {
                    match result {
                        Ok(()) => self.set_state(&id, at, TargetState::RolledBack),
                        // Counted, but the roll-out cannot halt further.
                        Err(e) => self.fail(&id, at, format!("rollback failed: {e}"), &mut out),
                    }
                }
            }
            Event::Pause => {
                if !self.pause_requested && !matches!(self.phase, Phase::RollingBack) {
                    self.pause_requested = true;
                }
            }
            Event::Resume => {
                self.pause_requested = false;
                if let Phase::Paused(next) = self.phase {
                    out.push(Command::Notice(Notice::Resumed));
                    self.start_wave(at, next, &mut out);
                }
            }
            Event::Abort => {
                if !self.aborted && !matches!(self.phase, Phase::RollingBack) {
                    self.aborted = true;
                    self.halt(at, "aborted by an operator".into(), &mut out);
                }
            }
            Event::Tick => self.check_deadlines(at, &mut out),
        }
        self.advance(at, &mut out);
        out
    }

    fn on_delivered(
        &mut self,
        at: Millis,
        id: TargetId,
        result: Result<(), String>,
        out: &mut Vec<Command>,
    ) {
        let Some(t) = self.targets.get(&id) else {
            return;
        };
        let late = matches!(t.state, TargetState::Failed(_)) && t.deliver_sent && !t.activated;
        if t.state != TargetState::Delivering && !late {
            return;
        }
        match result {
            Ok(()) => {
                let rolling_back = matches!(self.phase, Phase::RollingBack);
                let t = self.targets.get_mut(&id).expect("looked up");
                t.activated = true;
                t.delivery_ms = Some(at.saturating_sub(t.since));
                if late && t.counted {
                    // It was given up on, but got there: no longer a failure.
                    t.counted = false;
                    self.failures -= 1;
                }
                if rolling_back {
                    self.set_state(&id, at, TargetState::RollingBack);
                    out.push(Command::Rollback(id));
                } else {
                    self.set_state(&id, at, TargetState::Delivered);
                }
            }
            Err(e) if !late => {
                if let Some(t) = self.targets.get_mut(&id) {
                    t.switched_back = true;
                }
                self.fail(&id, at, format!("delivery failed: {e}"), out)
            }
            Err(_) => {}
        }
    }

    /// A target that was given up on may still finish: on a roll-out
    /// that succeeded it joins the others; on one that did not, it is sent
    /// back, so the environment stays on one release.
    fn after_the_end(
        &mut self,
        at: Millis,
        outcome: Outcome,
        event: Event,
        out: &mut Vec<Command>,
    ) {
        match event {
            Event::Delivered(id, Ok(())) => {
                let Some(t) = self.targets.get_mut(&id) else {
                    return;
                };
                if !(matches!(t.state, TargetState::Failed(_)) && t.deliver_sent && !t.activated) {
                    return;
                }
                t.activated = true;
                if t.counted {
                    t.counted = false;
                    self.failures -= 1;
                }
                if outcome == Outcome::Succeeded {
                    self.set_state(&id, at, TargetState::Delivered);
                } else {
                    self.set_state(&id, at, TargetState::RollingBack);
                    out.push(Command::Rollback(id));
                }
            }
            Event::RolledBack(id, result)
                if self.state_of(&id) == Some(&TargetState::RollingBack) =>
            {
                let state = match result {
                    Ok(()) => TargetState::RolledBack,
                    Err(e) => TargetState::Failed(format!("rollback failed: {e}")),
                };
                self.set_state(&id, at, state);
            }
            _ => {}
        }
    }

    fn state_of(&self, id: &str) -> Option<&TargetState> {
        self.targets.get(id).map(|t| &t.state)
    }

    fn set_state(&mut self, id: &str, at: Millis, state: TargetState) {
        if let Some(t) = self.targets.get_mut(id) {
            t.state = state;
            t.since = at;
            t.progress = at;
            t.slow = false;
        }
    }

    fn targets_in(&self, f: impl Fn(&TargetState) -> bool) -> impl Iterator<Item = &TargetId> {
        self.targets
            .iter()
            .filter(move |(_, t)| f(&t.state))
            .map(|(id, _)| id)
    }

    /// Marks a target failed, counts it, and halts past the threshold.
    fn fail(&mut self, id: &str, at: Millis, reason: String, out: &mut Vec<Command>) {
        let Some(t) = self.targets.get_mut(id) else {
            return;
        };
        if matches!(t.state, TargetState::Failed(_)) {
            return;
        }
        if !t.counted {
            t.counted = true;
            self.failures += 1;
        }
        out.push(Command::Notice(Notice::Failed {
            target: id.to_string(),
            reason: reason.clone(),
        }));
        self.set_state(id, at, TargetState::Failed(reason));
        let allowed = self.spec.max_failures.floor_of(self.targets.len());
        if self.failures > allowed && !matches!(self.phase, Phase::RollingBack) {
            self.halt(
                at,
                format!(
                    "{} of {} targets failed, more than the {allowed} tolerated",
                    self.failures,
                    self.targets.len()
                ),
                out,
            );
        }
    }

    /// Stops delivering and sends every activated target back.
    fn halt(&mut self, at: Millis, reason: String, out: &mut Vec<Command>) {
        out.push(Command::Notice(Notice::Halted(reason)));
        self.phase = Phase::RollingBack;
        let swapped = self.live_slice != self.spec.live_slice;
        if swapped {
            // Blue-green after the swap: the old slice goes back into load.
            self.live_slice = self.spec.live_slice;
            self.set_loads(at, out);
        }
        let activated: Vec<TargetId> = self
            .targets
            .iter()
            .filter(|(_, t)| {
                t.activated && matches!(t.state, TargetState::Delivered | TargetState::Failed(_))
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in activated {
            self.set_state(&id, at, TargetState::RollingBack);
            out.push(Command::Rollback(id));
        }
    }

    /// Whether `target` should be in load as the roll-out stands now (an
    /// order sent later than it was made must say this, not what it said
    /// then); `None` for a target not in the roll-out.
    pub fn wanted_load(&self, target: &str) -> Option<bool> {
        self.targets.get(target).map(|t| self.should_be_in_load(t))
    }

    fn should_be_in_load(&self, t: &TargetRecord) -> bool {
        t.slice.is_none() || t.slice == self.live_slice
    }

    /// Every sliced target goes into load or out of it, per `live_slice`:
    /// those going in first; those going out once all of them are in
    /// ([`Self::drain_deferred`]), so that a load balancer always has a
    /// slice to send requests to.
    fn set_loads(&mut self, at: Millis, out: &mut Vec<Command>) {
        let live = self.live_slice;
        let ordered = self.spec.ordered_loads;
        for (id, t) in self.targets.iter_mut() {
            if t.slice.is_some() {
                let in_load = t.slice == live;
                t.load_pending = true;
                t.load_deferred = ordered && !in_load;
                t.progress = at;
                t.slow = false;
                if !t.load_deferred {
                    out.push(Command::SetLoad {
                        target: id.clone(),
                        in_load,
                    });
                }
            }
        }
        self.drain_deferred(at, out);
    }

    /// Sends the deferred drains once no target is still going into load.
    fn drain_deferred(&mut self, at: Millis, out: &mut Vec<Command>) {
        if self
            .targets
            .values()
            .any(|t| t.load_pending && !t.load_deferred)
        {
            return;
        }
        for (id, t) in self.targets.iter_mut() {
            if t.load_deferred {
                t.load_deferred = false;
                t.progress = at;
                out.push(Command::SetLoad {
                    target: id.clone(),
                    in_load: false,
                });
            }
        }
    }

    /// Moves on when the current step is complete.
    fn advance(&mut self, at: Millis, out: &mut Vec<Command>) {
        loop {
            let before = self.phase.clone();
            match self.phase {
                Phase::Distributing => {
                    let staged = self
                        .targets_in(|s| *s == TargetState::Staging)
                        .next()
                        .is_none();
                    if staged && self.distribution_ms.is_none() {
                        let staged = self.targets_in(|s| *s == TargetState::Staged).count();
                        self.distribution_ms = Some(at - self.started);
                        out.push(Command::Notice(Notice::Distributed {
                            staged,
                            ms: at - self.started,
                        }));
                    }
                    // Blue-green: the first wave waits for the idle slice
                    // to be out of load.
                    if staged && !self.targets.values().any(|t| t.load_pending) {
                        self.plan_waves();
                        self.wave_started = at;
                        if self.wave_ends.is_empty() {
                            self.switch_or_finish(at, out);
                        } else if self.pause_requested {
                            self.phase = Phase::Paused(0);
                            out.push(Command::Notice(Notice::Paused));
                        } else {
                            self.start_wave(at, 0, out);
                        }
                    }
                }
                Phase::Delivering(n) => {
                    let running = self.waves[n]
                        .iter()
                        .any(|id| self.state_of(id) == Some(&TargetState::Delivering));
                    if !running {
                        out.push(Command::Notice(Notice::WaveDone {
                            wave: n,
                            ms: at - self.wave_started,
                        }));
                        if n + 1 == self.wave_ends.len() {
                            self.switch_or_finish(at, out);
                        } else if self.pause_requested {
                            self.phase = Phase::Paused(n + 1);
                            out.push(Command::Notice(Notice::Paused));
                        } else {
                            self.start_wave(at, n + 1, out);
                        }
                    }
                }
                Phase::Switching => {
                    if !self.targets.values().any(|t| t.load_pending) {
                        self.finish(at, Outcome::Succeeded, out);
                    }
                }
                Phase::RollingBack => {
                    let pending = self.targets.values().any(|t| {
                        t.load_pending
                            || matches!(t.state, TargetState::RollingBack | TargetState::Delivering)
                    });
                    if !pending {
                        let rollback_failed = self
                            .targets
                            .values()
                            .any(|t| t.activated && t.state != TargetState::RolledBack);
                        // A target whose delivery failed went back on its
                        // own (the switch-back of a failed hook): a halt
                        // after any delivery attempt is a rollback.
                        let attempted_any = self
                            .targets
                            .values()
                            .any(|t| t.activated || t.switched_back);
                        let outcome = if self.aborted {
                            Outcome::Aborted
                        } else if rollback_failed || !attempted_any {
                            Outcome::Failed
                        } else {
                            Outcome::RolledBack
                        };
                        self.finish(at, outcome, out);
                    }
                }
                Phase::Paused(_) | Phase::Done(_) => {}
            }
            if self.phase == before {
                return;
            }
        }
    }

    /// The targets that deliver, in order, and where each wave ends.
    fn plan_waves(&mut self) {
        let staged: Vec<TargetId> = self
            .targets
            .iter()
            .filter(|(_, t)| t.state == TargetState::Staged)
            .filter(|(_, t)| match self.spec.strategy {
                Strategy::BlueGreen => t.slice.is_some() && t.slice != self.live_slice,
                _ => true,
            })
            .map(|(id, _)| id.clone())
            .collect();
        self.wave_ends = match self.spec.strategy {
            Strategy::BlueGreen if staged.is_empty() => Vec::new(),
            Strategy::BlueGreen => vec![staged.len()],
            _ => wave_ends(&self.spec.waves, staged.len()),
        };
        let mut from = 0;
        self.waves = self
            .wave_ends
            .iter()
            .map(|&end| {
                let w = staged[from..end].to_vec();
                from = end;
                w
            })
            .collect();
    }

    fn start_wave(&mut self, at: Millis, n: usize, out: &mut Vec<Command>) {
        self.phase = Phase::Delivering(n);
        self.wave_started = at;
        out.push(Command::Notice(Notice::WaveStarted {
            wave: n,
            targets: self.waves[n].clone(),
        }));
        let drain = self.spec.strategy == Strategy::Rolling;
        for id in self.waves[n].clone() {
            if self.state_of(&id) == Some(&TargetState::Staged) {
                self.set_state(&id, at, TargetState::Delivering);
                self.targets.get_mut(&id).expect("in the wave").deliver_sent = true;
                out.push(Command::Deliver { target: id, drain });
            }
        }
    }

    fn switch_or_finish(&mut self, at: Millis, out: &mut Vec<Command>) {
        let delivered = self.targets.values().any(|t| t.activated);
        if self.spec.strategy != Strategy::BlueGreen {
            // Failures within the threshold still succeed; none delivered does not.
            let empty = self.targets.is_empty();
            let outcome = if delivered || empty {
                Outcome::Succeeded
            } else {
                Outcome::Failed
            };
            self.finish(at, outcome, out);
            return;
        }
        let Some(live) = self.live_slice else {
            self.finish(at, Outcome::Succeeded, out);
            return;
        };
        if !delivered {
            // Nothing delivered to the idle slice: no swap.
            self.finish(at, Outcome::Failed, out);
            return;
        }
        self.live_slice = Some(live.other());
        self.phase = Phase::Switching;
        out.push(Command::Notice(Notice::Switched { live: live.other() }));
        self.set_loads(at, out);
    }

    fn finish(&mut self, at: Millis, outcome: Outcome, out: &mut Vec<Command>) {
        self.phase = Phase::Done(outcome);
        self.ended = Some(at);
        if let Some(d) = self.distribution_ms {
            self.delivery_ms = Some(at.saturating_sub(self.started + d));
        }
        out.push(Command::Notice(Notice::Finished(outcome)));
    }

    /// Slow and failed targets (no progress), and stragglers in the wave.
    fn check_deadlines(&mut self, at: Millis, out: &mut Vec<Command>) {
        let deadline = self.spec.progress_deadline_ms;
        let mut failed = Vec::new();
        for (id, t) in self.targets.iter_mut() {
            let what = match t.state {
                // A deferred drain waits on the others, whose own
                // deadlines run.
                _ if t.load_pending && !t.load_deferred => "load change",
                TargetState::Staging => "staging",
                TargetState::Delivering => "delivery",
                TargetState::RollingBack => "rollback",
                _ => continue,
            };
            let idle = at.saturating_sub(t.progress);
            if idle >= 2 * deadline {
                failed.push((id.clone(), what, idle));
            } else if idle >= deadline && !t.slow {
                t.slow = true;
                out.push(Command::Notice(Notice::Slow(id.clone())));
            }
        }
        let gave_up = !failed.is_empty();
        for (id, what, idle) in failed {
            if let Some(t) = self.targets.get_mut(&id) {
                t.load_pending = false;
                t.load_deferred = false;
            }
            self.fail(
                &id,
                at,
                format!("no {what} progress for {:.1} s", idle as f64 / 1000.0),
                out,
            );
        }
        if gave_up {
            self.drain_deferred(at, out);
        }
        if let Phase::Delivering(n) = self.phase {
            let mut done: Vec<u64> = self.waves[n]
                .iter()
                .filter_map(|id| self.targets[id].delivery_ms)
                .collect();
            // Until half the wave has finished, the median would be the
            // fastest few's: with orders to thousands going out over
            // seconds, every later target would count as a straggler.
            if done.is_empty() || 2 * done.len() < self.waves[n].len() {
                return;
            }
            done.sort_unstable();
            let median = done[done.len() / 2];
            for id in &self.waves[n] {
                let t = self.targets.get_mut(id).expect("in the wave");
                let ms = at.saturating_sub(t.since);
                if t.state == TargetState::Delivering && !t.straggler && ms > 3 * median.max(1) {
                    t.straggler = true;
                    out.push(Command::Notice(Notice::Straggler {
                        target: id.clone(),
                        ms,
                        median_ms: median,
                    }));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(n: usize, strategy: Strategy, waves: &str, max_failures: &str) -> Spec {
        Spec {
            app: "web".into(),
            version: "2".into(),
            env: "production".into(),
            strategy,
            waves: parse_waves(waves).unwrap(),
            mode: DistributionMode::Swarm,
            max_failures: Amount::parse(max_failures).unwrap(),
            progress_deadline_ms: 1000,
            targets: (0..n)
                .map(|i| Member {
                    id: format!("t{i:02}"),
                    slice: (strategy == Strategy::BlueGreen).then_some(if i % 2 == 0 {
                        Slice::Blue
                    } else {
                        Slice::Green
                    }),
                })
                .collect(),
            live_slice: (strategy == Strategy::BlueGreen).then_some(Slice::Blue),
            ordered_loads: true,
        }
    }

    /// A roll-out and every command it gave, with a clock.
    struct Run {
        r: Rollout,
        log: Vec<(Millis, Event)>,
        out: Vec<Command>,
        now: Millis,
    }

    impl Run {
        fn new(spec: Spec) -> Self {
            let (r, out) = Rollout::start(0, spec.clone());
            Self {
                r,
                log: vec![(0, Event::Started(spec))],
                out,
                now: 0,
            }
        }

        fn at(&mut self, now: Millis, e: Event) -> Vec<Command> {
            self.now = now;
            self.log.push((now, e.clone()));
            let out = self.r.handle(now, e);
            self.out.extend(out.clone());
            out
        }

        fn ev(&mut self, e: Event) -> Vec<Command> {
            self.at(self.now + 10, e)
        }

        fn stage_all(&mut self) {
            for id in self.ids() {
                self.ev(Event::Staged(id, Ok(())));
            }
            self.ack_loads();
        }

        /// Every target answers its load orders (blue-green), the
        /// deferred ones as they go out.
        fn ack_loads(&mut self) {
            for _ in 0..2 {
                let pending: Vec<TargetId> = self
                    .r
                    .targets
                    .iter()
                    .filter(|(_, t)| t.load_pending && !t.load_deferred)
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in pending {
                    self.ev(Event::LoadSet(id, Ok(())));
                }
            }
        }

        fn ids(&self) -> Vec<TargetId> {
            self.r.targets.keys().cloned().collect()
        }

        /// Targets told to deliver and not yet answered.
        fn delivering(&self) -> Vec<TargetId> {
            self.r
                .targets
                .iter()
                .filter(|(_, t)| t.state == TargetState::Delivering)
                .map(|(id, _)| id.clone())
                .collect()
        }

        fn deliver_wave(&mut self) -> usize {
            let ids = self.delivering();
            for id in &ids {
                self.ev(Event::Delivered(id.clone(), Ok(())));
            }
            ids.len()
        }

        fn outcome(&self) -> Option<Outcome> {
            match self.r.phase {
                Phase::Done(o) => Some(o),
                _ => None,
            }
        }

        /// The load orders given since command `from`.
        fn load_orders(&self, from: usize) -> Vec<(TargetId, bool)> {
            self.out[from..]
                .iter()
                .filter_map(|c| match c {
                    Command::SetLoad { target, in_load } => Some((target.clone(), *in_load)),
                    _ => None,
                })
                .collect()
        }

        fn notices(&self) -> Vec<&Notice> {
            self.out
                .iter()
                .filter_map(|c| match c {
                    Command::Notice(n) => Some(n),
                    _ => None,
                })
                .collect()
        }
    }

    #[test]
    fn waves_are_cumulative_and_end_with_everyone() {
        let w = parse_waves("1,10%,50%,100%").unwrap();
        assert_eq!(wave_ends(&w, 20), vec![1, 2, 10, 20]);
        assert_eq!(wave_ends(&w, 3), vec![1, 2, 3]);
        assert_eq!(wave_ends(&parse_waves("50%").unwrap(), 4), vec![2, 4]);
        assert_eq!(wave_ends(&parse_waves("2,100").unwrap(), 5), vec![2, 5]);
        assert_eq!(wave_ends(&w, 0), Vec::<usize>::new());
        assert!(parse_waves("1,x").is_err());
        assert!(Amount::parse("150%").is_err());
    }

    #[test]
    fn rolling_delivers_wave_by_wave_with_drain_and_succeeds() {
        let mut run = Run::new(spec(4, Strategy::Rolling, "1,50%,100%", "0"));
        assert_eq!(run.out[0], Command::Stage(run.ids()));
        run.stage_all();
        let mut sizes = Vec::new();
        while run.outcome().is_none() {
            assert!(run
                .out
                .iter()
                .all(|c| !matches!(c, Command::Deliver { drain: false, .. })));
            sizes.push(run.deliver_wave());
        }
        assert_eq!(sizes, vec![1, 1, 2]);
        assert_eq!(run.outcome(), Some(Outcome::Succeeded));
        assert!(run.r.delivery_ms.is_some() && run.r.distribution_ms.is_some());
    }

    #[test]
    fn live_delivers_without_draining() {
        let mut run = Run::new(spec(3, Strategy::Live, "100%", "0"));
        run.stage_all();
        assert!(run
            .out
            .iter()
            .any(|c| matches!(c, Command::Deliver { drain: false, .. })));
        run.deliver_wave();
        assert_eq!(run.outcome(), Some(Outcome::Succeeded));
    }

    #[test]
    fn a_failure_past_the_threshold_rolls_back_the_delivered_targets() {
        let mut run = Run::new(spec(4, Strategy::Rolling, "1,100%", "0"));
        run.stage_all();
        let first = run.delivering();
        run.deliver_wave();
        let wave2 = run.delivering();
        assert_eq!(wave2.len(), 3);
        let out = run.ev(Event::Delivered(
            wave2[0].clone(),
            Err("validate: exit 1".into()),
        ));
        assert!(out
            .iter()
            .any(|c| matches!(c, Command::Notice(Notice::Halted(_)))));
        assert!(out.contains(&Command::Rollback(first[0].clone())));
        // The others of the wave finish, and go back too.
        for id in &wave2[1..] {
            let out = run.ev(Event::Delivered(id.clone(), Ok(())));
            assert_eq!(out, vec![Command::Rollback(id.clone())]);
        }
        assert_eq!(run.outcome(), None);
        for id in [&first[0], &wave2[1], &wave2[2]] {
            run.ev(Event::RolledBack(id.clone(), Ok(())));
        }
        assert_eq!(run.outcome(), Some(Outcome::RolledBack));
        assert_eq!(run.r.failures, 1);
    }

    #[test]
    fn a_percentage_threshold_tolerates_its_floor() {
        // 25% of 8 tolerates 2 failures; the third halts.
        let mut run = Run::new(spec(8, Strategy::Live, "100%", "25%"));
        let ids = run.ids();
        run.ev(Event::Staged(ids[0].clone(), Err("disk full".into())));
        run.ev(Event::Staged(ids[1].clone(), Err("disk full".into())));
        for id in &ids[2..] {
            run.ev(Event::Staged(id.clone(), Ok(())));
        }
        assert_eq!(run.delivering().len(), 6);
        let d = run.delivering();
        run.ev(Event::Delivered(d[0].clone(), Ok(())));
        assert!(!run.notices().iter().any(|n| matches!(n, Notice::Halted(_))));
        run.ev(Event::Delivered(d[1].clone(), Err("hook".into())));
        assert!(run.notices().iter().any(|n| matches!(n, Notice::Halted(_))));
        assert_eq!(run.r.phase, Phase::RollingBack);
    }

    #[test]
    fn blue_green_delivers_to_the_idle_slice_then_swaps() {
        let mut run = Run::new(spec(4, Strategy::BlueGreen, "1", "0"));
        run.stage_all();
        let green: Vec<TargetId> = run
            .r
            .targets
            .iter()
            .filter(|(_, t)| t.slice == Some(Slice::Green))
            .map(|(id, _)| id.clone())
            .collect();
        assert_eq!(run.delivering(), green, "one wave: the idle slice");
        let before = run.out.len();
        run.deliver_wave();
        // The idle slice goes into load first...
        let going_in = run.load_orders(before);
        assert_eq!(going_in.len(), 2);
        assert!(going_in.iter().all(|(id, i)| *i && green.contains(id)));
        // ...and the live one leaves only once the last of it is in.
        let before = run.out.len();
        run.ev(Event::LoadSet(going_in[0].0.clone(), Ok(())));
        assert!(
            run.load_orders(before).is_empty(),
            "a drain before all are in"
        );
        run.ev(Event::LoadSet(going_in[1].0.clone(), Ok(())));
        let going_out = run.load_orders(before);
        assert_eq!(going_out.len(), 2);
        assert!(going_out.iter().all(|(id, i)| !*i && !green.contains(id)));
        assert_eq!(run.outcome(), None, "done before the drains are");
        for (id, _) in going_out {
            run.ev(Event::LoadSet(id, Ok(())));
        }
        assert_eq!(run.outcome(), Some(Outcome::Succeeded));
        assert_eq!(run.r.live_slice, Some(Slice::Green));
    }

    #[test]
    fn blue_green_takes_the_idle_slice_out_of_load_before_delivering_to_it() {
        let mut run = Run::new(spec(4, Strategy::BlueGreen, "1", "0"));
        // The live slice (blue: t00, t02) is confirmed in load first.
        assert_eq!(
            run.load_orders(0),
            vec![("t00".to_string(), true), ("t02".to_string(), true)]
        );
        for id in run.ids() {
            run.ev(Event::Staged(id, Ok(())));
        }
        run.ev(Event::LoadSet("t00".into(), Ok(())));
        run.ev(Event::LoadSet("t02".into(), Ok(())));
        // Then the idle one leaves; staged, it is not delivered to yet.
        assert_eq!(
            run.load_orders(0)[2..],
            [("t01".to_string(), false), ("t03".to_string(), false)]
        );
        assert!(run.delivering().is_empty(), "delivered to while in load");
        run.ev(Event::LoadSet("t01".into(), Ok(())));
        assert!(run.delivering().is_empty());
        run.ev(Event::LoadSet("t03".into(), Ok(())));
        assert_eq!(run.delivering(), vec!["t01".to_string(), "t03".to_string()]);
        assert!(run
            .notices()
            .iter()
            .any(|n| matches!(n, Notice::Distributed { staged: 4, .. })));
    }

    #[test]
    fn a_blue_green_roll_out_recorded_before_ordered_loads_replays_as_it_ran() {
        // Its log: staged, delivered to the idle slice, both slices'
        // load changes answered in any order — no drain of the idle slice
        // first, no deferred drain.
        let mut old = spec(4, Strategy::BlueGreen, "1", "0");
        old.ordered_loads = false;
        let json = serde_json::to_value(&old).unwrap();
        let mut fields = json.as_object().unwrap().clone();
        fields.remove("ordered_loads");
        let old: Spec = serde_json::from_value(fields.into()).unwrap();
        assert!(
            !old.ordered_loads,
            "a spec without the field reads as before"
        );
        let mut run = Run::new(old);
        assert!(run
            .out
            .iter()
            .all(|c| !matches!(c, Command::SetLoad { .. })));
        for id in run.ids() {
            run.ev(Event::Staged(id, Ok(())));
        }
        assert_eq!(run.delivering(), vec!["t01".to_string(), "t03".to_string()]);
        let before = run.out.len();
        run.deliver_wave();
        let loads = run.load_orders(before).len();
        assert_eq!(loads, 4, "the swap's four load changes at once");
        for id in ["t00", "t02", "t01", "t03"] {
            run.ev(Event::LoadSet(id.into(), Ok(())));
        }
        assert_eq!(run.outcome(), Some(Outcome::Succeeded));
    }

    #[test]
    fn blue_green_swaps_back_when_the_switch_fails() {
        let mut run = Run::new(spec(4, Strategy::BlueGreen, "1", "0"));
        run.stage_all();
        run.deliver_wave();
        let green = run.ids().into_iter().filter(|id| id.ends_with(['1', '3']));
        let green: Vec<_> = green.collect();
        let before = run.out.len();
        run.ev(Event::LoadSet(green[0].clone(), Err("refused".into())));
        let after = &run.out[before..];
        assert!(after
            .iter()
            .any(|c| matches!(c, Command::Notice(Notice::Halted(_)))));
        assert!(after.contains(&Command::SetLoad {
            target: "t00".into(),
            in_load: true
        }));
        assert!(after.contains(&Command::Rollback(green[1].clone())));
        assert_eq!(run.r.live_slice, Some(Slice::Blue));
        // Had the switch ordered t00 out of load, an order to it still
        // waiting (it was away) would now say what the swap-back wants.
        assert_eq!(run.r.wanted_load("t00"), Some(true));
        assert_eq!(run.r.wanted_load(&green[1]), Some(false));
        assert_eq!(run.r.wanted_load("nobody"), None);
    }

    #[test]
    fn pause_waits_between_waves_and_resume_goes_on() {
        let mut run = Run::new(spec(4, Strategy::Rolling, "1,100%", "0"));
        run.stage_all();
        run.ev(Event::Pause);
        run.deliver_wave();
        assert_eq!(run.r.phase, Phase::Paused(1));
        assert!(run.delivering().is_empty());
        run.ev(Event::Tick);
        assert!(run.delivering().is_empty());
        run.ev(Event::Resume);
        assert_eq!(run.delivering().len(), 3);
        run.deliver_wave();
        assert_eq!(run.outcome(), Some(Outcome::Succeeded));
    }

    #[test]
    fn abort_rolls_every_delivered_target_back() {
        let mut run = Run::new(spec(4, Strategy::Rolling, "2,100%", "0"));
        run.stage_all();
        let first = run.delivering();
        run.deliver_wave();
        let out = run.ev(Event::Abort);
        for id in &first {
            assert!(out.contains(&Command::Rollback(id.clone())));
        }
        for id in run.delivering() {
            run.ev(Event::Delivered(id, Ok(())));
        }
        let back: Vec<TargetId> = run
            .r
            .targets
            .iter()
            .filter(|(_, t)| t.state == TargetState::RollingBack)
            .map(|(id, _)| id.clone())
            .collect();
        assert_eq!(back.len(), 4);
        for id in back {
            run.ev(Event::RolledBack(id, Ok(())));
        }
        assert_eq!(run.outcome(), Some(Outcome::Aborted));
    }

    #[test]
    fn abort_during_distribution_ends_at_once() {
        let mut run = Run::new(spec(3, Strategy::Live, "100%", "0"));
        run.ev(Event::Abort);
        assert_eq!(run.outcome(), Some(Outcome::Aborted));
    }

    #[test]
    fn a_stalled_target_is_slow_then_failed() {
        let mut run = Run::new(spec(2, Strategy::Live, "100%", "0"));
        run.at(500, Event::StageProgress("t00".into()));
        run.at(1100, Event::Tick);
        assert_eq!(run.notices(), vec![&Notice::Slow("t01".into())]);
        run.at(1400, Event::Tick);
        assert_eq!(
            run.notices().len(),
            1,
            "t00 is slow at 1500 at the earliest"
        );
        run.at(1600, Event::Tick);
        assert_eq!(run.notices()[1], &Notice::Slow("t00".into()));
        run.at(2000, Event::Tick);
        assert!(matches!(
            run.notices().last(),
            Some(Notice::Finished(Outcome::Failed))
        ));
        assert!(run
            .notices()
            .iter()
            .any(|n| matches!(n, Notice::Failed { target, .. } if target == "t01")));
    }

    #[test]
    fn a_straggler_is_reported_while_its_wave_runs() {
        let mut run = Run::new(spec(4, Strategy::Live, "100%", "0"));
        for id in run.ids() {
            run.at(100, Event::Staged(id, Ok(())));
        }
        for id in ["t00", "t01", "t02"] {
            run.at(200, Event::Delivered(id.into(), Ok(())));
        }
        run.at(350, Event::Tick);
        assert!(!run
            .notices()
            .iter()
            .any(|n| matches!(n, Notice::Straggler { .. })));
        run.at(450, Event::Tick);
        let s: Vec<_> = run
            .notices()
            .into_iter()
            .filter(|n| matches!(n, Notice::Straggler { .. }))
            .cloned()
            .collect();
        assert_eq!(
            s,
            vec![Notice::Straggler {
                target: "t03".into(),
                ms: 350,
                median_ms: 100
            }]
        );
    }

    #[test]
    fn no_straggler_is_named_before_half_the_wave_has_finished() {
        let mut run = Run::new(spec(10, Strategy::Live, "100%", "0"));
        for id in run.ids() {
            run.at(100, Event::Staged(id, Ok(())));
        }
        for id in ["t00", "t01", "t02", "t03"] {
            run.at(200, Event::Delivered(id.into(), Ok(())));
        }
        run.at(1000, Event::Tick);
        let stragglers = |run: &Run| {
            run.notices()
                .iter()
                .filter(|n| matches!(n, Notice::Straggler { .. }))
                .count()
        };
        assert_eq!(stragglers(&run), 0, "named by the fastest four's median");
        run.at(1000, Event::Delivered("t04".into(), Ok(())));
        run.at(1100, Event::Tick);
        assert_eq!(stragglers(&run), 5, "the wave's median is known now");
    }

    #[test]
    fn a_first_target_whose_validation_fails_halts_as_a_rollback() {
        let mut run = Run::new(spec(4, Strategy::Rolling, "1,100%", "0"));
        run.stage_all();
        let d = run.delivering();
        assert_eq!(d.len(), 1);
        // The target switched itself back when `validate` failed.
        let out = run.ev(Event::Delivered(d[0].clone(), Err("validate".into())));
        assert!(!out.iter().any(|c| matches!(c, Command::Rollback(_))));
        assert_eq!(run.outcome(), Some(Outcome::RolledBack));
    }

    #[test]
    fn a_late_delivery_after_a_failed_roll_out_is_sent_back() {
        let mut run = Run::new(spec(3, Strategy::Live, "100%", "1"));
        run.stage_all();
        run.at(run.now + 2500, Event::Tick);
        assert_eq!(run.r.failures, 3, "all three timed out");
        assert_eq!(
            run.outcome(),
            Some(Outcome::Failed),
            "nothing was delivered"
        );
        // t00 got there after all: the roll-out failed, so it goes back.
        let out = run.ev(Event::Delivered("t00".into(), Ok(())));
        assert_eq!(out, vec![Command::Rollback("t00".into())]);
        assert_eq!(run.r.failures, 2);
        run.ev(Event::RolledBack("t00".into(), Ok(())));
        assert_eq!(run.r.targets["t00"].state, TargetState::RolledBack);
    }

    #[test]
    fn a_replayed_roll_out_is_the_same_and_resends_what_is_in_flight() {
        let mut run = Run::new(spec(5, Strategy::Rolling, "1,100%", "1"));
        run.stage_all();
        run.deliver_wave();
        let d = run.delivering();
        run.ev(Event::Delivered(d[0].clone(), Err("hook".into())));
        run.ev(Event::Pause);
        let replayed = Rollout::replay(&run.log).unwrap();
        assert_eq!(replayed, run.r);
        let resend = replayed.resend();
        assert_eq!(resend.len(), 3);
        for id in &d[1..] {
            assert!(resend.contains(&Command::Deliver {
                target: id.clone(),
                drain: true
            }));
        }
        assert!(Rollout::replay(&run.log[1..]).is_none());
    }

    #[test]
    fn a_late_delivery_within_the_threshold_joins_a_successful_roll_out() {
        let mut run = Run::new(spec(3, Strategy::Live, "100%", "1"));
        run.stage_all();
        run.ev(Event::Delivered("t00".into(), Ok(())));
        run.ev(Event::Delivered("t01".into(), Ok(())));
        run.at(run.now + 2500, Event::Tick);
        assert_eq!(
            run.outcome(),
            Some(Outcome::Succeeded),
            "one failure tolerated"
        );
        assert_eq!(run.r.failures, 1);
        let out = run.ev(Event::Delivered("t02".into(), Ok(())));
        assert!(out.is_empty());
        assert_eq!(run.r.failures, 0);
        assert_eq!(run.r.targets["t02"].state, TargetState::Delivered);
    }

    #[test]
    fn an_empty_environment_succeeds_at_once() {
        let (r, out) = Rollout::start(0, spec(0, Strategy::Rolling, "1", "0"));
        assert_eq!(r.phase, Phase::Done(Outcome::Succeeded));
        assert!(out.contains(&Command::Notice(Notice::Finished(Outcome::Succeeded))));
    }
}
