//! One WebSocket connection: the opening sequence, then frames strictly in arrival order.
//!
//! A writer task owns the socket's sending half, fed by a bounded queue; everything the
//! connection sends goes through it. The session task reads one frame at a time and handles it
//! completely (parse, bind, verify, store, reply) before it reads the next or forwards anything
//! from the document's channel, so replies come in request order and a client's own
//! acknowledgement is always queued before any later broadcast (PROTOCOL.md 6.7). The session
//! keeps a cursor (the last sequence number the client has) and skips its own messages and
//! anything its load or a recovery already covered; a jump ahead is filled from persistence.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::{SinkExt as _, StreamExt as _};
use secsync_protocol::wire::{self, Recovery};
use secsync_protocol::{
    parse_client_frame, ClientFrame, ConnectError, ConnectRequest, DocumentId, FrameError,
    LoadMode, LoadRequest, Reason, Shape, SnapshotId, SnapshotMessage,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::auth::Access;
use crate::gateway::Gateway;
use crate::hub::{Delivery, Membership};
use crate::store::{RequestId, StoreError, SubmitKind, Submitted};

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
}

enum Outgoing {
    Frame(Utf8Bytes),
    Ping,
    Close(u16, &'static str),
}

/// Why the session ended (for logs).
#[derive(Debug, Clone, Copy)]
enum End {
    ClientClosed,
    Closed(u16),
}

struct Session {
    gateway: Arc<Gateway>,
    doc: DocumentId,
    connection: u64,
    access: Access,
    out: mpsc::Sender<Outgoing>,
    /// The last sequence number the client has (from its load, deliveries or recoveries).
    cursor: u64,
    /// Sequence numbers of this connection's own accepted messages not yet passed.
    own: BTreeSet<u64>,
    /// The snapshot the client holds as active: the last one it was sent or had accepted.
    client_snapshot: Option<SnapshotId>,
    frames: u64,
    tokens: f64,
    refilled: Instant,
}

/// Runs a connection to its end.
pub async fn run(
    gateway: Arc<Gateway>,
    socket: WebSocket,
    request: Result<ConnectRequest, ConnectError>,
    connection: u64,
) {
    let (mut sink, mut stream) = socket.split();
    let (out, mut queue) = mpsc::channel::<Outgoing>(gateway.limits.send_queue.max(2));
    let writer = tokio::spawn(async move {
        while let Some(item) = queue.recv().await {
            let message = match item {
                Outgoing::Frame(frame) => Message::Text(frame),
                Outgoing::Ping => Message::Ping(bytes::Bytes::new()),
                Outgoing::Close(code, reason) => {
                    let frame = CloseFrame {
                        code,
                        reason: reason.into(),
                    };
                    let _ = sink.send(Message::Close(Some(frame))).await;
                    break;
                }
            };
            if sink.send(message).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });

    let request = match request {
        Ok(request) => request,
        Err(error) => {
            tracing::info!(connection, %error, "refused connection");
            let _ = out.send(Outgoing::Frame(wire::DOCUMENT_ERROR.into())).await;
            let _ = out.send(Outgoing::Close(close::NORMAL, "")).await;
            drop(out);
            let _ = writer.await;
            return;
        }
    };
    let doc = request.doc_id.clone();
    let span = tracing::info_span!("connection", connection, doc = %doc);
    tracing::debug!(parent: &span, "connected");
    let end = serve(&gateway, request, connection, out.clone(), &mut stream)
        .instrument(span.clone())
        .await;
    tracing::debug!(parent: &span, ?end, "connection ended");
    if let End::Closed(code) = end {
        let reason = match code {
            close::RESTART => "service restart",
            close::TOO_BIG => "message too big",
            close::TRY_AGAIN_LATER => "slow consumer",
            close::UNAVAILABLE => "unavailable",
            close::TIMEOUT => "timeout",
            _ => "",
        };
        let _ = out.send(Outgoing::Close(code, reason)).await;
    }
    drop(out);
    let _ = writer.await;
}

type Stream = futures::stream::SplitStream<WebSocket>;

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

async fn serve(
    gateway: &Arc<Gateway>,
    request: ConnectRequest,
    connection: u64,
    out: mpsc::Sender<Outgoing>,
    stream: &mut Stream,
) -> End {
    let doc = request.doc_id.clone();
    let Ok(access) = gateway.auth.authorize(&doc, &request.session_key).await else {
        let _ = out.send(Outgoing::Frame(wire::UNAUTHORIZED.into())).await;
        return End::Closed(close::NORMAL);
    };
    // Join before loading: nothing accepted after the load can be missed (PROTOCOL.md 7.9).
    let mut membership = gateway.hub.join(&doc, connection);
    let loaded = match gateway.store.load(&doc, &request.load, true).await {
        Ok(loaded) => loaded,
        Err(error) => {
            // A plain close: the client reconnects with back-off (document-error is terminal).
            tracing::warn!(%error, "load failed");
            return End::Closed(close::UNAVAILABLE);
        }
    };
    let frame = wire::document(
        loaded.snapshot.as_deref(),
        &loaded.updates,
        loaded.chain.as_deref(),
    );
    if out.send(Outgoing::Frame(frame.into())).await.is_err() {
        return End::ClientClosed;
    }
    gateway.hub.loaded(&doc, loaded.sequence);
    let mut session = Session {
        gateway: gateway.clone(),
        doc,
        connection,
        access,
        out,
        cursor: loaded.sequence,
        own: BTreeSet::new(),
        client_snapshot: loaded.active_snapshot_id.clone(),
        frames: 0,
        tokens: f64::from(gateway.limits.rate_burst),
        refilled: Instant::now(),
    };
    // See `Session::run` for why deliveries wait after a document that has a snapshot.
    let hold = loaded
        .snapshot
        .is_some()
        .then(|| Instant::now() + gateway.limits.first_delivery_hold);
    session.run(&mut membership, stream, hold).await
}

impl Session {
    /// `hold`: until this instant (or the client's first frame) nothing from the document's
    /// channel is forwarded. The JavaScript client awaits `getSnapshotKey` before it queues a
    /// `document` that has a snapshot, while a frame arriving meanwhile is queued at once; an
    /// update that overtakes the document that way fails the client for good. The client sends
    /// its ephemeral `initialize` right after that await, so its first frame (or the deadline)
    /// means the document is queued. Held messages wait in the inbox, nothing is skipped.
    async fn run(
        &mut self,
        membership: &mut Membership,
        stream: &mut Stream,
        mut hold: Option<Instant>,
    ) -> End {
        let ping_every = self.gateway.limits.ping_every;
        let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
        let mut last_seen = Instant::now();
        let shutdown = self.gateway.shutdown.clone();
        loop {
            tokio::select! {
                message = stream.next() => {
                    last_seen = Instant::now();
                    match message {
                        None | Some(Ok(Message::Close(_))) => return End::ClientClosed,
                        Some(Err(error)) => {
                            let text = error.to_string();
                            if text.contains("too long") || text.contains("too big") {
                                tracing::info!("frame over the size limit");
                                return End::Closed(close::TOO_BIG);
                            }
                            return End::ClientClosed;
                        }
                        Some(Ok(Message::Text(text))) => {
                            hold = None;
                            self.throttle().await;
                            if let Err(end) = self.handle(text.as_str()).await {
                                return end;
                            }
                        }
                        Some(Ok(Message::Binary(_))) => {
                            if let Err(end) = self.reply(wire::invalid_message(Reason::BinaryFrame)) {
                                return end;
                            }
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    }
                }
                () = sleep_until(hold) => hold = None,
                delivery = membership.inbox.recv(), if hold.is_none() => {
                    let Some(delivery) = delivery else {
                        tracing::info!("slow consumer: disconnecting");
                        return End::Closed(close::TRY_AGAIN_LATER);
                    };
                    if let Err(end) = self.deliver(delivery).await {
                        return end;
                    }
                }
                _ = ping.tick() => {
                    if last_seen.elapsed() > ping_every * 2 {
                        return End::Closed(close::TIMEOUT);
                    }
                    if self.out.try_send(Outgoing::Ping).is_err() {
                        return End::Closed(close::TRY_AGAIN_LATER);
                    }
                }
                () = shutdown.cancelled() => return End::Closed(close::RESTART),
            }
        }
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
            tokio::time::sleep(wait).await;
            self.tokens = 1.0;
            self.refilled = Instant::now();
        }
        self.tokens -= 1.0;
    }

    fn reply(&self, frame: String) -> Result<(), End> {
        self.out
            .try_send(Outgoing::Frame(frame.into()))
            .map_err(|_| End::Closed(close::TRY_AGAIN_LATER))
    }

    fn send_frame(&self, frame: Utf8Bytes) -> Result<(), End> {
        self.out
            .try_send(Outgoing::Frame(frame))
            .map_err(|_| End::Closed(close::TRY_AGAIN_LATER))
    }

    async fn handle(&mut self, text: &str) -> Result<(), End> {
        self.frames += 1;
        let frame = match parse_client_frame(text, self.gateway.limits.parse_options) {
            Ok(frame) => frame,
            Err(error) => return self.refuse(&error),
        };
        if let Err(error) = frame
            .check_document(&self.doc)
            .and_then(|()| frame.verify())
        {
            return self.refuse(&error);
        }
        match frame {
            ClientFrame::Ephemeral(message) => {
                self.gateway
                    .hub
                    .ephemeral(&self.doc, self.connection, message.signed.body());
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
                        self.reply(wire::update_saved(&message.ref_snapshot_id, message.clock))?;
                        self.accepted(sequence, SubmitKind::Update, body);
                        Ok(())
                    }
                    Some(Submitted::Rejected { reason, .. }) => self.refuse(&frame.error(reason)),
                    None => self.refuse(&frame.error(Reason::Unavailable)),
                }
            }
        }
    }

