//! The one error type of the protocol and its one mapping to wire replies.
//!
//! Every way a client frame can fail — malformed, badly signed, for another document, refused by
//! the document's state, refused by access control, or not storable — is a [`Reason`]. Together
//! with the frame's [`Shape`] it forms a [`FrameError`], and [`FrameError::reply`] is the only
//! place that decides what the client receives (PROTOCOL.md 6 and 7.2): snapshot-shaped frames
//! get `snapshot-save-failed` (the gateway adds recovery data when the state asks for it), update-shaped frames
//! `update-save-failed`, anything else an `invalid-message` with a short fixed reason code. Reason
//! codes carry no internal detail and are safe as log fields and metric labels.

use crate::wire;

/// Why a frame was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    // Shape (PROTOCOL.md 7.2).
    NotJson,
    NotObject,
    BinaryFrame,
    DuplicateKey,
    TooDeep,
    BadShape,
    ExtraField,
    BadBase64,
    BadLength,
    BadId,
    BadClock,
    TooLarge,
    // Authenticity and binding.
    BadSignature,
    WrongDocument,
    // The document's state (PROTOCOL.md 6.1, 6.2, 7.10).
    SnapshotOutdated,
    SnapshotMissesUpdates,
    SnapshotInvalidProof,
    SnapshotIdTaken,
    UpdateNoActiveSnapshot,
    UpdateNotActiveSnapshot,
    UpdateWrongClock,
    // The server's own limits and faults.
    RateLimited,
    Unavailable,
    Denied,
}

impl Reason {
    /// The short, fixed code sent in `invalid-message` and used in logs and metrics.
    pub fn code(self) -> &'static str {
        match self {
            Reason::NotJson => "not-json",
            Reason::NotObject => "not-object",
            Reason::BinaryFrame => "binary-frame",
            Reason::DuplicateKey => "duplicate-key",
            Reason::TooDeep => "too-deep",
            Reason::BadShape => "bad-shape",
            Reason::ExtraField => "extra-field",
            Reason::BadBase64 => "bad-base64",
            Reason::BadLength => "bad-length",
            Reason::BadId => "bad-id",
            Reason::BadClock => "bad-clock",
            Reason::TooLarge => "too-large",
            Reason::BadSignature => "bad-signature",
            Reason::WrongDocument => "wrong-document",
            Reason::SnapshotOutdated => "snapshot-outdated",
            Reason::SnapshotMissesUpdates => "snapshot-misses-updates",
            Reason::SnapshotInvalidProof => "snapshot-invalid-proof",
            Reason::SnapshotIdTaken => "snapshot-id-taken",
            Reason::UpdateNoActiveSnapshot => "update-no-active-snapshot",
            Reason::UpdateNotActiveSnapshot => "update-not-active-snapshot",
            Reason::UpdateWrongClock => "update-wrong-clock",
            Reason::RateLimited => "rate-limited",
            Reason::Unavailable => "unavailable",
            Reason::Denied => "denied",
        }
    }

    /// Every reason, for exhaustive tests and metric registration.
    pub const ALL: [Reason; 24] = [
        Reason::NotJson,
        Reason::NotObject,
        Reason::BinaryFrame,
        Reason::DuplicateKey,
        Reason::TooDeep,
        Reason::BadShape,
        Reason::ExtraField,
        Reason::BadBase64,
        Reason::BadLength,
        Reason::BadId,
        Reason::BadClock,
        Reason::TooLarge,
        Reason::BadSignature,
        Reason::WrongDocument,
        Reason::SnapshotOutdated,
        Reason::SnapshotMissesUpdates,
        Reason::SnapshotInvalidProof,
        Reason::SnapshotIdTaken,
        Reason::UpdateNoActiveSnapshot,
        Reason::UpdateNotActiveSnapshot,
        Reason::UpdateWrongClock,
        Reason::RateLimited,
        Reason::Unavailable,
        Reason::Denied,
    ];

    pub fn from_code(code: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.code() == code)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

/// What kind of frame failed, which decides the reply type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    /// Not classifiable (not JSON, not an object, no `publicData` object).
    Unknown,
    Snapshot,
    /// The raw JSON text of `publicData.refSnapshotId` and `clock` as received, echoed back as
    /// the reference does (each omitted when missing).
    Update {
        snapshot_id: Option<String>,
        clock: Option<String>,
    },
    Ephemeral,
}

/// A refused client frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("frame refused: {reason}")]
pub struct FrameError {
    pub shape: Shape,
    pub reason: Reason,
}

impl FrameError {
    pub fn new(shape: Shape, reason: Reason) -> Self {
        Self { shape, reason }
    }

    /// The reply the client receives. A snapshot rejection that carries the document's state
    /// (outdated, misses updates) is built by the gateway from a load instead
    /// ([`wire::snapshot_save_failed`]).
    pub fn reply(&self) -> String {
        if self.reason == Reason::Denied {
            return wire::UNAUTHORIZED.to_owned();
        }
        match &self.shape {
            Shape::Snapshot => wire::SNAPSHOT_SAVE_FAILED.to_owned(),
            Shape::Update { snapshot_id, clock } => {
                wire::update_save_failed(snapshot_id.as_deref(), clock.as_deref(), false)
            }
            Shape::Unknown | Shape::Ephemeral => wire::invalid_message(self.reason),
        }
    }

    /// The `type` of [`FrameError::reply`]'s frame (a metric label; never client data).
    pub fn reply_type(&self) -> &'static str {
        if self.reason == Reason::Denied {
            return "unauthorized";
        }
        match &self.shape {
            Shape::Snapshot => "snapshot-save-failed",
            Shape::Update { .. } => "update-save-failed",
            Shape::Unknown | Shape::Ephemeral => "invalid-message",
        }
    }

    /// Whether the connection must be closed after the reply (denied writes, PROTOCOL.md 3.3).
    pub fn closes_connection(&self) -> bool {
        self.reason == Reason::Denied
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_round_trip() {
        for reason in Reason::ALL {
            assert_eq!(Reason::from_code(reason.code()), Some(reason));
        }
        let mut codes: Vec<_> = Reason::ALL.iter().map(|r| r.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), Reason::ALL.len());
    }

    #[test]
    fn replies_follow_the_shape() {
        let update = FrameError::new(
            Shape::Update {
                snapshot_id: Some("\"S1\"".into()),
                clock: Some("\"1\"".into()),
            },
            Reason::BadShape,
        );
        assert_eq!(
            update.reply(),
            r#"{"type":"update-save-failed","snapshotId":"S1","clock":"1","requiresNewSnapshot":false}"#
        );
        assert_eq!(
            FrameError::new(Shape::Snapshot, Reason::BadSignature).reply(),
            r#"{"type":"snapshot-save-failed"}"#
        );
        assert_eq!(
            FrameError::new(Shape::Unknown, Reason::NotJson).reply(),
            r#"{"type":"invalid-message","reason":"not-json"}"#
        );
        assert_eq!(
            FrameError::new(Shape::Snapshot, Reason::Denied).reply(),
            r#"{"type":"unauthorized"}"#
        );
    }
}
