//! The persistence service's metrics (OpenTelemetry instruments; no-ops when nothing is
//! exported). Names follow OpenTelemetry conventions; after the Collector's translation to
//! Prometheus they read `secsync_persistence_…` with unit and `_total` suffixes. No document id,
//! key or anything per document is ever a label.

use opentelemetry::metrics::{Counter, Histogram};
use opentelemetry::KeyValue;
use secsync_telemetry::instruments::{Kind, Spec};

pub const BATCH_SIZE: Spec = Spec {
    name: "secsync.persistence.batch.size",
    unit: "{message}",
    kind: Kind::Histogram,
    description: "Messages committed in one transaction",
};
pub const COMMIT_DURATION: Spec = Spec {
    name: "secsync.persistence.commit.duration",
    unit: "s",
    kind: Kind::Histogram,
    description: "Time to run and commit one batch, rules and fsync included",
};
pub const SUBMISSIONS: Spec = Spec {
    name: "secsync.persistence.submissions",
    unit: "{message}",
    kind: Kind::Counter,
    description: "Snapshots and updates submitted, by kind and result",
};
pub const LOAD_DURATION: Spec = Spec {
    name: "secsync.persistence.load.duration",
    unit: "s",
    kind: Kind::Histogram,
    description: "Time to load a document",
};
pub const LOAD_CACHE: Spec = Spec {
    name: "secsync.persistence.load_cache.lookups",
    unit: "{lookup}",
    kind: Kind::Counter,
    description: "Loads served from memory (hit) or read from the database (miss)",
};

/// Every instrument of the persistence service.
pub const INSTRUMENTS: [Spec; 5] = [
    BATCH_SIZE,
    COMMIT_DURATION,
    SUBMISSIONS,
    LOAD_DURATION,
    LOAD_CACHE,
];

/// Bucket bounds in seconds for commit and load durations (sub-millisecond to seconds).
const DURATION_BOUNDS: [f64; 14] = [
    0.000_25, 0.000_5, 0.001, 0.002, 0.003, 0.005, 0.007_5, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Bucket bounds for messages per committed batch.
const BATCH_BOUNDS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

#[derive(Debug, Clone)]
pub struct Metrics {
    batch_size: Histogram<f64>,
    commit_duration: Histogram<f64>,
    submissions: Counter<u64>,
    load_duration: Histogram<f64>,
    load_cache: Counter<u64>,
}

impl Metrics {
    pub fn new() -> Self {
        let meter = opentelemetry::global::meter("secsync-persistence");
        let histogram = |spec: Spec, bounds: &[f64]| {
            meter
                .f64_histogram(spec.name)
                .with_unit(spec.unit)
                .with_description(spec.description)
                .with_boundaries(bounds.to_vec())
                .build()
        };
        let counter = |spec: Spec| {
            meter
                .u64_counter(spec.name)
                .with_unit(spec.unit)
                .with_description(spec.description)
                .build()
        };
        Self {
            batch_size: histogram(BATCH_SIZE, &BATCH_BOUNDS),
            commit_duration: histogram(COMMIT_DURATION, &DURATION_BOUNDS),
            submissions: counter(SUBMISSIONS),
            load_duration: histogram(LOAD_DURATION, &DURATION_BOUNDS),
            load_cache: counter(LOAD_CACHE),
        }
    }

    pub fn batch(&self, size: usize, seconds: f64) {
        self.batch_size.record(size as f64, &[]);
        self.commit_duration.record(seconds, &[]);
    }

    /// `result` is `accepted` or a rejection's reason code (a fixed, small set).
    pub fn submission(&self, kind: &'static str, result: &'static str) {
        self.submissions.add(
            1,
            &[KeyValue::new("kind", kind), KeyValue::new("result", result)],
        );
    }

    pub fn load(&self, seconds: f64, cache_hit: Option<bool>) {
        self.load_duration.record(seconds, &[]);
        if let Some(hit) = cache_hit {
            let result = if hit { "hit" } else { "miss" };
            self.load_cache.add(1, &[KeyValue::new("result", result)]);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
