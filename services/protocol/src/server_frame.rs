//! Server → client frames as a client reads them (the Rust client and the tests).
//!
//! Embedded messages (the snapshot of a `document`, relayed updates, …) are returned as their
//! exact received text, ready for [`crate::parse_client_frame`], so a client verifies the same
//! bytes the server stored.

use crate::crypto::ProofEntry;
use crate::ids::{Clock, SnapshotId};
use crate::json::{self, Kind, Value};

/// Why a server frame could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ServerFrameError {
    #[error("server frame is not a JSON object")]
    NotObject,
    #[error("server frame has no string `type`")]
    NoType,
    #[error("server frame field `{0}` is missing or has the wrong type")]
    Field(&'static str),
}

/// A frame sent by the server (PROTOCOL.md 5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFrame {
    Document {
        snapshot: Option<String>,
        updates: Vec<String>,
        chain: Option<Vec<ProofEntry>>,
    },
    /// Another connection's snapshot (the text of the embedded snapshot object).
    Snapshot(String),
    SnapshotSaved(SnapshotId),
    SnapshotSaveFailed {
        snapshot: Option<String>,
        updates: Option<Vec<String>>,
        chain: Option<Vec<ProofEntry>>,
    },
    /// Another connection's update (the whole frame's text; its `type` is ignored when parsed).
    Update(String),
    UpdateSaved {
        snapshot_id: SnapshotId,
        clock: Clock,
    },
    UpdateSaveFailed {
        requires_new_snapshot: bool,
    },
    /// Another connection's ephemeral message (the whole frame's text).
    EphemeralMessage(String),
    DocumentError,
    Unauthorized,
    DocumentNotFound,
    InvalidMessage(String),
    /// A type this client does not know.
    Other(String),
}

/// Reads one server text frame.
pub fn parse_server_frame(text: &str) -> Result<ServerFrame, ServerFrameError> {
    let root = json::parse(text).map_err(|_| ServerFrameError::NotObject)?;
    if root.as_object().is_none() {
        return Err(ServerFrameError::NotObject);
    }
    let kind = root
        .get("type")
        .and_then(Value::as_str)
        .ok_or(ServerFrameError::NoType)?;
    let raw = |v: &Value<'_>| text[v.span.clone()].to_owned();
    let object = |name: &'static str| root.get(name).filter(|v| v.as_object().is_some()).map(raw);
    Ok(match kind {
        "document" => ServerFrame::Document {
            snapshot: object("snapshot"),
            updates: bodies(text, &root, "updates")?.unwrap_or_default(),
            chain: chain(&root)?,
        },
        "snapshot" => {
            ServerFrame::Snapshot(object("snapshot").ok_or(ServerFrameError::Field("snapshot"))?)
        }
        "snapshot-saved" => ServerFrame::SnapshotSaved(snapshot_id(&root)?),
        "snapshot-save-failed" => ServerFrame::SnapshotSaveFailed {
            snapshot: object("snapshot"),
            updates: bodies(text, &root, "updates")?,
            chain: chain(&root)?,
        },
        "update" => ServerFrame::Update(text.to_owned()),
        "update-saved" => {
            let Some(Kind::Number(clock)) = root.get("clock").map(|v| &v.kind) else {
                return Err(ServerFrameError::Field("clock"));
            };
            ServerFrame::UpdateSaved {
                snapshot_id: snapshot_id(&root)?,
                clock: Clock::from_f64(*clock).map_err(|_| ServerFrameError::Field("clock"))?,
            }
        }
        "update-save-failed" => ServerFrame::UpdateSaveFailed {
            requires_new_snapshot: matches!(
                root.get("requiresNewSnapshot").map(|v| &v.kind),
                Some(Kind::Bool(true))
            ),
        },
        "ephemeral-message" => ServerFrame::EphemeralMessage(text.to_owned()),
        "document-error" => ServerFrame::DocumentError,
        "unauthorized" => ServerFrame::Unauthorized,
        "document-not-found" => ServerFrame::DocumentNotFound,
        "invalid-message" => ServerFrame::InvalidMessage(
            root.get("reason")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
        ),
        other => ServerFrame::Other(other.to_owned()),
    })
}

fn snapshot_id(root: &Value<'_>) -> Result<SnapshotId, ServerFrameError> {
    root.get("snapshotId")
        .and_then(Value::as_str)
        .and_then(|s| SnapshotId::parse(s).ok())
        .ok_or(ServerFrameError::Field("snapshotId"))
}

fn bodies(
    text: &str,
    root: &Value<'_>,
    name: &'static str,
) -> Result<Option<Vec<String>>, ServerFrameError> {
    let Some(value) = root.get(name) else {
        return Ok(None);
    };
    let Kind::Array(items) = &value.kind else {
        return Err(ServerFrameError::Field(name));
    };
    Ok(Some(
        items
            .iter()
            .map(|v| text[v.span.clone()].to_owned())
            .collect(),
    ))
}

