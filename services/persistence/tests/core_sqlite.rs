//! What only the SQLite backend has to show: its schema refuses a broken history by itself
//! (rows inserted directly through sqlx, bypassing the core), its connections are set up for
//! durability, errors are classified, loads see one state while writes commit, and data
//! survives closing and reopening the file. The rule scenarios shared with Postgres are in
//! `core_store.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

mod common;

use std::time::{Duration, Instant};

use common::{seed_document, sqlite_backend, Author, ScratchDir};
use secsync_persistence::backend::{Backend, BackendError, ReadTx as _, SnapshotRow, WriteTx as _};
use secsync_persistence::sqlite::{recommended_core_options, SqliteBackend, SqliteSettings};
use secsync_persistence::{Core, CoreOptions, Kind, Outcome};
use secsync_protocol::{DocumentId, LoadRequest, SnapshotId};
use sqlx::error::ErrorKind;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{Connection as _, Executor as _};

/// A plain sqlx connection to the file, as any tool would open it (sqlx turns foreign keys on,
/// which SQLite itself leaves off).
async fn raw_connection(dir: &ScratchDir) -> SqliteConnection {
    SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(dir.database()))
        .await
        .unwrap()
}

async fn exec(conn: &mut SqliteConnection, sql: &str) -> Result<(), sqlx::Error> {
    conn.execute(sql).await.map(|_| ())
}

/// The kind of database error `result` failed with.
fn refused(result: Result<(), sqlx::Error>) -> ErrorKind {
    match result {
        Err(sqlx::Error::Database(e)) => e.kind(),
        other => panic!("not refused by the database: {other:?}"),
    }
}

fn doc(id: &str) -> DocumentId {
    DocumentId::parse(id).unwrap()
}

fn accepted(outcome: Outcome) -> u64 {
    match outcome {
        Outcome::Accepted { sequence } => sequence,
        Outcome::Rejected { reason, .. } => panic!("rejected: {reason}"),
    }
}

/// The statement inserting a snapshot row directly (`parent`: `None` for a first snapshot).
fn insert_snapshot(doc: &str, id: &str, seq: i64, parent: Option<&str>) -> String {
    let parent = parent.map_or_else(|| "NULL".to_owned(), |p| format!("'{p}'"));
    format!(
        "INSERT INTO snapshots (document_id, id, seq, parent_id, ciphertext_hash, \
         parent_snapshot_proof, body) VALUES ('{doc}', '{id}', {seq}, {parent}, 'h', 'p', '{{}}')"
    )
}

