//! The embedded binary as a user runs it: a real `secsync` process on a data directory.
//!
//! * Durability: a client writes (three snapshots, then a stream of pipelined updates), the
//!   process is killed with SIGKILL mid-stream and started again on the same directory; a new
//!   client resuming from the first snapshot verifies the proof chain, and every acknowledged
//!   update is there, in order, with its content.
//! * The data directory is locked: a second process on it stops with a clear error.
//! * `--database-url`: the same single process on PostgreSQL (a fresh database, dropped after).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]
#![allow(clippy::too_many_lines)] // scenario tests read top to bottom

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use secsync_client::crypto::random_bytes;
use secsync_client::{
    Client, ClientOptions, DocumentId, DocumentKey, Event, KnownSnapshot, ServerFrame, SnapshotAck,
    UpdateAck,
};
use secsync_protocol::b64;

const WAIT: Duration = Duration::from_secs(30);

/// A `secsync` process, killed on drop.
struct Relay {
    child: Child,
    port: u16,
}

impl Relay {
    fn start(data_dir: &Path) -> Self {
        let mut args: Vec<std::ffi::OsString> = vec!["--data-dir".into()];
        args.push(data_dir.into());
        Self::start_with(&args)
    }

    fn start_with(args: &[std::ffi::OsString]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_secsync"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("SECSYNC_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start secsync");
        let port = read_port(child.stdout.take().unwrap());
        Self { child, port }
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The port from the process's first JSON log line that names its listening address.
fn read_port(stdout: std::process::ChildStdout) -> u16 {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let marker = "\"listen\":\"127.0.0.1:";
        let mut sent = false;
        // Keep reading to the end so the process never blocks on a full pipe.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if sent {
                continue;
            }
            if let Some(port) = line
                .find(marker)
                .and_then(|start| line[start + marker.len()..].split('"').next())
                .and_then(|port| port.parse::<u16>().ok())
            {
                let _ = tx.send(port);
                sent = true;
            }
        }
    });
    rx.recv_timeout(WAIT).expect("listening address in the log")
}

fn temp_dir(label: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "secsync-test-{label}-{}-{}",
        std::process::id(),
        rand::random::<u64>()
    ))
}

fn options(url: &str, doc: &DocumentId, key: &DocumentKey, author: &SigningKey) -> ClientOptions {
    let mut options = ClientOptions::new(
        url,
        doc.clone(),
        b64::encode(random_bytes::<24>()),
        author.clone(),
        key.clone(),
    );
    options.connect_timeout = WAIT;
    options.reply_timeout = WAIT;
    options
}

/// A client of a new author on `doc`.
async fn new_author(relay: &Relay, doc: &DocumentId, key: &DocumentKey) -> Client {
    let author = SigningKey::from_bytes(&random_bytes());
    Client::connect(options(&relay.url(), doc, key, &author))
        .await
        .unwrap()
}

fn content(clock: u64) -> Vec<u8> {
    format!("update {clock}").into_bytes()
}

