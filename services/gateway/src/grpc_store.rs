//! The store over gRPC: calls the persistence service over every address its name resolves to
//! (a Kubernetes headless service lists one per pod), following changes of the name.
//!
//! Not tonic's `balance_channel`: that one keeps picking an address whose process is gone but
//! which is still in DNS (a stopped pod stays listed until its endpoints are updated), so about
//! one call in two failed. Here every address has its own lazily connected channel and a health
//! state: a call that fails at the connection level marks its address down, and a background
//! probe (the cheap `GetHeads([])`) marks it up again once it answers. Calls go round robin over
//! the addresses that are up; a call that failed at the connection level is tried once more on
//! another address that is up. That retry is safe: loads and reads are reads, and submissions
//! carry their request id, which persistence stores with the message (a UNIQUE column) and
//! answers a repeated one with the first outcome.
//!
//! Submissions go over one long-lived `Submit` stream per address rather than a unary call
//! each: a call per update (its HTTP/2 stream, headers, trailers and server task) cost more CPU
//! than the write itself (BENCHMARKS.md). A stream that ends or breaks fails the submissions
//! still waiting on it as a connection failure, which retries them as above.
//!
//! With an `https://` URL every connection is TLS, verified against the configured CA (or the
//! system's roots) for the URL's host name: addresses are dialled by IP, but the certificate
//! names the service, so the server name is the name from the URL, never the IP.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use secsync_protocol::{DocumentId, LoadMode, LoadRequest, ProofEntry, Reason, SnapshotId};
use secsync_rpc::v1 as pb;
use secsync_rpc::v1::persistence_client::PersistenceClient;
use tokio_stream::StreamExt as _;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::store::{
    Event, LoadHead, LoadPiece, Loaded, PieceSink, RequestId, Store, StoreError, SubmitKind,
    Submitted,
};

/// How the gateway reaches persistence.
#[derive(Debug, Clone)]
pub struct GrpcStoreOptions {
    /// `http://host:port` or `https://host:port`; the host may resolve to several addresses.
    pub url: String,
    /// TLS settings; needed with (and only with) an `https://` URL.
    pub tls: Option<ClientTls>,
    /// Largest gRPC message either way (frame limit plus room for the envelope).
    pub max_message_bytes: usize,
    /// Deadline of one call.
    pub call_timeout: Duration,
    /// How often the name is resolved again.
    pub resolve_every: Duration,
    /// How often an address that is down is probed.
    pub probe_every: Duration,
}

/// TLS towards persistence. Holds a private key, so its `Debug` shows only what is set.
#[derive(Clone, Default)]
pub struct ClientTls {
    /// PEM CA certificate(s) persistence's certificate must chain to; `None`: the system's roots.
    pub ca: Option<Vec<u8>>,
    /// PEM certificate and private key the gateway presents (mutual TLS).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca", &self.ca.is_some())
            .field("client_certificate", &self.identity.is_some())
            .finish()
    }
}

impl ClientTls {
    /// tonic's configuration, checked (certificates and key parse) so that a bad file is an
    /// error at start, not a failure of every call.
    fn config(&self, host: &str) -> Result<ClientTlsConfig, StoreError> {
        let mut config = ClientTlsConfig::new()
            .domain_name(host)
            // A peer that accepts TCP but never finishes the handshake.
            .timeout(Duration::from_secs(5));
        config = match &self.ca {
            Some(ca) => {
                if !String::from_utf8_lossy(ca).contains("-----BEGIN CERTIFICATE-----") {
                    return Err(StoreError::Failed(
                        "persistence CA: no PEM certificate in the file".into(),
                    ));
                }
                config.ca_certificate(Certificate::from_pem(ca))
            }
            None => config.with_native_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        Endpoint::from_static("https://127.0.0.1")
            .tls_config(config.clone())
            .map_err(|e| {
                StoreError::Failed(format!("persistence TLS: {:#}", anyhow::Error::new(e)))
            })?;
        Ok(config)
    }
}

/// One address of the persistence service.
#[derive(Debug)]
struct Replica {
    address: SocketAddr,
    client: PersistenceClient<Channel>,
    /// False after a connection-level failure, until a probe succeeds.
    up: AtomicBool,
    /// The `Submit` stream to this address, opened on first use and again after it ended.
    stream: std::sync::Mutex<Option<Link>>,
    /// Set when this address does not know `Submit` (a persistence older than this gateway,
    /// during a rolling upgrade): its submissions then go by the unary calls.
    unary: AtomicBool,
}

impl Replica {
    fn new(address: SocketAddr, client: PersistenceClient<Channel>) -> Self {
        Self {
            address,
            client,
            up: AtomicBool::new(true),
            stream: std::sync::Mutex::new(None),
            unary: AtomicBool::new(false),
        }
    }

