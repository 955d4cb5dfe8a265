//! The persistence core: sequencing, batching and idempotency over a [`Backend`].
//!
//! Submissions go into a bounded queue; a few worker tasks each take whatever is queued (up to
//! `max_batch`) and commit it as one transaction: lock the batch's documents in sorted order,
//! run every message through the protocol crate's rules in queue order, write what was accepted
//! with the next per-document sequence numbers, commit, answer. One commit (one fsync) covers
//! many messages of many documents; a rejected message never aborts the others because nothing
//! is written before the rules accepted it. Order is guaranteed by the row locks, not by the
//! queue, so several persistence replicas on one database stay correct.
//!
//! The usual batch (updates to documents whose rule state the core keeps from its last commit)
//! skips the reads: the rules run on the kept states and the backend writes in one step that
//! locks the documents and checks their heads first; a head another replica moved sends the
//! batch down the locked path above instead.
//!
//! A submission may carry a request id; a retry with an id already stored gets the sequence
//! number of the first acceptance instead of a clock error, so a gRPC call retried after a lost
//! response never turns a committed message into a failure or a duplicate.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use secsync_protocol::rules::proof_chain_after;
use secsync_protocol::{
    parse_client_frame, plan_load, ChainPlan, ClientFrame, DocumentId, DocumentState, LoadPlan,
    LoadRequest, ParseOptions, ProofEntry, Reason, RuleOptions, SnapshotMessage, UpdateMessage,
};
// The store seam's types live in the protocol crate, shared with the gateway.
pub use secsync_protocol::{Kind, LoadedDocument, Outcome};
use tokio::sync::{mpsc, oneshot};

use crate::backend::{
    Backend, BackendError, DocumentHead, ReadTx, SnapshotRow, StoredEvent, UpdateRow, WriteTx,
};
use crate::load_cache::{Accepted, LoadCache};
use crate::metrics::Metrics;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Tuning and rule switches of the core.
#[derive(Debug, Clone, Copy)]
pub struct CoreOptions {
    pub rules: RuleOptions,
    /// Most messages committed in one transaction.
    pub max_batch: usize,
    /// Transactions in flight at once. Each worker has its own queue and its own share of the
    /// documents (by a hash of the id), so two batches of one process never wait on each
    /// other's document locks, and the cached rule state a worker committed is the state its
    /// next batch of that document starts from.
    pub workers: usize,
    /// How long a worker's batch waits for another worker's commit to end before it commits
    /// alongside (see [`Inner::work`]). Zero: workers never wait for each other.
    pub commit_overlap_after: Duration,
    /// Submissions waiting for the workers (split evenly between their queues) before callers
    /// are made to wait.
    pub queue_capacity: usize,
    /// Documents whose rule state is kept between batches.
    pub state_cache_capacity: usize,
    /// Bytes of documents kept in memory for loads (0: none); see [`crate::load_cache`].
    pub load_cache_bytes: usize,
}

impl Default for CoreOptions {
    fn default() -> Self {
        Self {
            rules: RuleOptions::default(),
            max_batch: 256,
            // Measured on 2 cores: 2 workers 9,600 updates/s, 4 workers 6,700, 8 workers 4,700
            // (more concurrent batches mostly wait on each other's document locks).
            workers: 2,
            commit_overlap_after: Duration::from_millis(5),
            queue_capacity: 4096,
            state_cache_capacity: 10_000,
            load_cache_bytes: 256 * 1024 * 1024,
        }
    }
}

/// Why a call failed (as opposed to a message being rejected, which is an [`Outcome`]).
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<BackendError> for CoreError {
    fn from(error: BackendError) -> Self {
        match error {
            BackendError::Unavailable(m) => CoreError::Unavailable(m),
            BackendError::Other(m) => CoreError::Internal(m),
        }
    }
}

enum Message {
    Snapshot(SnapshotMessage),
    Update(UpdateMessage),
}

