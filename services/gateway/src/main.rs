//! `secsync-gateway`: parse config, start logging, build the parts, serve until SIGTERM, drain.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser as _;
use secsync_gateway::config::{seconds, Config};
use secsync_gateway::gateway::Gateway;
use secsync_gateway::grpc_store::{GrpcStore, GrpcStoreOptions};
use secsync_gateway::nats_bus::{NatsBus, NatsOptions};

// See the workspace Cargo.toml: freed large buffers are reused instead of faulted in again.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let sessions = &config.sessions;
    let telemetry = secsync_telemetry::init("secsync-gateway", &sessions.log_format);
    // Access control first: a missing key file stops the gateway before it connects anywhere.
    let auth = sessions.authorizer()?;
    let access = sessions.access_options()?;
    let store = GrpcStore::new(&GrpcStoreOptions {
        url: config.persistence.clone(),
        tls: config.persistence_tls()?,
        max_message_bytes: sessions.max_frame_bytes + 64 * 1024,
        call_timeout: Duration::from_secs(10),
        resolve_every: Duration::from_secs(5),
        probe_every: Duration::from_millis(500),
    })?;
    let bus = NatsBus::connect(&NatsOptions {
        url: config.nats.clone(),
        auth: config.nats_auth()?,
    })
    .await?;
    let gateway = Gateway::new(
        Arc::new(store),
        Arc::new(bus),
        auth,
        sessions.limits(),
        sessions.hub_options(),
        sessions.path_prefix.clone(),
        access,
    );
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, id = %gateway.id, "secsync-gateway starting");
    sessions.warn_if_open(listener.local_addr()?);
    secsync_gateway::server::serve(
        listener,
        gateway,
        secsync_telemetry::shutdown_signal(),
        seconds(sessions.drain_seconds),
    )
    .await?;
    tracing::info!("secsync-gateway stopped");
    telemetry.flush().await;
    Ok(())
}
