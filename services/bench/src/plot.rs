//! `plot`: acknowledgement latency (p50, p99) against offered load, one line per target, and
//! the achieved rate against the offered one, from `throughput` JSON lines run with `--rate`.
//! Rendered with plotters' bitmap backend to PNG; labels use a TrueType font read at run time.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::path::Path;

use anyhow::{anyhow, bail, Context as _};
use plotters::prelude::*;
use serde_json::Value;

use crate::cli::PlotArgs;

/// One throughput run at an offered rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub offered: f64,
    pub achieved: f64,
    pub p50: f64,
    pub p99: f64,
    pub ok: bool,
}

/// Distinct, print-safe colours for the first targets, then plotters' palette.
fn color(i: usize) -> RGBAColor {
    const FIRST: [(u8, u8, u8); 5] = [
        (214, 39, 40),
        (44, 160, 44),
        (255, 127, 14),
        (31, 119, 180),
        (148, 103, 189),
    ];
    FIRST.get(i).map_or_else(
        || Palette99::pick(i).to_rgba(),
        |&(r, g, b)| RGBColor(r, g, b).to_rgba(),
    )
}

fn err<E: Display>(e: E) -> anyhow::Error {
    anyhow!("drawing the plot: {e}")
}

/// Reads the paced throughput lines of JSON-lines text, grouped by label, sorted by load.
pub fn points(text: &str) -> BTreeMap<String, Vec<Point>> {
    let mut out: BTreeMap<String, Vec<Point>> = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with('{')) {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if v["phase"] != "throughput" {
            continue;
        }
        let (Some(offered), Some(achieved), Some(p50), Some(p99)) = (
            v["offered_rate"].as_f64(),
            v["updates_per_second"].as_f64(),
            v["ack_ms"]["p50"].as_f64(),
            v["ack_ms"]["p99"].as_f64(),
        ) else {
            continue;
        };
        let label = v["label"].as_str().unwrap_or("target").to_owned();
        out.entry(label).or_default().push(Point {
            offered,
            achieved,
            p50,
            p99,
            ok: v["ok"].as_bool().unwrap_or(false),
        });
    }
    for pts in out.values_mut() {
        pts.sort_by(|a, b| a.offered.total_cmp(&b.offered));
    }
    out
}

pub fn render(args: &PlotArgs) -> anyhow::Result<()> {
    let mut text = String::new();
    for input in &args.inputs {
        text.push_str(
            &std::fs::read_to_string(input)
                .with_context(|| format!("reading {}", input.display()))?,
        );
        text.push('\n');
    }
    let series = points(&text);
    if series.is_empty() {
        bail!("no throughput lines with an offered rate in the input");
    }
    let font = std::fs::read(&args.font).with_context(|| {
        format!(
            "reading the font {} (apt-get install fonts-dejavu-core, or pass --font)",
            args.font.display()
        )
    })?;
    // plotters keeps registered fonts for the whole process.
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow!("{} is not a usable TrueType font", args.font.display()))?;
    draw(&series, &args.title, &args.output)?;
    println!("wrote {}", args.output.display());
    Ok(())
}

#[allow(clippy::too_many_lines)] // two charts, drawn in order
fn draw(series: &BTreeMap<String, Vec<Point>>, title: &str, output: &Path) -> anyhow::Result<()> {
    let all: Vec<&Point> = series.values().flatten().collect();
    let x_max = all.iter().map(|p| p.offered).fold(0.0, f64::max) * 1.08;
    let y_max = all
        .iter()
        .map(|p| p.p99)
        .fold(1.0, f64::max)
        .mul_add(2.0, 0.0);
    let y_min = all
        .iter()
        .map(|p| p.p50)
        .fold(f64::INFINITY, f64::min)
        .max(0.01)
        / 2.0;
    let rate_max = all
        .iter()
        .map(|p| p.achieved.max(p.offered))
        .fold(0.0, f64::max)
        * 1.08;

    let root = BitMapBackend::new(output, (1500, 680)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root
        .titled(title, ("sans-serif", 28).into_font().color(&BLACK))
        .map_err(err)?;
    let (left, right) = root.split_horizontally(860);

    let mut chart = ChartBuilder::on(&left)
        .caption(
            "acknowledgement latency, p50 (dashed) and p99 (solid)",
            ("sans-serif", 20),
        )
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, (y_min..y_max).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("offered load (updates/s)")
        .y_desc("latency (ms, log scale)")
        .axis_desc_style(("sans-serif", 18))
        .label_style(("sans-serif", 15))
        .light_line_style(RGBColor(238, 238, 238))
        .y_label_formatter(&|v| format!("{v}"))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(err)?;
    for (i, (label, pts)) in series.iter().enumerate() {
        let color = color(i);
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.offered, p.p99)),
                color.stroke_width(3),
            ))
            .map_err(err)?
            .label(label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
        chart
            .draw_series(DashedLineSeries::new(
                pts.iter().map(|p| (p.offered, p.p50)),
                8,
                5,
                color.stroke_width(2),
            ))
            .map_err(err)?;
        chart
            .draw_series(pts.iter().map(|p| {
                let style = if p.ok { color.filled() } else { RED.filled() };
                Circle::new((p.offered, p.p99), 4, style)
            }))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(err)?;

    let mut rates = ChartBuilder::on(&right)
        .caption("achieved against offered load", ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..rate_max, 0.0..rate_max)
        .map_err(err)?;
    rates
        .configure_mesh()
        .x_desc("offered (updates/s)")
        .y_desc("acknowledged (updates/s)")
        .axis_desc_style(("sans-serif", 18))
        .label_style(("sans-serif", 15))
        .light_line_style(RGBColor(238, 238, 238))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(err)?;
    rates
        .draw_series(DashedLineSeries::new(
            [(0.0, 0.0), (rate_max, rate_max)],
            6,
            6,
            BLACK.mix(0.4).stroke_width(1),
        ))
        .map_err(err)?;
    for (i, pts) in series.values().enumerate() {
        let color = color(i);
        rates
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.offered, p.achieved)),
                color.stroke_width(3),
            ))
            .map_err(err)?;
        rates
            .draw_series(
                pts.iter()
                    .map(|p| Circle::new((p.offered, p.achieved), 4, color.filled())),
            )
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_paced_throughput_lines_only() {
        let text = r#"{"phase":"throughput","label":"ours","offered_rate":2000,"updates_per_second":1990.5,"ack_ms":{"p50":1.5,"p99":4.0},"ok":true}
human summary line
{"phase":"throughput","label":"ours","offered_rate":1000,"updates_per_second":999,"ack_ms":{"p50":1.0,"p99":2.0},"ok":true}
{"phase":"throughput","label":"ours","offered_rate":null,"updates_per_second":5000,"ack_ms":{"p50":9.0,"p99":20.0},"ok":true}
{"phase":"fanout","label":"ours","delivery_ms":{"p50":1.0}}
{"phase":"throughput","label":"ref","offered_rate":1000,"updates_per_second":900,"ack_ms":{"p50":3.0,"p99":30.0},"ok":false}"#;
        let s = points(text);
        assert_eq!(s.len(), 2);
        let ours = &s["ours"];
        assert_eq!(ours.len(), 2);
        assert!((ours[0].offered - 1000.0).abs() < 1e-9, "sorted by load");
        assert!((ours[1].p99 - 4.0).abs() < 1e-9);
        assert!(!s["ref"][0].ok);
    }
}
