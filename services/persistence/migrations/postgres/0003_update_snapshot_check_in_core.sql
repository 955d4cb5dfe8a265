-- An update's reference to its snapshot was checked by a foreign key: a trigger per inserted row
-- that queries `snapshots` and locks the row it finds. That cost PostgreSQL about 15 % of its CPU
-- per update (99-104 -> 85-89 us, BENCHMARKS.md). The persistence core accepts an update only
-- when it names the document's active snapshot, read in the same transaction under the
-- document's row lock (PROTOCOL.md 7.8), and snapshots are never deleted, so the key could never
-- fire. Snapshots keep their own foreign keys (one row per snapshot, not per keystroke).
ALTER TABLE updates DROP CONSTRAINT updates_document_id_snapshot_id_fkey;
