//! The storage-backend interface the persistence core runs on.
//!
//! A backend stores rows and takes locks; it decides nothing. The core (see [`crate::core`])
//! opens a [`WriteTx`], locks the documents of a batch, asks the protocol crate's rules about each
//! message and writes what they accept. A batch of updates that the core's cached rule states
//! decide is written by [`Backend::append_updates`] instead, on the condition that no document
//! moved meanwhile. Loads go through a [`ReadTx`], one consistent view of the database.
//! Postgres ([`crate::postgres`]) and SQLite ([`crate::sqlite`], for the embedded single-node
//! binary) implement the same traits; the core does not know which it runs on.

use std::collections::HashMap;
use std::future::Future;

use bytes::Bytes;
use secsync_protocol::{Clock, DocumentId, DocumentState, ProofEntry, SnapshotId};

/// Why a backend call failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The database cannot be reached or is restarting: fail fast, the caller may retry.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// Anything else (a constraint the core should have prevented, a bug).
    #[error("database error: {0}")]
    Other(String),
}

/// A document's row, read under its lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentHead {
    pub head_seq: u64,
    pub active_snapshot_id: Option<SnapshotId>,
}

/// A snapshot to store.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotRow<'a> {
    pub document_id: &'a DocumentId,
    pub id: &'a SnapshotId,
    pub seq: u64,
    pub parent_id: Option<&'a SnapshotId>,
    pub ciphertext_hash: &'a str,
    pub parent_snapshot_proof: &'a str,
    pub body: &'a str,
    pub request_id: Option<&'a str>,
}

/// An update to store.
#[derive(Debug, Clone, Copy)]
pub struct UpdateRow<'a> {
    pub document_id: &'a DocumentId,
    pub snapshot_id: &'a SnapshotId,
    pub seq: u64,
    pub version: u64,
    pub pub_key: &'a str,
    pub clock: Clock,
    pub body: &'a str,
    pub request_id: Option<&'a str>,
}

/// An update as read back for a load.
#[derive(Debug, Clone)]
pub struct StoredUpdate {
    pub pub_key: String,
    pub clock: Clock,
    /// Shared bytes of the stored UTF-8 text: loads hand it on without copying.
    pub body: Bytes,
}

/// An accepted message as read back for gap repair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub seq: u64,
    pub kind: EventKind,
    pub body: String,
}

/// Which kind of message an event is (the protocol crate's one definition).
pub use secsync_protocol::Kind as EventKind;

/// A database the core can run on.
pub trait Backend: Send + Sync + 'static {
    type Write: WriteTx;
    type Read: ReadTx;

    /// The database's name in OpenTelemetry's `db.system.name` (`postgresql`, `sqlite`).
    const DB_SYSTEM: &'static str;

    /// Creates the listed documents when they do not exist (its own short transaction).
    fn ensure_documents(
        &self,
        ids: &[&DocumentId],
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    fn begin_write(&self) -> impl Future<Output = Result<Self::Write, BackendError>> + Send;

    /// A read-only transaction that sees one consistent state of the database.
    fn begin_read(&self) -> impl Future<Output = Result<Self::Read, BackendError>> + Send;

    /// Accepted messages of a document after `after_seq`, in sequence order.
    fn events_after(
        &self,
        doc: &DocumentId,
        after_seq: u64,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<StoredEvent>, BackendError>> + Send;

    /// A document's row, read alone (no transaction): a load whose head is in the load cache
    /// needs nothing else.
    fn document(
        &self,
        doc: &DocumentId,
    ) -> impl Future<Output = Result<Option<DocumentHead>, BackendError>> + Send;

    /// Head sequence numbers of the listed documents that exist.
    fn heads(
        &self,
        ids: &[DocumentId],
    ) -> impl Future<Output = Result<HashMap<DocumentId, u64>, BackendError>> + Send;

    /// Stores updates and moves heads durably, in one step, if every document in `expected`
    /// (sorted by id) is still at the listed head: `Ok(true)` when written, `Ok(false)` with
    /// nothing written when any head moved (another replica wrote). The core calls it when its
    /// cached rule states decided a whole batch, so the usual write needs no reads. The default
    /// runs the steps of a locked transaction; a backend may do it in one statement.
    fn append_updates(
        &self,
        expected: &[(&DocumentId, u64)],
        rows: &[UpdateRow<'_>],
        heads: &[(&DocumentId, &DocumentHead)],
    ) -> impl Future<Output = Result<bool, BackendError>> + Send {
        async move {
            let mut tx = self.begin_write().await?;
            let ids: Vec<&DocumentId> = expected.iter().map(|(doc, _)| *doc).collect();
            let found = tx.lock_documents(&ids).await?;
            let unmoved = expected
                .iter()
                .all(|(doc, seq)| found.get(*doc).map(|h| h.head_seq) == Some(*seq));
            if !unmoved {
                return Ok(false);
            }
            if !rows.is_empty() {
                tx.insert_updates(rows).await?;
            }
            if !heads.is_empty() {
                tx.set_heads(heads).await?;
            }
            tx.commit().await?;
            Ok(true)
        }
    }
}

/// A write transaction. Dropping it without [`WriteTx::commit`] rolls it back.
pub trait WriteTx: Send {
    /// Request ids already stored, with the sequence number their message got.
    fn find_requests(
        &mut self,
        ids: &[&str],
    ) -> impl Future<Output = Result<HashMap<String, u64>, BackendError>> + Send;

    /// Locks the documents (sorted, so concurrent batches never deadlock) and reads their rows;
    /// documents that do not exist are missing from the result. A backend whose write
    /// transactions hold a database-wide write lock from their start (SQLite) only reads them.
    fn lock_documents(
        &mut self,
        sorted_ids: &[&DocumentId],
    ) -> impl Future<Output = Result<HashMap<DocumentId, DocumentHead>, BackendError>> + Send;

    /// The rule state of a document whose row is locked.
    fn load_state(
        &mut self,
        doc: &DocumentId,
        head: &DocumentHead,
    ) -> impl Future<Output = Result<DocumentState, BackendError>> + Send;

    fn snapshot_exists(
        &mut self,
        doc: &DocumentId,
        id: &SnapshotId,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send;

    fn insert_snapshot(
        &mut self,
        row: SnapshotRow<'_>,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    fn insert_updates(
        &mut self,
        rows: &[UpdateRow<'_>],
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Records the new head of every document the batch changed.
    fn set_heads(
        &mut self,
        heads: &[(&DocumentId, &DocumentHead)],
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Commits durably: when this returns `Ok`, the rows survive a crash.
    fn commit(self) -> impl Future<Output = Result<(), BackendError>> + Send;
}

/// A read-only transaction over one consistent state.
pub trait ReadTx: Send {
    fn document(
        &mut self,
        doc: &DocumentId,
    ) -> impl Future<Output = Result<Option<DocumentHead>, BackendError>> + Send;

    fn snapshot_body(
        &mut self,
        doc: &DocumentId,
        id: &SnapshotId,
    ) -> impl Future<Output = Result<Option<String>, BackendError>> + Send;

    /// The updates of a snapshot in version order.
    fn updates(
        &mut self,
        doc: &DocumentId,
        snapshot: &SnapshotId,
    ) -> impl Future<Output = Result<Vec<StoredUpdate>, BackendError>> + Send;

    /// Every snapshot of the document as a proof entry, in acceptance order.
    fn proof_entries(
        &mut self,
        doc: &DocumentId,
    ) -> impl Future<Output = Result<Vec<ProofEntry>, BackendError>> + Send;
}
