//! The gRPC layer over the core: request validation, chunked streaming, the `Submit` stream
//! that carries the gateways' writes, and the one mapping of core errors to gRPC statuses.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt as _};
use secsync_protocol::{Clock, Clocks, DocumentId, LoadMode, LoadRequest, SnapshotId};
use secsync_rpc::v1 as pb;
use secsync_rpc::v1::persistence_server::Persistence;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

use crate::backend::{Backend, EventKind};
use crate::core::{Core, CoreError, Kind, LoadedDocument, Outcome};

/// Bytes of body text per streamed chunk; well below any message size limit.
pub const CHUNK_BYTES: usize = 256 * 1024;
/// Default and largest number of events per `ReadEvents` call.
pub const MAX_EVENTS: u32 = 10_000;

/// Most submissions of one `Submit` stream being decided at once: past it the stream is not
/// read, and HTTP/2 flow control holds the sender back.
pub const STREAM_IN_FLIGHT: usize = 4096;

/// The tonic service.
#[derive(Debug)]
pub struct PersistenceService<B: Backend> {
    core: Core<B>,
    /// Turns true when the server shuts down: `Submit` streams then stop reading, answer what
    /// they read and end, so that a graceful shutdown is not held open by them.
    closing: watch::Receiver<bool>,
}

impl<B: Backend> PersistenceService<B> {
    /// A service whose `Submit` streams end only when their clients end them.
    pub fn new(core: Core<B>) -> Self {
        Self::closing_on(core, watch::channel(false).1)
    }

    /// A service whose `Submit` streams end once `closing` turns true.
    pub fn closing_on(core: Core<B>, closing: watch::Receiver<bool>) -> Self {
        Self { core, closing }
    }

    async fn submit_unary(
        &self,
        kind: Kind,
        document: &str,
        body: &str,
        id: Option<&pb::RequestId>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        let outcome = submit_one(&self.core, kind, document, body, id).await?;
        Ok(Response::new(submit_response(outcome)))
    }

