//! `convoy demo`: the whole product in one command, on loopback.
//!
//! A coordinator and a fleet (12 targets in 3 data centres, half `slice=blue`,
//! half `slice=green`, all `env=production`) start in a temporary directory.
//! A generated web app goes out three times: v1 rolling in swarm mode, v2 (a
//! small patch) blue-green in push mode, v3 — whose `validate` hook fails —
//! rolling, to show the halt and the automatic rollback. A summary follows;
//! everything stops and is removed at the end, also on Ctrl-C, unless
//! `--keep`.
//!
//! With `--lb` (see [`lb`]), the app is a real web server on every target
//! behind HAProxy, a first release goes out before the load starts, and
//! wrk drives requests through HAProxy during the three roll-outs.

mod lb;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use convoy_daemon::store::RocksStore;
use convoy_daemon::units::{format_bytes, parse_bytes};
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use serde_json::{json, Value};

use crate::bench::fleet::{convoyd_path, wait_for_targets, Fleet};
use crate::operate::{watch, Api};
use crate::remote::publish_dir;
use crate::Output;

/// The flags of `convoy demo`.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Targets to start: spread over 3 data centres, alternately in the
    /// blue and the green slice
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u64).range(2..=200))]
    nodes: u64,
    /// Size of the generated web app (binary suffixes: 16MiB)
    #[arg(long, default_value = "16MiB")]
    size: String,
    /// Leave the fleet running at the end and print how to talk to it
    #[arg(long)]
    keep: bool,
    /// The convoyd binary [default: the one next to convoy]
    #[arg(long, value_name = "PATH")]
    convoyd: Option<PathBuf>,
    /// Keep the daemons' logs in DIR (created) instead of the fleet's
    /// temporary directory
    #[arg(long, value_name = "DIR")]
    logs: Option<PathBuf>,
    /// Put HAProxy in front of the targets, each running the app (a web
    /// server answering with its version), and drive load through it
    /// with wrk during the roll-outs: counts failed requests and the
    /// versions served. Needs haproxy and wrk on PATH
    #[arg(long, conflicts_with = "keep")]
    lb: bool,
}

const DCS: u64 = 3;

/// The demo's pipelines file. With `--lb`, the environment declares its
/// load balancer as HAProxy is set up ([`lb::haproxy_config`]) and the
/// drain is left to follow it; without, a fixed short drain.
fn pipelines(lb: bool) -> String {
    let (load_balancer, drain) = if lb {
        let table = format!(
            "\n[environments.production.load_balancer]\ncheck_interval_seconds = {}\nfall = {}\nrise = {}\n",
            lb::CHECK_INTERVAL_MS as f64 / 1000.0,
            lb::FALL,
            lb::RISE
        );
        (table, "")
    } else {
        (String::new(), "drain_seconds = 0.5\n")
    };
    format!(
        r#"# Written by `convoy demo`.
[environments.production]
selector = "env=production"
blue_green = true
{load_balancer}
[apps.web]
pipeline = ["production"]

[apps.web.rollout]
strategy = "rolling"
waves = "1,25%,50%,100%"
mode = "swarm"
max_failures = "0"
{drain}progress_deadline_seconds = 30
"#
    )
}

/// `--lb`: the version in service before the load starts.
const BOOTSTRAP: Step = Step {
    version: "0.9",
    strategy: "live",
    mode: "swarm",
    expect: "succeeded",
    what: "the version in service before the load starts",
};

/// One step of the demo: a version and how it goes out.
struct Step {
    version: &'static str,
    strategy: &'static str,
    mode: &'static str,
    expect: &'static str,
    what: &'static str,
}

const STEPS: [Step; 3] = [
    Step {
        version: "1.0",
        strategy: "rolling",
        mode: "swarm",
        expect: "succeeded",
        what: "the first release, rolling in 4 waves, distributed as a swarm",
    },
    Step {
        version: "1.1",
        strategy: "blue-green",
        mode: "push",
        expect: "succeeded",
        what: "a small patch, blue-green: the idle slice gets it, then the slices swap",
    },
    Step {
        version: "1.2",
        strategy: "rolling",
        mode: "swarm",
        expect: "rolled_back",
        what: "a release whose validate hook fails: the roll-out halts and rolls back",
    },
];

