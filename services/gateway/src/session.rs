//! One WebSocket connection: the opening sequence, then frames strictly in arrival order.
//!
//! One task per connection does everything: it reads the client's frames, forwards the
//! document's deliveries and writes what is queued for the client (a [`Link`]). It handles a
//! frame completely (parse, bind, verify, store, reply) before it reads the next or forwards
//! anything from the document's channel, so replies come in request order and a client's own
//! acknowledgement is always queued before any later broadcast (PROTOCOL.md 6.7); while it waits
//! for persistence it goes on writing what was queued before. The session keeps a cursor (the
//! last sequence number the client has) and skips its own messages and anything its load or a
//! recovery already covered; a jump ahead is filled from persistence.
//!
//! An idle connection costs what its task holds, so that is kept small: the queue for the
//! client holds no storage while empty, and the state of rarely taken paths (handling a frame,
//! the opening sequence, the first-delivery hold) is boxed only while it is in use.

use std::collections::{BTreeSet, VecDeque};
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use secsync_protocol::wire::{self, Recovery};
use secsync_protocol::{
    parse_client_frame, ClientFrame, ConnectError, ConnectRequest, DocumentId, FrameError,
    KeyCache, LoadMode, LoadRequest, Reason, Shape, SnapshotId, SnapshotMessage,
};
use tokio::time::{Instant, Sleep};
use tracing::Instrument as _;

use crate::admission::Slot;
use crate::auth::Access;
use crate::gateway::Gateway;
use crate::hub::{Delivery, Membership};
use crate::metrics::metrics;
use crate::revocation::Registration;
use crate::store::{LoadHead, LoadPiece, RequestId, StoreError, SubmitKind, Submitted};
use crate::ws::{Frame, Incoming, ReadError, Socket};

/// Close codes the gateway uses.
pub mod close {
    /// Going away: the gateway is shutting down; reconnect (to another gateway).
    pub const RESTART: u16 = 1012;
    /// A frame larger than the configured limit.
    pub const TOO_BIG: u16 = 1009;
    /// The client did not read fast enough (or its stream could not be continued).
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// Persistence could not serve the load; reconnect with back-off.
    pub const UNAVAILABLE: u16 = 1011;
    /// Normal closure after a terminal message (`document-error`, `unauthorized`).
    pub const NORMAL: u16 = 1000;
    /// No sign of life from the client within two ping intervals.
    pub const TIMEOUT: u16 = 1001;
    /// Access control: the grant expired (4001), the session was revoked (4003).
    pub use crate::revocation::close::{EXPIRED, REVOKED};
    /// Broken framing (1002), text that is not UTF-8 (1007).
    pub use crate::ws::close::{INVALID_TEXT, PROTOCOL_ERROR};
}

/// Why the session ended (for logs).
#[derive(Debug, Clone, Copy)]
enum End {
    ClientClosed,
    Closed(u16),
}

/// The socket and the bounded queue of what is to be written to it, in order.
struct Link {
    socket: Socket,
    queue: VecDeque<Frame>,
    /// The connection's place under the gateway's connection limits, until the socket is gone.
    _slot: Slot,
    /// Frames queued for a client that does not read before it counts as a slow consumer.
    limit: u32,
    /// Writing failed: the client is gone (reading notices it too).
    broken: bool,
}

impl Link {
    fn new(socket: Socket, limit: usize, slot: Slot) -> Self {
        Self {
            socket,
            queue: VecDeque::new(),
            _slot: slot,
            limit: u32::try_from(limit.max(2)).unwrap_or(u32::MAX),
            broken: false,
        }
    }

    /// Queues a frame; a full queue means a slow consumer.
    fn push(&mut self, item: Frame) -> Result<(), End> {
        if self.queue.len() >= self.limit as usize {
            return Err(End::Closed(close::TRY_AGAIN_LATER));
        }
        self.queue.push_back(item);
        Ok(())
    }

    /// Less than half the queue is taken: room to forward more before writing.
    fn has_room(&self) -> bool {
        self.queue.len() < (self.limit / 2) as usize
    }

