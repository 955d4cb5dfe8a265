//! Per-document fan-out with one ordering rule for local and remote messages.
//!
//! For every document with local clients the hub runs one channel task holding one bus
//! subscription (not one per connection). Accepted messages reach it from two sides — injected
//! by the local session that got the acknowledgement, and from the bus for other gateways'
//! clients — and it delivers them to its sessions strictly in per-document sequence order:
//! duplicates (sequence already delivered) are dropped, out-of-order ones wait, and a gap that
//! does not fill within `gap_timeout` is read from persistence. Gaps that nothing reveals (a
//! lost last message) are found by comparing every document's head sequence with what was
//! delivered, periodically and whenever the bus says it may have dropped messages.
//!
//! Ephemeral messages have no sequence and are delivered as they arrive (each sender's order
//! is kept by the bus and the channel). Nothing is ever delivered to the connection that sent it.
//! A session whose inbox is full is dropped from the channel (its inbox closes), never skipped.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures::StreamExt as _;
use secsync_protocol::{
    parse_client_frame, wire, ClientFrame, DocumentId, ParseOptions, SnapshotId,
};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::bus::{Bus, BusEvent, BusStream, Origin, Trace};
use crate::store::{Store, SubmitKind};

/// Messages waiting to be published on the bus.
const PUBLISH_QUEUE: usize = 65_536;

/// Tuning of the fan-out.
#[derive(Debug, Clone, Copy)]
pub struct HubOptions {
    /// Messages waiting for one session before it counts as a slow consumer.
    pub inbox_capacity: usize,
    /// How long a gap may stay open before it is read from persistence.
    pub gap_timeout: Duration,
    /// How often every document's head is compared with what was delivered.
    pub head_check_every: Duration,
    /// Bodies larger than this travel on the bus by reference (sequence number only).
    pub inline_max: usize,
}

impl Default for HubOptions {
    fn default() -> Self {
        Self {
            inbox_capacity: 1024,
            gap_timeout: Duration::from_millis(200),
            head_check_every: Duration::from_secs(5),
            inline_max: 512 * 1024,
        }
    }
}

/// One message for a session: the frame to send, and its sequence number when it was stored.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub sequence: Option<u64>,
    /// For a snapshot: its id (the client's new active snapshot once delivered).
    pub snapshot_id: Option<SnapshotId>,
    pub frame: bytes::Bytes,
}

enum Input {
    Join {
        connection: u64,
        inbox: InboxSender,
    },
    Leave {
        connection: u64,
    },
    /// End a session (or, with `None`, every session of the document) with a close code:
    /// drop what is queued for it and deliver nothing more (expiry, revocation).
    Close {
        connection: Option<u64>,
        code: u16,
    },
    /// A session loaded the document at this sequence (the channel's start, if it has none).
    Loaded(u64),
    /// The document's head sequence in persistence.
    Head(u64),
    /// A message of one of this gateway's sessions.
    Local(BusEvent),
    /// A message from the bus (this gateway's own come back too).
    Event(BusEvent),
}

struct ChannelEntry {
    input: mpsc::UnboundedSender<Input>,
    members: usize,
}

/// The hub. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

struct HubInner {
    gateway: Arc<str>,
    /// One publisher task keeps the bus order equal to the local order (ephemeral messages of
    /// one sender must arrive in order; they have no sequence number to reorder by).
    publish: mpsc::Sender<(DocumentId, BusEvent)>,
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    options: HubOptions,
    channels: Mutex<HashMap<DocumentId, ChannelEntry>>,
}

/// A session's place in a document's channel; leaving happens on drop.
#[derive(Debug)]
pub struct Membership {
    hub: Hub,
    doc: DocumentId,
    connection: u64,
    /// What the channel delivers to this session, in order.
    pub inbox: Inbox,
}

/// One session's bounded queue of deliveries. Unlike a tokio channel (which allocates a block
/// of 32 slots up front) it holds no storage while empty: most connections idle most of the
/// time, and their memory is what limits a gateway's connection count.
#[derive(Debug)]
pub struct Inbox {
    shared: Arc<Mutex<InboxState>>,
}

#[derive(Debug, Default)]
struct InboxState {
    queue: VecDeque<Delivery>,
    /// The channel let go of this session (it left, the channel ended, or the queue was full).
    closed: bool,
    /// The close code the session must end with (expiry, revocation); 0: none.
    end: u16,
    waker: Option<Waker>,
}

impl InboxState {
    /// Wake this task on the next delivery or end.
    fn wake_with(&mut self, cx: &Context<'_>) {
        if !self
            .waker
            .as_ref()
            .is_some_and(|waker| waker.will_wake(cx.waker()))
        {
            self.waker = Some(cx.waker().clone());
        }
    }
}

