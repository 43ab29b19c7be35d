//! Completion-time distributions as SVG: the share of targets done
//! against time, one line per run (`convoy bench`, `convoy sim`).

use std::path::Path;

use anyhow::{anyhow, Result};

/// Points drawn per line at most: a line of 100,000 targets is drawn
/// through evenly spaced quantiles, not every step.
const MAX_STEPS: usize = 2000;

/// One line: its label and each target's completion time in seconds,
/// ascending, infinite for a target that never finished.
pub struct Line {
    pub label: String,
    pub seconds: Vec<f64>,
}

/// The staircase of `seconds` (ascending), at most [`MAX_STEPS`] steps;
/// a target that did not finish keeps the line below the top.
fn steps(seconds: &[f64]) -> Vec<(f64, f64)> {
    let n = seconds.len().max(1) as f64;
    let stride = seconds.len().div_ceil(MAX_STEPS).max(1);
    let mut points = vec![(0.0, 0.0)];
    let mut k = 0;
    while k < seconds.len() {
        let last = (k + stride).min(seconds.len()) - 1;
        let t = seconds[last];
        if !t.is_finite() {
            // The share done is that of the last finite time before it.
            let done = seconds[..=last].iter().filter(|s| s.is_finite()).count();
            if let Some(&(x, _)) = points.last() {
                points.push((x, done as f64 / n));
            }
            break;
        }
        points.push((t, k as f64 / n));
        points.push((t, (last + 1) as f64 / n));
        k = last + 1;
    }
    points
}

/// Writes a measurement to `dir` as `--out` promises: results.json
/// (`data`), results.md (`table`) and completion.svg (`lines`).
pub fn write_results(
    dir: &Path,
    data: &serde_json::Value,
    table: &str,
    title: &str,
    lines: &[Line],
) -> Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))
    };
    write("results.json", &serde_json::to_vec_pretty(data)?)?;
    write("results.md", table.as_bytes())?;
    completion_svg(&dir.join("completion.svg"), title, lines)?;
    eprintln!(
        "wrote results.json, results.md and completion.svg to {}",
        dir.display()
    );
    Ok(())
}

/// Writes `lines` to `path`. The time axis is logarithmic when the
/// slowest line ends over 100 times later than the fastest starts, as
/// a swarm against push of 100,000 targets does.
pub fn completion_svg(path: &Path, title: &str, lines: &[Line]) -> Result<()> {
    use plotters::prelude::*;
    let finite = || {
        lines
            .iter()
            .flat_map(|l| &l.seconds)
            .copied()
            .filter(|t| t.is_finite() && *t > 0.0)
    };
    let max_t = finite().fold(0.0f64, f64::max).max(0.001) * 1.05;
    let min_t = finite().fold(f64::INFINITY, f64::min).min(max_t);
    let fail = |e: &dyn std::fmt::Display| anyhow!("{}: {e}", path.display());
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50);
    let x_desc = "seconds since the staging started";
    let y_desc = "share of targets staged";
    if max_t / min_t > 100.0 {
        let mut chart = builder
            .build_cartesian_2d((min_t * 0.9..max_t).log_scale(), 0.0..1.0)
            .map_err(|e| fail(&e))?;
        chart
            .configure_mesh()
            .x_desc(format!("{x_desc} (log scale)"))
            .y_desc(y_desc)
            .draw()
            .map_err(|e| fail(&e))?;
        draw(&mut chart, lines, min_t * 0.9).map_err(|e| fail(&e))?;
    } else {
        let mut chart = builder
            .build_cartesian_2d(0.0..max_t, 0.0..1.0)
            .map_err(|e| fail(&e))?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .draw()
            .map_err(|e| fail(&e))?;
        draw(&mut chart, lines, 0.0).map_err(|e| fail(&e))?;
    }
    root.present().map_err(|e| fail(&e))?;
    Ok(())
}

fn draw<'a, X>(
    chart: &mut plotters::chart::ChartContext<
        'a,
        plotters::prelude::SVGBackend<'a>,
        plotters::coord::cartesian::Cartesian2d<X, plotters::coord::types::RangedCoordf64>,
    >,
    lines: &[Line],
    origin: f64,
) -> Result<(), Box<dyn std::error::Error + 'a>>
where
    X: plotters::coord::ranged1d::Ranged<ValueType = f64>,
{
    use plotters::prelude::*;
    for (i, line) in lines.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let mut points = steps(&line.seconds);
        points[0].0 = origin;
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(line.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_reach_the_top_only_when_every_target_finished() {
        let done: Vec<f64> = (1..=10).map(f64::from).collect();
        let s = steps(&done);
        assert_eq!(s.last(), Some(&(10.0, 1.0)));
        let mut some = done.clone();
        some[7..].fill(f64::INFINITY);
        let s = steps(&some);
        assert_eq!(s.last(), Some(&(7.0, 0.7)));
    }

    #[test]
    fn a_large_fleet_is_drawn_through_a_bounded_number_of_steps() {
        let done: Vec<f64> = (1..=100_000).map(f64::from).collect();
        let s = steps(&done);
        assert!(s.len() <= 2 * MAX_STEPS + 1, "{}", s.len());
        assert_eq!(s.last(), Some(&(100_000.0, 1.0)));
        // Monotone in both coordinates.
        assert!(s.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
    }

    #[test]
    fn writes_an_svg_with_a_line_per_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.svg");
        let lines = [
            Line {
                label: "swarm".into(),
                seconds: vec![1.0, 2.0],
            },
            Line {
                label: "push".into(),
                seconds: vec![500.0, 1000.0],
            },
        ];
        completion_svg(&path, "t", &lines).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..40.min(svg.len())]);
        assert!(svg.contains("swarm") && svg.contains("push") && svg.contains("log scale"));
    }
}