    /// Writes queued frames as far as the socket takes them; `Ready` once everything is
    /// flushed or writing failed.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.broken {
            return Poll::Ready(());
        }
        match self.poll_write_inner(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(()),
            Poll::Ready(Err(error)) => {
                tracing::debug!(%error, "writing to the client failed");
                self.broken = true;
                self.queue = VecDeque::new();
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_write_inner(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.socket.poll_write(cx, &mut self.queue))?;
        // Drained: give the storage back (most connections are idle most of the time).
        if self.queue.capacity() > 0 {
            self.queue = VecDeque::new();
        }
        Poll::Ready(Ok(()))
    }

    /// Loads the document and queues the `document` frame, in pieces as the load arrives,
    /// writing them meanwhile: a large document's first bytes reach the client while its
    /// last still come from persistence. The pieces are the fragments of one WebSocket message
    /// (only control frames may go between them). Returns the load's head.
    async fn load_document(
        &mut self,
        gateway: &Gateway,
        doc: &DocumentId,
        request: &LoadRequest,
    ) -> Result<LoadHead, StoreError> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let out = move |piece| {
            let _ = tx.send(piece);
        };
        let mut load = pin!(gateway.store.load_pieces(doc, request, true, &out));
        let mut frame = DocumentFrame::default();
        let result = poll_fn(|cx| {
            let done = load.as_mut().poll(cx);
            while let Ok(piece) = rx.try_recv() {
                frame.add(piece, &mut self.queue);
            }
            if done.is_pending() {
                // Registers for the socket; the load's pieces wake this through `load`.
                let _ = self.poll_write(cx);
            }
            done
        })
        .await;
        result?;
        frame.finish(&mut self.queue)
    }

    /// Runs `future` to completion while writing what was queued before it.
    async fn alongside<F: Future>(&mut self, future: F) -> F::Output {
        let mut future = pin!(future);
        let mut written = false;
        poll_fn(|cx| {
            // Nothing is queued while `future` runs (it cannot reach the queue).
            if !written && self.poll_write(cx).is_ready() {
                written = true;
            }
            future.as_mut().poll(cx)
        })
        .await
    }

    /// Writes everything queued and the close (if the gateway ends the connection), then closes
    /// the socket. Gives up after `linger`: a client that reads nothing must not keep the
    /// connection forever.
    async fn finish(mut self: Box<Self>, end: End, linger: Duration) {
        if let End::Closed(code) = end {
            let reason = match code {
                close::RESTART => "service restart",
                close::TOO_BIG => "message too big",
                close::TRY_AGAIN_LATER => "slow consumer",
                close::UNAVAILABLE => "unavailable",
                close::TIMEOUT => "timeout",
                close::EXPIRED => "session expired",
                close::REVOKED => "access revoked",
                close::PROTOCOL_ERROR => "protocol error",
                close::INVALID_TEXT => "text is not UTF-8",
                _ => "",
            };
            if matches!(code, close::EXPIRED | close::REVOKED) {
                // Access ended: nothing more reaches the client, not even what was queued.
                let link = &mut *self;
                link.socket.discard_unsent(&mut link.queue);
            }
            // Past the limit: the close goes after everything queued.
            self.queue.push_back(Frame::close(code, reason));
        }
        let done = poll_fn(|cx| {
            if self.broken {
                return Poll::Ready(());
            }
            // A close the client started gets its answer after what is queued.
            let link = &mut *self;
            link.socket.poll_close(cx, &mut link.queue).map(|_| ())
        });
        let _ = tokio::time::timeout(linger, done).await;
    }
}