    /// Serves one `Submit` stream: every request is decided in a task of its own, concurrently
    /// with the others (each document's worker keeps its order), and answered by its tag as soon
    /// as it is decided. A task each, not one task polling them all: parsing a large snapshot
    /// must not hold up the other writes of the gateway's stream. Public so that a wrapper can
    /// watch the requests go by (the balancing test counts them).
    pub fn submit_stream<S>(&self, mut requests: S) -> ChunkStream<pb::SubmitResult>
    where
        S: Stream<Item = Result<pb::SubmitRequest, Status>> + Send + Unpin + 'static,
    {
        let core = self.core.clone();
        let mut closing = self.closing.clone();
        let (results, answers) = mpsc::channel(STREAM_IN_FLIGHT);
        tokio::spawn(async move {
            let deciding = Arc::new(tokio::sync::Semaphore::new(STREAM_IN_FLIGHT));
            loop {
                // A permit before reading: past STREAM_IN_FLIGHT undecided requests the stream
                // is not read.
                let request = tokio::select! {
                    biased;
                    () = closed(&mut closing) => break,
                    request = async {
                        let permit = deciding.clone().acquire_owned().await.ok()?;
                        Some((permit, requests.next().await))
                    } => request,
                };
                match request {
                    Some((permit, Some(Ok(request)))) => {
                        let (core, results) = (core.clone(), results.clone());
                        tokio::spawn(async move {
                            let result = submit_tagged(core, request).await;
                            // An error: the client is gone, nobody is left to answer.
                            let _ = results.send(Ok(result)).await;
                            drop(permit);
                        });
                    }
                    Some((_, Some(Err(error)))) => {
                        tracing::debug!(%error, "submit stream broke");
                        break;
                    }
                    Some((_, None)) | None => break,
                }
            }
            // The answers end once every request read is answered: each task holds a sender.
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(answers))
    }
}

/// Waits until `closing` is true; forever when its sender is gone without having said so.
async fn closed(closing: &mut watch::Receiver<bool>) {
    if closing.wait_for(|closing| *closing).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// One submission, as both the unary calls and the stream decide it.
async fn submit_one<B: Backend>(
    core: &Core<B>,
    kind: Kind,
    document: &str,
    body: &str,
    id: Option<&pb::RequestId>,
) -> Result<Outcome, Status> {
    let doc = document_id(document)?;
    let outcome = core
        .submit(doc, kind, body, request_id(id))
        .await
        .map_err(status)?;
    tracing::debug!(?kind, ?outcome, "submitted");
    Ok(outcome)
}

/// One request of a `Submit` stream, in a server span of its own parented to the trace context
/// it carries (the stream itself gets no span: it lives as long as its gateway).
async fn submit_tagged<B: Backend>(core: Core<B>, request: pb::SubmitRequest) -> pb::SubmitResult {
    use pb::submit_result::Result as R;
    use tracing::Instrument as _;
    let kind = match pb::SubmitKind::try_from(request.kind) {
        Ok(pb::SubmitKind::Snapshot) => Some(Kind::Snapshot),
        Ok(pb::SubmitKind::Update) => Some(Kind::Update),
        _ => None,
    };
    let span = tracing::info_span!(
        "rpc",
        otel.name = "secsync.persistence.v1.Persistence/Submit",
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = "secsync.persistence.v1.Persistence",
        rpc.method = "Submit",
        submit.kind = match kind {
            Some(Kind::Snapshot) => "snapshot",
            Some(Kind::Update) => "update",
            None => "unknown",
        },
    );
    secsync_telemetry::propagation::set_parent(&span, |key| {
        request.trace_context.get(key).cloned()
    });
    let decided = async {
        let kind =
            kind.ok_or_else(|| Status::invalid_argument("kind: not a snapshot or update"))?;
        submit_one(
            &core,
            kind,
            &request.document_id,
            &request.body,
            request.request_id.as_ref(),
        )
        .await
    }
    .instrument(span)
    .await;
    let result = match decided {
        Ok(outcome) => R::Decided(submit_response(outcome)),
        Err(status) => R::Error(pb::SubmitError {
            code: status.code() as i32,
            message: status.message().to_owned(),
        }),
    };
    pb::SubmitResult {
        tag: request.tag,
        result: Some(result),
    }
}

/// Groups items into batches of about `CHUNK_BYTES` (one item may exceed it alone).
fn batches<T>(items: impl IntoIterator<Item = T>, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut all = Vec::new();
    let mut batch = Vec::new();
    let mut bytes = 0;
    for item in items {
        let n = size(&item);
        if bytes + n > CHUNK_BYTES && !batch.is_empty() {
            all.push(std::mem::take(&mut batch));
            bytes = 0;
        }
        bytes += n;
        batch.push(item);
    }
    if !batch.is_empty() {
        all.push(batch);
    }
    all
}

/// The one mapping of core errors to statuses. Internal detail is logged, never sent.
fn status(error: CoreError) -> Status {
    match error {
        CoreError::Unavailable(_) => Status::unavailable("storage unavailable"),
        CoreError::BadRequest(message) => Status::invalid_argument(message),
        CoreError::Internal(message) => {
            tracing::error!(error = %message, "internal error");
            Status::internal("internal error")
        }
    }
}

fn document_id(text: &str) -> Result<DocumentId, Status> {
    DocumentId::parse(text).map_err(|e| Status::invalid_argument(format!("document_id: {e}")))
}

fn request_id(id: Option<&pb::RequestId>) -> Option<String> {
    id.map(|r| format!("{}/{}/{}", r.gateway, r.connection, r.frame))
}

fn submit_response(outcome: Outcome) -> pb::SubmitResponse {
    let result = match outcome {
        Outcome::Accepted { sequence } => {
            pb::submit_response::Result::Accepted(pb::Accepted { sequence })
        }
        Outcome::Rejected { reason, sequence } => {
            pb::submit_response::Result::Rejected(pb::Rejected {
                reason: reason.code().to_owned(),
                sequence,
            })
        }
    };
    pb::SubmitResponse {
        result: Some(result),
    }
}

/// Pieces of at most `max` bytes, sharing `body`'s storage (the receiver joins them before it
/// reads any text, so a piece may end inside a character).
fn split_shared(body: &bytes::Bytes, max: usize) -> Vec<bytes::Bytes> {
    (0..body.len())
        .step_by(max)
        .map(|start| body.slice(start..body.len().min(start + max)))
        .collect()
}

/// The chunks of a load: header, snapshot parts, update batches of about `CHUNK_BYTES`.
pub fn load_chunks(loaded: LoadedDocument) -> Vec<pb::LoadDocumentChunk> {
    use pb::load_document_chunk::Part;
    let header = pb::LoadHeader {
        found: loaded.found,
        sequence: loaded.sequence,
        active_snapshot_id: loaded
            .active_snapshot_id
            .as_ref()
            .map(|s| s.as_str().to_owned()),
        has_snapshot: loaded.snapshot.is_some(),
        snapshot_len: loaded.snapshot.as_ref().map_or(0, |s| s.len() as u64),
        has_chain: loaded.chain.is_some(),
        chain: loaded
            .chain
            .unwrap_or_default()
            .into_iter()
            .map(|e| pb::ProofEntry {
                snapshot_id: e.snapshot_id.as_str().to_owned(),
                parent_snapshot_proof: e.parent_snapshot_proof,
                snapshot_ciphertext_hash: e.snapshot_ciphertext_hash,
            })
            .collect(),
        update_count: loaded.updates.len() as u64,
    };
    let mut chunks = vec![pb::LoadDocumentChunk {
        part: Some(Part::Header(header)),
    }];
    if let Some(snapshot) = &loaded.snapshot {
        chunks.extend(split_shared(snapshot, CHUNK_BYTES).into_iter().map(|p| {
            pb::LoadDocumentChunk {
                part: Some(Part::SnapshotPart(p)),
            }
        }));
    }
    chunks.extend(
        batches(loaded.updates, bytes::Bytes::len)
            .into_iter()
            .map(|bodies| pb::LoadDocumentChunk {
                part: Some(Part::Updates(pb::UpdateBodies { bodies })),
            }),
    );
    chunks
}

/// A stream of answers, as the generated service trait wants them.
pub type ChunkStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl<B: Backend> Persistence for PersistenceService<B> {
    type LoadDocumentStream = ChunkStream<pb::LoadDocumentChunk>;
    type ReadEventsStream = ChunkStream<pb::ReadEventsChunk>;
    type SubmitStream = ChunkStream<pb::SubmitResult>;

    async fn load_document(
        &self,
        request: Request<pb::LoadDocumentRequest>,
    ) -> Result<Response<Self::LoadDocumentStream>, Status> {
        let req = request.into_inner();
        let doc = document_id(&req.document_id)?;
        let known_snapshot_id = req
            .known_snapshot_id
            .as_deref()
            .map(SnapshotId::parse)
            .transpose()
            .map_err(|e| Status::invalid_argument(format!("known_snapshot_id: {e}")))?;
        let known_clocks = req
            .known_clocks
            .into_iter()
            .map(|(k, v)| Clock::new(v).map(|c| (k, c)))
            .collect::<Result<Clocks, _>>()
            .map_err(|e| Status::invalid_argument(format!("known_clocks: {e}")))?;
        let mode = if req.mode == pb::LoadMode::Delta as i32 {
            LoadMode::Delta
        } else {
            LoadMode::Complete
        };
        let load = LoadRequest {
            mode,
            known_snapshot_id,
            known_clocks,
        };
        let loaded = self
            .core
            .load(&doc, &load, req.create)
            .await
            .map_err(status)?;
        let chunks = load_chunks(loaded);
        Ok(Response::new(Box::pin(tokio_stream::iter(
            chunks.into_iter().map(Ok),
        ))))
    }

    async fn submit_snapshot(
        &self,
        request: Request<pb::SubmitSnapshotRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        let req = request.into_inner();
        self.submit_unary(
            Kind::Snapshot,
            &req.document_id,
            &req.body,
            req.request_id.as_ref(),
        )
        .await
    }

    async fn submit_update(
        &self,
        request: Request<pb::SubmitUpdateRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        let req = request.into_inner();
        self.submit_unary(
            Kind::Update,
            &req.document_id,
            &req.body,
            req.request_id.as_ref(),
        )
        .await
    }

    async fn submit(
        &self,
        request: Request<Streaming<pb::SubmitRequest>>,
    ) -> Result<Response<Self::SubmitStream>, Status> {
        Ok(Response::new(self.submit_stream(request.into_inner())))
    }

    async fn read_events(
        &self,
        request: Request<pb::ReadEventsRequest>,
    ) -> Result<Response<Self::ReadEventsStream>, Status> {
        let req = request.into_inner();
        let doc = document_id(&req.document_id)?;
        let limit = if req.limit == 0 {
            MAX_EVENTS
        } else {
            req.limit.min(MAX_EVENTS)
        };
        let events = self
            .core
            .read_events(&doc, req.after_sequence, limit)
            .await
            .map_err(status)?;
        let events = events.into_iter().map(|event| pb::Event {
            sequence: event.seq,
            kind: match event.kind {
                EventKind::Snapshot => pb::EventKind::Snapshot,
                EventKind::Update => pb::EventKind::Update,
            } as i32,
            body: event.body,
        });
        let chunks: Vec<_> = batches(events, |e| e.body.len())
            .into_iter()
            .map(|events| pb::ReadEventsChunk { events })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(
            chunks.into_iter().map(Ok),
        ))))
    }

    async fn get_heads(
        &self,
        request: Request<pb::GetHeadsRequest>,
    ) -> Result<Response<pb::GetHeadsResponse>, Status> {
        let ids = request
            .into_inner()
            .document_ids
            .iter()
            .map(|d| document_id(d))
            .collect::<Result<Vec<_>, _>>()?;
        let heads = self.core.heads(&ids).await.map_err(status)?;
        Ok(Response::new(pb::GetHeadsResponse {
            heads: ids
                .iter()
                .map(|d| (d.as_str().to_owned(), heads.get(d).copied().unwrap_or(0)))
                .collect(),
        }))
    }
}

