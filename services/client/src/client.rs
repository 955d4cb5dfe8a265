//! An async secsync client over one WebSocket connection, following the protocol as the JS
//! client's sync machine does (PROTOCOL.md 3, 5, 6.7), with explicit waits for tests.
//!
//! [`Client::connect`] opens `{endpoint}/{docId}?sessionKey=…&mode=…[&knownSnapshotId=…&
//! knownSnapshotUpdateClocks=…]`, reads the first frame and applies `document` (any error there
//! is fatal, as in the JS client), then hands the socket to a driver task that:
//!
//! * applies live `snapshot` / `update` broadcasts through [`SyncState`] (duplicates and updates
//!   of other snapshots are ignored, a clock gap or an undecryptable message fails the client);
//! * matches `update-saved` / `update-save-failed` / `snapshot-saved` / `snapshot-save-failed`
//!   to this client's frames in request order (the server sends exactly one reply per snapshot
//!   or update frame, in order) and applies recovery data;
//! * runs the ephemeral session handshake and delivers proven peers' messages.
//!
//! Decrypted snapshots, changes and ephemeral messages come out of [`Client::next_event`] in the
//! order they were applied. With [`ClientOptions::record_frames`] every received frame is also
//! recorded for [`Client::next_frame`], so raw tests can assert exact server behaviour while the
//! client stays in sync. The client never reconnects by itself: a test decides, and
//! [`Client::reconnect`] resumes in the JS client's way (`delta` from the active snapshot).

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use futures::{SinkExt as _, StreamExt as _};
use secsync_protocol::canonical::write_str;
use secsync_protocol::crypto::ProofEntry;
use secsync_protocol::server_frame::ServerFrameError;
use secsync_protocol::{
    parse_client_frame, parse_server_frame, Clock, DocumentId, LoadMode, ParseOptions, PublicKey,
    ServerFrame, Shape, SnapshotId,
};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch, Mutex as AsyncMutex, RwLock};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::crypto::{DocumentKey, EphemeralKind};
use crate::ephemeral::EphemeralSessions;
use crate::frames::{self, BuildError, OpenError, SnapshotSpec};
use crate::sync::{Event, KnownSnapshot, SyncError, SyncState};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Non-fatal errors and warnings kept for [`ClientState`]; older ones are dropped.
const MAX_KEPT_ERRORS: usize = 200;

/// How to connect and behave.
#[derive(Clone)]
pub struct ClientOptions {
    /// WebSocket endpoint without the document, e.g. `ws://127.0.0.1:8080` (a path prefix is
    /// kept: `ws://host/secsync` opens `ws://host/secsync/{docId}`).
    pub endpoint: String,
    pub doc_id: DocumentId,
    /// The application's credential, sent as `sessionKey` (never printed by `Debug`).
    pub session_key: String,
    /// The author's Ed25519 key; its public half is `publicData.pubKey`.
    pub author: SigningKey,
    pub key: DocumentKey,
    /// The snapshot to resume from (`knownSnapshotId` and `knownSnapshotUpdateClocks`).
    pub known: Option<KnownSnapshot>,
    pub mode: LoadMode,
    /// Accept signed `publicData` fields beyond the protocol's (the JS client's
    /// `additionalAuthenticationDataValidations`); refused by default, as by the JS client.
    pub parse: ParseOptions,
    /// Bound on opening the socket and on receiving the first frame.
    pub connect_timeout: Duration,
    /// Bound on waiting for the reply to one of this client's snapshots or updates.
    pub reply_timeout: Duration,
    /// Record every received frame for [`Client::next_frame`] (off by default so a long-running
    /// load generator does not accumulate them).
    pub record_frames: bool,
    /// Send the ephemeral `initialize` after a `document` with a snapshot, as the JS client does.
    pub ephemeral_handshake: bool,
}

impl ClientOptions {
    /// Options with the defaults: `complete` mode, nothing known, 10 s timeouts, no frame
    /// recording, ephemeral handshake on.
    pub fn new(
        endpoint: impl Into<String>,
        doc_id: DocumentId,
        session_key: impl Into<String>,
        author: SigningKey,
        key: DocumentKey,
    ) -> Self {
        Self {
            endpoint: endpoint.into(),
            doc_id,
            session_key: session_key.into(),
            author,
            key,
            known: None,
            mode: LoadMode::Complete,
            parse: ParseOptions::default(),
            connect_timeout: Duration::from_secs(10),
            reply_timeout: Duration::from_secs(10),
            record_frames: false,
            ephemeral_handshake: true,
        }
    }

