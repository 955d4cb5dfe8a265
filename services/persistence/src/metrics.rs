//! The persistence service's metrics (OpenTelemetry instruments; no-ops when nothing is
//! exported). Names follow OpenTelemetry conventions; after the Collector's translation to
//! Prometheus they read `secsync_persistence_…` with unit and `_total` suffixes. No document id,
//! key or anything per document is ever a label.

use opentelemetry::metrics::{Counter, Histogram};
use opentelemetry::KeyValue;

/// Bucket bounds in seconds for commit and load durations (sub-millisecond to seconds).
const DURATION_BOUNDS: [f64; 14] = [
    0.000_25, 0.000_5, 0.001, 0.002, 0.003, 0.005, 0.007_5, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Bucket bounds for messages per committed batch.
const BATCH_BOUNDS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

#[derive(Debug, Clone)]
pub struct Metrics {
    batch_size: Histogram<u64>,
    commit_duration: Histogram<f64>,
    submissions: Counter<u64>,
    load_duration: Histogram<f64>,
    load_cache: Counter<u64>,
}

impl Metrics {
    pub fn new() -> Self {
        let meter = opentelemetry::global::meter("secsync-persistence");
        Self {
            batch_size: meter
                .u64_histogram("secsync.persistence.batch.size")
                .with_unit("{message}")
                .with_description("Messages committed in one transaction")
                .with_boundaries(BATCH_BOUNDS.to_vec())
                .build(),
            commit_duration: meter
                .f64_histogram("secsync.persistence.commit.duration")
                .with_unit("s")
                .with_description("Time to run and commit one batch, rules and fsync included")
                .with_boundaries(DURATION_BOUNDS.to_vec())
                .build(),
            submissions: meter
                .u64_counter("secsync.persistence.submissions")
                .with_unit("{message}")
                .with_description("Snapshots and updates submitted, by kind and result")
                .build(),
            load_duration: meter
                .f64_histogram("secsync.persistence.load.duration")
                .with_unit("s")
                .with_description("Time to load a document")
                .with_boundaries(DURATION_BOUNDS.to_vec())
                .build(),
            load_cache: meter
                .u64_counter("secsync.persistence.load_cache.lookups")
                .with_unit("{lookup}")
                .with_description("Loads served from memory (hit) or read from the database (miss)")
                .build(),
        }
    }

    pub fn batch(&self, size: usize, seconds: f64) {
        self.batch_size.record(size as u64, &[]);
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