struct Work {
    doc: DocumentId,
    message: Message,
    request_id: Option<String>,
}

/// What a batch accumulates across its documents before writing.
struct BatchState<'w> {
    outcomes: Vec<Option<Outcome>>,
    accepted_requests: HashMap<&'w str, Outcome>,
    update_rows: Vec<UpdateRow<'w>>,
}

impl BatchState<'_> {
    fn new(works: usize) -> Self {
        Self {
            outcomes: vec![None; works],
            accepted_requests: HashMap::new(),
            update_rows: Vec::new(),
        }
    }
}

/// A changed document's new head and rule state, as a batch leaves it.
type Changed<'w> = (&'w DocumentId, DocumentHead, DocumentState);

/// The new heads of the changed documents, as the backend writes them.
fn new_heads<'a>(changed: &'a [Changed<'_>]) -> Vec<(&'a DocumentId, &'a DocumentHead)> {
    changed.iter().map(|(doc, head, _)| (*doc, head)).collect()
}

struct Job {
    work: Work,
    reply: oneshot::Sender<Result<Outcome, CoreError>>,
    /// The submitter's span: the batch span links to it, so each trace shows its commit.
    span: tracing::Span,
}

/// The persistence core. Cheap to clone; all clones share the queues and workers.
#[derive(Debug)]
pub struct Core<B: Backend> {
    inner: Arc<Inner<B>>,
    /// One per worker; a document's submissions always go to the same one ([`shard`]).
    queues: Arc<[mpsc::Sender<Job>]>,
}

impl<B: Backend> Clone for Core<B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            queues: self.queues.clone(),
        }
    }
}

/// The worker of `doc` among `workers`: stable for the life of the process.
fn shard(doc: &DocumentId, workers: usize) -> usize {
    use std::hash::{Hash as _, Hasher as _};
    // DefaultHasher::new() has fixed keys: the same id always lands on the same worker.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    doc.hash(&mut hasher);
    usize::try_from(hasher.finish() % workers.max(1) as u64).unwrap_or(0)
}

#[derive(Debug)]
struct Inner<B> {
    backend: B,
    options: CoreOptions,
    /// Rule state by document, valid while the document's head sequence is unchanged.
    states: Mutex<HashMap<DocumentId, (u64, DocumentState)>>,
    loads: LoadCache,
    metrics: Metrics,
    /// One permit: the commit in flight (see [`Inner::work`]).
    commit_gate: tokio::sync::Semaphore,
}

impl<B: Backend> Core<B> {
    /// Starts the workers on the current tokio runtime.
    pub fn start(backend: B, options: CoreOptions) -> Self {
        let workers = options.workers.max(1);
        let per_queue = options.queue_capacity.div_ceil(workers).max(1);
        let inner = Arc::new(Inner {
            backend,
            options,
            states: Mutex::new(HashMap::new()),
            loads: LoadCache::new(options.load_cache_bytes),
            metrics: Metrics::new(),
            commit_gate: tokio::sync::Semaphore::new(1),
        });
        let queues = (0..workers)
            .map(|_| {
                let (queue, receiver) = mpsc::channel(per_queue);
                let inner = inner.clone();
                tokio::spawn(async move { inner.work(receiver).await });
                queue
            })
            .collect();
        Self { inner, queues }
    }

    pub fn backend(&self) -> &B {
        &self.inner.backend
    }