    /// The open `Submit` stream, or a new one.
    fn link(&self) -> Link {
        let mut slot = self
            .stream
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(link) = slot.as_ref().filter(|link| link.waiting.is_open()) {
            return link.clone();
        }
        let link = Link::open(self.client.clone());
        *slot = Some(link.clone());
        link
    }

    fn mark_down(&self, status: &tonic::Status) {
        if self.up.swap(false, Ordering::SeqCst) {
            tracing::warn!(
                address = %self.address,
                error = %status.message(),
                "persistence address down"
            );
        }
    }
}

/// A `Submit` stream to one address: submissions go out tagged, a driver task hands each
/// answer to the submission waiting for its tag. When the stream ends or breaks, every
/// submission still waiting fails as a connection failure (and is retried on another address
/// with its request id), and the next submission opens a new stream.
#[derive(Debug, Clone)]
struct Link {
    requests: tokio::sync::mpsc::Sender<pb::SubmitRequest>,
    waiting: Arc<Waiting>,
}

/// Requests queued for a stream before it takes them; more wait (up to their deadline).
const LINK_QUEUE: usize = 1024;

/// HTTP/2 settings the gateway offers persistence (see [`Target::client`]).
const HTTP2_MAX_FRAME: u32 = 1 << 20;
const HTTP2_STREAM_WINDOW: u32 = 8 << 20;
const HTTP2_CONNECTION_WINDOW: u32 = 16 << 20;

/// What a submission gets back from a stream.
type Answer = Result<pb::SubmitResult, tonic::Status>;

/// Submissions of one stream waiting for their answers, by tag.
#[derive(Debug, Default)]
struct Waiting(std::sync::Mutex<Answers>);

#[derive(Debug, Default)]
struct Answers {
    /// Set once the stream has ended: nothing is registered any more.
    closed: bool,
    next_tag: u64,
    by_tag: std::collections::HashMap<u64, tokio::sync::oneshot::Sender<Answer>>,
}

impl Waiting {
    fn lock(&self) -> std::sync::MutexGuard<'_, Answers> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn is_open(&self) -> bool {
        !self.lock().closed
    }

    /// A tag and the receiver of its answer; `None` once the stream has ended.
    fn register(&self) -> Option<(u64, tokio::sync::oneshot::Receiver<Answer>)> {
        let mut answers = self.lock();
        if answers.closed {
            return None;
        }
        answers.next_tag += 1;
        let tag = answers.next_tag;
        let (sender, receiver) = tokio::sync::oneshot::channel();
        answers.by_tag.insert(tag, sender);
        Some((tag, receiver))
    }

    fn forget(&self, tag: u64) {
        self.lock().by_tag.remove(&tag);
    }

    fn answer(&self, result: pb::SubmitResult) {
        // Absent: its submission gave up (deadline) and forgot it.
        if let Some(sender) = self.lock().by_tag.remove(&result.tag) {
            let _ = sender.send(Ok(result));
        }
    }

    /// Ends the stream: every submission still waiting gets `status`.
    fn close(&self, status: &tonic::Status) {
        let waiting = {
            let mut answers = self.lock();
            answers.closed = true;
            std::mem::take(&mut answers.by_tag)
        };
        for sender in waiting.into_values() {
            let _ = sender.send(Err(status.clone()));
        }
    }
}

