//! Log lines that name the trace they belong to, so a line found in the logs leads to its trace
//! (and back): `trace_id` and `span_id` of the OpenTelemetry span the event happened in.
//!
//! The ids are read from the span's OpenTelemetry context through the dispatcher, which the
//! formatter cannot reach while it runs (tracing hands nested lookups a no-op dispatcher), so
//! [`remember_dispatch`] keeps a weak handle to it once it is installed. With trace export off
//! there is no OpenTelemetry layer and lines carry no ids.

use std::sync::OnceLock;

use opentelemetry::trace::TraceContextExt as _;
use tracing::dispatcher::WeakDispatch;
use tracing::Subscriber;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

static DISPATCH: OnceLock<WeakDispatch> = OnceLock::new();

/// Keeps a handle to the installed dispatcher for [`WithTraceIds`]; call after installing it.
pub(crate) fn remember_dispatch() {
    tracing::dispatcher::get_default(|dispatch| {
        let _ = DISPATCH.set(dispatch.downgrade());
    });
}

/// Wraps a formatter: JSON lines get `"trace_id"` and `"span_id"` as their first fields, human
/// lines end with `trace_id=… span_id=…`.
#[derive(Debug)]
pub(crate) struct WithTraceIds<F> {
    pub inner: F,
    pub json: bool,
}

/// The ids of the current span's OpenTelemetry context, if it has a valid one.
fn current_ids<S>(
    ctx: &FmtContext<'_, S, impl for<'a> FormatFields<'a> + 'static>,
) -> Option<(String, String)>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let id = ctx.lookup_current()?.id();
    let dispatch = DISPATCH.get()?.upgrade()?;
    let context = tracing_opentelemetry::get_otel_context(&id, &dispatch)?;
    let span = context.span();
    let span_context = span.span_context();
    span_context.is_valid().then(|| {
        (
            span_context.trace_id().to_string(),
            span_context.span_id().to_string(),
        )
    })
}

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let Some((trace_id, span_id)) = current_ids(ctx) else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        if self.json {
            // The JSON formatter writes one object per line: put the ids first in it.
            let rest = line.strip_prefix('{').unwrap_or(&line);
            let comma = if rest.trim_start().starts_with('}') {
                ""
            } else {
                ","
            };
            write!(
                writer,
                "{{\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\"{comma}{rest}"
            )
        } else {
            let body = line.trim_end_matches('\n');
            writeln!(writer, "{body} trace_id={trace_id} span_id={span_id}")
        }
    }
}
