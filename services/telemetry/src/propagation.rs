//! W3C trace context (`traceparent`, `tracestate`) across process boundaries: written into
//! gRPC metadata by the gateway and NATS headers by the publishing gateway, read back by
//! persistence and the receiving gateways, so one update is one trace from the socket that sent
//! it to the sockets that received it. Carrier-agnostic: callers pass how to set or get a header.

use opentelemetry::propagation::Injector;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

struct Setter<F>(F);

impl<F: FnMut(&str, String)> Injector for Setter<F> {
    fn set(&mut self, key: &str, value: String) {
        (self.0)(key, value);
    }
}

/// The headers W3C trace context uses.
pub const HEADERS: [&str; 2] = ["traceparent", "tracestate"];

/// Hands `span`'s context to `set` as headers (nothing when it is not exported).
pub fn inject(span: &tracing::Span, set: impl FnMut(&str, String)) {
    let context = span.context();
    let mut setter = Setter(set);
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut setter);
    });
}

/// Makes the context carried by the headers `get` reads the parent of `span`.
pub fn set_parent(span: &tracing::Span, get: impl Fn(&str) -> Option<String>) {
    let carrier: std::collections::HashMap<String, String> = HEADERS
        .iter()
        .filter_map(|key| get(key).map(|value| ((*key).to_owned(), value)))
        .collect();
    if carrier.is_empty() {
        return;
    }
    let context =
        opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(&carrier));
    // Without an exporter there is no OpenTelemetry layer and nothing to parent.
    let _ = span.set_parent(context);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::HashMap;

    use opentelemetry::trace::{TraceContextExt as _, Tracer as _, TracerProvider as _};
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    #[test]
    fn a_context_survives_inject_and_extract() {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let tracer = provider.tracer("test");
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(tracer.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let sender = tracing::info_span!("send");
            let mut headers = HashMap::new();
            inject(&sender, |k, v| {
                headers.insert(k.to_owned(), v);
            });
            let traceparent = headers.get("traceparent").unwrap().clone();
            let sent_trace = sender.context().span().span_context().trace_id();
            assert!(
                traceparent.contains(&sent_trace.to_string()),
                "{traceparent}"
            );

            let receiver = tracing::info_span!("receive");
            set_parent(&receiver, |k| headers.get(k).cloned());
            let _entered = receiver.enter();
            let child = tracer.start("child");
            let _ = child;
            assert_eq!(
                receiver.context().span().span_context().trace_id(),
                sent_trace
            );
        });
    }
}