    /// The URL the JS client would open for these options (PROTOCOL.md 3.1).
    pub fn url(&self) -> String {
        let mut url = self.endpoint.trim_end_matches('/').to_owned();
        url.push('/');
        // The JS client inserts these raw; ids made of unreserved characters (base64url ids,
        // UUIDs) come out identical, anything else is escaped so the URL stays valid.
        url.push_str(&percent_encode(self.doc_id.as_str(), is_unreserved));
        url.push_str("?sessionKey=");
        url.push_str(&percent_encode(&self.session_key, is_unreserved));
        url.push_str(match self.mode {
            LoadMode::Complete => "&mode=complete",
            LoadMode::Delta => "&mode=delta",
        });
        if let Some(known) = &self.known {
            url.push_str("&knownSnapshotId=");
            url.push_str(&percent_encode(
                known.info.snapshot_id.as_str(),
                is_unreserved,
            ));
            url.push_str("&knownSnapshotUpdateClocks=");
            url.push_str(&percent_encode(
                &clocks_json(&known.update_clocks),
                is_uri_component_safe,
            ));
        }
        url
    }
}

impl fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientOptions")
            .field("endpoint", &self.endpoint)
            .field("doc_id", &self.doc_id)
            .field("author", &frames::public_key_of(&self.author))
            .field("known", &self.known)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// `JSON.stringify(clocks)`.
fn clocks_json(clocks: &BTreeMap<String, Clock>) -> String {
    let mut out = String::from("{");
    for (i, (author, clock)) in clocks.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_str(author, &mut out);
        out.push(':');
        out.push_str(&clock.to_string());
    }
    out.push('}');
    out
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// What `encodeURIComponent` leaves as it is.
fn is_uri_component_safe(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'_' | b'.' | b'!' | b'~' | b'*' | b'\'' | b'(' | b')'
        )
}

fn percent_encode(text: &str, keep: fn(u8) -> bool) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if keep(b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The first-frame refusals of PROTOCOL.md 3.2 (also fatal later on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    DocumentError,
    Unauthorized,
    DocumentNotFound,
}

/// Why a client stopped for good.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error("{0}")]
    Sync(SyncError),
    #[error("server sent {0:?}")]
    Refused(Refusal),
}

/// Connection status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Open,
    /// The socket closed (by either side) without a protocol failure.
    Closed,
    /// A fatal protocol error or refusal; the socket was closed (the JS client's `failed` /
    /// `noAccess`).
    Failed(Failure),
}

/// Errors of the client API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("websocket: {0}")]
    WebSocket(Box<tungstenite::Error>),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("server refused the connection: {0:?}")]
    Refused(Refusal),
    #[error("unexpected first frame: {0}")]
    UnexpectedFirstFrame(String),
    #[error("document load failed: {0}")]
    Load(SyncError),
    #[error("client failed: {0}")]
    Failed(Failure),
    #[error("connection closed")]
    Closed,
    #[error("no active snapshot: the first change of a document must be a snapshot")]
    NoActiveSnapshot,
    #[error("reply does not match the frame in flight: {0}")]
    UnexpectedReply(String),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("frames are not recorded (set ClientOptions::record_frames)")]
    NotRecording,
    #[error(
        "the active snapshot or its update clocks changed since the snapshot's content was taken"
    )]
    StaleBasis,
}

impl From<tungstenite::Error> for Error {
    fn from(error: tungstenite::Error) -> Self {
        Error::WebSocket(Box::new(error))
    }
}

/// The server's answer to one of this client's updates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateAck {
    Saved {
        snapshot_id: SnapshotId,
        clock: Clock,
    },
    /// Refused; the client's next update restarts after its confirmed clock. With
    /// `requires_new_snapshot` the server wants a snapshot instead.
    Failed { requires_new_snapshot: bool },
}

/// The server's answer to one of this client's snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotAck {
    /// Accepted. `adopted` is false when the client's active snapshot was no longer the new
    /// snapshot's parent (the JS client then ignores the acknowledgement).
    Saved {
        snapshot_id: SnapshotId,
        adopted: bool,
    },
    /// Refused. Recovery data (the active snapshot and/or its updates) was applied and queued
    /// as events: apply them, then retry with a snapshot of the merged state.
    Failed {
        recovered_events: usize,
        errors: Vec<SyncError>,
    },
}

/// A received frame as recorded for raw tests.
#[derive(Debug, Clone)]
pub struct Received {
    pub text: String,
    pub frame: Result<ServerFrame, ServerFrameError>,
}

/// A copy of the client's state at one moment.
#[derive(Debug, Clone)]
pub struct ClientState {
    pub status: Status,
    /// The active snapshot and the clocks of the updates applied on it.
    pub active: Option<KnownSnapshot>,
    /// This client's confirmed clock on the active snapshot.
    pub confirmed_clock: Option<Clock>,
    /// The clock of the last update this client sent on the active snapshot.
    pub local_clock: Option<Clock>,
    /// Snapshot and update frames of this client still awaiting their reply.
    pub pending_replies: usize,
    /// Peers (public keys) whose ephemeral session is proven.
    pub ephemeral_peers: Vec<String>,
    /// Non-fatal errors, oldest first (the JS client's ignored errors).
    pub errors: Vec<SyncError>,
    /// Protocol oddities that are not errors of a message (unexpected replies, unparsable
    /// server frames), oldest first.
    pub warnings: Vec<String>,
}

impl ClientState {
    pub fn active_snapshot_id(&self) -> Option<&SnapshotId> {
        self.active.as_ref().map(KnownSnapshot::snapshot_id)
    }

