// SPDX-License-Identifier: GPL-2.0-or-later
//! The report's figures (SVG and PNG): slowdown over `native` against vCPUs
//! per workload (krr and whole-VM RR, log scale, like the paper's figure),
//! and each workload's own metric against vCPUs per scheme.

use super::summary::{median, Summary};
use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Debian's `fonts-dejavu-core` (installed by `cargo xtask setup`); the
/// figures' text is drawn with it (plotters' `ab_glyph` backend).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

pub(crate) fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let bytes = std::fs::read(FONT).map_err(|e| {
                format!("{FONT}: {e} (install the Debian package fonts-dejavu-core)")
            })?;
            // plotters keeps the font for the process's lifetime.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{FONT}: not a font plotters can read"))
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

const SIZE_PER_PANEL: (u32, u32) = (480, 360);

fn colour(scheme: &str) -> RGBColor {
    match scheme {
        "native" => RGBColor(60, 60, 60),
        "krr" => RGBColor(214, 39, 40),
        "whole-vm-rr" => RGBColor(31, 119, 180),
        "qemu-tcg" => RGBColor(44, 160, 44),
        _ => RGBColor(148, 103, 189),
    }
}

/// One panel's series: scheme name and (vCPUs, value) points.
type Series = Vec<(String, Vec<(f64, f64)>)>;

/// Writes `slowdown` (when there are `native` runs) and `throughput`
/// figures (`.svg` and `.png`) into `dir`; returns the files written.
pub fn write(dir: &Path, summary: &Summary, krr_target: Option<f64>) -> Result<Vec<PathBuf>> {
    register_font()?;
    let workloads = summary.workloads();
    if workloads.is_empty() {
        bail!("no cell succeeded: nothing to plot");
    }
    let mut written = Vec::new();
    let slowdown: Vec<(String, Series)> = workloads
        .iter()
        .map(|w| {
            let series = ["krr", "whole-vm-rr"]
                .iter()
                .map(|&scheme| {
                    let points = summary
                        .vcpus_of(w)
                        .into_iter()
                        .filter_map(|v| Some((v as f64, summary.ratio(w, v, scheme, "native")?)))
                        .collect();
                    (scheme.to_string(), points)
                })
                .collect();
            (w.clone(), series)
        })
        .collect();
    let throughput: Vec<(String, Series)> = workloads
        .iter()
        .map(|w| {
            let metric = summary
                .groups
                .values()
                .filter(|g| &g.workload == w)
                .find_map(|g| g.metrics.keys().next().cloned());
            let series = ["native", "krr", "whole-vm-rr", "qemu-tcg"]
                .iter()
                .map(|&scheme| {
                    let points = summary
                        .vcpus_of(w)
                        .into_iter()
                        .filter_map(|v| {
                            let g = summary.get(w, v, scheme)?;
                            let m = metric.as_ref()?;
                            Some((v as f64, median(g.metrics.get(m)?)?))
                        })
                        .collect();
                    (scheme.to_string(), points)
                })
                .collect();
            (format!("{w}: {}", metric.unwrap_or_default()), series)
        })
        .collect();
    // Without `native` runs there is no slowdown to draw (an empty figure
    // would say nothing).
    let has_slowdown = slowdown
        .iter()
        .any(|(_, series)| series.iter().any(|(_, points)| !points.is_empty()));
    for ext in ["svg", "png"] {
        if has_slowdown {
            let path = dir.join(format!("slowdown.{ext}"));
            draw(
                &path,
                &slowdown,
                "wall time / native (log)",
                true,
                krr_target,
            )?;
            written.push(path);
        }
        let path = dir.join(format!("throughput.{ext}"));
        draw(
            &path,
            &throughput,
            "metric, guest clock (median)",
            false,
            None,
        )?;
        written.push(path);
    }
    Ok(written)
}

