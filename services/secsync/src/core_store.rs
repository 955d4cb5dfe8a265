//! The gateway's store seam served by the persistence core in the same process.
//!
//! The same core the persistence service runs behind gRPC: sequencing, batching, idempotency
//! and every rule stay written once. Only the error mapping lives here.

use std::collections::HashMap;

use async_trait::async_trait;
use secsync_gateway::store::{Event, Loaded, RequestId, Store, StoreError, SubmitKind, Submitted};
use secsync_persistence::backend::Backend;
use secsync_persistence::{Core, CoreError};
use secsync_protocol::{DocumentId, LoadRequest};

/// A [`Store`] over an in-process [`Core`].
#[derive(Debug)]
pub struct CoreStore<B: Backend> {
    core: Core<B>,
}

impl<B: Backend> CoreStore<B> {
    pub fn new(core: Core<B>) -> Self {
        Self { core }
    }
}

/// The one mapping of core failures to store failures.
#[allow(clippy::needless_pass_by_value)] // shaped for `map_err(store_error)`
fn store_error(error: CoreError) -> StoreError {
    match error {
        CoreError::Unavailable(message) => StoreError::Unavailable(message),
        CoreError::BadRequest(message) | CoreError::Internal(message) => {
            StoreError::Failed(message)
        }
    }
}

#[async_trait]
impl<B: Backend> Store for CoreStore<B> {
    async fn load(
        &self,
        doc: &DocumentId,
        request: &LoadRequest,
        create: bool,
    ) -> Result<Loaded, StoreError> {
        self.core
            .load(doc, request, create)
            .await
            .map_err(store_error)
    }

    async fn submit(
        &self,
        doc: &DocumentId,
        kind: SubmitKind,
        body: &str,
        request_id: &RequestId,
    ) -> Result<Submitted, StoreError> {
        self.core
            .submit(doc.clone(), kind, body, Some(request_id.to_string()))
            .await
            .map_err(store_error)
    }

    async fn events_after(
        &self,
        doc: &DocumentId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<Event>, StoreError> {
        let events = self
            .core
            .read_events(doc, after, limit)
            .await
            .map_err(store_error)?;
        Ok(events
            .into_iter()
            .map(|event| Event {
                sequence: event.seq,
                kind: event.kind,
                body: event.body,
            })
            .collect())
    }

    async fn heads(&self, docs: &[DocumentId]) -> Result<Vec<(DocumentId, u64)>, StoreError> {
        let mut heads: HashMap<DocumentId, u64> =
            self.core.heads(docs).await.map_err(store_error)?;
        Ok(docs
            .iter()
            .map(|doc| (doc.clone(), heads.remove(doc).unwrap_or(0)))
            .collect())
    }

    async fn ready(&self) -> bool {
        self.core.heads(&[]).await.is_ok()
    }
}
