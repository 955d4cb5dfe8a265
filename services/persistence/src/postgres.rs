//! The Postgres backend: the only code that speaks SQL to Postgres.
//!
//! Writes run in READ COMMITTED transactions serialised per document by a row lock on the
//! document (`SELECT … FOR UPDATE`, documents in sorted order); loads run in REPEATABLE READ
//! READ ONLY transactions so the state and its sequence number come from one snapshot of the
//! database. Commits are durable (`synchronous_commit` is never lowered). Migrations live in
//! `migrations/postgres` and run on start.

pub mod sql;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use secsync_protocol::{
    ActiveSnapshot, Clock, Clocks, DocumentId, DocumentState, ProofEntry, SnapshotId,
};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool, Postgres, Row, Transaction};

use crate::backend::{
    Backend, BackendError, DocumentHead, EventKind, ReadTx, SnapshotRow, StoredEvent, StoredUpdate,
    UpdateRow, WriteTx,
};

/// A pooled connection idle for longer is checked before use.
const IDLE_CHECK_AFTER: Duration = Duration::from_secs(1);

/// Connection settings of the backend.
#[derive(Debug, Clone)]
pub struct PgSettings {
    pub max_connections: u32,
    /// How long a call waits for a connection before failing with "unavailable".
    pub acquire_timeout: Duration,
}

impl Default for PgSettings {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(2),
        }
    }
}

/// Connections kept out of the pool between single statements, at most, and never more than
/// a quarter of the pool: transactions (the locked write path, loads that miss the cache) take
/// theirs from what is left.
const KEPT_CONNECTIONS: usize = 4;

/// Postgres through a sqlx pool.
#[derive(Debug, Clone)]
pub struct PgBackend {
    pool: PgPool,
    kept: Arc<Kept>,
}

/// Connections that ran a statement and wait for the next, outside the pool. sqlx checks a
/// connection with a round trip each time it goes back to the pool: on the commit path that
/// was one more wakeup of PostgreSQL and of this service per batch (BENCHMARKS.md). A kept
/// connection idle for [`IDLE_CHECK_AFTER`] goes back to the pool (and through its checks)
/// instead of being used.
#[derive(Debug)]
struct Kept {
    idle: Mutex<Vec<(PoolConnection<Postgres>, Instant)>>,
    at_most: usize,
}

/// A connection for single statements; [`Conn::keep`] after success puts it among the kept
/// ones. Dropped without it (an error, a cancelled call), it goes back to the pool, whose
/// check on release finds a broken connection or ends a statement left half-read.
struct Conn<'a> {
    conn: PoolConnection<Postgres>,
    kept: &'a Kept,
}

impl Conn<'_> {
    fn get(&mut self) -> &mut PgConnection {
        &mut self.conn
    }

    fn keep(self) {
        let Conn { conn, kept } = self;
        let surplus = {
            let at_most = kept.at_most;
            let mut kept = kept.idle.lock().unwrap_or_else(PoisonError::into_inner);
            if kept.len() < at_most {
                kept.push((conn, Instant::now()));
                None
            } else {
                Some(conn)
            }
        };
        drop(surplus);
    }
}

