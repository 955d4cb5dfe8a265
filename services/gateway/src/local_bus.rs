//! The bus inside one process, for the embedded single-node binary (and for several gateways
//! sharing one process, as tests may run them).
//!
//! Each subscription is a bounded queue. A subscriber that falls behind loses the message, as a
//! NATS slow consumer would, and the bus tells the hub through [`Bus::resyncs`]: the hub then
//! compares every document's head with what it delivered and reads the gap from the store, so
//! nothing is ever skipped and memory stays bounded.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use secsync_protocol::DocumentId;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::bus::{Bus, BusError, BusEvent, BusStream, RevocationStream};
use crate::revocation::Revocation;

/// Revocations queued for a subscriber; they are rare.
const REVOCATION_QUEUE: usize = 1024;

/// Messages queued for one subscription before it counts as a slow consumer.
pub const DEFAULT_SUBSCRIPTION_CAPACITY: usize = 4096;

/// An in-process bus.
#[derive(Debug)]
pub struct LocalBus {
    capacity: usize,
    subscribers: Mutex<HashMap<DocumentId, Vec<mpsc::Sender<BusEvent>>>>,
    revocations: Mutex<Vec<mpsc::Sender<Revocation>>>,
    resync: watch::Sender<u64>,
}

impl Default for LocalBus {
    fn default() -> Self {
        Self::new(DEFAULT_SUBSCRIPTION_CAPACITY)
    }
}

impl LocalBus {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            subscribers: Mutex::new(HashMap::new()),
            revocations: Mutex::new(Vec::new()),
            resync: watch::channel(0).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<DocumentId, Vec<mpsc::Sender<BusEvent>>>> {
        self.subscribers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl Bus for LocalBus {
    async fn subscribe(&self, doc: &DocumentId) -> Result<BusStream, BusError> {
        let (sender, receiver) = mpsc::channel(self.capacity);
        self.lock().entry(doc.clone()).or_default().push(sender);
        Ok(Box::pin(ReceiverStream::new(receiver)))
    }

    async fn publish(&self, doc: &DocumentId, event: &BusEvent) -> Result<(), BusError> {
        let mut lagged = false;
        {
            let mut subscribers = self.lock();
            let Some(senders) = subscribers.get_mut(doc) else {
                return Ok(());
            };
            // Dropped streams close their queue: forget them here.
            senders.retain(|sender| match sender.try_send(event.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    lagged = true;
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
            if senders.is_empty() {
                subscribers.remove(doc);
            }
        }
        if lagged {
            tracing::warn!(doc = %doc, "in-process bus subscriber behind: message dropped, resyncing");
            self.resync.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    fn resyncs(&self) -> watch::Receiver<u64> {
        self.resync.subscribe()
    }

    fn connected(&self) -> bool {
        true
    }

    async fn publish_revocation(&self, revocation: &Revocation) -> Result<(), BusError> {
        let mut subscribers = self
            .revocations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        subscribers.retain(|sender| match sender.try_send(revocation.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!("revocation subscriber behind: revocation dropped");
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        Ok(())
    }

    async fn subscribe_revocations(&self) -> Result<RevocationStream, BusError> {
        let (sender, receiver) = mpsc::channel(REVOCATION_QUEUE);
        self.revocations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(sender);
        Ok(Box::pin(ReceiverStream::new(receiver)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use futures::StreamExt as _;

    use super::*;
    use crate::bus::Origin;

    fn ephemeral(n: u64) -> BusEvent {
        BusEvent::Ephemeral {
            origin: Origin {
                gateway: "gw".into(),
                connection: n,
            },
            body: format!("{{\"n\":{n}}}"),
        }
    }

    #[tokio::test]
    async fn delivers_per_document_in_order_and_forgets_dropped_streams() {
        let bus = LocalBus::new(8);
        let (a, b) = (
            DocumentId::parse("a").unwrap(),
            DocumentId::parse("b").unwrap(),
        );
        let mut first = bus.subscribe(&a).await.unwrap();
        let mut second = bus.subscribe(&a).await.unwrap();
        let mut other = bus.subscribe(&b).await.unwrap();
        for n in 0..3 {
            bus.publish(&a, &ephemeral(n)).await.unwrap();
        }
        for n in 0..3 {
            assert_eq!(first.next().await, Some(ephemeral(n)));
            assert_eq!(second.next().await, Some(ephemeral(n)));
        }
        bus.publish(&b, &ephemeral(9)).await.unwrap();
        assert_eq!(other.next().await, Some(ephemeral(9)));
        drop(second);
        bus.publish(&a, &ephemeral(3)).await.unwrap();
        assert_eq!(bus.lock()[&a].len(), 1);
        drop((first, other));
        bus.publish(&a, &ephemeral(4)).await.unwrap();
        bus.publish(&b, &ephemeral(4)).await.unwrap();
        assert!(bus.lock().is_empty());
    }

    #[tokio::test]
    async fn a_full_subscription_asks_for_a_resync() {
        let bus = LocalBus::new(2);
        let doc = DocumentId::parse("d").unwrap();
        let mut resyncs = bus.resyncs();
        let mut stream = bus.subscribe(&doc).await.unwrap();
        for n in 0..3 {
            bus.publish(&doc, &ephemeral(n)).await.unwrap();
        }
        resyncs.changed().await.unwrap();
        assert_eq!(stream.next().await, Some(ephemeral(0)));
        assert_eq!(stream.next().await, Some(ephemeral(1)));
        bus.publish(&doc, &ephemeral(3)).await.unwrap();
        assert_eq!(stream.next().await, Some(ephemeral(3)));
    }
}