struct Session {
    gateway: Arc<Gateway>,
    /// The session's place in the document's channel; also where its document id is kept.
    membership: Membership,
    connection: u64,
    access: Access,
    /// The session's entry among those that expire or can be revoked by id (jwt, callback).
    _registration: Option<Box<Registration>>,
    link: Box<Link>,
    /// The last sequence number the client has (from its load, deliveries or recoveries).
    cursor: u64,
    /// Sequence numbers of this connection's own accepted messages not yet passed.
    own: BTreeSet<u64>,
    /// The snapshot the client holds as active: the last one it was sent or had accepted.
    client_snapshot: Option<SnapshotId>,
    frames: u64,
    /// The client's signing key, decoded once.
    keys: KeyCache,
    tokens: f64,
    refilled: Instant,
}

/// Runs a connection to its end, from the moment its upgrade response is sent; `slot` is its
/// place under the connection limits.
pub async fn run(
    gateway: Arc<Gateway>,
    upgrade: hyper::upgrade::OnUpgrade,
    request: Result<Box<ConnectRequest>, ConnectError>,
    connection: u64,
    slot: Slot,
) {
    let upgraded = match upgrade.await {
        Ok(upgraded) => upgraded,
        Err(error) => {
            tracing::debug!(connection, %error, "upgrade failed");
            return;
        }
    };
    // Boxed at once: the socket lives as long as the connection, and a future keeps room for
    // what it holds across an await.
    let socket = Socket::upgraded(upgraded, gateway.limits.max_frame_bytes);
    let link = Box::new(Link::new(socket, gateway.limits.send_queue, slot));
    serve(gateway, link, request, connection).await;
}

async fn serve(
    gateway: Arc<Gateway>,
    mut link: Box<Link>,
    request: Result<Box<ConnectRequest>, ConnectError>,
    connection: u64,
) {
    let request = match request {
        Ok(request) => request,
        Err(error) => {
            tracing::info!(connection, %error, "refused connection");
            metrics().frame_sent("document-error");
            let _ = link.push(Frame::text(Bytes::from_static(
                wire::DOCUMENT_ERROR.as_bytes(),
            )));
            link.finish(End::Closed(close::NORMAL), linger(&gateway))
                .await;
            return;
        }
    };
    // No span for the connection: a live span costs every idle connection about 400 bytes, so
    // log lines name the connection and the document themselves. Boxed: the opening's state is
    // large and needed once.
    let end = match Box::pin(open(&gateway, request, connection, link)).await {
        Ok((mut session, hold)) => {
            let end = session.run(hold).await;
            tracing::debug!(connection, doc = %session.membership.doc(), ?end, "connection ended");
            link = session.link;
            end
        }
        Err((end, returned)) => {
            tracing::debug!(connection, ?end, "connection ended while opening");
            link = returned;
            end
        }
    };
    link.finish(end, linger(&gateway)).await;
}

/// How long the last frames and the close may take to write: a client that reads nothing is
/// given as long as a silent one.
fn linger(gateway: &Gateway) -> Duration {
    gateway.limits.ping_every * 2
}

type Opened = (Box<Session>, Option<Pin<Box<Sleep>>>);

