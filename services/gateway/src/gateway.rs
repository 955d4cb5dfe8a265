//! The gateway's shared state: its parts (store, hub, auth, revocations), limits, admission,
//! readiness and shutdown.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use secsync_protocol::ParseOptions;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::{Origins, PerIp};
use crate::auth::Authorizer;
use crate::bus::Bus;
use crate::hub::Hub;
use crate::revocation::{Registry, RevocationOptions};
use crate::store::Store;

/// Access control beyond the authorizer: admission at the upgrade, the admin endpoint, and how
/// revocations are remembered.
#[derive(Debug, Clone, Default)]
pub struct AccessOptions {
    /// Browser origins allowed to connect (empty: all).
    pub allowed_origins: Vec<String>,
    /// Open connections per client address (0: no limit).
    pub max_connections_per_ip: usize,
    /// File holding the bearer token of `POST /admin/revoke` (`None`: no admin endpoint).
    pub admin_token_file: Option<std::path::PathBuf>,
    pub revocation: RevocationOptions,
}

/// Per-connection limits and choices.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_frame_bytes: usize,
    pub rate_per_second: u32,
    pub rate_burst: u32,
    pub max_connections: usize,
    pub send_queue: usize,
    pub write_retry: Duration,
    pub ping_every: Duration,
    /// Longest wait, after a `document` with a snapshot, before forwarding live messages (see
    /// `session::Session::run`).
    pub first_delivery_hold: Duration,
    pub parse_options: ParseOptions,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 32 * 1024 * 1024,
            rate_per_second: 500,
            rate_burst: 1000,
            max_connections: 20_000,
            send_queue: 1024,
            write_retry: Duration::from_secs(10),
            ping_every: Duration::from_secs(30),
            first_delivery_hold: Duration::from_millis(500),
            parse_options: ParseOptions::default(),
        }
    }
}

/// Everything a connection needs, shared.
pub struct Gateway {
    /// Distinct per process; part of request ids and bus origins.
    pub id: Arc<str>,
    pub store: Arc<dyn Store>,
    pub bus: Arc<dyn Bus>,
    pub hub: Hub,
    pub auth: Arc<dyn Authorizer>,
    /// Sessions that expire or can be revoked, and the revocations remembered.
    pub revocations: Arc<Registry>,
    pub origins: Origins,
    pub per_ip: Arc<PerIp>,
    pub admin_token_file: Option<std::path::PathBuf>,
    pub limits: Limits,
    pub path_prefix: String,
    /// Cancelled when the gateway starts draining.
    pub shutdown: CancellationToken,
    /// Every connection task, so a drain can wait for them.
    pub tasks: TaskTracker,
    pub connections: Arc<tokio::sync::Semaphore>,
    store_ok: AtomicBool,
    next_connection: AtomicU64,
    /// Keeps the open-connection count reported.
    connections_metric: std::sync::OnceLock<opentelemetry::metrics::ObservableUpDownCounter<i64>>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    pub fn new(
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
        auth: Arc<dyn Authorizer>,
        limits: Limits,
        hub_options: crate::hub::HubOptions,
        path_prefix: String,
        access: AccessOptions,
    ) -> Arc<Self> {
        let id: Arc<str> = format!("gw-{:016x}", rand::random::<u64>()).into();
        let store: Arc<dyn Store> = Arc::new(crate::store::Observed::new(store, id.clone()));
        let hub = Hub::new(id.clone(), store.clone(), bus.clone(), hub_options);
        let revocations = Registry::new(hub.clone(), access.revocation);
        let gateway = Arc::new(Self {
            id,
            store,
            bus,
            hub,
            auth,
            revocations,
            origins: Origins::new(&access.allowed_origins),
            per_ip: PerIp::new(access.max_connections_per_ip),
            admin_token_file: access.admin_token_file,
            limits,
            path_prefix,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            connections: Arc::new(tokio::sync::Semaphore::new(limits.max_connections)),
            store_ok: AtomicBool::new(false),
            next_connection: AtomicU64::new(1),
            connections_metric: std::sync::OnceLock::new(),
        });
        let weak = Arc::downgrade(&gateway);
        let _ = gateway
            .connections_metric
            .set(crate::metrics::observe_connections(move || {
                weak.upgrade().map_or(0, |g| {
                    i64::try_from(g.open_connections()).unwrap_or(i64::MAX)
                })
            }));
        // Readiness follows persistence; probe it in the background.
        let weak = Arc::downgrade(&gateway);
        tokio::spawn(async move {
            loop {
                let Some(gateway) = weak.upgrade() else {
                    return;
                };
                let ok = gateway.store.ready().await;
                gateway.store_ok.store(ok, Ordering::SeqCst);
                drop(gateway);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        gateway
    }

    pub fn next_connection(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }

    pub fn mark_store_unavailable(&self) {
        self.store_ok.store(false, Ordering::SeqCst);
    }

    /// Alive and able to serve: persistence and the bus reachable, not draining.
    pub fn ready(&self) -> bool {
        !self.shutdown.is_cancelled()
            && self.store_ok.load(Ordering::SeqCst)
            && self.bus.connected()
    }

    /// Open connections.
    pub fn open_connections(&self) -> usize {
        self.limits.max_connections - self.connections.available_permits()
    }
}
