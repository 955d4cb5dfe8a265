// The storage callbacks of secsync's example backend (getOrCreateDocument, createSnapshot,
// createUpdate; PROTOCOL.md 6.1, 6.2, 6.4-6.6) on PostgreSQL through the `pg` driver.
//
// Prisma cannot be installed here (it downloads its query engine), so each Prisma call of the
// example is written as the statement(s) Prisma issues for it, in the same order, inside the
// same kind of transaction: createSnapshot and createUpdate run SERIALIZABLE and are retried up
// to 5 times on a write conflict (Prisma's P2034 = PostgreSQL 40001 serialization_failure or
// 40P01 deadlock_detected), then give up and return undefined, as the example does;
// getOrCreateDocument runs one transaction at the default isolation. Relations Prisma loads with
// a second query (`include`, `select` of a relation) are a second query here too. The pool
// holds 5 connections by default, Prisma's default on 2 cores (num_cpus * 2 + 1).
//
// What this leaves out of a real Prisma backend is the query engine's own overhead (a separate
// engine, JSON protocol between it and Node), so this baseline is, if anything, faster.
// The example's quirks (PROTOCOL.md 8) stay: no document binding, delta by highest known
// version, the proof chain by creation time, global snapshot ids.

import { createRequire } from "node:module";
import pg from "pg";

// CommonJS on purpose, as in bench/reference: libsodium-wrappers 0.7.16 ships a broken ESM
// entry point, and secsync-server uses the CommonJS builds.
const require = createRequire(import.meta.url);
const sodium = require("libsodium-wrappers");
const {
  SecsyncSnapshotBasedOnOutdatedSnapshotError,
  SecsyncSnapshotMissesUpdatesError,
  compareUpdateClocks,
  hash,
} = require("secsync");

const SNAPSHOT_COLUMNS =
  '"id", "latestVersion", "data", "ciphertextHash", "documentId", "createdAt", "clocks", ' +
  '"parentSnapshotUpdateClocks", "parentSnapshotProof"';
const UPDATE_COLUMNS = '"id", "version", "data", "snapshotId", "clock", "pubKey"';

