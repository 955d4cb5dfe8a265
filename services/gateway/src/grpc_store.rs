//! The store over gRPC: calls the persistence service, balanced over every address its name
//! resolves to (a Kubernetes headless service lists one per pod) and following changes.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use secsync_protocol::{DocumentId, LoadMode, LoadRequest, ProofEntry, Reason, SnapshotId};
use secsync_rpc::v1 as pb;
use secsync_rpc::v1::persistence_client::PersistenceClient;
use tokio_stream::StreamExt as _;
use tonic::transport::{Channel, Endpoint};

use crate::store::{Event, Loaded, RequestId, Store, StoreError, SubmitKind, Submitted};

/// How the gateway reaches persistence.
#[derive(Debug, Clone)]
pub struct GrpcStoreOptions {
    /// `http://host:port`; the host may resolve to several addresses.
    pub url: String,
    /// Largest gRPC message either way (frame limit plus room for the envelope).
    pub max_message_bytes: usize,
    /// Deadline of one call.
    pub call_timeout: Duration,
    /// How often the name is resolved again.
    pub resolve_every: Duration,
}

/// The gRPC store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct GrpcStore {
    client: PersistenceClient<Channel>,
    call_timeout: Duration,
}

impl GrpcStore {
    /// Builds the balanced channel and starts the resolver task; connects lazily.
    pub fn new(options: &GrpcStoreOptions) -> Result<Self, StoreError> {
        let uri: tonic::transport::Uri = options
            .url
            .parse()
            .map_err(|e| StoreError::Failed(format!("bad persistence url: {e}")))?;
        let host = uri.host().unwrap_or("127.0.0.1").to_owned();
        let port = uri.port_u16().unwrap_or(50051);
        let (channel, changes) = Channel::balance_channel::<SocketAddr>(64);
        let resolve_every = options.resolve_every;
        tokio::spawn(async move {
            let mut known: HashSet<SocketAddr> = HashSet::new();
            loop {
                if let Ok(addrs) = tokio::net::lookup_host((host.as_str(), port)).await {
                    let current: HashSet<SocketAddr> = addrs.collect();
                    for gone in known.difference(&current) {
                        let _ = changes.send(tower_change_remove(*gone)).await;
                    }
                    for new in current.difference(&known) {
                        if let Ok(endpoint) = Endpoint::from_shared(format!("http://{new}")) {
                            let endpoint = endpoint
                                .connect_timeout(Duration::from_secs(2))
                                .tcp_nodelay(true);
                            let _ = changes.send(tower_change_insert(*new, endpoint)).await;
                        }
                    }
                    known = current;
                }
                tokio::time::sleep(resolve_every).await;
            }
        });
        let client = PersistenceClient::new(channel)
            .max_decoding_message_size(options.max_message_bytes)
            .max_encoding_message_size(options.max_message_bytes);
        Ok(Self {
            client,
            call_timeout: options.call_timeout,
        })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.call_timeout);
        // The caller's trace continues in persistence.
        let metadata = request.metadata_mut();
        secsync_telemetry::propagation::inject(&tracing::Span::current(), |key, value| {
            if let (Ok(key), Ok(value)) = (
                tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
                value.parse(),
            ) {
                metadata.insert(key, value);
            }
        });
        request
    }
}

fn tower_change_insert(
    addr: SocketAddr,
    endpoint: Endpoint,
) -> tonic::transport::channel::Change<SocketAddr, Endpoint> {
    tonic::transport::channel::Change::Insert(addr, endpoint)
}

fn tower_change_remove(
    addr: SocketAddr,
) -> tonic::transport::channel::Change<SocketAddr, Endpoint> {
    tonic::transport::channel::Change::Remove(addr)
}

/// The one mapping of gRPC statuses to store errors.
fn store_error(status: &tonic::Status) -> StoreError {
    use tonic::Code;
    match status.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Unknown
        | Code::ResourceExhausted
        | Code::Aborted => StoreError::Unavailable(status.message().to_owned()),
        _ => StoreError::Failed(format!("{:?}: {}", status.code(), status.message())),
    }
}

fn proof_entry(entry: pb::ProofEntry) -> Result<ProofEntry, StoreError> {
    Ok(ProofEntry {
        snapshot_id: SnapshotId::parse(&entry.snapshot_id)
            .map_err(|e| StoreError::Failed(format!("chain entry: {e}")))?,
        parent_snapshot_proof: entry.parent_snapshot_proof,
        snapshot_ciphertext_hash: entry.snapshot_ciphertext_hash,
    })
}

fn submitted(response: pb::SubmitResponse) -> Result<Submitted, StoreError> {
    match response.result {
        Some(pb::submit_response::Result::Accepted(a)) => Ok(Submitted::Accepted {
            sequence: a.sequence,
        }),
        Some(pb::submit_response::Result::Rejected(r)) => Ok(Submitted::Rejected {
            reason: Reason::from_code(&r.reason)
                .ok_or_else(|| StoreError::Failed(format!("unknown reason {}", r.reason)))?,
            sequence: r.sequence,
        }),
        None => Err(StoreError::Failed("empty submit response".into())),
    }
}