impl Link {
    /// Starts a stream on `client`; its driver runs until the stream ends (persistence ends
    /// it, the connection breaks, or every clone of the link is dropped and with them the
    /// request side).
    fn open(mut client: PersistenceClient<Channel>) -> Self {
        let (requests, queued) = tokio::sync::mpsc::channel(LINK_QUEUE);
        let waiting = Arc::new(Waiting::default());
        let driven = waiting.clone();
        tokio::spawn(async move {
            let stream = tokio_stream::wrappers::ReceiverStream::new(queued);
            let ended = match client.submit(stream).await {
                Err(status) => status,
                Ok(response) => {
                    let mut answers = response.into_inner();
                    loop {
                        match answers.message().await {
                            Ok(Some(result)) => driven.answer(result),
                            Ok(None) => {
                                break tonic::Status::unavailable(
                                    "persistence ended the submit stream",
                                )
                            }
                            Err(status) => break status,
                        }
                    }
                }
            };
            tracing::debug!(error = %ended.message(), "submit stream ended");
            driven.close(&ended);
        });
        Self { requests, waiting }
    }

    /// Sends `request` and waits for its answer, at most `timeout`. A failure of the stream is
    /// a status (which the caller treats as a connection failure); the deadline is not one.
    async fn send(
        &self,
        mut request: pb::SubmitRequest,
        timeout: Duration,
    ) -> Result<pb::SubmitResult, Failure> {
        let ended = || tonic::Status::unavailable("the submit stream ended");
        let Some((tag, answer)) = self.waiting.register() else {
            return Err(Failure::Connection(ended()));
        };
        request.tag = tag;
        let exchange = async {
            self.requests.send(request).await.map_err(|_| ended())?;
            answer.await.map_err(|_| ended())?
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(status)) => Err(Failure::Connection(status)),
            Err(_) => {
                self.waiting.forget(tag);
                Err(Failure::Store(StoreError::Unavailable(
                    "persistence did not answer in time".into(),
                )))
            }
        }
    }
}

/// The addresses the name resolves to now.
#[derive(Debug)]
struct Pool {
    replicas: RwLock<Arc<[Arc<Replica>]>>,
    /// Counts resolutions that changed the set; calls made before the first one wait for it.
    resolved: tokio::sync::watch::Sender<u64>,
    next: AtomicUsize,
}

impl Pool {
    fn snapshot(&self) -> Arc<[Arc<Replica>]> {
        match self.replicas.read() {
            Ok(replicas) => replicas.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The next address that is up, round robin, other than `not`. When none is up, a first
    /// attempt (`not` is `None`) still takes one: it fails as fast as before, and succeeds as
    /// soon as the address is back even if no probe has noticed yet.
    fn pick(&self, not: Option<SocketAddr>) -> Option<Arc<Replica>> {
        let replicas = self.snapshot();
        if replicas.is_empty() {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let count = replicas.len();
        let candidates = (0..count).map(|i| &replicas[(start + i) % count]);
        for replica in candidates.clone() {
            if replica.up.load(Ordering::SeqCst) && Some(replica.address) != not {
                return Some(replica.clone());
            }
        }
        if not.is_some() {
            return None;
        }
        candidates.into_iter().next().cloned()
    }
}

/// The gRPC store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct GrpcStore {
    pool: Arc<Pool>,
    call_timeout: Duration,
}

/// Why one attempt failed.
#[derive(Debug)]
enum Failure {
    /// The address could not be reached, or the connection broke: another address may serve.
    Connection(tonic::Status),
    /// Anything else, the same on every address.
    Store(StoreError),
}

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Self {
        if connection_failure(&status) {
            Self::Connection(status)
        } else {
            Self::Store(store_error(&status))
        }
    }
}

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Self {
        Self::Store(error)
    }
}

