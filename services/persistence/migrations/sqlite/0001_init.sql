-- The embedded (SQLite) schema. Like the Postgres one (migrations/postgres, as of its 0002), it
-- refuses a broken history by itself: the persistence core checks every rule of PROTOCOL.md
-- first, and these constraints make a bug in that code fail loudly instead of forking a
-- document. The +1 rules on clocks and versions are the core's alone, as on Postgres since 0002.
--
-- STRICT tables: SQLite would otherwise store any value in any column (a sequence number as
-- text, a body as a blob); STRICT refuses a value of the wrong type. Lengths are checked in
-- bytes (length() of a text counts characters). Tables keep their rowid: bodies are large, and
-- WITHOUT ROWID suits small rows only. Foreign keys are enforced because every connection of
-- the backend turns them on (SQLite leaves them off by default).

CREATE TABLE documents (
    id                 TEXT NOT NULL PRIMARY KEY
                       CHECK (length(CAST(id AS BLOB)) BETWEEN 1 AND 256),
    -- The one active snapshot (NULL until the first snapshot).
    active_snapshot_id TEXT,
    -- The last per-document sequence number handed out; every accepted snapshot and update
    -- takes the next one inside the single write transaction, so numbers are contiguous in
    -- commit order.
    head_seq           INTEGER NOT NULL DEFAULT 0 CHECK (head_seq >= 0),
    created_at         TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    -- The active snapshot must be one of this document's snapshots. SQLite has no ALTER TABLE
    -- ADD FOREIGN KEY, and checks foreign keys only when rows change, so the reference to the
    -- table created below is declared here.
    FOREIGN KEY (id, active_snapshot_id) REFERENCES snapshots (document_id, id)
) STRICT;

CREATE TABLE snapshots (
    document_id           TEXT NOT NULL REFERENCES documents (id),
    id                    TEXT NOT NULL CHECK (length(CAST(id AS BLOB)) BETWEEN 1 AND 256),
    seq                   INTEGER NOT NULL CHECK (seq >= 1),
    -- NULL for a document's first snapshot.
    parent_id             TEXT,
    ciphertext_hash       TEXT NOT NULL,
    parent_snapshot_proof TEXT NOT NULL,
    -- The exact signed parts as received: {"ciphertext","nonce","signature","publicData"}.
    -- TEXT keeps the bytes as given (no normalisation), so signatures still verify on load.
    body                  TEXT NOT NULL,
    request_id            TEXT UNIQUE,
    created_at            TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (document_id, id),
    UNIQUE (document_id, seq),
    -- A snapshot chain is linear: no two children of one parent ...
    UNIQUE (document_id, parent_id),
    FOREIGN KEY (document_id, parent_id) REFERENCES snapshots (document_id, id)
) STRICT;

-- ... and one first snapshot per document. A UNIQUE constraint treats NULLs as distinct in
-- SQLite (Postgres says NULLS NOT DISTINCT), so the parentless snapshot gets its own index.
CREATE UNIQUE INDEX snapshots_one_first ON snapshots (document_id) WHERE parent_id IS NULL;

CREATE TABLE updates (
    document_id  TEXT NOT NULL,
    snapshot_id  TEXT NOT NULL,
    seq          INTEGER NOT NULL CHECK (seq >= 1),
    version      INTEGER NOT NULL CHECK (version >= 1),
    pub_key      TEXT NOT NULL,
    clock        INTEGER NOT NULL CHECK (clock >= 0),
    -- The exact signed parts as received, as for snapshots.
    body         TEXT NOT NULL,
    request_id   TEXT UNIQUE,
    PRIMARY KEY (document_id, seq),
    -- No two updates of a snapshot share a version, and no author reuses a clock: duplicates
    -- and forks are impossible at the database level.
    UNIQUE (document_id, snapshot_id, version),
    UNIQUE (document_id, snapshot_id, pub_key, clock),
    FOREIGN KEY (document_id, snapshot_id) REFERENCES snapshots (document_id, id)
) STRICT;
