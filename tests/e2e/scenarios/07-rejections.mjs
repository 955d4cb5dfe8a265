// Frames the server must refuse, sent as exact bytes over raw connections. Each refusal must
// be answered as PROTOCOL.md 6.1/6.2/7 says, store nothing, and reach no other connection.
// "Nothing reached a listener" is proven with a barrier (a valid update relayed afterwards),
// never by waiting for a quiet period.

import * as F from "../lib/frames.mjs";
import { answersSince, assertOnlyRelayed, barrier, rawDocument, sendAndAwait } from "../lib/rawscene.mjs";
import { Checks, assert, assertEqual } from "../lib/wait.mjs";

const UPDATE_ANSWERS = ["update-saved", "update-save-failed"];
const SNAPSHOT_ANSWERS = ["snapshot-saved", "snapshot-save-failed"];
// secsync-server retries a failing store call for ~1.5 s before answering (PROTOCOL.md 8)
const ANSWER_MS = 8000;
// answers to junk come straight from the parser; the reference never sends one
const JUNK_ANSWER_MS = 4000;

/** Send an update-shaped frame; it must be answered update-save-failed. */
async function expectUpdateRefused(scene, frame, what, { echo = true } = {}) {
  const answer = await sendAndAwait(scene, frame, UPDATE_ANSWERS, `answer to ${what}`, { timeoutMs: ANSWER_MS });
  assertEqual(answer.type, "update-save-failed", `answer to ${what}`);
  if (echo) {
    // the client does not read these, but PROTOCOL.md 6.2 echoes them
    assertEqual(answer.msg.snapshotId, frame.publicData.refSnapshotId, `${what}: echoed snapshotId`);
    assertEqual(answer.msg.clock, frame.publicData.clock, `${what}: echoed clock`);
  }
  assert(answer.msg.requiresNewSnapshot !== true, `${what}: requiresNewSnapshot must not be set`);
  return answer;
}

async function expectSnapshotRefused(scene, frame, what) {
  const answer = await sendAndAwait(scene, frame, SNAPSHOT_ANSWERS, `answer to ${what}`, { timeoutMs: ANSWER_MS });
  assertEqual(answer.type, "snapshot-save-failed", `answer to ${what}`);
  return answer;
}

/** Documents loaded afresh contain exactly the snapshot and the updates given. */
async function assertStored(ctx, scene, updates, what) {
  const check = await ctx.raw(scene.doc, { name: `${scene.doc.label}-check` });
  const d = check.first.msg;
  assertEqual(check.first.type, "document", `${what}: first frame`);
  assertEqual(d.snapshot?.publicData?.snapshotId, scene.activeSnapshotId, `${what}: active snapshot`);
  assertEqual(
    (d.updates || []).map((u) => u.signature).join(","),
    updates.map((u) => u.signature).join(","),
    `${what}: stored updates`,
  );
  check.close();
}