    /// An author's clock on the active snapshot.
    pub fn clock_of(&self, author: &PublicKey) -> Option<Clock> {
        self.active
            .as_ref()
            .and_then(|a| a.update_clocks.get(author.as_str()).copied())
    }
}

enum Pending {
    Update {
        snapshot_id: SnapshotId,
        clock: Clock,
        reply: oneshot::Sender<Result<UpdateAck, Error>>,
    },
    Snapshot {
        info: ProofEntry,
        parent: Option<SnapshotId>,
        reply: oneshot::Sender<Result<SnapshotAck, Error>>,
    },
    /// A snapshot- or update-shaped frame sent with [`Client::send_raw`]: its reply keeps the
    /// order but does not touch the state.
    Raw,
}

enum Command {
    Send(String),
    Close,
}

/// What a snapshot's content is known to reflect ([`Client::send_snapshot_on`]).
#[derive(Clone, Copy)]
enum Basis<'a> {
    /// Unknown: send on whatever the state is.
    Any,
    /// Exactly this active snapshot and these clocks (`None`: no snapshot yet).
    Exactly(Option<&'a KnownSnapshot>),
}

/// Everything the driver and the API share, behind one mutex never held across an await.
struct Core {
    sync: SyncState,
    sessions: EphemeralSessions,
    author: SigningKey,
    key: DocumentKey,
    parse: ParseOptions,
    pending: VecDeque<Pending>,
    status: Status,
    errors: VecDeque<SyncError>,
    warnings: VecDeque<String>,
    events: mpsc::UnboundedSender<Event>,
}

impl Core {
    fn state(&self) -> ClientState {
        ClientState {
            status: self.status.clone(),
            active: self.sync.active().cloned(),
            confirmed_clock: self.sync.confirmed_clock(),
            local_clock: self.sync.local_clock(),
            pending_replies: self.pending.len(),
            ephemeral_peers: self.sessions.peers().keys().cloned().collect(),
            errors: self.errors.iter().cloned().collect(),
            warnings: self.warnings.iter().cloned().collect(),
        }
    }

    fn ensure_open(&self) -> Result<(), Error> {
        match &self.status {
            Status::Open => Ok(()),
            Status::Closed => Err(Error::Closed),
            Status::Failed(f) => Err(Error::Failed(f.clone())),
        }
    }

    fn emit(&self, event: Event) {
        // The receiver is gone only when the Client was dropped; nothing left to deliver to.
        let _ = self.events.send(event);
    }

    fn record_error(&mut self, error: SyncError) {
        if self.errors.len() == MAX_KEPT_ERRORS {
            self.errors.pop_front();
        }
        self.errors.push_back(error);
    }

    fn warn(&mut self, warning: String) {
        if self.warnings.len() == MAX_KEPT_ERRORS {
            self.warnings.pop_front();
        }
        self.warnings.push_back(warning);
    }

    /// Records a non-fatal error, or returns the failure for a fatal one.
    fn sync_error(&mut self, error: SyncError) -> Option<Failure> {
        if error.is_fatal() {
            Some(Failure::Sync(error))
        } else {
            self.record_error(error);
            None
        }
    }

    /// Ends the connection's life: status, and every waiter learns why.
    fn finish(&mut self, failure: Option<Failure>) {
        if let Some(failure) = failure {
            self.status = Status::Failed(failure);
        } else if self.status == Status::Open {
            self.status = Status::Closed;
        }
        let error = || match &self.status {
            Status::Failed(f) => Error::Failed(f.clone()),
            _ => Error::Closed,
        };
        for pending in self.pending.drain(..).collect::<Vec<_>>() {
            match pending {
                Pending::Update { reply, .. } => {
                    let _ = reply.send(Err(error()));
                }
                Pending::Snapshot { reply, .. } => {
                    let _ = reply.send(Err(error()));
                }
                Pending::Raw => {}
            }
        }
    }

    fn ephemeral_frame(&mut self, kind: EphemeralKind, content: &[u8]) -> Result<String, Error> {
        let payload = self.sessions.next_payload(kind, content);
        Ok(frames::build_ephemeral(
            self.sync.doc_id(),
            &payload,
            &self.key,
            &self.author,
        )?)
    }

