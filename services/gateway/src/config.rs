//! The one configuration of `secsync-gateway`: flags, each also an environment variable.
//!
//! [`SessionArgs`] holds everything about serving WebSocket clients (access control, limits,
//! fan-out tuning, logging); the embedded `secsync` binary flattens the same struct into its
//! own configuration, so both binaries take the same flags with the same defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, ValueEnum};

use crate::auth::callback::{CallbackAuthorizer, CallbackOptions};
use crate::auth::jwt::{JwtAuthorizer, JwtOptions};
use crate::auth::{Authorizer, OpenAccess};
use crate::gateway::{AccessOptions, Limits};
use crate::hub::HubOptions;
use crate::revocation::RevocationOptions;
use secsync_protocol::ParseOptions;

/// The secsync WebSocket gateway: speaks the secsync protocol to clients, stores through the
/// persistence service and fans out through NATS.
#[derive(Debug, Clone, Parser)]
#[command(name = "secsync-gateway", version)]
pub struct Config {
    /// Address to serve WebSocket clients (and /healthz, /readyz) on.
    #[arg(long, env = "SECSYNC_GATEWAY_LISTEN", default_value = "127.0.0.1:4000")]
    pub listen: SocketAddr,

    /// Persistence service URL; the host may resolve to several addresses (all are used).
    /// `https://` for TLS: the certificate must name the URL's host.
    #[arg(
        long,
        env = "SECSYNC_PERSISTENCE_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    pub persistence: String,

    /// PEM CA certificate(s) persistence's certificate must chain to (https:// URL only;
    /// without it an https:// URL trusts the system's roots).
    #[arg(long, env = "SECSYNC_PERSISTENCE_CA")]
    pub persistence_ca: Option<PathBuf>,

    /// PEM certificate presented to persistence (mutual TLS); needs --persistence-client-key.
    #[arg(
        long,
        env = "SECSYNC_PERSISTENCE_CLIENT_CERT",
        requires = "persistence_client_key"
    )]
    pub persistence_client_cert: Option<PathBuf>,

    /// PEM private key of --persistence-client-cert (a secret: only its path is ever logged).
    #[arg(
        long,
        env = "SECSYNC_PERSISTENCE_CLIENT_KEY",
        requires = "persistence_client_cert"
    )]
    pub persistence_client_key: Option<PathBuf>,

    /// NATS URL.
    #[arg(
        long,
        env = "SECSYNC_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats: String,

    /// NATS user (with --nats-password).
    #[arg(long, env = "SECSYNC_NATS_USER")]
    pub nats_user: Option<String>,

    /// NATS password (a secret: never logged).
    #[arg(long, env = "SECSYNC_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,

    /// File holding the NKey seed (`SU…`) of the NATS user to connect as (the seed is a
    /// secret: never logged; its public key is).
    #[arg(
        long,
        env = "SECSYNC_NATS_NKEY_SEED_FILE",
        conflicts_with_all = ["nats_user", "nats_creds_file"]
    )]
    pub nats_nkey_seed_file: Option<PathBuf>,

    /// NATS credentials file (user JWT and NKey seed, as `nsc` writes it; a secret: never
    /// logged).
    #[arg(long, env = "SECSYNC_NATS_CREDS_FILE", conflicts_with = "nats_user")]
    pub nats_creds_file: Option<PathBuf>,

    #[command(flatten)]
    pub sessions: SessionArgs,
}