/// Whether a status comes from the connection rather than from the service: statuses the
/// server sends carry no source error, the client's own transport errors do. Our own deadline
/// is not one (a slow server is not a gone server).
fn connection_failure(status: &tonic::Status) -> bool {
    use std::error::Error as _;
    use tonic::Code;
    let mut source = status.source();
    if source.is_none() {
        return false;
    }
    while let Some(error) = source {
        if error.is::<tonic::TimeoutExpired>() {
            return false;
        }
        source = error.source();
    }
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal
    )
}

/// Where and how persistence is reached: the URL's host and port, and TLS.
#[derive(Debug, Clone)]
struct Target {
    host: String,
    port: u16,
    /// For `https://` URLs.
    tls: Option<ClientTlsConfig>,
}

impl Target {
    fn parse(options: &GrpcStoreOptions) -> Result<Self, StoreError> {
        let url = &options.url;
        let bad = |why: &str| StoreError::Failed(format!("bad persistence url {url:?}: {why}"));
        let uri: tonic::transport::Uri = url.parse().map_err(|e| bad(&format!("{e}")))?;
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        // An IPv6 literal comes bracketed; the resolver and the TLS server name want it bare.
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let tls = match (uri.scheme_str(), &options.tls) {
            (Some("http"), None) => None,
            (Some("http"), Some(_)) => {
                return Err(bad("TLS settings need an https:// url"));
            }
            (Some("https"), tls) => Some(tls.clone().unwrap_or_default().config(&host)?),
            _ => return Err(bad("the scheme must be http:// or https://")),
        };
        Ok(Self {
            host,
            port: uri.port_u16().unwrap_or(50051),
            tls,
        })
    }

    /// A lazily connected client for one resolved address.
    fn client(
        &self,
        address: SocketAddr,
        options: &GrpcStoreOptions,
    ) -> Result<PersistenceClient<Channel>, tonic::transport::Error> {
        let mut endpoint = Endpoint::from_shared(match self.tls {
            Some(_) => format!("https://{address}"),
            None => format!("http://{address}"),
        })?;
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone())?;
        }
        let channel = endpoint
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            // A peer that vanished without closing (a stopped machine) is noticed by pings
            // instead of by the next call's deadline.
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            // A 10,000-update load is megabytes: in HTTP/2's default 16 KiB frames under
            // hyper's 2 MiB stream window it crossed in ~300 frames. These (set together) took
            // its transfer from ~2.9 to ~1.8 ms here; a window only permits, and a load is
            // bounded by the message limit.
            .max_frame_size(HTTP2_MAX_FRAME)
            .initial_stream_window_size(HTTP2_STREAM_WINDOW)
            .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
            .connect_lazy();
        Ok(PersistenceClient::new(channel)
            .max_decoding_message_size(options.max_message_bytes)
            .max_encoding_message_size(options.max_message_bytes))
    }
}

impl GrpcStore {
    /// Starts resolving the name and probing addresses that are down; connects lazily.
    pub fn new(options: &GrpcStoreOptions) -> Result<Self, StoreError> {
        let target = Target::parse(options)?;
        let pool = Arc::new(Pool {
            replicas: RwLock::new(Arc::from(Vec::new())),
            resolved: tokio::sync::watch::channel(0).0,
            next: AtomicUsize::new(0),
        });
        tokio::spawn(maintain(Arc::downgrade(&pool), target, options.clone()));
        Ok(Self {
            pool,
            call_timeout: options.call_timeout,
        })
    }

    /// An address for a first attempt; before the name's first resolution, waits for it.
    async fn replica(&self) -> Result<Arc<Replica>, StoreError> {
        let mut resolved = self.pool.resolved.subscribe();
        let wait = tokio::time::timeout(self.call_timeout, async {
            loop {
                if let Some(replica) = self.pool.pick(None) {
                    return Some(replica);
                }
                resolved.changed().await.ok()?;
            }
        });
        wait.await.ok().flatten().ok_or_else(|| {
            StoreError::Unavailable("the persistence name resolves to no address".into())
        })
    }

