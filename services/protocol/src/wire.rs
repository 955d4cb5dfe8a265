//! Server → client frames (PROTOCOL.md 5), built by concatenating stored message bodies.
//!
//! Message bodies (see [`crate::message`]) are embedded as they are: a relayed update is its body
//! with `"type":"update"` added, a document load embeds the bodies of its snapshot and updates.
//! Only server-made values (snapshot ids, clocks, proof entries) are serialised here.

use bytes::Bytes;

use crate::canonical::write_str;
use crate::crypto::ProofEntry;
use crate::error::Reason;
use crate::ids::{Clock, SnapshotId};

pub const DOCUMENT_ERROR: &str = r#"{"type":"document-error"}"#;
pub const UNAUTHORIZED: &str = r#"{"type":"unauthorized"}"#;
pub const DOCUMENT_NOT_FOUND: &str = r#"{"type":"document-not-found"}"#;

pub const SNAPSHOT_SAVE_FAILED: &str = r#"{"type":"snapshot-save-failed"}"#;

/// What a `snapshot-save-failed` carries so the client can recover without reconnecting.
#[derive(Debug, Clone, Copy, Default)]
pub struct Recovery<'a> {
    /// Body of the active snapshot (after *outdated*).
    pub snapshot: Option<&'a [u8]>,
    /// Bodies of the active snapshot's updates, in version order.
    pub updates: Option<&'a [Bytes]>,
    /// Proof chain from the client's snapshot to the active one (after *outdated*).
    pub chain: Option<&'a [ProofEntry]>,
}

