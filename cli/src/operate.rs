//! The commands that steer roll-outs, over the coordinator's HTTP API:
//! promote, deploy, status, pause, resume, abort, rollback, history.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};

use crate::Output;

/// Where the API is and how to prove the right to use it.
pub struct Api {
    /// `http://HOST:PORT`.
    pub url: String,
    /// The token file, if no token is in the environment.
    pub token_file: Option<PathBuf>,
    agent: ureq::Agent,
}

/// Exit codes of `deploy --follow`.
pub const EXIT_ROLLED_BACK: u8 = 2;
/// The roll-out failed.
pub const EXIT_FAILED: u8 = 3;
/// The roll-out was aborted.
pub const EXIT_ABORTED: u8 = 4;

impl Api {
    pub fn new(url: Option<String>, token_file: Option<PathBuf>) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        Self {
            url: url
                .unwrap_or_else(|| "http://127.0.0.1:7410".into())
                .trim_end_matches('/')
                .to_string(),
            token_file,
            agent,
        }
    }

    fn token(&self) -> Result<String> {
        if let Some(t) = std::env::var("CONVOY_API_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
        {
            return Ok(t);
        }
        let Some(path) = &self.token_file else {
            bail!("no API token: set CONVOY_API_TOKEN or pass --api-token-file (the coordinator writes DATA_DIR/api-token)");
        };
        let t = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the API token from {}", path.display()))?;
        convoy_daemon::coordinator::api::token_of_file(&t)
            .map(str::to_string)
            .with_context(|| format!("{} holds no token", path.display()))
    }

    /// Sends `method path` with the bearer token (a POST with `body`, or
    /// `{}`); any status comes back as an answer.
    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<ureq::http::Response<ureq::Body>> {
        let url = format!("{}{path}", self.url);
        let auth = format!("Bearer {}", self.token()?);
        let resp = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Authorization", &auth).call(),
            (_, body) => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .send_json(body.unwrap_or_else(|| json!({}))),
        };
        resp.with_context(|| format!("cannot reach the coordinator's API at {}", self.url))
    }

    fn request(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let mut resp = self.send(method, path, body)?;
        let status = resp.status();
        let value: Value = resp
            .body_mut()
            .read_json()
            .with_context(|| format!("{method} {path}: the answer ({status}) is not JSON"))?;
        if !status.is_success() {
            let msg = value["error"].as_str().unwrap_or("no reason given");
            bail!("{msg} (HTTP {})", status.as_u16());
        }
        Ok(value)
    }

    /// `GET http://ADDR/health` of a target: its status code and body.
    pub fn probe_health(&self, addr: &str) -> Result<(u16, Value)> {
        let mut r = self
            .agent
            .get(&format!("http://{addr}/health"))
            .call()
            .with_context(|| format!("cannot reach the health endpoint at {addr}"))?;
        let status = r.status().as_u16();
        Ok((status, r.body_mut().read_json()?))
    }

    /// `GET` a page that is not JSON (`/metrics`).
    pub fn get_text(&self, path: &str) -> Result<String> {
        let mut resp = self.send("GET", path, None)?;
        let status = resp.status();
        let body = resp.body_mut().read_to_string()?;
        if !status.is_success() {
            bail!("GET {path}: HTTP {}: {}", status.as_u16(), body.trim());
        }
        Ok(body)
    }

    pub fn get(&self, path: &str) -> Result<Value> {
        self.request("GET", path, None)
    }

    pub fn post(&self, path: &str, body: Value) -> Result<Value> {
        self.request("POST", path, Some(body))
    }
}

