//! The one configuration of `secsync`: flags, each also an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use secsync_gateway::config::SessionArgs;
use secsync_persistence::config::CoreArgs;

/// The secsync relay in one process: serves WebSocket clients and stores their documents in an
/// embedded SQLite database under the data directory (or in PostgreSQL with --database-url).
/// Needs neither PostgreSQL nor NATS.
#[derive(Debug, Clone, Parser)]
#[command(name = "secsync", version)]
pub struct Config {
    /// Address to serve WebSocket clients (and /healthz, /readyz) on.
    #[arg(long, env = "SECSYNC_LISTEN", default_value = "127.0.0.1:4000")]
    pub listen: SocketAddr,

    /// Directory of the SQLite database; created when missing, locked while running.
    #[arg(long, env = "SECSYNC_DATA_DIR", default_value = "./secsync-data")]
    pub data_dir: PathBuf,

    /// Store in PostgreSQL at this URL instead of the data directory (a secret: never logged).
    #[arg(long, env = "SECSYNC_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    #[command(flatten)]
    pub core: CoreArgs,

    #[command(flatten)]
    pub sessions: SessionArgs,
}