/// Writes the web app's tree for `version`: the same big files every
/// time except a 4 KiB patch per version, an index naming the version,
/// and hooks (v1.2's `validate` fails).
fn write_app(
    dir: &Path,
    size: u64,
    step: usize,
    version: &str,
    fails: bool,
    server: Option<&Path>,
) -> Result<()> {
    for d in ["bin", "static", "convoy/hooks"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    let mut rng = SmallRng::seed_from_u64(42);
    let mut big = |path: &str, len: u64, patches: usize| -> Result<()> {
        let mut buf = vec![0u8; len as usize];
        rng.fill_bytes(&mut buf);
        for p in 1..=patches {
            // Each later version rewrites a 4 KiB run further in.
            let at = (buf.len() / 4 * p).min(buf.len().saturating_sub(4096));
            let end = (at + 4096).min(buf.len());
            buf[at..end].fill(p as u8);
        }
        std::fs::write(dir.join(path), &buf).with_context(|| format!("writing {path}"))
    };
    match server {
        // `--lb`: the real app, its size subtracted from no other file.
        Some(app) => {
            std::fs::copy(app, dir.join("bin/server"))
                .with_context(|| format!("copying {}", app.display()))?;
        }
        None => big("bin/server", size / 2, 0)?,
    }
    big("static/app.js", size / 4, step)?;
    big("static/vendor.js", size - size / 2 - size / 4, 0)?;
    std::fs::write(
        dir.join("index.html"),
        format!("<html><body><h1>web version {version}</h1></body></html>\n"),
    )?;
    let hook = |name: &str, body: &str| -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join("convoy/hooks").join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}"))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
        Ok(())
    };
    hook(
        "before_activate",
        "test -x \"$CONVOY_RELEASE_DIR/bin/server\" || chmod +x \"$CONVOY_RELEASE_DIR/bin/server\"\n",
    )?;
    if server.is_some() {
        for (name, body) in lb::hooks(fails) {
            hook(name, &body)?;
        }
        return Ok(());
    }
    hook(
        "after_activate",
        "echo \"$CONVOY_APP $CONVOY_VERSION active (was ${CONVOY_PREVIOUS_VERSION:-none})\"\n",
    )?;
    if fails {
        hook(
            "validate",
            "echo \"GET /healthz answered 500\" >&2\nexit 1\n",
        )?;
    } else {
        hook(
            "validate",
            "grep -q \"web version $CONVOY_VERSION\" \"$CONVOY_RELEASE_DIR/index.html\"\n",
        )?;
    }
    Ok(())
}

pub fn demo(args: DemoArgs, out: &Output) -> Result<ExitCode> {
    let size = parse_bytes(&args.size).map_err(|e| anyhow!("--size: {e}"))?;
    if size < 64 << 10 {
        bail!("--size must be at least 64KiB");
    }
    let convoyd = convoyd_path(args.convoyd.as_deref())?;
    let rt = crate::remote::runtime()?;
    rt.block_on(async {
        tokio::select! {
            r = run(&args, size, &convoyd, out) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted; the fleet is stopped and its directory removed")),
        }
    })
}