/// Creates document `d` with its first snapshot `S1` (sequence 1) directly.
async fn one_snapshot(conn: &mut SqliteConnection) {
    exec(conn, "INSERT INTO documents (id) VALUES ('d')")
        .await
        .unwrap();
    exec(conn, &insert_snapshot("d", "S1", 1, None))
        .await
        .unwrap();
    exec(
        conn,
        "UPDATE documents SET head_seq = 1, active_snapshot_id = 'S1' WHERE id = 'd'",
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn schema_refuses_a_second_first_snapshot_and_a_fork() {
    let dir = ScratchDir::new();
    let backend = sqlite_backend(&dir.database()).await;
    let mut conn = raw_connection(&dir).await;
    one_snapshot(&mut conn).await;
    // A second parentless snapshot: two histories in one document.
    assert_eq!(
        refused(exec(&mut conn, &insert_snapshot("d", "S1b", 2, None)).await),
        ErrorKind::UniqueViolation
    );
    // Another document has its own first snapshot.
    exec(&mut conn, "INSERT INTO documents (id) VALUES ('e')")
        .await
        .unwrap();
    exec(&mut conn, &insert_snapshot("e", "S1", 1, None))
        .await
        .unwrap();
    exec(&mut conn, &insert_snapshot("e", "T2", 2, Some("S1")))
        .await
        .unwrap();
    // Two children of S1: a fork.
    exec(&mut conn, &insert_snapshot("d", "S2", 2, Some("S1")))
        .await
        .unwrap();
    assert_eq!(
        refused(exec(&mut conn, &insert_snapshot("d", "S2b", 3, Some("S1"))).await),
        ErrorKind::UniqueViolation
    );
    // A parent the document does not have (T2 is e's).
    assert_eq!(
        refused(exec(&mut conn, &insert_snapshot("d", "S3", 3, Some("T2"))).await),
        ErrorKind::ForeignKeyViolation
    );
    // A sequence number handed out twice; a snapshot id used twice.
    for sql in [
        insert_snapshot("d", "S3", 2, Some("S2")),
        insert_snapshot("d", "S2", 3, Some("S2")),
    ] {
        assert_eq!(
            refused(exec(&mut conn, &sql).await),
            ErrorKind::UniqueViolation,
            "{sql}"
        );
    }
    // A snapshot of a document that does not exist.
    assert_eq!(
        refused(exec(&mut conn, &insert_snapshot("nope", "S1", 1, None)).await),
        ErrorKind::ForeignKeyViolation
    );
    // The active snapshot must be one of the document's own.
    assert_eq!(
        refused(
            exec(
                &mut conn,
                "UPDATE documents SET active_snapshot_id = 'T2' WHERE id = 'd'"
            )
            .await
        ),
        ErrorKind::ForeignKeyViolation
    );
    // Document ids: 1 to 256 bytes (bytes, not characters).
    exec(
        &mut conn,
        &format!("INSERT INTO documents (id) VALUES ('{}')", "é".repeat(128)),
    )
    .await
    .unwrap();
    for id in [String::new(), "é".repeat(129)] {
        assert_eq!(
            refused(
                exec(
                    &mut conn,
                    &format!("INSERT INTO documents (id) VALUES ('{id}')")
                )
                .await
            ),
            ErrorKind::CheckViolation
        );
    }
    // STRICT: a sequence number that is not an integer.
    assert!(exec(
        &mut conn,
        "UPDATE documents SET head_seq = 'many' WHERE id = 'd'"
    )
    .await
    .is_err());
    backend.close().await;
}

const UPDATE_COLUMNS: &str =
    "INSERT INTO updates (document_id, snapshot_id, seq, version, pub_key, clock, body) VALUES";

#[tokio::test]
async fn schema_refuses_a_duplicate_author_clock() {
    let dir = ScratchDir::new();
    let backend = sqlite_backend(&dir.database()).await;
    let mut conn = raw_connection(&dir).await;
    one_snapshot(&mut conn).await;
    exec(
        &mut conn,
        &format!("{UPDATE_COLUMNS} ('d', 'S1', 2, 1, 'A', 0, '{{}}')"),
    )
    .await
    .unwrap();
    // The same author and clock again, under a new version and sequence number.
    assert_eq!(
        refused(
            exec(
                &mut conn,
                &format!("{UPDATE_COLUMNS} ('d', 'S1', 3, 2, 'A', 0, '{{}}')")
            )
            .await
        ),
        ErrorKind::UniqueViolation
    );
    // Another author may use clock 0; a negative clock is refused.
    exec(
        &mut conn,
        &format!("{UPDATE_COLUMNS} ('d', 'S1', 3, 2, 'B', 0, '{{}}')"),
    )
    .await
    .unwrap();
    assert_eq!(
        refused(
            exec(
                &mut conn,
                &format!("{UPDATE_COLUMNS} ('d', 'S1', 4, 3, 'C', -1, '{{}}')")
            )
            .await
        ),
        ErrorKind::CheckViolation
    );
    // An update of a snapshot the document does not have.
    assert_eq!(
        refused(
            exec(
                &mut conn,
                &format!("{UPDATE_COLUMNS} ('d', 'S9', 4, 1, 'A', 1, '{{}}')")
            )
            .await
        ),
        ErrorKind::ForeignKeyViolation
    );
    backend.close().await;
}

#[tokio::test]
async fn schema_refuses_a_duplicate_version() {
    let dir = ScratchDir::new();
    let backend = sqlite_backend(&dir.database()).await;
    let mut conn = raw_connection(&dir).await;
    one_snapshot(&mut conn).await;
    exec(
        &mut conn,
        &format!("{UPDATE_COLUMNS} ('d', 'S1', 2, 1, 'A', 0, '{{}}')"),
    )
    .await
    .unwrap();
    // Another author's update claiming the same place in the snapshot's update list.
    assert_eq!(
        refused(
            exec(
                &mut conn,
                &format!("{UPDATE_COLUMNS} ('d', 'S1', 3, 1, 'B', 0, '{{}}')")
            )
            .await
        ),
        ErrorKind::UniqueViolation
    );
    // A sequence number taken, a version 0.
    for values in [
        "('d', 'S1', 2, 2, 'B', 0, '{}')",
        "('d', 'S1', 3, 0, 'B', 0, '{}')",
    ] {
        let result = exec(&mut conn, &format!("{UPDATE_COLUMNS} {values}")).await;
        assert!(
            matches!(
                refused(result),
                ErrorKind::UniqueViolation | ErrorKind::CheckViolation
            ),
            "{values}"
        );
    }
    backend.close().await;
}

/// Through the backend's own API: a constraint violation is a bug (`Other`, the core then
/// isolates the message); a database locked by someone else is `Unavailable` (the caller
/// retries).
#[tokio::test]
async fn errors_are_classified() {
    let dir = ScratchDir::new();
    let settings = SqliteSettings {
        busy_timeout: Duration::from_millis(200),
        ..SqliteSettings::default()
    };
    let backend = SqliteBackend::open_with(&dir.database(), &settings)
        .await
        .unwrap();
    backend.migrate().await.unwrap();
    let d = doc("d");
    backend.ensure_documents(&[&d]).await.unwrap();
    let (s1, s2) = (
        SnapshotId::parse("S1").unwrap(),
        SnapshotId::parse("S2").unwrap(),
    );
    let row = |id| SnapshotRow {
        document_id: &d,
        id,
        seq: 1,
        parent_id: None,
        ciphertext_hash: "h",
        parent_snapshot_proof: "p",
        body: "{}",
        request_id: None,
    };
    let mut tx = backend.begin_write().await.unwrap();
    tx.insert_snapshot(row(&s1)).await.unwrap();
    let second_first = tx.insert_snapshot(SnapshotRow { seq: 2, ..row(&s2) }).await;
    assert!(
        matches!(second_first, Err(BackendError::Other(_))),
        "{second_first:?}"
    );
    drop(tx);

    // Another process holds the write lock: the backend waits `busy_timeout`, then gives up.
    // (The other connection itself waits for the rollback of `tx`, which sqlx runs in the
    // background.)
    let mut other = raw_connection(&dir).await;
    exec(&mut other, "BEGIN IMMEDIATE").await.unwrap();
    let started = Instant::now();
    let busy = backend.begin_write().await;
    assert!(
        matches!(busy, Err(BackendError::Unavailable(_))),
        "{busy:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(150));
    // Loads do not wait for the writer.
    let mut read = backend.begin_read().await.unwrap();
    assert_eq!(read.document(&d).await.unwrap().unwrap().head_seq, 0);
    drop(read);
    exec(&mut other, "ROLLBACK").await.unwrap();
    backend.begin_write().await.unwrap().commit().await.unwrap();

    // A closed backend is unavailable, not broken.
    backend.close().await;
    assert!(!backend.ping().await);
    assert!(matches!(
        backend.begin_write().await,
        Err(BackendError::Unavailable(_))
    ));
}

/// The embedded binary may open, migrate and close the backend from spawned tasks.
#[allow(dead_code)] // compile-time check only
fn backend_futures_are_send(path: &std::path::Path, backend: &SqliteBackend) {
    fn send<T: Send>(_: T) {}
    send(SqliteBackend::open(path));
    send(backend.migrate());
    send(backend.ping());
    send(backend.close());
}

/// Every connection runs in WAL mode with fsync at commit and foreign keys on; the read
/// connections cannot write.
#[tokio::test]
async fn connections_are_durable() {
    let dir = ScratchDir::new();
    let backend = sqlite_backend(&dir.database()).await;
    assert!(backend.ping().await);
    for pool in [backend.write_pool(), backend.read_pool()] {
        let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(pool)
            .await
            .unwrap();
        let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(pool)
            .await
            .unwrap();
        let foreign_keys: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
            .fetch_one(pool)
            .await
            .unwrap();
        // synchronous 2 is FULL.
        assert_eq!((journal.as_str(), synchronous, foreign_keys), ("wal", 2, 1));
    }
    let write = sqlx::query("INSERT INTO documents (id) VALUES ('x')")
        .execute(backend.read_pool())
        .await;
    assert!(write.is_err(), "a read connection wrote");
    backend.close().await;
}

/// A load's read transaction keeps seeing the state of its first read while a batch commits.
#[tokio::test]
async fn a_load_sees_one_state_while_writes_commit() {
    let dir = ScratchDir::new();
    let backend = sqlite_backend(&dir.database()).await;
    let core = Core::start(backend.clone(), recommended_core_options());
    let a = Author::new(1);
    let d = doc("d");
    seed_document(&core, &a, "d", 1).await;
    let s1_id = SnapshotId::parse("S1").unwrap();
    let mut read = backend.begin_read().await.unwrap();
    assert_eq!(read.document(&d).await.unwrap().unwrap().head_seq, 2);
    for clock in 1..4 {
        accepted(
            core.submit(d.clone(), Kind::Update, &a.update("d", "S1", clock), None)
                .await
                .unwrap(),
        );
    }
    // Committed meanwhile, but not visible to the transaction that started before.
    assert_eq!(read.updates(&d, &s1_id).await.unwrap().len(), 1);
    drop(read);
    let mut read = backend.begin_read().await.unwrap();
    assert_eq!(read.document(&d).await.unwrap().unwrap().head_seq, 5);
    assert_eq!(read.updates(&d, &s1_id).await.unwrap().len(), 4);
    drop(read);
    drop(core);
    backend.close().await;
}

/// Everything acknowledged is there after the backend is closed and the file opened again, and
/// writing continues where it stopped (rule state rebuilt from the rows, not from a cache).
#[tokio::test]
async fn data_survives_closing_and_reopening() {
    let dir = ScratchDir::new();
    let (a, b) = (Author::new(1), Author::new(2));
    let d = doc("d");
    let s1 = a.snapshot("d", "S1", None, &[]);
    let before = {
        let backend = sqlite_backend(&dir.database()).await;
        let core = Core::start(backend.clone(), recommended_core_options());
        core.load(&d, &LoadRequest::default(), true).await.unwrap();
        accepted(
            core.submit(d.clone(), Kind::Snapshot, &s1.body, Some("gw/1/1".into()))
                .await
                .unwrap(),
        );
        for clock in 0..3 {
            accepted(
                core.submit(d.clone(), Kind::Update, &a.update("d", "S1", clock), None)
                    .await
                    .unwrap(),
            );
        }
        accepted(
            core.submit(
                d.clone(),
                Kind::Update,
                &b.update("d", "S1", 0),
                Some("gw/1/2".into()),
            )
            .await
            .unwrap(),
        );
        let loaded = core.load(&d, &LoadRequest::default(), false).await.unwrap();
        drop(core);
        backend.close().await;
        loaded
    };
    assert_eq!(before.sequence, 5);

    let backend = sqlite_backend(&dir.database()).await; // migrating again is a no-op
    let core = Core::start(backend.clone(), recommended_core_options());
    let after = core.load(&d, &LoadRequest::default(), false).await.unwrap();
    assert_eq!(
        (
            &after.snapshot,
            &after.updates,
            after.sequence,
            &after.chain
        ),
        (&before.snapshot, &before.updates, 5, &before.chain)
    );
    assert_eq!(core.heads(std::slice::from_ref(&d)).await.unwrap()[&d], 5);
    assert_eq!(core.read_events(&d, 0, 100).await.unwrap().len(), 5);
    // A retry of a request acknowledged before the restart gets its first answer.
    assert_eq!(
        accepted(
            core.submit(
                d.clone(),
                Kind::Update,
                &b.update("d", "S1", 0),
                Some("gw/1/2".into())
            )
            .await
            .unwrap()
        ),
        5
    );
    // The clocks were rebuilt from the rows: A continues at 3, a replayed clock is refused.
    assert_eq!(
        accepted(
            core.submit(d.clone(), Kind::Update, &a.update("d", "S1", 3), None)
                .await
                .unwrap()
        ),
        6
    );
    assert!(matches!(
        core.submit(d.clone(), Kind::Update, &a.update("d", "S1", 2), None)
            .await
            .unwrap(),
        Outcome::Rejected { .. }
    ));
    let s2 = b.snapshot("d", "S2", Some(&s1), &[(&a, 3), (&b, 0)]);
    assert_eq!(
        accepted(
            core.submit(d.clone(), Kind::Snapshot, &s2.body, None)
                .await
                .unwrap()
        ),
        7
    );
    drop(core);
    backend.close().await;
}

/// Durable updates per second of the in-process core on SQLite by worker count (the numbers
/// behind `recommended_core_options`). Not part of the normal run:
///
///     cargo test -p secsync-persistence --release --test core_sqlite -- --ignored --nocapture
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, prints numbers"]
async fn throughput_by_worker_count() {
    const WRITERS: usize = 64;
    const DOCS: usize = 16;
    const UPDATES_PER_WRITER: u64 = 400;
    for workers in [1, 2, 4] {
        let dir = ScratchDir::new();
        let backend = sqlite_backend(&dir.database()).await;
        let core = Core::start(
            backend.clone(),
            CoreOptions {
                workers,
                ..recommended_core_options()
            },
        );
        let mut frames = Vec::new();
        for w in 0..WRITERS {
            let name = format!("doc-{}", w % DOCS);
            let author = Author::new(u8::try_from(w + 1).unwrap());
            if w < DOCS {
                core.load(&doc(&name), &LoadRequest::default(), true)
                    .await
                    .unwrap();
                let s = Author::new(250).snapshot(&name, "S1", None, &[]);
                accepted(
                    core.submit(doc(&name), Kind::Snapshot, &s.body, None)
                        .await
                        .unwrap(),
                );
            }
            let bodies: Vec<String> = (0..UPDATES_PER_WRITER)
                .map(|c| author.update(&name, "S1", c))
                .collect();
            frames.push((name, bodies));
        }
        let started = Instant::now();
        let tasks: Vec<_> = frames
            .into_iter()
            .map(|(name, bodies)| {
                let core = core.clone();
                tokio::spawn(async move {
                    for body in bodies {
                        accepted(
                            core.submit(doc(&name), Kind::Update, &body, None)
                                .await
                                .unwrap(),
                        );
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let elapsed = started.elapsed().as_secs_f64();
        #[allow(clippy::cast_precision_loss)]
        let total = (WRITERS as u64 * UPDATES_PER_WRITER) as f64;
        println!(
            "sqlite core, {workers} worker(s): {:.0} durable updates/s ({WRITERS} writers, {DOCS} documents)",
            total / elapsed
        );
        drop(core);
        backend.close().await;
    }
}

/// A measurement, not a check: `cargo test -p secsync-persistence --release --test core_sqlite
/// -- --ignored --nocapture load_time`. The core's load of a document of one snapshot and
/// 10,000 updates, complete and delta with everything known (the embedded bench measures the
/// same over WebSocket).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run by hand"]
async fn load_time_of_a_large_document() {
    const UPDATES: u64 = 10_000;
    let dir = ScratchDir::new();
    let backend = sqlite_backend(&dir.database()).await;
    let core = Core::start(backend.clone(), recommended_core_options());
    let d = doc("large");
    core.load(&d, &LoadRequest::default(), true).await.unwrap();
    let s = Author::new(250).snapshot("large", "S1", None, &[]);
    accepted(
        core.submit(d.clone(), Kind::Snapshot, &s.body, None)
            .await
            .unwrap(),
    );
    let author = Author::new(1);
    let bodies: Vec<String> = (0..UPDATES)
        .map(|c| author.update("large", "S1", c))
        .collect();
    // Each submission is polled once as it is made, which queues it, so the queue keeps clock
    // order (join_all alone may first poll them in any order). Windows stay below tokio's
    // cooperative budget (128), past which a send would return pending instead of queueing.
    for window in bodies.chunks(100) {
        let mut submits = Vec::new();
        for body in window {
            let mut submit = Box::pin(core.submit(d.clone(), Kind::Update, body, None));
            assert!(futures::poll!(&mut submit).is_pending());
            submits.push(submit);
        }
        for (i, outcome) in futures::future::join_all(submits)
            .await
            .into_iter()
            .enumerate()
        {
            assert!(
                matches!(outcome, Ok(Outcome::Accepted { .. })),
                "{i}: {outcome:?}"
            );
        }
    }
    let delta = LoadRequest {
        mode: secsync_protocol::LoadMode::Delta,
        known_snapshot_id: Some(SnapshotId::parse("S1").unwrap()),
        known_clocks: [(
            author.pub_key.clone(),
            secsync_protocol::Clock::new(UPDATES - 1).unwrap(),
        )]
        .into_iter()
        .collect(),
    };
    for (label, request) in [("complete", LoadRequest::default()), ("delta", delta)] {
        let mut times: Vec<Duration> = Vec::new();
        for _ in 0..30 {
            let started = Instant::now();
            let loaded = core.load(&d, &request, false).await.unwrap();
            times.push(started.elapsed());
            assert!(loaded.found);
        }
        times.sort();
        println!(
            "sqlite core load, {label}, 1 snapshot + {UPDATES} updates: p50 {:?}, min {:?}",
            times[times.len() / 2],
            times[0]
        );
    }
    drop(core);
    backend.close().await;
}