    fn refuse(&self, error: &FrameError) -> Result<(), End> {
        tracing::debug!(reason = error.reason.code(), "frame refused");
        self.reply(error.reply(&Recovery::default()))?;
        if error.closes_connection() {
            return Err(End::Closed(close::NORMAL));
        }
        Ok(())
    }

    fn accepted(&mut self, sequence: u64, kind: SubmitKind, body: &str) {
        self.own.insert(sequence);
        self.gateway
            .hub
            .committed(&self.doc, sequence, kind, self.connection, body);
    }

    async fn snapshot(&mut self, message: &SnapshotMessage) -> Result<(), End> {
        let body = message.signed.body();
        match self.submit(SubmitKind::Snapshot, body).await {
            Some(Submitted::Accepted { sequence }) => {
                self.reply(wire::snapshot_saved(&message.snapshot_id))?;
                self.client_snapshot = Some(message.snapshot_id.clone());
                self.accepted(sequence, SubmitKind::Snapshot, body);
                Ok(())
            }
            Some(Submitted::Rejected {
                reason: Reason::SnapshotOutdated | Reason::SnapshotMissesUpdates,
                ..
            }) => self.recover(message).await,
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
        tracing::debug!(parent = ?message.parent_snapshot_id, client = ?self.client_snapshot, "snapshot refused; sending recovery");
        let request = LoadRequest {
            mode: LoadMode::Complete,
            known_snapshot_id: self.client_snapshot.clone(),
            known_clocks: secsync_protocol::Clocks::new(),
        };
        let loaded = match self.gateway.store.load(&self.doc, &request, true).await {
            Ok(loaded) => loaded,
            Err(error) => {
                tracing::warn!(%error, "recovery load failed");
                return self.reply(wire::snapshot_save_failed(&Recovery::default()));
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
        self.reply(wire::snapshot_save_failed(&recovery))?;
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
            match self
                .gateway
                .store
                .submit(&self.doc, kind, body, &request_id)
                .await
            {
                Ok(submitted) => return Some(submitted),
                Err(StoreError::Unavailable(error)) if Instant::now() + delay < deadline => {
                    tracing::warn!(%error, "persistence unavailable; retrying the write");
                    self.gateway.mark_store_unavailable();
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(error) => {
                    tracing::warn!(%error, "write failed");
                    return None;
                }
            }
        }
    }

    /// Forwards one message of the document's channel, keeping the client's stream gap-free.
    async fn deliver(&mut self, delivery: Delivery) -> Result<(), End> {
        let Some(sequence) = delivery.sequence else {
            return self.send_frame(delivery.frame);
        };
        self.pass_own();
        if sequence <= self.cursor {
            return Ok(());
        }
        if sequence > self.cursor + 1 {
            self.catch_up(sequence - 1).await?;
        }
        if !self.own.remove(&sequence) {
            self.send_frame(delivery.frame)?;
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
            let events = match self
                .gateway
                .store
                .events_after(&self.doc, self.cursor, limit)
                .await
            {
                Ok(events) if !events.is_empty() => events,
                Ok(_) | Err(_) => {
                    // Never skip: close, and the client reloads in delta mode.
                    tracing::warn!("could not fill a gap; disconnecting");
                    return Err(End::Closed(close::TRY_AGAIN_LATER));
                }
            };
            for event in events.into_iter().filter(|e| e.sequence <= upto) {
                if event.sequence <= self.cursor {
                    continue;
                }
                if !self.own.remove(&event.sequence) {
                    let frame = match event.kind {
                        SubmitKind::Snapshot => {
                            self.client_snapshot = crate::hub::snapshot_id_of(&event.body);
                            wire::snapshot_broadcast(&event.body)
                        }
                        SubmitKind::Update => wire::update_broadcast(&event.body),
                    };
                    self.send_frame(frame.into())?;
                }
                self.cursor = event.sequence;
            }
        }
        Ok(())
    }
}
