//! Telemetry for every binary, set up in one place.
//!
//! Today: `tracing` logs, human-readable by default or JSON (`--log-format json`), filtered by
//! `RUST_LOG` (default `info`). OpenTelemetry export configured by the standard `OTEL_*`
//! variables is added here, so no other code branches on it. Also the one shutdown signal
//! (SIGTERM or Ctrl-C) the binaries wait for.

/// Installs the global log subscriber. `format` is `human` or `json`.
pub fn init(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
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
