//! `secsync-persistence`: parse config, start logging, build the core, serve until SIGTERM.

use clap::Parser as _;
use secsync_persistence::config::Config;
use secsync_persistence::grpc::serve;
use secsync_persistence::postgres::{PgBackend, PgSettings};
use secsync_persistence::CoreOptions;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    init_logging(&config.log_format);
    let backend = PgBackend::connect_lazy(
        &config.database_url,
        &PgSettings {
            max_connections: config.db_max_connections,
            ..PgSettings::default()
        },
    )?;
    let options = CoreOptions {
        rules: secsync_protocol::RuleOptions {
            verify_parent_proof: config.verify_parent_proof,
        },
        max_batch: config.batch_max,
        workers: config.batch_workers,
        ..CoreOptions::default()
    };
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, "secsync-persistence starting");
    serve(
        listener,
        backend,
        options,
        config.max_message_bytes,
        shutdown_signal(),
    )
    .await
    .map_err(|e| anyhow::anyhow!(e))?;
    tracing::info!("secsync-persistence stopped");
    Ok(())
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return ctrl_c.await.unwrap_or(());
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
