//! Test support: a fresh Postgres database per test, and signed frames made with real keys.

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods
)]

use std::future::Future;

use ed25519_dalek::SigningKey;
use futures::FutureExt as _;
use secsync_persistence::postgres::{PgBackend, PgSettings};
use secsync_protocol::crypto::{parent_snapshot_proof, INITIAL_PARENT_SNAPSHOT_PROOF};
use secsync_protocol::message::build_frame;
use secsync_protocol::{b64, canonical, crypto, Domain, PublicKey};
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

/// An author with a real Ed25519 key.
pub struct Author {
    pub key: SigningKey,
    pub pub_key: String,
}

impl Author {
    pub fn new(seed: u8) -> Self {
        let key = SigningKey::from_bytes(&[seed; 32]);
        let pub_key = PublicKey::from_bytes(key.verifying_key().to_bytes())
            .as_str()
            .to_owned();
        Self { key, pub_key }
    }

    pub fn update(&self, doc: &str, snapshot_id: &str, clock: u64) -> String {
        let pd = format!(
            r#"{{"refSnapshotId":{},"docId":{},"pubKey":"{}","clock":{clock}}}"#,
            json_str(snapshot_id),
            json_str(doc),
            self.pub_key
        );
        let ct = b64::encode(format!(
            "update {doc} {snapshot_id} {} {clock} ............................................",
            self.pub_key
        ));
        build_frame(
            Domain::Update,
            &ct,
            &b64::encode([clock as u8; 24]),
            &pd,
            &self.key,
        )
        .unwrap()
    }

    /// A snapshot; `parent` is the parent's (id, parentSnapshotProof, ciphertext) or `None`.
    pub fn snapshot(
        &self,
        doc: &str,
        id: &str,
        parent: Option<&Snap>,
        clocks: &[(&Author, u64)],
    ) -> Snap {
        let (parent_id, proof) = match parent {
            Some(p) => (
                p.id.clone(),
                parent_snapshot_proof(&p.proof, &p.id, &crypto::ciphertext_hash(&p.ciphertext)),
            ),
            None => (String::new(), INITIAL_PARENT_SNAPSHOT_PROOF.to_owned()),
        };
        let clocks: Vec<String> = clocks
            .iter()
            .map(|(a, c)| format!("\"{}\":{c}", a.pub_key))
            .collect();
        let pd = format!(
            r#"{{"snapshotId":{},"docId":{},"pubKey":"{}","parentSnapshotId":{},"parentSnapshotUpdateClocks":{{{}}},"parentSnapshotProof":"{proof}"}}"#,
            json_str(id),
            json_str(doc),
            self.pub_key,
            json_str(&parent_id),
            clocks.join(",")
        );
        let ciphertext = b64::encode(format!(
            "snapshot {doc} {id} ..................................................."
        ));
        let body = build_frame(
            Domain::Snapshot,
            &ciphertext,
            &b64::encode([7u8; 24]),
            &pd,
            &self.key,
        )
        .unwrap();
        Snap {
            id: id.to_owned(),
            proof,
            ciphertext,
            body,
        }
    }
}

/// A snapshot made by a test, with what its children need.
#[derive(Clone)]
pub struct Snap {
    pub id: String,
    pub proof: String,
    pub ciphertext: String,
    pub body: String,
}

pub fn json_str(s: &str) -> String {
    let mut out = String::new();
    canonical::write_str(s, &mut out);
    out
}
