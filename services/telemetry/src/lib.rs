//! Telemetry for every binary, set up in one place.
//!
//! * Logs through `tracing`: human-readable by default, JSON with `--log-format json`, filtered
//!   by `RUST_LOG` (default `info`); with traces exported, each line names its trace and span.
//! * OpenTelemetry traces (every `tracing` span, through `tracing-opentelemetry`) and metrics
//!   (instruments from [`opentelemetry::global::meter`], named where the work happens), exported
//!   over OTLP and configured only by the standard variables: `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//!   the per-signal `…_TRACES_ENDPOINT` / `…_METRICS_ENDPOINT`), `OTEL_EXPORTER_OTLP_PROTOCOL`
//!   (`grpc` or `http/protobuf`), `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//!   `OTEL_TRACES_SAMPLER`, `OTEL_METRIC_EXPORT_INTERVAL`, … With no endpoint set nothing is
//!   exported and the instruments are no-ops; no other code branches on it.
//! * [`instruments`]: metric instruments as data (name, unit, kind), shared with the checks of
//!   the dashboards.
//! * [`propagation`]: W3C trace context into and out of gRPC metadata and NATS headers.
//! * The one shutdown signal (SIGTERM or Ctrl-C) the binaries wait for, and [`Telemetry::shutdown`]
//!   which flushes what is buffered.
//!
//! What is never recorded: ciphertexts, nonces, signatures, message bodies, session keys. Spans
//! and metrics carry document ids only as span attributes (never as metric labels), snapshot
//! ids, public keys, clocks, sizes, kinds and reason codes.

pub mod instruments;
mod logs;
pub mod propagation;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

/// The OTLP settings read from the environment (the standard variables).
#[derive(Debug, Clone, Default)]
#[allow(clippy::struct_excessive_bools)] // four independent switches read from four variables
struct OtlpEnv {
    traces: bool,
    metrics: bool,
    http: bool,
    service_name_set: bool,
}

impl OtlpEnv {
    #[allow(clippy::disallowed_methods)] // the standard OTEL_* variables are this module's config
    fn read() -> Self {
        let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
        let any = set("OTEL_EXPORTER_OTLP_ENDPOINT");
        let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim() == "true");
        let protocol = std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").unwrap_or_default();
        let resource_attributes = std::env::var("OTEL_RESOURCE_ATTRIBUTES").unwrap_or_default();
        Self {
            traces: !disabled && (any || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")),
            metrics: !disabled && (any || set("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")),
            http: protocol.trim().starts_with("http"),
            service_name_set: set("OTEL_SERVICE_NAME")
                || resource_attributes
                    .split(',')
                    .any(|kv| kv.trim().starts_with("service.name=")),
        }
    }
}

/// What [`init`] set up; [`Telemetry::shutdown`] flushes it.
#[derive(Debug, Default)]
pub struct Telemetry {
    tracer_provider: Option<SdkTracerProvider>,
    meter_provider: Option<SdkMeterProvider>,
}

impl Telemetry {
    /// Exports what is still buffered (spans, the last metric values) and stops the exporters;
    /// the flush blocks, so it runs off the async workers.
    pub async fn flush(self) {
        let _ = tokio::task::spawn_blocking(move || self.shutdown()).await;
    }

    /// [`Telemetry::flush`] for synchronous callers.
    pub fn shutdown(self) {
        if let Some(provider) = self.tracer_provider {
            if let Err(error) = provider.shutdown() {
                tracing::warn!(%error, "flushing traces failed");
            }
        }
        if let Some(provider) = self.meter_provider {
            if let Err(error) = provider.shutdown() {
                tracing::warn!(%error, "flushing metrics failed");
            }
        }
    }
}

/// The resource every signal carries: `service.name` (from `OTEL_SERVICE_NAME` or
/// `OTEL_RESOURCE_ATTRIBUTES`, else the binary's name), a `service.instance.id` distinct per
/// process, and the version.
fn resource(service: &'static str, env: &OtlpEnv) -> Resource {
    let mut builder = Resource::builder();
    if !env.service_name_set {
        builder = builder.with_service_name(service);
    }
    builder
        .with_attribute(KeyValue::new(
            "service.instance.id",
            format!("{:032x}", rand::random::<u128>()),
        ))
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build()
}

fn protocol(env: &OtlpEnv) -> Protocol {
    if env.http {
        Protocol::HttpBinary
    } else {
        Protocol::Grpc
    }
}

fn tracer_provider(env: &OtlpEnv, resource: Resource) -> Result<SdkTracerProvider, String> {
    let builder = opentelemetry_otlp::SpanExporter::builder();
    let exporter = if env.http {
        builder.with_http().with_protocol(protocol(env)).build()
    } else {
        builder.with_tonic().build()
    }
    .map_err(|e| e.to_string())?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

fn meter_provider(env: &OtlpEnv, resource: Resource) -> Result<SdkMeterProvider, String> {
    let builder = opentelemetry_otlp::MetricExporter::builder();
    let exporter = if env.http {
        builder.with_http().with_protocol(protocol(env)).build()
    } else {
        builder.with_tonic().build()
    }
    .map_err(|e| e.to_string())?;
    Ok(SdkMeterProvider::builder()
        .with_periodic_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Installs logging, and OpenTelemetry export when an OTLP endpoint is configured. `service` is
/// the binary's name (the default `service.name`); `format` is `human` or `json`. Call it inside
/// the tokio runtime (the gRPC exporter needs one).
pub fn init(service: &'static str, format: &str) -> Telemetry {
    let env = OtlpEnv::read();
    let resource = resource(service, &env);
    let mut problems = Vec::new();
    let tracer_provider = env
        .traces
        .then(|| tracer_provider(&env, resource.clone()))
        .and_then(|r| r.map_err(|e| problems.push(format!("traces: {e}"))).ok());
    let meter_provider = env
        .metrics
        .then(|| meter_provider(&env, resource))
        .and_then(|r| r.map_err(|e| problems.push(format!("metrics: {e}"))).ok());
    if let Some(provider) = &meter_provider {
        opentelemetry::global::set_meter_provider(provider.clone());
    }
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );

    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = format == "json";
    let logs = match (json, tracer_provider.is_some()) {
        (true, false) => tracing_subscriber::fmt::layer().json().boxed(),
        (false, false) => tracing_subscriber::fmt::layer().boxed(),
        (true, true) => tracing_subscriber::fmt::layer()
            .json()
            .map_event_format(|inner| logs::WithTraceIds { inner, json })
            .boxed(),
        (false, true) => tracing_subscriber::fmt::layer()
            .map_event_format(|inner| logs::WithTraceIds { inner, json })
            .boxed(),
    };
    let traces = tracer_provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(service))
            // Exported spans keep only what the code recorded on purpose.
            .with_location(false)
            .with_threads(false)
    });
    // The filter applies to the logs and the traces alike: spans below the level are not made.
    tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(traces)
        .init();
    logs::remember_dispatch();
    for problem in problems {
        tracing::warn!(%problem, "OpenTelemetry export not started");
    }
    if tracer_provider.is_some() || meter_provider.is_some() {
        tracing::info!(
            traces = tracer_provider.is_some(),
            metrics = meter_provider.is_some(),
            "OpenTelemetry export on"
        );
    }
    Telemetry {
        tracer_provider,
        meter_provider,
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        return ctrl_c.await.unwrap_or(());
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
}
