-- The schema refuses a broken history by itself: the persistence core checks every rule of
-- PROTOCOL.md first, and these constraints make a bug or a race in that code fail loudly instead
-- of forking a document.

CREATE TABLE documents (
    id                 text PRIMARY KEY CHECK (octet_length(id) BETWEEN 1 AND 256),
    -- The one active snapshot (NULL until the first snapshot).
    active_snapshot_id text,
    -- The last per-document sequence number handed out; every accepted snapshot and update
    -- takes the next one under this row's lock, so numbers are contiguous in commit order.
    head_seq           bigint NOT NULL DEFAULT 0 CHECK (head_seq >= 0),
    created_at         timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE snapshots (
    document_id           text NOT NULL REFERENCES documents (id),
    id                    text NOT NULL CHECK (octet_length(id) BETWEEN 1 AND 256),
    seq                   bigint NOT NULL CHECK (seq >= 1),
    -- NULL for a document's first snapshot.
    parent_id             text,
    ciphertext_hash       text NOT NULL,
    parent_snapshot_proof text NOT NULL,
    -- The exact signed parts as received: {"ciphertext","nonce","signature","publicData"}.
    body                  text NOT NULL,
    request_id            text UNIQUE,
    created_at            timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (document_id, id),
    UNIQUE (document_id, seq),
    -- A snapshot chain is linear: no two children of one parent, one first snapshot.
    UNIQUE NULLS NOT DISTINCT (document_id, parent_id),
    FOREIGN KEY (document_id, parent_id) REFERENCES snapshots (document_id, id)
);

ALTER TABLE documents
    ADD FOREIGN KEY (id, active_snapshot_id) REFERENCES snapshots (document_id, id);

CREATE TABLE updates (
    document_id  text NOT NULL,
    snapshot_id  text NOT NULL,
    seq          bigint NOT NULL CHECK (seq >= 1),
    version      bigint NOT NULL CHECK (version >= 1),
    pub_key      text NOT NULL,
    clock        bigint NOT NULL CHECK (clock >= 0),
    body         text NOT NULL,
    request_id   text UNIQUE,
    -- The previous clock of the author and the previous version must exist: no gaps.
    prev_clock   bigint GENERATED ALWAYS AS (CASE WHEN clock > 0 THEN clock - 1 END) STORED,
    prev_version bigint GENERATED ALWAYS AS (CASE WHEN version > 1 THEN version - 1 END) STORED,
    PRIMARY KEY (document_id, seq),
    UNIQUE (document_id, snapshot_id, version),
    UNIQUE (document_id, snapshot_id, pub_key, clock),
    FOREIGN KEY (document_id, snapshot_id) REFERENCES snapshots (document_id, id),
    FOREIGN KEY (document_id, snapshot_id, pub_key, prev_clock)
        REFERENCES updates (document_id, snapshot_id, pub_key, clock),
    FOREIGN KEY (document_id, snapshot_id, prev_version)
        REFERENCES updates (document_id, snapshot_id, version)
);