    /// Submits a snapshot or update body (the exact signed text) for `doc`.
    pub async fn submit(
        &self,
        doc: DocumentId,
        kind: Kind,
        body: &str,
        request_id: Option<String>,
    ) -> Result<Outcome, CoreError> {
        // The gateway already applied the deployment's policy on extra publicData fields.
        let options = ParseOptions {
            allow_extra_public_data_fields: true,
        };
        let frame = parse_client_frame(body, options)
            .map_err(|e| CoreError::BadRequest(format!("body does not parse: {}", e.reason)))?;
        if frame.check_document(&doc).is_err() {
            return Ok(Outcome::Rejected {
                reason: Reason::WrongDocument,
                sequence: 0,
            });
        }
        let message = match (kind, frame) {
            (Kind::Snapshot, ClientFrame::Snapshot(m)) => Message::Snapshot(m),
            (Kind::Update, ClientFrame::Update(m)) => Message::Update(m),
            _ => {
                return Err(CoreError::BadRequest(
                    "body is not of the submitted kind".into(),
                ))
            }
        };
        let (reply, answer) = oneshot::channel();
        let job = Job {
            work: Work {
                doc,
                message,
                request_id,
            },
            reply,
            span: tracing::Span::current(),
        };
        self.queues[shard(&job.work.doc, self.queues.len())]
            .send(job)
            .await
            .map_err(|_| CoreError::Internal("persistence core stopped".into()))?;
        answer
            .await
            .map_err(|_| CoreError::Internal("persistence worker stopped".into()))?
    }

    /// Loads a document as PROTOCOL.md 6.4 and 6.5 describe, creating it when `create` is set.
    pub async fn load(
        &self,
        doc: &DocumentId,
        request: &LoadRequest,
        create: bool,
    ) -> Result<LoadedDocument, CoreError> {
        let started = std::time::Instant::now();
        let mut cache_hit = None;
        let loaded = self.load_at(doc, request, create, &mut cache_hit).await?;
        self.inner
            .metrics
            .load(started.elapsed().as_secs_f64(), cache_hit);
        Ok(loaded)
    }

    async fn load_at(
        &self,
        doc: &DocumentId,
        request: &LoadRequest,
        create: bool,
        cache_hit: &mut Option<bool>,
    ) -> Result<LoadedDocument, CoreError> {
        let backend = &self.inner.backend;
        // The usual load: the head alone, then the load cache entry for it.
        if let Some(head) = backend.document(doc).await? {
            let plan = plan_load(head.active_snapshot_id.as_ref(), request);
            if !matches!(plan.chain, ChainPlan::From(_)) {
                if let Some(mut loaded) = self.cached_load(doc, &head, &plan) {
                    *cache_hit = head.active_snapshot_id.is_some().then_some(true);
                    loaded.chain = proof_chain::<B::Read>(plan.chain, doc, None).await?;
                    return Ok(loaded);
                }
            }
        }
        let mut tx = backend.begin_read().await?;
        let head = match tx.document(doc).await? {
            Some(head) => head,
            None if create => {
                drop(tx);
                backend.ensure_documents(&[doc]).await?;
                tx = backend.begin_read().await?;
                tx.document(doc)
                    .await?
                    .ok_or_else(|| CoreError::Internal("created document vanished".into()))?
            }
            None => return Ok(LoadedDocument::default()),
        };
        let plan = plan_load(head.active_snapshot_id.as_ref(), request);
        let mut loaded = if let Some(loaded) = self.cached_load(doc, &head, &plan) {
            *cache_hit = head.active_snapshot_id.is_some().then_some(true);
            loaded
        } else {
            *cache_hit = Some(false);
            self.read_into_cache(&mut tx, doc, &head, &plan).await?
        };
        loaded.chain = proof_chain(plan.chain, doc, Some(&mut tx)).await?;
        Ok(loaded)
    }

    /// A load (without its proof chain) at `head` from the load cache; `None` when the cache
    /// has no entry for that head. A document without a snapshot needs none.
    fn cached_load(
        &self,
        doc: &DocumentId,
        head: &DocumentHead,
        plan: &LoadPlan,
    ) -> Option<LoadedDocument> {
        let mut loaded = found_at(head);
        if let Some(active) = &head.active_snapshot_id {
            let select = |key: &str, clock| plan.updates.wants(key, clock);
            let (snapshot, updates) =
                self.inner
                    .loads
                    .get(doc, head.head_seq, active, plan.include_snapshot, select)?;
            loaded.snapshot = snapshot;
            loaded.updates = updates;
        }
        Some(loaded)
    }

