//! Documents and signed frames, all made before any clock starts.
//!
//! Frames come from the Rust client library (`secsync_client::frames`): the same encryption,
//! `publicData` layout and Ed25519 signatures as the JavaScript client, so the relay does the
//! full work per frame (parse, verify, store, relay).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use ed25519_dalek::SigningKey;
use futures::SinkExt as _;
use indicatif::ProgressBar;
use secsync_client::crypto::random_bytes;
use secsync_client::frames::{
    build_ephemeral, build_snapshot, build_update, generate_snapshot_id, public_key_of,
    SnapshotSpec,
};
use secsync_client::{Clock, DocumentId, DocumentKey, SnapshotId};
use secsync_protocol::b64;
use secsync_protocol::json::{self, Kind};
use tokio_tungstenite::tungstenite::Message;

use crate::target::{next_text, open, Endpoint};

/// A document with its first snapshot stored on the relay.
#[derive(Debug, Clone)]
pub struct Doc {
    pub id: DocumentId,
    pub snapshot: SnapshotId,
}

/// A fresh random document id (32 characters, like `generateId`).
pub fn new_doc_id() -> anyhow::Result<DocumentId> {
    DocumentId::parse(&b64::encode(random_bytes::<24>())).map_err(|e| anyhow!("doc id: {e}"))
}

/// Plaintext of `len` bytes standing in for an encoded Yjs state.
fn filler(len: usize, seed: u64) -> Vec<u8> {
    let text = format!("{seed:016x} Yjs document state, one paragraph after another. ");
    text.bytes().cycle().take(len.max(1)).collect()
}

/// Creates a document on the relay with a first snapshot of `snapshot_bytes` plaintext.
pub async fn create_document(
    endpoint: &Endpoint,
    key: &DocumentKey,
    snapshot_bytes: usize,
) -> anyhow::Result<Doc> {
    let id = new_doc_id()?;
    let snapshot = generate_snapshot_id().map_err(|e| anyhow!("{e}"))?;
    let author = SigningKey::from_bytes(&random_bytes());
    let clocks = BTreeMap::new();
    let spec = SnapshotSpec {
        doc_id: &id,
        snapshot_id: &snapshot,
        parent: None,
        parent_snapshot_update_clocks: &clocks,
    };
    let built = build_snapshot(&spec, &filler(snapshot_bytes, 0), key, &author)
        .map_err(|e| anyhow!("building a snapshot: {e}"))?;
    let url = endpoint.url(id.as_str(), "mode=complete");
    let (mut socket, _) = open(endpoint, &url).await.context("creating a document")?;
    socket.send(Message::text(built.text)).await?;
    let reply = next_text(&mut socket, Duration::from_secs(30)).await?;
    if !crate::target::is_type(&reply, "snapshot-saved") {
        bail!("first snapshot refused: {reply:.200}");
    }
    let _ = socket.close(None).await;
    Ok(Doc { id, snapshot })
}

/// What to build for one author: `count` updates of `doc` from clock 0.
#[derive(Debug)]
pub struct UpdateJob<'a> {
    pub doc: &'a Doc,
    pub author: SigningKey,
    pub count: usize,
}

/// One author's signed updates, clock `i` at index `i`.
#[derive(Debug)]
pub struct AuthorFrames {
    pub pub_key: String,
    pub frames: Vec<String>,
}

/// Builds and signs every job's updates on all cores; `progress` counts frames.
pub fn build_updates(
    jobs: &[UpdateJob<'_>],
    key: &DocumentKey,
    update_bytes: usize,
    progress: &ProgressBar,
) -> anyhow::Result<Vec<AuthorFrames>> {
    let threads = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    let next = AtomicUsize::new(0);
    let done: Vec<(usize, anyhow::Result<AuthorFrames>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(job) = jobs.get(i) else { break out };
                        out.push((i, build_one(job, key, update_bytes, progress)));
                    }
                })
            })
            .collect();
        // A worker that panicked leaves its jobs empty; that is reported below.
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_default())
            .collect()
    });
    let mut results: Vec<Option<anyhow::Result<AuthorFrames>>> =
        std::iter::repeat_with(|| None).take(jobs.len()).collect();
    for (i, built) in done {
        results[i] = Some(built);
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(anyhow!("a build thread stopped"))))
        .collect()
}

fn build_one(
    job: &UpdateJob<'_>,
    key: &DocumentKey,
    update_bytes: usize,
    progress: &ProgressBar,
) -> anyhow::Result<AuthorFrames> {
    let mut frames = Vec::with_capacity(job.count);
    for clock in 0..job.count as u64 {
        // A typical small Yjs change: a few dozen bytes of plaintext.
        let plaintext = filler(update_bytes, clock);
        let clock = Clock::new(clock).map_err(|e| anyhow!("clock: {e}"))?;
        let frame = build_update(
            &job.doc.id,
            &job.doc.snapshot,
            clock,
            &plaintext,
            key,
            &job.author,
        )
        .map_err(|e| anyhow!("building an update: {e}"))?;
        frames.push(frame);
        if frames.len() % 256 == 0 {
            progress.inc(256);
        }
    }
    progress.inc((frames.len() % 256) as u64);
    Ok(AuthorFrames {
        pub_key: public_key_of(&job.author).as_str().to_owned(),
        frames,
    })
}

