//! SVG charts for `gmm bench report`, drawn with `plotters`.
//!
//! Two shapes cover every plot of the report:
//!
//! - [`lines`]: one line with markers per strategy over a numeric x axis
//!   (guest size), optionally logarithmic on either axis;
//! - [`grouped_bars`]: categories on the x axis (a PFN pattern, a lock-hold
//!   bucket), one bar per series in each category.
//!
//! Each chart has a title, axis descriptions with units and a legend. The
//! SVG is rendered into a string and written in one go, so a failed write
//! names the file and never leaves half a chart behind a success.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use plotters::chart::MeshStyle;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Chart size in pixels.
const SIZE: (u32, u32) = (1100, 600);
/// Font family of every text.
const FONT: &str = "sans-serif";

/// One named series of a chart.
#[derive(Debug, Clone)]
pub(crate) struct Series {
    /// Legend text.
    pub name: String,
    /// Line, marker and bar colour.
    pub color: RGBColor,
    /// Points `(x, y)` of a line chart, or `(category index, value)` of a
    /// bar chart. Points whose `y` is not finite (or not positive on a
    /// logarithmic axis) are left out.
    pub points: Vec<(f64, f64)>,
}

/// Axis scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scale {
    /// Evenly spaced values.
    Linear,
    /// Evenly spaced powers of ten (positive values only).
    Log,
}

/// What a line chart shows.
pub(crate) struct LineChart<'a> {
    /// Title above the chart.
    pub title: &'a str,
    /// X axis description, with its unit.
    pub x_desc: &'a str,
    /// Y axis description, with its unit.
    pub y_desc: &'a str,
    /// X axis scale.
    pub x_scale: Scale,
    /// Y axis scale.
    pub y_scale: Scale,
    /// On a log x axis, the x values to put ticks at (the measured sizes);
    /// labels come from `x_label`.
    pub x_ticks: Vec<f64>,
    /// X tick label of a value.
    pub x_label: &'a dyn Fn(f64) -> String,
    /// The lines, each with its own marker shape.
    pub series: Vec<Series>,
}

/// What a grouped bar chart shows.
pub(crate) struct BarChart<'a> {
    /// Title above the chart.
    pub title: &'a str,
    /// X axis description.
    pub x_desc: &'a str,
    /// Y axis description, with its unit (the axis starts at 0).
    pub y_desc: &'a str,
    /// Category labels, in x order.
    pub categories: Vec<String>,
    /// Each series has at most one value per category index.
    pub series: Vec<Series>,
    /// Print each bar's value above it with this formatter.
    pub bar_label: Option<&'a dyn Fn(f64) -> String>,
    /// The series cover different categories: each bar takes the whole
    /// slot instead of a share of it.
    pub shared_slot: bool,
    /// Y axis scale; a log axis starts at 0.5 (counts of at least one).
    pub y_scale: Scale,
    /// A vertical line at this x (category units), with its label.
    pub x_marker: Option<(f64, &'a str)>,
}

/// Colours, fixed per strategy across charts.
pub(crate) mod colors {
    use plotters::style::RGBColor;
    /// guest-mm's own path (gather, device inflate, reclaim thread).
    pub const OURS: RGBColor = RGBColor(31, 119, 180);
    /// The single-call limit (one madvise, munmap).
    pub const LIMIT: RGBColor = RGBColor(60, 60, 60);
    /// One call per page.
    pub const PER_PAGE: RGBColor = RGBColor(214, 39, 40);
    /// One call per run (Firecracker's pattern).
    pub const PER_RUN: RGBColor = RGBColor(255, 127, 14);
    /// Destroy call as seen by the caller.
    pub const DESTROY: RGBColor = RGBColor(23, 190, 207);
    /// Process exit.
    pub const EXIT: RGBColor = RGBColor(44, 160, 44);
    /// QEMU.
    pub const QEMU: RGBColor = RGBColor(148, 103, 189);
    /// Everything of a teardown done (VM dropped, RAM unmapped).
    pub const DONE: RGBColor = RGBColor(140, 86, 75);
    /// Process RSS before a release.
    pub const BEFORE: RGBColor = RGBColor(127, 127, 127);
    /// Colours for series without a fixed meaning (sizes of a histogram).
    pub const CYCLE: [RGBColor; 6] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
    ];
}

/// A plotters error as an anyhow error.
fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing the chart: {e}")
}

/// Writes the rendered SVG to `path`.
fn write_svg(path: &Path, svg: &str) -> Result<()> {
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))
}

/// Whether `y` can be drawn on an axis of `scale`.
fn usable(y: f64, scale: Scale) -> bool {
    y.is_finite() && (scale == Scale::Linear || y > 0.0)
}

