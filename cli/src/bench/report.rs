//! What `convoy bench` prints and writes: a table, JSON and a plot.

use anyhow::Result;
use convoy_daemon::units::format_bytes;
use serde_json::json;

use super::{BenchArgs, IdleRss, RunResult};
use crate::Output;

/// Prints the results (table or `--json`) and writes them to `--out`.
pub(super) fn report(
    idle: &IdleRss,
    results: &[RunResult],
    args: &BenchArgs,
    out: &Output,
) -> Result<()> {
    let mut table = markdown(idle, results, args);
    let summary = summary(results);
    if args.repeat > 1 {
        table += &summary_markdown(&summary, args.repeat);
    }
    let data = json!({
        "meta": meta(),
        "runs": results,
        "idle_rss": idle,
        "summary": summary,
    });
    out.emit(data.clone(), || table.clone());
    if let Some(dir) = &args.out {
        crate::plot::write_results(dir, &data, &table, TITLE, &lines(results))?;
    }
    Ok(())
}

/// Where and from what the figures come: the commit this binary was built
/// from (`-dirty` if its tree differed), when, the command, the machine.
pub(crate) fn meta() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_default();
    let unix_time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    json!({
        "commit": env!("CONVOY_COMMIT"),
        "unix_time": unix_time,
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "cpu": cpu,
    })
}

/// Median and range of one figure over a mode's runs.
#[derive(serde::Serialize)]
pub(super) struct Spread {
    pub(super) median: f64,
    pub(super) min: f64,
    pub(super) max: f64,
}

impl Spread {
    fn of(values: impl Iterator<Item = f64>) -> Self {
        let mut v: Vec<f64> = values.collect();
        v.sort_by(f64::total_cmp);
        Self {
            median: crate::remote::quantile(&v, 0.5),
            min: v.first().copied().unwrap_or(0.0),
            max: v.last().copied().unwrap_or(0.0),
        }
    }
}

/// A mode's figures over its `--repeat` runs.
#[derive(serde::Serialize)]
pub(super) struct Summary {
    pub(super) mode: String,
    pub(super) update: bool,
    pub(super) runs: usize,
    pub(super) p50_seconds: Spread,
    pub(super) p99_seconds: Spread,
    pub(super) ratio_to_bound: Spread,
    pub(super) origin_egress_bytes: Spread,
    pub(super) total_bytes: Spread,
    pub(super) cpu_seconds: Spread,
}

/// Each mode's (and update's) runs summed up, in the order first run.
pub(super) fn summary(results: &[RunResult]) -> Vec<Summary> {
    let mut keys: Vec<(&str, bool)> = Vec::new();
    for r in results {
        if !keys.contains(&(r.mode.as_str(), r.update)) {
            keys.push((r.mode.as_str(), r.update));
        }
    }
    keys.into_iter()
        .map(|(mode, update)| {
            let runs: Vec<&RunResult> = results
                .iter()
                .filter(|r| r.mode == mode && r.update == update)
                .collect();
            let of = |f: &dyn Fn(&RunResult) -> f64| Spread::of(runs.iter().map(|r| f(r)));
            Summary {
                mode: mode.into(),
                update,
                runs: runs.len(),
                p50_seconds: of(&|r| r.completion_seconds.p50),
                p99_seconds: of(&|r| r.completion_seconds.p99),
                ratio_to_bound: of(&|r| r.ratio_to_bound.unwrap_or(f64::NAN)),
                origin_egress_bytes: of(&|r| r.origin_egress_bytes as f64),
                total_bytes: of(&|r| r.total_bytes as f64),
                cpu_seconds: of(&|r| r.cpu_seconds),
            }
        })
        .collect()
}

fn summary_markdown(summary: &[Summary], repeat: usize) -> String {
    let mut s = format!(
        "\nover {repeat} runs each: median [min, max]\n\n| mode | update | p50 s | p99 s | p99/bound | origin egress | fleet CPU s |\n| --- | --- | --- | --- | --- | --- | --- |\n"
    );
    let secs = |x: &Spread| match x.median.is_nan() {
        true => "-".to_string(), // no bound: unlimited caps
        false => format!("{:.2} [{:.2}, {:.2}]", x.median, x.min, x.max),
    };
    for m in summary {
        s += &format!(
            "| {} | {} | {} | {} | {} | {} [{}, {}] | {} |\n",
            m.mode,
            if m.update { "yes" } else { "no" },
            secs(&m.p50_seconds),
            secs(&m.p99_seconds),
            secs(&m.ratio_to_bound),
            format_bytes(m.origin_egress_bytes.median as u64),
            format_bytes(m.origin_egress_bytes.min as u64),
            format_bytes(m.origin_egress_bytes.max as u64),
            secs(&m.cpu_seconds),
        );
    }
    s
}