    /// Processes one frame after `document`. Returns frames to send and a fatal failure.
    fn handle(&mut self, text: &str, frame: ServerFrame) -> (Vec<String>, Option<Failure>) {
        let mut outgoing = Vec::new();
        let failure = match frame {
            ServerFrame::Snapshot(body) => match self.sync.apply_live_snapshot(&body, &self.key) {
                Ok(event) => {
                    if let Some(e) = event {
                        self.emit(e);
                    }
                    None
                }
                Err(e) => self.sync_error(e),
            },
            ServerFrame::Update(body) => match self.sync.apply_update(&body, &self.key) {
                Ok(event) => {
                    self.emit(event);
                    None
                }
                Err(e) => self.sync_error(e),
            },
            ServerFrame::EphemeralMessage(body) => {
                self.handle_ephemeral(&body, &mut outgoing);
                None
            }
            ServerFrame::UpdateSaved { snapshot_id, clock } => {
                self.on_update_reply(Some((snapshot_id, clock)), false);
                None
            }
            ServerFrame::UpdateSaveFailed {
                requires_new_snapshot,
            } => {
                self.on_update_reply(None, requires_new_snapshot);
                None
            }
            ServerFrame::SnapshotSaved(id) => {
                self.on_snapshot_saved(&id);
                None
            }
            ServerFrame::SnapshotSaveFailed {
                snapshot,
                updates,
                chain,
            } => self.on_snapshot_save_failed(
                snapshot.as_deref(),
                updates.as_deref(),
                chain.as_deref(),
            ),
            ServerFrame::Document { .. } => {
                self.warn("a second `document` frame was ignored".into());
                None
            }
            ServerFrame::DocumentError => Some(Failure::Refused(Refusal::DocumentError)),
            ServerFrame::Unauthorized => Some(Failure::Refused(Refusal::Unauthorized)),
            ServerFrame::DocumentNotFound => Some(Failure::Refused(Refusal::DocumentNotFound)),
            ServerFrame::InvalidMessage(_) | ServerFrame::Other(_) => {
                self.emit(Event::Custom {
                    text: text.to_owned(),
                });
                None
            }
        };
        (outgoing, failure)
    }

    fn handle_ephemeral(&mut self, body: &str, outgoing: &mut Vec<String>) {
        let verified = match frames::verify_ephemeral(body, self.sync.doc_id(), self.parse) {
            Ok(v) => v,
            // The JS client ignores messages of other documents without an error.
            Err(OpenError::WrongDocument) => return,
            Err(OpenError::BadSignature) => {
                return self.record_error(SyncError::EphemeralSignature)
            }
            Err(_) => return self.record_error(SyncError::EphemeralMalformed),
        };
        let Ok(payload) = verified.decrypt(&self.key) else {
            return self.record_error(SyncError::EphemeralDecryption);
        };
        let author = verified.author().clone();
        let received = self.sessions.receive(&author, &payload, &self.author);
        if let Some(error) = received.error {
            self.record_error(error);
        }
        if let Some((kind, proof)) = received.reply {
            match self.ephemeral_frame(kind, &proof) {
                Ok(frame) => outgoing.push(frame),
                Err(e) => self.warn(format!("could not build an ephemeral proof: {e}")),
            }
        }
        if let Some(content) = received.content {
            self.emit(Event::Ephemeral { author, content });
        }
    }

    /// `update-saved` (with its snapshot id and clock) or `update-save-failed`.
    fn on_update_reply(&mut self, saved: Option<(SnapshotId, Clock)>, requires_new_snapshot: bool) {
        let kind = if saved.is_some() {
            "update-saved"
        } else {
            "update-save-failed"
        };
        match self.pending.pop_front() {
            Some(Pending::Update {
                snapshot_id,
                clock,
                reply,
            }) => {
                let result = match saved {
                    Some((id, c)) if id == snapshot_id && c == clock => {
                        self.sync.on_update_saved(&id, c);
                        Ok(UpdateAck::Saved {
                            snapshot_id: id,
                            clock: c,
                        })
                    }
                    Some((id, c)) => {
                        // As the JS client, record what the server says it saved.
                        self.sync.on_update_saved(&id, c);
                        let msg = format!(
                            "update-saved for {id}/{c}, but {snapshot_id}/{clock} was in flight"
                        );
                        self.warn(msg.clone());
                        Err(Error::UnexpectedReply(msg))
                    }
                    None => {
                        self.sync.on_update_save_failed();
                        Ok(UpdateAck::Failed {
                            requires_new_snapshot,
                        })
                    }
                };
                let _ = reply.send(result);
            }
            Some(Pending::Raw) => {}
            Some(Pending::Snapshot { reply, .. }) => {
                let msg = format!("{kind} while a snapshot was in flight");
                self.warn(msg.clone());
                let _ = reply.send(Err(Error::UnexpectedReply(msg)));
            }
            None => self.warn(format!("{kind} with no frame in flight")),
        }
    }

    fn on_snapshot_saved(&mut self, id: &SnapshotId) {
        match self.pending.pop_front() {
            Some(Pending::Snapshot {
                info,
                parent,
                reply,
            }) => {
                let result = if &info.snapshot_id == id {
                    let adopted = self.sync.adopt_own_snapshot(&info, parent.as_ref());
                    Ok(SnapshotAck::Saved {
                        snapshot_id: id.clone(),
                        adopted,
                    })
                } else {
                    let msg = format!(
                        "snapshot-saved for {id}, but {} was in flight",
                        info.snapshot_id
                    );
                    self.warn(msg.clone());
                    Err(Error::UnexpectedReply(msg))
                };
                let _ = reply.send(result);
            }
            Some(Pending::Raw) => {}
            Some(Pending::Update { reply, .. }) => {
                let msg = "snapshot-saved while an update was in flight".to_owned();
                self.warn(msg.clone());
                let _ = reply.send(Err(Error::UnexpectedReply(msg)));
            }
            None => self.warn("snapshot-saved with no frame in flight".into()),
        }
    }