export function createPostgresStore({ connectionString, poolSize = 5, maxRetries = 5 }) {
  const pool = new pg.Pool({ connectionString, max: poolSize });

  // prisma.$transaction(async (tx) => …, { isolationLevel }): one pooled connection, BEGIN,
  // the callback's statements, COMMIT (or ROLLBACK when the callback throws).
  async function transaction(isolationLevel, body) {
    const client = await pool.connect();
    try {
      await client.query(isolationLevel ? `BEGIN ISOLATION LEVEL ${isolationLevel}` : "BEGIN");
      const result = await body(client);
      await client.query("COMMIT");
      return result;
    } catch (error) {
      await client.query("ROLLBACK").catch(() => {});
      throw error;
    } finally {
      client.release();
    }
  }

  const isWriteConflict = (error) => error?.code === "40001" || error?.code === "40P01";

  // The example's loop: up to 5 attempts on P2034, any other error is thrown at once, and
  // after the last conflict the result stays undefined.
  async function serializableWithRetries(body) {
    let retries = 0;
    let result;
    while (retries < maxRetries) {
      try {
        result = await transaction("SERIALIZABLE", body);
        break;
      } catch (error) {
        if (isWriteConflict(error)) {
          retries++;
          continue;
        }
        throw error;
      }
    }
    return result;
  }

  async function getOrCreateDocument({ documentId, knownSnapshotId, knownSnapshotUpdateClocks, mode }) {
    return transaction(null, async (tx) => {
      // document.findUnique({ where: { id }, include: { activeSnapshot: { select: { id } } } })
      const doc = (
        await tx.query(
          'SELECT "id", "activeSnapshotId", "createdAt" FROM "Document" WHERE "id" = $1 LIMIT 1',
          [documentId],
        )
      ).rows[0];
      let activeSnapshot = null;
      if (doc && doc.activeSnapshotId !== null) {
        activeSnapshot =
          (await tx.query('SELECT "id" FROM "Snapshot" WHERE "id" = ANY($1)', [[doc.activeSnapshotId]]))
            .rows[0] ?? null;
      }
      if (!doc) {
        // document.create({ data: { id } })
        await tx.query(
          'INSERT INTO "Document" ("id", "createdAt") VALUES ($1, $2) RETURNING "id", "activeSnapshotId", "createdAt"',
          [documentId, new Date()],
        );
        return { updates: [], snapshotProofChain: [] };
      }
      if (!activeSnapshot) {
        return { updates: [], snapshotProofChain: [] };
      }

      let snapshotProofChain = [];
      if (knownSnapshotId && knownSnapshotId !== activeSnapshot.id) {
        // snapshot.findMany({ where: { documentId }, cursor: { id: knownSnapshotId }, skip: 1,
        //   orderBy: { createdAt: "asc" } }): Prisma's cursor is a sub-select on the cursor row;
        //   no rows when that row does not exist.
        snapshotProofChain = (
          await tx.query(
            'SELECT "id", "parentSnapshotProof", "ciphertextHash", "createdAt" FROM "Snapshot" ' +
              'WHERE "documentId" = $1 AND "createdAt" >= (SELECT "createdAt" FROM "Snapshot" WHERE "id" = $2) ' +
              'ORDER BY "createdAt" ASC OFFSET 1',
            [documentId, knownSnapshotId],
          )
        ).rows;
      }

      let lastKnownVersion;
      if (knownSnapshotId === activeSnapshot.id) {
        // Object.entries(undefined) throws here exactly as in the example.
        const updateIds = Object.entries(knownSnapshotUpdateClocks).map(
          ([pubKey, clock]) => `${knownSnapshotId}-${pubKey}-${clock}`,
        );
        // update.findFirst({ where: { id: { in: updateIds } }, orderBy: { version: "desc" } })
        const lastUpdate = (
          await tx.query(
            `SELECT ${UPDATE_COLUMNS} FROM "Update" WHERE "id" = ANY($1) ORDER BY "version" DESC LIMIT 1`,
            [updateIds],
          )
        ).rows[0];
        if (lastUpdate) {
          lastKnownVersion = lastUpdate.version;
        }
      }

      // snapshot.findUnique({ where: { id }, include: { updates: { orderBy, where? } } })
      const snapshotRow = (
        await tx.query(`SELECT ${SNAPSHOT_COLUMNS} FROM "Snapshot" WHERE "id" = $1 LIMIT 1`, [
          activeSnapshot.id,
        ])
      ).rows[0];
      const updateRows = (
        lastKnownVersion !== undefined
          ? await tx.query(
              `SELECT ${UPDATE_COLUMNS} FROM "Update" WHERE "snapshotId" = ANY($1) AND "version" > $2 ORDER BY "version" ASC`,
              [[snapshotRow.id], lastKnownVersion],
            )
          : await tx.query(
              `SELECT ${UPDATE_COLUMNS} FROM "Update" WHERE "snapshotId" = ANY($1) ORDER BY "version" ASC`,
              [[snapshotRow.id]],
            )
      ).rows;
      const updates = updateRows.map((row) => JSON.parse(row.data));

      if (mode === "delta" && knownSnapshotId === snapshotRow.id) {
        return { updates };
      }
      return {
        snapshot: JSON.parse(snapshotRow.data),
        updates,
        snapshotProofChain: snapshotProofChain.map((entry) => ({
          snapshotId: entry.id,
          parentSnapshotProof: entry.parentSnapshotProof,
          snapshotCiphertextHash: entry.ciphertextHash,
        })),
      };
    });
  }

  async function createSnapshot({ snapshot }) {
    return serializableWithRetries(async (tx) => {
      // document.findUniqueOrThrow({ where: { id: docId }, select: { activeSnapshot: true } })
      const doc = (
        await tx.query('SELECT "id", "activeSnapshotId" FROM "Document" WHERE "id" = $1 LIMIT 1', [
          snapshot.publicData.docId,
        ])
      ).rows[0];
      if (!doc) {
        throw new Error("No Document found"); // P2025, not retried
      }
      const active =
        doc.activeSnapshotId === null
          ? null
          : (
              await tx.query(`SELECT ${SNAPSHOT_COLUMNS} FROM "Snapshot" WHERE "id" = ANY($1)`, [
                [doc.activeSnapshotId],
              ])
            ).rows[0] ?? null;

      if (active) {
        if (
          snapshot.publicData.parentSnapshotId !== undefined &&
          snapshot.publicData.parentSnapshotId !== active.id
        ) {
          throw new SecsyncSnapshotBasedOnOutdatedSnapshotError("Snapshot is out of date.");
        }
        const { equal } = compareUpdateClocks(active.clocks, snapshot.publicData.parentSnapshotUpdateClocks);
        if (!equal) {
          throw new SecsyncSnapshotMissesUpdatesError("Snapshot does not include the latest changes.");
        }
      }

      // snapshot.create({ data: { …, activeSnapshotDocument: { connect }, document: { connect } } })
      const created = (
        await tx.query(
          `INSERT INTO "Snapshot" ("id", "latestVersion", "data", "ciphertextHash", "documentId", "createdAt", ` +
            `"clocks", "parentSnapshotUpdateClocks", "parentSnapshotProof") ` +
            `VALUES ($1, 0, $2, $3, $4, $5, $6, $7, $8) RETURNING ${SNAPSHOT_COLUMNS}`,
          [
            snapshot.publicData.snapshotId,
            JSON.stringify(snapshot),
            hash(snapshot.ciphertext, sodium),
            snapshot.publicData.docId,
            new Date(),
            JSON.stringify({}),
            JSON.stringify(snapshot.publicData.parentSnapshotUpdateClocks),
            snapshot.publicData.parentSnapshotProof,
          ],
        )
      ).rows[0];
      // The nested connect of the one-to-one relation whose foreign key is on Document.
      await tx.query('SELECT "id" FROM "Document" WHERE "id" = $1', [snapshot.publicData.docId]);
      await tx.query('UPDATE "Document" SET "activeSnapshotId" = $1 WHERE "id" = $2', [
        created.id,
        snapshot.publicData.docId,
      ]);
      return JSON.parse(created.data);
    });
  }

  async function createUpdate({ update }) {
    return serializableWithRetries(async (tx) => {
      // snapshot.findUniqueOrThrow({ where: { id: refSnapshotId },
      //   select: { latestVersion, clocks, document: { select: { activeSnapshotId } } } })
      const snapshot = (
        await tx.query(
          'SELECT "id", "latestVersion", "clocks", "documentId" FROM "Snapshot" WHERE "id" = $1 LIMIT 1',
          [update.publicData.refSnapshotId],
        )
      ).rows[0];
      if (!snapshot) {
        throw new Error("No Snapshot found"); // P2025, not retried
      }
      const document = (
        await tx.query('SELECT "id", "activeSnapshotId" FROM "Document" WHERE "id" = ANY($1)', [
          [snapshot.documentId],
        ])
      ).rows[0];
      if (document.activeSnapshotId !== update.publicData.refSnapshotId) {
        throw new Error("Update referencing an out of date snapshot.");
      }
      const clocks = snapshot.clocks;
      if (clocks && typeof clocks === "object" && !Array.isArray(clocks)) {
        if (clocks[update.publicData.pubKey] === undefined) {
          if (update.publicData.clock !== 0) {
            throw new Error(`Update clock incorrect. Clock: ${update.publicData.clock}, but should be 0`);
          }
        } else {
          const expected = clocks[update.publicData.pubKey] + 1;
          if (expected !== update.publicData.clock) {
            throw new Error(`Update clock incorrect. Clock: ${update.publicData.clock}, but should be ${expected}`);
          }
        }
        clocks[update.publicData.pubKey] = update.publicData.clock;
      }

      // snapshot.update({ where: { id }, data: { latestVersion: +1, clocks } })
      await tx.query(
        `UPDATE "Snapshot" SET "latestVersion" = $1, "clocks" = $2 WHERE "id" = $3 RETURNING ${SNAPSHOT_COLUMNS}`,
        [snapshot.latestVersion + 1, JSON.stringify(clocks), update.publicData.refSnapshotId],
      );
      // update.create({ data: { id, data, version, snapshot: { connect }, clock, pubKey } })
      const created = (
        await tx.query(
          `INSERT INTO "Update" ("id", "data", "version", "snapshotId", "clock", "pubKey") ` +
            `VALUES ($1, $2, $3, $4, $5, $6) RETURNING ${UPDATE_COLUMNS}`,
          [
            `${update.publicData.refSnapshotId}-${update.publicData.pubKey}-${update.publicData.clock}`,
            JSON.stringify(update),
            snapshot.latestVersion + 1,
            update.publicData.refSnapshotId,
            update.publicData.clock,
            update.publicData.pubKey,
          ],
        )
      ).rows[0];
      return JSON.parse(created.data);
    });
  }

  return {
    getDocument: getOrCreateDocument,
    createSnapshot,
    createUpdate,
    close: () => pool.end(),
  };
}
