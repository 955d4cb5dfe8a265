//! `secsync-yrs-peer`: one secsync client editing a Yjs text document (yrs), driven line by
//! line over stdin/stdout, so a test written in another language (the JS end-to-end suite) can
//! make a Rust client edit the same document as the published JavaScript client.
//!
//!     secsync-yrs-peer --endpoint ws://127.0.0.1:4000 --doc DOC_ID --key KEY_B64U
//!                      [--timeout-ms 20000]
//!
//! `KEY_B64U` is the 32-byte document key in libsodium base64 (URL-safe, unpadded): what the
//! JS clients' `getSnapshotKey` returns, as `sodium.to_base64(key)` prints it.
//!
//! Once connected and the loaded document applied, it prints `ok ready <publicKey>` (or
//! `error connect: …` / `error load: …` and exits 1). Then one command per line on stdin, each
//! answered by exactly one line on stdout, `ok <command> [details]` or `error <reason>`; stdout
//! carries nothing else (diagnostics go to stderr):
//!
//! * `insert <text>`: appends `<text>` (the rest of the line; a JSON string literal if it
//!   starts with `"`) as one change, sends it as an update and waits for `update-saved`
//!   → `ok insert <snapshotId> <clock>`. A refused update is retried; when the server wants a
//!   snapshot, or the document has none yet, a snapshot carries the change instead
//!   → `ok insert snapshot <snapshotId>`.
//! * `snapshot`: sends a snapshot of the current state (`Y.encodeStateAsUpdateV2`) and waits
//!   for `snapshot-saved`, retrying after refusals once the recovery data is applied
//!   → `ok snapshot <snapshotId> <tries>`.
//! * `wait <text>`: waits (up to the timeout) until the document's text contains `<text>`
//!   → `ok wait`.
//! * `text`: → `ok text <JSON string of the current text>`.
//! * `quit` (or the end of stdin): closes the connection → `ok quit`, and exits.
//!
//! A background task applies every snapshot and change the client receives to the document,
//! between commands as well as during them.

use std::collections::BTreeMap;
use std::io::{BufRead as _, Write as _};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use secsync_client::crypto::random_bytes;
use secsync_client::ydoc::serialize_changes;
use secsync_client::{
    Client, ClientOptions, Clock, DocumentId, DocumentKey, Error, Event, KnownSnapshot,
    SnapshotAck, SnapshotId, Status, TextDoc, UpdateAck,
};
use secsync_protocol::{b64, canonical, json};
use tokio::sync::{mpsc, watch};

/// Attempts for one update before giving up (each refusal is followed by a short wait for the
/// snapshot that caused it).
const UPDATE_TRIES: u32 = 10;
/// Attempts for one snapshot: refusals (outdated, missing updates) and stale content.
const SNAPSHOT_TRIES: u32 = 20;
/// After a refused update, how long to wait for the active snapshot to change before
/// retrying anyway: with two gateways the refusal can overtake the new snapshot's broadcast,
/// and resending before it arrived would only reference the replaced snapshot again.
const REFUSAL_SETTLE: Duration = Duration::from_secs(2);
/// How long the background task waits for an event before looking again (it also wakes as
/// soon as the connection ends).
const IDLE: Duration = Duration::from_hours(1);

struct Args {
    endpoint: String,
    doc: DocumentId,
    key: DocumentKey,
    timeout: Duration,
    /// The session key to connect with (e.g. a token); a random one when absent.
    session_key: Option<String>,
}

const USAGE: &str =
    "usage: secsync-yrs-peer --endpoint ws://HOST:PORT --doc DOC_ID --key KEY_B64U \
                     [--timeout-ms N] [--session-key KEY]";

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut endpoint, mut doc, mut key, mut session_key) = (None, None, None, None);
    let mut timeout = Duration::from_secs(20);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--endpoint" => endpoint = Some(value()?),
            "--doc" => {
                doc = Some(DocumentId::parse(&value()?).map_err(|e| format!("--doc: {e}"))?);
            }
            "--key" => {
                key = Some(DocumentKey::from_b64(&value()?).map_err(|e| format!("--key: {e}"))?);
            }
            "--session-key" => session_key = Some(value()?),
            "--timeout-ms" => {
                let ms = value()?.parse().map_err(|e| format!("--timeout-ms: {e}"))?;
                timeout = Duration::from_millis(ms);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        endpoint: endpoint.ok_or("--endpoint is required")?,
        doc: doc.ok_or("--doc is required")?,
        key: key.ok_or("--key is required")?,
        timeout,
        session_key,
    })
}