impl Config {
    /// How to authenticate to NATS; an NKey seed file is read and checked now.
    pub fn nats_auth(&self) -> anyhow::Result<crate::nats_bus::NatsAuth> {
        use crate::nats_bus::NatsAuth;
        if let Some(path) = &self.nats_nkey_seed_file {
            let seed = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("--nats-nkey-seed-file {}: {e}", path.display()))?;
            return NatsAuth::nkey(&seed)
                .map_err(|why| anyhow::anyhow!("--nats-nkey-seed-file {}: {why}", path.display()));
        }
        if let Some(path) = &self.nats_creds_file {
            return Ok(NatsAuth::CredsFile(path.clone()));
        }
        match (&self.nats_user, &self.nats_password) {
            (Some(user), Some(password)) => Ok(NatsAuth::User {
                user: user.clone(),
                password: password.clone(),
            }),
            (None, None) => Ok(NatsAuth::None),
            _ => anyhow::bail!("--nats-user and --nats-password go together"),
        }
    }

    /// TLS towards persistence: the files the flags name, read now (`None`: plaintext).
    pub fn persistence_tls(&self) -> anyhow::Result<Option<crate::grpc_store::ClientTls>> {
        use anyhow::Context as _;
        let read = |path: &PathBuf, flag: &str| {
            std::fs::read(path).with_context(|| format!("{flag} {}", path.display()))
        };
        let https = self.persistence.starts_with("https://");
        if !https && (self.persistence_ca.is_some() || self.persistence_client_cert.is_some()) {
            anyhow::bail!(
                "--persistence-ca and --persistence-client-cert need an https:// --persistence URL"
            );
        }
        if !https {
            return Ok(None);
        }
        let identity = match (&self.persistence_client_cert, &self.persistence_client_key) {
            (Some(cert), Some(key)) => Some((
                read(cert, "--persistence-client-cert")?,
                read(key, "--persistence-client-key")?,
            )),
            _ => None,
        };
        Ok(Some(crate::grpc_store::ClientTls {
            ca: self
                .persistence_ca
                .as_ref()
                .map(|ca| read(ca, "--persistence-ca"))
                .transpose()?,
            identity,
        }))
    }
}

/// How WebSocket clients are served: shared by `secsync-gateway` and the embedded `secsync`.
#[derive(Debug, Clone, Args)]
pub struct SessionArgs {
    /// Access control mode (README.md "Access control").
    #[arg(long, env = "SECSYNC_AUTH", value_enum, default_value = "open")]
    pub auth: AuthMode,

    /// jwt: the key file: an Ed25519 public key in PEM (EdDSA), an HS256 secret (>= 32 bytes)
    /// or a JWKS document; re-read when it changes.
    #[arg(long, env = "SECSYNC_JWT_KEY_FILE")]
    pub jwt_key_file: Option<PathBuf>,

    /// jwt: seconds of clock skew tolerated on `exp` and `nbf` (a session ends this long after
    /// its token's `exp`).
    #[arg(long, env = "SECSYNC_JWT_LEEWAY_SECONDS", default_value_t = 0)]
    pub jwt_leeway_seconds: u64,

    /// jwt: required `iss` claim (not checked when unset).
    #[arg(long, env = "SECSYNC_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// jwt: required `aud` claim (not checked when unset).
    #[arg(long, env = "SECSYNC_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// callback: the URL the gateway POSTs {documentId, sessionKey} to.
    #[arg(long, env = "SECSYNC_AUTH_CALLBACK_URL")]
    pub auth_callback_url: Option<String>,

    /// callback: milliseconds to wait for the answer; no answer in time denies.
    #[arg(long, env = "SECSYNC_AUTH_CALLBACK_TIMEOUT_MS", default_value_t = 2000)]
    pub auth_callback_timeout_ms: u64,