    fn on_snapshot_save_failed(
        &mut self,
        snapshot: Option<&str>,
        updates: Option<&[String]>,
        chain: Option<&[ProofEntry]>,
    ) -> Option<Failure> {
        match self.pending.pop_front() {
            Some(Pending::Snapshot { reply, .. }) => {
                let (events, errors) = self
                    .sync
                    .apply_recovery(snapshot, updates, chain, &self.key);
                let recovered_events = events.len();
                for e in events {
                    self.emit(e);
                }
                let mut failure = None;
                for error in &errors {
                    if failure.is_none() {
                        failure = self.sync_error(error.clone());
                    }
                }
                let _ = reply.send(Ok(SnapshotAck::Failed {
                    recovered_events,
                    errors,
                }));
                failure
            }
            Some(Pending::Raw) => None,
            Some(Pending::Update { reply, .. }) => {
                let msg = "snapshot-save-failed while an update was in flight".to_owned();
                self.warn(msg.clone());
                let _ = reply.send(Err(Error::UnexpectedReply(msg)));
                None
            }
            None => {
                self.warn("snapshot-save-failed with no frame in flight".into());
                None
            }
        }
    }
}

/// A connected secsync client. Methods take `&self`, so one client can be shared (e.g. in an
/// `Arc`) between a task that edits and one that reads events.
pub struct Client {
    core: Arc<Mutex<Core>>,
    options: ClientOptions,
    public_key: PublicKey,
    commands: mpsc::UnboundedSender<Command>,
    events: AsyncMutex<mpsc::UnboundedReceiver<Event>>,
    frames: Option<AsyncMutex<mpsc::UnboundedReceiver<Received>>>,
    changed: watch::Receiver<u64>,
    /// Updates take it shared while enqueueing; a snapshot holds it exclusively until its
    /// reply, because the protocol allows nothing else in flight alongside a snapshot.
    gate: RwLock<()>,
    driver: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("doc_id", &self.options.doc_id)
            .field("public_key", &self.public_key)
            .finish_non_exhaustive()
    }
}

fn lock(core: &Mutex<Core>) -> MutexGuard<'_, Core> {
    // A panic while holding the lock leaves consistent-enough data for reporting; keep going.
    core.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The next text frame, skipping control frames.
async fn next_text(ws: &mut Socket) -> Result<String, Error> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => return Ok(text.as_str().to_owned()),
            Some(Ok(Message::Binary(_))) => {
                return Err(Error::UnexpectedFirstFrame("binary frame".into()))
            }
            Some(Ok(Message::Close(_))) | None => return Err(Error::Closed),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
        }
    }
}

impl Client {
    /// Connects, reads the first frame and applies `document`. Fails with [`Error::Refused`]
    /// for `document-error` / `unauthorized` / `document-not-found`, with [`Error::Load`] when
    /// the document does not verify (the JS client's permanent `failed`).
    pub async fn connect(options: ClientOptions) -> Result<Client, Error> {
        let (mut ws, _) = tokio::time::timeout(
            options.connect_timeout,
            tokio_tungstenite::connect_async(options.url()),
        )
        .await
        .map_err(|_| Error::Timeout("the WebSocket connection"))??;
        match Self::load(&mut ws, &options).await {
            Ok(loaded) => Ok(Self::start(ws, options, loaded)),
            Err(e) => {
                // Best effort: the server gets a clean close instead of a dropped socket.
                let _ = ws.close(None).await;
                Err(e)
            }
        }
    }

    /// Reads and applies the first frame.
    async fn load(ws: &mut Socket, options: &ClientOptions) -> Result<Loaded, Error> {
        let text = tokio::time::timeout(options.connect_timeout, next_text(ws))
            .await
            .map_err(|_| Error::Timeout("the first frame"))??;
        let frame = parse_server_frame(&text);
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let mut sync = SyncState::new(
            options.doc_id.clone(),
            frames::public_key_of(&options.author),
            options.parse,
            options.known.as_ref(),
            options.mode,
        );
        let has_snapshot = match &frame {
            Ok(ServerFrame::Document {
                snapshot,
                updates,
                chain,
            }) => {
                let events = sync
                    .apply_document(
                        snapshot.as_deref(),
                        updates,
                        chain.as_deref(),
                        options.mode,
                        options.known.as_ref(),
                        &options.key,
                    )
                    .map_err(Error::Load)?;
                for event in events {
                    let _ = events_tx.send(event);
                }
                snapshot.is_some()
            }
            Ok(ServerFrame::DocumentError) => return Err(Error::Refused(Refusal::DocumentError)),
            Ok(ServerFrame::Unauthorized) => return Err(Error::Refused(Refusal::Unauthorized)),
            Ok(ServerFrame::DocumentNotFound) => {
                return Err(Error::Refused(Refusal::DocumentNotFound))
            }
            Ok(other) => return Err(Error::UnexpectedFirstFrame(format!("{other:?}"))),
            Err(e) => return Err(Error::UnexpectedFirstFrame(e.to_string())),
        };
        let mut core = Core {
            sync,
            sessions: EphemeralSessions::new(),
            author: options.author.clone(),
            key: options.key.clone(),
            parse: options.parse,
            pending: VecDeque::new(),
            status: Status::Open,
            errors: VecDeque::new(),
            warnings: VecDeque::new(),
            events: events_tx,
        };
        if options.ephemeral_handshake && has_snapshot {
            // The JS client announces its session as soon as it sees a document with a
            // snapshot, so peers answer with proofs.
            let init = core.ephemeral_frame(EphemeralKind::Initialize, &[])?;
            ws.send(Message::text(init)).await?;
        }
        Ok(Loaded {
            core,
            events_rx,
            first: Received { text, frame },
        })
    }

