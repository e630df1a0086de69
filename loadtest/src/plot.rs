//! SVG plots of a (merged) report: latency over time, the latency
//! distribution, connections over time. Files are named after the
//! scenario, e.g. `channel-latency-cdf.svg`.
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use plotters::prelude::*;

use crate::report::{Hist, Report};

const SIZE: (u32, u32) = (960, 540);
const FONT: (&str, u32) = ("sans-serif", 22);
const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// Writes every plot the report has data for into `dir`; returns their paths.
pub(crate) fn write(report: &Report, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = |what: &str| dir.join(format!("{}-{what}.svg", report.scenario));
    let mut written = Vec::new();
    let timeline = report.timeline();
    let start = timeline.first().map_or(0, |(t, _, _)| *t);
    // A second's latency is drawn at its middle.
    let latency: Vec<(f64, f64, f64)> = timeline
        .iter()
        .filter(|(_, h, _)| h.len() > 0)
        .map(|(t, h, _)| {
            let x = (t - start) as f64 + 0.5;
            (x, h.quantile_ms(0.5), h.quantile_ms(0.99))
        })
        .collect();
    if !latency.is_empty() {
        let path = name("latency-over-time");
        latency_over_time(&path, &report.scenario, &latency).map_err(|e| anyhow!("{e}"))?;
        written.push(path);
    }
    let mut curves: Vec<(String, Hist)> = report
        .kinds
        .iter()
        .filter(|(_, d)| d.latency.len() > 0)
        .map(|(k, d)| (k.clone(), d.latency.clone()))
        .collect();
    if curves.len() > 1 {
        curves.insert(0, ("all".into(), report.total().latency));
    }
    if !curves.is_empty() {
        let path = name("latency-cdf");
        latency_cdf(&path, &report.scenario, &curves).map_err(|e| anyhow!("{e}"))?;
        written.push(path);
    }
    // Sockets established so far, at the end of each second, from 0.
    let sockets: Vec<(f64, f64)> = std::iter::once((0.0, 0.0))
        .chain(
            timeline
                .iter()
                .map(|(t, _, n)| ((t - start + 1) as f64, *n as f64)),
        )
        .collect();
    if sockets.iter().any(|(_, n)| *n > 0.0) {
        let path = name("connections");
        connections(&path, &report.scenario, &sockets).map_err(|e| anyhow!("{e}"))?;
        written.push(path);
    }
    Ok(written)
}

type Drawn = Result<(), Box<dyn std::error::Error>>;

/// "0.25", "2.5", "25": as few digits as the size needs.
fn short(ms: f64) -> String {
    match ms {
        m if m >= 10.0 => format!("{m:.0}"),
        m if m >= 1.0 => format!("{m:.1}"),
        m => format!("{m:.2}"),
    }
}

/// p50 and p99 of each second's deliveries.
fn latency_over_time(path: &Path, scenario: &str, points: &[(f64, f64, f64)]) -> Drawn {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let x_max = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let y_max = points.iter().map(|p| p.2).fold(0.001, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{scenario}: latency per second"), FONT)
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds since start")
        .y_desc("latency, ms")
        .draw()?;
    for (i, (label, pick)) in [
        (
            "p50",
            (|p: &(f64, f64, f64)| p.1) as fn(&(f64, f64, f64)) -> f64,
        ),
        ("p99", |p| p.2),
    ]
    .into_iter()
    .enumerate()
    {
        let color = COLORS[i];
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|p| (p.0, pick(p))),
                color.stroke_width(2),
            ))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Fraction of deliveries at or below each latency, log-scale latency.
fn latency_cdf(path: &Path, scenario: &str, curves: &[(String, Hist)]) -> Drawn {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let cdfs: Vec<(&str, Vec<(f64, f64)>)> =
        curves.iter().map(|(k, h)| (k.as_str(), h.cdf())).collect();
    let lo = cdfs
        .iter()
        .filter_map(|(_, c)| c.first().map(|p| p.0))
        .fold(f64::MAX, f64::min)
        .max(0.001);
    let hi = cdfs
        .iter()
        .filter_map(|(_, c)| c.last().map(|p| p.0))
        .fold(lo, f64::max)
        * 1.5;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{scenario}: latency distribution"), FONT)
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_label_formatter(&|ms| short(*ms))
        .x_desc("latency, ms (log scale)")
        .y_desc("fraction of deliveries at or below")
        .draw()?;
    for (i, (label, cdf)) in cdfs.into_iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        // A step at each bucket, starting from 0 at the first value.
        let mut steps = vec![(cdf[0].0, 0.0)];
        let mut prev = 0.0;
        for (ms, f) in cdf {
            steps.push((ms, prev));
            steps.push((ms, f));
            prev = f;
        }
        chart
            .draw_series(LineSeries::new(steps, color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Sockets established so far.
fn connections(path: &Path, scenario: &str, points: &[(f64, f64)]) -> Drawn {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let x_max = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let y_max = points.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{scenario}: sockets established"), FONT)
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(84)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds since start")
        .y_desc("sockets established so far")
        .draw()?;
    chart.draw_series(LineSeries::new(
        points.iter().copied(),
        COLORS[0].stroke_width(2),
    ))?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Deliveries, Second};

    #[test]
    fn writes_the_three_plots_for_a_report_with_data() {
        let mut r = Report {
            scenario: "demo".into(),
            ..Default::default()
        };
        for (t, n) in [(100u64, 5u64), (101, 0), (102, 7)] {
            let mut s = Second::default();
            for v in 1..=n {
                s.latency.record(v * 1500);
            }
            s.established = n;
            r.series.insert(t, s);
        }
        for kind in ["dm", "group"] {
            let mut d = Deliveries::default();
            for v in [800, 1200, 50_000] {
                d.latency.record(v);
            }
            r.kinds.insert(kind.into(), d);
        }
        let dir = std::env::temp_dir().join(format!("sb-plot-test-{}", std::process::id()));
        let paths = write(&r, &dir).unwrap();
        let names: Vec<String> = paths
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "demo-latency-over-time.svg",
                "demo-latency-cdf.svg",
                "demo-connections.svg"
            ]
        );
        for p in &paths {
            let svg = std::fs::read_to_string(p).unwrap();
            assert!(svg.starts_with("<svg"), "{}", p.display());
            assert!(svg.contains("<polyline"), "a line in {}", p.display());
        }
        let cdf = std::fs::read_to_string(&paths[1]).unwrap();
        for label in ["all", "dm", "group"] {
            assert!(
                cdf.contains(&format!(">\n{label}\n</text>")),
                "legend {label}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_report_without_latency_gets_only_the_connections_plot() {
        let mut r = Report {
            scenario: "idle".into(),
            ..Default::default()
        };
        r.series.insert(
            7,
            Second {
                established: 3,
                ..Default::default()
            },
        );
        let dir = std::env::temp_dir().join(format!("sb-plot-idle-{}", std::process::id()));
        let paths = write(&r, &dir).unwrap();
        assert_eq!(paths.len(), 1);
        assert!(paths[0].ends_with("idle-connections.svg"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
