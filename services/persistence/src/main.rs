//! `secsync-persistence`: parse config, start logging, build the core, serve until SIGTERM.

use clap::Parser as _;
use secsync_persistence::config::Config;
use secsync_persistence::grpc::{serve_with, ServeOptions};
use secsync_persistence::postgres::{PgBackend, PgSettings};
use secsync_persistence::CoreOptions;

// See the workspace Cargo.toml: freed large buffers are reused instead of faulted in again.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let telemetry = secsync_telemetry::init("secsync-persistence", &config.log_format);
    // Certificate files first: a missing one stops the service before it connects anywhere.
    let tls = config.tls()?;
    let backend = PgBackend::connect_lazy(
        &config.database_url,
        &PgSettings {
            max_connections: config.db_max_connections,
            ..PgSettings::default()
        },
    )?;
    let options = config.core.core_options(CoreOptions::default());
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let health_listener = match config.health_listen {
        Some(address) => {
            let health = tokio::net::TcpListener::bind(address).await?;
            tracing::info!(health_listen = %health.local_addr()?, "plaintext health service");
            Some(health)
        }
        None => None,
    };
    tracing::info!(
        listen = %listener.local_addr()?,
        tls = tls.is_some(),
        client_certificates = config.tls_client_ca.is_some(),
        "secsync-persistence starting"
    );
    serve_with(
        listener,
        backend,
        options,
        ServeOptions {
            max_message_bytes: config.max_message_bytes,
            tls,
            health_listener,
        },
        secsync_telemetry::shutdown_signal(),
    )
    .await
    .map_err(|e| anyhow::anyhow!(e))?;
    tracing::info!("secsync-persistence stopped");
    telemetry.flush().await;
    Ok(())
}
