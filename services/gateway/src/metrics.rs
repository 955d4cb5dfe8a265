//! The gateway's metrics (OpenTelemetry instruments; no-ops when nothing is exported). After
//! the Collector's translation to Prometheus they read `secsync_gateway_…` with unit and
//! `_total` suffixes; the dashboards under `deploy/grafana` query exactly those names (a test
//! checks them against [`INSTRUMENTS`]). Labels are small fixed sets (frame types, reason
//! codes, operations): never a document id, key or anything per connection.

use std::sync::LazyLock;

use opentelemetry::metrics::{Counter, Histogram, Meter, UpDownCounter};
use opentelemetry::KeyValue;
use secsync_telemetry::instruments::{Kind, Spec};

/// Bucket bounds in seconds for store calls and fan-out latency.
const DURATION_BOUNDS: [f64; 15] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.003, 0.005, 0.007_5, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0,
];

const fn spec(
    name: &'static str,
    unit: &'static str,
    kind: Kind,
    description: &'static str,
) -> Spec {
    Spec {
        name,
        unit,
        kind,
        description,
    }
}

pub const CONNECTIONS: Spec = spec(
    "secsync.gateway.connections",
    "{connection}",
    Kind::UpDownCounter,
    "Open WebSocket connections",
);
pub const DOCUMENTS: Spec = spec(
    "secsync.gateway.documents",
    "{document}",
    Kind::UpDownCounter,
    "Documents with at least one local client",
);
pub const FRAMES_RECEIVED: Spec = spec(
    "secsync.gateway.frames.received",
    "{frame}",
    Kind::Counter,
    "Frames received from clients, by type",
);
pub const FRAMES_SENT: Spec = spec(
    "secsync.gateway.frames.sent",
    "{frame}",
    Kind::Counter,
    "Frames sent to clients, by type",
);
pub const REJECTIONS: Spec = spec(
    "secsync.gateway.rejections",
    "{frame}",
    Kind::Counter,
    "Frames refused, by reason code",
);
pub const STORE_DURATION: Spec = spec(
    "secsync.gateway.store.duration",
    "s",
    Kind::Histogram,
    "Calls to persistence, by operation and outcome",
);
pub const FANOUT_LATENCY: Spec = spec(
    "secsync.gateway.fanout.latency",
    "s",
    Kind::Histogram,
    "From the commit's acknowledgement on the sending gateway to the delivery into a \
     receiving connection's queue",
);
pub const GAP_REPAIRS: Spec = spec(
    "secsync.gateway.gap_repairs",
    "{repair}",
    Kind::Counter,
    "Gaps in a document's stream read back from persistence",
);
pub const SLOW_CONSUMERS: Spec = spec(
    "secsync.gateway.slow_consumers",
    "{connection}",
    Kind::Counter,
    "Connections closed because they did not read fast enough",
);
pub const NATS_RECONNECTS: Spec = spec(
    "secsync.gateway.nats.reconnects",
    "{reconnect}",
    Kind::Counter,
    "Connections to NATS (re)established",
);

/// Every instrument of the gateway.
pub const INSTRUMENTS: [Spec; 10] = [
    CONNECTIONS,
    DOCUMENTS,
    FRAMES_RECEIVED,
    FRAMES_SENT,
    REJECTIONS,
    STORE_DURATION,
    FANOUT_LATENCY,
    GAP_REPAIRS,
    SLOW_CONSUMERS,
    NATS_RECONNECTS,
];

/// The instruments, made once from the global meter provider (set up by `secsync-telemetry`
/// before anything records).
#[derive(Debug)]
pub struct Metrics {
    pub documents: UpDownCounter<i64>,
    frames_received: Counter<u64>,
    frames_sent: Counter<u64>,
    rejections: Counter<u64>,
    store_duration: Histogram<f64>,
    fanout_latency: Histogram<f64>,
    pub gap_repairs: Counter<u64>,
    pub slow_consumers: Counter<u64>,
    pub nats_reconnects: Counter<u64>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The gateway's instruments.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// Reports `open()` as the open-connection count at every export, for as long as the returned
/// handle is kept.
pub fn observe_connections(
    open: impl Fn() -> i64 + Send + Sync + 'static,
) -> opentelemetry::metrics::ObservableUpDownCounter<i64> {
    opentelemetry::global::meter("secsync-gateway")
        .i64_observable_up_down_counter(CONNECTIONS.name)
        .with_unit(CONNECTIONS.unit)
        .with_description(CONNECTIONS.description)
        .with_callback(move |observer| observer.observe(open(), &[]))
        .build()
}

fn up_down(meter: &Meter, spec: Spec) -> UpDownCounter<i64> {
    meter
        .i64_up_down_counter(spec.name)
        .with_unit(spec.unit)
        .with_description(spec.description)
        .build()
}

fn counter(meter: &Meter, spec: Spec) -> Counter<u64> {
    meter
        .u64_counter(spec.name)
        .with_unit(spec.unit)
        .with_description(spec.description)
        .build()
}

fn seconds(meter: &Meter, spec: Spec) -> Histogram<f64> {
    meter
        .f64_histogram(spec.name)
        .with_unit(spec.unit)
        .with_description(spec.description)
        .with_boundaries(DURATION_BOUNDS.to_vec())
        .build()
}

impl Metrics {
    fn new() -> Self {
        let meter = opentelemetry::global::meter("secsync-gateway");
        Self {
            documents: up_down(&meter, DOCUMENTS),
            frames_received: counter(&meter, FRAMES_RECEIVED),
            frames_sent: counter(&meter, FRAMES_SENT),
            rejections: counter(&meter, REJECTIONS),
            store_duration: seconds(&meter, STORE_DURATION),
            fanout_latency: seconds(&meter, FANOUT_LATENCY),
            gap_repairs: counter(&meter, GAP_REPAIRS),
            slow_consumers: counter(&meter, SLOW_CONSUMERS),
            nats_reconnects: counter(&meter, NATS_RECONNECTS),
        }
    }

    pub fn frame_received(&self, kind: &'static str) {
        self.frames_received.add(1, &[KeyValue::new("type", kind)]);
    }

    pub fn frame_sent(&self, kind: &'static str) {
        self.frames_sent.add(1, &[KeyValue::new("type", kind)]);
    }

    pub fn rejected(&self, reason: &'static str) {
        self.rejections.add(1, &[KeyValue::new("reason", reason)]);
    }

    pub fn store_call(&self, operation: &'static str, ok: bool, seconds: f64) {
        let outcome = if ok { "ok" } else { "error" };
        self.store_duration.record(
            seconds,
            &[
                KeyValue::new("operation", operation),
                KeyValue::new("outcome", outcome),
            ],
        );
    }

    pub fn fanout(&self, seconds: f64) {
        self.fanout_latency.record(seconds, &[]);
    }
}

/// Now as Unix microseconds: the fan-out latency spans two processes, so it needs the wall
/// clock (both gateways' clocks are assumed in sync, as NTP keeps them in a cluster).
#[allow(clippy::disallowed_methods)]
pub fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}
