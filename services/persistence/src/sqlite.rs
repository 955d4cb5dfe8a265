//! The SQLite backend of the embedded single-node binary: the core on one local file, no
//! database server.
//!
//! SQLite allows one writer at a time, so the backend keeps exactly one write connection (a pool
//! of one) and starts every write transaction with `BEGIN IMMEDIATE`: the write lock is taken
//! before the first read, so a batch never reads a state another writer (another process on the
//! same file, say) changes before it commits, and `lock_documents` only has to read the rows.
//! The pool of one already serialises this process's batches; the immediate lock covers the
//! rest and makes a busy database fail at `begin_write` rather than halfway through a batch.
//!
//! Loads and the other reads go through a separate pool of a few read-only connections. In WAL
//! mode readers never wait for the writer, and a read transaction sees the database as of its
//! first read until it ends: one consistent state per load, as REPEATABLE READ gives on
//! Postgres.
//!
//! Durability: WAL with `synchronous = FULL` fsyncs the log at every commit, so a commit that
//! returned survives a killed process and a power loss (NORMAL would only survive the former).
//! Migrations live in `migrations/sqlite`; [`SqliteBackend::migrate`] runs them.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use secsync_protocol::{
    ActiveSnapshot, Clock, Clocks, DocumentId, DocumentState, ProofEntry, SnapshotId,
};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool, Transaction};

use crate::backend::{
    Backend, BackendError, DocumentHead, EventKind, ReadTx, SnapshotRow, StoredEvent, StoredUpdate,
    UpdateRow, WriteTx,
};
use crate::CoreOptions;

/// Core options suited to SQLite: one worker. With a single writer, a second worker only waits
/// for the write connection while the first commits, and takes half of the queue with it, so
/// batches get smaller and fsyncs more frequent. Measured on 2 cores (64 writers on 16
/// documents, in-process core, `throughput_by_worker_count` in `tests/core_sqlite.rs`, three
/// runs): 1 worker 12,300-14,200 durable updates/s, 2 workers 7,200-11,400, 4 workers
/// 5,300-9,400.
pub fn recommended_core_options() -> CoreOptions {
    CoreOptions {
        workers: 1,
        ..CoreOptions::default()
    }
}

/// Connection settings of the backend.
#[derive(Debug, Clone)]
pub struct SqliteSettings {
    /// Connections for loads and other reads (they run beside the one writer).
    pub read_connections: u32,
    /// How long a statement waits for a lock held by another connection (another process on
    /// the same file, a checkpoint) before failing with "unavailable".
    pub busy_timeout: Duration,
    /// How long a call waits for a connection. Batches queue here for the one write
    /// connection, so this is longer than a batch ever takes.
    pub acquire_timeout: Duration,
}

impl Default for SqliteSettings {
    fn default() -> Self {
        Self {
            read_connections: 4,
            busy_timeout: Duration::from_secs(5),
            acquire_timeout: Duration::from_secs(10),
        }
    }
}

/// SQLite through two sqlx pools: one write connection and a few read connections.
#[derive(Debug, Clone)]
pub struct SqliteBackend {
    write: SqlitePool,
    read: SqlitePool,
}

/// Most rows (or ids) bound in one statement: 8 parameters per update row stay far below
/// SQLite's default limit of 32,766 parameters.
const ROWS_PER_STATEMENT: usize = 500;

impl SqliteBackend {
    /// Opens (creating it if missing) the database file at `path` with default settings.
    pub async fn open(path: &Path) -> Result<Self, BackendError> {
        Self::open_with(path, &SqliteSettings::default()).await
    }