    /// A load (without its proof chain) at `head` read in `tx`; what was read goes into the
    /// load cache.
    async fn read_into_cache(
        &self,
        tx: &mut B::Read,
        doc: &DocumentId,
        head: &DocumentHead,
        plan: &LoadPlan,
    ) -> Result<LoadedDocument, CoreError> {
        let mut loaded = found_at(head);
        let Some(active) = &head.active_snapshot_id else {
            return Ok(loaded);
        };
        if plan.include_snapshot {
            let body = tx
                .snapshot_body(doc, active)
                .await?
                .ok_or_else(|| CoreError::Internal("active snapshot row missing".into()))?;
            loaded.snapshot = Some(body.into());
        }
        let updates = tx.updates(doc, active).await?;
        self.inner.loads.put(
            doc,
            head.head_seq,
            active,
            loaded.snapshot.as_ref(),
            &updates,
        );
        loaded.updates = updates
            .into_iter()
            .filter(|u| plan.updates.wants(&u.pub_key, u.clock))
            .map(|u| u.body)
            .collect();
        Ok(loaded)
    }

    /// Accepted messages after `after_seq`, in order (for gap repair).
    pub async fn read_events(
        &self,
        doc: &DocumentId,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, CoreError> {
        Ok(self
            .inner
            .backend
            .events_after(doc, after_seq, limit)
            .await?)
    }

    /// Head sequence numbers; documents that do not exist are 0.
    pub async fn heads(&self, docs: &[DocumentId]) -> Result<HashMap<DocumentId, u64>, CoreError> {
        Ok(self.inner.backend.heads(docs).await?)
    }
}

impl<B: Backend> Inner<B> {
    /// A worker's loop: take what is queued, commit it, answer. Workers commit one at a time
    /// while commits are short: a batch that waits for another worker's commit gathers what
    /// arrives meanwhile, so there are fewer, larger commits, each costing the database about
    /// the same (2 cores: PostgreSQL's CPU per update a fifth lower at 5,000 updates/s, the
    /// relay's peak a tenth higher; BENCHMARKS.md). A commit still running after
    /// `commit_overlap_after` (a large snapshot) no longer holds the other workers' documents
    /// back.
    async fn work(&self, mut receiver: mpsc::Receiver<Job>) {
        let take_queued = |receiver: &mut mpsc::Receiver<Job>, jobs: &mut Vec<Job>| {
            while jobs.len() < self.options.max_batch {
                match receiver.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
        };
        loop {
            let Some(first) = receiver.recv().await else {
                return;
            };
            let mut jobs = vec![first];
            take_queued(&mut receiver, &mut jobs);
            let permit = match self.commit_gate.try_acquire() {
                Ok(permit) => Some(permit),
                Err(_) if self.options.commit_overlap_after.is_zero() => None,
                Err(_) => {
                    let wait = self.commit_gate.acquire();
                    let permit = tokio::time::timeout(self.options.commit_overlap_after, wait)
                        .await
                        .ok()
                        .and_then(Result::ok);
                    take_queued(&mut receiver, &mut jobs);
                    permit
                }
            };
            self.run(jobs).await;
            drop(permit);
        }
    }

    async fn run(&self, jobs: Vec<Job>) {
        // One transaction for many traces: the batch span links to every submitter's span.
        let span = tracing::info_span!(
            "persistence.batch",
            otel.name = "COMMIT",
            db.system.name = B::DB_SYSTEM,
            db.operation.name = "COMMIT",
            db.operation.batch.size = jobs.len(),
        );
        for job in &jobs {
            use opentelemetry::trace::TraceContextExt as _;
            let linked = job.span.context().span().span_context().clone();
            if linked.is_valid() {
                span.add_link(linked);
            }
        }
        self.run_batch(jobs).instrument(span).await;
    }

    async fn run_batch(&self, jobs: Vec<Job>) {
        let started = std::time::Instant::now();
        let (works, replies): (Vec<Work>, Vec<_>) =
            jobs.into_iter().map(|j| (j.work, j.reply)).unzip();
        let result = self.commit_batch(&works).await;
        self.record_batch(&works, result.as_ref().ok(), started);
        match result {
            Ok(outcomes) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(BackendError::Unavailable(message)) => {
                tracing::warn!(batch = works.len(), error = %message, "batch failed: database unavailable");
                for reply in replies {
                    let _ = reply.send(Err(CoreError::Unavailable(message.clone())));
                }
            }
            Err(BackendError::Other(message)) => {
                // Something the rules should have prevented; isolate it so only the message
                // that causes it fails.
                tracing::error!(batch = works.len(), error = %message, "batch failed; retrying messages one by one");
                for (work, reply) in works.iter().zip(replies) {
                    let result = self
                        .commit_batch(std::slice::from_ref(work))
                        .await
                        .map(|mut o| o.remove(0))
                        .map_err(CoreError::from);
                    let _ = reply.send(result);
                }
            }
        }
    }

    fn record_batch(
        &self,
        works: &[Work],
        outcomes: Option<&Vec<Outcome>>,
        started: std::time::Instant,
    ) {
        let Some(outcomes) = outcomes else { return };
        self.metrics
            .batch(works.len(), started.elapsed().as_secs_f64());
        for (work, outcome) in works.iter().zip(outcomes) {
            let kind = match work.message {
                Message::Snapshot(_) => "snapshot",
                Message::Update(_) => "update",
            };
            let result = match outcome {
                Outcome::Accepted { .. } => "accepted",
                Outcome::Rejected { reason, .. } => reason.code(),
            };
            self.metrics.submission(kind, result);
        }
    }

    /// Runs one batch in one transaction; returns one outcome per work, in order.
    async fn commit_batch(&self, works: &[Work]) -> Result<Vec<Outcome>, BackendError> {
        let docs: Vec<&DocumentId> = works
            .iter()
            .map(|w| &w.doc)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if let Some(outcomes) = self.append_from_cache(works, &docs).await? {
            return Ok(outcomes);
        }
        let mut tx = self.backend.begin_write().await?;
        let heads = tx.lock_documents(&docs).await?;
        if heads.len() < docs.len() {
            // Create missing documents outside this transaction, then start again: creating
            // them inside could deadlock with another batch locking in sorted order.
            drop(tx);
            let missing: Vec<&DocumentId> = docs
                .into_iter()
                .filter(|d| !heads.contains_key(*d))
                .collect();
            self.backend.ensure_documents(&missing).await?;
            return Box::pin(self.commit_batch(works)).await;
        }
        let mut batch = BatchState::new(works.len());
        let mut new_states = Vec::new();
        for doc in docs {
            let head = &heads[doc];
            let state = match self.cached_state(doc, head.head_seq) {
                Some(state) => state,
                None => tx.load_state(doc, head).await?,
            };
            if let Some(state) = self
                .apply_to_document(Some(&mut tx), doc, head, state, works, &mut batch)
                .await?
            {
                new_states.push(state);
            }
        }
        let BatchState {
            mut outcomes,
            update_rows,
            ..
        } = batch;
        // A retry of a request that was committed before always breaks the rules now (its
        // clock, version or snapshot is taken), so only refused messages are looked up by
        // request id: a batch of new messages skips the lookup. It runs under the documents'
        // locks, so a first attempt committing on another replica has either committed (and is
        // found) or not started, never in between; and a refused message changed no state, so
        // turning its refusal into the earlier acceptance afterwards changes nothing else.
        let refused: Vec<(usize, &str)> = works
            .iter()
            .zip(&outcomes)
            .enumerate()
            .filter_map(|(i, (work, outcome))| match outcome {
                Some(Outcome::Rejected { .. }) => Some((i, work.request_id.as_deref()?)),
                _ => None,
            })
            .collect();
        if !refused.is_empty() {
            let ids: Vec<&str> = refused.iter().map(|(_, id)| *id).collect();
            let known = tx.find_requests(&ids).await?;
            for (i, id) in refused {
                if let Some(&sequence) = known.get(id) {
                    outcomes[i] = Some(Outcome::Accepted { sequence });
                }
            }
        }
        if !update_rows.is_empty() {
            tx.insert_updates(&update_rows).await?;
        }
        if !new_states.is_empty() {
            tx.set_heads(&new_heads(&new_states)).await?;
        }
        tx.commit().await?;
        Ok(self.committed(works, outcomes, &heads, new_states))
    }

    /// The usual batch in one database step: only updates, to documents whose rule state is
    /// cached. The rules run on the cached states, and the backend writes only if no head moved
    /// since (another replica wrote); the locked path reads them again. `None`: take the
    /// locked path, nothing was written.
    async fn append_from_cache(
        &self,
        works: &[Work],
        docs: &[&DocumentId],
    ) -> Result<Option<Vec<Outcome>>, BackendError> {
        if works
            .iter()
            .any(|w| matches!(w.message, Message::Snapshot(_)))
        {
            return Ok(None);
        }
        let mut cached = Vec::with_capacity(docs.len());
        {
            let Ok(states) = self.states.lock() else {
                return Ok(None);
            };
            for doc in docs {
                match states.get(*doc) {
                    Some((seq, state)) => cached.push((*seq, state.clone())),
                    None => return Ok(None),
                }
            }
        }
        let mut batch = BatchState::new(works.len());
        let mut heads = HashMap::with_capacity(docs.len());
        let mut new_states = Vec::new();
        for (doc, (head_seq, state)) in docs.iter().zip(cached) {
            let head = DocumentHead {
                head_seq,
                active_snapshot_id: state.active.as_ref().map(|a| a.id.clone()),
            };
            if let Some(changed) = self
                .apply_to_document(None, doc, &head, state, works, &mut batch)
                .await?
            {
                new_states.push(changed);
            }
            heads.insert((*doc).clone(), head);
        }
        let BatchState {
            outcomes,
            update_rows,
            ..
        } = batch;
        // A refused request may be the retry of an earlier acceptance; the locked path looks
        // it up under the documents' locks.
        let refused_request = works.iter().zip(&outcomes).any(|(work, outcome)| {
            work.request_id.is_some() && matches!(outcome, Some(Outcome::Rejected { .. }))
        });
        if refused_request {
            return Ok(None);
        }
        let expected: Vec<(&DocumentId, u64)> =
            docs.iter().map(|d| (*d, heads[*d].head_seq)).collect();
        if !self
            .backend
            .append_updates(&expected, &update_rows, &new_heads(&new_states))
            .await?
        {
            return Ok(None);
        }
        Ok(Some(self.committed(works, outcomes, &heads, new_states)))
    }

    /// After a commit: the caches follow it, and every work gets its outcome.
    fn committed(
        &self,
        works: &[Work],
        outcomes: Vec<Option<Outcome>>,
        old_heads: &HashMap<DocumentId, DocumentHead>,
        changed: Vec<Changed<'_>>,
    ) -> Vec<Outcome> {
        self.advance_loads(works, &outcomes, old_heads, &changed);
        self.remember_states(changed);
        decided(outcomes)
    }

    /// Runs the works of one locked document through the rules, in queue order. Returns the
    /// document's new head and state when anything was accepted.
    /// `tx` is the locked transaction; without one (see [`Self::append_from_cache`]) the works
    /// must all be updates.
    async fn apply_to_document<'w>(
        &self,
        mut tx: Option<&mut B::Write>,
        doc: &'w DocumentId,
        head: &DocumentHead,
        mut state: DocumentState,
        works: &'w [Work],
        batch: &mut BatchState<'w>,
    ) -> Result<Option<Changed<'w>>, BackendError> {
        let mut seq = head.head_seq;
        for (i, work) in works.iter().enumerate().filter(|(_, w)| &w.doc == doc) {
            // The same request twice in one batch (a retry overtaking its first attempt).
            if let Some(id) = work.request_id.as_deref() {
                if let Some(&outcome) = batch.accepted_requests.get(id) {
                    batch.outcomes[i] = Some(outcome);
                    continue;
                }
            }
            let outcome = match &work.message {
                Message::Snapshot(msg) => {
                    let Some(tx) = tx.as_deref_mut() else {
                        return Err(BackendError::Other(
                            "a snapshot reached the write path without a lock".into(),
                        ));
                    };
                    self.apply_snapshot(tx, &mut state, doc, msg, work, &mut seq)
                        .await?
                }
                Message::Update(msg) => match state.accept_update(msg) {
                    Ok(version) => {
                        seq += 1;
                        batch.update_rows.push(UpdateRow {
                            document_id: doc,
                            snapshot_id: &msg.ref_snapshot_id,
                            seq,
                            version,
                            pub_key: msg.signed.pub_key().as_str(),
                            clock: msg.clock,
                            body: msg.signed.body(),
                            request_id: work.request_id.as_deref(),
                        });
                        Outcome::Accepted { sequence: seq }
                    }
                    Err(reason) => Outcome::Rejected {
                        reason,
                        sequence: seq,
                    },
                },
            };
            if let (Some(id), Outcome::Accepted { .. }) = (work.request_id.as_deref(), outcome) {
                batch.accepted_requests.insert(id, outcome);
            }
            batch.outcomes[i] = Some(outcome);
        }
        if seq == head.head_seq {
            return Ok(None);
        }
        let new_head = DocumentHead {
            head_seq: seq,
            active_snapshot_id: state.active.as_ref().map(|a| a.id.clone()),
        };
        Ok(Some((doc, new_head, state)))
    }

