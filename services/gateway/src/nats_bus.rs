//! The bus over NATS core subjects, one per document: `secsync.doc.<b64u(document id)>`, and
//! [`REVOCATIONS`] for revocations (only the services' credentials should be allowed to
//! publish there: see README.md, "Access control").
//!
//! Document ids may contain `.`, `*`, `>` or spaces, which are not legal in a subject token, so
//! the token is the id's bytes in URL-safe base64. Publishing while NATS is away is logged and
//! dropped: local delivery and writes go on, and the hub repairs remote gaps from persistence
//! once NATS is back (it is told through [`Bus::resyncs`]). A committed message's trace context
//! and acknowledgement time travel in message headers.
//!
//! NATS does not send a gateway its own messages back (`no_echo`): the hub has delivered them to
//! its local sessions already, so the echo only cost NATS and the gateway work per update.
//! Revocations published here reach this gateway's subscription through a local channel.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt as _;
use secsync_protocol::{b64, DocumentId};

use crate::bus::{Bus, BusError, BusEvent, BusStream, RevocationStream, Trace};
use crate::revocation::Revocation;

/// The subject of a document.
pub fn subject(doc: &DocumentId) -> String {
    format!("secsync.doc.{}", b64::encode(doc.as_str()))
}

/// The subject revocations travel on, to every gateway.
pub const REVOCATIONS: &str = "secsync.control.revoke";

/// The header carrying [`Trace::acked_at_us`].
const ACKED_AT: &str = "Secsync-Acked-At";

fn headers_of(trace: &Trace) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    for (key, value) in &trace.context {
        headers.insert(key.as_str(), value.as_str());
    }
    headers.insert(ACKED_AT, trace.acked_at_us.to_string().as_str());
    headers
}

fn trace_from(headers: &async_nats::HeaderMap) -> Trace {
    Trace {
        context: secsync_telemetry::propagation::HEADERS
            .iter()
            .filter_map(|key| {
                headers
                    .get(*key)
                    .map(|value| ((*key).to_owned(), value.as_str().to_owned()))
            })
            .collect(),
        acked_at_us: headers
            .get(ACKED_AT)
            .and_then(|value| value.as_str().parse().ok())
            .unwrap_or(0),
    }
}

/// NATS connection settings.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    pub url: String,
    pub auth: NatsAuth,
}

/// How the gateway authenticates to NATS. Holds secrets, so its `Debug` names only the kind
/// (and for an NKey, its public key).
#[derive(Clone, Default)]
pub enum NatsAuth {
    /// No credentials.
    #[default]
    None,
    User {
        user: String,
        password: String,
    },
    /// An NKey seed (`SU…`), checked when read.
    NKey {
        seed: String,
        public_key: String,
    },
    /// A credentials file (user JWT and NKey seed), read and parsed at connect time.
    CredsFile(std::path::PathBuf),
}

impl std::fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::User { user, .. } => f.debug_struct("User").field("user", user).finish(),
            Self::NKey { public_key, .. } => f
                .debug_struct("NKey")
                .field("public_key", public_key)
                .finish(),
            Self::CredsFile(path) => f.debug_tuple("CredsFile").field(path).finish(),
        }
    }
}

impl NatsAuth {
    /// An NKey user from its seed (the file's content; surrounding white space ignored). The
    /// error never contains the seed.
    pub fn nkey(seed: &str) -> Result<Self, String> {
        let seed = seed.trim();
        let pair = nkeys::KeyPair::from_seed(seed)
            .map_err(|_| "not an NKey seed (a line starting with SU)".to_owned())?;
        if !matches!(pair.key_pair_type(), nkeys::KeyPairType::User) {
            return Err("not the seed of an NKey user (SU…)".into());
        }
        Ok(Self::NKey {
            seed: seed.to_owned(),
            public_key: pair.public_key(),
        })
    }

    async fn apply(
        &self,
        connect: async_nats::ConnectOptions,
    ) -> Result<async_nats::ConnectOptions, BusError> {
        Ok(match self {
            Self::None => connect,
            Self::User { user, password } => {
                connect.user_and_password(user.clone(), password.clone())
            }
            Self::NKey { seed, .. } => connect.nkey(seed.clone()),
            // async-nats reads it once, here: a bad file stops the gateway at start. Its errors
            // name the file and what is wrong, never the contents.
            Self::CredsFile(path) => connect
                .credentials_file(path)
                .await
                .map_err(|e| BusError(format!("NATS credentials file {}: {e}", path.display())))?,
        })
    }
}

