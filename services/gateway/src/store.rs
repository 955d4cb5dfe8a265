//! The **store** seam: what a gateway needs from persistence.
//!
//! [`GrpcStore`](crate::grpc_store::GrpcStore) calls the persistence service; the embedded
//! binary plugs the persistence core in directly (`secsync::CoreStore`). Rejections are values
//! ([`Submitted::Rejected`]), failures of the call itself are [`StoreError`]s.

use async_trait::async_trait;
use bytes::Bytes;
use secsync_protocol::{DocumentId, LoadRequest, ProofEntry, SnapshotId};

/// A call to persistence failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Persistence (or its database) cannot be reached now; retrying may help.
    #[error("persistence unavailable: {0}")]
    Unavailable(String),
    /// Anything else; retrying will not help.
    #[error("persistence error: {0}")]
    Failed(String),
}

// One definition of what a store answers, shared with the persistence core (which the embedded
// binary plugs in here directly); the gateway's names for them.
pub use secsync_protocol::{Kind as SubmitKind, LoadedDocument as Loaded, Outcome as Submitted};

/// Identifies one client frame, so a retried submission returns its first result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId {
    pub gateway: String,
    pub connection: u64,
    pub frame: u64,
}

/// The stored form, `gateway/connection/frame` (the persistence service's gRPC layer writes the
/// same, so a retry through either path finds the first result).
impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.gateway, self.connection, self.frame)
    }
}

/// An accepted message read back for gap repair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub sequence: u64,
    pub kind: SubmitKind,
    pub body: String,
}

/// What a load found, ahead of its bodies ([`Store::load_pieces`]).
#[derive(Debug, Clone, Default)]
pub struct LoadHead {
    pub found: bool,
    pub sequence: u64,
    pub active_snapshot_id: Option<SnapshotId>,
    /// A snapshot body follows (in one or more [`LoadPiece::Snapshot`]).
    pub has_snapshot: bool,
    /// `None`: the `document` frame has no `snapshotProofChain` field.
    pub chain: Option<Vec<ProofEntry>>,
}

/// A load as it arrives: the head first, then the snapshot body's parts, then update bodies
/// in version order.
#[derive(Debug)]
pub enum LoadPiece {
    Head(LoadHead),
    Snapshot(Bytes),
    Updates(Vec<Bytes>),
}

/// Where [`Store::load_pieces`] hands the pieces.
pub type PieceSink<'a> = &'a (dyn Fn(LoadPiece) + Send + Sync);

#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn load(
        &self,
        doc: &DocumentId,
        request: &LoadRequest,
        create: bool,
    ) -> Result<Loaded, StoreError>;

    /// [`load`](Store::load), handing the result to `out` in pieces as they arrive, so that a
    /// large document's first bytes can go to the client before its last arrive. A store
    /// may retry only until it has handed out the first piece. This default loads whole.
    async fn load_pieces(
        &self,
        doc: &DocumentId,
        request: &LoadRequest,
        create: bool,
        out: PieceSink<'_>,
    ) -> Result<(), StoreError> {
        let loaded = self.load(doc, request, create).await?;
        out(LoadPiece::Head(LoadHead {
            found: loaded.found,
            sequence: loaded.sequence,
            active_snapshot_id: loaded.active_snapshot_id,
            has_snapshot: loaded.snapshot.is_some(),
            chain: loaded.chain,
        }));
        if let Some(snapshot) = loaded.snapshot {
            out(LoadPiece::Snapshot(snapshot));
        }
        if !loaded.updates.is_empty() {
            out(LoadPiece::Updates(loaded.updates));
        }
        Ok(())
    }

    async fn submit(
        &self,
        doc: &DocumentId,
        kind: SubmitKind,
        body: &str,
        request_id: &RequestId,
    ) -> Result<Submitted, StoreError>;

    /// Accepted messages after `after`, in order, at most `limit`.
    async fn events_after(
        &self,
        doc: &DocumentId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<Event>, StoreError>;

    /// Head sequence numbers (0 for unknown documents).
    async fn heads(&self, docs: &[DocumentId]) -> Result<Vec<(DocumentId, u64)>, StoreError>;

    /// Whether persistence answers now (readiness).
    async fn ready(&self) -> bool;
}

/// Any store with a span and a duration measurement around every call (the spans are the
/// gateway's side of a trace into persistence; the gRPC store carries their context along).
pub struct Observed {
    inner: std::sync::Arc<dyn Store>,
    gateway: std::sync::Arc<str>,
}

impl Observed {
    /// `gateway` (the gateway's id) is recorded on every span.
    pub fn new(inner: std::sync::Arc<dyn Store>, gateway: std::sync::Arc<str>) -> Self {
        Self { inner, gateway }
    }

    async fn observe<T>(
        &self,
        operation: &'static str,
        doc: &DocumentId,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        observe(operation, &self.gateway, doc, call).await
    }
}

impl std::fmt::Debug for Observed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observed").finish_non_exhaustive()
    }
}

/// Runs `call` in a client span named after the operation and records its duration.
async fn observe<T>(
    operation: &'static str,
    gateway: &str,
    doc: &DocumentId,
    call: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    use tracing::Instrument as _;
    let span = tracing::info_span!(
        "store",
        otel.name = operation,
        otel.kind = "client",
        rpc.system = "grpc",
        rpc.service = "secsync.persistence.v1.Persistence",
        rpc.method = operation,
        gateway,
        doc = doc.as_str(),
    );
    let started = std::time::Instant::now();
    let result = call.instrument(span).await;
    crate::metrics::metrics().store_call(
        operation,
        result.is_ok(),
        started.elapsed().as_secs_f64(),
    );
    result
}

#[async_trait]
impl Store for Observed {
    async fn load(
        &self,
        doc: &DocumentId,
        request: &LoadRequest,
        create: bool,
    ) -> Result<Loaded, StoreError> {
        self.observe("LoadDocument", doc, self.inner.load(doc, request, create))
            .await
    }

    async fn load_pieces(
        &self,
        doc: &DocumentId,
        request: &LoadRequest,
        create: bool,
        out: PieceSink<'_>,
    ) -> Result<(), StoreError> {
        self.observe(
            "LoadDocument",
            doc,
            self.inner.load_pieces(doc, request, create, out),
        )
        .await
    }

    async fn submit(
        &self,
        doc: &DocumentId,
        kind: SubmitKind,
        body: &str,
        request_id: &RequestId,
    ) -> Result<Submitted, StoreError> {
        let operation = match kind {
            SubmitKind::Snapshot => "SubmitSnapshot",
            SubmitKind::Update => "SubmitUpdate",
        };
        self.observe(
            operation,
            doc,
            self.inner.submit(doc, kind, body, request_id),
        )
        .await
    }

    async fn events_after(
        &self,
        doc: &DocumentId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<Event>, StoreError> {
        self.observe(
            "ReadEvents",
            doc,
            self.inner.events_after(doc, after, limit),
        )
        .await
    }

    async fn heads(&self, docs: &[DocumentId]) -> Result<Vec<(DocumentId, u64)>, StoreError> {
        // Periodic and frequent: measured, but no span per call.
        let started = std::time::Instant::now();
        let result = self.inner.heads(docs).await;
        crate::metrics::metrics().store_call(
            "GetHeads",
            result.is_ok(),
            started.elapsed().as_secs_f64(),
        );
        result
    }

    async fn ready(&self) -> bool {
        self.inner.ready().await
    }
}