/// The document and what of the client's state it reflects.
struct Mirror {
    doc: TextDoc,
    /// For every snapshot whose content is in `doc`: the clocks of the changes applied on it,
    /// per author. Compared with the client's state to know whether `doc` has caught up.
    applied: BTreeMap<SnapshotId, BTreeMap<String, Clock>>,
    /// Set when the document can no longer follow (an unapplicable payload, a closed or
    /// failed connection); every command fails from then on.
    failure: Option<String>,
}

impl Mirror {
    fn apply(&mut self, event: &Event) -> Result<(), String> {
        match event {
            Event::Snapshot { snapshot_id, .. } => {
                self.doc
                    .apply_event(event)
                    .map_err(|e| format!("snapshot {snapshot_id}: {e}"))?;
                self.applied.entry(snapshot_id.clone()).or_default();
            }
            Event::Change {
                snapshot_id,
                author,
                clock,
                ..
            } => {
                self.doc
                    .apply_event(event)
                    .map_err(|e| format!("update {snapshot_id}/{author}/{clock}: {e}"))?;
                // A change on a snapshot this mirror has no entry for can only follow this
                // client's own snapshot (adopted without an event), whose content came from
                // this document.
                self.applied
                    .entry(snapshot_id.clone())
                    .or_default()
                    .insert(author.as_str().to_owned(), *clock);
            }
            Event::Ephemeral { .. } | Event::Custom { .. } => {}
        }
        Ok(())
    }

    /// Whether `doc` holds everything the client state `active` says was applied. This
    /// client's own updates are left out: they were made in `doc` before being sent.
    fn reflects(&self, active: Option<&KnownSnapshot>, own: &str) -> bool {
        let Some(active) = active else {
            return true;
        };
        let Some(applied) = self.applied.get(active.snapshot_id()) else {
            return false;
        };
        active
            .update_clocks
            .iter()
            .filter(|(author, _)| author.as_str() != own)
            .all(|(author, clock)| applied.get(author).is_some_and(|c| c >= clock))
    }
}

fn lock(mirror: &Mutex<Mirror>) -> MutexGuard<'_, Mirror> {
    // A panic elsewhere leaves the document usable enough to keep answering; carry on.
    mirror.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Peer {
    client: Arc<Client>,
    mirror: Arc<Mutex<Mirror>>,
    /// Bumped by the background task after every applied event and when it stops.
    changed: watch::Sender<u64>,
    own: String,
    timeout: Duration,
}

/// The background task: applies every received snapshot and change to the document, and
/// records why it stopped.
async fn follow(client: Arc<Client>, mirror: Arc<Mutex<Mirror>>, changed: watch::Sender<u64>) {
    // Why it stopped, and whether the document is still sound (the connection ended).
    let (stopped, sound) = loop {
        tokio::select! {
            event = client.next_event(IDLE) => match event {
                Ok(event) => {
                    if let Err(e) = lock(&mirror).apply(&event) {
                        break (format!("cannot apply {e}"), false);
                    }
                    changed.send_modify(|n| *n += 1);
                }
                Err(Error::Timeout(_)) => {}
                Err(e) => break (e.to_string(), true),
            },
            // The event queue does not end when the connection does, so watch the status too.
            ended = client.wait_for(IDLE, |s| s.status != Status::Open) => match ended {
                Err(Error::Timeout(_)) => {}
                Ok(state) => break (format!("connection ended: {:?}", state.status), true),
                Err(e) => break (format!("connection ended: {e}"), true),
            },
        }
    };
    eprintln!("secsync-yrs-peer: stopped following the document: {stopped}");
    let mut mirror = lock(&mirror);
    // What arrived before the end still counts (e.g. a final update before a clean close).
    for event in client.drain_events().iter().filter(|_| sound) {
        if let Err(e) = mirror.apply(event) {
            eprintln!("secsync-yrs-peer: cannot apply {e}");
            break;
        }
    }
    mirror.failure.get_or_insert(stopped);
    drop(mirror);
    changed.send_modify(|n| *n += 1);
}

impl Peer {
    fn failure(&self) -> Result<(), String> {
        match &lock(&self.mirror).failure {
            Some(failure) => Err(failure.clone()),
            None => Ok(()),
        }
    }