    /// callback: decisions cached (the oldest is dropped first; 0 disables the cache).
    #[arg(
        long,
        env = "SECSYNC_AUTH_CALLBACK_CACHE_ENTRIES",
        default_value_t = 10_000
    )]
    pub auth_callback_cache_entries: usize,

    /// callback: longest time a decision is cached, whatever its `ttlSeconds`.
    #[arg(
        long,
        env = "SECSYNC_AUTH_CALLBACK_MAX_TTL_SECONDS",
        default_value_t = 300.0
    )]
    pub auth_callback_max_ttl_seconds: f64,

    /// Browser origins allowed to connect, comma-separated (e.g. `https://app.example.com`);
    /// others are refused at the upgrade with 403. Unset or `*`: every origin.
    #[arg(long, env = "SECSYNC_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Open connections per client address (the TCP peer); more are refused at the upgrade with
    /// 429. 0: no limit.
    #[arg(long, env = "SECSYNC_MAX_CONNECTIONS_PER_IP", default_value_t = 0)]
    pub max_connections_per_ip: usize,

    /// File holding the bearer token of `POST /admin/revoke`; without it there is no admin
    /// endpoint.
    #[arg(long, env = "SECSYNC_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// How long a revoked session id (or document) stays refused at connect.
    #[arg(
        long,
        env = "SECSYNC_REVOCATION_RETAIN_SECONDS",
        default_value_t = 86_400.0
    )]
    pub revocation_retain_seconds: f64,

    /// Most revocations remembered at once.
    #[arg(long, env = "SECSYNC_REVOCATION_MAX", default_value_t = 100_000)]
    pub revocation_max: usize,

    /// Path prefix in front of document ids (e.g. `/sync` behind an ingress).
    #[arg(long, env = "SECSYNC_PATH_PREFIX", default_value = "")]
    pub path_prefix: String,

    /// Largest WebSocket message (and frame) in bytes; larger ones close the connection (1009).
    #[arg(long, env = "SECSYNC_MAX_FRAME_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_frame_bytes: usize,

    /// Frames per second a connection may send (sustained); faster senders are slowed down.
    #[arg(long, env = "SECSYNC_RATE_PER_SECOND", default_value_t = 500)]
    pub rate_per_second: u32,

    /// Frames a connection may send in a burst above the sustained rate.
    #[arg(long, env = "SECSYNC_RATE_BURST", default_value_t = 1000)]
    pub rate_burst: u32,

    /// Most open connections; more are refused at the upgrade with 503.
    #[arg(long, env = "SECSYNC_MAX_CONNECTIONS", default_value_t = 20_000)]
    pub max_connections: usize,

    /// Frames queued for a client that does not read before it is disconnected (close 1013).
    #[arg(long, env = "SECSYNC_SEND_QUEUE", default_value_t = 1024)]
    pub send_queue: usize,

    /// How long a write is retried while persistence is unavailable before `*-save-failed`.
    #[arg(long, env = "SECSYNC_WRITE_RETRY_SECONDS", default_value_t = 10.0)]
    pub write_retry_seconds: f64,

    /// How long a shutdown waits for connections to finish their frames and close.
    #[arg(long, env = "SECSYNC_DRAIN_SECONDS", default_value_t = 20.0)]
    pub drain_seconds: f64,

    /// Seconds between WebSocket pings; a connection silent for two intervals is closed.
    #[arg(long, env = "SECSYNC_PING_SECONDS", default_value_t = 30.0)]
    pub ping_seconds: f64,

    /// Milliseconds live messages wait after a `document` with a snapshot until the client's
    /// first frame (works around a race in the JavaScript client; 0 disables it).
    #[arg(long, env = "SECSYNC_FIRST_DELIVERY_HOLD_MS", default_value_t = 500)]
    pub first_delivery_hold_ms: u64,

    /// Accept publicData fields beyond PROTOCOL.md 4 (they are signed and relayed as sent).
    #[arg(long, env = "SECSYNC_ALLOW_EXTRA_PUBLIC_DATA", default_value_t = false)]
    pub allow_extra_public_data: bool,

    /// Bodies above this size travel through NATS by reference (read back from persistence).
    #[arg(long, env = "SECSYNC_BUS_INLINE_MAX", default_value_t = 512 * 1024)]
    pub bus_inline_max: usize,

    /// Milliseconds a gap in a document's stream may stay open before it is read from persistence.
    #[arg(long, env = "SECSYNC_GAP_TIMEOUT_MS", default_value_t = 200)]
    pub gap_timeout_ms: u64,

    /// Seconds between checks of every open document's head sequence.
    #[arg(long, env = "SECSYNC_HEAD_CHECK_SECONDS", default_value_t = 5.0)]
    pub head_check_seconds: f64,

    /// Log format: `human` or `json`.
    #[arg(long, env = "SECSYNC_LOG_FORMAT", default_value = "human")]
    pub log_format: String,
}