impl PgBackend {
    /// Creates a pool that connects lazily, so the service starts (and reports unready) while
    /// the database is down, and recovers by itself when it is back.
    pub fn connect_lazy(url: &str, settings: &PgSettings) -> Result<Self, BackendError> {
        let options: PgConnectOptions = url
            .parse()
            .map_err(|e: sqlx::Error| BackendError::Other(format!("bad database url: {e}")))?;
        // Every statement here reads by key through an index (see `sql`), so the planner is
        // told never to prefer reading a table whole. Without it, a prepared statement's
        // generic plan (chosen after five runs, then kept for the connection's life) picked
        // while a young database's tables were empty and never analysed scans `updates`
        // sequentially: the request-id lookup of every batch read the whole table, ~400 scans
        // of 35,000 rows in a 10 s benchmark, until an ANALYZE that depends on autovacuum.
        // Generic plans are kept: planning each execution afresh cost PostgreSQL about a
        // fifth of its CPU per update.
        let options = options.options([("enable_seqscan", "off")]);
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(settings.acquire_timeout)
            // sqlx checks every connection with a round trip when it goes back to the pool;
            // checking again when it is taken out doubles that on every batch. Only one that
            // sat idle (through a database restart, say) is checked before use.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    Ok(meta.idle_for < IDLE_CHECK_AFTER
                        || sqlx::Connection::ping(conn).await.is_ok())
                })
            })
            .connect_lazy_with(options);
        let quarter = usize::try_from(settings.max_connections / 4).unwrap_or(usize::MAX);
        Ok(Self {
            pool,
            kept: Arc::new(Kept {
                idle: Mutex::default(),
                at_most: KEPT_CONNECTIONS.min(quarter),
            }),
        })
    }

    /// The most recently kept connection, or one from the pool.
    async fn conn(&self) -> Result<Conn<'_>, BackendError> {
        let reused = self
            .kept
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let conn = match reused {
            Some((conn, since)) if since.elapsed() < IDLE_CHECK_AFTER => conn,
            stale => {
                drop(stale);
                self.pool.acquire().await.map_err(map_error)?
            }
        };
        Ok(Conn {
            conn,
            kept: &self.kept,
        })
    }

    /// Runs the embedded migrations.
    pub async fn migrate(&self) -> Result<(), BackendError> {
        sqlx::migrate!("migrations/postgres")
            .run(&self.pool)
            .await
            .map_err(|e| match e {
                sqlx::migrate::MigrateError::Execute(e) => map_error(e),
                other => BackendError::Other(other.to_string()),
            })
    }

    /// Whether the database answers now.
    pub async fn ping(&self) -> bool {
        sqlx::query(sql::READY).execute(&self.pool).await.is_ok()
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// Connection failures and server shutdowns are "unavailable"; everything else is a bug.
#[allow(clippy::needless_pass_by_value)] // shaped for `map_err(map_error)`
fn map_error(error: sqlx::Error) -> BackendError {
    match &error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => BackendError::Unavailable(error.to_string()),
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // Class 08: connection exception; 57P0x: shutdown / cannot connect now; 53: resources.
            if code.starts_with("08") || code.starts_with("57P") || code.starts_with("53") {
                BackendError::Unavailable(error.to_string())
            } else {
                BackendError::Other(error.to_string())
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

fn snapshot_id(text: &str) -> Result<SnapshotId, BackendError> {
    SnapshotId::parse(text).map_err(|e| BackendError::Other(format!("stored snapshot id: {e}")))
}

fn clock(n: i64) -> Result<Clock, BackendError> {
    Clock::new(to_u64(n)).map_err(|e| BackendError::Other(format!("stored clock: {e}")))
}

/// A write transaction.
#[derive(Debug)]
pub struct PgWrite(Transaction<'static, Postgres>);

/// A consistent read-only transaction.
#[derive(Debug)]
pub struct PgRead(Transaction<'static, Postgres>);

impl Backend for PgBackend {
    type Write = PgWrite;
    type Read = PgRead;
    const DB_SYSTEM: &'static str = "postgresql";

    async fn ensure_documents(&self, ids: &[&DocumentId]) -> Result<(), BackendError> {
        let mut sorted: Vec<&str> = ids.iter().map(|d| d.as_str()).collect();
        sorted.sort_unstable();
        let mut conn = self.conn().await?;
        sqlx::query(sql::ENSURE_DOCUMENTS)
            .bind(&sorted)
            .execute(conn.get())
            .await
            .map_err(map_error)?;
        conn.keep();
        Ok(())
    }

    async fn begin_write(&self) -> Result<PgWrite, BackendError> {
        Ok(PgWrite(self.pool.begin().await.map_err(map_error)?))
    }

    async fn begin_read(&self) -> Result<PgRead, BackendError> {
        let mut tx = self.pool.begin().await.map_err(map_error)?;
        sqlx::query(sql::SET_READ_ONLY)
            .execute(&mut *tx)
            .await
            .map_err(map_error)?;
        Ok(PgRead(tx))
    }

    async fn events_after(
        &self,
        doc: &DocumentId,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, BackendError> {
        let mut conn = self.conn().await?;
        let rows = sqlx::query(sql::EVENTS_AFTER)
            .bind(doc.as_str())
            .bind(to_i64(after_seq))
            .bind(i64::from(limit))
            .fetch_all(conn.get())
            .await
            .map_err(map_error)?;
        conn.keep();
        Ok(rows
            .into_iter()
            .map(|row| StoredEvent {
                seq: to_u64(row.get("seq")),
                kind: if row.get("is_snapshot") {
                    EventKind::Snapshot
                } else {
                    EventKind::Update
                },
                body: row.get("body"),
            })
            .collect())
    }

    async fn document(&self, doc: &DocumentId) -> Result<Option<DocumentHead>, BackendError> {
        let mut conn = self.conn().await?;
        let row = sqlx::query(sql::DOCUMENT)
            .bind(doc.as_str())
            .fetch_optional(conn.get())
            .await
            .map_err(map_error)?;
        conn.keep();
        row.as_ref().map(head_of).transpose()
    }

    async fn heads(&self, ids: &[DocumentId]) -> Result<HashMap<DocumentId, u64>, BackendError> {
        let names: Vec<&str> = ids.iter().map(DocumentId::as_str).collect();
        let mut conn = self.conn().await?;
        let rows = sqlx::query(sql::HEADS)
            .bind(&names)
            .fetch_all(conn.get())
            .await
            .map_err(map_error)?;
        conn.keep();
        rows.into_iter()
            .map(|row| {
                let id: String = row.get("id");
                let doc = DocumentId::parse(&id)
                    .map_err(|e| BackendError::Other(format!("stored document id: {e}")))?;
                Ok((doc, to_u64(row.get("head_seq"))))
            })
            .collect()
    }

    /// One statement, so one round trip and no explicit transaction: it locks the documents,
    /// compares their heads and writes only when they match.
    async fn append_updates(
        &self,
        expected: &[(&DocumentId, u64)],
        rows: &[UpdateRow<'_>],
        heads: &[(&DocumentId, &DocumentHead)],
    ) -> Result<bool, BackendError> {
        let ids: Vec<&str> = expected.iter().map(|(d, _)| d.as_str()).collect();
        let seqs: Vec<i64> = expected.iter().map(|(_, s)| to_i64(*s)).collect();
        let query = sqlx::query(sql::APPEND_UPDATES).bind(ids).bind(seqs);
        let query = HeadColumns::of(heads).bind(UpdateColumns::of(rows).bind(query));
        let mut conn = self.conn().await?;
        let row = query.fetch_one(conn.get()).await.map_err(map_error)?;
        conn.keep();
        Ok(row.get::<bool, _>("written"))
    }
}

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// Update rows as the column arrays `UNNEST` takes (`INSERT_UPDATES`, `APPEND_UPDATES`).
struct UpdateColumns<'a> {
    docs: Vec<&'a str>,
    snapshots: Vec<&'a str>,
    seqs: Vec<i64>,
    versions: Vec<i64>,
    keys: Vec<&'a str>,
    clocks: Vec<i64>,
    bodies: Vec<&'a str>,
    requests: Vec<Option<&'a str>>,
}

impl<'a> UpdateColumns<'a> {
    fn of(rows: &[UpdateRow<'a>]) -> Self {
        Self {
            docs: rows.iter().map(|r| r.document_id.as_str()).collect(),
            snapshots: rows.iter().map(|r| r.snapshot_id.as_str()).collect(),
            seqs: rows.iter().map(|r| to_i64(r.seq)).collect(),
            versions: rows.iter().map(|r| to_i64(r.version)).collect(),
            keys: rows.iter().map(|r| r.pub_key).collect(),
            clocks: rows.iter().map(|r| to_i64(r.clock.get())).collect(),
            bodies: rows.iter().map(|r| r.body).collect(),
            requests: rows.iter().map(|r| r.request_id).collect(),
        }
    }

    /// Binds the eight arrays, in the statements' column order.
    fn bind<'q>(self, query: PgQuery<'q>) -> PgQuery<'q>
    where
        'a: 'q,
    {
        query
            .bind(self.docs)
            .bind(self.snapshots)
            .bind(self.seqs)
            .bind(self.versions)
            .bind(self.keys)
            .bind(self.clocks)
            .bind(self.bodies)
            .bind(self.requests)
    }
}

/// New heads as the column arrays `UNNEST` takes (`SET_HEADS`, `APPEND_UPDATES`).
struct HeadColumns<'a> {
    ids: Vec<&'a str>,
    seqs: Vec<i64>,
    active: Vec<Option<&'a str>>,
}

impl<'a> HeadColumns<'a> {
    fn of(heads: &[(&'a DocumentId, &'a DocumentHead)]) -> Self {
        Self {
            ids: heads.iter().map(|(d, _)| d.as_str()).collect(),
            seqs: heads.iter().map(|(_, h)| to_i64(h.head_seq)).collect(),
            active: heads
                .iter()
                .map(|(_, h)| h.active_snapshot_id.as_ref().map(SnapshotId::as_str))
                .collect(),
        }
    }

    fn bind<'q>(self, query: PgQuery<'q>) -> PgQuery<'q>
    where
        'a: 'q,
    {
        query.bind(self.ids).bind(self.seqs).bind(self.active)
    }
}

impl WriteTx for PgWrite {
    async fn find_requests(&mut self, ids: &[&str]) -> Result<HashMap<String, u64>, BackendError> {
        let rows = sqlx::query(sql::FIND_REQUESTS)
            .bind(ids)
            .fetch_all(&mut *self.0)
            .await
            .map_err(map_error)?;
        Ok(rows
            .into_iter()
            .map(|row| (row.get("request_id"), to_u64(row.get("seq"))))
            .collect())
    }

    async fn lock_documents(
        &mut self,
        sorted_ids: &[&DocumentId],
    ) -> Result<HashMap<DocumentId, DocumentHead>, BackendError> {
        let names: Vec<&str> = sorted_ids.iter().map(|d| d.as_str()).collect();
        // ORDER BY before the lock: rows are locked in sorted order, so batches never deadlock.
        let rows = sqlx::query(sql::LOCK_DOCUMENTS)
            .bind(&names)
            .fetch_all(&mut *self.0)
            .await
            .map_err(map_error)?;
        let mut heads = HashMap::with_capacity(rows.len());
        for row in rows {
            let id: String = row.get("id");
            let doc = DocumentId::parse(&id)
                .map_err(|e| BackendError::Other(format!("stored document id: {e}")))?;
            let active: Option<String> = row.get("active_snapshot_id");
            heads.insert(
                doc,
                DocumentHead {
                    head_seq: to_u64(row.get("head_seq")),
                    active_snapshot_id: active.as_deref().map(snapshot_id).transpose()?,
                },
            );
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
        let snapshot = sqlx::query(sql::ACTIVE_SNAPSHOT)
            .bind(doc.as_str())
            .bind(active.as_str())
            .fetch_one(&mut *self.0)
            .await
            .map_err(map_error)?;
        let rows = sqlx::query(sql::CLOCKS)
            .bind(doc.as_str())
            .bind(active.as_str())
            .fetch_all(&mut *self.0)
            .await
            .map_err(map_error)?;
        let mut clocks = Clocks::new();
        let mut update_count = 0;
        for row in rows {
            clocks.insert(row.get("pub_key"), clock(row.get("clock"))?);
            update_count += to_u64(row.get("n"));
        }
        Ok(DocumentState {
            active: Some(ActiveSnapshot {
                id: active.clone(),
                ciphertext_hash: snapshot.get("ciphertext_hash"),
                parent_snapshot_proof: snapshot.get("parent_snapshot_proof"),
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
        let row = sqlx::query(sql::SNAPSHOT_EXISTS)
            .bind(doc.as_str())
            .bind(id.as_str())
            .fetch_optional(&mut *self.0)
            .await
            .map_err(map_error)?;
        Ok(row.is_some())
    }

    async fn insert_snapshot(&mut self, row: SnapshotRow<'_>) -> Result<(), BackendError> {
        sqlx::query(sql::INSERT_SNAPSHOT)
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
        // One statement for the whole batch.
        UpdateColumns::of(rows)
            .bind(sqlx::query(sql::INSERT_UPDATES))
            .execute(&mut *self.0)
            .await
            .map_err(map_error)?;
        Ok(())
    }

    async fn set_heads(
        &mut self,
        heads: &[(&DocumentId, &DocumentHead)],
    ) -> Result<(), BackendError> {
        HeadColumns::of(heads)
            .bind(sqlx::query(sql::SET_HEADS))
            .execute(&mut *self.0)
            .await
            .map_err(map_error)?;
        Ok(())
    }

    async fn commit(self) -> Result<(), BackendError> {
        self.0.commit().await.map_err(map_error)
    }
}

/// A `DOCUMENT` row.
fn head_of(row: &sqlx::postgres::PgRow) -> Result<DocumentHead, BackendError> {
    let active: Option<String> = row.get("active_snapshot_id");
    Ok(DocumentHead {
        head_seq: to_u64(row.get("head_seq")),
        active_snapshot_id: active.as_deref().map(snapshot_id).transpose()?,
    })
}

impl ReadTx for PgRead {
    async fn document(&mut self, doc: &DocumentId) -> Result<Option<DocumentHead>, BackendError> {
        let row = sqlx::query(sql::DOCUMENT)
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
        let row = sqlx::query(sql::SNAPSHOT_BODY)
            .bind(doc.as_str())
            .bind(id.as_str())
            .fetch_optional(&mut *self.0)
            .await
            .map_err(map_error)?;
        Ok(row.map(|r| r.get("body")))
    }

    async fn updates(
        &mut self,
        doc: &DocumentId,
        snapshot: &SnapshotId,
    ) -> Result<Vec<StoredUpdate>, BackendError> {
        let rows = sqlx::query(sql::UPDATES)
            .bind(doc.as_str())
            .bind(snapshot.as_str())
            .fetch_all(&mut *self.0)
            .await
            .map_err(map_error)?;
        rows.into_iter()
            .map(|row| {
                Ok(StoredUpdate {
                    pub_key: row.get("pub_key"),
                    clock: clock(row.get("clock"))?,
                    body: Bytes::from(row.get::<String, _>("body")),
                })
            })
            .collect()
    }

    async fn proof_entries(&mut self, doc: &DocumentId) -> Result<Vec<ProofEntry>, BackendError> {
        let rows = sqlx::query(sql::PROOF_ENTRIES)
            .bind(doc.as_str())
            .fetch_all(&mut *self.0)
            .await
            .map_err(map_error)?;
        rows.into_iter()
            .map(|row| {
                Ok(ProofEntry {
                    snapshot_id: snapshot_id(row.get::<&str, _>("id"))?,
                    parent_snapshot_proof: row.get("parent_snapshot_proof"),
                    snapshot_ciphertext_hash: row.get("ciphertext_hash"),
                })
            })
            .collect()
    }
}