    /// Waits until `check` on the document returns something, re-checking after every
    /// applied event, up to the timeout.
    async fn until<T>(
        &self,
        what: &str,
        mut check: impl FnMut(&Mirror) -> Option<T>,
    ) -> Result<T, String> {
        let mut changed = self.changed.subscribe();
        let wait = async {
            loop {
                // Marked seen before checking, so no change between check and wait is lost.
                changed.borrow_and_update();
                {
                    let mirror = lock(&self.mirror);
                    if let Some(found) = check(&mirror) {
                        return Ok(found);
                    }
                    if let Some(failure) = &mirror.failure {
                        return Err(failure.clone());
                    }
                }
                if changed.changed().await.is_err() {
                    return Err("the document is no longer followed".to_owned());
                }
            }
        };
        tokio::time::timeout(self.timeout, wait)
            .await
            .map_err(|_| format!("timed out after {:?} waiting for {what}", self.timeout))?
    }

    async fn insert(&self, chunk: &str) -> Result<String, String> {
        if chunk.is_empty() {
            return Err("nothing to insert".to_owned());
        }
        self.failure()?;
        let change = {
            let mut mirror = lock(&self.mirror);
            let end = mirror.doc.len();
            mirror.doc.insert(end, chunk)
        };
        // Kept for resending: a refused update is sent again as it is (applying a Yjs update
        // twice is harmless).
        let payload = serialize_changes(&[change]);
        for _ in 0..UPDATE_TRIES {
            let before = self.client.state().active_snapshot_id().cloned();
            match self.client.send_update(&payload).await {
                Ok(UpdateAck::Saved { snapshot_id, clock }) => {
                    return Ok(format!("insert {snapshot_id} {clock}"));
                }
                // The change is in the document already, so a snapshot carries it.
                Ok(UpdateAck::Failed {
                    requires_new_snapshot: true,
                })
                | Err(Error::NoActiveSnapshot) => {
                    let (snapshot_id, _) = self.snapshot_with_retries().await?;
                    return Ok(format!("insert snapshot {snapshot_id}"));
                }
                Ok(UpdateAck::Failed { .. }) => {
                    eprintln!("secsync-yrs-peer: update refused, retrying");
                    // Most likely another client's snapshot replaced the one the update
                    // referenced; give its broadcast a moment to arrive. A timeout here only
                    // means the refusal had another reason: retry anyway.
                    let _ = self
                        .client
                        .wait_for(REFUSAL_SETTLE, |s| {
                            s.status != Status::Open || s.active_snapshot_id() != before.as_ref()
                        })
                        .await;
                }
                Err(e) => return Err(format!("update: {e}")),
            }
        }
        Err(format!("update refused {UPDATE_TRIES} times"))
    }

    /// Sends a snapshot of the document, retrying after refusals and stale content; returns
    /// the saved snapshot's id and the number of attempts.
    async fn snapshot_with_retries(&self) -> Result<(SnapshotId, u32), String> {
        for attempt in 1..=SNAPSHOT_TRIES {
            // The content and the client state it reflects, taken together: the snapshot's
            // parent clocks must not claim an update its content lacks. After a refusal this
            // also waits for the recovery data (queued as events) to be applied.
            let (plaintext, basis) = self
                .until("the document to catch up with the client", |mirror| {
                    let active = self.client.state().active;
                    mirror
                        .reflects(active.as_ref(), &self.own)
                        .then(|| (mirror.doc.snapshot(), active))
                })
                .await?;
            match self
                .client
                .send_snapshot_on(&plaintext, basis.as_ref())
                .await
            {
                Ok(SnapshotAck::Saved {
                    snapshot_id,
                    adopted,
                }) => {
                    if adopted {
                        // The client adopts its own snapshot without an event; its content
                        // came from this document.
                        lock(&self.mirror)
                            .applied
                            .entry(snapshot_id.clone())
                            .or_default();
                    } else {
                        eprintln!("secsync-yrs-peer: snapshot {snapshot_id} saved but not adopted (another one became active first)");
                    }
                    return Ok((snapshot_id, attempt));
                }
                Ok(SnapshotAck::Failed {
                    recovered_events,
                    errors,
                }) => {
                    if !errors.is_empty() {
                        return Err(format!("snapshot refused, recovery failed: {errors:?}"));
                    }
                    eprintln!(
                        "secsync-yrs-peer: snapshot refused ({recovered_events} recovery events), retrying"
                    );
                }
                Err(Error::StaleBasis) => {
                    eprintln!(
                        "secsync-yrs-peer: an update arrived while taking the snapshot, retrying"
                    );
                }
                Err(e) => return Err(format!("snapshot: {e}")),
            }
        }
        Err(format!(
            "snapshot not saved after {SNAPSHOT_TRIES} attempts"
        ))
    }