/// The span of one call, following OpenTelemetry's RPC conventions, parented to the caller's
/// trace context from the request metadata. Health and reflection calls get none.
fn rpc_span(request: &tonic::codegen::http::Request<()>) -> tracing::Span {
    let path = request.uri().path().trim_start_matches('/');
    let Some((service, method)) = path.split_once('/') else {
        return tracing::Span::none();
    };
    // A `Submit` stream lasts as long as its gateway: each request in it gets its own span.
    if service != "secsync.persistence.v1.Persistence" || method == "Submit" {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "rpc",
        otel.name = path,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
    );
    secsync_telemetry::propagation::set_parent(&span, |key| {
        request
            .headers()
            .get(key)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    });
    span
}

/// Runs migrations (retrying while the database is down), then serves plaintext gRPC with
/// health and reflection on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    backend: crate::postgres::PgBackend,
    options: crate::core::CoreOptions,
    max_message_bytes: usize,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    serve_with(
        listener,
        backend,
        options,
        ServeOptions {
            max_message_bytes,
            tls: None,
            health_listener: None,
        },
        shutdown,
    )
    .await
}

/// How the gRPC server is served.
#[derive(Debug)]
pub struct ServeOptions {
    /// Largest gRPC message either way.
    pub max_message_bytes: usize,
    /// TLS (and client certificates, when it names a client CA); `None`: plaintext.
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// Where to serve `grpc.health.v1` alone, in plaintext: probes that speak neither TLS nor
    /// mutual TLS (Kubernetes' gRPC probe) check readiness there.
    pub health_listener: Option<tokio::net::TcpListener>,
}

