#!/usr/bin/env python3
"""Writes BENCHMARKS.md from the recorded `convoy bench`, `convoy load-test`
and `convoy sim` results.

Each directory under benchmarks/ that holds a results.json (as
`convoy bench --out DIR` writes it) is one measurement: the generated
file gives each, newest first, with the commit the binary was built from,
the date, the command and the machine, then every run and, for repeated
runs, the median and range. benchmarks/history.md (figures recorded by
hand before the bench wrote its own results) follows as it is.

    scripts/benchmarks.py          # writes BENCHMARKS.md
    scripts/benchmarks.py --check  # exits 1 if BENCHMARKS.md is not what it would write
"""

import datetime
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks"
OUT = ROOT / "BENCHMARKS.md"


def size(n):
    if n is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def secs(x):
    # JSON has no infinity: a run with a target that never finished has null.
    return "∞" if x is None or (isinstance(x, float) and math.isinf(x)) else f"{x:.2f}"


def ratio(x):
    return "-" if x is None else f"{x:.2f}"


def run_table(runs):
    lines = [
        "| mode | update | nodes | bytes/target | p50 s | p99 s | p99/bound | origin egress | total moved | per target vs changed / new chunks | fleet CPU s | verified |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        q = r["completion_seconds"]
        against = "-"
        if r.get("changed_bytes") and r.get("new_chunk_bytes"):
            per = r["total_bytes"] / max(r["nodes"], 1)
            against = f"{per / r['changed_bytes']:.3f} / {per / r['new_chunk_bytes']:.3f}"
        update = "no"
        if r["update"]:
            update = "yes" if r.get("delta_bytes") is None else f"yes, deltas {size(r['delta_bytes'])}"
        lines.append(
            f"| {r['mode']} | {update} | {r['nodes']} | {size(r['package_bytes'])} "
            f"| {secs(q['p50'])} | {secs(q['p99'])} | {ratio(r.get('ratio_to_bound'))} "
            f"| {size(r['origin_egress_bytes'])} | {size(r['total_bytes'])} | {against} "
            f"| {r['cpu_seconds']:.1f} | {r['verified_nodes']}/{r['nodes']} |"
        )
    return lines


def summary_table(summary):
    def spread(s, fmt):
        return f"{fmt(s['median'])} [{fmt(s['min'])}, {fmt(s['max'])}]"

    lines = [
        "| mode | update | runs | p50 s | p99 s | p99/bound | origin egress | fleet CPU s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in summary:
        bound = m["ratio_to_bound"]
        lines.append(
            f"| {m['mode']} | {'yes' if m['update'] else 'no'} | {m['runs']} "
            f"| {spread(m['p50_seconds'], secs)} | {spread(m['p99_seconds'], secs)} "
            f"| {'-' if bound['median'] is None else spread(bound, ratio)} "
            f"| {spread(m['origin_egress_bytes'], size)} | {spread(m['cpu_seconds'], lambda x: f'{x:.1f}')} |"
        )
    return lines


def load_table(rows):
    def worst(xs):
        return "∞" if any(x is None for x in xs) else f"{max(xs):.2f}"

    lines = [
        "| targets | registered s | heartbeat ms | reports/s | coordinator CPU % (workers %) | RSS | staging orders s | peer lists s | all staged s | staging CPU-s (workers) | wave orders s (targets) | roll-out | convoy fleet s | GET /v1/fleet s | failed reports | back after a restart s (CPU-s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        restart = "-"
        if "restart_s" in r:
            restart = f"{secs(r['restart_s'])} ({r['restart_cpu_s']:.1f})"
        waves = ", ".join(
            f"{secs(w)} ({n})" for w, n in zip(r["wave_orders_s"], r["wave_targets"])
        )
        lines.append(
            f"| {r['targets']} | {r['register_s']:.1f} | {r['heartbeat_ms']} | {r['reports_per_s']:.0f} "
            f"| {r['heartbeat_cpu_pct']:.1f} ({r['workers_cpu_pct']:.0f}) | {size(r['rss_bytes'])} "
            f"| {secs(r['stage_orders_s'])} | {secs(r['peer_lists_s'])} | {r['staged_s']:.1f} "
            f"| {r['staging_cpu_s']:.1f} ({r['workers_staging_cpu_s']:.1f}) | {waves} "
            f"| {r['rollout_outcome']} in {r['rollout_s']:.1f} s | {worst(r['fleet_cli_s'])} "
            f"| {worst(r['fleet_api_s'])} | {r['report_failures']} "
            f"| {restart} |"
        )
    return lines


def sim_table(rows):
    lines = [
        "| mode | targets | p50 s | p99 s | max s | bound s | p99/bound | origin egress | total moved | cross-dc | completed | origin busy answers | events | CPU s | peak RSS |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['targets']} | {secs(r['p50_seconds'])} | {secs(r['p99_seconds'])} "
            f"| {secs(r['max_seconds'])} | {r['bound_seconds']:.2f} | {ratio(r['p99_over_bound'])} "
            f"| {size(r['origin_egress_bytes'])} | {size(r['total_bytes'])} | {size(r['cross_dc_bytes'])} "
            f"| {r['completed']}/{r['targets']} | {r.get('origin_busy_answers', '-')} | {r['events']} | {r['cpu_seconds']:.1f} | {size(r['peak_rss_bytes'])} |"
        )
    if any(len(r["cross_dc_bytes_into"]) > 1 for r in rows):
        lines += ["", "Cross-dc bytes into each data centre (dc0 holds the origin):", ""]
        for r in rows:
            into = ", ".join(f"dc{i} {size(b)}" for i, b in enumerate(r["cross_dc_bytes_into"]))
            lines.append(f"- {r['mode']}: {into}")
    return lines


def measurement(path):
    data = json.loads(path.read_text())
    meta = data.get("meta")
    if meta is None:
        sys.exit(f"{path}: no meta (written by a convoy bench older than the commit stamp)")
    when = datetime.datetime.fromtimestamp(meta["unix_time"], datetime.timezone.utc)
    lines = [
        f"## {path.parent.name}",
        "",
        f"At **{meta['commit']}**, {when:%Y-%m-%d %H:%M} UTC, on {meta['cores']} cores ({meta['cpu'] or 'CPU unknown'}):",
        "",
        "```sh",
        meta["command"],
        "```",
        "",
    ]
    if "sim" in data:
        # `convoy sim`: the daemon's distribution logic in virtual time, one process.
        lines += [
            "Simulated (`convoy sim`): no processes, sockets or disks; CPU and peak RSS of the one simulating process.",
            "",
            *sim_table(data["sim"]),
        ]
        return meta["unix_time"], lines
    if "rows" in data:
        # `convoy load-test`: one coordinator under simulated targets.
        lines += [
            f"One coordinator; the targets simulated by {data['workers']} `convoy load-worker` processes on the same machine, in {data['dcs']} data centres; steady heartbeats measured over {data['window_s']} s; waves {data['waves']}. Fleet listings: the slowest of three.",
            "",
            *load_table(data["rows"]),
        ]
        return meta["unix_time"], lines
    lines += run_table(data["runs"])
    if any(m["runs"] > 1 for m in data["summary"]):
        lines += ["", "Median [min, max] over the runs:", "", *summary_table(data["summary"])]
    idle = data.get("idle_rss")
    if idle:
        lines += [
            "",
            f"Idle RSS: origin {size(idle['origin_bytes'])}, largest target {size(idle['target_max_bytes'])}.",
        ]
    return meta["unix_time"], lines


def render():
    found = [measurement(p) for p in sorted(RESULTS.glob("*/results.json"))]
    found.sort(key=lambda m: m[0], reverse=True)
    out = [
        "# Convoy benchmarks",
        "",
        "Generated by `scripts/benchmarks.py` from the `convoy bench` and `convoy load-test` results under",
        "`benchmarks/` (each directory one `--out DIR`); do not edit by",
        "hand. Record a measurement by running the bench with `--out",
        "benchmarks/NAME` from a release build of a clean checkout (its commit is",
        "stamped into the binary, `-dirty` if the tree differed) and running the",
        "script. The README quotes the current headline figures.",
        "",
    ]
    for _, lines in found:
        out += lines + [""]
    history = RESULTS / "history.md"
    if history.exists():
        out += [history.read_text().rstrip("\n"), ""]
    return "\n".join(out)


def main():
    text = render()
    if sys.argv[1:] == ["--check"]:
        if not OUT.exists() or OUT.read_text() != text:
            sys.exit("BENCHMARKS.md is not up to date: run scripts/benchmarks.py")
        return
    if sys.argv[1:]:
        sys.exit(__doc__)
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)} from {len(list(RESULTS.glob('*/results.json')))} results")


if __name__ == "__main__":
    main()