fn chain(root: &Value<'_>) -> Result<Option<Vec<ProofEntry>>, ServerFrameError> {
    const FIELD: &str = "snapshotProofChain";
    let Some(value) = root.get(FIELD) else {
        return Ok(None);
    };
    let Kind::Array(items) = &value.kind else {
        return Err(ServerFrameError::Field(FIELD));
    };
    items
        .iter()
        .map(|item| {
            let text = |key| {
                item.get(key)
                    .and_then(Value::as_str)
                    .ok_or(ServerFrameError::Field(FIELD))
            };
            Ok(ProofEntry {
                snapshot_id: SnapshotId::parse(text("snapshotId")?)
                    .map_err(|_| ServerFrameError::Field(FIELD))?,
                parent_snapshot_proof: text("parentSnapshotProof")?.to_owned(),
                snapshot_ciphertext_hash: text("snapshotCiphertextHash")?.to_owned(),
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Reason;
    use crate::wire::{self, Recovery};

    /// Every frame the server builds reads back as what was built.
    #[test]
    fn round_trips_the_wire_builders() {
        let id = SnapshotId::parse("S1").unwrap();
        let body = r#"{"ciphertext":"c","nonce":"n","signature":"s","publicData":{"docId":"d"}}"#;
        let entry = ProofEntry {
            snapshot_id: id.clone(),
            parent_snapshot_proof: "p".into(),
            snapshot_ciphertext_hash: "h".into(),
        };
        let updates = vec![body.to_owned(), body.to_owned()];
        let shared: Vec<_> = updates
            .iter()
            .map(|u| bytes::Bytes::from(u.clone()))
            .collect();
        let text = |frame: Vec<u8>| String::from_utf8(frame).unwrap();
        assert_eq!(
            parse_server_frame(&text(wire::document(
                Some(body.as_bytes()),
                &shared,
                Some(std::slice::from_ref(&entry))
            ))),
            Ok(ServerFrame::Document {
                snapshot: Some(body.into()),
                updates: updates.clone(),
                chain: Some(vec![entry.clone()]),
            })
        );
        assert_eq!(
            parse_server_frame(&text(wire::document::<&[u8]>(None, &[], None))),
            Ok(ServerFrame::Document {
                snapshot: None,
                updates: vec![],
                chain: None
            })
        );
        assert_eq!(
            parse_server_frame(&wire::snapshot_broadcast(body)),
            Ok(ServerFrame::Snapshot(body.into()))
        );
        assert_eq!(
            parse_server_frame(&wire::snapshot_saved(&id)),
            Ok(ServerFrame::SnapshotSaved(id.clone()))
        );
        let recovery = Recovery {
            snapshot: Some(body.as_bytes()),
            updates: Some(&shared),
            chain: Some(std::slice::from_ref(&entry)),
        };
        assert_eq!(
            parse_server_frame(&text(wire::snapshot_save_failed(&recovery))),
            Ok(ServerFrame::SnapshotSaveFailed {
                snapshot: Some(body.into()),
                updates: Some(updates.clone()),
                chain: Some(vec![entry]),
            })
        );
        let update = wire::update_broadcast(body);
        assert_eq!(
            parse_server_frame(&update),
            Ok(ServerFrame::Update(update.clone()))
        );
        assert_eq!(
            parse_server_frame(&wire::update_saved(&id, Clock::new(4).unwrap())),
            Ok(ServerFrame::UpdateSaved {
                snapshot_id: id,
                clock: Clock::new(4).unwrap()
            })
        );
        assert_eq!(
            parse_server_frame(&wire::update_save_failed(Some("\"S1\""), Some("1"), true)),
            Ok(ServerFrame::UpdateSaveFailed {
                requires_new_snapshot: true
            })
        );
        let ephemeral = wire::ephemeral_broadcast(body);
        assert_eq!(
            parse_server_frame(&ephemeral),
            Ok(ServerFrame::EphemeralMessage(ephemeral.clone()))
        );
        assert_eq!(
            parse_server_frame(wire::DOCUMENT_ERROR),
            Ok(ServerFrame::DocumentError)
        );
        assert_eq!(
            parse_server_frame(wire::UNAUTHORIZED),
            Ok(ServerFrame::Unauthorized)
        );
        assert_eq!(
            parse_server_frame(wire::DOCUMENT_NOT_FOUND),
            Ok(ServerFrame::DocumentNotFound)
        );
        assert_eq!(
            parse_server_frame(&wire::invalid_message(Reason::NotJson)),
            Ok(ServerFrame::InvalidMessage("not-json".into()))
        );
        assert_eq!(
            parse_server_frame(r#"{"type":"custom","x":1}"#),
            Ok(ServerFrame::Other("custom".into()))
        );
        assert_eq!(parse_server_frame("[1]"), Err(ServerFrameError::NotObject));
        assert_eq!(parse_server_frame("{}"), Err(ServerFrameError::NoType));
    }
}