    /// Opens (creating it if missing) the database file at `path`.
    pub async fn open_with(path: &Path, settings: &SqliteSettings) -> Result<Self, BackendError> {
        let existed = path.exists();
        let common = SqliteConnectOptions::new()
            .filename(path)
            .synchronous(SqliteSynchronous::Full)
            // macOS: a plain fsync does not reach stable storage; F_FULLFSYNC does. No effect
            // elsewhere.
            .pragma("fullfsync", "ON")
            .pragma("checkpoint_fullfsync", "ON")
            .foreign_keys(true)
            .busy_timeout(settings.busy_timeout);
        // The writer is opened first: it creates the file and switches it to WAL (a setting
        // stored in the file, so the readers need not and must not race to change it).
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            // The connection stays open: it keeps the WAL in place and its statement cache warm.
            .idle_timeout(None)
            .max_lifetime(None)
            .acquire_timeout(settings.acquire_timeout)
            // A local connection does not go stale; pinging it on every acquire is a wasted
            // round trip to its worker thread.
            .test_before_acquire(false)
            .connect_with(
                common
                    .clone()
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal),
            )
            .await
            .map_err(|e| open_error(path, e))?;
        if !existed {
            // The new file's directory entry must be durable before the first commit is
            // acknowledged; SQLite syncs the directory for the WAL, not for the database file.
            if let Err(e) = sync_parent_dir(path) {
                tracing::warn!(path = %path.display(), error = %e, "could not sync the database directory");
            }
        }
        let read = SqlitePoolOptions::new()
            .max_connections(settings.read_connections.max(1))
            .acquire_timeout(settings.acquire_timeout)
            .test_before_acquire(false)
            // A write through a read connection would be a bug; make it fail.
            .connect_with(common.pragma("query_only", "ON"))
            .await
            .map_err(|e| open_error(path, e))?;
        Ok(Self { write, read })
    }

    /// Runs the embedded migrations.
    pub async fn migrate(&self) -> Result<(), BackendError> {
        sqlx::migrate!("migrations/sqlite")
            .run(&self.write)
            .await
            .map_err(|e| match e {
                sqlx::migrate::MigrateError::Execute(e) => map_error(e),
                other => BackendError::Other(other.to_string()),
            })
    }

    /// Whether the database answers now (through a read connection, so a long batch on the
    /// write connection does not make the service look down).
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.read).await.is_ok()
    }

    /// Closes every connection; the last one to close checkpoints the WAL into the database
    /// file. Calls made afterwards fail with "unavailable".
    pub async fn close(&self) {
        self.read.close().await;
        self.write.close().await;
    }

    /// The pool of the one write connection (for tests and tools; it is busy while a batch
    /// commits).
    pub fn write_pool(&self) -> &SqlitePool {
        &self.write
    }

    /// The pool of read-only connections.
    pub fn read_pool(&self) -> &SqlitePool {
        &self.read
    }
}

fn open_error(path: &Path, error: sqlx::Error) -> BackendError {
    match map_error(error) {
        BackendError::Unavailable(m) => {
            BackendError::Unavailable(format!("cannot open {}: {m}", path.display()))
        }
        BackendError::Other(m) => {
            BackendError::Other(format!("cannot open {}: {m}", path.display()))
        }
    }
}

#[cfg(unix)]
fn sync_parent_dir(path: &Path) -> std::io::Result<()> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    std::fs::File::open(parent)?.sync_all()
}

#[cfg(not(unix))]
fn sync_parent_dir(_path: &Path) -> std::io::Result<()> {
    // Directories cannot be opened for syncing there; NTFS journals its metadata.
    Ok(())
}

/// SQLite primary result codes (<https://www.sqlite.org/rescode.html>) that mean the database
/// cannot serve now but may later: locked by someone else, out of memory or disk, read-only or
/// gone (file system trouble), I/O errors.
const TRANSIENT_CODES: [i32; 9] = [
    5,  // SQLITE_BUSY
    6,  // SQLITE_LOCKED
    7,  // SQLITE_NOMEM
    8,  // SQLITE_READONLY
    9,  // SQLITE_INTERRUPT
    10, // SQLITE_IOERR
    13, // SQLITE_FULL
    14, // SQLITE_CANTOPEN
    15, // SQLITE_PROTOCOL
];