    fn start(ws: Socket, options: ClientOptions, loaded: Loaded) -> Client {
        let (commands_tx, commands_rx) = mpsc::unbounded_channel();
        let (changed_tx, changed_rx) = watch::channel(0u64);
        let (frames_tx, frames_rx) = if options.record_frames {
            let (tx, rx) = mpsc::unbounded_channel();
            let _ = tx.send(loaded.first);
            (Some(tx), Some(AsyncMutex::new(rx)))
        } else {
            (None, None)
        };
        let core = Arc::new(Mutex::new(loaded.core));
        let driver = tokio::spawn(drive(
            ws,
            Arc::clone(&core),
            commands_rx,
            frames_tx,
            changed_tx,
        ));
        Client {
            core,
            public_key: frames::public_key_of(&options.author),
            options,
            commands: commands_tx,
            events: AsyncMutex::new(loaded.events_rx),
            frames: frames_rx,
            changed: changed_rx,
            gate: RwLock::new(()),
            driver: Mutex::new(Some(driver)),
        }
    }

    /// Connects again with the same options, resuming like the JS client after a drop: the
    /// active snapshot and its clocks as the known state, in `mode`.
    pub async fn reconnect(&self, mode: LoadMode) -> Result<Client, Error> {
        let mut options = self.options.clone();
        options.known = self.state().active;
        options.mode = mode;
        Client::connect(options).await
    }

    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    pub fn doc_id(&self) -> &DocumentId {
        &self.options.doc_id
    }

    /// This client's author key as it appears in `publicData.pubKey`.
    pub fn public_key(&self) -> &PublicKey {
        &self.public_key
    }

    pub fn state(&self) -> ClientState {
        lock(&self.core).state()
    }

    /// Sends `plaintext` as the next update on the active snapshot and waits for the reply to
    /// this frame. Several calls may run concurrently (pipelining); their replies come back in
    /// order. After a `Failed` ack the next update restarts from the confirmed clock.
    pub async fn send_update(&self, plaintext: &[u8]) -> Result<UpdateAck, Error> {
        let rx = {
            let _shared = self.gate.read().await;
            let mut core = lock(&self.core);
            core.ensure_open()?;
            let (snapshot_id, clock) = core.sync.next_update().ok_or(Error::NoActiveSnapshot)?;
            let text = frames::build_update(
                &self.options.doc_id,
                &snapshot_id,
                clock,
                plaintext,
                &self.options.key,
                &self.options.author,
            );
            let text = match text {
                Ok(text) => text,
                Err(e) => {
                    // Give the reserved clock back.
                    core.sync.on_update_save_failed();
                    return Err(e.into());
                }
            };
            let (tx, rx) = oneshot::channel();
            core.pending.push_back(Pending::Update {
                snapshot_id,
                clock,
                reply: tx,
            });
            // Queued while the lock is held, so the send order is the pending order.
            self.commands
                .send(Command::Send(text))
                .map_err(|_| Error::Closed)?;
            rx
        };
        self.await_reply(rx, "the update's reply").await
    }

    /// Sends `plaintext` (the full document state) as a new snapshot on top of the active one
    /// (or as the document's first snapshot) and waits for the reply. Waits first until this
    /// client's updates in flight are answered, so `parentSnapshotUpdateClocks` includes them.
    pub async fn send_snapshot(&self, plaintext: &[u8]) -> Result<SnapshotAck, Error> {
        self.snapshot_frame(plaintext, Basis::Any).await
    }

    /// [`Client::send_snapshot`] for content taken from a document that follows this client's
    /// events: `basis` is the [`ClientState::active`] that `plaintext` reflects. If the active
    /// snapshot or its clocks differ from it when the frame is built (an update arrived after
    /// the content was taken), nothing is sent and [`Error::StaleBasis`] is returned: the
    /// frame's `parentSnapshotUpdateClocks` would claim an update its content lacks, and
    /// clients loading that snapshot later would never see the update. Take the content again
    /// once the document caught up, and retry.
    pub async fn send_snapshot_on(
        &self,
        plaintext: &[u8],
        basis: Option<&KnownSnapshot>,
    ) -> Result<SnapshotAck, Error> {
        self.snapshot_frame(plaintext, Basis::Exactly(basis)).await
    }