export default [
  {
    name: "rejects-bad-signatures",
    async run(ctx) {
      const scene = await rawDocument(ctx, { listeners: 2 });
      const { doc, author, snapshot } = scene;
      const marks = scene.listeners.map((l) => l.mark());
      const from = scene.conn.mark();

      const base = { docId: doc.docId, author, key: doc.key, refSnapshotId: scene.activeSnapshotId, clock: 0 };
      await expectUpdateRefused(scene, F.withForeignSignature(F.update(base), F.DOMAIN.update), "update signed by another key");
      const tampered = F.update(base);
      await expectUpdateRefused(scene, { ...tampered, ciphertext: F.update(base).ciphertext }, "update with swapped ciphertext");
      await expectUpdateRefused(
        scene,
        F.signFrame(F.update(base), F.DOMAIN.snapshot, author.keyPair),
        "update signed under the snapshot domain",
      );
      const child = F.childSnapshot({ docId: doc.docId, author, key: doc.key, parent: snapshot });
      await expectSnapshotRefused(scene, F.withForeignSignature(child, F.DOMAIN.snapshot), "snapshot signed by another key");
      scene.conn.send(F.withForeignSignature(F.ephemeral({ docId: doc.docId, author, key: doc.key }), F.DOMAIN.ephemeral));

      const good = await barrier(scene);
      // one answer per update/snapshot frame (4) + the barrier's ack; the ephemeral message may
      // get at most an error frame, never document-error
      const answers = answersSince(scene.conn, from);
      const extra = answers.filter((f) => ![...UPDATE_ANSWERS, ...SNAPSHOT_ANSWERS].includes(f.type));
      assert(extra.length <= 1, `unexpected frames to the sender: ${extra.map((f) => f.type).join(",")}`);
      assert(!extra.some((f) => ["document-error", "ephemeral-message"].includes(f.type)), `sender got ${extra.map((f) => f.type)}`);
      assertOnlyRelayed(scene, marks, [good.signature], "after bad signatures");
      await assertStored(ctx, scene, [good], "after bad signatures");
      assert(!scene.conn.closed, "the sender's connection must stay open");
    },
  },
  {
    name: "rejects-wrong-clocks-and-stale-snapshots",
    async run(ctx) {
      const scene = await rawDocument(ctx, { listeners: 2 });
      const { doc, author } = scene;
      const marks = scene.listeners.map((l) => l.mark());
      const u = (clock, refSnapshotId = scene.activeSnapshotId) =>
        F.update({ docId: doc.docId, author, key: doc.key, refSnapshotId, clock });

      await expectUpdateRefused(scene, u(1), "first update with clock 1");
      const first = await barrier(scene); // clock 0
      await expectUpdateRefused(scene, first, "the same update again (duplicate clock 0)");
      await expectUpdateRefused(scene, u(0), "another update with clock 0");
      await expectUpdateRefused(scene, u(5), "clock gap (5 after 0)");
      await expectUpdateRefused(scene, u(1, "unknown-snapshot-id"), "unknown refSnapshotId");

      // non-integer and negative clocks, validly signed, so only the clock is wrong
      const resign = (frame, clock) =>
        F.signFrame({ ...frame, publicData: { ...frame.publicData, clock } }, F.DOMAIN.update, author.keyPair);
      await expectUpdateRefused(scene, resign(u(1), 1.5), "clock 1.5");
      await expectUpdateRefused(scene, resign(u(1), -1), "clock -1");
      await expectUpdateRefused(scene, resign(u(1), "1"), 'clock "1" (string)', { echo: false });

      // rotate: a child snapshot with the right clocks, then the old snapshot is stale
      const oldSnapshotId = scene.activeSnapshotId;
      const child = F.childSnapshot({
        docId: doc.docId,
        author,
        key: doc.key,
        parent: scene.snapshot,
        parentSnapshotUpdateClocks: { [author.pubKey]: 0 },
      });
      const saved = await sendAndAwait(scene, child, SNAPSHOT_ANSWERS, "child snapshot answer");
      assertEqual(saved.type, "snapshot-saved", "answer to a correct child snapshot");
      scene.activeSnapshotId = child.publicData.snapshotId;
      scene.nextClock = 0;
      await Promise.all(scene.listeners.map((l) => l.waitFor((f) => f.type === "snapshot" && f.msg.snapshot.signature === child.signature)));
      await expectUpdateRefused(scene, u(1, oldSnapshotId), "update on the replaced snapshot");

      const good = await barrier(scene);
      assertOnlyRelayed(scene, marks, [first.signature, child.signature, good.signature], "after wrong clocks");
      await assertStored(ctx, scene, [good], "after wrong clocks");
    },
  },
  {
    name: "snapshot-refusals-carry-recovery-data",
    async run(ctx) {
      const scene = await rawDocument(ctx, { listeners: 1 });
      const { doc, author, snapshot } = scene;
      const first = await barrier(scene); // clock 0 on the initial snapshot
      const marks = scene.listeners.map((l) => l.mark());

      // parent is not the active snapshot → outdated: the answer carries the active snapshot
      const orphan = F.initialSnapshot({ docId: doc.docId, author, key: doc.key });
      const stale = F.childSnapshot({ docId: doc.docId, author, key: doc.key, parent: orphan });
      const outdated = await expectSnapshotRefused(scene, stale, "snapshot on an unknown parent");
      assertEqual(outdated.msg.snapshot?.publicData?.snapshotId, snapshot.publicData.snapshotId, "outdated: carried snapshot");
      assertEqual((outdated.msg.updates || []).map((x) => x.signature).join(), first.signature, "outdated: carried updates");

      // clocks miss the author's update → misses updates: the answer carries the updates
      const behind = F.childSnapshot({ docId: doc.docId, author, key: doc.key, parent: snapshot, parentSnapshotUpdateClocks: {} });
      const misses = await expectSnapshotRefused(scene, behind, "snapshot missing an update");
      assertEqual((misses.msg.updates || []).map((x) => x.signature).join(), first.signature, "misses updates: carried updates");

      // a second first snapshot (empty parent) on a document that has one is outdated too
      await expectSnapshotRefused(scene, F.initialSnapshot({ docId: doc.docId, author, key: doc.key }), "second initial snapshot");

      const good = await barrier(scene);
      assertOnlyRelayed(scene, marks, [good.signature], "after snapshot refusals");
      await assertStored(ctx, scene, [first, good], "after snapshot refusals");
    },
  },
  {
    // Stricter than secsync-server 0.5 (PROTOCOL.md 7.1): the reference accepts these.
    name: "rejects-foreign-document",
    async run(ctx) {
      const x = await rawDocument(ctx, { label: "X", listeners: 1 });
      const y = await rawDocument(ctx, { label: "Y", listeners: 1 });
      const marksX = x.listeners.map((l) => l.mark());
      const marksY = y.listeners.map((l) => l.mark());
      const checks = new Checks();
      // every foreign frame is sent on X's author connection, each by a fresh author, so a
      // server that wrongly stores one does not disturb the clocks of the next check
      const fresh = () => F.newAuthor();

      await checks.check("update with docId Y on Y's snapshot", () =>
        expectUpdateRefused(
          x,
          F.update({ docId: y.doc.docId, author: fresh(), key: y.doc.key, refSnapshotId: y.activeSnapshotId, clock: 0 }),
          "update for Y's snapshot with docId Y",
        ),
      );
      await checks.check("update with docId Y on X's snapshot", () =>
        expectUpdateRefused(
          x,
          F.update({ docId: y.doc.docId, author: fresh(), key: x.doc.key, refSnapshotId: x.activeSnapshotId, clock: 0 }),
          "update for X's snapshot with docId Y",
        ),
      );
      await checks.check("update with docId X on Y's snapshot", () =>
        expectUpdateRefused(
          x,
          F.update({ docId: x.doc.docId, author: fresh(), key: x.doc.key, refSnapshotId: y.activeSnapshotId, clock: 0 }),
          "update with docId X referencing Y's snapshot",
        ),
      );
      await checks.check("snapshot with docId Y", async () => {
        const answer = await expectSnapshotRefused(
          x,
          F.childSnapshot({ docId: y.doc.docId, author: fresh(), key: y.doc.key, parent: y.snapshot }),
          "snapshot for Y",
        );
        assert(!answer.msg.snapshot && !answer.msg.updates, "a foreign-document snapshot gets a bare snapshot-save-failed");
      });
      x.conn.send(F.ephemeral({ docId: y.doc.docId, author: fresh(), key: y.doc.key }));

      const goodX = await barrier(x);
      const goodY = await barrier(y);
      await checks.check("sender answers", () => {
        const bad = answersSince(x.conn, 0).filter((f) => f.type === "document-error" || f.type === "ephemeral-message");
        assertEqual(bad.length, 0, "document-error/ephemeral frames to the sender");
      });
      await checks.check("relayed on X", () => assertOnlyRelayed(x, marksX, [goodX.signature], "X"));
      await checks.check("relayed on Y", () => assertOnlyRelayed(y, marksY, [goodY.signature], "Y"));
      await checks.check("stored in X", () => assertStored(ctx, x, [goodX], "X"));
      await checks.check("stored in Y", () => assertStored(ctx, y, [goodY], "Y"));
      checks.done();
    },
  },
  {
    // Stricter than secsync-server 0.5 (PROTOCOL.md 7.2): the reference crashes on non-JSON
    // (or, as run here, ignores it) and is silent about shapes it cannot classify.
    name: "rejects-malformed-frames",
    async run(ctx) {
      const scene = await rawDocument(ctx, { listeners: 1 });
      const { doc, author } = scene;
      const marks = scene.listeners.map((l) => l.mark());
      const checks = new Checks();

      const invalid = (data, what, opts) =>
        checks.check(what, async () => {
          const from = scene.conn.mark();
          scene.conn.send(data, opts);
          const f = await scene.conn.waitFor(() => true, { from, label: "an answer", timeoutMs: JUNK_ANSWER_MS });
          // PROTOCOL.md 7.2: one frame of a dedicated type, never document-error
          assertEqual(f.type, "invalid-message", "answer");
        });
      await invalid("this is not json", "non-JSON text");
      await invalid("[1,2,3]", "a JSON array");
      await invalid("5", "a JSON number");
      await invalid('{"hello":"world"}', "an object of no known shape");
      await invalid(Buffer.from([0xff, 0x00, 0x7b]), "a binary frame", { binary: true });

      const u = F.update({ docId: doc.docId, author, key: doc.key, refSnapshotId: scene.activeSnapshotId, clock: 0 });
      const refused = (frame, what, opts) => checks.check(what, () => expectUpdateRefused(scene, frame, what, opts));
      await refused({ ...u, publicData: { ...u.publicData, clock: "0" } }, 'clock "0"', { echo: false });
      await refused({ ...u, publicData: { ...u.publicData, pubKey: 5 } }, "pubKey 5", { echo: false });
      await refused({ ...u, signature: `${u.signature}==` }, "padded base64 signature");
      await refused({ ...u, signature: u.signature.slice(0, 40) }, "short signature");
      await checks.check("snapshot without ciphertext", async () => {
        const { ciphertext, ...noCiphertext } = F.childSnapshot({ docId: doc.docId, author, key: doc.key, parent: scene.snapshot });
        assert(ciphertext, "builder produced a ciphertext");
        await expectSnapshotRefused(scene, noCiphertext, "snapshot without ciphertext");
      });

      const good = await barrier(scene);
      await checks.check("connection state", () => {
        assert(!scene.conn.closed, "the sender's connection must stay open");
        assert(scene.conn.frames.every((f) => f.type !== "document-error" || f === scene.conn.first), "document-error after load");
      });
      await checks.check("relayed", () => assertOnlyRelayed(scene, marks, [good.signature], "after malformed frames"));
      await checks.check("stored", () => assertStored(ctx, scene, [good], "after malformed frames"));
      checks.done();
    },
  },
];
