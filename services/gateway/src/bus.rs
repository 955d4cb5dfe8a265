//! The **bus** seam: fan-out of accepted messages and ephemeral messages between gateways.
//!
//! Every gateway subscribes once per document it has clients for; whatever one gateway
//! publishes, the others receive. Ordering, de-duplication and gap repair are not the bus's job
//! (see [`crate::hub`]): accepted messages carry their per-document sequence number. NATS
//! implements this ([`crate::nats_bus`]); the embedded binary uses [`crate::local_bus`].

use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use futures::Stream;
use secsync_protocol::DocumentId;

use crate::revocation::Revocation;
use crate::store::SubmitKind;

/// Which connection sent a message, so it is never echoed back to it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    pub gateway: Arc<str>,
    pub connection: u64,
}

/// What travels beside a committed message for observability (in NATS message headers, not
/// in the payload): the trace it belongs to (W3C `traceparent`/`tracestate`) and when the
/// sending gateway queued its acknowledgement (Unix microseconds), for fan-out latency.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trace {
    pub context: Vec<(String, String)>,
    pub acked_at_us: u64,
}

/// What travels on the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusEvent {
    /// An accepted snapshot or update. `body` is `None` when it was too large to carry and must
    /// be read from persistence by its sequence number.
    Committed {
        sequence: u64,
        kind: SubmitKind,
        origin: Origin,
        body: Option<String>,
        trace: Trace,
    },
    /// An ephemeral message body, never stored.
    Ephemeral { origin: Origin, body: String },
}

impl BusEvent {
    /// Compact encoding: one header line, then the body text (the [`Trace`] travels apart).
    pub fn encode(&self) -> Vec<u8> {
        let (header, body) = match self {
            BusEvent::Committed {
                sequence,
                kind,
                origin,
                body,
                ..
            } => {
                let kind = match kind {
                    SubmitKind::Snapshot => 's',
                    SubmitKind::Update => 'u',
                };
                let reference = if body.is_some() { "" } else { " ref" };
                (
                    format!(
                        "C {sequence} {kind} {} {}{reference}\n",
                        origin.connection, origin.gateway
                    ),
                    body.as_deref().unwrap_or(""),
                )
            }
            BusEvent::Ephemeral { origin, body } => (
                format!("E {} {}\n", origin.connection, origin.gateway),
                body.as_str(),
            ),
        };
        let mut out = Vec::with_capacity(header.len() + body.len());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(body.as_bytes());
        out
    }

    /// Decodes what [`BusEvent::encode`] wrote; `None` for anything else.
    pub fn decode(bytes: &[u8]) -> Option<BusEvent> {
        let text = std::str::from_utf8(bytes).ok()?;
        let (header, body) = text.split_once('\n')?;
        let mut parts = header.split(' ');
        match parts.next()? {
            "C" => {
                let sequence = parts.next()?.parse().ok()?;
                let kind = match parts.next()? {
                    "s" => SubmitKind::Snapshot,
                    "u" => SubmitKind::Update,
                    _ => return None,
                };
                let connection = parts.next()?.parse().ok()?;
                let gateway = parts.next()?.into();
                let by_reference = parts.next() == Some("ref");
                Some(BusEvent::Committed {
                    sequence,
                    kind,
                    origin: Origin {
                        gateway,
                        connection,
                    },
                    body: (!by_reference).then(|| body.to_owned()),
                    trace: Trace::default(),
                })
            }
            "E" => {
                let connection = parts.next()?.parse().ok()?;
                let gateway = parts.next()?.into();
                Some(BusEvent::Ephemeral {
                    origin: Origin {
                        gateway,
                        connection,
                    },
                    body: body.to_owned(),
                })
            }
            _ => None,
        }
    }
}

/// A bus failure (publishing or subscribing); the hub carries on and repairs from persistence.
#[derive(Debug, Clone, thiserror::Error)]
#[error("bus error: {0}")]
pub struct BusError(pub String);

pub type BusStream = Pin<Box<dyn Stream<Item = BusEvent> + Send>>;

/// Revocations from every gateway (the publishing one included).
pub type RevocationStream = Pin<Box<dyn Stream<Item = Revocation> + Send>>;

#[async_trait]
pub trait Bus: Send + Sync + 'static {
    async fn subscribe(&self, doc: &DocumentId) -> Result<BusStream, BusError>;
    async fn publish(&self, doc: &DocumentId, event: &BusEvent) -> Result<(), BusError>;
    /// Changes whenever messages may have been lost (reconnect, slow consumer): the hub then
    /// checks every document's head against what it delivered.
    fn resyncs(&self) -> tokio::sync::watch::Receiver<u64>;
    /// Whether the bus is connected now (readiness).
    fn connected(&self) -> bool;
    /// Sends a revocation to every gateway, this one included (it applies it on arrival).
    async fn publish_revocation(&self, revocation: &Revocation) -> Result<(), BusError>;
    /// Every revocation published from now on.
    async fn subscribe_revocations(&self) -> Result<RevocationStream, BusError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip() {
        let origin = Origin {
            gateway: "gw-1".into(),
            connection: 7,
        };
        let events = [
            BusEvent::Committed {
                sequence: 42,
                kind: SubmitKind::Update,
                origin: origin.clone(),
                body: Some("{\"a\":\"x\ny\"}".into()),
                trace: Trace::default(),
            },
            BusEvent::Committed {
                sequence: 43,
                kind: SubmitKind::Snapshot,
                origin: origin.clone(),
                body: None,
                trace: Trace::default(),
            },
            BusEvent::Ephemeral {
                origin,
                body: "{}".into(),
            },
        ];
        for event in events {
            assert_eq!(BusEvent::decode(&event.encode()), Some(event));
        }
        assert_eq!(BusEvent::decode(b"X 1\n"), None);
        assert_eq!(BusEvent::decode(b"C x u 1 g\n"), None);
    }
}
