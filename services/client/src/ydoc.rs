//! A Yjs text document (via `yrs`) encoded exactly as the JS side of our tests encodes it, so a
//! Rust client and the real JS client can edit one document together.
//!
//! The JS harness (`tests/e2e/lib/client.mjs`, modelled on secsync-react-yjs) keeps a `Y.Doc`
//! with one `Y.Text` named `"text"` and wires it to secsync like this:
//!
//! * every local transaction's `updateV2` event is one *change*; the pending changes are sent as
//!   one update whose plaintext is secsync's `serializeUint8ArrayUpdates`:
//!   `JSON.stringify(changes.map(sodium.to_base64))`, i.e. the UTF-8 text of a JSON array of
//!   libsodium-base64 strings, each a Yjs v2 update;
//! * a snapshot's plaintext is `Y.encodeStateAsUpdateV2(doc)` as raw bytes (no wrapping);
//! * received snapshots and changes are applied with `Y.applyUpdateV2`.
//!
//! Text positions count UTF-16 code units, as in JavaScript.

use secsync_protocol::b64;
use secsync_protocol::json::{self, Kind};
use yrs::updates::decoder::Decode as _;
use yrs::{
    Doc, GetString as _, OffsetKind, Options, ReadTxn as _, StateVector, Text as _, TextRef,
    Transact as _, Update,
};

use crate::sync::Event;

/// The name of the shared text in the JS harness (`yDoc.getText("text")`).
pub const TEXT_NAME: &str = "text";

/// Why a payload could not be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum YdocError {
    #[error("change payload is not a JSON array of base64 strings")]
    Changes,
    #[error("not a valid Yjs v2 update: {0}")]
    Update(String),
}

/// `serializeUint8ArrayUpdates`: the plaintext of an update frame carrying `changes`.
pub fn serialize_changes<T: AsRef<[u8]>>(changes: &[T]) -> Vec<u8> {
    let mut out = String::from("[");
    for (i, change) in changes.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        // base64url text never needs JSON escaping.
        out.push('"');
        out.push_str(&b64::encode(change));
        out.push('"');
    }
    out.push(']');
    out.into_bytes()
}

/// `deserializeUint8ArrayUpdates`: the changes an update frame's plaintext carries.
pub fn deserialize_changes(plaintext: &[u8]) -> Result<Vec<Vec<u8>>, YdocError> {
    let text = std::str::from_utf8(plaintext).map_err(|_| YdocError::Changes)?;
    let value = json::parse(text).map_err(|_| YdocError::Changes)?;
    let Kind::Array(items) = &value.kind else {
        return Err(YdocError::Changes);
    };
    items
        .iter()
        .map(|item| {
            item.as_str()
                .and_then(|s| b64::decode(s).ok())
                .ok_or(YdocError::Changes)
        })
        .collect()
}

/// A `Y.Doc` holding the harness's one `Y.Text`.
pub struct TextDoc {
    doc: Doc,
    text: TextRef,
}

impl std::fmt::Debug for TextDoc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextDoc")
            .field("client_id", &self.doc.client_id())
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

impl Default for TextDoc {
    fn default() -> Self {
        Self::new()
    }
}

impl TextDoc {
    pub fn new() -> Self {
        // UTF-16 offsets, as Y.Text in JavaScript counts them.
        let doc = Doc::with_options(Options {
            offset_kind: OffsetKind::Utf16,
            ..Options::default()
        });
        let text = doc.get_or_insert_text(TEXT_NAME);
        Self { doc, text }
    }

    /// The current text.
    pub fn text(&self) -> String {
        self.text.get_string(&self.doc.transact())
    }

    /// Length in UTF-16 code units.
    pub fn len(&self) -> u32 {
        self.text.len(&self.doc.transact())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Inserts at a UTF-16 index; returns the change (a Yjs v2 update) to send.
    pub fn insert(&mut self, index: u32, chunk: &str) -> Vec<u8> {
        let mut txn = self.doc.transact_mut();
        self.text.insert(&mut txn, index, chunk);
        txn.encode_update_v2()
    }

    /// Appends; returns the change to send.
    pub fn push(&mut self, chunk: &str) -> Vec<u8> {
        let mut txn = self.doc.transact_mut();
        self.text.push(&mut txn, chunk);
        txn.encode_update_v2()
    }

    /// Removes `len` UTF-16 units at `index`; returns the change to send.
    pub fn remove(&mut self, index: u32, len: u32) -> Vec<u8> {
        let mut txn = self.doc.transact_mut();
        self.text.remove_range(&mut txn, index, len);
        txn.encode_update_v2()
    }

    /// `Y.applyUpdateV2` of one change or of a snapshot's state.
    pub fn apply_update_v2(&mut self, update: &[u8]) -> Result<(), YdocError> {
        let update = Update::decode_v2(update).map_err(|e| YdocError::Update(e.to_string()))?;
        self.doc
            .transact_mut()
            .apply_update(update)
            .map_err(|e| YdocError::Update(e.to_string()))
    }

    /// Applies an update frame's plaintext (a serialised list of changes); returns how many.
    pub fn apply_changes(&mut self, plaintext: &[u8]) -> Result<usize, YdocError> {
        let changes = deserialize_changes(plaintext)?;
        for change in &changes {
            self.apply_update_v2(change)?;
        }
        Ok(changes.len())
    }

    /// The plaintext of a snapshot: `Y.encodeStateAsUpdateV2(doc)`.
    pub fn snapshot(&self) -> Vec<u8> {
        self.doc
            .transact()
            .encode_state_as_update_v2(&StateVector::default())
    }

    /// Applies a received [`Event`]: snapshots and changes; other events are ignored.
    pub fn apply_event(&mut self, event: &Event) -> Result<(), YdocError> {
        match event {
            Event::Snapshot { plaintext, .. } => self.apply_update_v2(plaintext),
            Event::Change { plaintext, .. } => self.apply_changes(plaintext).map(|_| ()),
            Event::Ephemeral { .. } | Event::Custom { .. } => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_round_trip_through_the_wire_format() {
        let mut a = TextDoc::new();
        let mut b = TextDoc::new();
        let c1 = a.push("hello");
        let c2 = a.insert(5, " wörld 😀");
        let payload = serialize_changes(&[c1, c2]);
        assert!(payload.starts_with(b"[\""));
        assert_eq!(b.apply_changes(&payload).unwrap(), 2);
        assert_eq!(b.text(), "hello wörld 😀");
        // 😀 is two UTF-16 units.
        assert_eq!(b.len(), 14);
        let c3 = b.remove(0, 6);
        a.apply_update_v2(&c3).unwrap();
        assert_eq!(a.text(), "wörld 😀");

        let mut c = TextDoc::new();
        c.apply_update_v2(&a.snapshot()).unwrap();
        assert_eq!(c.text(), a.text());
    }

    #[test]
    fn serialisation_matches_the_js_helper() {
        assert_eq!(
            serialize_changes(&[vec![1u8, 2], vec![]]),
            b"[\"AQI\",\"\"]"
        );
        assert_eq!(
            deserialize_changes(b"[\"AQI\",\"\"]").unwrap(),
            vec![vec![1, 2], vec![]]
        );
        assert_eq!(serialize_changes::<Vec<u8>>(&[]), b"[]");
        assert!(deserialize_changes(b"{}").is_err());
        assert!(deserialize_changes(b"[\"A+I\"]").is_err());
    }
}
