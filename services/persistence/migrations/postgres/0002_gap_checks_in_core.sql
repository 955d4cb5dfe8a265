-- The previous-clock and previous-version foreign keys cost as much database CPU as everything
-- else an update insert does (measured: 3,521 -> 7,072 updates/s without them, BENCHMARKS.md).
-- The +1 rules are checked by the persistence core inside the same transaction, under the
-- document's row lock (PROTOCOL.md 7.8); the unique constraints on (snapshot, author, clock)
-- and (snapshot, version) still make duplicates and forks impossible at the database level.
ALTER TABLE updates DROP CONSTRAINT updates_document_id_snapshot_id_pub_key_prev_clock_fkey;
ALTER TABLE updates DROP CONSTRAINT updates_document_id_snapshot_id_prev_version_fkey;
ALTER TABLE updates DROP COLUMN prev_clock;
ALTER TABLE updates DROP COLUMN prev_version;
