//! Latency samples and their percentiles.

use std::time::Duration;

use serde_json::{json, Value};

/// Latency samples in microseconds.
#[derive(Debug, Clone, Default)]
pub struct Samples(Vec<u64>);

impl Samples {
    pub fn push(&mut self, d: Duration) {
        self.0
            .push(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn extend(&mut self, other: Samples) {
        self.0.extend(other.0);
    }

    pub fn summary(mut self) -> Summary {
        self.0.sort_unstable();
        Summary::of_sorted(&self.0)
    }
}

/// Nearest-rank percentile of sorted samples: the smallest sample with at least `p` percent of
/// the samples at or below it. `None` when there are no samples.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let p = p.clamp(0.0, 100.0);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// p50/p95/p99/max of a set of latencies, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Summary {
    pub count: usize,
    pub min: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Summary {
    pub fn of_sorted(sorted: &[u64]) -> Self {
        let ms = |p: f64| percentile(sorted, p).map_or(0.0, |us| us as f64 / 1000.0);
        Self {
            count: sorted.len(),
            min: ms(0.0),
            p50: ms(50.0),
            p95: ms(95.0),
            p99: ms(99.0),
            max: ms(100.0),
        }
    }

    pub fn json(&self) -> Value {
        let r = |v: f64| (v * 1000.0).round() / 1000.0;
        json!({
            "count": self.count, "min": r(self.min), "p50": r(self.p50), "p95": r(self.p95),
            "p99": r(self.p99), "max": r(self.max),
        })
    }

    /// `p50 1.23 ms, p95 …, p99 …, max …`.
    pub fn line(&self) -> String {
        if self.count == 0 {
            return "no samples".into();
        }
        format!(
            "p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
            self.p50, self.p95, self.p99, self.max, self.count
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 95.0), Some(95));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
        // 10 samples: p99 is the largest, p50 the 5th.
        let v: Vec<u64> = (1..=10).map(|x| x * 10).collect();
        assert_eq!(percentile(&v, 99.0), Some(100));
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 51.0), Some(60));
    }

    #[test]
    fn summary_in_milliseconds() {
        let mut s = Samples::default();
        for us in [3000, 1000, 2000, 4000] {
            s.push(Duration::from_micros(us));
        }
        let sum = s.summary();
        assert_eq!(sum.count, 4);
        assert!((sum.p50 - 2.0).abs() < 1e-9);
        assert!((sum.max - 4.0).abs() < 1e-9);
        assert!((sum.min - 1.0).abs() < 1e-9);
        assert_eq!(Samples::default().summary().line(), "no samples");
    }
}