/// One per gateway process: with `no_echo`, two hubs sharing one would not hear each other.
#[derive(Debug)]
pub struct NatsBus {
    client: async_nats::Client,
    resync: tokio::sync::watch::Sender<u64>,
    connected: Arc<AtomicBool>,
    /// Revocations published by this gateway, for its own subscription.
    revoked_here: tokio::sync::broadcast::Sender<Revocation>,
}

impl NatsBus {
    /// Connects in the background: the gateway starts (unready) while NATS is away.
    pub async fn connect(options: &NatsOptions) -> Result<Self, BusError> {
        let (resync, _) = tokio::sync::watch::channel(0u64);
        let connected = Arc::new(AtomicBool::new(false));
        let (events_resync, events_connected) = (resync.clone(), connected.clone());
        let mut connect = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .max_reconnects(None)
            .no_echo()
            .event_callback(move |event| {
                let (resync, connected) = (events_resync.clone(), events_connected.clone());
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            connected.store(true, Ordering::SeqCst);
                            crate::metrics::metrics().nats_reconnects.add(1, &[]);
                            resync.send_modify(|n| *n += 1);
                            tracing::info!("NATS connected");
                        }
                        async_nats::Event::Disconnected => {
                            connected.store(false, Ordering::SeqCst);
                            tracing::warn!("NATS disconnected");
                        }
                        async_nats::Event::SlowConsumer(_) => {
                            resync.send_modify(|n| *n += 1);
                            tracing::warn!("NATS slow consumer: messages dropped, resyncing");
                        }
                        other => tracing::info!(event = %other, "NATS event"),
                    }
                }
            });
        tracing::info!(auth = ?options.auth, "NATS authentication");
        connect = options.auth.apply(connect).await?;
        let client = connect
            .connect(options.url.as_str())
            .await
            .map_err(|e| BusError(e.to_string()))?;
        if client.connection_state() == async_nats::connection::State::Connected {
            connected.store(true, Ordering::SeqCst);
        }
        Ok(Self {
            client,
            resync,
            connected,
            revoked_here: tokio::sync::broadcast::channel(1024).0,
        })
    }
}

#[async_trait]
impl Bus for NatsBus {
    async fn subscribe(&self, doc: &DocumentId) -> Result<BusStream, BusError> {
        let subscriber = self
            .client
            .subscribe(subject(doc))
            .await
            .map_err(|e| BusError(e.to_string()))?;
        Ok(Box::pin(subscriber.filter_map(|message| async move {
            let mut event = BusEvent::decode(&message.payload)?;
            if let (BusEvent::Committed { trace, .. }, Some(headers)) =
                (&mut event, &message.headers)
            {
                *trace = trace_from(headers);
            }
            Some(event)
        })))
    }

    async fn publish(&self, doc: &DocumentId, event: &BusEvent) -> Result<(), BusError> {
        let payload = event.encode().into();
        let result = match event {
            BusEvent::Committed { trace, .. } => {
                self.client
                    .publish_with_headers(subject(doc), headers_of(trace), payload)
                    .await
            }
            BusEvent::Ephemeral { .. } => self.client.publish(subject(doc), payload).await,
        };
        result.map_err(|e| BusError(e.to_string()))
    }

    fn resyncs(&self) -> tokio::sync::watch::Receiver<u64> {
        self.resync.subscribe()
    }

    fn connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    async fn publish_revocation(&self, revocation: &Revocation) -> Result<(), BusError> {
        self.client
            .publish(REVOCATIONS, revocation.encode().into())
            .await
            .map_err(|e| BusError(e.to_string()))?;
        // Revocations are rare and should leave now, not with the next batch of writes.
        self.client
            .flush()
            .await
            .map_err(|e| BusError(e.to_string()))?;
        // No subscriber yet (the gateway is starting) is no one to tell.
        let _ = self.revoked_here.send(revocation.clone());
        Ok(())
    }

    async fn subscribe_revocations(&self) -> Result<RevocationStream, BusError> {
        let subscriber = self
            .client
            .subscribe(REVOCATIONS)
            .await
            .map_err(|e| BusError(e.to_string()))?;
        let remote = subscriber.filter_map(|message| async move {
            let revocation = Revocation::decode(&message.payload);
            if revocation.is_none() {
                tracing::warn!("unreadable revocation on the bus ignored");
            }
            revocation
        });
        let here = futures::stream::unfold(self.revoked_here.subscribe(), |mut receiver| async {
            loop {
                match receiver.recv().await {
                    Ok(revocation) => return Some((revocation, receiver)),
                    // Over 1,024 revocations at once from this gateway's admin endpoint: the
                    // skipped ones are gone, as a slow NATS subscriber's would be.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(skipped)) => {
                        tracing::warn!(skipped, "local revocations skipped");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Ok(Box::pin(futures::stream::select(remote, here)))
    }
}