/// The flags of `convoy deploy`.
#[derive(clap::Args)]
pub struct DeployArgs {
    /// APP@VERSION, published
    release: String,
    /// The environment (as the coordinator's pipelines file names it)
    #[arg(long)]
    env: String,
    /// live (activate in load), rolling (drain, activate, validate,
    /// undrain) or blue-green (activate the idle slice, then swap)
    /// [default: the app's, from the pipelines file]
    #[arg(long)]
    strategy: Option<String>,
    /// Cumulative waves: counts or percentages, e.g. 1,10%,50%,100%
    /// (blue-green ignores them) [default: the app's]
    #[arg(long)]
    waves: Option<String>,
    /// Distribution mode: swarm, push or pull [default: the app's]
    #[arg(long)]
    mode: Option<String>,
    /// Failures tolerated over the whole roll-out, a count (2) or a
    /// percentage of its targets (10%, rounded down); one more halts it
    /// and rolls back [default: the app's, else 0]
    #[arg(long, value_name = "AMOUNT")]
    max_failures: Option<String>,
    /// Seconds a rolling target stays drained before it switches
    #[arg(long, value_name = "SECONDS")]
    drain: Option<f64>,
    /// Seconds without progress before a target is reported slow; twice
    /// that and it has failed
    #[arg(long, value_name = "SECONDS")]
    progress_deadline: Option<f64>,
    /// Follow the roll-out to its end: a bar for distribution and one per
    /// wave, stragglers and failures as they happen. Exits 0 if it
    /// succeeded, 2 rolled back, 3 failed, 4 aborted
    #[arg(long)]
    follow: bool,
}

pub fn promote(api: &Api, out: &Output, release: &str, env: &str, force: bool) -> Result<ExitCode> {
    let v = api.post(
        "/v1/promotions",
        json!({"release": release, "env": env, "force": force}),
    )?;
    out.emit(v.clone(), || {
        format!(
            "promoted {release} to {env}{}\n",
            if v["forced"].as_bool() == Some(true) {
                " (forced past the pipeline's order; recorded)"
            } else {
                ""
            }
        )
    });
    Ok(ExitCode::SUCCESS)
}

pub fn deploy(api: &Api, out: &Output, a: DeployArgs) -> Result<ExitCode> {
    let v = api.post(
        "/v1/deployments",
        json!({
            "release": a.release,
            "env": a.env,
            "strategy": a.strategy,
            "waves": a.waves,
            "mode": a.mode,
            "max_failures": a.max_failures,
            "drain_seconds": a.drain,
            "progress_deadline_seconds": a.progress_deadline,
        }),
    )?;
    let id = v["id"].as_u64().ok_or_else(|| anyhow!("no id in {v}"))?;
    if !a.follow {
        out.emit(v.clone(), || {
            format!(
                "deployment {id}: {} to {} ({} {}, {} targets); follow with `convoy status {id}`\n",
                a.release,
                a.env,
                v["strategy"].as_str().unwrap_or("?"),
                v["mode"].as_str().unwrap_or("?"),
                v["targets"]
            )
        });
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "deployment {id}: {} to {} ({}, {} mode, {} targets)",
        a.release,
        a.env,
        v["strategy"].as_str().unwrap_or("?"),
        v["mode"].as_str().unwrap_or("?"),
        v["targets"]
    );
    follow(api, out, id)
}

/// Polls a roll-out until it ends, drawing its progress; prints the
/// summary (or the JSON detail) and exits with the outcome's code.
pub fn follow(api: &Api, out: &Output, id: u64) -> Result<ExitCode> {
    let d = watch(api, id, true)?;
    out.emit(d.clone(), || summary_text(&d));
    Ok(match d["outcome"].as_str() {
        Some("succeeded") => ExitCode::SUCCESS,
        Some("rolled_back") => ExitCode::from(EXIT_ROLLED_BACK),
        Some("aborted") => ExitCode::from(EXIT_ABORTED),
        _ => ExitCode::from(EXIT_FAILED),
    })
}

