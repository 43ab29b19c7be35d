//! Delivery on a target: a staged release becomes the one that runs.
//!
//! Under the data directory, per app:
//!
//! ```text
//! releases/<app>/<version>/       the release's tree
//! releases/<app>/current          symlink to <version>, switched by rename
//! releases/<app>/.convoy/         what delivery remembers:
//!     history.json                versions activated, oldest first
//!     <version>.files             the tree's files as written (for reuse)
//! ```
//!
//! Activation materialises the tree (unchanged files hard-linked from the
//! active release when nobody has touched them since they were written),
//! runs the package's `convoy/hooks/before_activate`, switches `current`
//! with one rename, then runs `after_activate` and `validate`; if either
//! fails, `current` goes back to the previous release. Hooks run as a
//! service manager would run them: a cleared environment plus an
//! allow-list, and done when they exit (a process a hook starts in the
//! background goes on running). A process killed at
//! any point leaves `current` on the old release or the new one, and
//! [`Releases::active`] reads the link itself, so what a target reports is
//! what the link says.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::durable;
use convoy_chunker::{materialise_reusing, ChunkRef, ChunkSource, EntryKind, Manifest, Reuse};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tracing::{info, warn};

/// The link every app's active release is reached through.
pub const CURRENT: &str = "current";
/// Where delivery keeps its records, beside the releases.
const META: &str = ".convoy";
/// The most of a hook's output kept for the report.
const MAX_HOOK_OUTPUT: usize = 8 << 10;
/// How long a failed hook's output is still read after it exited: it is
/// in the pipes already, unless a process it left behind keeps them open.
const OUTPUT_AFTER_EXIT: Duration = Duration::from_secs(1);
/// `PATH` for hooks when the daemon has none.
const DEFAULT_HOOK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The hooks a package may ship, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// Before `current` switches; a failure leaves the old release active.
    BeforeActivate,
    /// After the switch.
    AfterActivate,
    /// Last: is the new release healthy?
    Validate,
}

impl Hook {
    /// The hook's file name under `convoy/hooks/`.
    pub fn name(self) -> &'static str {
        match self {
            Self::BeforeActivate => "before_activate",
            Self::AfterActivate => "after_activate",
            Self::Validate => "validate",
        }
    }
}

/// Why a delivery did not happen. The active release is then the one
/// before it (or, for [`DeliverError::Io`] during the switch, whichever
/// `current` names: it is always one whole release).
#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    /// The release could not be written.
    #[error("materialising {version}: {source}")]
    Materialise {
        /// The version.
        version: String,
        /// What went wrong.
        source: convoy_chunker::MaterialiseError,
    },
    /// A hook exited with a failure.
    #[error("hook {hook} failed ({status}): {output}")]
    HookFailed {
        /// Which.
        hook: &'static str,
        /// Its exit status.
        status: String,
        /// The end of what it printed.
        output: String,
    },
    /// A hook ran longer than allowed and was killed.
    #[error("hook {hook} timed out after {secs} s and was killed")]
    HookTimeout {
        /// Which.
        hook: &'static str,
        /// The limit.
        secs: u64,
    },
    /// The release made active again after a failure (or by a rollback)
    /// did not restart: its `after_activate` hook failed. `current`
    /// names it all the same.
    #[error("{first}; switched back to {version}, but {restart}")]
    Restart {
        /// Why the switch back happened (empty for a rollback).
        first: String,
        /// The version active again.
        version: String,
        /// Its `after_activate` failure.
        restart: Box<DeliverError>,
    },
    /// There is nothing to roll back to.
    #[error("{app}: no previous release to roll back to")]
    NoPrevious {
        /// The app.
        app: String,
    },
    /// The version cannot be used as a directory here.
    #[error("{0:?} is reserved and cannot be delivered")]
    ReservedVersion(String),
    /// A file system operation failed.
    #[error("{path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> DeliverError + '_ {
    move |source| DeliverError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A file of a materialised tree, as it was written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct WrittenFile {
    mode: u32,
    chunks: Vec<[u8; 32]>,
    size: u64,
    ino: u64,
    mtime_ns: i128,
}

/// The files of one materialised release.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Written {
    release: String,
    files: HashMap<String, WrittenFile>,
}

/// What a delivery did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Activation {
    /// The version now active.
    pub version: String,
    /// The one active before, if any.
    pub previous: Option<String>,
    /// Files hard-linked from the previous release instead of written.
    pub linked_files: usize,
    /// Milliseconds the switch of `current` took.
    pub switch_ms: f64,
    /// Releases removed by retention.
    pub removed: Vec<String>,
}

/// The releases of every app on this target.
pub struct Releases {
    root: PathBuf,
    retain: usize,
    hook_timeout: Duration,
    /// Variables of the daemon's environment that hooks also get.
    hook_env: Vec<String>,
    #[cfg(test)]
    fail_history_writes: std::sync::atomic::AtomicBool,
}

