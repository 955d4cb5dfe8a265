//! The statements the Postgres backend runs, in one place, so their plans can be checked
//! (`tests/core_store.rs` checks that none of them reads a table whole).

/// Readiness: the database answers.
pub const READY: &str = "SELECT 1";

/// Creates the documents a batch names (sorted, so concurrent batches never deadlock).
pub const ENSURE_DOCUMENTS: &str =
    "INSERT INTO documents (id) SELECT * FROM UNNEST($1::text[]) ORDER BY 1 \
    ON CONFLICT (id) DO NOTHING";

/// Starts a load: one consistent snapshot of the database.
pub const SET_READ_ONLY: &str = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY";

/// A document's snapshots and updates after a sequence number, in order.
pub const EVENTS_AFTER: &str =
    "SELECT seq, true AS is_snapshot, body FROM snapshots WHERE document_id = $1 AND seq > $2 \
    UNION ALL \
    SELECT seq, false, body FROM updates WHERE document_id = $1 AND seq > $2 \
    ORDER BY seq LIMIT $3";

/// The head sequence numbers of several documents.
pub const HEADS: &str = "SELECT id, head_seq FROM documents WHERE id = ANY($1)";

/// Messages already stored under a batch's request ids (retries are idempotent).
pub const FIND_REQUESTS: &str = "SELECT request_id, seq FROM snapshots WHERE request_id = ANY($1) \
    UNION ALL SELECT request_id, seq FROM updates WHERE request_id = ANY($1)";

/// Locks a batch's documents. `ORDER BY` comes before the lock, so rows are locked in sorted
/// order and two batches never deadlock.
pub const LOCK_DOCUMENTS: &str =
    "SELECT id, head_seq, active_snapshot_id FROM documents WHERE id = ANY($1) \
    ORDER BY id FOR UPDATE";

/// The active snapshot's hash and proof.
pub const ACTIVE_SNAPSHOT: &str = "SELECT ciphertext_hash, parent_snapshot_proof FROM snapshots \
    WHERE document_id = $1 AND id = $2";

/// Each author's highest clock and the update count on the active snapshot.
pub const CLOCKS: &str = "SELECT pub_key, max(clock) AS clock, count(*) AS n FROM updates \
    WHERE document_id = $1 AND snapshot_id = $2 GROUP BY pub_key";

/// Whether a snapshot id is taken in a document.
pub const SNAPSHOT_EXISTS: &str =
    "SELECT 1 AS one FROM snapshots WHERE document_id = $1 AND id = $2";

/// Stores one snapshot.
pub const INSERT_SNAPSHOT: &str =
    "INSERT INTO snapshots (document_id, id, seq, parent_id, ciphertext_hash, \
    parent_snapshot_proof, body, request_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

/// Stores a batch's updates in one statement.
pub const INSERT_UPDATES: &str =
    "INSERT INTO updates (document_id, snapshot_id, seq, version, pub_key, clock, body, request_id) \
    SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::int8[], $5::text[], \
    $6::int8[], $7::text[], $8::text[])";

/// Moves a batch's documents to their new head (and active snapshot).
pub const SET_HEADS: &str = "UPDATE documents SET head_seq = v.seq, active_snapshot_id = v.active \
    FROM UNNEST($1::text[], $2::int8[], $3::text[]) AS v(id, seq, active) \
    WHERE documents.id = v.id";

/// Stores a batch's updates and moves its documents' heads, in one statement (so without an
/// explicit transaction), only if every document is still at the head the core expects
/// (`$1`/`$2`, sorted): the rows are locked in sorted order like `LOCK_DOCUMENTS`, and both
/// writes wait for the verdict. `$3`..`$10` are `INSERT_UPDATES`'s arrays, `$11`..`$13`
/// `SET_HEADS`'s.
pub const APPEND_UPDATES: &str =
    "WITH expected AS (SELECT * FROM UNNEST($1::text[], $2::int8[]) AS e(id, seq)), \
    locked AS (SELECT id, head_seq FROM documents WHERE id = ANY($1) ORDER BY id FOR UPDATE), \
    verdict AS (SELECT count(*) = cardinality($1::text[]) AS ok \
        FROM locked JOIN expected USING (id) WHERE locked.head_seq = expected.seq), \
    inserted AS (INSERT INTO updates \
        (document_id, snapshot_id, seq, version, pub_key, clock, body, request_id) \
        SELECT * FROM UNNEST($3::text[], $4::text[], $5::int8[], $6::int8[], $7::text[], \
        $8::int8[], $9::text[], $10::text[]) WHERE (SELECT ok FROM verdict)), \
    moved AS (UPDATE documents SET head_seq = v.seq, active_snapshot_id = v.active \
        FROM UNNEST($11::text[], $12::int8[], $13::text[]) AS v(id, seq, active) \
        WHERE documents.id = v.id AND (SELECT ok FROM verdict)) \
    SELECT ok AS written FROM verdict";

/// A document's head and active snapshot.
pub const DOCUMENT: &str = "SELECT head_seq, active_snapshot_id FROM documents WHERE id = $1";

/// A snapshot's stored body.
pub const SNAPSHOT_BODY: &str = "SELECT body FROM snapshots WHERE document_id = $1 AND id = $2";

/// The updates on a snapshot, in the order they were accepted.
pub const UPDATES: &str =
    "SELECT pub_key, clock, body FROM updates WHERE document_id = $1 AND snapshot_id = $2 \
    ORDER BY version";

/// A document's snapshot chain for proofs, oldest first.
pub const PROOF_ENTRIES: &str = "SELECT id, parent_snapshot_proof, ciphertext_hash FROM snapshots \
    WHERE document_id = $1 ORDER BY seq";

/// Every statement above whose plan touches our tables.
pub const PLANNED: &[&str] = &[
    ENSURE_DOCUMENTS,
    EVENTS_AFTER,
    HEADS,
    FIND_REQUESTS,
    LOCK_DOCUMENTS,
    ACTIVE_SNAPSHOT,
    CLOCKS,
    SNAPSHOT_EXISTS,
    INSERT_SNAPSHOT,
    INSERT_UPDATES,
    SET_HEADS,
    APPEND_UPDATES,
    DOCUMENT,
    SNAPSHOT_BODY,
    UPDATES,
    PROOF_ENTRIES,
];
