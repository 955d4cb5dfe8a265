//! The Grafana dashboards (`deploy/grafana/dashboards`) query exactly the series the services
//! emit: every metric name in every query is the Collector's Prometheus translation of an
//! instrument the gateway or persistence defines, and every instrument appears on a dashboard.
//! (`telemetry.rs` checks that what is really exported matches the definitions.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;

use secsync_telemetry::instruments::{Kind, Spec};
use secsync_testkit::otlp::{prometheus_names, MetricKind};

fn kind(kind: Kind) -> MetricKind {
    match kind {
        Kind::Counter => MetricKind::Counter,
        Kind::UpDownCounter => MetricKind::UpDownCounter,
        Kind::Histogram => MetricKind::Histogram,
    }
}

fn series_of(spec: &Spec) -> Vec<String> {
    prometheus_names(spec.name, spec.unit, kind(spec.kind))
}

fn instruments() -> Vec<Spec> {
    secsync_gateway::metrics::INSTRUMENTS
        .iter()
        .chain(secsync_persistence::metrics::INSTRUMENTS.iter())
        .copied()
        .collect()
}

/// Every `expr` of every panel target, with its dashboard's file name.
fn queries() -> Vec<(String, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/grafana/dashboards");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let dashboard: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                out.push((file.clone(), target["expr"].as_str().unwrap().to_owned()));
            }
        }
    }
    assert!(!out.is_empty(), "no dashboards in {}", dir.display());
    out
}

/// The metric names a PromQL expression uses: identifiers of ours (`secsync_…`, `rpc_…`) that
/// are not label names (followed by `=`, `!=`, `=~`) or inside a label list of `by (…)`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_ascii_alphabetic() || chars[i] == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            if word.starts_with("secsync_") {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn every_query_uses_emitted_series_and_every_instrument_is_shown() {
    let known: BTreeSet<String> = instruments().iter().flat_map(series_of).collect();
    let mut used = BTreeSet::new();
    for (file, expr) in queries() {
        let names = metric_names(&expr);
        assert!(!names.is_empty(), "{file}: no metric in `{expr}`");
        for name in names {
            assert!(
                known.contains(&name),
                "{file}: `{name}` in `{expr}` is not a series any instrument produces"
            );
            used.insert(name);
        }
    }
    for spec in instruments() {
        assert!(
            series_of(&spec).iter().any(|s| used.contains(s)),
            "{} is on no dashboard",
            spec.name
        );
    }
}

#[test]
fn the_name_reader_finds_metrics_and_skips_labels() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (le, operation) (rate(secsync_gateway_store_duration_seconds_bucket{outcome="error"}[5m])))"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["secsync_gateway_store_duration_seconds_bucket"]
    );
}