/// The `document` frame answering a load (PROTOCOL.md 6.4). Bodies are stored UTF-8 JSON, so the
/// frame is UTF-8; it is built as bytes because they arrive as shared bytes and a document of
/// 10,000 updates is megabytes that need no second pass.
pub fn document<B: AsRef<[u8]>>(
    snapshot: Option<&[u8]>,
    updates: &[B],
    chain: Option<&[ProofEntry]>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(state_len(snapshot, Some(updates), chain) + 20);
    out.extend_from_slice(br#"{"type":"document""#);
    push_state(&mut out, snapshot, Some(updates), chain);
    out.push(b'}');
    out
}

/// The [`document`] frame in pieces, for a load that arrives in pieces: the start, then the
/// updates in any number of batches, then the end; concatenated they are [`document`]'s bytes.
#[derive(Debug, Default)]
pub struct DocumentPieces {
    updates_started: bool,
}

impl DocumentPieces {
    /// The frame up to the snapshot body (which follows as it is, when there is one).
    pub fn start(has_snapshot: bool) -> Vec<u8> {
        let mut out = br#"{"type":"document""#.to_vec();
        if has_snapshot {
            out.extend_from_slice(br#","snapshot":"#);
        }
        out
    }

    /// The next update bodies, in version order.
    pub fn updates<B: AsRef<[u8]>>(&mut self, bodies: &[B]) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(bodies.iter().map(|b| b.as_ref().len() + 1).sum::<usize>() + 12);
        for body in bodies {
            if std::mem::replace(&mut self.updates_started, true) {
                out.push(b',');
            } else {
                out.extend_from_slice(br#","updates":["#);
            }
            out.extend_from_slice(body.as_ref());
        }
        out
    }

    /// The rest of the frame.
    pub fn end(self, chain: Option<&[ProofEntry]>) -> Vec<u8> {
        let mut out = Vec::new();
        if self.updates_started {
            out.push(b']');
        } else {
            out.extend_from_slice(br#","updates":[]"#);
        }
        push_state(&mut out, None, None::<&[&[u8]]>, chain);
        out.push(b'}');
        out
    }
}

/// `snapshot-save-failed` with recovery data (bytes, for the same reason as [`document`]).
pub fn snapshot_save_failed(recovery: &Recovery<'_>) -> Vec<u8> {
    let Recovery {
        snapshot,
        updates,
        chain,
    } = *recovery;
    let mut out = Vec::with_capacity(state_len(snapshot, updates, chain) + 32);
    out.extend_from_slice(br#"{"type":"snapshot-save-failed""#);
    push_state(&mut out, snapshot, updates, chain);
    out.push(b'}');
    out
}

/// The bytes [`push_state`] writes, or a little more (proof entries are estimated).
fn state_len<B: AsRef<[u8]>>(
    snapshot: Option<&[u8]>,
    updates: Option<&[B]>,
    chain: Option<&[ProofEntry]>,
) -> usize {
    snapshot.map_or(0, |s| s.len() + 12)
        + updates.map_or(0, |u| {
            u.iter().map(|b| b.as_ref().len() + 1).sum::<usize>() + 12
        })
        + chain.map_or(0, |c| c.len() * 200 + 24)
}

fn push_state<B: AsRef<[u8]>>(
    out: &mut Vec<u8>,
    snapshot: Option<&[u8]>,
    updates: Option<&[B]>,
    chain: Option<&[ProofEntry]>,
) {
    if let Some(snapshot) = snapshot {
        out.extend_from_slice(br#","snapshot":"#);
        out.extend_from_slice(snapshot);
    }
    if let Some(updates) = updates {
        out.extend_from_slice(br#","updates":["#);
        for (i, update) in updates.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(update.as_ref());
        }
        out.push(b']');
    }
    if let Some(chain) = chain {
        let mut text = String::from(r#","snapshotProofChain":["#);
        for (i, entry) in chain.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            text.push_str(r#"{"snapshotId":"#);
            write_str(entry.snapshot_id.as_str(), &mut text);
            text.push_str(r#","parentSnapshotProof":"#);
            write_str(&entry.parent_snapshot_proof, &mut text);
            text.push_str(r#","snapshotCiphertextHash":"#);
            write_str(&entry.snapshot_ciphertext_hash, &mut text);
            text.push('}');
        }
        text.push(']');
        out.extend_from_slice(text.as_bytes());
    }
}

/// `{"type":"snapshot","snapshot":BODY}`, relayed to the other connections.
pub fn snapshot_broadcast(body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 32);
    out.push_str(r#"{"type":"snapshot","snapshot":"#);
    out.push_str(body);
    out.push('}');
    out
}

/// An update body with `"type":"update"`, relayed to the other connections.
pub fn update_broadcast(body: &str) -> String {
    with_type(body, "update")
}

/// An ephemeral message body with `"type":"ephemeral-message"`.
pub fn ephemeral_broadcast(body: &str) -> String {
    with_type(body, "ephemeral-message")
}

fn with_type(body: &str, kind: &str) -> String {
    let open = body.strip_suffix('}').unwrap_or(body);
    let mut out = String::with_capacity(body.len() + kind.len() + 12);
    out.push_str(open);
    out.push_str(r#","type":""#);
    out.push_str(kind);
    out.push_str("\"}");
    out
}

pub fn snapshot_saved(snapshot_id: &SnapshotId) -> String {
    let mut out = String::from(r#"{"type":"snapshot-saved","snapshotId":"#);
    write_str(snapshot_id.as_str(), &mut out);
    out.push('}');
    out
}

pub fn update_saved(snapshot_id: &SnapshotId, clock: Clock) -> String {
    let mut out = String::from(r#"{"type":"update-saved","snapshotId":"#);
    write_str(snapshot_id.as_str(), &mut out);
    out.push_str(r#","clock":"#);
    out.push_str(&clock.to_string());
    out.push('}');
    out
}

/// `update-save-failed`; `snapshot_id` and `clock` are raw JSON texts echoed from the frame.
pub fn update_save_failed(
    snapshot_id: Option<&str>,
    clock: Option<&str>,
    requires_new_snapshot: bool,
) -> String {
    let mut out = String::from(r#"{"type":"update-save-failed""#);
    if let Some(id) = snapshot_id {
        out.push_str(r#","snapshotId":"#);
        out.push_str(id);
    }
    if let Some(clock) = clock {
        out.push_str(r#","clock":"#);
        out.push_str(clock);
    }
    out.push_str(if requires_new_snapshot {
        r#","requiresNewSnapshot":true}"#
    } else {
        r#","requiresNewSnapshot":false}"#
    });
    out
}

/// `{"type":"invalid-message","reason":CODE}` for frames that are neither snapshots nor updates.
pub fn invalid_message(reason: Reason) -> String {
    format!(
        r#"{{"type":"invalid-message","reason":"{}"}}"#,
        reason.code()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_valid_json_of_the_documented_shape() {
        let id = SnapshotId::parse("S1").unwrap();
        assert_eq!(
            snapshot_saved(&id),
            r#"{"type":"snapshot-saved","snapshotId":"S1"}"#
        );
        assert_eq!(
            update_saved(&id, Clock::new(3).unwrap()),
            r#"{"type":"update-saved","snapshotId":"S1","clock":3}"#
        );
        assert_eq!(
            document::<&str>(None, &[], Some(&[])),
            br#"{"type":"document","updates":[],"snapshotProofChain":[]}"#
        );
        assert_eq!(
            document(Some(b"{}"), &["{\"a\":1}"], None),
            br#"{"type":"document","snapshot":{},"updates":[{"a":1}]}"#
        );
        assert_eq!(
            update_broadcast(r#"{"ciphertext":"x"}"#),
            r#"{"ciphertext":"x","type":"update"}"#
        );
        assert_eq!(
            snapshot_save_failed(&Recovery::default()),
            SNAPSHOT_SAVE_FAILED.as_bytes()
        );
    }

    /// Pieces in any batching concatenate to the whole frame.
    #[test]
    fn document_pieces_make_the_document_frame() {
        let chain = [ProofEntry {
            snapshot_id: SnapshotId::parse("S1").unwrap(),
            parent_snapshot_proof: "p".into(),
            snapshot_ciphertext_hash: "h".into(),
        }];
        let updates = ["{\"a\":1}", "{\"b\":2}", "{\"c\":3}"];
        for snapshot in [None, Some(&b"{\"s\":0}"[..])] {
            for chain in [None, Some(&chain[..])] {
                for count in 0..=updates.len() {
                    for split in 0..=count {
                        let mut pieces = DocumentPieces::default();
                        let mut out = DocumentPieces::start(snapshot.is_some());
                        out.extend_from_slice(snapshot.unwrap_or_default());
                        out.extend(pieces.updates(&updates[..split]));
                        out.extend(pieces.updates(&updates[split..count]));
                        out.extend(pieces.end(chain));
                        assert_eq!(out, document(snapshot, &updates[..count], chain));
                    }
                }
            }
        }
    }
}
