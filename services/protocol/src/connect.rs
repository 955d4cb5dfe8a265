//! The connection request: document id from the path, parameters from the query (PROTOCOL.md 3.1).
//!
//! The path is percent-decoded and must be UTF-8; query values are decoded as Node's
//! `querystring` does (`+` is a space, malformed escapes stay as they are) and the first
//! occurrence of a parameter wins. Failures map to the first frame PROTOCOL.md 3.2 demands.

use std::borrow::Cow;
use std::fmt;

use crate::ids::{DocumentId, SnapshotId};
use crate::json;
use crate::message::clock_map;
use crate::rules::{LoadMode, LoadRequest};

/// The application's opaque credential. Never printed (PROTOCOL.md 7.7).
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKey(String);

impl SessionKey {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The secret itself, for the access-control seam only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKey(<redacted>)")
    }
}

/// A parsed connection request.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    pub doc_id: DocumentId,
    pub session_key: SessionKey,
    pub load: LoadRequest,
}

/// Why a connection cannot be served; every variant is answered with `document-error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error("no sessionKey parameter")]
    MissingSessionKey,
    #[error("document id is empty, too long or not UTF-8")]
    BadDocumentId,
}

/// Parses the request path (everything after the leading `/`, any mount prefix already removed)
/// and the raw query string.
pub fn parse_connect(path: &str, query: Option<&str>) -> Result<ConnectRequest, ConnectError> {
    let params = parse_query(query.unwrap_or(""));
    let first = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let session_key = first("sessionKey").ok_or(ConnectError::MissingSessionKey)?;
    let raw_id = path.strip_prefix('/').unwrap_or(path);
    let decoded = percent_decode(raw_id.as_bytes(), false);
    let doc_text = std::str::from_utf8(&decoded).map_err(|_| ConnectError::BadDocumentId)?;
    let doc_id = DocumentId::parse(doc_text).map_err(|_| ConnectError::BadDocumentId)?;

    let known_snapshot_id = first("knownSnapshotId")
        .filter(|id| !id.is_empty())
        .and_then(|id| SnapshotId::parse(id).ok());
    let known_clocks = first("knownSnapshotUpdateClocks")
        .and_then(|text| json::parse(text).ok().and_then(|v| clock_map(&v).ok()))
        .unwrap_or_default();
    Ok(ConnectRequest {
        doc_id,
        session_key: SessionKey::new(session_key.to_owned()),
        load: LoadRequest {
            mode: LoadMode::parse(first("mode")),
            known_snapshot_id,
            known_clocks,
        },
    })
}

/// Splits and decodes a query string like Node's `querystring.parse`.
pub fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode_component(k), decode_component(v))
        })
        .collect()
}

fn decode_component(text: &str) -> String {
    match percent_decode(text.as_bytes(), true) {
        Cow::Borrowed(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        Cow::Owned(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
    }
}

fn percent_decode(input: &[u8], plus_is_space: bool) -> Cow<'_, [u8]> {
    if !input
        .iter()
        .any(|&b| b == b'%' || (plus_is_space && b == b'+'))
    {
        return Cow::Borrowed(input);
    }
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'%' => {
                let hex = input
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                if let Some(byte) = hex {
                    out.push(byte);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' if plus_is_space => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Clock;

    #[test]
    fn parses_the_real_clients_url() {
        let req = parse_connect(
            "/doc%201",
            Some("sessionKey=k+1&mode=delta&knownSnapshotId=S1&knownSnapshotUpdateClocks=%7B%22A%22%3A3%7D&mode=complete"),
        )
        .unwrap();
        assert_eq!(req.doc_id.as_str(), "doc 1");
        assert_eq!(req.session_key.expose(), "k 1");
        assert_eq!(req.load.mode, LoadMode::Delta);
        assert_eq!(req.load.known_snapshot_id.unwrap().as_str(), "S1");
        assert_eq!(
            req.load.known_clocks.get("A"),
            Some(&Clock::new(3).unwrap())
        );
    }

    #[test]
    fn failures_and_lenient_parts() {
        assert_eq!(
            parse_connect("/d", Some("mode=delta")).unwrap_err(),
            ConnectError::MissingSessionKey
        );
        assert_eq!(
            parse_connect("/", Some("sessionKey=")).unwrap_err(),
            ConnectError::BadDocumentId
        );
        assert_eq!(
            parse_connect("/%ff", Some("sessionKey=")).unwrap_err(),
            ConnectError::BadDocumentId
        );
        let long = format!("/{}", "x".repeat(257));
        assert_eq!(
            parse_connect(&long, Some("sessionKey=")).unwrap_err(),
            ConnectError::BadDocumentId
        );
        let req = parse_connect(
            "/d",
            Some("sessionKey=&knownSnapshotUpdateClocks=%7Bbad&mode=x%zz"),
        )
        .unwrap();
        assert!(req.load.known_clocks.is_empty());
        assert_eq!(req.load.mode, LoadMode::Complete);
        assert!(format!("{:?}", req.session_key).contains("redacted"));
    }
}