/// An ephemeral message like the JavaScript client's `initialize` (its content is opaque to
/// the relay). A fresh connection sends one, as the JS client does after its `document`.
pub fn hello(doc: &Doc, key: &DocumentKey) -> anyhow::Result<String> {
    let author = SigningKey::from_bytes(&random_bytes());
    let mut payload = vec![0u8];
    payload.extend_from_slice(&random_bytes::<24>());
    payload.extend_from_slice(&0u32.to_le_bytes());
    build_ephemeral(&doc.id, &payload, key, &author).map_err(|e| anyhow!("ephemeral: {e}"))
}

/// A server frame as the load generator needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    UpdateSaved {
        clock: u64,
    },
    UpdateSaveFailed {
        clock: Option<u64>,
    },
    /// Another connection's update.
    Update {
        pub_key: String,
        clock: u64,
    },
    /// Anything else (ephemeral messages, snapshots, …), by type.
    Other(String),
    Malformed,
}

/// Reads the type and, for updates and their replies, the author and clock.
pub fn classify(text: &str) -> Incoming {
    let Ok(root) = json::parse(text) else {
        return Incoming::Malformed;
    };
    let clock_of = |v: Option<&json::Value<'_>>| match v.map(|v| &v.kind) {
        Some(Kind::Number(n)) if *n >= 0.0 && n.fract() == 0.0 => Some(*n as u64),
        _ => None,
    };
    match root.get("type").and_then(json::Value::as_str) {
        Some("update-saved") => match clock_of(root.get("clock")) {
            Some(clock) => Incoming::UpdateSaved { clock },
            None => Incoming::Malformed,
        },
        Some("update-save-failed") => Incoming::UpdateSaveFailed {
            clock: clock_of(root.get("clock")),
        },
        Some("update") => {
            let pd = root.get("publicData");
            let pub_key = pd
                .and_then(|p| p.get("pubKey"))
                .and_then(json::Value::as_str);
            match (pub_key, clock_of(pd.and_then(|p| p.get("clock")))) {
                (Some(k), Some(clock)) => Incoming::Update {
                    pub_key: k.to_owned(),
                    clock,
                },
                _ => Incoming::Malformed,
            }
        }
        Some(other) => Incoming::Other(other.to_owned()),
        None => Incoming::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_replies_and_relays() {
        assert_eq!(
            classify("{\"type\":\"update-saved\",\"snapshotId\":\"S\",\"clock\":7}"),
            Incoming::UpdateSaved { clock: 7 }
        );
        assert_eq!(
            classify("{\"type\":\"update-save-failed\",\"snapshotId\":\"S\",\"clock\":3,\"requiresNewSnapshot\":false}"),
            Incoming::UpdateSaveFailed { clock: Some(3) }
        );
        let relayed = "{\"ciphertext\":\"c\",\"nonce\":\"n\",\"publicData\":{\"refSnapshotId\":\"S\",\"docId\":\"D\",\"pubKey\":\"K\",\"clock\":12},\"signature\":\"s\",\"type\":\"update\"}";
        assert_eq!(
            classify(relayed),
            Incoming::Update {
                pub_key: "K".into(),
                clock: 12
            }
        );
        assert_eq!(
            classify("{\"type\":\"ephemeral-message\"}"),
            Incoming::Other("ephemeral-message".into())
        );
        assert_eq!(classify("[1]"), Incoming::Malformed);
        assert_eq!(
            classify("{\"type\":\"update-saved\",\"clock\":-1}"),
            Incoming::Malformed
        );
    }

    #[test]
    fn builds_verifiable_updates_on_all_threads() {
        let key = DocumentKey::from_bytes([1; 32]);
        let doc = Doc {
            id: DocumentId::parse("doc").unwrap(),
            snapshot: SnapshotId::parse("S1").unwrap(),
        };
        let jobs: Vec<_> = (0..3)
            .map(|i| UpdateJob {
                doc: &doc,
                author: SigningKey::from_bytes(&[i + 1; 32]),
                count: 5,
            })
            .collect();
        let built = build_updates(&jobs, &key, 40, &ProgressBar::hidden()).unwrap();
        assert_eq!(built.len(), 3);
        for author in &built {
            assert_eq!(author.frames.len(), 5);
            for (clock, frame) in author.frames.iter().enumerate() {
                let v = secsync_client::frames::verify_update(
                    frame,
                    &doc.id,
                    secsync_protocol::ParseOptions::default(),
                )
                .unwrap();
                assert_eq!(v.clock().get(), clock as u64);
                assert_eq!(v.author().as_str(), author.pub_key);
            }
        }
        assert_ne!(built[0].pub_key, built[1].pub_key);
    }
}