    async fn snapshot_frame(
        &self,
        plaintext: &[u8],
        basis: Basis<'_>,
    ) -> Result<SnapshotAck, Error> {
        let _exclusive = self.gate.write().await;
        self.wait_core(self.options.reply_timeout, "updates in flight", |core| {
            !core
                .pending
                .iter()
                .any(|p| matches!(p, Pending::Update { .. }))
        })
        .await?;
        let rx = {
            let mut core = lock(&self.core);
            core.ensure_open()?;
            let snapshot_id = frames::generate_snapshot_id()?;
            let active = core.sync.active().cloned();
            // Checked under the same lock as the frame is built with, so no update slips in
            // between.
            if matches!(basis, Basis::Exactly(basis) if basis != active.as_ref()) {
                return Err(Error::StaleBasis);
            }
            let clocks = active
                .as_ref()
                .map(|a| a.update_clocks.clone())
                .unwrap_or_default();
            let built = frames::build_snapshot(
                &SnapshotSpec {
                    doc_id: &self.options.doc_id,
                    snapshot_id: &snapshot_id,
                    parent: active.as_ref().map(|a| &a.info),
                    parent_snapshot_update_clocks: &clocks,
                },
                plaintext,
                &self.options.key,
                &self.options.author,
            )?;
            let (tx, rx) = oneshot::channel();
            core.pending.push_back(Pending::Snapshot {
                info: built.info,
                parent: built.parent_snapshot_id,
                reply: tx,
            });
            self.commands
                .send(Command::Send(built.text))
                .map_err(|_| Error::Closed)?;
            rx
        };
        self.await_reply(rx, "the snapshot's reply").await
    }

    /// Sends `content` as an ephemeral `message` (no reply). Peers deliver it only once they
    /// have proven this client's session.
    pub fn send_ephemeral(&self, content: &[u8]) -> Result<(), Error> {
        let mut core = lock(&self.core);
        core.ensure_open()?;
        let frame = core.ephemeral_frame(EphemeralKind::Message, content)?;
        self.commands
            .send(Command::Send(frame))
            .map_err(|_| Error::Closed)
    }

    /// Sends any text as it is. A frame the server classifies as a snapshot or update (by the
    /// protocol crate's rules, whether or not it is valid) takes its place in the reply order;
    /// its reply is then neither applied to the state nor returned by a `send_*` call, only
    /// recorded (see [`Client::next_frame`]). Raw writes signed with this client's own key
    /// desynchronise its clocks; sign them with another key.
    pub fn send_raw(&self, text: impl Into<String>) -> Result<(), Error> {
        let text = text.into();
        let shape = match parse_client_frame(
            &text,
            ParseOptions {
                allow_extra_public_data_fields: true,
            },
        ) {
            Ok(frame) => frame.shape(),
            Err(e) => e.shape,
        };
        let mut core = lock(&self.core);
        core.ensure_open()?;
        if matches!(shape, Shape::Snapshot | Shape::Update { .. }) {
            core.pending.push_back(Pending::Raw);
        }
        self.commands
            .send(Command::Send(text))
            .map_err(|_| Error::Closed)
    }

    /// The next recorded frame (including the first one), or a timeout.
    pub async fn next_frame(&self, timeout: Duration) -> Result<Received, Error> {
        let frames = self.frames.as_ref().ok_or(Error::NotRecording)?;
        let mut rx = frames.lock().await;
        tokio::time::timeout(timeout, rx.recv())
            .await
            .map_err(|_| Error::Timeout("a frame"))?
            .ok_or(Error::Closed)
    }

    /// The next decrypted snapshot, change, ephemeral message or custom frame. After the
    /// connection ended and the queue is drained: [`Error::Closed`] / [`Error::Failed`].
    pub async fn next_event(&self, timeout: Duration) -> Result<Event, Error> {
        let mut rx = self.events.lock().await;
        match tokio::time::timeout(timeout, rx.recv()).await {
            Err(_) => Err(Error::Timeout("an event")),
            Ok(Some(event)) => Ok(event),
            Ok(None) => Err(lock(&self.core)
                .ensure_open()
                .err()
                .unwrap_or(Error::Closed)),
        }
    }

    /// Every event already queued, without waiting.
    pub fn drain_events(&self) -> Vec<Event> {
        let Ok(mut rx) = self.events.try_lock() else {
            return Vec::new();
        };
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    /// Waits until `predicate` holds for the state (checked after every processed frame).
    /// Fails early if the connection ends while it does not hold.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        predicate: impl Fn(&ClientState) -> bool,
    ) -> Result<ClientState, Error> {
        let mut found = None;
        self.wait_core(timeout, "a state condition", |core| {
            let state = core.state();
            let ok = predicate(&state);
            if ok {
                found = Some(state);
            }
            ok
        })
        .await?;
        found.ok_or(Error::Timeout("a state condition"))
    }

