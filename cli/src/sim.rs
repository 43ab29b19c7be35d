//! `convoy sim`: what a fleet of any size would take, from the simulator
//! (`convoy_daemon::transfer::sim`) on the flags of `convoy bench`.

use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use convoy_chunker::chunk_slice;
use convoy_daemon::transfer::sim::{run, SimConfig, SimMode};
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

use convoy_daemon::units::{format_bytes, parse_bytes};

use crate::Output;

/// `convoy sim`'s flags.
#[derive(Args, Debug)]
pub struct SimArgs {
    /// Targets
    #[arg(long, default_value_t = 1000)]
    pub nodes: usize,
    /// Release size (binary suffixes)
    #[arg(long, default_value = "16MiB")]
    pub size: String,
    /// Every target's upload cap, bytes per second
    #[arg(long, default_value = "2MiB")]
    pub uplink: String,
    /// The origin's upload cap [default: --uplink]
    #[arg(long)]
    pub origin_uplink: Option<String>,
    /// Spread the targets over this many data centres (the origin is in
    /// the first), two zones each, as `convoy bench --dcs` labels them
    #[arg(long, default_value_t = 1)]
    pub dcs: usize,
    /// Modes to simulate, comma-separated: swarm, push, pull
    #[arg(long, value_delimiter = ',', default_value = "swarm,push,pull")]
    pub modes: Vec<String>,
    /// An update: the share of the release (in percent of its chunks) that
    /// changed; every target holds the rest
    #[arg(long, value_name = "PERCENT")]
    pub change: Option<f64>,
    /// Seed of the peer choices, tie-breaks and the generated chunk sizes
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write the completion-time distribution of every mode here (SVG)
    #[arg(long, value_name = "FILE")]
    pub svg: Option<std::path::PathBuf>,
    /// Write results.json (with the commit and command), results.md and
    /// completion.svg here, as `convoy bench --out` does
    #[arg(long, value_name = "DIR")]
    pub out: Option<std::path::PathBuf>,
}

/// Chunk lengths of `size` bytes of incompressible files of at most 4 MiB,
/// as `convoy bench` generates them, cut by the real chunker.
fn chunk_sizes(size: u64, seed: u64) -> Vec<u32> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut sizes = Vec::new();
    let mut left = size;
    let mut buf = Vec::new();
    while left > 0 {
        let n = left.min(4 << 20) as usize;
        buf.resize(n, 0);
        rng.fill_bytes(&mut buf);
        let _ = chunk_slice::<()>(&buf, |_, c| {
            sizes.push(c.len);
            Ok(())
        });
        left -= n as u64;
    }
    sizes
}

fn rate(text: &str, flag: &str) -> Result<f64> {
    match parse_bytes(text).map_err(|e| anyhow::anyhow!("--{flag}: {e}"))? {
        0 => bail!("--{flag} must be more than 0: the simulator needs a finite cap"),
        r => Ok(r as f64),
    }
}