#[async_trait]
impl Store for GrpcStore {
    async fn load(
        &self,
        doc: &DocumentId,
        request: &LoadRequest,
        create: bool,
    ) -> Result<Loaded, StoreError> {
        use pb::load_document_chunk::Part;
        let message = pb::LoadDocumentRequest {
            document_id: doc.as_str().to_owned(),
            mode: match request.mode {
                LoadMode::Complete => pb::LoadMode::Complete,
                LoadMode::Delta => pb::LoadMode::Delta,
            } as i32,
            known_snapshot_id: request
                .known_snapshot_id
                .as_ref()
                .map(|s| s.as_str().to_owned()),
            known_clocks: request
                .known_clocks
                .iter()
                .map(|(k, v)| (k.clone(), v.get()))
                .collect(),
            create,
        };
        let mut stream = self
            .client
            .clone()
            .load_document(self.request(message))
            .await
            .map_err(|s| store_error(&s))?
            .into_inner();
        let mut loaded = Loaded::default();
        let mut snapshot = String::new();
        let mut has_snapshot = false;
        while let Some(chunk) = stream.next().await {
            match chunk.map_err(|s| store_error(&s))?.part {
                Some(Part::Header(h)) => {
                    loaded.found = h.found;
                    loaded.sequence = h.sequence;
                    loaded.active_snapshot_id = h
                        .active_snapshot_id
                        .map(|s| SnapshotId::parse(&s))
                        .transpose()
                        .map_err(|e| StoreError::Failed(format!("active snapshot id: {e}")))?;
                    has_snapshot = h.has_snapshot;
                    snapshot.reserve(usize::try_from(h.snapshot_len).unwrap_or(0));
                    loaded
                        .updates
                        .reserve(usize::try_from(h.update_count).unwrap_or(0));
                    loaded.chain = if h.has_chain {
                        Some(
                            h.chain
                                .into_iter()
                                .map(proof_entry)
                                .collect::<Result<_, _>>()?,
                        )
                    } else {
                        None
                    };
                }
                Some(Part::SnapshotPart(part)) => snapshot.push_str(&part),
                Some(Part::Updates(batch)) => loaded.updates.extend(batch.bodies),
                None => {}
            }
        }
        if has_snapshot {
            loaded.snapshot = Some(snapshot);
        }
        Ok(loaded)
    }

    async fn submit(
        &self,
        doc: &DocumentId,
        kind: SubmitKind,
        body: &str,
        request_id: &RequestId,
    ) -> Result<Submitted, StoreError> {
        let id = Some(pb::RequestId {
            gateway: request_id.gateway.clone(),
            connection: request_id.connection,
            frame: request_id.frame,
        });
        let mut client = self.client.clone();
        let response = match kind {
            SubmitKind::Snapshot => {
                client
                    .submit_snapshot(self.request(pb::SubmitSnapshotRequest {
                        document_id: doc.as_str().to_owned(),
                        body: body.to_owned(),
                        request_id: id,
                    }))
                    .await
            }
            SubmitKind::Update => {
                client
                    .submit_update(self.request(pb::SubmitUpdateRequest {
                        document_id: doc.as_str().to_owned(),
                        body: body.to_owned(),
                        request_id: id,
                    }))
                    .await
            }
        };
        submitted(response.map_err(|s| store_error(&s))?.into_inner())
    }

    async fn events_after(
        &self,
        doc: &DocumentId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<Event>, StoreError> {
        let mut stream = self
            .client
            .clone()
            .read_events(self.request(pb::ReadEventsRequest {
                document_id: doc.as_str().to_owned(),
                after_sequence: after,
                limit,
            }))
            .await
            .map_err(|s| store_error(&s))?
            .into_inner();
        let mut events = Vec::new();
        while let Some(chunk) = stream.next().await {
            for event in chunk.map_err(|s| store_error(&s))?.events {
                let kind = if event.kind == pb::EventKind::Snapshot as i32 {
                    SubmitKind::Snapshot
                } else {
                    SubmitKind::Update
                };
                events.push(Event {
                    sequence: event.sequence,
                    kind,
                    body: event.body,
                });
            }
        }
        Ok(events)
    }

    async fn heads(&self, docs: &[DocumentId]) -> Result<Vec<(DocumentId, u64)>, StoreError> {
        let response = self
            .client
            .clone()
            .get_heads(self.request(pb::GetHeadsRequest {
                document_ids: docs.iter().map(|d| d.as_str().to_owned()).collect(),
            }))
            .await
            .map_err(|s| store_error(&s))?
            .into_inner();
        Ok(docs
            .iter()
            .map(|d| {
                (
                    d.clone(),
                    response.heads.get(d.as_str()).copied().unwrap_or(0),
                )
            })
            .collect())
    }

    async fn ready(&self) -> bool {
        self.heads(&[]).await.is_ok()
    }
}