/// The opening sequence: authorize, join, load, send the `document`. Returns the session and
/// the first-delivery hold (see `Session::run`).
async fn open(
    gateway: &Arc<Gateway>,
    request: Box<ConnectRequest>,
    connection: u64,
    mut link: Box<Link>,
) -> Result<Opened, (End, Box<Link>)> {
    let ConnectRequest {
        doc_id: doc,
        session_key,
        load,
    } = *request;
    tracing::debug!(connection, %doc, "connected");
    let grant = match gateway.auth.authorize(&doc, &session_key).await {
        Ok(grant) => grant,
        Err(denied) => {
            tracing::info!(connection, %doc, reason = denied.reason, "access denied");
            metrics().frame_sent("unauthorized");
            let _ = link.push(Frame::text(Bytes::from_static(
                wire::UNAUTHORIZED.as_bytes(),
            )));
            return Err((End::Closed(close::NORMAL), link));
        }
    };
    drop(session_key);
    // Join before loading: nothing accepted after the load can be missed (PROTOCOL.md 7.9).
    let membership = gateway.hub.join(&doc, connection);
    // Registered after joining and checked after registering: a revocation is either seen
    // here or ends the session through its channel.
    let registration = gateway.revocations.register(&doc, connection, &grant);
    if gateway.revocations.refuses(&doc, &grant) {
        tracing::info!(connection, %doc, reason = "revoked", "access denied");
        metrics().frame_sent("unauthorized");
        let _ = link.push(Frame::text(Bytes::from_static(
            wire::UNAUTHORIZED.as_bytes(),
        )));
        return Err((End::Closed(close::NORMAL), link));
    }
    let head = match link.load_document(gateway, &doc, &load).await {
        Ok(head) => head,
        Err(error) => {
            // A plain close: the client reconnects with back-off (document-error is terminal).
            // A `document` begun is left unfinished: the client drops it with the connection.
            tracing::warn!(connection, %doc, %error, "load failed");
            return Err((End::Closed(close::UNAVAILABLE), link));
        }
    };
    metrics().frame_sent("document");
    gateway.hub.loaded(&doc, head.sequence);
    let hold_for = gateway.limits.first_delivery_hold;
    let hold =
        (head.has_snapshot && !hold_for.is_zero()).then(|| Box::pin(tokio::time::sleep(hold_for)));
    let session = Box::new(Session {
        gateway: gateway.clone(),
        membership,
        connection,
        access: grant.access,
        _registration: registration,
        link,
        cursor: head.sequence,
        own: BTreeSet::new(),
        client_snapshot: head.active_snapshot_id,
        frames: 0,
        keys: KeyCache::default(),
        tokens: f64::from(gateway.limits.rate_burst),
        refilled: Instant::now(),
    });
    Ok((session, hold))
}

/// The `document` frame as fragments, built from a load's pieces.
#[derive(Default)]
struct DocumentFrame {
    head: Option<LoadHead>,
    pieces: wire::DocumentPieces,
}

impl DocumentFrame {
    fn add(&mut self, piece: LoadPiece, queue: &mut VecDeque<Frame>) {
        let bytes = match piece {
            LoadPiece::Head(head) => {
                let start = wire::DocumentPieces::start(head.has_snapshot);
                self.head = Some(head);
                queue.push_back(Frame::fragment(true, true, start.into()));
                return;
            }
            LoadPiece::Snapshot(part) => part,
            LoadPiece::Updates(bodies) => self.pieces.updates(&bodies).into(),
        };
        if self.head.is_some() && !bytes.is_empty() {
            queue.push_back(Frame::fragment(false, true, bytes));
        }
    }

    fn finish(self, queue: &mut VecDeque<Frame>) -> Result<LoadHead, StoreError> {
        let head = self
            .head
            .ok_or_else(|| StoreError::Failed("load ended without its header".into()))?;
        let end = self.pieces.end(head.chain.as_deref());
        queue.push_back(Frame::fragment(false, false, end.into()));
        Ok(head)
    }
}

/// What woke the session.
enum Event {
    Incoming(Option<Result<Incoming, ReadError>>),
    Delivery(Option<Delivery>),
    Ping,
    Shutdown,
    /// Access ended (expiry, revocation) with this close code.
    End(u16),
}