/// Polls a roll-out until it ends; with `notices`, bars and notices go to
/// stderr as it runs. Returns its final detail.
pub fn watch(api: &Api, id: u64, show: bool) -> Result<Value> {
    let target = if show {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let multi = MultiProgress::with_draw_target(target);
    let style = ProgressStyle::with_template("{prefix:>14} [{bar:30}] {pos}/{len} {msg}")
        .expect("the template is valid")
        .progress_chars("=> ");
    let bar = |prefix: String, len: u64| {
        let b = multi.add(ProgressBar::new(len));
        b.set_style(style.clone());
        b.set_prefix(prefix);
        b
    };
    let dist = bar("distribution".into(), 0);
    let mut waves: Vec<ProgressBar> = Vec::new();
    let mut seen = 0usize;
    let mut shown_done = BTreeSet::new();
    loop {
        let asked = std::time::Instant::now();
        let d = api.get(&format!("/v1/deployments/{id}"))?;
        // A roll-out of thousands is a large answer: ask at most a third
        // of the time, so following it never loads the coordinator.
        let pause = Duration::from_millis(200).max(asked.elapsed() * 2);
        let states = d["target_states"].as_object().cloned().unwrap_or_default();
        let total = states.len() as u64;
        let staged = states
            .values()
            .filter(|t| t["state"] != json!("Staging"))
            .count() as u64;
        dist.set_length(total);
        dist.set_position(staged);
        let notices = d["notices"].as_array().cloned().unwrap_or_default();
        for n in notices.iter().skip(seen) {
            let text = notice_text(&n["notice"]);
            if let (Some(t), true) = (text, show) {
                multi.suspend(|| eprintln!("{t}"));
            }
        }
        seen = notices.len();
        let wave_lists = d["waves"].as_array().cloned().unwrap_or_default();
        for (i, w) in wave_lists.iter().enumerate() {
            let members: Vec<&str> = w
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if i >= waves.len() {
                if d["phase"] == json!("Distributing") {
                    break;
                }
                waves.push(bar(format!("wave {}", i + 1), members.len() as u64));
            }
            let done = members
                .iter()
                .filter(|m| {
                    !matches!(
                        states.get(**m).map(|t| &t["state"]),
                        Some(Value::String(s)) if s == "Staged" || s == "Delivering"
                    )
                })
                .count() as u64;
            waves[i].set_position(done);
            if done == members.len() as u64 && shown_done.insert(i) {
                waves[i].finish();
            }
        }
        if d["outcome"].is_string() {
            dist.finish();
            for w in &waves {
                w.finish();
            }
            multi.clear().ok();
            return Ok(d);
        }
        std::thread::sleep(pause);
    }
}

fn short(target: &str) -> String {
    let n = target.len();
    format!("…{}", &target[n.saturating_sub(8)..])
}

/// A notice for people; `None` for those the bars already show.
fn notice_text(n: &Value) -> Option<String> {
    let (kind, body) = match n {
        Value::String(s) => (s.as_str(), &Value::Null),
        Value::Object(o) => o.iter().next().map(|(k, v)| (k.as_str(), v))?,
        _ => return None,
    };
    Some(match kind {
        "Distributed" => format!(
            "distributed to {} targets in {:.1} s",
            body["staged"],
            body["ms"].as_f64().unwrap_or(0.0) / 1000.0
        ),
        "WaveStarted" => return None,
        "WaveDone" => format!(
            "wave {} done in {:.2} s",
            body["wave"].as_u64().unwrap_or(0) + 1,
            body["ms"].as_f64().unwrap_or(0.0) / 1000.0
        ),
        "Slow" => format!(
            "slow: {} made no progress",
            short(body.as_str().unwrap_or("?"))
        ),
        "Straggler" => format!(
            "straggler: {} at {:.1} s, 3× its wave's median {:.1} s",
            short(body["target"].as_str().unwrap_or("?")),
            body["ms"].as_f64().unwrap_or(0.0) / 1000.0,
            body["median_ms"].as_f64().unwrap_or(0.0) / 1000.0
        ),
        "Failed" => format!(
            "failed: {}: {}",
            short(body["target"].as_str().unwrap_or("?")),
            body["reason"].as_str().unwrap_or("?")
        ),
        "Switched" => format!(
            "switched: slice {} is in load",
            body["live"].as_str().unwrap_or("?").to_lowercase()
        ),
        "Halted" => format!("halted: {}; rolling back", body.as_str().unwrap_or("?")),
        "Warning" => format!("warning: {}", body.as_str().unwrap_or("?")),
        "Paused" => "paused before the next wave".into(),
        "Resumed" => "resumed".into(),
        "Finished" => return None,
        other => other.to_string(),
    })
}

fn secs(v: &Value) -> String {
    v.as_f64().map_or("-".into(), |s| format!("{s:.2} s"))
}

pub fn summary_text(d: &Value) -> String {
    format!(
        "deployment {}: {}@{} to {}: {} ({}, {} mode; distribution {}, delivery {}, {} bytes moved, {} of {} targets failed)\n",
        d["id"],
        d["app"].as_str().unwrap_or("?"),
        d["version"].as_str().unwrap_or("?"),
        d["env"].as_str().unwrap_or("?"),
        d["outcome"].as_str().unwrap_or("running"),
        d["strategy"].as_str().unwrap_or("?"),
        d["mode"].as_str().unwrap_or("?"),
        secs(&d["distribution_seconds"]),
        secs(&d["delivery_seconds"]),
        d["bytes_moved"],
        d["failures"],
        d["targets"],
    )
}

pub fn status(api: &Api, out: &Output, id: Option<u64>) -> Result<ExitCode> {
    match id {
        Some(id) => {
            let d = api.get(&format!("/v1/deployments/{id}"))?;
            out.emit(d.clone(), || {
                let mut s = summary_text(&d);
                if let Some(states) = d["target_states"].as_object() {
                    for (t, st) in states {
                        let state = match &st["state"] {
                            Value::String(s) => s.clone(),
                            Value::Object(o) => o
                                .iter()
                                .map(|(k, v)| format!("{k}: {}", v.as_str().unwrap_or("")))
                                .collect(),
                            other => other.to_string(),
                        };
                        s.push_str(&format!("  {t}  {state}\n"));
                    }
                }
                for n in d["notices"].as_array().into_iter().flatten() {
                    if let Some(t) = notice_text(&n["notice"]) {
                        s.push_str(&format!("  · {t}\n"));
                    }
                }
                s
            });
        }
        None => {
            let v = api.get("/v1/deployments")?;
            out.emit(v.clone(), || {
                let mut s = format!(
                    "{:>4}  {:<24} {:<12} {:<10} {:<6} {:<12}\n",
                    "ID", "RELEASE", "ENV", "STRATEGY", "MODE", "STATE"
                );
                for d in v["deployments"].as_array().into_iter().flatten() {
                    s.push_str(&format!(
                        "{:>4}  {:<24} {:<12} {:<10} {:<6} {:<12}\n",
                        d["id"].as_u64().unwrap_or(0),
                        format!(
                            "{}@{}",
                            d["app"].as_str().unwrap_or("?"),
                            d["version"].as_str().unwrap_or("?")
                        ),
                        d["env"].as_str().unwrap_or("?"),
                        d["strategy"].as_str().unwrap_or("?"),
                        d["mode"].as_str().unwrap_or("?"),
                        d["outcome"].as_str().unwrap_or("running"),
                    ));
                }
                s
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn steer(api: &Api, out: &Output, id: u64, action: &str) -> Result<ExitCode> {
    let d = api.post(&format!("/v1/deployments/{id}/{action}"), json!({}))?;
    out.emit(d.clone(), || {
        let what = match action {
            "pause" => "will pause before its next wave",
            "resume" => "resumed",
            _ => "aborted: every target goes back to the release it ran before",
        };
        format!("deployment {id} {what}\n")
    });
    Ok(ExitCode::SUCCESS)
}

pub fn rollback(api: &Api, out: &Output, app: &str, env: &str) -> Result<ExitCode> {
    let v = api.post("/v1/rollbacks", json!({"app": app, "env": env}))?;
    let failed = v["failed"].as_object().map_or(0, |f| f.len());
    out.emit(v.clone(), || {
        let mut s = format!("{}\n", v["what"].as_str().unwrap_or("rolled back"));
        for (t, e) in v["failed"].as_object().into_iter().flatten() {
            s.push_str(&format!("  {t}: {}\n", e.as_str().unwrap_or("?")));
        }
        s
    });
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub fn history(api: &Api, out: &Output, app: &str) -> Result<ExitCode> {
    let v = api.get(&format!("/v1/apps/{app}/history"))?;
    out.emit(v.clone(), || {
        let mut s = String::new();
        for h in v["history"].as_array().into_iter().flatten() {
            let at = h["at_ms"].as_u64().unwrap_or(0);
            let when = humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + Duration::from_millis(at),
            );
            s.push_str(&format!(
                "{when}  {:<9} {:<10} {:<12} {}  ({})\n",
                h["action"].as_str().unwrap_or("?"),
                h["version"].as_str().unwrap_or("-"),
                h["env"].as_str().unwrap_or("-"),
                h["detail"].as_str().unwrap_or(""),
                h["by"].as_str().unwrap_or("?"),
            ));
        }
        s
    });
    Ok(ExitCode::SUCCESS)
}