fn draw(
    path: &Path,
    panels: &[(String, Series)],
    y_label: &str,
    log: bool,
    target: Option<f64>,
) -> Result<()> {
    let cols = panels.len().min(3) as u32;
    let rows = panels.len().div_ceil(3) as u32;
    let size = (SIZE_PER_PANEL.0 * cols, SIZE_PER_PANEL.1 * rows);
    let result = if path.extension().is_some_and(|e| e == "svg") {
        let root = SVGBackend::new(path, size).into_drawing_area();
        draw_panels(&root, panels, y_label, log, target, rows, cols)
    } else {
        let root = BitMapBackend::new(path, size).into_drawing_area();
        draw_panels(&root, panels, y_label, log, target, rows, cols)
    };
    result.with_context(|| format!("drawing {}", path.display()))
}

/// Ratios to label on a log axis from `lo` to `hi`: 1 and the usual steps
/// around it that fall in the range.
pub(crate) fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    const STEPS: [f64; 22] = [
        0.05, 0.1, 0.2, 0.25, 0.33, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.4, 1.6, 2.0, 3.0,
        5.0, 10.0, 20.0, 50.0, 100.0,
    ];
    let inside: Vec<f64> = STEPS
        .into_iter()
        .filter(|t| (lo..=hi).contains(t))
        .collect();
    // At most about a dozen labels: every other step on a wide range.
    let keep = inside.len().div_ceil(12).max(1);
    inside
        .iter()
        .enumerate()
        .filter(|(i, t)| i % keep == 0 || **t == 1.0)
        .map(|(_, t)| *t)
        .collect()
}

fn draw_panels<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    panels: &[(String, Series)],
    y_label: &str,
    log: bool,
    target: Option<f64>,
    rows: u32,
    cols: u32,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("{e:?}");
    root.fill(&WHITE).map_err(err)?;
    let areas = root.split_evenly((rows as usize, cols as usize));
    for ((title, series), area) in panels.iter().zip(areas) {
        let points: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.clone()).collect();
        let x_max = points.iter().map(|p| p.0).fold(1.0, f64::max);
        let mut y: Vec<f64> = points.iter().map(|p| p.1).collect();
        y.extend(target);
        let (y_min, y_max) = match (
            y.iter().copied().reduce(f64::min),
            y.iter().copied().reduce(f64::max),
        ) {
            (Some(a), Some(b)) => (a, b),
            _ => (1.0, 2.0),
        };
        // Room on the right for the legend.
        let x_range = 0.5..x_max + 1.5;
        let mut chart = ChartBuilder::on(&area);
        chart
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64);
        if log {
            let range = (y_min.min(1.0) * 0.8)..(y_max * 1.25);
            // Labelled ratios on both sides of 1 (plotters' own log key
            // points left everything below 1 unlabelled).
            let ticks = log_ticks(range.start, range.end);
            let mut c = chart
                .build_cartesian_2d(x_range, range.log_scale().base(2.0).with_key_points(ticks))
                .map_err(err)?;
            c.configure_mesh()
                .x_desc("vCPUs")
                .y_desc(y_label)
                .x_labels(x_max as usize + 2)
                .x_label_formatter(&|x| vcpu_label(*x, x_max))
                .y_labels(12)
                .y_label_formatter(&|y| format!("{y:.2}"))
                .draw()
                .map_err(err)?;
            plot_series(&mut c, series, target, x_max).map_err(err)?;
        } else {
            let range = 0.0..(y_max * 1.15).max(1.0);
            let mut c = chart.build_cartesian_2d(x_range, range).map_err(err)?;
            c.configure_mesh()
                .x_desc("vCPUs")
                .y_desc(y_label)
                .x_labels(x_max as usize + 2)
                .x_label_formatter(&|x| vcpu_label(*x, x_max))
                .y_labels(8)
                .y_label_formatter(&|y| compact(*y))
                .draw()
                .map_err(err)?;
            plot_series(&mut c, series, None, x_max).map_err(err)?;
        }
    }
    root.present().map_err(err)?;
    Ok(())
}

/// A vCPU count on the x axis; the room right of the last one, where the
/// legend goes, has no labels.
fn vcpu_label(x: f64, x_max: f64) -> String {
    if x.fract().abs() < 1e-9 && x <= x_max {
        format!("{x:.0}")
    } else {
        String::new()
    }
}