impl Session {
    /// `hold`: until it fires (or the client's first frame) nothing from the document's channel
    /// is forwarded. The JavaScript client awaits `getSnapshotKey` before it queues a `document`
    /// that has a snapshot, while a frame arriving meanwhile is queued at once; an update that
    /// overtakes the document that way fails the client for good. The client sends its
    /// ephemeral `initialize` right after that await, so its first frame (or the deadline) means
    /// the document is queued. Held messages wait in the inbox, nothing is skipped.
    // One loop of events reads best in one place.
    #[allow(clippy::too_many_lines)]
    async fn run(&mut self, mut hold: Option<Pin<Box<Sleep>>>) -> End {
        let ping_every = self.gateway.limits.ping_every;
        let mut ping = pin!(tokio::time::sleep(ping_every));
        let mut last_seen = Instant::now();
        let shutdown = self.gateway.shutdown.clone();
        let mut shutdown = pin!(shutdown.cancelled());
        // The client and the channel take turns, so neither can starve the other.
        let mut client_first = true;
        loop {
            client_first = !client_first;
            let event = poll_fn(|cx| {
                if shutdown.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Shutdown);
                }
                // Expiry and revocation come first: nothing is read or forwarded after them.
                if let Poll::Ready(code) = self.membership.inbox.poll_end(cx) {
                    return Poll::Ready(Event::End(code));
                }
                // Ready when everything is written; a failed write shows on the read side.
                let _ = self.link.poll_write(cx);
                if hold
                    .as_mut()
                    .is_some_and(|h| h.as_mut().poll(cx).is_ready())
                {
                    hold = None;
                }
                for client in [client_first, !client_first] {
                    if client {
                        if self.link.broken {
                            return Poll::Ready(Event::Incoming(None));
                        }
                        if let Poll::Ready(message) = self.link.socket.poll_next(cx) {
                            return Poll::Ready(Event::Incoming(message));
                        }
                    } else if hold.is_none() {
                        if let Poll::Ready(delivery) = self.membership.inbox.poll_recv(cx) {
                            return Poll::Ready(Event::Delivery(delivery));
                        }
                    }
                }
                if ping.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Ping);
                }
                Poll::Pending
            })
            .await;
            let result = match event {
                Event::Shutdown => return End::Closed(close::RESTART),
                Event::End(code) => return End::Closed(code),
                Event::Incoming(message) => {
                    last_seen = Instant::now();
                    match message {
                        None | Some(Ok(Incoming::Close)) => return End::ClientClosed,
                        Some(Err(error)) => {
                            let Some(code) = error.close_code() else {
                                return End::ClientClosed;
                            };
                            tracing::info!(
                                connection = self.connection,
                                doc = %self.membership.doc(),
                                %error,
                                "closing: the client broke the WebSocket rules or limits"
                            );
                            return End::Closed(code);
                        }
                        Some(Ok(Incoming::Text(text))) => {
                            hold = None;
                            // A span per frame, not per connection: an idle connection then
                            // holds none. Boxed: handling a frame needs far more state than
                            // waiting does.
                            let span = tracing::info_span!(
                                "frame",
                                connection = self.connection,
                                doc = %self.membership.doc(),
                                gateway = %self.gateway.id,
                            );
                            Box::pin(self.frame(text).instrument(span)).await
                        }
                        Some(Ok(Incoming::Binary)) => {
                            metrics().frame_received("binary");
                            metrics().rejected(Reason::BinaryFrame.code());
                            self.reply(
                                "invalid-message",
                                wire::invalid_message(Reason::BinaryFrame),
                            )
                        }
                        Some(Ok(Incoming::Ping | Incoming::Pong)) => Ok(()),
                    }
                }
                Event::Delivery(Some(delivery)) => {
                    let mut result = self.deliver(delivery).await;
                    // Everything else already waiting goes too: a client that pipelines its
                    // writes takes a turn per commit, and one delivery per turn would let the
                    // document's other writers fill the inbox of a client that reads well.
                    // Up to half the send queue, so the writer catches up in between.
                    while result.is_ok() && self.link.has_room() {
                        let Some(next) = self.membership.inbox.try_recv() else {
                            break;
                        };
                        result = self.deliver(next).await;
                    }
                    result
                }
                Event::Delivery(None) => {
                    tracing::info!(
                        connection = self.connection,
                        doc = %self.membership.doc(),
                        "slow consumer: disconnecting"
                    );
                    return End::Closed(close::TRY_AGAIN_LATER);
                }
                Event::Ping => {
                    if last_seen.elapsed() > ping_every * 2 {
                        return End::Closed(close::TIMEOUT);
                    }
                    ping.as_mut().reset(Instant::now() + ping_every);
                    self.link.push(Frame::ping())
                }
            };
            if let Err(end) = result {
                return end;
            }
        }
    }

    /// One text frame: its turn under the rate limit, then its handling.
    async fn frame(&mut self, text: String) -> Result<(), End> {
        self.throttle().await;
        self.handle(&text).await
    }

    /// Waits for a token of the connection's rate limit (slows a flood down, rejects nothing).
    async fn throttle(&mut self) {
        let limits = &self.gateway.limits;
        let rate = f64::from(limits.rate_per_second.max(1));
        let burst = f64::from(limits.rate_burst.max(1));
        self.tokens = (self.tokens + self.refilled.elapsed().as_secs_f64() * rate).min(burst);
        self.refilled = Instant::now();
        if self.tokens < 1.0 {
            let wait = Duration::from_secs_f64((1.0 - self.tokens) / rate);
            self.link.alongside(tokio::time::sleep(wait)).await;
            self.tokens = 1.0;
            self.refilled = Instant::now();
        }
        self.tokens -= 1.0;
    }

    /// Queues a frame of type `kind` for the client.
    fn reply(&mut self, kind: &'static str, frame: impl Into<Bytes>) -> Result<(), End> {
        self.send_frame(kind, frame.into())
    }

    fn send_frame(&mut self, kind: &'static str, frame: Bytes) -> Result<(), End> {
        metrics().frame_sent(kind);
        self.link.push(Frame::text(frame))
    }

    async fn handle(&mut self, text: &str) -> Result<(), End> {
        self.frames += 1;
        let frame = match parse_client_frame(text, self.gateway.limits.parse_options) {
            Ok(frame) => frame,
            Err(error) => {
                metrics().frame_received("invalid");
                return self.refuse(&error);
            }
        };
        metrics().frame_received(match frame {
            ClientFrame::Snapshot(_) => "snapshot",
            ClientFrame::Update(_) => "update",
            ClientFrame::Ephemeral(_) => "ephemeral-message",
        });
        if let Err(error) = frame
            .check_document(self.membership.doc())
            .and_then(|()| frame.verify_with(&mut self.keys))
        {
            return self.refuse(&error);
        }
        match frame {
            ClientFrame::Ephemeral(message) => {
                self.gateway.hub.ephemeral(
                    self.membership.doc(),
                    self.connection,
                    message.signed.body(),
                );
                Ok(())
            }
            ClientFrame::Snapshot(ref message) => {
                if !self.access.can_write() {
                    return self.refuse(&frame.error(Reason::Denied));
                }
                self.snapshot(message).await
            }
            ClientFrame::Update(ref message) => {
                if !self.access.can_write() {
                    return self.refuse(&frame.error(Reason::Denied));
                }
                let body = message.signed.body();
                match self.submit(SubmitKind::Update, body).await {
                    Some(Submitted::Accepted { sequence }) => {
                        self.reply(
                            "update-saved",
                            wire::update_saved(&message.ref_snapshot_id, message.clock),
                        )?;
                        self.accepted(sequence, SubmitKind::Update, body);
                        Ok(())
                    }
                    Some(Submitted::Rejected { reason, .. }) => self.refuse(&frame.error(reason)),
                    None => self.refuse(&frame.error(Reason::Unavailable)),
                }
            }
        }
    }

    fn refuse(&mut self, error: &FrameError) -> Result<(), End> {
        tracing::debug!(
            connection = self.connection,
            doc = %self.membership.doc(),
            reason = error.reason.code(),
            "frame refused"
        );
        metrics().rejected(error.reason.code());
        self.reply(error.reply_type(), error.reply())?;
        if error.closes_connection() {
            return Err(End::Closed(close::NORMAL));
        }
        Ok(())
    }

    fn accepted(&mut self, sequence: u64, kind: SubmitKind, body: &str) {
        tracing::debug!(sequence, ?kind, "accepted");
        self.own.insert(sequence);
        self.gateway
            .hub
            .committed(self.membership.doc(), sequence, kind, self.connection, body);
    }

    async fn snapshot(&mut self, message: &SnapshotMessage) -> Result<(), End> {
        let body = message.signed.body();
        match self.submit(SubmitKind::Snapshot, body).await {
            Some(Submitted::Accepted { sequence }) => {
                self.reply("snapshot-saved", wire::snapshot_saved(&message.snapshot_id))?;
                self.client_snapshot = Some(message.snapshot_id.clone());
                self.accepted(sequence, SubmitKind::Snapshot, body);
                Ok(())
            }
            Some(Submitted::Rejected {
                reason: reason @ (Reason::SnapshotOutdated | Reason::SnapshotMissesUpdates),
                ..
            }) => {
                metrics().rejected(reason.code());
                self.recover(message).await
            }
            Some(Submitted::Rejected { reason, .. }) => {
                self.refuse(&FrameError::new(Shape::Snapshot, reason))
            }
            None => self.refuse(&FrameError::new(Shape::Snapshot, Reason::Unavailable)),
        }
    }

    /// Answers an outdated or incomplete snapshot with the state the client lacks, read in one
    /// consistent load: the active snapshot and the chain from the client's active snapshot when
    /// that is no longer the document's, only the updates otherwise (PROTOCOL.md 6.1). The
    /// client's active snapshot is the last one this connection sent it, which may be newer
    /// than the parent its refused snapshot was built on (the chain must start there).
    async fn recover(&mut self, message: &SnapshotMessage) -> Result<(), End> {
        tracing::debug!(
            connection = self.connection,
            doc = %self.membership.doc(),
            parent = ?message.parent_snapshot_id,
            client = ?self.client_snapshot,
            "snapshot refused; sending recovery"
        );
        let request = LoadRequest {
            mode: LoadMode::Complete,
            known_snapshot_id: self.client_snapshot.clone(),
            known_clocks: secsync_protocol::Clocks::new(),
        };
        let load = self
            .gateway
            .store
            .load(self.membership.doc(), &request, true);
        let loaded = match self.link.alongside(load).await {
            Ok(loaded) => loaded,
            Err(error) => {
                tracing::warn!(
                    connection = self.connection,
                    doc = %self.membership.doc(),
                    %error,
                    "recovery load failed"
                );
                metrics().rejected(Reason::Unavailable.code());
                return self.reply(
                    "snapshot-save-failed",
                    wire::SNAPSHOT_SAVE_FAILED.as_bytes(),
                );
            }
        };
        // Misses updates: the snapshot it built on is still the document's.
        let same_parent = loaded.active_snapshot_id.is_some()
            && loaded.active_snapshot_id == message.parent_snapshot_id;
        let recovery = if same_parent {
            Recovery {
                updates: Some(&loaded.updates),
                ..Recovery::default()
            }
        } else {
            Recovery {
                snapshot: loaded.snapshot.as_deref(),
                updates: Some(&loaded.updates),
                chain: loaded.chain.as_deref(),
            }
        };
        self.reply(
            "snapshot-save-failed",
            wire::snapshot_save_failed(&recovery),
        )?;
        // The recovery carries everything up to its sequence; never resend older messages.
        self.cursor = self.cursor.max(loaded.sequence);
        self.client_snapshot = loaded.active_snapshot_id;
        Ok(())
    }

    /// Submits with the frame's request id, retrying while persistence is unavailable up to the
    /// write deadline. `None`: it stayed unavailable (or failed) — answer save-failed.
    async fn submit(&mut self, kind: SubmitKind, body: &str) -> Option<Submitted> {
        let request_id = RequestId {
            gateway: self.gateway.id.to_string(),
            connection: self.connection,
            frame: self.frames,
        };
        let deadline = Instant::now() + self.gateway.limits.write_retry;
        let mut delay = Duration::from_millis(50);
        loop {
            let submit = self
                .gateway
                .store
                .submit(self.membership.doc(), kind, body, &request_id);
            match self.link.alongside(submit).await {
                Ok(submitted) => return Some(submitted),
                Err(StoreError::Unavailable(error)) if Instant::now() + delay < deadline => {
                    tracing::warn!(
                        connection = self.connection,
                        doc = %self.membership.doc(),
                        %error,
                        "persistence unavailable; retrying the write"
                    );
                    self.gateway.mark_store_unavailable();
                    self.link.alongside(tokio::time::sleep(delay)).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(error) => {
                    tracing::warn!(
                        connection = self.connection,
                        doc = %self.membership.doc(),
                        %error,
                        "write failed"
                    );
                    return None;
                }
            }
        }
    }

    /// One message of the document's channel, after what it lacks before it.
    async fn deliver(&mut self, delivery: Delivery) -> Result<(), End> {
        match self.gap_before(&delivery) {
            None => self.forward(delivery),
            // Boxed: rare, and its state would otherwise make every connection larger.
            Some(upto) => Box::pin(self.fill_gap(upto, delivery)).await,
        }
    }

    /// Where a message of the document's channel needs persistence first: the sequence number
    /// up to which the client lacks messages (the channel started after this session's load, or
    /// the session's recovery moved it).
    fn gap_before(&mut self, delivery: &Delivery) -> Option<u64> {
        let sequence = delivery.sequence?;
        self.pass_own();
        (sequence > self.cursor + 1).then(|| sequence - 1)
    }

    /// Reads what the client lacks from persistence, then forwards the message that revealed
    /// the gap.
    async fn fill_gap(&mut self, upto: u64, delivery: Delivery) -> Result<(), End> {
        self.catch_up(upto).await?;
        self.forward(delivery)
    }

    /// Forwards one message of the document's channel (its gap is filled), keeping the
    /// client's stream gap-free.
    fn forward(&mut self, delivery: Delivery) -> Result<(), End> {
        let Some(sequence) = delivery.sequence else {
            return self.send_frame("ephemeral-message", delivery.frame);
        };
        self.pass_own();
        if sequence <= self.cursor {
            return Ok(());
        }
        if !self.own.remove(&sequence) {
            let kind = if delivery.snapshot_id.is_some() {
                "snapshot"
            } else {
                "update"
            };
            self.send_frame(kind, delivery.frame)?;
            if delivery.snapshot_id.is_some() {
                self.client_snapshot = delivery.snapshot_id;
            }
        }
        self.cursor = sequence;
        self.pass_own();
        Ok(())
    }

    fn pass_own(&mut self) {
        while self.own.remove(&(self.cursor + 1)) {
            self.cursor += 1;
        }
        // Own messages the cursor passed are no longer needed.
        self.own = self.own.split_off(&(self.cursor + 1));
    }

    /// Reads what the client lacks up to `upto` from persistence (the channel started after this
    /// session's load, or the session's recovery moved it).
    async fn catch_up(&mut self, upto: u64) -> Result<(), End> {
        while self.cursor < upto {
            let limit = u32::try_from(upto - self.cursor)
                .unwrap_or(u32::MAX)
                .min(10_000);
            let read = self
                .gateway
                .store
                .events_after(self.membership.doc(), self.cursor, limit);
            let events = match self.link.alongside(read).await {
                Ok(events) if !events.is_empty() => events,
                Ok(_) | Err(_) => {
                    // Never skip: close, and the client reloads in delta mode.
                    tracing::warn!(
                        connection = self.connection,
                        doc = %self.membership.doc(),
                        "could not fill a gap; disconnecting"
                    );
                    return Err(End::Closed(close::TRY_AGAIN_LATER));
                }
            };
            for event in events.into_iter().filter(|e| e.sequence <= upto) {
                if event.sequence <= self.cursor {
                    continue;
                }
                if !self.own.remove(&event.sequence) {
                    let (kind, frame) = match event.kind {
                        SubmitKind::Snapshot => {
                            self.client_snapshot = crate::hub::snapshot_id_of(&event.body);
                            ("snapshot", wire::snapshot_broadcast(&event.body))
                        }
                        SubmitKind::Update => ("update", wire::update_broadcast(&event.body)),
                    };
                    self.send_frame(kind, frame.into())?;
                }
                self.cursor = event.sequence;
            }
        }
        Ok(())
    }
}