/// Runs `convoy sim`.
pub fn sim(args: SimArgs, out: &Output) -> Result<()> {
    if args.nodes == 0 || args.dcs == 0 {
        bail!("--nodes and --dcs must be at least 1");
    }
    let size = parse_bytes(&args.size).map_err(|e| anyhow::anyhow!("--size: {e}"))?;
    if size == 0 {
        bail!("--size must be more than 0");
    }
    let uplink = rate(&args.uplink, "uplink")?;
    let origin = match &args.origin_uplink {
        Some(o) => rate(o, "origin-uplink")?,
        None => uplink,
    };
    let modes = args
        .modes
        .iter()
        .map(|m| match m.as_str() {
            "swarm" => Ok(SimMode::Swarm),
            "push" => Ok(SimMode::Push),
            "pull" => Ok(SimMode::Pull),
            other => bail!("--modes: {other:?} is not swarm, push or pull"),
        })
        .collect::<Result<Vec<_>>>()?;
    let mut base = SimConfig::new(SimMode::Swarm, args.nodes, size, uplink);
    base.chunk_sizes = chunk_sizes(size, args.seed);
    base.origin_uplink = origin;
    base.dcs = args.dcs;
    base.zones = 2;
    base.seed = args.seed;
    if let Some(pct) = args.change {
        if !(pct > 0.0 && pct <= 100.0) {
            bail!("--change must be more than 0 and at most 100");
        }
        let n = base.chunk_sizes.len();
        let changed = ((n as f64 * pct / 100.0).ceil() as usize).clamp(1, n);
        base.preloaded = (0..(n - changed) as u32).collect();
    }
    // Push and pull take N*F/u_s from one origin: 100,000 targets of
    // 2 MiB at 2 MiB/s is 28 virtual hours, past SimConfig's default day.
    let one_origin = args.nodes as f64 * base.bytes_needed() as f64 / origin;
    base.time_limit = base
        .time_limit
        .max(std::time::Duration::from_secs_f64(4.0 * one_origin));
    base.max_events = base
        .max_events
        .max(200 * args.nodes as u64 * base.chunk_sizes.len() as u64);
    let bound = base.bound_seconds();
    let mut rows = Vec::new();
    let mut lines = Vec::new();
    let me = std::process::id();
    for mode in modes {
        let started = Instant::now();
        let cpu_before = crate::bench::fleet::cpu_seconds(me);
        let cfg = SimConfig {
            mode,
            ..base.clone()
        };
        let r = run(&cfg);
        let q = |x| r.quantile(x);
        let done = r.completion.iter().filter(|c| c.is_some()).count();
        let mut seconds: Vec<f64> = r
            .completion
            .iter()
            .map(|c| c.map_or(f64::INFINITY, |d| d.as_secs_f64()))
            .collect();
        seconds.sort_by(f64::total_cmp);
        lines.push(crate::plot::Line {
            label: mode.name().to_string(),
            seconds,
        });
        eprintln!(
            "{}: simulated in {:.1} s ({} events)",
            mode.name(),
            started.elapsed().as_secs_f64(),
            r.events
        );
        rows.push(serde_json::json!({
            "mode": mode.name(),
            "targets": args.nodes,
            "bytes_needed": cfg.bytes_needed(),
            "p50_seconds": q(0.5),
            "p99_seconds": q(0.99),
            "max_seconds": q(1.0),
            "bound_seconds": bound,
            "p99_over_bound": q(0.99).map(|p| p / bound),
            "origin_egress_bytes": r.origin_egress,
            "total_bytes": r.total_bytes,
            "cross_dc_bytes": r.cross_dc_bytes,
            "cross_dc_bytes_into": r.cross_dc_bytes_into,
            "dc_complete_seconds": r.dc_complete.iter().map(|d| d.map(|d| d.as_secs_f64())).collect::<Vec<_>>(),
            "completed": done,
            "origin_busy_answers": r.origin_busy,
            "events": r.events,
            "wall_seconds": started.elapsed().as_secs_f64(),
            "cpu_seconds": crate::bench::fleet::cpu_seconds(me) - cpu_before,
            // The process's peak so far: each mode's run is freed before the next.
            "peak_rss_bytes": crate::bench::fleet::rss(me).1,
        }));
    }
    let mut text = format!(
        "convoy sim --nodes {} --size {} --uplink {}{} --dcs {} (simulated at {})\n\n",
        args.nodes,
        args.size,
        args.uplink,
        args.origin_uplink
            .as_ref()
            .map(|o| format!(" --origin-uplink {o}"))
            .unwrap_or_default(),
        args.dcs,
        env!("CONVOY_COMMIT"),
    );
    text += "| mode | p50 s | p99 s | max s | bound s | p99/bound | origin egress | total moved | cross-dc | completed | origin busy answers | events | CPU s | peak RSS |\n";
    text +=
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
    let secs = |v: &serde_json::Value| v.as_f64().map_or("-".into(), |s| format!("{s:.2}"));
    for r in &rows {
        let bytes = |k: &str| format_bytes(r[k].as_u64().unwrap_or(0));
        text += &format!(
            "| {} | {} | {} | {} | {:.2} | {} | {} | {} | {} | {}/{} | {} | {} | {:.1} | {} |\n",
            r["mode"].as_str().unwrap_or(""),
            secs(&r["p50_seconds"]),
            secs(&r["p99_seconds"]),
            secs(&r["max_seconds"]),
            bound,
            secs(&r["p99_over_bound"]),
            bytes("origin_egress_bytes"),
            bytes("total_bytes"),
            bytes("cross_dc_bytes"),
            r["completed"],
            args.nodes,
            r["origin_busy_answers"],
            r["events"],
            r["cpu_seconds"].as_f64().unwrap_or(0.0),
            bytes("peak_rss_bytes"),
        );
    }
    if args.dcs > 1 {
        text += "\ncross-dc bytes into each data centre (dc0 holds the origin), and when the dc first held the whole release:\n";
        for r in &rows {
            let into: Vec<String> = r["cross_dc_bytes_into"]
                .as_array()
                .into_iter()
                .flatten()
                .zip(r["dc_complete_seconds"].as_array().into_iter().flatten())
                .enumerate()
                .map(|(i, (b, at))| {
                    let bytes = format_bytes(b.as_u64().unwrap_or(0));
                    format!("dc{i} {bytes} (at {} s)", secs(at))
                })
                .collect();
            text += &format!(
                "{}: {}\n",
                r["mode"].as_str().unwrap_or(""),
                into.join(", ")
            );
        }
    }
    let title = format!(
        "{} targets, {} at {}/s{}: targets done over time",
        args.nodes,
        args.size,
        args.uplink,
        if args.dcs > 1 {
            format!(", {} dcs", args.dcs)
        } else {
            String::new()
        }
    );
    if let Some(path) = &args.svg {
        crate::plot::completion_svg(path, &title, &lines)?;
        text += &format!("\ncompletion CDF: {}\n", path.display());
    }
    if let Some(dir) = &args.out {
        let data = serde_json::json!({ "meta": crate::bench::meta(), "sim": rows });
        crate::plot::write_results(dir, &data, &text, &title, &lines)?;
    }
    out.emit(serde_json::Value::Array(rows), || text);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes_are_the_chunkers_and_cover_the_release() {
        let sizes = chunk_sizes(9 << 20, 7);
        assert_eq!(sizes.iter().map(|s| u64::from(*s)).sum::<u64>(), 9 << 20);
        // FastCDC's cuts, not a fixed size: 16 to 256 KiB, about 64 on average.
        assert!(sizes.iter().any(|s| *s != sizes[0]));
        assert!(sizes.iter().all(|s| (1..=256 << 10).contains(s)));
        let avg = (9 << 20) / sizes.len();
        assert!((32 << 10..128 << 10).contains(&avg), "{avg}");
        assert_eq!(sizes, chunk_sizes(9 << 20, 7));
    }
}