/// `(lo, hi)` padded for display: a factor on a log axis, a margin on a
/// linear one (which starts at 0 when every value is non-negative).
fn padded(lo: f64, hi: f64, scale: Scale) -> (f64, f64) {
    match scale {
        Scale::Log => {
            let (lo, hi) = if lo == hi {
                (lo / 2.0, hi * 2.0)
            } else {
                (lo, hi)
            };
            (lo / 1.5, hi * 1.5)
        }
        Scale::Linear => {
            let lo = if lo >= 0.0 { 0.0 } else { lo * 1.1 };
            let hi = if hi <= lo { lo + 1.0 } else { hi * 1.12 };
            (lo, hi)
        }
    }
}

/// The smallest 1, 2 or 5 times a power of ten at or above `v` (> 0).
fn snap_up_125(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|x| *x >= v * (1.0 - 1e-9))
        .unwrap_or(10.0 * p)
}

/// Ticks at 1, 2 and 5 times the powers of ten in `[lo, hi]` (only the
/// powers of ten when that would be too many).
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    if !(lo > 0.0 && hi >= lo && hi.is_finite()) {
        return Vec::new();
    }
    let (a, b) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    let pick = |mult: &[f64]| -> Vec<f64> {
        (a..=b)
            .flat_map(|e| mult.iter().map(move |m| m * 10f64.powi(e)))
            .filter(|v| *v >= lo && *v <= hi)
            .collect()
    };
    let v = pick(&[1.0, 2.0, 5.0]);
    if v.len() > 12 {
        pick(&[1.0])
    } else {
        v
    }
}

/// Draws a line chart into `path`.
pub(crate) fn lines(path: &Path, c: &LineChart<'_>) -> Result<()> {
    let pts: Vec<(f64, f64)> = c
        .series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|&(x, y)| usable(x, c.x_scale) && usable(y, c.y_scale))
        .collect();
    if pts.is_empty() {
        bail!("no data to plot for {:?}", c.title);
    }
    let fold =
        |f: fn(f64, f64) -> f64, init: f64, it: &mut dyn Iterator<Item = f64>| it.fold(init, f);
    let (x0, x1) = (
        fold(f64::min, f64::INFINITY, &mut pts.iter().map(|p| p.0)),
        fold(f64::max, f64::NEG_INFINITY, &mut pts.iter().map(|p| p.0)),
    );
    let (y0, y1) = (
        fold(f64::min, f64::INFINITY, &mut pts.iter().map(|p| p.1)),
        fold(f64::max, f64::NEG_INFINITY, &mut pts.iter().map(|p| p.1)),
    );
    let (x0, x1) = padded(x0, x1, c.x_scale);
    let (y0, y1) = padded(y0, y1, c.y_scale);
    // A log axis ends on a power of ten below and a 1-2-5 value above, so
    // both ends carry a tick.
    let (y0, y1) = match c.y_scale {
        Scale::Log => (10f64.powf(y0.log10().floor()), snap_up_125(y1)),
        Scale::Linear => (y0, y1),
    };
    let yticks = log_ticks(y0, y1);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let (area, legend) = layout(&root, c.title)?;
        let mut b = ChartBuilder::on(&area);
        b.margin(15).x_label_area_size(55).y_label_area_size(80);
        let xr = (x0..x1).log_scale();
        let xl = x0..x1;
        let ticks = c.x_ticks.clone();
        // Four combinations of scales, each its own coordinate type.
        macro_rules! draw {
            ($xr:expr, $yr:expr) => {{
                let mut chart = b.build_cartesian_2d($xr, $yr).map_err(plot_err)?;
                let xf = |x: &f64| (c.x_label)(*x);
                let yf = |y: &f64| tick(*y);
                styled(&mut chart.configure_mesh(), c.x_desc, c.y_desc, 15)
                    .x_label_formatter(&xf)
                    .y_label_formatter(&yf)
                    .draw()
                    .map_err(plot_err)?;
                for (i, s) in c.series.iter().enumerate() {
                    let color = s.color;
                    let p: Vec<(f64, f64)> = s
                        .points
                        .iter()
                        .copied()
                        .filter(|&(x, y)| usable(x, c.x_scale) && usable(y, c.y_scale))
                        .collect();
                    if p.is_empty() {
                        continue;
                    }
                    chart
                        .draw_series(LineSeries::new(p.clone(), color.stroke_width(2)))
                        .map_err(plot_err)?;
                    // The marker's shape depends on the series, so series
                    // stay distinguishable without colour.
                    match Shape::of(i) {
                        Shape::Circle => chart
                            .draw_series(p.iter().map(|&xy| Circle::new(xy, 5, color.filled())))
                            .map(|_| ()),
                        Shape::Triangle => chart
                            .draw_series(
                                p.iter()
                                    .map(|&xy| TriangleMarker::new(xy, 7, color.filled())),
                            )
                            .map(|_| ()),
                        _ => chart
                            .draw_series(p.iter().map(|&xy| {
                                EmptyElement::at(xy)
                                    + Rectangle::new([(-4, -4), (4, 4)], color.filled())
                            }))
                            .map(|_| ()),
                    }
                    .map_err(plot_err)?;
                }
            }};
        }
        match (c.x_scale, c.y_scale) {
            (Scale::Log, Scale::Log) => {
                draw!(
                    xr.with_key_points(ticks),
                    (y0..y1).log_scale().with_key_points(yticks)
                )
            }
            (Scale::Log, Scale::Linear) => draw!(xr.with_key_points(ticks), y0..y1),
            (Scale::Linear, Scale::Log) => {
                draw!(xl, (y0..y1).log_scale().with_key_points(yticks))
            }
            (Scale::Linear, Scale::Linear) => draw!(xl, y0..y1),
        }
        let entries: Vec<(&str, RGBColor, Shape)> = c
            .series
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), s.color, Shape::of(i)))
            .collect();
        side_legend(&legend, &entries, true)?;
        root.present().map_err(plot_err)?;
    }
    write_svg(path, &svg)
}