    async fn apply_snapshot(
        &self,
        tx: &mut B::Write,
        state: &mut DocumentState,
        doc: &DocumentId,
        msg: &SnapshotMessage,
        work: &Work,
        seq: &mut u64,
    ) -> Result<Outcome, BackendError> {
        let rejected = |reason| Outcome::Rejected {
            reason,
            sequence: *seq,
        };
        if let Err(reason) = state.check_snapshot(msg, self.options.rules) {
            return Ok(rejected(reason));
        }
        if tx.snapshot_exists(doc, &msg.snapshot_id).await? {
            return Ok(rejected(Reason::SnapshotIdTaken));
        }
        let hash = msg.ciphertext_hash();
        let row = SnapshotRow {
            document_id: doc,
            id: &msg.snapshot_id,
            seq: *seq + 1,
            parent_id: msg.parent_snapshot_id.as_ref(),
            ciphertext_hash: &hash,
            parent_snapshot_proof: &msg.parent_snapshot_proof,
            body: msg.signed.body(),
            request_id: work.request_id.as_deref(),
        };
        tx.insert_snapshot(row).await?;
        *seq += 1;
        if let Err(reason) = state.accept_snapshot(msg, hash, self.options.rules) {
            // Checked above under the same lock; reaching this is a bug.
            return Err(BackendError::Other(format!(
                "snapshot rule changed its verdict: {reason}"
            )));
        }
        Ok(Outcome::Accepted { sequence: *seq })
    }