impl Releases {
    /// Opens `root` (creating it), keeping `retain` releases per app and
    /// killing hooks after `hook_timeout`. Leftovers of an interrupted
    /// materialisation are removed, and each app's history is brought in
    /// line with its `current` link.
    pub fn open(root: &Path, retain: usize, hook_timeout: Duration) -> Result<Self, DeliverError> {
        durable::create_dir_all(root).map_err(io_at(root))?;
        let r = Self {
            root: root.to_path_buf(),
            retain: retain.max(2),
            hook_timeout,
            hook_env: Vec::new(),
            #[cfg(test)]
            fail_history_writes: Default::default(),
        };
        for app in r.apps()? {
            let dir = r.root.join(&app);
            for e in std::fs::read_dir(&dir).map_err(io_at(&dir))? {
                let e = e.map_err(io_at(&dir))?;
                let name = e.file_name().to_string_lossy().into_owned();
                if name.contains(".convoy-partial-") || name.contains(".convoy-old-") {
                    let _ = std::fs::remove_dir_all(e.path());
                }
                if name.starts_with(".current.") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
            let active = r.active(&app)?;
            let mut history = r.history(&app)?;
            if let Some(v) = active {
                if history.last() != Some(&v) {
                    history.retain(|h| *h != v);
                    history.push(v);
                    r.write_history(&app, &history)?;
                }
            }
        }
        Ok(r)
    }

    /// How many releases of each app are kept.
    pub fn retained(&self) -> usize {
        self.retain
    }

    /// Passes the daemon's variables `names` through to hooks, besides
    /// `PATH`, `HOME` and `LANG` (see [`valid_hook_env_name`]).
    pub fn with_hook_env(mut self, names: Vec<String>) -> Self {
        self.hook_env = names;
        self
    }

    /// The apps with releases here.
    pub fn apps(&self) -> Result<Vec<String>, DeliverError> {
        let mut apps = Vec::new();
        for e in std::fs::read_dir(&self.root).map_err(io_at(&self.root))? {
            let e = e.map_err(io_at(&self.root))?;
            if e.file_type().map_err(io_at(&e.path()))?.is_dir() {
                apps.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        apps.sort();
        Ok(apps)
    }

    /// The version `current` names, read from the link itself.
    pub fn active(&self, app: &str) -> Result<Option<String>, DeliverError> {
        let link = self.root.join(app).join(CURRENT);
        match std::fs::read_link(&link) {
            Ok(t) => Ok(Some(t.to_string_lossy().into_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_at(&link)(e)),
        }
    }

    /// The versions activated, oldest first; the last is the active one.
    pub fn history(&self, app: &str) -> Result<Vec<String>, DeliverError> {
        let path = self.root.join(app).join(META).join("history.json");
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                io_at(&path)(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("not a list of versions ({e}); restore or remove it"),
                ))
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(io_at(&path)(e)),
        }
    }

    /// The release activated before the active one (which is read from
    /// the link: the history may lag it), if it is still here.
    pub fn previous(&self, app: &str) -> Result<Option<String>, DeliverError> {
        let active = self.active(app)?;
        Ok(self
            .history(app)?
            .into_iter()
            .rev()
            .find(|v| Some(v) != active.as_ref())
            .filter(|v| self.root.join(app).join(v).is_dir()))
    }

    /// The versions materialised for `app`.
    pub fn versions(&self, app: &str) -> Result<Vec<String>, DeliverError> {
        let dir = self.root.join(app);
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_at(&dir)(e)),
        };
        for e in entries {
            let e = e.map_err(io_at(&dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') && name != CURRENT && e.path().is_dir() {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Where a version's tree is.
    pub fn dir_of(&self, app: &str, version: &str) -> PathBuf {
        self.root.join(app).join(version)
    }

    fn write_history(&self, app: &str, history: &[String]) -> Result<(), DeliverError> {
        #[cfg(test)]
        if self
            .fail_history_writes
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            let path = self.root.join(app).join(META).join("history.json");
            return Err(io_at(&path)(io::Error::other("injected write failure")));
        }
        let meta = self.root.join(app).join(META);
        write_atomic(
            &meta.join("history.json"),
            &serde_json::to_vec(history).expect("strings encode"),
        )
    }

    /// Writes the release's tree unless it is already complete. Returns
    /// how many files were hard-linked from the active release.
    pub fn materialise(
        &self,
        manifest: &Manifest,
        source: &dyn ChunkSource,
    ) -> Result<usize, DeliverError> {
        let (app, version) = (manifest.app(), manifest.version());
        if version == CURRENT {
            return Err(DeliverError::ReservedVersion(version.into()));
        }
        let dest = self.dir_of(app, version);
        let meta = self.root.join(app).join(META);
        let record = meta.join(format!("{version}.files"));
        let release = manifest.release_id().to_hex();
        if dest.is_dir() && read_written(&record).is_some_and(|w| w.release == release) {
            return Ok(0);
        }
        durable::create_dir_all(&meta).map_err(io_at(&meta))?;
        let reuse = match self.active(app)? {
            Some(active) if active != version => Some(FromActive {
                dir: self.dir_of(app, &active),
                written: read_written(&meta.join(format!("{active}.files"))).unwrap_or_default(),
            }),
            _ => None,
        };
        let linked = std::sync::atomic::AtomicUsize::new(0);
        let counting = Counting {
            inner: reuse.as_ref(),
            linked: &linked,
        };
        materialise_reusing(manifest, source, &counting, &dest, true, &()).map_err(|source| {
            DeliverError::Materialise {
                version: version.into(),
                source,
            }
        })?;
        // What was written, so the next release can link to it safely.
        let mut written = Written {
            release,
            files: HashMap::new(),
        };
        for e in manifest.entries() {
            if let EntryKind::File { mode, chunks, .. } = &e.kind {
                let p = dest.join(&e.path);
                let m = std::fs::symlink_metadata(&p).map_err(io_at(&p))?;
                written.files.insert(
                    e.path.clone(),
                    WrittenFile {
                        mode: *mode,
                        chunks: chunks.iter().map(|c| c.hash.0).collect(),
                        size: m.len(),
                        ino: m.ino(),
                        mtime_ns: mtime_ns(&m),
                    },
                );
            }
        }
        write_atomic(
            &record,
            &serde_json::to_vec(&written).expect("the record encodes"),
        )?;
        Ok(linked.into_inner())
    }

    /// Points `current` at `version` with one rename, and records it last
    /// in the history (dropping `forget`, a release that failed); returns
    /// how long the rename took, in milliseconds. If the history cannot be
    /// written, `current` goes back to what it named, so the link and the
    /// history never disagree about what was done.
    fn switch(&self, app: &str, version: &str, forget: Option<&str>) -> Result<f64, DeliverError> {
        let before = self.active(app)?;
        let t = std::time::Instant::now();
        self.relink(app, version)?;
        let switch_ms = t.elapsed().as_secs_f64() * 1000.0;
        if let Err(e) = self.record_active(app, version, forget) {
            warn!(
                app,
                version, "cannot record the switch ({e}): switching back"
            );
            match &before {
                Some(b) => self.relink(app, b)?,
                None => self.remove_link(app)?,
            }
            return Err(e);
        }
        Ok(switch_ms)
    }

    /// Records `version` last in the history, dropping `forget`.
    fn record_active(
        &self,
        app: &str,
        version: &str,
        forget: Option<&str>,
    ) -> Result<(), DeliverError> {
        let mut history = self.history(app)?;
        history.retain(|h| h != version && Some(h.as_str()) != forget);
        history.push(version.to_string());
        self.write_history(app, &history)
    }

    /// Points `current` at `version`: a new link renamed over the old one,
    /// so a crash leaves one or the other.
    fn relink(&self, app: &str, version: &str) -> Result<(), DeliverError> {
        let dir = self.root.join(app);
        let tmp = dir.join(format!(".current.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(version, &tmp).map_err(io_at(&tmp))?;
        std::fs::rename(&tmp, dir.join(CURRENT)).map_err(io_at(&dir))?;
        sync_dir(&dir)
    }

    /// Removes `current`, durably.
    fn remove_link(&self, app: &str) -> Result<(), DeliverError> {
        let dir = self.root.join(app);
        let link = dir.join(CURRENT);
        std::fs::remove_file(&link).map_err(io_at(&link))?;
        sync_dir(&dir)
    }

    /// Removes `current` (the app's first release failed).
    fn unlink(&self, app: &str, version: &str) -> Result<(), DeliverError> {
        self.remove_link(app)?;
        let mut history = self.history(app)?;
        history.retain(|h| h != version);
        self.write_history(app, &history)
    }

    /// Activates a materialised release: hooks, switch, hooks; on a
    /// failure after the switch, the previous release is active again.
    /// Activating the active release again only runs `validate`.
    pub async fn activate(
        &self,
        manifest: &Manifest,
        linked_files: usize,
    ) -> Result<Activation, DeliverError> {
        let (app, version) = (manifest.app(), manifest.version());
        let dir = self.dir_of(app, version);
        let (active, previous) = blocking(|| {
            let active = self.active(app)?;
            let previous = if active.as_deref() == Some(version) {
                self.previous(app)?
            } else {
                active.clone()
            };
            Ok::<_, DeliverError>((active, previous))
        })?;
        let env = HookEnv {
            app,
            version,
            release: manifest.release_id().to_hex(),
            dir: &dir,
            previous: previous.as_deref(),
            previous_dir: previous.as_ref().map(|p| self.dir_of(app, p)),
        };
        if active.as_deref() == Some(version) {
            self.run_hook(Hook::Validate, &env).await?;
            return Ok(Activation {
                version: version.into(),
                previous,
                linked_files,
                switch_ms: 0.0,
                removed: Vec::new(),
            });
        }
        self.run_hook(Hook::BeforeActivate, &env).await?;
        // The switch itself: one rename, made durable, then the history
        // that records it (`open` reconciles the two after a crash).
        let switch_ms = blocking(|| self.switch(app, version, None))?;
        info!(app, version, previous = ?previous, switch_ms, "activated");
        for hook in [Hook::AfterActivate, Hook::Validate] {
            if let Err(e) = self.run_hook(hook, &env).await {
                warn!(app, version, "{e}: switching back");
                blocking(|| match &previous {
                    // The failed release leaves the history: it never ran.
                    Some(p) => self.switch(app, p, Some(version)).map(|_| ()),
                    None => self.unlink(app, version),
                })?;
                // The failed release's after_activate may have started
                // its own processes: the one active again restarts.
                if let Some(p) = &previous {
                    if let Err(restart) = self.reactivated(app, p, version).await {
                        return Err(DeliverError::Restart {
                            first: e.to_string(),
                            version: p.clone(),
                            restart: Box::new(restart),
                        });
                    }
                }
                return Err(e);
            }
        }
        let removed = blocking(|| self.retain(app))?;
        Ok(Activation {
            version: version.into(),
            previous,
            linked_files,
            switch_ms,
            removed,
        })
    }

    /// Makes the release before the active one active again and runs its
    /// `after_activate` hook (it restarts what the newer release's hooks
    /// started; `before_activate` and `validate` ran when it was first
    /// active). Returns the version now active.
    pub async fn rollback(&self, app: &str) -> Result<String, DeliverError> {
        let (previous, active) = blocking(|| {
            let Some(previous) = self.previous(app)? else {
                return Err(DeliverError::NoPrevious { app: app.into() });
            };
            // The release rolled back from leaves the history: the one
            // before `previous` becomes the next rollback's target.
            let active = self.active(app)?;
            self.switch(app, &previous, active.as_deref())?;
            Ok((previous, active))
        })?;
        info!(app, version = %previous, "rolled back");
        if let Err(restart) = self
            .reactivated(app, &previous, active.as_deref().unwrap_or(""))
            .await
        {
            return Err(DeliverError::Restart {
                first: format!(
                    "rolled back from {}",
                    active.as_deref().unwrap_or("nothing")
                ),
                version: previous,
                restart: Box::new(restart),
            });
        }
        Ok(previous)
    }

    /// Runs `after_activate` of `version`, active again in place of `from`.
    async fn reactivated(&self, app: &str, version: &str, from: &str) -> Result<(), DeliverError> {
        let dir = self.dir_of(app, version);
        let record = self
            .root
            .join(app)
            .join(META)
            .join(format!("{version}.files"));
        let release = read_written(&record).map(|w| w.release).unwrap_or_default();
        let from_dir = (!from.is_empty()).then(|| self.dir_of(app, from));
        let env = HookEnv {
            app,
            version,
            release,
            dir: &dir,
            previous: (!from.is_empty()).then_some(from),
            previous_dir: from_dir,
        };
        self.run_hook(Hook::AfterActivate, &env).await
    }

    /// Removes releases beyond the newest `retain` (by activation, then
    /// name), never the active or the previous one.
    pub fn retain(&self, app: &str) -> Result<Vec<String>, DeliverError> {
        let history = self.history(app)?;
        let keep_always: Vec<String> = history.iter().rev().take(2).cloned().collect();
        let mut order: Vec<String> = history.iter().rev().cloned().collect();
        let mut others: Vec<String> = self
            .versions(app)?
            .into_iter()
            .filter(|v| !order.contains(v))
            .collect();
        // Never activated (staged ahead): newest name first.
        others.sort();
        others.reverse();
        order.extend(others);
        let mut removed = Vec::new();
        for v in order.iter().skip(self.retain) {
            if keep_always.contains(v) {
                continue;
            }
            let dir = self.dir_of(app, v);
            if dir.is_dir() {
                std::fs::remove_dir_all(&dir).map_err(io_at(&dir))?;
                let _ =
                    std::fs::remove_file(self.root.join(app).join(META).join(format!("{v}.files")));
                removed.push(v.clone());
            }
        }
        if !removed.is_empty() {
            let mut history = history;
            history.retain(|h| !removed.contains(h));
            self.write_history(app, &history)?;
        }
        Ok(removed)
    }

    /// Runs a hook of the release if it ships one: `convoy/hooks/NAME`,
    /// in the release's directory, killed (with its process group) after
    /// the timeout.
    async fn run_hook(&self, hook: Hook, env: &HookEnv<'_>) -> Result<(), DeliverError> {
        let path = env.dir.join("convoy/hooks").join(hook.name());
        if !path.is_file() {
            return Ok(());
        }
        let mut cmd = tokio::process::Command::new(&path);
        // Package code sees none of the daemon's own environment: only
        // what a service manager would give it, what the config passes
        // through, and the hook's own variables.
        cmd.env_clear()
            .envs(hook_environment(&self.hook_env))
            .current_dir(env.dir)
            .env("CONVOY_HOOK", hook.name())
            .env("CONVOY_APP", env.app)
            .env("CONVOY_VERSION", env.version)
            .env("CONVOY_RELEASE", &env.release)
            .env("CONVOY_RELEASE_DIR", env.dir)
            .env("CONVOY_PREVIOUS_VERSION", env.previous.unwrap_or(""))
            .env(
                "CONVOY_PREVIOUS_RELEASE_DIR",
                env.previous_dir.as_deref().unwrap_or(Path::new("")),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(io_at(&path))?;
        let pgid = child.id();
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        // The pipes are read on their own, so a chatty hook never blocks
        // on a full pipe; the hook is done when it exits, not when its
        // pipes close, which a process it started in the background may
        // keep open for as long as it runs.
        let mut readers = tokio::spawn(async move {
            let (mut stdout, mut stderr) = (stdout, stderr);
            let (out, err) = tokio::join!(read_tail(&mut stdout), read_tail(&mut stderr));
            [out, err].concat()
        });
        match tokio::time::timeout(self.hook_timeout, child.wait()).await {
            Ok(status) => {
                let status = status.map_err(io_at(&path))?;
                if status.success() {
                    readers.abort();
                    return Ok(());
                }
                // What the hook wrote before it exited is in the pipes.
                let out = tokio::time::timeout(OUTPUT_AFTER_EXIT, &mut readers)
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_default();
                readers.abort();
                let tail = &out[out.len().saturating_sub(MAX_HOOK_OUTPUT)..];
                Err(DeliverError::HookFailed {
                    hook: hook.name(),
                    status: status.to_string(),
                    output: String::from_utf8_lossy(tail).trim().to_string(),
                })
            }
            Err(_) => {
                readers.abort();
                if let Some(pgid) = pgid {
                    // SAFETY: kill(2) on the process group the hook leads.
                    unsafe {
                        libc::kill(-(pgid as libc::pid_t), libc::SIGKILL);
                    }
                }
                Err(DeliverError::HookTimeout {
                    hook: hook.name(),
                    secs: self.hook_timeout.as_secs(),
                })
            }
        }
    }
}

/// The environment every hook starts from: `PATH` (the daemon's, or the
/// usual system directories), `HOME` (the daemon's, or `/`), `LANG` when
/// the daemon has it, and each variable named in `pass` that the daemon
/// has. Nothing else of the daemon's environment reaches package code.
fn hook_environment(pass: &[String]) -> Vec<(String, std::ffi::OsString)> {
    let mut env = vec![
        (
            "PATH".to_string(),
            std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_HOOK_PATH.into()),
        ),
        (
            "HOME".to_string(),
            std::env::var_os("HOME").unwrap_or_else(|| "/".into()),
        ),
    ];
    for name in std::iter::once("LANG").chain(pass.iter().map(String::as_str)) {
        if let Some(value) = std::env::var_os(name) {
            env.retain(|(n, _)| n != name);
            env.push((name.to_string(), value));
        }
    }
    env
}

/// Whether `name` may be passed through to hooks: a plain variable name,
/// and none of the hook's own `CONVOY_*` variables.
pub fn valid_hook_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with("CONVOY_")
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Reads a hook's output to its end, keeping only the last
/// [`MAX_HOOK_OUTPUT`] bytes: a chatty hook costs no memory.
async fn read_tail(r: &mut (impl tokio::io::AsyncRead + Unpin)) -> Vec<u8> {
    let mut tail = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return tail,
            Ok(n) => {
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > 2 * MAX_HOOK_OUTPUT {
                    tail.drain(..tail.len() - MAX_HOOK_OUTPUT);
                }
            }
        }
    }
}

struct HookEnv<'a> {
    app: &'a str,
    version: &'a str,
    release: String,
    dir: &'a Path,
    previous: Option<&'a str>,
    previous_dir: Option<PathBuf>,
}

/// Offers the active release's files that are as they were written.
struct FromActive {
    dir: PathBuf,
    written: Written,
}

impl Reuse for FromActive {
    fn existing(&self, path: &str, mode: u32, chunks: &[ChunkRef]) -> Option<PathBuf> {
        let w = self.written.files.get(path)?;
        if w.mode != mode
            || w.chunks.len() != chunks.len()
            || w.chunks.iter().zip(chunks).any(|(a, b)| *a != b.hash.0)
        {
            return None;
        }
        let p = self.dir.join(path);
        let m = std::fs::symlink_metadata(&p).ok()?;
        // Untouched since it was written: same inode, size and mtime.
        (m.is_file() && m.ino() == w.ino && m.len() == w.size && mtime_ns(&m) == w.mtime_ns)
            .then_some(p)
    }
}

struct Counting<'a> {
    inner: Option<&'a FromActive>,
    linked: &'a std::sync::atomic::AtomicUsize,
}

impl Reuse for Counting<'_> {
    fn existing(&self, path: &str, mode: u32, chunks: &[ChunkRef]) -> Option<PathBuf> {
        let p = self.inner?.existing(path, mode, chunks)?;
        self.linked
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(p)
    }
}