    /// Runs `attempt` on an address that is up; after a connection-level failure, once more on
    /// another one (see the module's documentation for why that is safe).
    async fn call<T, F, Fut>(&self, attempt: F) -> Result<T, StoreError>
    where
        F: Fn(Arc<Replica>) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let first = self.replica().await?;
        let status = match attempt(first.clone()).await {
            Ok(value) => return Ok(value),
            Err(Failure::Store(error)) => return Err(error),
            Err(Failure::Connection(status)) => status,
        };
        first.mark_down(&status);
        let Some(second) = self.pool.pick(Some(first.address)) else {
            return Err(store_error(&status));
        };
        tracing::debug!(
            from = %first.address,
            to = %second.address,
            "retrying on another persistence address"
        );
        match attempt(second.clone()).await {
            Ok(value) => Ok(value),
            Err(Failure::Store(error)) => Err(error),
            Err(Failure::Connection(status)) => {
                second.mark_down(&status);
                Err(store_error(&status))
            }
        }
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.call_timeout);
        // The caller's trace continues in persistence.
        let metadata = request.metadata_mut();
        secsync_telemetry::propagation::inject(&tracing::Span::current(), |key, value| {
            if let (Ok(key), Ok(value)) = (
                tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
                value.parse(),
            ) {
                metadata.insert(key, value);
            }
        });
        request
    }
}

/// Follows the name (every `resolve_every`) and probes addresses that are down (every
/// `probe_every`), until the store is dropped.
async fn maintain(pool: Weak<Pool>, target: Target, options: GrpcStoreOptions) {
    use tokio::time::MissedTickBehavior;
    let mut resolve = tokio::time::interval(options.resolve_every);
    let mut probe = tokio::time::interval(options.probe_every);
    resolve.set_missed_tick_behavior(MissedTickBehavior::Delay);
    probe.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let probe_timeout = options.call_timeout.min(Duration::from_secs(2));
    let mut resolving = true;
    loop {
        tokio::select! {
            _ = resolve.tick() => {
                match tokio::net::lookup_host((target.host.as_str(), target.port)).await {
                    Ok(addresses) => {
                        resolving = true;
                        let Some(pool) = pool.upgrade() else { return };
                        update(&pool, &addresses.collect(), &target, &options);
                    }
                    // Keep the addresses we have: a name that fails to resolve for a moment
                    // (DNS trouble, no pod ready) should not stop the calls that would succeed.
                    Err(error) => {
                        if resolving {
                            tracing::warn!(host = %target.host, %error, "cannot resolve persistence");
                        }
                        resolving = false;
                    }
                }
            }
            _ = probe.tick() => {
                let Some(pool) = pool.upgrade() else { return };
                probe_down(&pool, probe_timeout).await;
            }
        }
    }
}

/// Makes the pool the resolved addresses, keeping the channels and states of those it had.
fn update(
    pool: &Pool,
    addresses: &std::collections::BTreeSet<SocketAddr>,
    target: &Target,
    options: &GrpcStoreOptions,
) {
    let current = pool.snapshot();
    if current
        .iter()
        .map(|r| r.address)
        .eq(addresses.iter().copied())
    {
        return;
    }
    let mut replicas = Vec::with_capacity(addresses.len());
    for &address in addresses {
        if let Some(known) = current.iter().find(|r| r.address == address) {
            replicas.push(known.clone());
            continue;
        }
        match target.client(address, options) {
            Ok(client) => replicas.push(Arc::new(Replica::new(address, client))),
            Err(error) => tracing::warn!(%address, %error, "cannot use persistence address"),
        }
    }
    tracing::info!(addresses = ?addresses, "persistence addresses");
    match pool.replicas.write() {
        Ok(mut slot) => *slot = replicas.into(),
        Err(poisoned) => *poisoned.into_inner() = replicas.into(),
    }
    pool.resolved.send_modify(|n| *n += 1);
}

