//! The one configuration of `secsync-persistence`: flags, each also an environment variable.
//!
//! [`CoreArgs`] tunes the persistence core; the embedded `secsync` binary, which runs the same
//! core in-process, flattens it into its own configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use clap::{Args, Parser};

use crate::CoreOptions;

/// The secsync persistence service: validates ordering and stores snapshots and updates in
/// Postgres, serving gateways over gRPC.
#[derive(Debug, Clone, Parser)]
#[command(name = "secsync-persistence", version)]
pub struct Config {
    /// Address to serve gRPC on.
    #[arg(
        long,
        env = "SECSYNC_PERSISTENCE_LISTEN",
        default_value = "127.0.0.1:50051"
    )]
    pub listen: SocketAddr,

    /// Postgres connection URL (a secret: never logged).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// Most database connections in the pool.
    #[arg(long, env = "SECSYNC_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,

    /// Largest gRPC message in bytes; keep it at least the gateways' frame limit plus 64 KiB.
    #[arg(long, env = "SECSYNC_MAX_MESSAGE_BYTES", default_value_t = 32 * 1024 * 1024 + 64 * 1024)]
    pub max_message_bytes: usize,

    /// PEM certificate (chain) to serve gRPC over TLS with; needs --tls-key. Without it gRPC
    /// is plaintext.
    #[arg(long, env = "SECSYNC_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert (a secret: only its path is ever logged).
    #[arg(long, env = "SECSYNC_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificate(s): when given, gateways must present a client certificate signed by
    /// it (mutual TLS); needs --tls-cert.
    #[arg(long, env = "SECSYNC_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Also serve the gRPC health service (only) in plaintext on this address, for probes that
    /// cannot speak TLS or present a client certificate (Kubernetes' gRPC probe).
    #[arg(long, env = "SECSYNC_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,

    #[command(flatten)]
    pub core: CoreArgs,

    /// Log format: `human` or `json`.
    #[arg(long, env = "SECSYNC_LOG_FORMAT", default_value = "human")]
    pub log_format: String,
}

impl Config {
    /// The TLS these flags ask for, read from the files (`None`: plaintext). The PEM contents
    /// are checked when the server is built, before anything else starts.
    pub fn tls(&self) -> anyhow::Result<Option<ServerTlsConfig>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(
            read(cert, "--tls-cert")?,
            read(key, "--tls-key")?,
        ));
        if let Some(ca) = &self.tls_client_ca {
            tls = tls.client_ca_root(Certificate::from_pem(read(ca, "--tls-client-ca")?));
        }
        Ok(Some(tls))
    }
}

/// A file a flag names; the error says which flag and which file.
fn read(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{flag} {}", path.display()))
}

/// How the persistence core runs: shared by `secsync-persistence` and the embedded `secsync`.
#[derive(Debug, Clone, Args)]
pub struct CoreArgs {
    /// Check every new snapshot's parentSnapshotProof (PROTOCOL.md 7.10).
    #[arg(long, env = "SECSYNC_VERIFY_PARENT_PROOF", default_value_t = true, action = clap::ArgAction::Set)]
    pub verify_parent_proof: bool,

    /// Most messages committed in one transaction.
    #[arg(long, env = "SECSYNC_BATCH_MAX", default_value_t = 256)]
    pub batch_max: usize,

    /// Transactions in flight at once (default: 2 on Postgres, 1 on SQLite, which has one
    /// writer). Each worker commits its own share of the documents.
    #[arg(long, env = "SECSYNC_BATCH_WORKERS")]
    pub batch_workers: Option<usize>,

    /// Milliseconds a worker's batch waits for another worker's commit to end before
    /// committing alongside it (0: never waits). Waiting makes fewer, larger commits.
    #[arg(long, env = "SECSYNC_COMMIT_OVERLAP_MS", default_value_t = 5)]
    pub commit_overlap_ms: u64,

    /// MiB of documents kept in memory to serve loads without reading every update again
    /// (0 turns it off).
    #[arg(long, env = "SECSYNC_LOAD_CACHE_MIB", default_value_t = 256)]
    pub load_cache_mib: usize,
}

impl CoreArgs {
    /// The core's options; `defaults` carries what the backend recommends.
    pub fn core_options(&self, defaults: CoreOptions) -> CoreOptions {
        CoreOptions {
            rules: secsync_protocol::RuleOptions {
                verify_parent_proof: self.verify_parent_proof,
            },
            max_batch: self.batch_max,
            workers: self.batch_workers.unwrap_or(defaults.workers),
            commit_overlap_after: std::time::Duration::from_millis(self.commit_overlap_ms),
            load_cache_bytes: self.load_cache_mib.saturating_mul(1024 * 1024),
            ..defaults
        }
    }
}
