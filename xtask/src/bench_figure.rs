// SPDX-License-Identifier: GPL-2.0-or-later
//! The benchmarks' figure: one horizontal bar per measured ratio, with its
//! target (where it has one) drawn across the bar, so a bar that crosses
//! its mark misses it.

use crate::eval::figures::{log_ticks, register_font};
use anyhow::{Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// One measured ratio and the most it may be.
pub struct Bar {
    pub label: String,
    pub value: f64,
    pub target: Option<f64>,
}

impl Bar {
    pub fn new(label: impl Into<String>, value: f64, target: Option<f64>) -> Bar {
        Bar {
            label: label.into(),
            value,
            target,
        }
    }

    fn met(&self) -> Option<bool> {
        self.target.map(|t| self.value <= t)
    }
}

const MET: RGBColor = RGBColor(44, 160, 44);
const MISSED: RGBColor = RGBColor(214, 39, 40);
const NO_TARGET: RGBColor = RGBColor(120, 120, 120);
const ROW_PX: u32 = 34;

/// Draws `bars` into `stem.png` and `stem.svg`; returns the files written.
/// Bars that are not finite numbers are left out.
pub fn write(stem: &Path, title: &str, bars: &[Bar]) -> Result<Vec<PathBuf>> {
    register_font()?;
    let bars: Vec<&Bar> = bars.iter().filter(|b| b.value.is_finite()).collect();
    let size = (960, 90 + ROW_PX * bars.len().max(1) as u32);
    let mut written = Vec::new();
    for ext in ["png", "svg"] {
        let path = stem.with_extension(ext);
        let drawn = if ext == "svg" {
            draw(
                &SVGBackend::new(&path, size).into_drawing_area(),
                title,
                &bars,
            )
        } else {
            draw(
                &BitMapBackend::new(&path, size).into_drawing_area(),
                title,
                &bars,
            )
        };
        drawn.with_context(|| format!("drawing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, title: &str, bars: &[&Bar]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let values = || {
        bars.iter()
            .flat_map(|b| [Some(b.value), b.target])
            .flatten()
            .filter(|v| *v > 0.0)
    };
    // Ratios on a log axis, as the eval's figures: a log 50x its target
    // stays beside ratios near 1 without flattening them.
    let lo = values().fold(1.0f64, f64::min) * 0.8;
    let hi = values().fold(1.0f64, f64::max) * 1.25;
    let n = bars.len().max(1);
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(330)
        .build_cartesian_2d(
            (lo..hi).log_scale().with_key_points(log_ticks(lo, hi)),
            0f64..n as f64,
        )?;
    let label_of = |y: &f64| {
        // Row i (from the top) spans [n-1-i, n-i); its label sits at the middle.
        let i = n as f64 - 0.5 - y;
        let r = i.round();
        if (i - r).abs() < 0.01 && r >= 0.0 && (r as usize) < bars.len() {
            bars[r as usize].label.clone()
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(2 * n + 1)
        .y_label_formatter(&label_of)
        .x_label_formatter(&|v: &f64| format!("{v}"))
        .x_desc("ratio, log scale (bar: measured; black mark: target, at most)")
        .label_style(("sans-serif", 14))
        .draw()?;
    for (i, bar) in bars.iter().enumerate() {
        let top = (n - i) as f64 - 0.15;
        let bottom = (n - 1 - i) as f64 + 0.15;
        let colour = match bar.met() {
            Some(true) => MET,
            Some(false) => MISSED,
            None => NO_TARGET,
        };
        chart.draw_series(std::iter::once(Rectangle::new(
            [(lo, bottom), (bar.value.max(lo), top)],
            colour.filled(),
        )))?;
        chart.draw_series(std::iter::once(Text::new(
            format!("{:.2}", bar.value),
            (bar.value.max(lo) * 1.01, (bottom + top) / 2.0 + 0.2),
            ("sans-serif", 14).into_font(),
        )))?;
        if let Some(t) = bar.target {
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(t, bottom - 0.1), (t, top + 0.1)],
                BLACK.stroke_width(3),
            )))?;
        }
    }
    root.present()?;
    Ok(())
}