fn mtime_ns(m: &std::fs::Metadata) -> i128 {
    i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec())
}

fn read_written(path: &Path) -> Option<Written> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Writes a file so that a crash leaves the old content or the new.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DeliverError> {
    let dir = path.parent().expect("a file in a directory");
    durable::create_dir_all(dir).map_err(io_at(dir))?;
    durable::write_atomically(path, bytes).map_err(io_at(path))
}

fn sync_dir(dir: &Path) -> Result<(), DeliverError> {
    durable::sync_dir(dir).map_err(io_at(dir))
}

/// Runs file work that blocks (renames and syncs, removing whole trees of
/// retired releases) from async code without holding up the runtime's
/// other tasks: on a multi-thread runtime the worker first hands its other
/// tasks to a new one. Elsewhere (a current-thread runtime, no runtime) it
/// just runs.
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Ingest, MemoryStore, StoreSource};
    use std::os::unix::fs::PermissionsExt;

    struct Fixture {
        _dir: tempfile::TempDir,
        builds: PathBuf,
        store: MemoryStore,
        releases: Releases,
        root: PathBuf,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("releases");
        Fixture {
            builds: dir.path().join("builds"),
            store: MemoryStore::new(),
            releases: Releases::open(&root, 3, Duration::from_secs(5)).unwrap(),
            root,
            _dir: dir,
        }
    }

    impl Fixture {
        /// Packs a build of `files` (path, content) plus hooks as `web@version`.
        fn build(&self, version: &str, files: &[(&str, &str)], hooks: &[(&str, &str)]) -> Manifest {
            let src = self.builds.join(version);
            for (p, c) in files {
                let p = src.join(p);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(p, c).unwrap();
            }
            for (name, script) in hooks {
                let p = src.join("convoy/hooks").join(name);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(&p, format!("#!/bin/sh\n{script}\n")).unwrap();
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
            let ingest = Ingest::new(&self.store);
            convoy_chunker::pack(&src, "web", version, &&ingest, &()).unwrap()
        }

        async fn deliver(&self, m: &Manifest) -> Result<Activation, DeliverError> {
            let linked = self.releases.materialise(m, &StoreSource(&self.store))?;
            self.releases.activate(m, linked).await
        }

        fn current_file(&self, path: &str) -> String {
            std::fs::read_to_string(self.root.join("web/current").join(path)).unwrap()
        }
    }

    #[tokio::test]
    async fn activation_switches_current_and_links_unchanged_files() {
        let f = fixture();
        let v1 = f.build("1", &[("index.html", "one"), ("lib/big.js", "same")], &[]);
        let a = f.deliver(&v1).await.unwrap();
        assert_eq!((a.version.as_str(), a.previous.as_deref()), ("1", None));
        let v2 = f.build("2", &[("index.html", "two"), ("lib/big.js", "same")], &[]);
        let a = f.deliver(&v2).await.unwrap();
        assert_eq!(a.previous.as_deref(), Some("1"));
        assert_eq!(a.linked_files, 1, "lib/big.js is shared");
        assert_eq!(f.releases.active("web").unwrap().as_deref(), Some("2"));
        assert_eq!(f.current_file("index.html"), "two");
        let ino = |v: &str| {
            std::fs::metadata(f.root.join("web").join(v).join("lib/big.js"))
                .unwrap()
                .ino()
        };
        assert_eq!(ino("1"), ino("2"));
        assert_eq!(f.releases.history("web").unwrap(), vec!["1", "2"]);
    }

    #[tokio::test]
    async fn a_file_changed_in_place_is_not_linked() {
        let f = fixture();
        let v1 = f.build("1", &[("a.txt", "same")], &[]);
        f.deliver(&v1).await.unwrap();
        // The app writes into its release directory (same size).
        std::fs::write(f.root.join("web/1/a.txt"), "SAME").unwrap();
        let v2 = f.build("2", &[("a.txt", "same")], &[]);
        let a = f.deliver(&v2).await.unwrap();
        assert_eq!(a.linked_files, 0);
        assert_eq!(f.current_file("a.txt"), "same");
    }

    #[tokio::test]
    async fn hooks_run_in_order_with_their_environment() {
        let f = fixture();
        let log = f._dir.path().join("hooks.log");
        let line = |h: &str| {
            format!(
                "echo \"{h} $CONVOY_APP $CONVOY_VERSION prev=$CONVOY_PREVIOUS_VERSION $(basename $(pwd))\" >> {}",
                log.display()
            )
        };
        let hooks = [
            ("before_activate", line("before")),
            ("after_activate", line("after")),
            ("validate", line("validate")),
        ];
        let hooks: Vec<(&str, &str)> = hooks.iter().map(|(n, s)| (*n, s.as_str())).collect();
        f.deliver(&f.build("1", &[("a", "1")], &[])).await.unwrap();
        f.deliver(&f.build("2", &[("a", "2")], &hooks))
            .await
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "before web 2 prev=1 2\nafter web 2 prev=1 2\nvalidate web 2 prev=1 2\n"
        );
    }

    #[tokio::test]
    async fn a_failing_validate_switches_back() {
        let f = fixture();
        f.deliver(&f.build("1", &[("a", "1")], &[])).await.unwrap();
        let v2 = f.build(
            "2",
            &[("a", "2")],
            &[("validate", "echo unhealthy >&2; exit 3")],
        );
        let e = f.deliver(&v2).await.unwrap_err();
        assert!(
            matches!(&e, DeliverError::HookFailed { hook: "validate", output, .. } if output == "unhealthy"),
            "{e}"
        );
        assert_eq!(f.releases.active("web").unwrap().as_deref(), Some("1"));
        assert_eq!(f.current_file("a"), "1");
        assert_eq!(f.releases.history("web").unwrap(), vec!["1"]);
    }

    /// The release active again after a failed validate, and after a
    /// rollback, runs its after_activate: whatever the newer release's
    /// hook started must not go on serving.
    #[tokio::test]
    async fn the_release_active_again_runs_its_after_activate() {
        let f = fixture();
        let log = f.builds.parent().unwrap().join("activated.log");
        let record = format!(
            "echo \"$CONVOY_VERSION from ${{CONVOY_PREVIOUS_VERSION:-none}}\" >> {}",
            log.display()
        );
        let hooks = |validate: &'static str| {
            [
                ("after_activate", record.clone()),
                ("validate", validate.into()),
            ]
        };
        let ok = hooks("true");
        let ok: Vec<(&str, &str)> = ok.iter().map(|(n, s)| (*n, s.as_str())).collect();
        f.deliver(&f.build("1", &[("a", "1")], &ok)).await.unwrap();
        let bad = hooks("exit 1");
        let bad: Vec<(&str, &str)> = bad.iter().map(|(n, s)| (*n, s.as_str())).collect();
        f.deliver(&f.build("2", &[("a", "2")], &bad))
            .await
            .unwrap_err();
        f.deliver(&f.build("3", &[("a", "3")], &ok)).await.unwrap();
        assert_eq!(f.releases.rollback("web").await.unwrap(), "1");
        let lines = std::fs::read_to_string(&log).unwrap();
        assert_eq!(
            lines.lines().collect::<Vec<_>>(),
            [
                "1 from none",
                "2 from 1",
                "1 from 2",
                "3 from 1",
                "1 from 3"
            ]
        );
    }

    #[tokio::test]
    async fn a_switch_whose_history_cannot_be_written_is_undone() {
        let f = fixture();
        f.deliver(&f.build("1", &[("a", "1")], &[])).await.unwrap();
        f.releases
            .fail_history_writes
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let e = f
            .deliver(&f.build("2", &[("a", "2")], &[]))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("injected write failure"), "{e}");
        assert_eq!(f.releases.active("web").unwrap().as_deref(), Some("1"));
        assert_eq!(f.current_file("a"), "1");
        let e = f.releases.rollback("web").await.unwrap_err();
        assert!(matches!(e, DeliverError::NoPrevious { .. }), "{e}");
        f.releases
            .fail_history_writes
            .store(false, std::sync::atomic::Ordering::SeqCst);
        f.deliver(&f.build("2", &[("a", "2")], &[])).await.unwrap();
        f.releases
            .fail_history_writes
            .store(true, std::sync::atomic::Ordering::SeqCst);
        f.releases.rollback("web").await.unwrap_err();
        assert_eq!(f.releases.active("web").unwrap().as_deref(), Some("2"));
    }

    #[tokio::test]
    async fn rollback_takes_the_active_release_from_the_link_when_history_lags() {
        let f = fixture();
        f.deliver(&f.build("1", &[("a", "1")], &[])).await.unwrap();
        f.deliver(&f.build("2", &[("a", "2")], &[])).await.unwrap();
        // A crash after the switch to 2, before its history was written.
        std::fs::write(f.root.join("web/.convoy/history.json"), r#"["1"]"#).unwrap();
        assert_eq!(f.releases.rollback("web").await.unwrap(), "1");
        assert_eq!(f.current_file("a"), "1");
        assert_eq!(f.releases.history("web").unwrap(), vec!["1"]);
    }

    #[tokio::test]
    async fn a_failing_before_activate_changes_nothing_and_a_first_release_can_fail() {
        let f = fixture();
        let v1 = f.build("1", &[("a", "1")], &[("validate", "exit 1")]);
        f.deliver(&v1).await.unwrap_err();
        assert_eq!(f.releases.active("web").unwrap(), None);
        let v2 = f.build("2", &[("a", "2")], &[("before_activate", "exit 1")]);
        f.deliver(&v2).await.unwrap_err();
        assert_eq!(f.releases.active("web").unwrap(), None);
    }

    #[tokio::test]
    async fn a_chatty_failing_hook_reports_only_the_end_of_its_output() {
        let f = fixture();
        let v1 = f.build(
            "1",
            &[("a", "1")],
            &[(
                "validate",
                "head -c 5000000 /dev/zero | tr '\\0' x; echo; echo last words; exit 1",
            )],
        );
        let e = f.deliver(&v1).await.unwrap_err();
        let DeliverError::HookFailed { output, .. } = e else {
            panic!("{e}");
        };
        assert!(output.len() <= 2 * MAX_HOOK_OUTPUT, "{}", output.len());
        assert!(
            output.ends_with("last words"),
            "{}",
            &output[output.len() - 20..]
        );
    }

    #[tokio::test]
    async fn hooks_see_only_an_allow_listed_environment() {
        // Names no other test uses: the process environment is shared.
        std::env::set_var("HOOK_TEST_DAEMON_SECRET", "leaked");
        std::env::set_var("HOOK_TEST_PASSED", "passed");
        let dir = tempfile::tempdir().unwrap();
        let mut f = fixture();
        f.root = dir.path().join("r");
        f.releases = Releases::open(&f.root, 3, Duration::from_secs(5))
            .unwrap()
            .with_hook_env(vec!["HOOK_TEST_PASSED".into()]);
        let seen = dir.path().join("env");
        let hook = format!("env > {}", seen.display());
        f.deliver(&f.build("1", &[("a", "1")], &[("validate", &hook)]))
            .await
            .unwrap();
        let text = std::fs::read_to_string(&seen).unwrap();
        let names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(n, _)| n)
            .collect();
        assert!(text.contains("HOOK_TEST_PASSED=passed"), "{text}");
        assert!(text.contains("CONVOY_APP=web"), "{text}");
        assert!(names.contains(&"PATH") && names.contains(&"HOME"), "{text}");
        // The shell itself may add PWD, SHLVL and `_`; nothing else.
        let allowed = [
            "PATH",
            "HOME",
            "LANG",
            "HOOK_TEST_PASSED",
            "PWD",
            "OLDPWD",
            "SHLVL",
            "_",
        ];
        for n in names {
            assert!(
                allowed.contains(&n) || n.starts_with("CONVOY_"),
                "{n} leaked into the hook:\n{text}"
            );
        }
    }

    #[test]
    fn only_plain_names_outside_convoys_own_may_pass_through() {
        for ok in ["HTTP_PROXY", "TZ", "app_mode2"] {
            assert!(valid_hook_env_name(ok), "{ok}");
        }
        for bad in ["", "CONVOY_APP", "A=B", "1X", "A B"] {
            assert!(!valid_hook_env_name(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_hook_is_done_when_it_exits_and_its_background_process_runs_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = fixture();
        f.root = dir.path().join("r");
        f.releases = Releases::open(&f.root, 3, Duration::from_secs(20)).unwrap();
        let pidfile = dir.path().join("pid");
        // Started without redirects: it holds the hook's stdout and stderr.
        // Waiting for its pipes to close would run past the 20 s timeout.
        let hook = format!("sleep 60 & echo $! > {}", pidfile.display());
        f.deliver(&f.build("1", &[("a", "1")], &[("after_activate", &hook)]))
            .await
            .unwrap();
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SAFETY: signal 0 only asks whether the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        // SAFETY: ends the background process this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        assert!(alive, "the background process was killed with its hook");
    }

    #[tokio::test]
    async fn a_hook_past_its_timeout_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = fixture();
        f.releases = Releases::open(&dir.path().join("r"), 3, Duration::from_millis(300)).unwrap();
        f.root = dir.path().join("r");
        let v1 = f.build("1", &[("a", "1")], &[("before_activate", "sleep 30")]);
        let t = std::time::Instant::now();
        let e = f.deliver(&v1).await.unwrap_err();
        assert!(
            matches!(
                e,
                DeliverError::HookTimeout {
                    hook: "before_activate",
                    ..
                }
            ),
            "{e}"
        );
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn rollback_returns_to_the_previous_release_and_retention_keeps_it() {
        let f = fixture();
        for v in ["1", "2", "3", "4", "5"] {
            f.deliver(&f.build(v, &[("a", v)], &[])).await.unwrap();
        }
        // Three kept: 5 (active), 4 (previous), 3.
        assert_eq!(f.releases.versions("web").unwrap(), vec!["3", "4", "5"]);
        assert_eq!(f.releases.rollback("web").await.unwrap(), "4");
        assert_eq!(f.current_file("a"), "4");
        assert_eq!(f.releases.rollback("web").await.unwrap(), "3");
        assert!(matches!(
            f.releases.rollback("web").await,
            Err(DeliverError::NoPrevious { .. })
        ));
        assert_eq!(f.current_file("a"), "3");
    }

    #[tokio::test]
    async fn delivering_the_active_release_again_only_validates() {
        let f = fixture();
        let v1 = f.build("1", &[("a", "1")], &[]);
        f.deliver(&v1).await.unwrap();
        let a = f.deliver(&v1).await.unwrap();
        assert_eq!(a.switch_ms, 0.0);
        assert_eq!(f.releases.history("web").unwrap(), vec!["1"]);
    }

    #[tokio::test]
    async fn reopening_reconciles_history_with_the_link_and_clears_leftovers() {
        let f = fixture();
        f.deliver(&f.build("1", &[("a", "1")], &[])).await.unwrap();
        f.deliver(&f.build("2", &[("a", "2")], &[])).await.unwrap();
        // Killed after the rename, before the history was written.
        std::fs::write(f.root.join("web/.convoy/history.json"), r#"["1"]"#).unwrap();
        std::fs::create_dir(f.root.join("web/.3.convoy-partial-x")).unwrap();
        let r = Releases::open(&f.root, 3, Duration::from_secs(5)).unwrap();
        assert_eq!(r.history("web").unwrap(), vec!["1", "2"]);
        assert_eq!(r.active("web").unwrap().as_deref(), Some("2"));
        assert!(!f.root.join("web/.3.convoy-partial-x").exists());
        assert_eq!(r.previous("web").unwrap().as_deref(), Some("1"));
    }

    #[test]
    fn a_version_named_current_is_refused() {
        let f = fixture();
        let m = f.build("current", &[("a", "1")], &[]);
        assert!(matches!(
            f.releases.materialise(&m, &StoreSource(&f.store)),
            Err(DeliverError::ReservedVersion(_))
        ));
    }
}