/// Asks every address that is down whether it answers again.
async fn probe_down(pool: &Pool, timeout: Duration) {
    let down: Vec<Arc<Replica>> = pool
        .snapshot()
        .iter()
        .filter(|r| !r.up.load(Ordering::SeqCst))
        .cloned()
        .collect();
    futures::future::join_all(down.into_iter().map(|replica| async move {
        let mut request = tonic::Request::new(pb::GetHeadsRequest {
            document_ids: Vec::new(),
        });
        request.set_timeout(timeout);
        if replica.client.clone().get_heads(request).await.is_ok()
            && !replica.up.swap(true, Ordering::SeqCst)
        {
            tracing::info!(address = %replica.address, "persistence address up again");
        }
    }))
    .await;
}

/// The one mapping of gRPC statuses to store errors.
fn store_error(status: &tonic::Status) -> StoreError {
    use tonic::Code;
    match status.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Unknown
        | Code::ResourceExhausted
        | Code::Aborted => StoreError::Unavailable(status.message().to_owned()),
        _ => StoreError::Failed(format!("{:?}: {}", status.code(), status.message())),
    }
}

fn proof_entry(entry: pb::ProofEntry) -> Result<ProofEntry, StoreError> {
    Ok(ProofEntry {
        snapshot_id: SnapshotId::parse(&entry.snapshot_id)
            .map_err(|e| StoreError::Failed(format!("chain entry: {e}")))?,
        parent_snapshot_proof: entry.parent_snapshot_proof,
        snapshot_ciphertext_hash: entry.snapshot_ciphertext_hash,
    })
}

fn submitted(response: pb::SubmitResponse) -> Result<Submitted, StoreError> {
    match response.result {
        Some(pb::submit_response::Result::Accepted(a)) => Ok(Submitted::Accepted {
            sequence: a.sequence,
        }),
        Some(pb::submit_response::Result::Rejected(r)) => Ok(Submitted::Rejected {
            reason: Reason::from_code(&r.reason)
                .ok_or_else(|| StoreError::Failed(format!("unknown reason {}", r.reason)))?,
            sequence: r.sequence,
        }),
        None => Err(StoreError::Failed("empty submit response".into())),
    }
}

/// One attempt of each call, on one address.
impl GrpcStore {
    async fn load_from(
        &self,
        mut client: PersistenceClient<Channel>,
        message: pb::LoadDocumentRequest,
    ) -> Result<Loaded, Failure> {
        use pb::load_document_chunk::Part;
        let mut stream = client
            .load_document(self.request(message))
            .await?
            .into_inner();
        let mut loaded = Loaded::default();
        // Pieces of the snapshot body: one piece is used as it arrived, more are joined.
        let mut snapshot = Vec::new();
        let mut has_snapshot = false;
        while let Some(chunk) = stream.next().await {
            match chunk?.part {
                Some(Part::Header(h)) => {
                    let count = usize::try_from(h.update_count).unwrap_or(0);
                    let head = load_head(h)?;
                    loaded.found = head.found;
                    loaded.sequence = head.sequence;
                    loaded.active_snapshot_id = head.active_snapshot_id;
                    has_snapshot = head.has_snapshot;
                    loaded.updates.reserve(count);
                    loaded.chain = head.chain;
                }
                Some(Part::SnapshotPart(part)) => snapshot.push(part),
                Some(Part::Updates(batch)) => loaded.updates.extend(batch.bodies),
                None => {}
            }
        }
        if has_snapshot {
            loaded.snapshot = Some(match <[Bytes; 1]>::try_from(snapshot) {
                Ok([one]) => one,
                Err(parts) => Bytes::from(parts.concat()),
            });
        }
        Ok(loaded)
    }

