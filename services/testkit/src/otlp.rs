//! An OTLP/gRPC receiver in the test process, standing in for the OpenTelemetry Collector.
//!
//! It keeps every exported span (service, name, trace id, attributes) and metric (service,
//! name, unit, kind), plus the debug text of every request so a test can search all of it for
//! strings that must never be exported. [`prometheus_names`] is the Collector's translation of
//! an OTLP metric to the Prometheus series names dashboards query.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use tokio::sync::Notify;

/// A received span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub service: String,
    pub name: String,
    /// Lowercase hex, as W3C `traceparent` writes it.
    pub trace_id: String,
    pub attributes: Vec<(String, String)>,
    /// Trace ids of the span's links.
    pub links: Vec<String>,
}

impl Span {
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The OTLP kind of a metric, as far as name translation cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    UpDownCounter,
    Gauge,
    Histogram,
}

/// A received metric (its data points are not kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metric {
    pub service: String,
    pub name: String,
    pub unit: String,
    pub kind: MetricKind,
    /// Every attribute key seen on its data points (labels after translation).
    pub attribute_keys: BTreeSet<String>,
}

/// Everything received so far.
#[derive(Debug, Clone, Default)]
pub struct Received {
    pub spans: Vec<Span>,
    pub metrics: Vec<Metric>,
    /// The debug text of every export request, to search for what must never be exported.
    pub raw: Vec<String>,
}

#[derive(Debug, Default)]
struct Shared {
    received: Mutex<Received>,
    changed: Notify,
}

impl Shared {
    fn update(&self, change: impl FnOnce(&mut Received)) {
        change(&mut self.received.lock().expect("receiver lock"));
        self.changed.notify_waiters();
    }
}

/// The receiver; stops serving on drop.
#[derive(Debug)]
pub struct Receiver {
    /// `http://127.0.0.1:PORT`, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub endpoint: String,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Receiver {
    /// Serves OTLP/gRPC traces and metrics on a free loopback port.
    ///
    /// # Panics
    /// When no loopback port can be bound.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the OTLP receiver");
        let endpoint = format!(
            "http://{}",
            listener.local_addr().expect("receiver address")
        );
        let shared = Arc::new(Shared::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let service = Service(shared.clone());
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(service.clone()))
                .add_service(MetricsServiceServer::new(service))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await;
        });
        Self {
            endpoint,
            shared,
            stop: Some(stop),
        }
    }

    /// A copy of what was received so far.
    ///
    /// # Panics
    /// When the receiver's lock was poisoned.
    pub fn received(&self) -> Received {
        self.shared.received.lock().expect("receiver lock").clone()
    }

    /// Waits until `done` holds for what was received, at most `timeout`.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        done: impl Fn(&Received) -> bool,
    ) -> Result<Received, Received> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.shared.changed.notified();
            let received = self.received();
            if done(&received) {
                return Ok(received);
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(self.received());
            }
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

#[derive(Debug, Clone)]
struct Service(Arc<Shared>);

fn value_text(value: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(n)) => n.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(kvs: &[KeyValue]) -> Vec<(String, String)> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), value_text(kv.value.as_ref())))
        .collect()
}

