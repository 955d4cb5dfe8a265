//! The **auth** seam: who may read and write a document.
//!
//! The gateway asks once at connect (PROTOCOL.md 3.2: a denial is answered with `unauthorized`
//! after the upgrade) and checks the granted [`Access`] on every write. `--auth open` grants
//! read-write to any session key, as the reference server's example backend does; token and
//! callback modes plug in here.

use async_trait::async_trait;
use secsync_protocol::{DocumentId, SessionKey};

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
}

/// Access was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("access denied")]
pub struct Denied;

#[async_trait]
pub trait Authorizer: Send + Sync + 'static {
    async fn authorize(&self, doc: &DocumentId, session_key: &SessionKey)
        -> Result<Access, Denied>;
}

/// Every session key may read and write every document (development, and the reference's
/// default behaviour).
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenAccess;

#[async_trait]
impl Authorizer for OpenAccess {
    async fn authorize(&self, _doc: &DocumentId, _key: &SessionKey) -> Result<Access, Denied> {
        Ok(Access::ReadWrite)
    }
}