    /// Brings the load cache along with what this batch committed: per changed document, the
    /// newly accepted messages in sequence order (a retried request's earlier acceptance is
    /// not new: its sequence is at or below the old head).
    fn advance_loads(
        &self,
        works: &[Work],
        outcomes: &[Option<Outcome>],
        old_heads: &HashMap<DocumentId, DocumentHead>,
        new_states: &[Changed<'_>],
    ) {
        for (doc, new_head, _) in new_states {
            let from = old_heads.get(*doc).map_or(0, |h| h.head_seq);
            let mut seen = from;
            let accepted = works.iter().zip(outcomes).filter_map(|(work, outcome)| {
                let Some(Outcome::Accepted { sequence }) = outcome else {
                    return None;
                };
                // Within a document, outcomes are in sequence order; duplicates of one request
                // share a sequence number.
                if work.doc != **doc || *sequence <= seen {
                    return None;
                }
                seen = *sequence;
                Some(match &work.message {
                    Message::Snapshot(m) => Accepted::Snapshot {
                        id: &m.snapshot_id,
                        body: m.signed.body(),
                    },
                    Message::Update(m) => Accepted::Update {
                        snapshot: &m.ref_snapshot_id,
                        pub_key: m.signed.pub_key().as_str(),
                        clock: m.clock,
                        body: m.signed.body(),
                    },
                })
            });
            self.loads.advance(doc, from, new_head.head_seq, accepted);
        }
    }

    fn cached_state(&self, doc: &DocumentId, head_seq: u64) -> Option<DocumentState> {
        let states = self.states.lock().ok()?;
        states
            .get(doc)
            .filter(|(seq, _)| *seq == head_seq)
            .map(|(_, state)| state.clone())
    }

    fn remember_states(&self, new_states: Vec<Changed<'_>>) {
        let Ok(mut states) = self.states.lock() else {
            return;
        };
        if states.len() + new_states.len() > self.options.state_cache_capacity {
            // Crude but bounded; a miss costs one indexed query.
            states.clear();
        }
        for (doc, head, state) in new_states {
            // One worker owns a document, so batches of it finish in order; kept as a guard.
            match states.get(doc) {
                Some((seq, _)) if *seq > head.head_seq => {}
                _ => {
                    states.insert(doc.clone(), (head.head_seq, state));
                }
            }
        }
    }
}

/// A load of a document that exists, at `head`, before its contents are filled in.
fn found_at(head: &DocumentHead) -> LoadedDocument {
    LoadedDocument {
        found: true,
        sequence: head.head_seq,
        active_snapshot_id: head.active_snapshot_id.clone(),
        ..LoadedDocument::default()
    }
}

/// The proof chain a load plan asks for. Only a chain after a known snapshot is read, in `tx`.
async fn proof_chain<R: ReadTx>(
    plan: ChainPlan,
    doc: &DocumentId,
    tx: Option<&mut R>,
) -> Result<Option<Vec<ProofEntry>>, CoreError> {
    Ok(match plan {
        ChainPlan::Omit => None,
        ChainPlan::Empty => Some(Vec::new()),
        ChainPlan::From(known) => {
            let tx = tx.ok_or_else(|| {
                CoreError::Internal("a proof chain read without a transaction".into())
            })?;
            Some(proof_chain_after(&tx.proof_entries(doc).await?, &known))
        }
    })
}

/// Every work's outcome; one left undecided is a bug answered as "unavailable".
fn decided(outcomes: Vec<Option<Outcome>>) -> Vec<Outcome> {
    outcomes
        .into_iter()
        .map(|o| {
            o.unwrap_or(Outcome::Rejected {
                reason: Reason::Unavailable,
                sequence: 0,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_document_always_goes_to_the_same_worker_and_documents_spread() {
        let docs: Vec<DocumentId> = (0..64)
            .map(|i| DocumentId::parse(&format!("doc-{i}")).unwrap())
            .collect();
        let mut used = [0usize; 3];
        for doc in &docs {
            let worker = shard(doc, 3);
            assert_eq!(worker, shard(&doc.clone(), 3));
            used[worker] += 1;
        }
        assert!(used.iter().all(|&n| n > 8), "{used:?}");
        assert!(docs.iter().all(|d| shard(d, 1) == 0));
        assert!(docs.iter().all(|d| shard(d, 0) == 0));
    }
}
