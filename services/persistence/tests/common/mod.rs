//! Test support: a fresh Postgres database or SQLite file per test, and signed frames made with
//! real keys.

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods
)]

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use futures::FutureExt as _;
use secsync_persistence::postgres::{PgBackend, PgSettings};
use secsync_persistence::sqlite::SqliteBackend;

use secsync_client::{frames, DocumentKey};
use secsync_protocol::{Clock, DocumentId, ProofEntry, SnapshotId};
use sqlx::Connection as _;

pub mod process;

/// The server tests create their databases on (trust auth on the machine's Postgres).
pub fn admin_url() -> String {
    std::env::var("SECSYNC_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn url_for(db: &str) -> String {
    let admin = admin_url();
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
    format!("{base}/{db}")
}

fn unique_name() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "secsync_test_{}_{}_{}",
        std::process::id(),
        nanos % 1_000_000_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `body` with the URL of a fresh, migrated database, and drops it afterwards (also when
/// the body panics).
pub async fn with_database<F, Fut>(body: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()>,
{
    let name = unique_name();
    let mut admin = sqlx::PgConnection::connect(&admin_url())
        .await
        .expect("admin connection");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let url = url_for(&name);
    let result = std::panic::AssertUnwindSafe(body(url)).catch_unwind().await;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .unwrap();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

pub async fn backend(url: &str) -> PgBackend {
    let backend = PgBackend::connect_lazy(url, &PgSettings::default()).unwrap();
    backend.migrate().await.unwrap();
    backend
}

/// Runs `body` with a migrated backend on a fresh Postgres database.
pub async fn with_pg_backend<F, Fut>(body: F)
where
    F: FnOnce(PgBackend) -> Fut,
    Fut: Future<Output = ()>,
{
    with_database(|url| async move { body(backend(&url).await).await }).await;
}

/// A fresh directory under the system's temporary directory, removed (with everything in it)
/// on drop, also when the test panics.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    pub fn new() -> Self {
        let path = std::env::temp_dir().join(unique_name());
        std::fs::create_dir(&path).unwrap();
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Where a test keeps its database (the WAL and shared-memory files go beside it).
    pub fn database(&self) -> PathBuf {
        self.0.join("secsync.sqlite")
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Opens and migrates the SQLite database at `path`.
pub async fn sqlite_backend(path: &Path) -> SqliteBackend {
    let backend = SqliteBackend::open(path).await.unwrap();
    backend.migrate().await.unwrap();
    backend
}

/// Runs `body` with a migrated backend on a fresh SQLite file, removed afterwards.
pub async fn with_sqlite_backend<F, Fut>(body: F)
where
    F: FnOnce(SqliteBackend) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = ScratchDir::new();
    let backend = sqlite_backend(&dir.database()).await;
    body(backend.clone()).await;
    backend.close().await;
}

/// An author with a real Ed25519 key, building frames with the Rust client library.
pub struct Author {
    pub key: SigningKey,
    pub pub_key: String,
}

/// One document key for every test document (the server never sees it anyway).
fn document_key() -> DocumentKey {
    DocumentKey::from_bytes([7; 32])
}

impl Author {
    pub fn new(seed: u8) -> Self {
        let key = SigningKey::from_bytes(&[seed; 32]);
        let pub_key = frames::public_key_of(&key).as_str().to_owned();
        Self { key, pub_key }
    }

    pub fn update(&self, doc: &str, snapshot_id: &str, clock: u64) -> String {
        frames::build_update(
            &DocumentId::parse(doc).unwrap(),
            &SnapshotId::parse(snapshot_id).unwrap(),
            Clock::new(clock).unwrap(),
            format!("update {clock}").as_bytes(),
            &document_key(),
            &self.key,
        )
        .unwrap()
    }

    /// A snapshot built on `parent` (`None`: the document's first), claiming these clocks.
    pub fn snapshot(
        &self,
        doc: &str,
        id: &str,
        parent: Option<&Snap>,
        clocks: &[(&Author, u64)],
    ) -> Snap {
        let clocks: BTreeMap<String, Clock> = clocks
            .iter()
            .map(|(a, c)| (a.pub_key.clone(), Clock::new(*c).unwrap()))
            .collect();
        let spec = frames::SnapshotSpec {
            doc_id: &DocumentId::parse(doc).unwrap(),
            snapshot_id: &SnapshotId::parse(id).unwrap(),
            parent: parent.map(|p| &p.info),
            parent_snapshot_update_clocks: &clocks,
        };
        let built = frames::build_snapshot(&spec, b"snapshot", &document_key(), &self.key).unwrap();
        Snap {
            id: id.to_owned(),
            info: built.info,
            body: built.text,
        }
    }
}

/// A snapshot made by a test: its frame, and the proof entry its children build on.
#[derive(Clone)]
pub struct Snap {
    pub id: String,
    pub info: ProofEntry,
    pub body: String,
}

/// Creates `doc`; `author` stores its first snapshot `S1` (returned) and updates with clocks
/// `0..updates` on it, each accepted.
pub async fn seed_document<B: secsync_persistence::backend::Backend>(
    core: &secsync_persistence::Core<B>,
    author: &Author,
    doc: &str,
    updates: u64,
) -> Snap {
    use secsync_persistence::{Kind, Outcome};
    let d = DocumentId::parse(doc).unwrap();
    core.load(&d, &secsync_protocol::LoadRequest::default(), true)
        .await
        .unwrap();
    let s1 = author.snapshot(doc, "S1", None, &[]);
    let mut frames = vec![(Kind::Snapshot, s1.body.clone())];
    frames.extend((0..updates).map(|clock| (Kind::Update, author.update(doc, "S1", clock))));
    for (kind, body) in frames {
        let outcome = core.submit(d.clone(), kind, &body, None).await.unwrap();
        assert!(matches!(outcome, Outcome::Accepted { .. }), "{outcome:?}");
    }
    s1
}