impl SessionArgs {
    /// The per-connection limits these flags describe.
    pub fn limits(&self) -> Limits {
        Limits {
            max_frame_bytes: self.max_frame_bytes,
            rate_per_second: self.rate_per_second,
            rate_burst: self.rate_burst,
            max_connections: self.max_connections,
            send_queue: self.send_queue,
            write_retry: seconds(self.write_retry_seconds),
            ping_every: seconds(self.ping_seconds).max(Duration::from_secs(1)),
            first_delivery_hold: Duration::from_millis(self.first_delivery_hold_ms),
            parse_options: ParseOptions {
                allow_extra_public_data_fields: self.allow_extra_public_data,
            },
        }
    }

    /// The access control these flags select; an error names the flag that is missing or
    /// wrong (the binary stops).
    pub fn authorizer(&self) -> anyhow::Result<Arc<dyn Authorizer>> {
        Ok(match self.auth {
            AuthMode::Open => Arc::new(OpenAccess),
            AuthMode::Jwt => {
                let Some(key_file) = self.jwt_key_file.clone() else {
                    anyhow::bail!("--auth jwt needs --jwt-key-file");
                };
                Arc::new(JwtAuthorizer::new(JwtOptions {
                    key_file,
                    leeway_seconds: self.jwt_leeway_seconds,
                    issuer: self.jwt_issuer.clone(),
                    audience: self.jwt_audience.clone(),
                })?)
            }
            AuthMode::Callback => {
                let Some(url) = self.auth_callback_url.clone() else {
                    anyhow::bail!("--auth callback needs --auth-callback-url");
                };
                Arc::new(CallbackAuthorizer::new(CallbackOptions {
                    url,
                    timeout: Duration::from_millis(self.auth_callback_timeout_ms.max(1)),
                    cache_entries: self.auth_callback_cache_entries,
                    max_ttl: seconds(self.auth_callback_max_ttl_seconds),
                })?)
            }
        })
    }

    /// Admission, the admin endpoint and revocation memory.
    pub fn access_options(&self) -> anyhow::Result<AccessOptions> {
        if let Some(file) = &self.admin_token_file {
            let token = std::fs::read(file)
                .map_err(|e| anyhow::anyhow!("--admin-token-file {}: {e}", file.display()))?;
            anyhow::ensure!(
                token.iter().any(|b| !b.is_ascii_whitespace()),
                "--admin-token-file {} is empty",
                file.display()
            );
        }
        Ok(AccessOptions {
            allowed_origins: self.allowed_origins.clone(),
            max_connections_per_ip: self.max_connections_per_ip,
            admin_token_file: self.admin_token_file.clone(),
            revocation: RevocationOptions {
                retain: seconds(self.revocation_retain_seconds),
                max_remembered: self.revocation_max.max(1),
            },
        })
    }

    /// Warns loudly when `--auth open` serves more than this machine.
    pub fn warn_if_open(&self, listen: SocketAddr) {
        if self.auth == AuthMode::Open && !listen.ip().is_loopback() {
            tracing::warn!(
                listen = %listen,
                "--auth open on a non-loopback address: ANYONE who can reach it may read and \
                 write EVERY document; use --auth jwt or --auth callback outside development"
            );
        }
    }

    /// The fan-out tuning these flags describe.
    pub fn hub_options(&self) -> HubOptions {
        HubOptions {
            inbox_capacity: self.send_queue,
            gap_timeout: Duration::from_millis(self.gap_timeout_ms),
            head_check_every: seconds(self.head_check_seconds).max(Duration::from_millis(100)),
            inline_max: self.bus_inline_max,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    /// Any session key may read and write any document (development).
    Open,
    /// The session key is a signed JWT (--jwt-key-file).
    Jwt,
    /// The gateway asks the application over HTTP (--auth-callback-url).
    Callback,
}

/// Seconds from a flag, clamped to something a timer can hold.
pub fn seconds(value: f64) -> Duration {
    Duration::from_secs_f64(value.clamp(0.0, 86_400.0))
}