/// Legend width in pixels, right of the plot.
const LEGEND_W: u32 = 300;

/// A drawing area in pixel coordinates.
type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

/// The title on top, then the plot area and the legend area beside it.
fn layout<'a>(root: &Area<'a>, title: &str) -> Result<(Area<'a>, Area<'a>)> {
    let body = root.titled(title, (FONT, 24)).map_err(plot_err)?;
    let (w, _) = body.dim_in_pixel();
    Ok(body.split_horizontally(w.saturating_sub(LEGEND_W)))
}

/// Marker shapes, chosen by series index.
#[derive(Clone, Copy)]
enum Shape {
    /// Filled circle.
    Circle,
    /// Filled triangle.
    Triangle,
    /// Filled square (also the legend box of a bar).
    Square,
}

impl Shape {
    fn of(i: usize) -> Self {
        match i % 3 {
            0 => Shape::Circle,
            1 => Shape::Triangle,
            _ => Shape::Square,
        }
    }
}

/// A legend drawn in its own area, so it never hides data: one entry per
/// series, a line with the series' marker (`line`) or a filled box.
fn side_legend(area: &Area<'_>, entries: &[(&str, RGBColor, Shape)], line: bool) -> Result<()> {
    let style = TextStyle::from((FONT, 15).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    for (i, &(name, color, shape)) in entries.iter().enumerate() {
        let y = 40 + 26 * i as i32;
        let at = EmptyElement::at((12, y));
        if line {
            area.draw(&(at + PathElement::new(vec![(0, 0), (28, 0)], color.stroke_width(2))))
                .map_err(plot_err)?;
            let m = EmptyElement::at((26, y));
            match shape {
                Shape::Circle => area.draw(&(m + Circle::new((0, 0), 5, color.filled()))),
                Shape::Triangle => area.draw(&(m + TriangleMarker::new((0, 0), 7, color.filled()))),
                Shape::Square => {
                    area.draw(&(m + Rectangle::new([(-4, -4), (4, 4)], color.filled())))
                }
            }
            .map_err(plot_err)?;
        } else {
            area.draw(&(at + Rectangle::new([(0, -7), (28, 7)], color.filled())))
                .map_err(plot_err)?;
        }
        area.draw(&Text::new(name.to_string(), (50, y), style.clone()))
            .map_err(plot_err)?;
    }
    Ok(())
}

/// The mesh style both kinds of chart share: axis titles, fonts of
/// `label_px` tick labels, a light grid.
fn styled<'m, 'a, 'b, X: Ranged, Y: Ranged, DB: DrawingBackend>(
    m: &'m mut MeshStyle<'a, 'b, X, Y, DB>,
    x_desc: &str,
    y_desc: &str,
    label_px: u32,
) -> &'m mut MeshStyle<'a, 'b, X, Y, DB> {
    m.x_desc(x_desc)
        .y_desc(y_desc)
        .axis_desc_style((FONT, 18))
        .label_style((FONT, label_px))
        .light_line_style(RGBColor(235, 235, 235))
}