async fn snapshot(client: &Client, label: &str) {
    match client.send_snapshot(label.as_bytes()).await.unwrap() {
        SnapshotAck::Saved { adopted: true, .. } => {}
        other => panic!("snapshot {label} not saved: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let dir = temp_dir("restart");
    let mut relay = Relay::start(&dir);
    let doc = DocumentId::parse(&b64::encode(random_bytes::<24>())).unwrap();
    let key = DocumentKey::generate();
    let author = SigningKey::from_bytes(&random_bytes());

    // Three snapshots with updates between them.
    let writer = Client::connect(options(&relay.url(), &doc, &key, &author))
        .await
        .unwrap();
    snapshot(&writer, "s1").await;
    let first = writer.state().active.unwrap().info;
    for round in 0..2 {
        for _ in 0..20 {
            let ack = writer.send_update(b"between snapshots").await.unwrap();
            assert!(matches!(ack, UpdateAck::Saved { .. }), "{ack:?}");
        }
        snapshot(&writer, &format!("s{}", round + 2)).await;
    }
    let last_snapshot = writer.state().active_snapshot_id().cloned().unwrap();

    // Pipelined updates (windows of 16 in flight) until the process is killed.
    let writer = Arc::new(writer);
    let acked: Arc<Mutex<Vec<u64>>> = Arc::default();
    let progress = Arc::new(tokio::sync::Notify::new());
    let stream = tokio::spawn({
        let (writer, acked, progress) = (writer.clone(), acked.clone(), progress.clone());
        async move {
            let mut next = 0u64;
            loop {
                let contents: Vec<Vec<u8>> = (next..next + 16).map(content).collect();
                let window: Vec<_> = contents.iter().map(|c| writer.send_update(c)).collect();
                next += 16;
                for result in futures::future::join_all(window).await {
                    match result {
                        Ok(UpdateAck::Saved { clock, .. }) => {
                            acked.lock().unwrap().push(clock.get());
                        }
                        Ok(failed @ UpdateAck::Failed { .. }) => panic!("refused: {failed:?}"),
                        // The process is gone: the rest of this window is unacknowledged.
                        Err(_) => return,
                    }
                }
                progress.notify_one();
            }
        }
    });
    tokio::time::timeout(WAIT, async {
        while acked.lock().unwrap().len() < 300 {
            progress.notified().await;
        }
    })
    .await
    .expect("300 updates acknowledged");
    relay.kill9();
    tokio::time::timeout(WAIT, stream)
        .await
        .expect("writer notices the kill")
        .unwrap();
    let acked = acked.lock().unwrap().clone();
    let highest = *acked.iter().max().unwrap();
    assert_eq!(
        acked,
        (0..=highest).collect::<Vec<_>>(),
        "acks in clock order"
    );

    // Started again on the same directory, a reader resuming from the first snapshot gets the
    // chain to the active one (the client verifies it, or the connect fails) and every update.
    let relay = Relay::start(&dir);
    let mut reader_options = options(
        &relay.url(),
        &doc,
        &key,
        &SigningKey::from_bytes(&random_bytes()),
    );
    reader_options.known = Some(KnownSnapshot::new(first.clone()));
    reader_options.record_frames = true;
    let reader = Client::connect(reader_options).await.unwrap();
    let frame = reader.next_frame(WAIT).await.unwrap();
    let Ok(ServerFrame::Document { chain, .. }) = frame.frame else {
        panic!("first frame is not a document")
    };
    let chain: Vec<_> = chain.unwrap().into_iter().map(|e| e.snapshot_id).collect();
    assert_eq!(chain.len(), 2, "two snapshots after the first");
    assert_eq!(chain.last(), Some(&last_snapshot));
    assert_ne!(chain[0], first.snapshot_id);

    let state = reader.state();
    assert_eq!(state.active_snapshot_id(), Some(&last_snapshot));
    let stored = state.clock_of(writer.public_key()).unwrap().get();
    assert!(
        stored >= highest,
        "stored up to {stored}, acknowledged {highest}"
    );
    let changes: Vec<(u64, Vec<u8>)> = reader
        .drain_events()
        .into_iter()
        .filter_map(|event| match event {
            Event::Change {
                clock, plaintext, ..
            } => Some((clock.get(), plaintext)),
            _ => None,
        })
        .collect();
    let expected: Vec<(u64, Vec<u8>)> = (0..=stored).map(|c| (c, content(c))).collect();
    assert_eq!(changes, expected);

    // And it goes on accepting writes.
    let late = new_author(&relay, &doc, &key).await;
    let ack = late.send_update(b"after the restart").await.unwrap();
    assert!(matches!(ack, UpdateAck::Saved { .. }), "{ack:?}");
    drop(relay);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_locked_data_dir_is_refused_with_a_clear_error() {
    let dir = temp_dir("lock");
    let relay = Relay::start(&dir);
    let second = Command::new(env!("CARGO_BIN_EXE_secsync"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("in use by another secsync process"),
        "stderr: {stderr}"
    );
    drop(relay);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[allow(clippy::disallowed_methods)] // the test database server comes from the environment
fn admin_url() -> String {
    std::env::var("SECSYNC_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

#[tokio::test]
async fn runs_on_postgres_with_database_url() {
    use sqlx::Connection as _;
    let db = format!(
        "secsync_embedded_{}_{}",
        std::process::id(),
        rand::random::<u32>()
    );
    let mut admin = sqlx::PgConnection::connect(&admin_url()).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let url = format!("{}/{db}", admin_url().rsplit_once('/').unwrap().0);
    let args: Vec<std::ffi::OsString> = vec!["--database-url".into(), url.clone().into()];

    let doc = DocumentId::parse(&b64::encode(random_bytes::<24>())).unwrap();
    let key = DocumentKey::generate();
    let author = SigningKey::from_bytes(&random_bytes());
    let mut relay = Relay::start_with(&args);
    let writer = Client::connect(options(&relay.url(), &doc, &key, &author))
        .await
        .unwrap();
    snapshot(&writer, "on postgres").await;
    for clock in 0..5 {
        let ack = writer.send_update(&content(clock)).await.unwrap();
        assert!(matches!(ack, UpdateAck::Saved { .. }), "{ack:?}");
    }
    relay.kill9();

    let relay = Relay::start_with(&args);
    let reader = new_author(&relay, &doc, &key).await;
    assert_eq!(
        reader
            .state()
            .clock_of(writer.public_key())
            .map(secsync_client::Clock::get),
        Some(4)
    );
    let mut database = sqlx::PgConnection::connect(&url).await.unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM updates")
        .fetch_one(&mut database)
        .await
        .unwrap();
    assert_eq!(rows, 5, "stored in PostgreSQL");
    drop((reader, relay, database));
    sqlx::query(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .unwrap();
}
