//! `compare`: one table of every metric for every target (label) in JSON-lines results, with
//! the ratio of each target to the baseline(s), and the same as one JSON document.
//!
//! Unpaced throughput lines are keyed by their window; paced ones (`offered_rate`) are for the
//! plot and left out. When a label ran a phase more than once, its last line counts.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{json, Value};

/// Which direction is better for a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

/// One row: a metric and its value per label.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    pub name: String,
    pub unit: &'static str,
    pub better: Better,
    pub values: BTreeMap<String, f64>,
}

#[derive(Default)]
struct Rows(BTreeMap<(u8, String), Metric>);

impl Rows {
    fn put(
        &mut self,
        order: u8,
        name: String,
        unit: &'static str,
        better: Better,
        label: &str,
        v: Option<f64>,
    ) {
        let Some(v) = v else { return };
        self.0
            .entry((order, name.clone()))
            .or_insert_with(|| Metric {
                name,
                unit,
                better,
                values: BTreeMap::new(),
            })
            .values
            .insert(label.to_owned(), v);
    }

    fn throughput(&mut self, v: &Value, label: &str) {
        let shape = format!(
            "{} clients / {} docs / window {}",
            v["clients"], v["docs"], v["window"]
        );
        let rows: [(u8, &str, &'static str, Better, Option<f64>); 4] = [
            (
                0,
                "throughput",
                "updates/s",
                Better::Higher,
                v["updates_per_second"].as_f64(),
            ),
            (
                1,
                "ack p50",
                "ms",
                Better::Lower,
                v["ack_ms"]["p50"].as_f64(),
            ),
            (
                1,
                "ack p99",
                "ms",
                Better::Lower,
                v["ack_ms"]["p99"].as_f64(),
            ),
            (
                1,
                "delivery p99",
                "ms",
                Better::Lower,
                v["delivery_ms"]["p99"].as_f64(),
            ),
        ];
        for (order, name, unit, better, value) in rows {
            self.put(
                order,
                format!("{name} ({shape})"),
                unit,
                better,
                label,
                value,
            );
        }
    }

    fn fanout(&mut self, v: &Value, label: &str) {
        let d = &v["delivery_ms"];
        self.put(
            2,
            "fan-out p50".into(),
            "ms",
            Better::Lower,
            label,
            d["p50"].as_f64(),
        );
        self.put(
            2,
            "fan-out p99".into(),
            "ms",
            Better::Lower,
            label,
            d["p99"].as_f64(),
        );
        let cross = &v["cross_endpoint_ms"];
        if cross["count"].as_u64().unwrap_or(0) > 0 {
            let name = "fan-out p99, other gateway".into();
            self.put(2, name, "ms", Better::Lower, label, cross["p99"].as_f64());
        }
    }

    fn docload(&mut self, v: &Value, label: &str) {
        for d in v["documents"].as_array().into_iter().flatten() {
            let n = d["updates"].as_u64().unwrap_or(0);
            for (mode, p) in [("complete", "p50"), ("complete", "p99"), ("delta", "p50")] {
                let name = format!("load {n:>6} updates, {mode} {p}");
                self.put(3, name, "ms", Better::Lower, label, d[mode][p].as_f64());
            }
        }
    }

    fn idle(&mut self, v: &Value, label: &str) {
        if let Some(last) = v["steps"].as_array().and_then(|s| s.last()) {
            let n = last["connections"].as_u64().unwrap_or(0);
            let per = last["kib_per_connection"].as_f64();
            let slope = last["slope_kib_per_connection"].as_f64();
            self.put(
                4,
                format!("RSS per idle connection at {n}"),
                "KiB",
                Better::Lower,
                label,
                per,
            );
            self.put(
                4,
                format!("RSS slope, last step to {n}"),
                "KiB",
                Better::Lower,
                label,
                slope,
            );
        }
    }
}

/// Reads every metric of every label, in a stable order (phase order, then name).
pub fn metrics(text: &str) -> (Vec<String>, Vec<Metric>) {
    let mut labels: Vec<String> = Vec::new();
    let mut rows = Rows::default();
    for line in text.lines().filter(|l| l.starts_with('{')) {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let Some(label) = v["label"].as_str() else {
            continue;
        };
        if !labels.iter().any(|l| l == label) {
            labels.push(label.to_owned());
        }
        match v["phase"].as_str() {
            Some("throughput") if v["offered_rate"].is_null() => rows.throughput(&v, label),
            Some("fanout") => rows.fanout(&v, label),
            Some("docload") => rows.docload(&v, label),
            Some("idle") => rows.idle(&v, label),
            _ => {}
        }
    }
    (labels, rows.0.into_values().collect())
}

fn fmt(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// The table as text (Markdown) and the summary as JSON.
pub fn table(text: &str, baselines: &[String]) -> (String, Value) {
    let (labels, metrics) = metrics(text);
    let targets: Vec<&String> = labels.iter().filter(|l| !baselines.contains(l)).collect();
    let mut out = String::new();
    let mut header = String::from("| metric | unit |");
    let mut rule = String::from("| --- | --- |");
    for l in &labels {
        let _ = write!(header, " {l} |");
        rule.push_str(" ---: |");
    }
    for b in baselines.iter().filter(|b| labels.contains(b)) {
        for t in &targets {
            let _ = write!(header, " {t} ÷ {b} |");
            rule.push_str(" ---: |");
        }
    }
    let _ = writeln!(out, "{header}\n{rule}");
    let mut rows = Vec::new();
    for m in &metrics {
        let arrow = match m.better {
            Better::Higher => "↑",
            Better::Lower => "↓",
        };
        let _ = write!(out, "| {} {arrow} | {} |", m.name, m.unit);
        for l in &labels {
            let _ = write!(
                out,
                " {} |",
                m.values.get(l).map_or("—".into(), |v| fmt(*v))
            );
        }
        let mut ratios = serde_json::Map::new();
        for b in baselines.iter().filter(|b| labels.contains(b)) {
            for t in &targets {
                let ratio = match (m.values.get(*t), m.values.get(b)) {
                    (Some(t), Some(b)) if *b > 0.0 => Some(t / b),
                    _ => None,
                };
                let _ = write!(
                    out,
                    " {} |",
                    ratio.map_or("—".into(), |r| format!("{r:.2}×"))
                );
                if let Some(r) = ratio {
                    ratios.insert(format!("{t}/{b}"), json!((r * 1000.0).round() / 1000.0));
                }
            }
        }
        out.push('\n');
        rows.push(json!({
            "metric": m.name, "unit": m.unit,
            "better": if m.better == Better::Higher { "higher" } else { "lower" },
            "values": m.values, "ratios": ratios,
        }));
    }
    let _ = writeln!(
        out,
        "\n↑ higher is better, ↓ lower is better; a ratio is the target's value divided by the baseline's."
    );
    (
        out,
        json!({"labels": labels, "baselines": baselines, "metrics": rows}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINES: &str = r#"{"phase":"throughput","label":"base","offered_rate":null,"clients":4,"docs":2,"window":1,"updates_per_second":1000.0,"ack_ms":{"p50":2.0,"p99":10.0},"delivery_ms":{"p99":12.0}}
{"phase":"throughput","label":"base","offered_rate":500,"clients":4,"docs":2,"window":1,"updates_per_second":500.0,"ack_ms":{"p50":1.0,"p99":3.0},"delivery_ms":{"p99":4.0}}
{"phase":"throughput","label":"ours","offered_rate":null,"clients":4,"docs":2,"window":1,"updates_per_second":5000.0,"ack_ms":{"p50":1.0,"p99":2.5},"delivery_ms":{"p99":3.0}}
{"phase":"idle","label":"ours","steps":[{"connections":5,"kib_per_connection":4.0,"slope_kib_per_connection":3.0}]}
{"phase":"idle","label":"base","steps":[{"connections":5,"kib_per_connection":8.0,"slope_kib_per_connection":6.0}]}"#;

    #[test]
    fn metrics_per_label_without_paced_runs() {
        let (labels, m) = metrics(LINES);
        assert_eq!(labels, ["base", "ours"]);
        let tp = m.iter().find(|m| m.name.starts_with("throughput")).unwrap();
        assert!(
            (tp.values["base"] - 1000.0).abs() < 1e-9,
            "the paced line is not the peak"
        );
        assert!((tp.values["ours"] - 5000.0).abs() < 1e-9);
        assert_eq!(tp.better, Better::Higher);
        assert!(m.iter().any(|m| m.name == "RSS per idle connection at 5"));
    }

    #[test]
    fn ratios_against_the_baseline() {
        let (text, summary) = table(LINES, &["base".to_owned()]);
        assert!(text.contains("| ours ÷ base |"));
        assert!(text.contains("5.00×"), "{text}");
        assert!(text.contains("0.50×"), "{text}");
        let tp = &summary["metrics"][0];
        assert_eq!(tp["ratios"]["ours/base"], 5.0);
    }
}