/// Each convoy run's speed as a share of the same run's plain TCP copy
/// and of one that hashes and syncs as a target must (p99 over p99):
/// empty unless `tcp` ran beside it.
pub(super) fn against_tcp(results: &[RunResult]) -> String {
    let mut s = String::new();
    let p99_of = |mode: &str, r: &RunResult| {
        results
            .iter()
            .find(|t| t.mode == mode && t.update == r.update && t.repeat == r.repeat)
            .map(|t| t.completion_seconds.p99)
    };
    for r in results
        .iter()
        .filter(|r| !r.mode.starts_with("tcp") && !r.mode.starts_with("rsync"))
    {
        let (Some(tcp), Some(verify)) = (p99_of("tcp", r), p99_of("tcp-verify", r)) else {
            continue;
        };
        let p99 = r.completion_seconds.p99;
        s += &format!(
            "\n{}{}: {:.2} of tcp's speed, {:.2} of tcp-verify's (p99 {p99:.2} s against {tcp:.2} s and {verify:.2} s)",
            r.mode,
            if r.update { " (update)" } else { "" },
            tcp / p99,
            verify / p99,
        );
    }
    if !s.is_empty() {
        s.push('\n');
    }
    s
}

/// Each update's bytes per target, control included, against the one
/// reference all modes share; and for convoy runs the receivers' count of
/// the bytes moved against the senders'.
pub(super) fn against_reference(results: &[RunResult]) -> String {
    let mut s = String::new();
    for r in results {
        let name = format!("{}{}", r.mode, if r.update { " (update)" } else { "" });
        if let (Some(changed), Some(new_chunks)) = (r.changed_bytes, r.new_chunk_bytes) {
            let per_target = r.total_bytes as f64 / r.nodes.max(1) as f64;
            s += &format!(
                "\n{name}: {} per target moved, {}x the bytes that changed ({}), {}x the new chunks' ({})",
                format_bytes(per_target as u64),
                times(per_target / changed.max(1) as f64),
                format_bytes(changed),
                times(per_target / new_chunks.max(1) as f64),
                format_bytes(new_chunks),
            );
        }
        if let Some(sent) = r.total_bytes_sent {
            let off = (sent as f64 - r.total_bytes as f64) / r.total_bytes.max(1) as f64;
            s += &format!(
                "\n{name}: {} moved as the receivers counted, {} as the senders did ({:+.2}%), of which chunk bodies {}",
                format_bytes(r.total_bytes),
                format_bytes(sent),
                off * 100.0,
                format_bytes(r.chunk_bytes),
            );
        }
    }
    if !s.is_empty() {
        s.push('\n');
    }
    s
}

/// One run in a line, for stderr while the bench goes on.
pub(super) fn summary_line(r: &RunResult) -> String {
    format!(
        "{}{}: p50 {:.2}s p99 {:.2}s max {:.2}s, bound {} ({}), origin sent {}, moved {}, cpu {:.1}s",
        r.mode,
        if r.update { " (update)" } else { "" },
        r.completion_seconds.p50,
        r.completion_seconds.p99,
        r.completion_seconds.max,
        seconds(r.bound_seconds),
        ratio(r.ratio_to_bound),
        match r.delta_bytes {
            Some(d) => format!(
                "{} ({:.2}x the deltas of {})",
                format_bytes(r.origin_egress_bytes),
                r.origin_egress_bytes as f64 / d.max(1) as f64,
                format_bytes(d)
            ),
            None => format_bytes(r.origin_egress_bytes),
        },
        format_bytes(r.total_bytes),
        r.cpu_seconds,
    )
}

/// A ratio to two decimals, or two significant digits below 0.1.
fn times(x: f64) -> String {
    if x >= 0.1 || x <= 0.0 || !x.is_finite() {
        return format!("{x:.2}");
    }
    let decimals = 1 - x.log10().floor() as i32;
    format!("{x:.*}", decimals as usize)
}

