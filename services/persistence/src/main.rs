//! `secsync-persistence`: parse config, start logging, build the core, serve until SIGTERM.

use clap::Parser as _;
use secsync_persistence::config::Config;
use secsync_persistence::grpc::serve;
use secsync_persistence::postgres::{PgBackend, PgSettings};
use secsync_persistence::CoreOptions;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let telemetry = secsync_telemetry::init("secsync-persistence", &config.log_format);
    let backend = PgBackend::connect_lazy(
        &config.database_url,
        &PgSettings {
            max_connections: config.db_max_connections,
            ..PgSettings::default()
        },
    )?;
    let options = config.core.core_options(CoreOptions::default());
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, "secsync-persistence starting");
    serve(
        listener,
        backend,
        options,
        config.max_message_bytes,
        secsync_telemetry::shutdown_signal(),
    )
    .await
    .map_err(|e| anyhow::anyhow!(e))?;
    tracing::info!("secsync-persistence stopped");
    telemetry.flush().await;
    Ok(())
}