    /// [`load_from`](Self::load_from), handing pieces to `out` as they arrive. A failure after
    /// the first piece went out is not retried elsewhere (`handed`).
    async fn load_pieces_from(
        &self,
        mut client: PersistenceClient<Channel>,
        message: pb::LoadDocumentRequest,
        out: PieceSink<'_>,
        handed: &AtomicBool,
    ) -> Result<(), Failure> {
        use pb::load_document_chunk::Part;
        let result = async {
            let mut stream = client
                .load_document(self.request(message))
                .await?
                .into_inner();
            while let Some(chunk) = stream.next().await {
                let piece = match chunk?.part {
                    Some(Part::Header(h)) => LoadPiece::Head(load_head(h)?),
                    Some(Part::SnapshotPart(part)) => LoadPiece::Snapshot(part),
                    Some(Part::Updates(batch)) => LoadPiece::Updates(batch.bodies),
                    None => continue,
                };
                handed.store(true, Ordering::Relaxed);
                out(piece);
            }
            Ok::<(), Failure>(())
        }
        .await;
        match result {
            Err(Failure::Connection(status)) if handed.load(Ordering::Relaxed) => {
                Err(Failure::Store(store_error(&status)))
            }
            other => other,
        }
    }

    /// One submission on `replica`: over its `Submit` stream, or by a unary call when it does
    /// not know the stream.
    async fn submit_on(
        &self,
        replica: &Replica,
        kind: SubmitKind,
        document_id: String,
        body: String,
        request_id: pb::RequestId,
    ) -> Result<Submitted, Failure> {
        if replica.unary.load(Ordering::Relaxed) {
            return self
                .submit_unary(replica.client.clone(), kind, document_id, body, request_id)
                .await;
        }
        let mut request = pb::SubmitRequest {
            tag: 0,
            kind: match kind {
                SubmitKind::Snapshot => pb::SubmitKind::Snapshot,
                SubmitKind::Update => pb::SubmitKind::Update,
            } as i32,
            document_id,
            body,
            request_id: Some(request_id),
            trace_context: std::collections::HashMap::new(),
        };
        // The caller's trace continues in persistence.
        secsync_telemetry::propagation::inject(&tracing::Span::current(), |key, value| {
            request.trace_context.insert(key.to_owned(), value);
        });
        let answer = match replica.link().send(request, self.call_timeout).await {
            Err(Failure::Connection(status)) if status.code() == tonic::Code::Unimplemented => {
                tracing::info!(
                    address = %replica.address,
                    "persistence does not know the submit stream; using unary calls"
                );
                replica.unary.store(true, Ordering::Relaxed);
                return Err(Failure::Store(StoreError::Unavailable(
                    "persistence does not know the submit stream".into(),
                )));
            }
            other => other?,
        };
        match answer.result {
            Some(pb::submit_result::Result::Decided(response)) => Ok(submitted(response)?),
            Some(pb::submit_result::Result::Error(e)) => Err(Failure::Store(store_error(
                &tonic::Status::new(tonic::Code::from_i32(e.code), e.message),
            ))),
            None => Err(Failure::Store(StoreError::Failed(
                "empty submit result".into(),
            ))),
        }
    }

    async fn submit_unary(
        &self,
        mut client: PersistenceClient<Channel>,
        kind: SubmitKind,
        document_id: String,
        body: String,
        request_id: pb::RequestId,
    ) -> Result<Submitted, Failure> {
        let response = match kind {
            SubmitKind::Snapshot => {
                client
                    .submit_snapshot(self.request(pb::SubmitSnapshotRequest {
                        document_id,
                        body,
                        request_id: Some(request_id),
                    }))
                    .await?
            }
            SubmitKind::Update => {
                client
                    .submit_update(self.request(pb::SubmitUpdateRequest {
                        document_id,
                        body,
                        request_id: Some(request_id),
                    }))
                    .await?
            }
        };
        Ok(submitted(response.into_inner())?)
    }

    async fn events_from(
        &self,
        mut client: PersistenceClient<Channel>,
        message: pb::ReadEventsRequest,
    ) -> Result<Vec<Event>, Failure> {
        let mut stream = client
            .read_events(self.request(message))
            .await?
            .into_inner();
        let mut events = Vec::new();
        while let Some(chunk) = stream.next().await {
            for event in chunk?.events {
                let kind = if event.kind == pb::EventKind::Snapshot as i32 {
                    SubmitKind::Snapshot
                } else {
                    SubmitKind::Update
                };
                events.push(Event {
                    sequence: event.sequence,
                    kind,
                    body: event.body,
                });
            }
        }
        Ok(events)
    }