fn seconds(s: Option<f64>) -> String {
    s.map_or("-".into(), |s| format!("{s:.2}s"))
}

fn ratio(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| format!("{r:.2}x"))
}

fn markdown(idle: &IdleRss, results: &[RunResult], args: &BenchArgs) -> String {
    let flag = |name: &str, v: &Option<String>| {
        v.as_ref()
            .map(|v| format!(" --{name} {v}"))
            .unwrap_or_default()
    };
    let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string());
    let mut s = format!(
        "convoy bench --nodes {}{} --uplink {}{}{}{}{}{}{} --dcs {}{}{} --push-parallel {} --delta-bases {} --security {}{} (at {})\n\n",
        args.nodes,
        flag("size", &args.size),
        args.uplink,
        flag("origin-uplink", &args.origin_uplink),
        flag("downlink", &args.downlink),
        flag("change", &args.change.map(|c| c.to_string())),
        flag("edits", &args.edits.map(|n| n.to_string())),
        flag("from", &path(&args.from)),
        flag("to", &path(&args.to)),
        args.dcs,
        if args.netns { " --netns" } else { "" },
        flag("dc-link", &args.dc_link),
        args.push_parallel,
        args.delta_bases,
        args.security.name(),
        flag("repeat", &(args.repeat > 1).then(|| args.repeat.to_string())),
        env!("CONVOY_COMMIT"),
    );
    s += "| mode | update | bytes/target | p50 s | p99 s | max s | bound s | p99/bound | origin egress | total moved (control incl.) | cross-dc chunks (links: all bytes) | verified | fleet CPU s | origin CPU s | peak RSS target / origin |\n";
    s += "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
    for r in results {
        let rss = match (r.target_peak_rss_bytes, r.origin_peak_rss_bytes) {
            (Some(t), Some(o)) => format!("{} / {}", format_bytes(t), format_bytes(o)),
            _ => "-".into(),
        };
        s += &format!(
            "| {} | {} | {} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} | {} | {}/{} | {:.1} | {:.1} | {} |\n",
            r.mode,
            match (r.update, r.delta_bytes) {
                (true, Some(d)) => format!("yes, deltas {}", format_bytes(d)),
                (true, None) => "yes".into(),
                (false, _) => "no".into(),
            },
            format_bytes(r.package_bytes),
            r.completion_seconds.p50,
            r.completion_seconds.p99,
            r.completion_seconds.max,
            r.bound_seconds.map_or("-".into(), |b| format!("{b:.2}")),
            r.ratio_to_bound.map_or("-".into(), |b| format!("{b:.2}")),
            format_bytes(r.origin_egress_bytes),
            format_bytes(r.total_bytes),
            match r.cross_dc_link_bytes {
                Some(l) => format!(
                    "{} (links: {})",
                    format_bytes(r.cross_dc_bytes),
                    format_bytes(l)
                ),
                None => format_bytes(r.cross_dc_bytes),
            },
            r.verified_nodes,
            r.nodes,
            r.cpu_seconds,
            r.origin_cpu_seconds,
            rss,
        );
    }
    s += &against_tcp(results);
    s += &against_reference(results);
    s += &format!(
        "\nidle RSS: origin {}, largest target {}\n",
        format_bytes(idle.origin_bytes),
        format_bytes(idle.target_max_bytes)
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    for r in results.iter().filter(|r| r.target_peak_rss_bytes.is_some()) {
        let busy = r.cpu_seconds / (r.wall_seconds * cores);
        if busy > 0.8 {
            s += &format!(
                "\nwarning: {}{} used {:.0}% of the machine's {} cores: the caps are too high for this machine to encrypt and verify the fleet's traffic, so times measure the CPU, not the network\n",
                r.mode,
                if r.update { " (update)" } else { "" },
                busy * 100.0,
                cores
            );
        }
    }
    s
}

const TITLE: &str = "targets done over time";

/// Each run's completion times, as the plot draws them.
fn lines(results: &[RunResult]) -> Vec<crate::plot::Line> {
    results
        .iter()
        .map(|r| crate::plot::Line {
            label: format!("{}{}", r.mode, if r.update { " (update)" } else { "" }),
            seconds: r.per_target_seconds.clone(),
        })
        .collect()
}