fn service_name(resource: Option<&opentelemetry_proto::tonic::resource::v1::Resource>) -> String {
    resource
        .and_then(|r| {
            attributes(&r.attributes)
                .into_iter()
                .find(|(k, _)| k == "service.name")
        })
        .map(|(_, v)| v)
        .unwrap_or_default()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

#[tonic::async_trait]
impl TraceService for Service {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let request = request.into_inner();
        let raw = format!("{request:?}");
        let mut spans = Vec::new();
        for resource_spans in &request.resource_spans {
            let service = service_name(resource_spans.resource.as_ref());
            for scope in &resource_spans.scope_spans {
                for span in &scope.spans {
                    spans.push(Span {
                        service: service.clone(),
                        name: span.name.clone(),
                        trace_id: hex(&span.trace_id),
                        attributes: attributes(&span.attributes),
                        links: span.links.iter().map(|l| hex(&l.trace_id)).collect(),
                    });
                }
            }
        }
        self.0.update(|received| {
            received.raw.push(raw);
            received.spans.extend(spans);
        });
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Service {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let request = request.into_inner();
        let raw = format!("{request:?}");
        let mut metrics = Vec::new();
        for resource_metrics in &request.resource_metrics {
            let service = service_name(resource_metrics.resource.as_ref());
            for scope in &resource_metrics.scope_metrics {
                for metric in &scope.metrics {
                    let (kind, keys): (MetricKind, Vec<&[KeyValue]>) = match &metric.data {
                        Some(Data::Sum(sum)) => (
                            if sum.is_monotonic {
                                MetricKind::Counter
                            } else {
                                MetricKind::UpDownCounter
                            },
                            sum.data_points.iter().map(|p| &p.attributes[..]).collect(),
                        ),
                        Some(Data::Gauge(gauge)) => (
                            MetricKind::Gauge,
                            gauge
                                .data_points
                                .iter()
                                .map(|p| &p.attributes[..])
                                .collect(),
                        ),
                        Some(Data::Histogram(h)) => (
                            MetricKind::Histogram,
                            h.data_points.iter().map(|p| &p.attributes[..]).collect(),
                        ),
                        _ => continue,
                    };
                    metrics.push(Metric {
                        service: service.clone(),
                        name: metric.name.clone(),
                        unit: metric.unit.clone(),
                        kind,
                        attribute_keys: keys
                            .into_iter()
                            .flat_map(|kvs| kvs.iter().map(|kv| kv.key.clone()))
                            .collect(),
                    });
                }
            }
        }
        self.0.update(|received| {
            received.raw.push(raw);
            received.metrics.extend(metrics);
        });
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

/// The Prometheus unit word for an OTLP unit (UCUM), as the Collector writes it; annotations in
/// braces (`{message}`) and `1` add nothing.
fn unit_word(unit: &str) -> Option<&str> {
    let word = match unit {
        "" | "1" => return None,
        u if u.starts_with('{') => return None,
        "s" => "seconds",
        "ms" => "milliseconds",
        "us" => "microseconds",
        "ns" => "nanoseconds",
        "By" => "bytes",
        "KiBy" => "kibibytes",
        "MiBy" => "mebibytes",
        other => other,
    };
    Some(word)
}

/// The series names the Collector's Prometheus exporter makes of `metric` (with its default
/// suffixes): dots become underscores, the unit is appended, counters end in `_total`, and a
/// histogram is `_bucket`, `_sum` and `_count`.
pub fn prometheus_names(name: &str, unit: &str, kind: MetricKind) -> Vec<String> {
    let mut base: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if let Some(word) = unit_word(unit) {
        if !base.ends_with(&format!("_{word}")) {
            base = format!("{base}_{word}");
        }
    }
    match kind {
        MetricKind::Counter => vec![format!("{base}_total")],
        MetricKind::UpDownCounter | MetricKind::Gauge => vec![base],
        MetricKind::Histogram => ["_bucket", "_sum", "_count"]
            .iter()
            .map(|suffix| format!("{base}{suffix}"))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_translate_as_the_collector_writes_them() {
        assert_eq!(
            prometheus_names(
                "secsync.gateway.frames.received",
                "{frame}",
                MetricKind::Counter
            ),
            ["secsync_gateway_frames_received_total"]
        );
        assert_eq!(
            prometheus_names(
                "secsync.gateway.connections",
                "{connection}",
                MetricKind::UpDownCounter
            ),
            ["secsync_gateway_connections"]
        );
        assert_eq!(
            prometheus_names(
                "secsync.persistence.commit.duration",
                "s",
                MetricKind::Histogram
            ),
            [
                "secsync_persistence_commit_duration_seconds_bucket",
                "secsync_persistence_commit_duration_seconds_sum",
                "secsync_persistence_commit_duration_seconds_count"
            ]
        );
        assert_eq!(
            prometheus_names("queue.size_bytes", "By", MetricKind::Gauge),
            ["queue_size_bytes"]
        );
    }
}
