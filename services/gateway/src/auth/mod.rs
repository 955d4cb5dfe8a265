//! The **auth** seam: who may read and write a document, and for how long.
//!
//! The gateway asks once at connect (PROTOCOL.md 3.2: a denial is answered with `unauthorized`
//! after the upgrade) and checks the granted [`Access`] on every write. The [`Grant`] also says
//! when the session ends (a token's expiry) and the id an administrator can revoke it by; the
//! gateway enforces both through [`crate::revocation`]. Modes (`--auth`): [`OpenAccess`] grants
//! read-write to any session key, as the reference server's example backend does; [`jwt`] checks
//! a signed token passed as the session key; [`callback`] asks the application over HTTP.

pub mod callback;
pub mod jwt;

use std::sync::Arc;

use async_trait::async_trait;
use secsync_protocol::{DocumentId, SessionKey};

use crate::revocation::Revocation;

/// What a session may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadWrite,
    /// Load and receive; snapshots and updates are refused, ephemeral messages allowed.
    ReadOnly,
}

impl Access {
    pub fn can_write(self) -> bool {
        self == Access::ReadWrite
    }

    /// The right as tokens and the callback spell it: `read` or `read-write`.
    pub fn parse(text: &str) -> Option<Access> {
        match text {
            "read" => Some(Access::ReadOnly),
            "read-write" => Some(Access::ReadWrite),
            _ => None,
        }
    }
}

/// What an authorizer granted a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub access: Access,
    /// Unix seconds at which the session ends (a token's `exp`); `None`: it does not expire.
    pub expires_at: Option<u64>,
    /// The id an administrator revokes the session by (a token's `jti`, the callback's
    /// `revocationId`).
    pub revocation_id: Option<Arc<str>>,
    /// When the credential was issued (unix seconds); a revocation of the document refuses
    /// credentials issued before it. `None`: not a credential that outlives a revocation (open
    /// mode, a fresh callback decision).
    pub issued_at: Option<u64>,
}

impl Grant {
    /// Read-write, forever, not revocable by id.
    pub fn open() -> Self {
        Self {
            access: Access::ReadWrite,
            expires_at: None,
            revocation_id: None,
            issued_at: None,
        }
    }
}

/// Access was refused; `reason` is a short fixed code for logs (never the key or the token).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("access denied: {reason}")]
pub struct Denied {
    pub reason: &'static str,
}

impl Denied {
    pub const fn new(reason: &'static str) -> Self {
        Self { reason }
    }
}

#[async_trait]
pub trait Authorizer: Send + Sync + 'static {
    async fn authorize(&self, doc: &DocumentId, session_key: &SessionKey) -> Result<Grant, Denied>;

    /// A revocation reached this gateway: forget any cached decision it may concern.
    fn revoked(&self, _revocation: &Revocation) {}
}

/// Every session key may read and write every document (development, and the reference's
/// default behaviour).
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenAccess;

#[async_trait]
impl Authorizer for OpenAccess {
    async fn authorize(&self, _doc: &DocumentId, _key: &SessionKey) -> Result<Grant, Denied> {
        Ok(Grant::open())
    }
}

/// Unix time in seconds.
pub fn unix_now() -> u64 {
    wall_clock().as_secs()
}

/// Now, since the Unix epoch: tokens and the callback state expiry in wall-clock time, so
/// their checks need it (the issuer's and the gateways' clocks are assumed in sync).
#[allow(clippy::disallowed_methods)]
pub fn wall_clock() -> std::time::Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

/// A secret file's content without one trailing line break (editors and `echo` add one).
pub fn strip_line_break(bytes: &[u8]) -> &[u8] {
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    bytes.strip_suffix(b"\r").unwrap_or(bytes)
}