/// A tick label: few digits, no trailing zeros.
pub(crate) fn tick(v: f64) -> String {
    let a = v.abs();
    let s = if a == 0.0 {
        "0".to_string()
    } else if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Draws a grouped bar chart into `path`.
pub(crate) fn grouped_bars(path: &Path, c: &BarChart<'_>) -> Result<()> {
    let n = c.categories.len();
    let k = c.series.len();
    if n == 0 || k == 0 {
        bail!("no data to plot for {:?}", c.title);
    }
    let ymax = c
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .filter(|y| y.is_finite())
        .fold(0.0f64, f64::max);
    // A log axis starts below the smallest count worth a bar (1).
    let (y0, y1) = match c.y_scale {
        Scale::Linear => (0.0, padded(0.0, ymax, Scale::Linear).1),
        Scale::Log => (0.5, ymax.max(1.0) * 3.0),
    };
    let yticks = log_ticks(y0, y1);
    // Crowded categories: smaller labels, no per-bar values.
    let crowded = n * if c.shared_slot { 1 } else { k } > 16;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let (area, legend) = layout(&root, c.title)?;
        let mut b = ChartBuilder::on(&area);
        b.margin(15).x_label_area_size(55).y_label_area_size(80);
        let cats = &c.categories;
        let xf = |x: &f64| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                cats.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        };
        let yf = |y: &f64| tick(*y);
        // Each category spans 0.8 of its unit; the bars share it.
        let w = if c.shared_slot { 0.8 } else { 0.8 / k as f64 };
        let above = |y: f64| match c.y_scale {
            Scale::Linear => y + y1 * 0.012,
            Scale::Log => y * 1.12,
        };
        macro_rules! draw {
            ($yr:expr) => {{
                let mut chart = b
                    .build_cartesian_2d(-0.5..n as f64 - 0.5, $yr)
                    .map_err(plot_err)?;
                styled(
                    &mut chart.configure_mesh(),
                    c.x_desc,
                    c.y_desc,
                    if n > 10 { 13 } else { 15 },
                )
                .disable_x_mesh()
                // One unit per category: a label count just above the
                // number of categories puts the ticks on whole numbers.
                .x_labels(n + 1)
                .x_label_formatter(&xf)
                .y_label_formatter(&yf)
                .draw()
                .map_err(plot_err)?;
                for (j, s) in c.series.iter().enumerate() {
                    let color = s.color;
                    let bars: Vec<(f64, f64)> = s
                        .points
                        .iter()
                        .copied()
                        .filter(|&(_, y)| y.is_finite() && y > y0)
                        .collect();
                    let slot = if c.shared_slot { 0.0 } else { j as f64 * w };
                    let left = |x: f64| x - 0.4 + slot;
                    chart
                        .draw_series(bars.iter().map(|&(x, y)| {
                            Rectangle::new(
                                [(left(x) + w * 0.06, y0), (left(x) + w * 0.94, y)],
                                color.filled(),
                            )
                        }))
                        .map_err(plot_err)?;
                    if let Some(f) = c.bar_label.filter(|_| !crowded) {
                        chart
                            .draw_series(bars.iter().map(|&(x, y)| {
                                Text::new(
                                    f(y),
                                    (left(x) + w * 0.5, above(y)),
                                    TextStyle::from((FONT, 13).into_font())
                                        .pos(Pos::new(HPos::Center, VPos::Bottom)),
                                )
                            }))
                            .map_err(plot_err)?;
                    }
                }
                if let Some((x, label)) = c.x_marker {
                    let red = RGBColor(200, 0, 0);
                    chart
                        .draw_series(std::iter::once(PathElement::new(
                            vec![(x, y0), (x, y1)],
                            red.stroke_width(2),
                        )))
                        .map_err(plot_err)?;
                    let top = match c.y_scale {
                        Scale::Linear => y1 * 0.97,
                        Scale::Log => y1 / 1.3,
                    };
                    chart
                        .draw_series(std::iter::once(Text::new(
                            format!(" {label}"),
                            (x, top),
                            TextStyle::from((FONT, 14).into_font())
                                .color(&red)
                                .pos(Pos::new(HPos::Left, VPos::Top)),
                        )))
                        .map_err(plot_err)?;
                }
            }};
        }
        match c.y_scale {
            Scale::Linear => draw!(y0..y1),
            Scale::Log => draw!((y0..y1).log_scale().with_key_points(yticks)),
        }
        let entries: Vec<(&str, RGBColor, Shape)> = c
            .series
            .iter()
            .map(|s| (s.name.as_str(), s.color, Shape::Square))
            .collect();
        side_legend(&legend, &entries, false)?;
        root.present().map_err(plot_err)?;
    }
    write_svg(path, &svg)
}
