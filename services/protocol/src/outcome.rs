//! What a store answers, shared by both sides of the store seam.
//!
//! The persistence core produces these, the gRPC layer carries them, and the gateway consumes
//! them, whether it talks to persistence over gRPC or runs the core in-process (the embedded
//! binary). One definition, so the two sides cannot drift apart.

use bytes::Bytes;

use crate::crypto::ProofEntry;
use crate::error::Reason;
use crate::ids::SnapshotId;

/// Which kind of stored message a body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Snapshot,
    Update,
}

/// The result of submitting a snapshot or an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Stored with this per-document sequence number.
    Accepted { sequence: u64 },
    /// Refused by a rule; `sequence` is the document's sequence number at that point.
    Rejected { reason: Reason, sequence: u64 },
}

/// A document as a load returns it (PROTOCOL.md 6.4), read in one consistent view at one
/// sequence number.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadedDocument {
    pub found: bool,
    pub sequence: u64,
    pub active_snapshot_id: Option<SnapshotId>,
    /// The active snapshot's stored body (UTF-8 JSON, exactly as signed), when the load
    /// includes it. Shared bytes: a cached document is handed out without copying it.
    pub snapshot: Option<Bytes>,
    /// Update bodies in version order, shared bytes like `snapshot`.
    pub updates: Vec<Bytes>,
    /// `None`: the `document` frame has no `snapshotProofChain` field.
    pub chain: Option<Vec<ProofEntry>>,
}
