//! `POST /admin/revoke`: an administrator revokes sessions on every gateway.
//!
//! Enabled by `--admin-token-file`; the request carries `Authorization: Bearer <token>` with
//! the file's content (re-read on every request, so the token rotates without a restart;
//! compared in constant time). The body is `{"sessionId": "…"}` (a token's `jti`, the
//! callback's `revocationId`) or `{"documentId": "…"}`. The revocation is published on the
//! bus and applied by every gateway when it arrives ([`crate::revocation`]); the answer, 202,
//! means it was handed to the bus. Errors: 401 (token), 400 (body), 404 (not enabled), 503
//! (the bus refused it).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use secsync_protocol::DocumentId;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use crate::auth::strip_line_break;
use crate::gateway::Gateway;
use crate::revocation::Revocation;

pub const REVOKE_PATH: &str = "/admin/revoke";

/// Largest request body accepted.
const MAX_BODY: usize = 4096;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Request {
    #[serde(default)]
    session_id: Option<String>,
    #[serde(default)]
    document_id: Option<String>,
}

pub async fn revoke(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some(file) = &gateway.admin_token_file else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let expected = match tokio::fs::read(file).await {
        Ok(token) => token,
        Err(error) => {
            tracing::error!(file = %file.display(), %error, "admin token file unreadable");
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .unwrap_or_default();
    if !token_matches(given, &expected) {
        tracing::warn!("admin request with a wrong or missing token refused");
        return (StatusCode::UNAUTHORIZED, "unauthorized").into_response();
    }
    if body.len() > MAX_BODY {
        return (StatusCode::PAYLOAD_TOO_LARGE, "body too large").into_response();
    }
    let revocation = match serde_json::from_slice::<Request>(&body) {
        Ok(Request {
            session_id: Some(id),
            document_id: None,
        }) if !id.is_empty() && id.len() <= 256 && !id.contains(char::is_control) => {
            Revocation::Session(id.into())
        }
        Ok(Request {
            session_id: None,
            document_id: Some(doc),
        }) => match DocumentId::parse(&doc) {
            Ok(doc) => Revocation::Document(doc),
            Err(error) => return (StatusCode::BAD_REQUEST, error.to_string()).into_response(),
        },
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                "expected {\"sessionId\":\"…\"} or {\"documentId\":\"…\"}",
            )
                .into_response()
        }
    };
    match gateway.bus.publish_revocation(&revocation).await {
        Ok(()) => {
            tracing::info!(kind = kind(&revocation), "revocation published");
            (StatusCode::ACCEPTED, "published").into_response()
        }
        Err(error) => {
            tracing::error!(%error, "publishing a revocation failed");
            (StatusCode::SERVICE_UNAVAILABLE, "bus unavailable").into_response()
        }
    }
}

fn kind(revocation: &Revocation) -> &'static str {
    match revocation {
        Revocation::Session(_) => "session",
        Revocation::Document(_) => "document",
    }
}

/// Compares in constant time (hashes first, so the length leaks nothing either). The file's
/// trailing line break is not part of the token.
fn token_matches(given: &[u8], file: &[u8]) -> bool {
    let expected = strip_line_break(file);
    if expected.is_empty() {
        return false;
    }
    let (given, expected) = (Sha256::digest(given), Sha256::digest(expected));
    bool::from(given.ct_eq(&expected))
}

#[cfg(test)]
mod tests {
    use super::token_matches;

    #[test]
    fn tokens_compare_exactly() {
        assert!(token_matches(b"secret", b"secret\n"));
        assert!(token_matches(b"secret", b"secret"));
        assert!(!token_matches(b"secre", b"secret\n"));
        assert!(!token_matches(b"", b"\n"));
        assert!(!token_matches(b"secret ", b"secret"));
    }
}
