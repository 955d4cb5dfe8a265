//! `secsync-gateway`: parse config, start logging, build the parts, serve until SIGTERM, drain.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser as _;
use secsync_gateway::auth::OpenAccess;
use secsync_gateway::config::{seconds, AuthMode, Config};
use secsync_gateway::gateway::{Gateway, Limits};
use secsync_gateway::grpc_store::{GrpcStore, GrpcStoreOptions};
use secsync_gateway::hub::HubOptions;
use secsync_gateway::nats_bus::{NatsBus, NatsOptions};
use secsync_protocol::ParseOptions;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    secsync_telemetry::init(&config.log_format);
    let store = GrpcStore::new(&GrpcStoreOptions {
        url: config.persistence.clone(),
        max_message_bytes: config.max_frame_bytes + 64 * 1024,
        call_timeout: Duration::from_secs(10),
        resolve_every: Duration::from_secs(5),
    })?;
    let bus = NatsBus::connect(&NatsOptions {
        url: config.nats.clone(),
        user: config.nats_user.clone(),
        password: config.nats_password.clone(),
    })
    .await?;
    let auth = match config.auth {
        AuthMode::Open => Arc::new(OpenAccess),
    };
    let limits = Limits {
        max_frame_bytes: config.max_frame_bytes,
        rate_per_second: config.rate_per_second,
        rate_burst: config.rate_burst,
        max_connections: config.max_connections,
        send_queue: config.send_queue,
        write_retry: seconds(config.write_retry_seconds),
        ping_every: seconds(config.ping_seconds).max(Duration::from_secs(1)),
        first_delivery_hold: Duration::from_millis(config.first_delivery_hold_ms),
        parse_options: ParseOptions {
            allow_extra_public_data_fields: config.allow_extra_public_data,
        },
    };
    let hub = HubOptions {
        inbox_capacity: config.send_queue,
        gap_timeout: Duration::from_millis(config.gap_timeout_ms),
        head_check_every: seconds(config.head_check_seconds).max(Duration::from_millis(100)),
        inline_max: config.bus_inline_max,
    };
    let gateway = Gateway::new(
        Arc::new(store),
        Arc::new(bus),
        auth,
        limits,
        hub,
        config.path_prefix.clone(),
    );
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, id = %gateway.id, "secsync-gateway starting");
    secsync_gateway::server::serve(
        listener,
        gateway,
        secsync_telemetry::shutdown_signal(),
        seconds(config.drain_seconds),
    )
    .await?;
    tracing::info!("secsync-gateway stopped");
    Ok(())
}