    async fn heads_from(
        &self,
        mut client: PersistenceClient<Channel>,
        message: pb::GetHeadsRequest,
    ) -> Result<pb::GetHeadsResponse, Failure> {
        Ok(client.get_heads(self.request(message)).await?.into_inner())
    }
}

/// A load's header as the gateway keeps it.
fn load_head(h: pb::LoadHeader) -> Result<LoadHead, StoreError> {
    Ok(LoadHead {
        found: h.found,
        sequence: h.sequence,
        active_snapshot_id: h
            .active_snapshot_id
            .map(|s| SnapshotId::parse(&s))
            .transpose()
            .map_err(|e| StoreError::Failed(format!("active snapshot id: {e}")))?,
        has_snapshot: h.has_snapshot,
        chain: if h.has_chain {
            Some(
                h.chain
                    .into_iter()
                    .map(proof_entry)
                    .collect::<Result<_, _>>()?,
            )
        } else {
            None
        },
    })
}

fn load_message(doc: &DocumentId, request: &LoadRequest, create: bool) -> pb::LoadDocumentRequest {
    pb::LoadDocumentRequest {
        document_id: doc.as_str().to_owned(),
        mode: match request.mode {
            LoadMode::Complete => pb::LoadMode::Complete,
            LoadMode::Delta => pb::LoadMode::Delta,
        } as i32,
        known_snapshot_id: request
            .known_snapshot_id
            .as_ref()
            .map(|s| s.as_str().to_owned()),
        known_clocks: request
            .known_clocks
            .iter()
            .map(|(k, v)| (k.clone(), v.get()))
            .collect(),
        create,
    }
}

#[async_trait]
impl Store for GrpcStore {
    async fn load(
        &self,
        doc: &DocumentId,
        request: &LoadRequest,
        create: bool,
    ) -> Result<Loaded, StoreError> {
        let message = load_message(doc, request, create);
        self.call(move |replica| self.load_from(replica.client.clone(), message.clone()))
            .await
    }

    async fn load_pieces(
        &self,
        doc: &DocumentId,
        request: &LoadRequest,
        create: bool,
        out: PieceSink<'_>,
    ) -> Result<(), StoreError> {
        let message = load_message(doc, request, create);
        let handed = AtomicBool::new(false);
        self.call(|replica| {
            self.load_pieces_from(replica.client.clone(), message.clone(), out, &handed)
        })
        .await
    }

    async fn submit(
        &self,
        doc: &DocumentId,
        kind: SubmitKind,
        body: &str,
        request_id: &RequestId,
    ) -> Result<Submitted, StoreError> {
        // The same request id on every attempt: persistence answers a repeat with the first
        // outcome.
        let id = pb::RequestId {
            gateway: request_id.gateway.clone(),
            connection: request_id.connection,
            frame: request_id.frame,
        };
        self.call(|replica| {
            let id = id.clone();
            async move {
                self.submit_on(&replica, kind, doc.as_str().to_owned(), body.to_owned(), id)
                    .await
            }
        })
        .await
    }

    async fn events_after(
        &self,
        doc: &DocumentId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<Event>, StoreError> {
        let message = pb::ReadEventsRequest {
            document_id: doc.as_str().to_owned(),
            after_sequence: after,
            limit,
        };
        self.call(move |replica| self.events_from(replica.client.clone(), message.clone()))
            .await
    }

    async fn heads(&self, docs: &[DocumentId]) -> Result<Vec<(DocumentId, u64)>, StoreError> {
        let message = pb::GetHeadsRequest {
            document_ids: docs.iter().map(|d| d.as_str().to_owned()).collect(),
        };
        let response = self
            .call(move |replica| self.heads_from(replica.client.clone(), message.clone()))
            .await?;
        Ok(docs
            .iter()
            .map(|d| {
                (
                    d.clone(),
                    response.heads.get(d.as_str()).copied().unwrap_or(0),
                )
            })
            .collect())
    }

    async fn ready(&self) -> bool {
        self.heads(&[]).await.is_ok()
    }
}