/// [`serve`], with TLS when `serve.tls` asks for it. Bad certificates or keys are an error
/// before anything else happens (before migrations, which wait for the database).
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    backend: crate::postgres::PgBackend,
    options: crate::core::CoreOptions,
    serve: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use std::time::Duration;
    use tonic_health::ServingStatus;

    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = serve.tls {
        server = server
            .tls_config(tls)
            .map_err(|e| format!("TLS certificate or key: {:#}", anyhow::Error::new(e)))?;
    }
    let max_message_bytes = serve.max_message_bytes;

    let (health, health_service) = tonic_health::server::health_reporter();
    let service_name = "secsync.persistence.v1.Persistence";
    health
        .set_service_status(service_name, ServingStatus::NotServing)
        .await;
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    if let Some(listener) = serve.health_listener {
        // Nothing but the health status, which is no secret; it ends with the process.
        let health_only = health_service.clone();
        tokio::spawn(async move {
            if let Err(error) = tonic::transport::Server::builder()
                .add_service(health_only)
                .serve_with_incoming(
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                )
                .await
            {
                tracing::error!(%error, "the plaintext health server stopped");
            }
        });
    }

    let mut delay = Duration::from_millis(100);
    loop {
        match backend.migrate().await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, "migrations failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }

    // Readiness follows the database: NOT_SERVING while it does not answer.
    let probe = backend.clone();
    let reporter = health.clone();
    tokio::spawn(async move {
        loop {
            let status = if probe.ping().await {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            reporter.set_service_status(service_name, status).await;
            reporter.set_service_status("", status).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });

    let core = Core::start(backend, options);
    let (closing, closing_seen) = watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = closing.send(true);
    };
    let service = secsync_rpc::v1::persistence_server::PersistenceServer::new(
        PersistenceService::closing_on(core, closing_seen),
    )
    .max_decoding_message_size(max_message_bytes)
    .max_encoding_message_size(max_message_bytes);
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(secsync_rpc::v1::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    server
        .trace_fn(rpc_span)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(service)
        // tonic's own nodelay setting applies only to listeners it binds itself. Without it an
        // answer's trailers wait for the client's delayed ACK of its headers: a 40 ms stall that
        // was the p99 of every load (BENCHMARKS.md).
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await?;
    Ok(())
}