/// The channel's end of an [`Inbox`]; dropping it closes the inbox.
struct InboxSender {
    shared: Arc<Mutex<InboxState>>,
    capacity: usize,
}

fn inbox(capacity: usize) -> (InboxSender, Inbox) {
    let shared = Arc::new(Mutex::new(InboxState::default()));
    (
        InboxSender {
            shared: shared.clone(),
            capacity: capacity.max(1),
        },
        Inbox { shared },
    )
}

fn lock_inbox(shared: &Mutex<InboxState>) -> std::sync::MutexGuard<'_, InboxState> {
    shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl InboxSender {
    /// Queues a delivery; `false` when the queue is full (the caller then drops this sender).
    fn try_send(&self, delivery: Delivery) -> bool {
        let mut state = lock_inbox(&self.shared);
        if state.closed || state.queue.len() >= self.capacity {
            return false;
        }
        state.queue.push_back(delivery);
        let waker = state.waker.take();
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
        true
    }
}

impl InboxSender {
    /// Ends the session with `code`: what is queued is dropped, nothing more is delivered.
    fn end(self, code: u16) {
        let mut state = lock_inbox(&self.shared);
        state.queue = VecDeque::new();
        state.end = code;
        // Dropping `self` after the lock closes the inbox and wakes the session.
    }
}

impl Drop for InboxSender {
    fn drop(&mut self) {
        let mut state = lock_inbox(&self.shared);
        state.closed = true;
        let waker = state.waker.take();
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl Inbox {
    /// The next delivery; `None` once the channel let go of this session and everything queued
    /// before that was taken.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        let mut state = lock_inbox(&self.shared);
        if let Some(delivery) = state.queue.pop_front() {
            // Drained: give the storage back (most sessions are idle most of the time).
            if state.queue.is_empty() {
                state.queue = VecDeque::new();
            }
            return Poll::Ready(Some(delivery));
        }
        if state.closed {
            return Poll::Ready(None);
        }
        state.wake_with(cx);
        Poll::Pending
    }

    /// Ready with the close code once the session must end (expiry, revocation); checked
    /// before anything else the session does, so nothing reaches the client after it.
    pub fn poll_end(&mut self, cx: &mut Context<'_>) -> Poll<u16> {
        let mut state = lock_inbox(&self.shared);
        if state.end != 0 {
            return Poll::Ready(state.end);
        }
        state.wake_with(cx);
        Poll::Pending
    }

    /// The next delivery if one is waiting (a closed inbox shows in [`Inbox::poll_recv`]).
    pub fn try_recv(&mut self) -> Option<Delivery> {
        let mut state = lock_inbox(&self.shared);
        let delivery = state.queue.pop_front();
        if delivery.is_some() && state.queue.is_empty() {
            state.queue = VecDeque::new();
        }
        delivery
    }

    /// See [`Inbox::poll_recv`].
    pub async fn recv(&mut self) -> Option<Delivery> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }
}

impl Membership {
    /// The document this session is a member of.
    pub fn doc(&self) -> &DocumentId {
        &self.doc
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.hub.leave(&self.doc, self.connection);
    }
}

