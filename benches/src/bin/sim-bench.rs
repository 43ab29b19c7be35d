//! Runs the fleet simulator (the production transfer state machines over a
//! virtual network of capped uplinks) in each mode and prints completion
//! times against the Kumar–Ross bound.
//!
//! Run: cargo run --release -p convoy-benches --bin sim-bench -- \
//!        [--targets 50] [--size-mib 16] [--uplink-mib 2] [--dcs 1] [--changed-percent 100] [--json]

use anyhow::{bail, Context, Result};
use convoy_daemon::transfer::sim::{run_modes, SimConfig, SimMode};
use serde_json::json;

fn main() -> Result<()> {
    let (mut targets, mut size_mib, mut uplink_mib, mut dcs, mut changed, mut json_out) =
        (50usize, 16u64, 2.0f64, 1usize, 100u32, false);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--targets" => targets = value()?.parse()?,
            "--size-mib" => size_mib = value()?.parse()?,
            "--uplink-mib" => uplink_mib = value()?.parse()?,
            "--dcs" => dcs = value()?.parse()?,
            "--changed-percent" => changed = value()?.parse()?,
            "--json" => json_out = true,
            "-h" | "--help" => {
                println!("usage: sim-bench [--targets N] [--size-mib N] [--uplink-mib X] [--dcs N] [--changed-percent P] [--json]");
                return Ok(());
            }
            _ => bail!("unknown argument {a:?} (see --help)"),
        }
    }
    if changed == 0 || changed > 100 {
        bail!("--changed-percent must be 1..=100");
    }
    let mib = (1u64 << 20) as f64;
    let mut base = SimConfig::new(SimMode::Swarm, targets, size_mib << 20, uplink_mib * mib);
    base.dcs = dcs;
    let chunks = base.chunk_sizes.len() as u32;
    base.preloaded = (0..chunks - (chunks * changed).div_ceil(100)).collect();
    let (bound, needed) = (base.bound_seconds(), base.bytes_needed());
    let mut rows = Vec::new();
    for (mode, r) in run_modes(&base, &[SimMode::Swarm, SimMode::Push, SimMode::Pull]) {
        let q = |x| r.quantile(x).unwrap_or(f64::NAN);
        if !json_out {
            println!(
                "{:<6} {targets} targets, {:.1} MiB each: p50 {:.2}s p99 {:.2}s max {:.2}s; bound {bound:.2}s, p99/bound {:.2}; origin sent {:.1} MiB, total {:.1} MiB, cross-dc {:.1} MiB",
                mode.name(), needed as f64 / mib, q(0.5), q(0.99), q(1.0),
                q(0.99) / bound, r.origin_egress as f64 / mib, r.total_bytes as f64 / mib, r.cross_dc_bytes as f64 / mib
            );
        }
        rows.push(json!({
            "mode": mode.name(), "targets": targets, "bytes_needed": needed,
            "p50": q(0.5), "p99": q(0.99), "max": q(1.0), "bound_seconds": bound, "ratio_to_bound": q(0.99) / bound,
            "origin_egress_bytes": r.origin_egress, "total_bytes": r.total_bytes, "cross_dc_bytes": r.cross_dc_bytes,
        }));
    }
    if json_out {
        println!("{}", serde_json::Value::Array(rows));
    }
    Ok(())
}