/// Locks held elsewhere, I/O and pool trouble are "unavailable" (the caller may retry);
/// constraint violations, corruption and everything else are bugs.
#[allow(clippy::needless_pass_by_value)] // shaped for `map_err(map_error)`
fn map_error(error: sqlx::Error) -> BackendError {
    match &error {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => BackendError::Unavailable(error.to_string()),
        sqlx::Error::Database(db) => {
            // sqlx reports the extended result code; its low byte is the primary code.
            let primary = db
                .code()
                .and_then(|code| code.parse::<i32>().ok())
                .map(|code| code & 0xff);
            match primary {
                Some(code) if TRANSIENT_CODES.contains(&code) => {
                    BackendError::Unavailable(error.to_string())
                }
                _ => BackendError::Other(error.to_string()),
            }
        }
        _ => BackendError::Other(error.to_string()),
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// A column of a row, a decoding failure being a bug (the schema fixes every type).
fn column<'r, T>(row: &'r SqliteRow, name: &str) -> Result<T, BackendError>
where
    T: sqlx::Decode<'r, Sqlite> + sqlx::Type<Sqlite>,
{
    row.try_get(name)
        .map_err(|e| BackendError::Other(format!("column {name}: {e}")))
}

fn snapshot_id(text: &str) -> Result<SnapshotId, BackendError> {
    SnapshotId::parse(text).map_err(|e| BackendError::Other(format!("stored snapshot id: {e}")))
}

fn document_id(text: &str) -> Result<DocumentId, BackendError> {
    DocumentId::parse(text).map_err(|e| BackendError::Other(format!("stored document id: {e}")))
}

fn clock(n: i64) -> Result<Clock, BackendError> {
    Clock::new(to_u64(n)).map_err(|e| BackendError::Other(format!("stored clock: {e}")))
}

/// A document's head and active snapshot.
const DOCUMENT: &str = "SELECT head_seq, active_snapshot_id FROM documents WHERE id = ?1";

/// A document row (`head_seq`, `active_snapshot_id`) as a head.
fn head_of(row: &SqliteRow) -> Result<DocumentHead, BackendError> {
    let active: Option<String> = column(row, "active_snapshot_id")?;
    Ok(DocumentHead {
        head_seq: to_u64(column(row, "head_seq")?),
        active_snapshot_id: active.as_deref().map(snapshot_id).transpose()?,
    })
}

/// A write transaction, holding the database's write lock from its start.
#[derive(Debug)]
pub struct SqliteWrite(Transaction<'static, Sqlite>);

/// A read-only transaction; its view is fixed at its first read.
#[derive(Debug)]
pub struct SqliteRead(Transaction<'static, Sqlite>);

impl Backend for SqliteBackend {
    type Write = SqliteWrite;
    type Read = SqliteRead;
    const DB_SYSTEM: &'static str = "sqlite";

    async fn ensure_documents(&self, ids: &[&DocumentId]) -> Result<(), BackendError> {
        let mut sorted: Vec<&str> = ids.iter().map(|d| d.as_str()).collect();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.is_empty() {
            return Ok(());
        }
        let mut tx = self
            .write
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(map_error)?;
        for chunk in sorted.chunks(ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::<Sqlite>::new("INSERT INTO documents (id) ");
            query.push_values(chunk, |mut row, id| {
                row.push_bind(*id);
            });
            // Not INSERT OR IGNORE: that would also swallow a failed CHECK.
            query.push(" ON CONFLICT (id) DO NOTHING");
            query.build().execute(&mut *tx).await.map_err(map_error)?;
        }
        tx.commit().await.map_err(map_error)
    }

    async fn begin_write(&self) -> Result<SqliteWrite, BackendError> {
        let tx = self
            .write
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(map_error)?;
        Ok(SqliteWrite(tx))
    }

    async fn begin_read(&self) -> Result<SqliteRead, BackendError> {
        // A deferred BEGIN: the snapshot is taken by the first SELECT and kept until the end.
        Ok(SqliteRead(self.read.begin().await.map_err(map_error)?))
    }

    async fn events_after(
        &self,
        doc: &DocumentId,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, BackendError> {
        let rows = sqlx::query(
            "SELECT seq, 1 AS is_snapshot, body FROM snapshots WHERE document_id = ?1 AND seq > ?2 \
             UNION ALL \
             SELECT seq, 0, body FROM updates WHERE document_id = ?1 AND seq > ?2 \
             ORDER BY seq LIMIT ?3",
        )
        .bind(doc.as_str())
        .bind(to_i64(after_seq))
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await
        .map_err(map_error)?;
        rows.iter()
            .map(|row| {
                let is_snapshot: i64 = column(row, "is_snapshot")?;
                Ok(StoredEvent {
                    seq: to_u64(column(row, "seq")?),
                    kind: if is_snapshot == 1 {
                        EventKind::Snapshot
                    } else {
                        EventKind::Update
                    },
                    body: column(row, "body")?,
                })
            })
            .collect()
    }

    async fn document(&self, doc: &DocumentId) -> Result<Option<DocumentHead>, BackendError> {
        let row = sqlx::query(DOCUMENT)
            .bind(doc.as_str())
            .fetch_optional(&self.read)
            .await
            .map_err(map_error)?;
        row.as_ref().map(head_of).transpose()
    }

    async fn heads(&self, ids: &[DocumentId]) -> Result<HashMap<DocumentId, u64>, BackendError> {
        let mut heads = HashMap::with_capacity(ids.len());
        if ids.is_empty() {
            return Ok(heads);
        }
        // One read transaction, so every chunk sees the same state.
        let mut tx = self.read.begin().await.map_err(map_error)?;
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            let mut query =
                QueryBuilder::<Sqlite>::new("SELECT id, head_seq FROM documents WHERE id IN (");
            let mut list = query.separated(", ");
            for id in chunk {
                list.push_bind(id.as_str());
            }
            query.push(")");
            let rows = query.build().fetch_all(&mut *tx).await.map_err(map_error)?;
            for row in &rows {
                let id: String = column(row, "id")?;
                heads.insert(document_id(&id)?, to_u64(column(row, "head_seq")?));
            }
        }
        tx.commit().await.map_err(map_error)?;
        Ok(heads)
    }
}

impl WriteTx for SqliteWrite {
    async fn find_requests(&mut self, ids: &[&str]) -> Result<HashMap<String, u64>, BackendError> {
        let mut found = HashMap::new();
        // Each id is bound twice (one list per table).
        for chunk in ids.chunks(ROWS_PER_STATEMENT / 2) {
            let mut query = QueryBuilder::<Sqlite>::new(
                "SELECT request_id, seq FROM snapshots WHERE request_id IN (",
            );
            let mut list = query.separated(", ");
            for id in chunk {
                list.push_bind(*id);
            }
            query.push(") UNION ALL SELECT request_id, seq FROM updates WHERE request_id IN (");
            let mut list = query.separated(", ");
            for id in chunk {
                list.push_bind(*id);
            }
            query.push(")");
            let rows = query
                .build()
                .fetch_all(&mut *self.0)
                .await
                .map_err(map_error)?;
            for row in &rows {
                found.insert(column(row, "request_id")?, to_u64(column(row, "seq")?));
            }
        }
        Ok(found)
    }

    async fn lock_documents(
        &mut self,
        sorted_ids: &[&DocumentId],
    ) -> Result<HashMap<DocumentId, DocumentHead>, BackendError> {
        // The transaction already holds the database's write lock (BEGIN IMMEDIATE), which
        // covers every row: reading them is all that is left to do.
        let mut heads = HashMap::with_capacity(sorted_ids.len());
        for chunk in sorted_ids.chunks(ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::<Sqlite>::new(
                "SELECT id, head_seq, active_snapshot_id FROM documents WHERE id IN (",
            );
            let mut list = query.separated(", ");
            for id in chunk {
                list.push_bind(id.as_str());
            }
            query.push(")");
            let rows = query
                .build()
                .fetch_all(&mut *self.0)
                .await
                .map_err(map_error)?;
            for row in &rows {
                let id: String = column(row, "id")?;
                heads.insert(document_id(&id)?, head_of(row)?);
            }
        }
        Ok(heads)
    }

    async fn load_state(
        &mut self,
        doc: &DocumentId,
        head: &DocumentHead,
    ) -> Result<DocumentState, BackendError> {
        let Some(active) = &head.active_snapshot_id else {
            return Ok(DocumentState::default());
        };
        let snapshot = sqlx::query(
            "SELECT ciphertext_hash, parent_snapshot_proof FROM snapshots \
             WHERE document_id = ?1 AND id = ?2",
        )
        .bind(doc.as_str())
        .bind(active.as_str())
        .fetch_one(&mut *self.0)
        .await
        .map_err(map_error)?;
        let rows = sqlx::query(
            "SELECT pub_key, max(clock) AS clock, count(*) AS n FROM updates \
             WHERE document_id = ?1 AND snapshot_id = ?2 GROUP BY pub_key",
        )
        .bind(doc.as_str())
        .bind(active.as_str())
        .fetch_all(&mut *self.0)
        .await
        .map_err(map_error)?;
        let mut clocks = Clocks::new();
        let mut update_count = 0;
        for row in &rows {
            clocks.insert(column(row, "pub_key")?, clock(column(row, "clock")?)?);
            update_count += to_u64(column(row, "n")?);
        }
        Ok(DocumentState {
            active: Some(ActiveSnapshot {
                id: active.clone(),
                ciphertext_hash: column(&snapshot, "ciphertext_hash")?,
                parent_snapshot_proof: column(&snapshot, "parent_snapshot_proof")?,
                clocks,
                update_count,
            }),
        })
    }

    async fn snapshot_exists(
        &mut self,
        doc: &DocumentId,
        id: &SnapshotId,
    ) -> Result<bool, BackendError> {
        let row = sqlx::query("SELECT 1 FROM snapshots WHERE document_id = ?1 AND id = ?2")
            .bind(doc.as_str())
            .bind(id.as_str())
            .fetch_optional(&mut *self.0)
            .await
            .map_err(map_error)?;
        Ok(row.is_some())
    }

    async fn insert_snapshot(&mut self, row: SnapshotRow<'_>) -> Result<(), BackendError> {
        sqlx::query(
            "INSERT INTO snapshots (document_id, id, seq, parent_id, ciphertext_hash, \
             parent_snapshot_proof, body, request_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )
        .bind(row.document_id.as_str())
        .bind(row.id.as_str())
        .bind(to_i64(row.seq))
        .bind(row.parent_id.map(SnapshotId::as_str))
        .bind(row.ciphertext_hash)
        .bind(row.parent_snapshot_proof)
        .bind(row.body)
        .bind(row.request_id)
        .execute(&mut *self.0)
        .await
        .map_err(map_error)?;
        Ok(())
    }

    async fn insert_updates(&mut self, rows: &[UpdateRow<'_>]) -> Result<(), BackendError> {
        // Multi-row statements: each statement is a round trip to the connection's thread.
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::<Sqlite>::new(
                "INSERT INTO updates \
                 (document_id, snapshot_id, seq, version, pub_key, clock, body, request_id) ",
            );
            query.push_values(chunk, |mut values, row| {
                values
                    .push_bind(row.document_id.as_str())
                    .push_bind(row.snapshot_id.as_str())
                    .push_bind(to_i64(row.seq))
                    .push_bind(to_i64(row.version))
                    .push_bind(row.pub_key)
                    .push_bind(to_i64(row.clock.get()))
                    .push_bind(row.body)
                    .push_bind(row.request_id);
            });
            query
                .build()
                .execute(&mut *self.0)
                .await
                .map_err(map_error)?;
        }
        Ok(())
    }

    async fn set_heads(
        &mut self,
        heads: &[(&DocumentId, &DocumentHead)],
    ) -> Result<(), BackendError> {
        for chunk in heads.chunks(ROWS_PER_STATEMENT) {
            let mut query = QueryBuilder::<Sqlite>::new("WITH v (id, seq, active) AS (");
            query.push_values(chunk, |mut values, (doc, head)| {
                values
                    .push_bind(doc.as_str())
                    .push_bind(to_i64(head.head_seq))
                    .push_bind(head.active_snapshot_id.as_ref().map(SnapshotId::as_str));
            });
            query.push(
                ") UPDATE documents SET head_seq = v.seq, active_snapshot_id = v.active \
                 FROM v WHERE documents.id = v.id",
            );
            query
                .build()
                .execute(&mut *self.0)
                .await
                .map_err(map_error)?;
        }
        Ok(())
    }

    async fn commit(self) -> Result<(), BackendError> {
        self.0.commit().await.map_err(map_error)
    }
}

impl ReadTx for SqliteRead {
    async fn document(&mut self, doc: &DocumentId) -> Result<Option<DocumentHead>, BackendError> {
        let row = sqlx::query(DOCUMENT)
            .bind(doc.as_str())
            .fetch_optional(&mut *self.0)
            .await
            .map_err(map_error)?;
        row.as_ref().map(head_of).transpose()
    }

    async fn snapshot_body(
        &mut self,
        doc: &DocumentId,
        id: &SnapshotId,
    ) -> Result<Option<String>, BackendError> {
        let row = sqlx::query("SELECT body FROM snapshots WHERE document_id = ?1 AND id = ?2")
            .bind(doc.as_str())
            .bind(id.as_str())
            .fetch_optional(&mut *self.0)
            .await
            .map_err(map_error)?;
        row.as_ref().map(|r| column(r, "body")).transpose()
    }

    async fn updates(
        &mut self,
        doc: &DocumentId,
        snapshot: &SnapshotId,
    ) -> Result<Vec<StoredUpdate>, BackendError> {
        let rows = sqlx::query(
            "SELECT pub_key, clock, body FROM updates WHERE document_id = ?1 AND snapshot_id = ?2 \
             ORDER BY version",
        )
        .bind(doc.as_str())
        .bind(snapshot.as_str())
        .fetch_all(&mut *self.0)
        .await
        .map_err(map_error)?;
        rows.iter()
            .map(|row| {
                Ok(StoredUpdate {
                    pub_key: column(row, "pub_key")?,
                    clock: clock(column(row, "clock")?)?,
                    body: Bytes::from(column::<String>(row, "body")?),
                })
            })
            .collect()
    }

    async fn proof_entries(&mut self, doc: &DocumentId) -> Result<Vec<ProofEntry>, BackendError> {
        let rows = sqlx::query(
            "SELECT id, parent_snapshot_proof, ciphertext_hash FROM snapshots \
             WHERE document_id = ?1 ORDER BY seq",
        )
        .bind(doc.as_str())
        .fetch_all(&mut *self.0)
        .await
        .map_err(map_error)?;
        rows.iter()
            .map(|row| {
                Ok(ProofEntry {
                    snapshot_id: snapshot_id(column::<&str>(row, "id")?)?,
                    parent_snapshot_proof: column(row, "parent_snapshot_proof")?,
                    snapshot_ciphertext_hash: column(row, "ciphertext_hash")?,
                })
            })
            .collect()
    }
}