impl Hub {
    /// Starts the hub and its head checker.
    pub fn new(
        gateway: Arc<str>,
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
        options: HubOptions,
    ) -> Self {
        let (publish, mut outgoing) = mpsc::channel::<(DocumentId, BusEvent)>(PUBLISH_QUEUE);
        let publisher_bus = bus.clone();
        tokio::spawn(async move {
            while let Some((doc, event)) = outgoing.recv().await {
                if let Err(error) = publisher_bus.publish(&doc, &event).await {
                    // Other gateways repair from persistence once the bus is back.
                    tracing::warn!(doc = %doc, %error, "publish failed");
                }
            }
        });
        let hub = Self {
            inner: Arc::new(HubInner {
                gateway,
                publish,
                store,
                bus,
                options,
                channels: Mutex::new(HashMap::new()),
            }),
        };
        let weak = Arc::downgrade(&hub.inner);
        tokio::spawn(async move {
            let Some(inner) = weak.upgrade() else { return };
            let mut resyncs = inner.bus.resyncs();
            let every = inner.options.head_check_every;
            drop(inner);
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    changed = resyncs.changed() => if changed.is_err() { return },
                }
                let Some(inner) = weak.upgrade() else { return };
                Hub { inner }.check_heads().await;
            }
        });
        hub
    }

    pub fn gateway(&self) -> &Arc<str> {
        &self.inner.gateway
    }

    /// Joins a document's channel (starting it if needed). Register before loading: every
    /// message accepted after the load then reaches the inbox.
    pub fn join(&self, doc: &DocumentId, connection: u64) -> Membership {
        let (sender, inbox) = inbox(self.inner.options.inbox_capacity);
        let mut channels = self.lock();
        let entry = channels.entry(doc.clone()).or_insert_with(|| {
            crate::metrics::metrics().documents.add(1, &[]);
            ChannelEntry {
                input: self.spawn_channel(doc.clone()),
                members: 0,
            }
        });
        entry.members += 1;
        let _ = entry.input.send(Input::Join {
            connection,
            inbox: sender,
        });
        drop(channels);
        Membership {
            hub: self.clone(),
            doc: doc.clone(),
            connection,
            inbox,
        }
    }

    /// Tells the channel a session loaded the document at `sequence`.
    pub fn loaded(&self, doc: &DocumentId, sequence: u64) {
        self.send(doc, Input::Loaded(sequence));
    }

    /// A local session's message was accepted: deliver it here, then to the other gateways.
    pub fn committed(
        &self,
        doc: &DocumentId,
        sequence: u64,
        kind: SubmitKind,
        connection: u64,
        body: &str,
    ) {
        let origin = self.origin(connection);
        // The receiving gateways continue the sender's trace and measure from now.
        let mut trace = Trace {
            context: Vec::new(),
            acked_at_us: crate::metrics::unix_micros(),
        };
        secsync_telemetry::propagation::inject(&tracing::Span::current(), |key, value| {
            trace.context.push((key.to_owned(), value));
        });
        self.send(
            doc,
            Input::Local(BusEvent::Committed {
                sequence,
                kind,
                origin: origin.clone(),
                body: Some(body.to_owned()),
                trace: Trace::default(),
            }),
        );
        let inline = body.len() <= self.inner.options.inline_max;
        self.publish(
            doc,
            BusEvent::Committed {
                sequence,
                kind,
                origin,
                body: inline.then(|| body.to_owned()),
                trace,
            },
        );
    }

    /// A local session sent an ephemeral message.
    pub fn ephemeral(&self, doc: &DocumentId, connection: u64, body: &str) {
        let event = BusEvent::Ephemeral {
            origin: self.origin(connection),
            body: body.to_owned(),
        };
        self.send(doc, Input::Local(event.clone()));
        self.publish(doc, event);
    }

    /// Ends a session of `doc` (every session of it with `None`) with a close code: see
    /// [`Inbox::poll_end`].
    pub fn close(&self, doc: &DocumentId, connection: Option<u64>, code: u16) {
        self.send(doc, Input::Close { connection, code });
    }

    /// Documents with local clients.
    pub fn documents(&self) -> Vec<DocumentId> {
        self.lock().keys().cloned().collect()
    }

    fn origin(&self, connection: u64) -> Origin {
        Origin {
            gateway: self.inner.gateway.clone(),
            connection,
        }
    }

    fn publish(&self, doc: &DocumentId, event: BusEvent) {
        if self.inner.publish.try_send((doc.clone(), event)).is_err() {
            // The bus is far behind (or gone): accepted messages are repaired from persistence
            // by the other gateways' head checks; an ephemeral message is lost, as it may be.
            tracing::warn!(doc = %doc, "publish queue full; message not published");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<DocumentId, ChannelEntry>> {
        self.inner
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn send(&self, doc: &DocumentId, input: Input) {
        if let Some(entry) = self.lock().get(doc) {
            let _ = entry.input.send(input);
        }
    }

    fn leave(&self, doc: &DocumentId, connection: u64) {
        let mut channels = self.lock();
        if let Some(entry) = channels.get_mut(doc) {
            let _ = entry.input.send(Input::Leave { connection });
            entry.members -= 1;
            if entry.members == 0 {
                // Dropping the sender ends the channel task and its subscription.
                channels.remove(doc);
                crate::metrics::metrics().documents.add(-1, &[]);
            }
        }
    }

    async fn check_heads(&self) {
        let docs = self.documents();
        if docs.is_empty() {
            return;
        }
        match self.inner.store.heads(&docs).await {
            Ok(heads) => {
                for (doc, head) in heads {
                    self.send(&doc, Input::Head(head));
                }
            }
            Err(error) => tracing::warn!(%error, "head check failed"),
        }
    }

    fn spawn_channel(&self, doc: DocumentId) -> mpsc::UnboundedSender<Input> {
        let (input, receiver) = mpsc::unbounded_channel();
        let channel = Channel {
            doc,
            gateway: self.inner.gateway.clone(),
            store: self.inner.store.clone(),
            bus: self.inner.bus.clone(),
            options: self.inner.options,
            members: HashMap::new(),
            next: None,
            pending: BTreeMap::new(),
            gap_since: None,
        };
        tokio::spawn(channel.run(receiver));
        input
    }
}

struct Pending {
    kind: SubmitKind,
    origin: Option<Origin>,
    body: Option<String>,
    /// The sender's trace, for messages from another gateway.
    trace: Option<Trace>,
}

/// One document's ordering state, owned by its task.
struct Channel {
    doc: DocumentId,
    gateway: Arc<str>,
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    options: HubOptions,
    members: HashMap<u64, InboxSender>,
    /// The next sequence to deliver; unknown until the first session has loaded.
    next: Option<u64>,
    pending: BTreeMap<u64, Pending>,
    gap_since: Option<Instant>,
}

impl Channel {
    async fn run(mut self, mut input: mpsc::UnboundedReceiver<Input>) {
        let mut subscription: Option<BusStream> = None;
        let mut retry = tokio::time::interval(Duration::from_secs(1));
        loop {
            if subscription.is_none() {
                match self.bus.subscribe(&self.doc).await {
                    Ok(stream) => subscription = Some(stream),
                    Err(error) => {
                        tracing::warn!(doc = %self.doc, %error, "subscribe failed; retrying");
                    }
                }
            }
            let gap_deadline = self.gap_since.map(|t| t + self.options.gap_timeout);
            tokio::select! {
                message = input.recv() => match message {
                    Some(message) => self.handle(message).await,
                    None => return,
                },
                event = next_event(&mut subscription) => match event {
                    Some(event) => self.handle(Input::Event(event)).await,
                    None => subscription = None,
                },
                () = sleep_until(gap_deadline) => self.repair(None).await,
                _ = retry.tick(), if subscription.is_none() => {}
            }
        }
    }

    async fn handle(&mut self, input: Input) {
        match input {
            Input::Join { connection, inbox } => {
                self.members.insert(connection, inbox);
            }
            Input::Leave { connection } => {
                self.members.remove(&connection);
            }
            Input::Close {
                connection: Some(connection),
                code,
            } => {
                if let Some(inbox) = self.members.remove(&connection) {
                    inbox.end(code);
                }
            }
            Input::Close {
                connection: None,
                code,
            } => {
                for (_, inbox) in self.members.drain() {
                    inbox.end(code);
                }
            }
            Input::Loaded(sequence) => {
                if self.next.is_none() {
                    self.next = Some(sequence + 1);
                    self.pending = self.pending.split_off(&(sequence + 1));
                    self.drain().await;
                }
            }
            Input::Head(head) => {
                if self.next.is_some_and(|next| head >= next) {
                    self.repair(Some(head)).await;
                }
            }
            // Our own ephemeral messages were delivered when they were sent; they carry no
            // sequence number to drop the bus's copy by.
            Input::Event(BusEvent::Ephemeral { origin, .. })
                if *origin.gateway == *self.gateway => {}
            Input::Local(BusEvent::Ephemeral { origin, body })
            | Input::Event(BusEvent::Ephemeral { origin, body }) => {
                let frame = bytes::Bytes::from(wire::ephemeral_broadcast(&body));
                self.deliver(None, None, Some(&origin), &frame);
            }
            Input::Local(BusEvent::Committed {
                sequence,
                kind,
                origin,
                body,
                trace,
            })
            | Input::Event(BusEvent::Committed {
                sequence,
                kind,
                origin,
                body,
                trace,
            }) => {
                if self.next.is_none_or(|next| sequence >= next) {
                    let remote = *origin.gateway != *self.gateway;
                    self.pending
                        .entry(sequence)
                        .or_insert(Pending {
                            kind,
                            origin: Some(origin),
                            body: None,
                            trace: remote.then_some(trace),
                        })
                        .body
                        .get_or_insert_with(|| body.unwrap_or_default());
                    // An empty body marks a by-reference event: read it when its turn comes.
                    self.drain().await;
                }
            }
        }
    }

    /// Delivers every pending event that is next in line.
    async fn drain(&mut self) {
        let Some(mut next) = self.next else { return };
        while let Some(pending) = self.pending.remove(&next) {
            let body = match pending.body.filter(|b| !b.is_empty()) {
                Some(body) => Some(body),
                None => self.fetch_one(next).await,
            };
            let Some(body) = body else {
                // Could not read it now: keep waiting; the gap repair will try again.
                self.pending.insert(
                    next,
                    Pending {
                        body: None,
                        ..pending
                    },
                );
                break;
            };
            let frame = bytes::Bytes::from(match pending.kind {
                SubmitKind::Snapshot => wire::snapshot_broadcast(&body),
                SubmitKind::Update => wire::update_broadcast(&body),
            });
            let snapshot_id = match pending.kind {
                SubmitKind::Snapshot => snapshot_id_of(&body),
                SubmitKind::Update => None,
            };
            // A message from another gateway continues its sender's trace here.
            let span = pending.trace.as_ref().map(|trace| {
                let span = tracing::info_span!(
                    "deliver",
                    otel.name = "process secsync.doc",
                    otel.kind = "consumer",
                    messaging.system = "nats",
                    messaging.operation.type = "process",
                    gateway = %self.gateway,
                    doc = %self.doc,
                    sequence = next,
                );
                secsync_telemetry::propagation::set_parent(&span, |key| {
                    trace
                        .context
                        .iter()
                        .find(|(k, _)| k == key)
                        .map(|(_, v)| v.clone())
                });
                if trace.acked_at_us > 0 {
                    let now = crate::metrics::unix_micros();
                    crate::metrics::metrics()
                        .fanout(now.saturating_sub(trace.acked_at_us) as f64 / 1e6);
                }
                span
            });
            let _entered = span.as_ref().map(tracing::Span::enter);
            self.deliver(
                Some(next),
                snapshot_id.as_ref(),
                pending.origin.as_ref(),
                &frame,
            );
            next += 1;
        }
        self.next = Some(next);
        self.gap_since = if self.pending.is_empty() {
            None
        } else {
            self.gap_since.or_else(|| Some(Instant::now()))
        };
    }

    async fn fetch_one(&self, sequence: u64) -> Option<String> {
        match self.store.events_after(&self.doc, sequence - 1, 1).await {
            Ok(events) => events
                .into_iter()
                .find(|e| e.sequence == sequence)
                .map(|e| e.body),
            Err(error) => {
                tracing::warn!(doc = %self.doc, %error, "reading a message by reference failed");
                None
            }
        }
    }

    /// Reads what is missing from persistence: up to the first pending event, or up to `head`.
    async fn repair(&mut self, head: Option<u64>) {
        let Some(next) = self.next else {
            self.gap_since = None;
            return;
        };
        let upto = match (head, self.pending.keys().next()) {
            (Some(head), _) => head,
            (None, Some(first)) => first - 1,
            (None, None) => return,
        };
        if upto < next {
            self.drain().await;
            return;
        }
        let limit = u32::try_from(upto - next + 1)
            .unwrap_or(u32::MAX)
            .min(10_000);
        match self.store.events_after(&self.doc, next - 1, limit).await {
            Ok(events) => {
                tracing::debug!(doc = %self.doc, count = events.len(), "gap repaired from persistence");
                if !events.is_empty() {
                    crate::metrics::metrics().gap_repairs.add(1, &[]);
                }
                for event in events {
                    self.pending.entry(event.sequence).or_insert(Pending {
                        kind: event.kind,
                        origin: None,
                        body: Some(event.body),
                        trace: None,
                    });
                }
                self.gap_since = None;
                self.drain().await;
            }
            Err(error) => {
                tracing::warn!(doc = %self.doc, %error, "gap repair failed; will retry");
                self.gap_since = Some(Instant::now());
            }
        }
    }

    fn deliver(
        &mut self,
        sequence: Option<u64>,
        snapshot_id: Option<&SnapshotId>,
        origin: Option<&Origin>,
        frame: &bytes::Bytes,
    ) {
        let local_origin = origin
            .filter(|o| *o.gateway == *self.gateway)
            .map(|o| o.connection);
        self.members.retain(|connection, inbox| {
            if Some(*connection) == local_origin {
                return true;
            }
            // Full: a slow consumer. Dropping its sender closes its inbox; the session
            // disconnects the client, which reloads in delta mode. Never skip a message.
            let kept = inbox.try_send(Delivery {
                sequence,
                snapshot_id: snapshot_id.cloned(),
                frame: frame.clone(),
            });
            if !kept {
                crate::metrics::metrics().slow_consumers.add(1, &[]);
            }
            kept
        });
    }
}

/// The id of a stored snapshot body.
pub fn snapshot_id_of(body: &str) -> Option<SnapshotId> {
    let options = ParseOptions {
        allow_extra_public_data_fields: true,
    };
    match parse_client_frame(body, options) {
        Ok(ClientFrame::Snapshot(snapshot)) => Some(snapshot.snapshot_id),
        _ => None,
    }
}

async fn next_event(subscription: &mut Option<BusStream>) -> Option<BusEvent> {
    match subscription {
        Some(stream) => stream.next().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
