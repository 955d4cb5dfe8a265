//! `secsync`, the embedded single-node relay: the gateway's code with two seams switched.
//!
//! * The store is the persistence core in-process ([`core_store::CoreStore`]) instead of the
//!   gRPC client, on the embedded SQLite backend under the data directory ([`data_dir`]), or on
//!   PostgreSQL when a database URL is given.
//! * The bus is in-process ([`secsync_gateway::local_bus::LocalBus`]) instead of NATS.
//!
//! Sequencing, batching, idempotency and every protocol rule are the same code the distributed
//! deployment runs (the persistence core and the protocol crate); nothing is decided here.

pub mod config;
pub mod core_store;
pub mod data_dir;

use std::future::Future;
use std::sync::Arc;

use secsync_gateway::config::seconds;
use secsync_gateway::gateway::Gateway;
use secsync_gateway::local_bus::LocalBus;
use secsync_gateway::store::Store;
use secsync_persistence::postgres::{PgBackend, PgSettings};
use secsync_persistence::sqlite::{self, SqliteBackend};
use secsync_persistence::{Core, CoreOptions};

use crate::config::Config;
use crate::core_store::CoreStore;
use crate::data_dir::DataDir;

/// Opens the storage, serves on `listener` until `shutdown` resolves, then drains.
pub async fn run(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Access control first: a missing key file stops the relay before it opens the storage.
    let auth = config.sessions.authorizer()?;
    let access = config.sessions.access_options()?;
    // Held until the end: the data directory stays locked while the process runs.
    let mut data_dir = None;
    let store: Arc<dyn Store> = if let Some(url) = &config.database_url {
        let backend = PgBackend::connect_lazy(url, &PgSettings::default())?;
        backend.migrate().await?;
        tracing::info!("storage: PostgreSQL");
        let options = config.core.core_options(CoreOptions::default());
        Arc::new(CoreStore::new(Core::start(backend, options)))
    } else {
        let dir = DataDir::lock(&config.data_dir)?;
        let backend = SqliteBackend::open(&dir.database_file()).await?;
        backend.migrate().await?;
        tracing::info!(data_dir = %dir.path().display(), "storage: SQLite");
        let options = config.core.core_options(sqlite::recommended_core_options());
        data_dir = Some(dir);
        Arc::new(CoreStore::new(Core::start(backend, options)))
    };
    let sessions = &config.sessions;
    let gateway = Gateway::new(
        store,
        Arc::new(LocalBus::default()),
        auth,
        sessions.limits(),
        sessions.hub_options(),
        sessions.path_prefix.clone(),
        access,
    );
    let local = listener.local_addr()?;
    tracing::info!(listen = %local, id = %gateway.id, "secsync starting");
    sessions.warn_if_open(local);
    tracing::info!(
        "secsync ready: give the JavaScript client websocketEndpoint \"ws://{local}{}\"",
        sessions.path_prefix
    );
    secsync_gateway::server::serve(listener, gateway, shutdown, seconds(sessions.drain_seconds))
        .await?;
    drop(data_dir);
    tracing::info!("secsync stopped");
    Ok(())
}