/// 1.5k, 2.3M: axis labels that fit beside the axis, with a decimal only
/// where it is needed (1.2k and 1k are different ticks).
fn compact(v: f64) -> String {
    let (scaled, unit) = match v.abs() {
        a if a >= 1e9 => (v / 1e9, "G"),
        a if a >= 1e6 => (v / 1e6, "M"),
        a if a >= 1e3 => (v / 1e3, "k"),
        _ => return format!("{v:.1}"),
    };
    if (scaled - scaled.round()).abs() < 0.05 {
        format!("{scaled:.0}{unit}")
    } else {
        format!("{scaled:.1}{unit}")
    }
}

fn plot_series<'a, DB: DrawingBackend + 'a, CT>(
    chart: &mut ChartContext<'a, DB, CT>,
    series: &Series,
    target: Option<f64>,
    x_max: f64,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>>
where
    CT: plotters::coord::CoordTranslate<From = (f64, f64)>,
{
    for (scheme, points) in series {
        if points.is_empty() {
            continue;
        }
        let c = colour(scheme);
        chart
            .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))?
            .label(scheme.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, c.filled())))?;
    }
    if let Some(t) = target {
        let grey = RGBColor(120, 120, 120);
        chart
            .draw_series(LineSeries::new(
                vec![(0.5, t), (x_max + 1.5, t)],
                grey.stroke_width(1),
            ))?
            .label(format!("krr target {t}x"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], grey));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 13))
        .draw()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_axes_label_ratios_below_and_above_one() {
        let t = log_ticks(0.6, 1.7);
        assert!(
            t.contains(&0.7) && t.contains(&1.0) && t.contains(&1.6),
            "{t:?}"
        );
        assert!(log_ticks(0.05, 25.0).len() <= 13);
        assert!(log_ticks(0.05, 25.0).contains(&1.0));
    }
    use crate::eval::journal::{CellRecord, Status};

    #[test]
    fn compact_labels_keep_ticks_apart() {
        assert_eq!(compact(1000.0), "1k");
        assert_eq!(compact(1200.0), "1.2k");
        assert_eq!(compact(25_000.0), "25k");
        assert_eq!(compact(2_300_000.0), "2.3M");
        assert_eq!(compact(800.0), "800.0");
    }

    #[test]
    fn figures_are_written_for_every_workload() {
        if !Path::new(FONT).exists() {
            panic!("{FONT} is missing: `cargo xtask setup` installs fonts-dejavu-core");
        }
        let mut cells = Vec::new();
        for (scheme, wall) in [("native", 10.0), ("krr", 12.0), ("whole-vm-rr", 30.0)] {
            for vcpus in [1, 2] {
                cells.push(CellRecord {
                    key: format!("{scheme}{vcpus}"),
                    workload: "w".into(),
                    scheme: scheme.into(),
                    vcpus,
                    status: Some(Status::Ok),
                    wall_seconds: Some(wall * vcpus as f64),
                    metrics: [("ops".to_string(), 100.0 / wall)].into(),
                    ..CellRecord::default()
                });
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let files = write(dir.path(), &Summary::of(&cells), Some(1.05)).unwrap();
        assert_eq!(files.len(), 4);
        for f in files {
            let len = std::fs::metadata(&f).unwrap().len();
            assert!(len > 1000, "{} is {len} bytes", f.display());
        }
        let svg = std::fs::read_to_string(dir.path().join("slowdown.svg")).unwrap();
        assert!(svg.contains("whole-vm-rr") && svg.contains("krr target 1.05x"));

        // Without native runs: the throughput figures only.
        cells.retain(|c| c.scheme != "native");
        let dir = tempfile::tempdir().unwrap();
        let files = write(dir.path(), &Summary::of(&cells), Some(1.05)).unwrap();
        let names: Vec<_> = files.iter().map(|f| f.file_name().unwrap()).collect();
        assert_eq!(names, ["throughput.svg", "throughput.png"]);
    }
}