async fn run(args: &DemoArgs, size: u64, convoyd: &Path, out: &Output) -> Result<ExitCode> {
    let say = |s: String| {
        if !out.json {
            eprintln!("{s}");
        }
    };
    let tools = args.lb.then(lb::Tools::find).transpose()?;
    let mut fleet = Fleet::new("convoy-demo-", args.logs.clone())?;
    // A kept fleet outlives this process.
    fleet.die_with_us = !args.keep;
    let root = fleet.dir.path().to_path_buf();
    let pipelines_file = root.join("pipelines.toml");
    std::fs::write(&pipelines_file, pipelines(args.lb))?;
    // Declared after the fleet: the apps stop first.
    let mut apps = lb::Apps {
        pidfiles: Vec::new(),
    };
    let mut servers = Vec::new();
    say(format!(
        "== starting a coordinator and {} targets ({DCS} data centres, blue and green slices) in {}",
        args.nodes,
        root.display()
    ));
    let mut cargs = fleet.common_args("coordinator", 0, "warn", args.nodes as usize + 1);
    cargs.extend([
        "--pipelines".into(),
        pipelines_file.display().to_string(),
        "--heartbeat-ms".into(),
        "250".into(),
        "--label".into(),
        "dc=dc0".into(),
    ]);
    fleet.start_coordinator(convoyd, &cargs)?;
    for i in 0..args.nodes {
        let name = format!("target-{i:03}");
        let mut t = fleet.common_args(&name, 0, "warn", args.nodes as usize + 1);
        let slice = if i.is_multiple_of(2) { "blue" } else { "green" };
        for l in [
            "env=production".to_string(),
            format!("dc=dc{}", i % DCS),
            format!("slice={slice}"),
        ] {
            t.extend(["--label".into(), l]);
        }
        let mut envs = Vec::new();
        let mut app_port = 0;
        if args.lb {
            app_port = lb::free_port()?;
            let pidfile = root.join(format!("{name}.web.pid"));
            envs.push((lb::PORT_VAR.to_string(), app_port.to_string()));
            envs.push((lb::PIDFILE_VAR.to_string(), pidfile.display().to_string()));
            for var in [lb::PORT_VAR, lb::PIDFILE_VAR] {
                t.extend(["--hook-env".into(), var.into()]);
            }
            apps.pidfiles.push(pidfile);
        }
        let ready = fleet.start_target_with(convoyd, &name, 0, &t, &envs)?;
        if args.lb {
            let health = ready["health"]
                .as_str()
                .context("a target without health endpoint")?;
            servers.push(lb::Server {
                name,
                app_port,
                health: health.to_string(),
            });
        }
    }
    let client = fleet.operator_client().await?;
    wait_for_targets(&client, args.nodes as usize).await?;
    let ready = fleet.coordinator_ready.clone();
    let api_url = ready["api"].as_str().context("no API address")?.to_string();
    let token_file = PathBuf::from(ready["api_token_file"].as_str().context("no token file")?);
    let api = Arc::new(Api::new(Some(api_url.clone()), Some(token_file.clone())));
    let store = RocksStore::open(&root.join("cli-store"))?;
    let mut rows = Vec::new();
    let mut unexpected = Vec::new();
    let steps: Vec<&Step> = args
        .lb
        .then_some(&BOOTSTRAP)
        .into_iter()
        .chain(STEPS.iter())
        .collect();
    // `--lb`: HAProxy, wrk and the sampler, once the first version serves.
    let mut load: Option<(lb::Haproxy, lb::Load, lb::Sampler)> = None;
    // The version in service before each roll-out.
    let mut serving: Option<&str> = None;
    for (i, step) in steps.iter().enumerate() {
        if let (Some(tools), None, Some(_)) = (&tools, &load, serving) {
            let haproxy = lb::Haproxy::start(tools, &root, lb::free_port()?, &servers)?;
            let wrk = lb::Load::start(tools, &root, haproxy.front)?;
            let sampler =
                lb::Sampler::start(haproxy.front, &format!("during web@{}", step.version));
            say(format!(
                "\n== HAProxy on 127.0.0.1:{} in front of the {} targets (checks every {} ms, fall {}, rise {}); wrk drives load through it from now on",
                haproxy.front,
                servers.len(),
                lb::CHECK_INTERVAL_MS,
                lb::FALL,
                lb::RISE
            ));
            load = Some((haproxy, wrk, sampler));
        } else if let Some((_, _, sampler)) = &load {
            sampler.phase(&format!("during web@{}", step.version));
        }
        let release = format!("web@{}", step.version);
        say(format!(
            "\n== {release}: {} ({} in {} mode)",
            step.what, step.strategy, step.mode
        ));
        let dir = root.join(format!("web-{}", step.version));
        let fails = step.expect == "rolled_back";
        let server = tools.as_ref().map(|t| t.app.as_path());
        write_app(&dir, size, i, step.version, fails, server)?;
        let (_, manifest, uploaded, bytes) =
            publish_dir(&client, &store, &dir, "web", step.version).await?;
        say(format!(
            "published {release}: {} chunks, {uploaded} uploaded ({})",
            manifest.unique_chunks().len(),
            format_bytes(bytes)
        ));
        let a = api.clone();
        let body = json!({"release": release, "env": "production", "strategy": step.strategy, "mode": step.mode});
        let show = !out.json;
        let d = tokio::task::spawn_blocking(move || -> Result<Value> {
            let started = a.post("/v1/deployments", body)?;
            let id = started["id"].as_u64().context("no deployment id")?;
            watch(&a, id, show)
        })
        .await??;
        let result = d["outcome"].as_str().unwrap_or("failed").to_string();
        say(crate::operate::summary_text(&d).trim_end().to_string());
        if result != step.expect {
            unexpected.push(format!(
                "{release} ended {result}, expected {}",
                step.expect
            ));
        }
        let mut served = Value::Null;
        if let Some((_, _, sampler)) = &load {
            let (during_name, after_name) =
                (format!("during {release}"), format!("after {release}"));
            sampler.phase(&after_name);
            sampler.wait_for(100)?;
            let (during, after) = (sampler.seen(&during_name), sampler.seen(&after_name));
            let before = serving.unwrap_or("?");
            let now = if step.expect == "succeeded" {
                step.version
            } else {
                before
            };
            say(format!(
                "served through HAProxy: during {}; after {}",
                seen_text(&during),
                seen_text(&after)
            ));
            if step.strategy == "rolling" && step.expect == "succeeded" {
                let both = [before, step.version]
                    .iter()
                    .all(|v| during.versions.contains_key(*v));
                if !both {
                    unexpected.push(format!(
                        "during the rolling {release} HAProxy served {}, not both {before} and {}",
                        seen_text(&during),
                        step.version
                    ));
                }
            }
            if !after.only(now) {
                unexpected.push(format!(
                    "after {release} HAProxy served {}, not only {now}",
                    seen_text(&after)
                ));
            }
            if during.failed > 0 {
                unexpected.push(format!(
                    "{} requests failed during {release}",
                    during.failed
                ));
            }
            served = json!({"during": during.json(), "after": after.json()});
        }
        if result == "succeeded" {
            serving = Some(step.version);
        }
        // The switch itself on each target, and (blue-green) from the idle
        // slice's validation to both slices' load changes.
        let mut switch_us: Vec<u64> = d["activations"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(_, a)| a["switch_us"].as_u64())
            .collect();
        switch_us.sort_unstable();
        let p99_ms = (!switch_us.is_empty()).then(|| {
            switch_us
                [((switch_us.len() as f64 * 0.99).ceil() as usize).clamp(1, switch_us.len()) - 1]
                as f64
                / 1000.0
        });
        let at = |kind: &str| {
            d["notices"]
                .as_array()
                .into_iter()
                .flatten()
                .find_map(|n| n["notice"].get(kind).and(n["at_ms"].as_u64()))
        };
        let slice_switch = match (at("WaveDone"), at("Finished")) {
            (Some(a), Some(b)) if step.strategy == "blue-green" => {
                Some(b.saturating_sub(a) as f64 / 1000.0)
            }
            _ => None,
        };
        rows.push(json!({
            "activation_p99_ms": p99_ms,
            "slice_switch_seconds": slice_switch,
            "app": "web",
            "version": step.version,
            "strategy": step.strategy,
            "mode": step.mode,
            "distribution_seconds": d["distribution_seconds"],
            "delivery_seconds": d["delivery_seconds"],
            "bytes_moved": d["bytes_moved"],
            "result": result,
            "served": served,
        }));
    }
    // What the load balancers see: each target's health endpoint.
    let a = api.clone();
    let (in_load, drained) = tokio::task::spawn_blocking(move || -> Result<_> {
        let view = a.get("/v1/fleet")?;
        let (mut in_load, mut drained) = (Vec::new(), Vec::new());
        for t in view["targets"].as_array().into_iter().flatten() {
            let r = &t["report"];
            let addr = r["health"]
                .as_str()
                .context("a target without a health endpoint")?;
            let (status, body) = a.probe_health(addr)?;
            let line = format!(
                "web@{} {}",
                body["active"]["web"].as_str().unwrap_or("-"),
                r["labels"]["slice"].as_str().unwrap_or("-")
            );
            if status == 200 {
                in_load.push(line);
            } else {
                drained.push(line);
            }
        }
        Ok((in_load, drained))
    })
    .await??;
    let summarise = |v: &[String]| {
        let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
        for l in v {
            *counts.entry(l.as_str()).or_default() += 1;
        }
        counts
            .iter()
            .map(|(l, n)| format!("{n}× {l}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let fleet_line = format!(
        "health 200 (in load): {}; 503 (drained): {}",
        summarise(&in_load),
        summarise(&drained)
    );
    // `--lb`: each target's app serves the release its target says is
    // active, whichever slice it is in (a release switched back from
    // must not be left running).
    if args.lb {
        let a = api.clone();
        let checks: Vec<(String, String, u16)> = servers
            .iter()
            .map(|s| (s.name.clone(), s.health.clone(), s.app_port))
            .collect();
        let mismatched = tokio::task::spawn_blocking(move || -> Result<Vec<String>> {
            let mut bad = Vec::new();
            for (name, health, port) in checks {
                let (_, body) = a.probe_health(&health)?;
                let active = body["active"]["web"].as_str().unwrap_or("-").to_string();
                match lb::ask(port) {
                    Ok(v) if v == active => {}
                    Ok(v) => bad.push(format!("{name} runs web@{active} but its app answers {v}")),
                    Err(e) => bad.push(format!("{name}'s app (web@{active}) does not answer: {e}")),
                }
            }
            Ok(bad)
        })
        .await??;
        unexpected.extend(mismatched);
    }
    let mut lb_json = Value::Null;
    let mut lb_line = None;
    if let Some((_haproxy, wrk, sampler)) = load.take() {
        let phases = sampler.stop();
        let w = wrk.stop()?;
        let sampled: u64 = phases
            .iter()
            .map(|(_, s)| s.versions.values().sum::<u64>())
            .sum();
        let line = format!(
            "load balancer: {} requests through HAProxy in {:.1} s ({:.0} per second), {} failed (connect {}, read {}, write {}, timeout {}, non-2xx {}); {sampled} sampled for their version",
            w.requests,
            w.seconds,
            w.rate(),
            w.failed(),
            w.connect,
            w.read,
            w.write,
            w.timeout,
            w.status
        );
        if w.failed() > 0 {
            unexpected.push(format!("{} of wrk's requests failed", w.failed()));
        }
        lb_json = json!({"wrk": w.json(), "sampled": sampled});
        lb_line = Some(line);
    }
    out.emit(
        json!({"deployments": rows, "fleet": fleet_line, "load_balancer": lb_json}),
        || {
            let mut s = format!(
                "\n{:<10} {:<11} {:<6} {:>13} {:>10} {:>12}  {}\n",
                "RELEASE", "STRATEGY", "MODE", "DISTRIBUTION", "DELIVERY", "MOVED", "RESULT"
            );
            for r in &rows {
                let secs = |v: &Value| v.as_f64().map_or("-".into(), |s| format!("{s:.2} s"));
                s.push_str(&format!(
                    "{:<10} {:<11} {:<6} {:>13} {:>10} {:>12}  {}\n",
                    format!("web@{}", r["version"].as_str().unwrap_or("?")),
                    r["strategy"].as_str().unwrap_or("?"),
                    r["mode"].as_str().unwrap_or("?"),
                    secs(&r["distribution_seconds"]),
                    secs(&r["delivery_seconds"]),
                    format_bytes(r["bytes_moved"].as_u64().unwrap_or(0)),
                    r["result"].as_str().unwrap_or("?"),
                ));
            }
            for r in &rows {
                if let Some(ms) = r["activation_p99_ms"].as_f64() {
                    s.push_str(&format!(
                        "\nweb@{}: activation (the switch of `current`) p99 {ms:.2} ms",
                        r["version"].as_str().unwrap_or("?")
                    ));
                }
                if let Some(sw) = r["slice_switch_seconds"].as_f64() {
                    s.push_str(&format!("; slices swapped {sw:.3} s after validation"));
                }
            }
            s.push_str(&format!("\nfleet now: {fleet_line}\n"));
            if let Some(l) = &lb_line {
                s.push_str(&format!("{l}\n"));
            }
            s
        },
    );
    if args.keep {
        let pids = fleet.detach();
        let dir = root.display();
        eprintln!(
            "\nThe fleet keeps running in {dir}. Talk to it with:\n\n  export CONVOY_API={api_url} CONVOY_API_TOKEN_FILE={}\n  export CONVOY_COORDINATOR={} CONVOY_FLEET_KEY_FILE={}\n  convoy status; convoy history web; convoy fleet\n\nor open {api_url}/ in a browser (the web view; its token is in the file above).\n\nStop it with:\n\n  kill {}; rm -rf {dir}",
            token_file.display(),
            fleet.coordinator_addr,
            fleet.key_file.display(),
            pids.iter().map(u32::to_string).collect::<Vec<_>>().join(" "),
        );
    }
    if !unexpected.is_empty() {
        bail!(
            "the demo did not go as it should: {}",
            unexpected.join("; ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `0.9×120, 1.0×80` (and failures, if any).
fn seen_text(s: &lb::Seen) -> String {
    let mut parts: Vec<String> = s.versions.iter().map(|(v, n)| format!("{v}×{n}")).collect();
    if s.failed > 0 {
        parts.push(format!(
            "{} failed ({})",
            s.failed,
            s.first_failure.as_deref().unwrap_or("?")
        ));
    }
    if parts.is_empty() {
        "nothing".into()
    } else {
        parts.join(", ")
    }
}
