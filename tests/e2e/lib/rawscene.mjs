// Building blocks for raw-frame scenarios: a document with an active snapshot written by a
// raw author, listeners on the same document, and a barrier that proves "nothing else was
// relayed" without waiting for a silence.

import * as F from "./frames.mjs";
import { assert, assertEqual } from "./wait.mjs";

/** Frame types a server relays to other connections of a document. */
export const RELAYED = ["snapshot", "update", "ephemeral-message"];

/**
 * A document whose first snapshot was written by a raw author, plus `listeners` raw
 * connections on it (spread over the endpoints like any other connection of the document).
 */
export async function rawDocument(ctx, { label = "doc", listeners = 1 } = {}) {
  const doc = await ctx.newDoc(label);
  const author = F.newAuthor();
  const conn = await ctx.raw(doc, { name: `${label}-author` });
  assertEqual(conn.first.type, "document", `${label}: first frame`);
  const snapshot = F.initialSnapshot({ docId: doc.docId, author, key: doc.key, content: F.yjsStateWithText("base") });
  conn.send(snapshot);
  const saved = await conn.waitForType("snapshot-saved", { label: `${label} initial snapshot saved` });
  assertEqual(saved.msg.snapshotId, snapshot.publicData.snapshotId, `${label}: snapshot-saved id`);
  const ls = [];
  for (let i = 0; i < listeners; i++) {
    const l = await ctx.raw(doc, { name: `${label}-listener${i}` });
    assertEqual(l.first.type, "document", `${label}: listener first frame`);
    ls.push(l);
  }
  return { doc, author, conn, snapshot, listeners: ls, nextClock: 0, activeSnapshotId: snapshot.publicData.snapshotId };
}

/** Send a frame from the author and wait for its answer (a frame of one of `types`). */
export async function sendAndAwait(scene, frame, types, label, { conn = scene.conn, timeoutMs } = {}) {
  const from = conn.mark();
  conn.send(frame);
  return conn.waitFor((f) => types.includes(f.type), { from, label, timeoutMs });
}

/**
 * Barrier: the author sends a valid update; once it is acknowledged and every listener
 * received it, anything relayed earlier has arrived too (per-document order, PROTOCOL.md 6.7).
 * Returns the update frame.
 */
export async function barrier(scene, { conn = scene.conn, author = scene.author } = {}) {
  const frame = F.update({
    docId: scene.doc.docId,
    author,
    key: scene.doc.key,
    refSnapshotId: scene.activeSnapshotId,
    clock: scene.nextClock,
  });
  const ack = await sendAndAwait(scene, frame, ["update-saved", "update-save-failed"], "barrier update answer", { conn });
  assertEqual(ack.type, "update-saved", "barrier update answer");
  scene.nextClock += 1;
  await Promise.all(
    scene.listeners.map((l) =>
      l.waitFor((f) => f.type === "update" && f.msg.signature === frame.signature, { label: "barrier update relayed" }),
    ),
  );
  return frame;
}

/** Since `marks[i]`, listener i received nothing relayed except the barrier frames given. */
export function assertOnlyRelayed(scene, marks, allowedSignatures, what) {
  scene.listeners.forEach((l, i) => {
    const unexpected = l.since(marks[i], RELAYED).filter((f) => {
      const sig = f.msg.signature ?? f.msg.snapshot?.signature;
      return !allowedSignatures.includes(sig);
    });
    assert(
      unexpected.length === 0,
      `${what}: ${l.name} received ${unexpected.map((f) => `${f.type}(${f.raw.slice(0, 60)}…)`).join(", ")}`,
    );
  });
}

/** The author's own frames between `from` and the barrier's acknowledgement. */
export function answersSince(conn, from) {
  return conn.frames.slice(from);
}
