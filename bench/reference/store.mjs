// In-memory version of the storage callbacks of secsync's example backend
// (getOrCreateDocument, createSnapshot, createUpdate; PROTOCOL.md 6.1, 6.2, 6.4-6.6).
//
// It reproduces the example's behaviour, quirks included (no document binding, delta by the
// highest known version, proof chain by creation order), because this server is the baseline
// our server is compared with. Every callback body is synchronous, so each one is atomic in
// Node's single thread: the example gets the same effect from SERIALIZABLE transactions.
// All validation happens before the first mutation, which stands in for a rollback.

import { createRequire } from "node:module";

// CommonJS on purpose: libsodium-wrappers 0.7.16 ships a broken ESM entry point, and
// secsync-server itself loads the CommonJS builds, so this shares their instances.
const require = createRequire(import.meta.url);
const sodium = require("libsodium-wrappers");
const {
  SecsyncSnapshotBasedOnOutdatedSnapshotError,
  SecsyncSnapshotMissesUpdatesError,
  compareUpdateClocks,
  hash,
} = require("secsync");

export function createMemoryStore() {
  // id -> { id, activeSnapshotId, createdSeq }
  const documents = new Map();
  // Snapshot ids are global, as in the example's schema.
  // id -> { id, documentId, data, ciphertextHash, parentSnapshotProof,
  //         parentSnapshotUpdateClocks, clocks, latestVersion, createdSeq, updates: [] }
  const snapshots = new Map();
  // "{snapshotId}-{pubKey}-{clock}" -> { id, snapshotId, pubKey, clock, version, data }
  const updates = new Map();
  // Stands in for createdAt: a strictly increasing creation order across everything.
  let seq = 0;

  // The example returns JSON re-parsed from the stored text; callers must never share objects.
  const parseStored = (row) => JSON.parse(row.data);

  function getOrCreateDocument({ documentId, knownSnapshotId, knownSnapshotUpdateClocks, mode }) {
    const doc = documents.get(documentId);
    if (!doc) {
      documents.set(documentId, { id: documentId, activeSnapshotId: null, createdSeq: ++seq });
      return { updates: [], snapshotProofChain: [] };
    }
    if (!doc.activeSnapshotId) {
      return { updates: [], snapshotProofChain: [] };
    }
    const active = snapshots.get(doc.activeSnapshotId);

    // Prisma cursor semantics: the rows of this document created after the cursor row,
    // nothing when the cursor row does not exist at all.
    let snapshotProofChain = [];
    if (knownSnapshotId && knownSnapshotId !== active.id) {
      const cursor = snapshots.get(knownSnapshotId);
      if (cursor) {
        snapshotProofChain = [...snapshots.values()]
          .filter((s) => s.documentId === documentId && s.createdSeq > cursor.createdSeq)
          .sort((a, b) => a.createdSeq - b.createdSeq)
          .map((s) => ({
            snapshotId: s.id,
            parentSnapshotProof: s.parentSnapshotProof,
            snapshotCiphertextHash: s.ciphertextHash,
          }));
      }
    }

    // The example's "last known version" lookup. Object.entries(undefined) throws exactly as
    // in the example when the clocks are missing (the connection then gets document-error).
    let lastKnownVersion;
    if (knownSnapshotId === active.id) {
      const ids = Object.entries(knownSnapshotUpdateClocks).map(
        ([pubKey, clock]) => `${knownSnapshotId}-${pubKey}-${clock}`,
      );
      for (const id of ids) {
        const row = updates.get(id);
        if (row && (lastKnownVersion === undefined || row.version > lastKnownVersion)) {
          lastKnownVersion = row.version;
        }
      }
    }
    const activeUpdates = active.updates
      .filter((u) => lastKnownVersion === undefined || u.version > lastKnownVersion)
      .map(parseStored);

    if (mode === "delta" && knownSnapshotId === active.id) {
      return { updates: activeUpdates };
    }
    return { snapshot: parseStored(active), updates: activeUpdates, snapshotProofChain };
  }

  function createSnapshot({ snapshot }) {
    const doc = documents.get(snapshot.publicData.docId);
    if (!doc) {
      // findUniqueOrThrow
      throw new Error("document not found");
    }
    if (doc.activeSnapshotId) {
      const active = snapshots.get(doc.activeSnapshotId);
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
    if (snapshots.has(snapshot.publicData.snapshotId)) {
      // primary key violation
      throw new Error("duplicate snapshot id");
    }
    const row = {
      id: snapshot.publicData.snapshotId,
      documentId: snapshot.publicData.docId,
      data: JSON.stringify(snapshot),
      ciphertextHash: hash(snapshot.ciphertext, sodium),
      parentSnapshotProof: snapshot.publicData.parentSnapshotProof,
      parentSnapshotUpdateClocks: snapshot.publicData.parentSnapshotUpdateClocks,
      clocks: {},
      latestVersion: 0,
      createdSeq: ++seq,
      updates: [],
    };
    snapshots.set(row.id, row);
    doc.activeSnapshotId = row.id;
    return parseStored(row);
  }

  function createUpdate({ update }) {
    const { refSnapshotId, pubKey, clock } = update.publicData;
    const snap = snapshots.get(refSnapshotId);
    if (!snap) {
      throw new Error("snapshot not found");
    }
    if (documents.get(snap.documentId).activeSnapshotId !== refSnapshotId) {
      throw new Error("Update referencing an out of date snapshot.");
    }
    const expected = snap.clocks[pubKey] === undefined ? 0 : snap.clocks[pubKey] + 1;
    if (clock !== expected) {
      throw new Error(`Update clock incorrect. Clock: ${clock}, but should be ${expected}`);
    }
    const id = `${refSnapshotId}-${pubKey}-${clock}`;
    if (updates.has(id)) {
      throw new Error("duplicate update id");
    }
    const row = { id, snapshotId: refSnapshotId, pubKey, clock, version: snap.latestVersion + 1, data: JSON.stringify(update) };
    snap.latestVersion = row.version;
    snap.clocks = { ...snap.clocks, [pubKey]: clock };
    snap.updates.push(row);
    updates.set(id, row);
    return parseStored(row);
  }

  // Lets the reference survive a restart (used by the e2e suite's restart hook). Not part
  // of the example backend, which keeps its state in Postgres.
  function dump() {
    return {
      seq,
      documents: [...documents.values()],
      snapshots: [...snapshots.values()].map(({ updates: rows, ...rest }) => ({ ...rest, updateIds: rows.map((u) => u.id) })),
      updates: [...updates.values()],
    };
  }

  function load(state) {
    seq = state.seq;
    for (const d of state.documents) documents.set(d.id, d);
    for (const u of state.updates) updates.set(u.id, u);
    for (const { updateIds, ...rest } of state.snapshots) {
      snapshots.set(rest.id, { ...rest, updates: updateIds.map((id) => updates.get(id)) });
    }
  }

  // The callbacks are async in secsync-server's contract.
  return {
    getDocument: async (params) => getOrCreateDocument(params),
    createSnapshot: async (params) => createSnapshot(params),
    createUpdate: async (params) => createUpdate(params),
    dump,
    load,
  };
}