    async fn wait_core(
        &self,
        timeout: Duration,
        what: &'static str,
        mut done: impl FnMut(&Core) -> bool,
    ) -> Result<(), Error> {
        let mut changed = self.changed.clone();
        let wait = async {
            loop {
                // Marked seen before checking, so no change between check and wait is missed.
                changed.borrow_and_update();
                {
                    let core = lock(&self.core);
                    if done(&core) {
                        return Ok(());
                    }
                    core.ensure_open()?;
                }
                if changed.changed().await.is_err() {
                    // Driver gone: one last look.
                    let core = lock(&self.core);
                    return if done(&core) {
                        Ok(())
                    } else {
                        Err(core.ensure_open().err().unwrap_or(Error::Closed))
                    };
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| Error::Timeout(what))?
    }

    async fn await_reply<T>(
        &self,
        rx: oneshot::Receiver<Result<T, Error>>,
        what: &'static str,
    ) -> Result<T, Error> {
        match tokio::time::timeout(self.options.reply_timeout, rx).await {
            Err(_) => Err(Error::Timeout(what)),
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(lock(&self.core)
                .ensure_open()
                .err()
                .unwrap_or(Error::Closed)),
        }
    }

    /// Closes the connection (close handshake) and waits for the driver to stop.
    pub async fn close(self) -> Result<(), Error> {
        let _ = self.commands.send(Command::Close);
        let driver = self
            .driver
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(driver) = driver {
            if tokio::time::timeout(self.options.reply_timeout, driver)
                .await
                .is_err()
            {
                return Err(Error::Timeout("the connection to close"));
            }
        }
        Ok(())
    }
}

struct Loaded {
    core: Core,
    events_rx: mpsc::UnboundedReceiver<Event>,
    first: Received,
}

/// The driver task: owns the socket, sends queued frames in order, processes every received
/// frame, and wakes waiters after each one.
async fn drive(
    mut ws: Socket,
    core: Arc<Mutex<Core>>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    frames: Option<mpsc::UnboundedSender<Received>>,
    changed: watch::Sender<u64>,
) {
    let mut closing = false;
    let failure = loop {
        tokio::select! {
            command = commands.recv(), if !closing => match command {
                Some(Command::Send(text)) => {
                    if ws.send(Message::text(text)).await.is_err() {
                        break None;
                    }
                }
                // Close requested, or the Client was dropped.
                Some(Command::Close) | None => {
                    closing = true;
                    if ws.close(None).await.is_err() {
                        break None;
                    }
                }
            },
            message = ws.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    let text = text.as_str();
                    let parsed = parse_server_frame(text);
                    if let Some(frames) = &frames {
                        let _ = frames.send(Received { text: text.to_owned(), frame: parsed.clone() });
                    }
                    let (outgoing, failure) = match parsed {
                        Ok(frame) => lock(&core).handle(text, frame),
                        Err(e) => {
                            lock(&core).warn(format!("unparsable server frame: {e}"));
                            (Vec::new(), None)
                        }
                    };
                    if failure.is_some() {
                        break failure;
                    }
                    for frame in outgoing {
                        if ws.send(Message::text(frame)).await.is_err() {
                            break;
                        }
                    }
                }
                Some(Ok(Message::Binary(_))) => {
                    lock(&core).warn("binary frame ignored".into());
                }
                // Keep polling after a close frame: that sends tungstenite's queued close reply,
                // and the stream then ends.
                Some(Err(_)) | None => break None,
                Some(Ok(_)) => {}
            },
        }
        changed.send_modify(|n| *n += 1);
    };
    let failed = failure.is_some();
    lock(&core).finish(failure);
    changed.send_modify(|n| *n += 1);
    if failed {
        // The JS client stops its socket on `failed` / `noAccess`.
        let _ = ws.close(None).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_matches_the_js_client() {
        let mut options = ClientOptions::new(
            "ws://127.0.0.1:1/",
            DocumentId::parse("zmKmVAsjk2YE0ONsruxTSja8TRNhn324").unwrap(),
            "k_1",
            SigningKey::from_bytes(&[1; 32]),
            DocumentKey::from_bytes([2; 32]),
        );
        assert_eq!(
            options.url(),
            "ws://127.0.0.1:1/zmKmVAsjk2YE0ONsruxTSja8TRNhn324?sessionKey=k_1&mode=complete"
        );
        let key = "GX9rI-FshTLGq8g4-s1ep4m-DHaykgM0A5v6iz02jWE";
        let mut known = KnownSnapshot::new(ProofEntry {
            snapshot_id: SnapshotId::parse("S1").unwrap(),
            parent_snapshot_proof: String::new(),
            snapshot_ciphertext_hash: String::new(),
        });
        known
            .update_clocks
            .insert(key.into(), Clock::new(3).unwrap());
        options.known = Some(known);
        options.mode = LoadMode::Delta;
        assert_eq!(
            options.url(),
            format!(
                "ws://127.0.0.1:1/zmKmVAsjk2YE0ONsruxTSja8TRNhn324?sessionKey=k_1&mode=delta\
                 &knownSnapshotId=S1&knownSnapshotUpdateClocks=%7B%22{key}%22%3A3%7D"
            )
        );
        assert!(!format!("{options:?}").contains("k_1"));
        assert_eq!(percent_encode("a b/é", is_unreserved), "a%20b%2F%C3%A9");
    }
}