    async fn wait(&self, needle: &str) -> Result<String, String> {
        self.until(&format!("the text to contain {needle:?}"), |mirror| {
            mirror.doc.text().contains(needle).then_some(())
        })
        .await?;
        Ok("wait".to_owned())
    }

    fn text(&self) -> Result<String, String> {
        self.failure()?;
        let mut out = String::from("text ");
        canonical::write_str(&lock(&self.mirror).doc.text(), &mut out);
        Ok(out)
    }

    async fn run(&self, line: &str) -> Result<String, String> {
        let (command, rest) = line.split_once(' ').unwrap_or((line, ""));
        match command {
            "insert" => self.insert(&argument(rest)?).await,
            "snapshot" => {
                let (snapshot_id, tries) = self.snapshot_with_retries().await?;
                Ok(format!("snapshot {snapshot_id} {tries}"))
            }
            "wait" => self.wait(&argument(rest)?).await,
            "text" => self.text(),
            other => Err(format!("unknown command {other:?}")),
        }
    }
}

/// A command's text argument: the rest of the line, or a JSON string literal (for text with
/// line breaks or leading spaces).
fn argument(rest: &str) -> Result<String, String> {
    if !rest.starts_with('"') {
        return Ok(rest.to_owned());
    }
    json::parse(rest)
        .ok()
        .and_then(|value| value.as_str().map(str::to_owned))
        .ok_or_else(|| format!("not a JSON string: {rest}"))
}

/// One answer line. Errors are kept on one line so the reader stays in step.
fn answer(result: &Result<String, String>) {
    let line = match result {
        Ok(details) => format!("ok {details}"),
        Err(reason) => format!("error {}", reason.replace(['\r', '\n'], " ")),
    };
    let mut stdout = std::io::stdout().lock();
    // The test reads answers as they come; a pipe would otherwise hold them back.
    if writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .is_err()
    {
        eprintln!("secsync-yrs-peer: stdout is gone");
    }
}

/// Reads stdin on a plain thread: a blocking read there never holds up the runtime, and the
/// channel closes at the end of input.
fn read_commands() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let author = SigningKey::from_bytes(&random_bytes());
    let mut options = ClientOptions::new(
        args.endpoint,
        args.doc,
        // Like the JS harness: a unique random session key per client, unless given one.
        args.session_key
            .unwrap_or_else(|| b64::encode(random_bytes::<24>())),
        author,
        args.key,
    );
    options.reply_timeout = args.timeout;
    options.connect_timeout = args.timeout;
    let client = match Client::connect(options).await {
        Ok(client) => Arc::new(client),
        Err(e) => {
            answer(&Err(format!("connect: {e}")));
            return ExitCode::FAILURE;
        }
    };
    let own = client.public_key().as_str().to_owned();
    let mut loaded = Mirror {
        doc: TextDoc::new(),
        applied: BTreeMap::new(),
        failure: None,
    };
    // The `document` frame's snapshot and updates are queued by now: applied before `ready`,
    // so a `text` right after it shows the loaded document.
    for event in client.drain_events() {
        if let Err(e) = loaded.apply(&event) {
            answer(&Err(format!("load: cannot apply {e}")));
            return ExitCode::FAILURE;
        }
    }
    let mirror = Arc::new(Mutex::new(loaded));
    let (changed, _) = watch::channel(0);
    let follower = tokio::spawn(follow(
        Arc::clone(&client),
        Arc::clone(&mirror),
        changed.clone(),
    ));
    let peer = Peer {
        client,
        mirror,
        changed,
        own,
        timeout: args.timeout,
    };
    answer(&Ok(format!("ready {}", peer.own)));

    let mut commands = read_commands();
    while let Some(line) = commands.recv().await {
        let line = line.trim_end_matches('\r');
        if line == "quit" {
            break;
        }
        if line.is_empty() {
            continue;
        }
        let result = peer.run(line).await;
        if let Err(reason) = &result {
            eprintln!("secsync-yrs-peer: {line:?} failed: {reason}");
        }
        answer(&result);
    }

    follower.abort();
    let Peer { client, .. } = peer;
    // The follower held the other reference; it is gone once aborted and awaited.
    let _ = follower.await;
    let closed = match Arc::try_unwrap(client) {
        Ok(client) => client.close().await.map_err(|e| e.to_string()),
        Err(_) => Err("client still shared".to_owned()),
    };
    if let Err(e) = &closed {
        eprintln!("secsync-yrs-peer: close: {e}");
    }
    answer(&Ok("quit".to_owned()));
    ExitCode::SUCCESS
}
