// Snapshots rotate while another client keeps editing; clients that knew an older snapshot
// come back in delta mode and must verify the snapshotProofChain (PROTOCOL.md 2.7, 6.4, 6.5).

import { waitForConnected, waitForConvergence, waitForFrame, waitForState, waitForSynced } from "../lib/client.mjs";
import { assertEachTokenOnce } from "../lib/tokens.mjs";
import { assert, assertEqual } from "../lib/wait.mjs";

/** Start `client` appending `count` tokens one at a time, each after the previous one was
 * answered. Finite on purpose: a peer that writes without pause can starve a snapshot (each
 * retry misses the newest update; after 5 refusals the machine reconnects). */
function startWriter(client, prefix, count) {
  const written = [];
  const done = (async () => {
    for (let i = 0; i < count; i++) {
      const t = `<${prefix}:${i}>`;
      written.push(t);
      const from = client.frames.length;
      client.append(t);
      // an update is answered by update-saved/-failed; a snapshot by snapshot-saved/-failed
      await waitForFrame(client, (f) => f.dir === "in" && /^(update|snapshot)-save/.test(f.type), {
        from,
        label: `answer for ${t}`,
      });
    }
  })();
  return { tokens: written, done };
}

/** Make `client` send its next change as a snapshot and wait until a new one is active. */
async function rotate(client, token) {
  const before = client.activeSnapshotId();
  client.requestSnapshot();
  client.append(token);
  await waitForState(client, (c) => c.activeSnapshotId() !== before && c.text().includes(token), {
    label: `snapshot rotation after ${token}`,
  });
  return client.activeSnapshotId();
}

export default [
  {
    name: "snapshot-rotation-and-delta-reload",
    timeoutMs: 90000,
    async run(ctx) {
      const doc = await ctx.newDoc();
      const a = await ctx.client(doc, { name: "A" });
      const b = await ctx.client(doc, { name: "B" });
      await Promise.all([waitForConnected(a), waitForConnected(b)]);
      a.append("<S1>");
      await waitForSynced(a);
      const s1 = a.activeSnapshotId();
      // Behind two gateways S1 reaches B through NATS after A's snapshot-saved: a change B made
      // before that would go out as a competing first snapshot and rotate past S1.
      await waitForState(b, (x) => x.activeSnapshotId() === s1, { label: "B has S1" });
      b.append("<B:pre0>");
      await waitForSynced(b);
      b.append("<B:pre1>");
      await waitForConvergence([a, b]);

      // C knows S1 (with B's clocks) and is then shut down with its state persisted.
      const c = await ctx.client(doc, { name: "C" });
      await waitForConvergence([a, b, c]);
      assertEqual(c.persisted.knownSnapshotInfo?.snapshotId, s1, "C's persisted snapshot");
      const persistedC = c.persist();
      c.stop();
      // G also knows S1 but stays alive, disconnected.
      const g = await ctx.client(doc, { name: "G" });
      await waitForConvergence([a, b, g]);
      g.disconnect();
      await waitForState(g, (x) => x.matches("disconnected"), { label: "disconnected" });

      // Rotate twice while B is writing.
      const w1 = startWriter(b, "B1", 25);
      await waitForFrame(b, (f) => f.type === "update-saved" && f.msg.snapshotId === s1 && f.msg.clock >= 3, {
        label: "B writing on S1",
      });
      const s2 = await rotate(a, "<rot1>");
      await w1.done;
      const w2 = startWriter(b, "B2", 25);
      await waitForFrame(b, (f) => f.type === "update-saved" && f.msg.snapshotId === s2, { label: "B writing on S2" });
      const s3 = await rotate(a, "<rot2>");
      await w2.done;
      b.append("<B:on-S3>");
      await waitForFrame(b, (f) => f.type === "update-saved" && f.msg.snapshotId === s3, { label: "B writing on S3" });
      await waitForConvergence([a, b]);
      assert(new Set([s1, s2, s3]).size === 3, "three distinct snapshots");
      assertEqual(a.activeSnapshotId(), s3, "A's active snapshot after two rotations");
      const allTokens = ["<S1>", "<B:pre0>", "<B:pre1>", "<rot1>", "<rot2>", "<B:on-S3>", ...w1.tokens, ...w2.tokens];
      assertEachTokenOnce(a.text(), allTokens);
      ctx.note(
        `A saw ${a.framesIn("snapshot-save-failed").length} snapshot-save-failed, ` +
          `B saw ${b.framesIn("update-save-failed").length} update-save-failed, A reconnected ${a.connections.length - 1}×`,
      );

      // C restarts from its persisted state: delta mode, known snapshot S1.
      const c2 = await ctx.resume(doc, persistedC, { name: "C'" });
      await waitForConvergence([a, b, c2]);
      assert(c2.connections[0].url.includes(`mode=delta&knownSnapshotId=${s1}`), `C' URL: ${c2.connections[0].url}`);
      const loaded = c2.framesIn()[0];
      assertEqual(loaded.type, "document", "C' first frame");
      assertEqual(loaded.msg.snapshot?.publicData?.snapshotId, s3, "snapshot C' loaded");
      const chain = (loaded.msg.snapshotProofChain || []).map((e) => e.snapshotId);
      assertEqual(chain.join(","), [s2, s3].join(","), "snapshotProofChain from S1");
      assertEachTokenOnce(c2.text(), allTokens);

      // G reconnects itself: delta mode with its active snapshot S1.
      g.connect();
      await waitForConvergence([a, b, g]);
      const reconnect = g.connections.at(-1);
      assert(reconnect.url.includes(`mode=delta&knownSnapshotId=${s1}`), `G reconnect URL: ${reconnect.url}`);
      const gLoad = g.frames.find((f) => f.dir === "in" && f.conn === reconnect.index);
      assertEqual(gLoad.msg.snapshotProofChain?.map((e) => e.snapshotId).join(","), [s2, s3].join(","), "G's chain");

      // F knows the active snapshot S3 and misses three of B's updates: only those come back.
      const f = await ctx.client(doc, { name: "F" });
      await waitForConvergence([a, b, f]);
      const persistedF = f.persist();
      assertEqual(persistedF.knownSnapshotInfo?.snapshotId, s3, "F's persisted snapshot");
      f.stop();
      for (const t of ["<B:late0>", "<B:late1>", "<B:late2>"]) {
        b.append(t);
        await waitForSynced(b);
      }
      const f2 = await ctx.resume(doc, persistedF, { name: "F'" });
      await waitForConvergence([a, b, f2], { expected: (t) => t.includes("<B:late2>") });
      const fLoad = f2.framesIn()[0];
      assert(!fLoad.msg.snapshot, "a delta load of the active snapshot must not carry a snapshot");
      assertEqual(fLoad.msg.updates.length, 3, "updates F' loaded (only the missing ones)");
      assertEachTokenOnce(f2.text(), [...allTokens, "<B:late0>", "<B:late1>", "<B:late2>"]);
      for (const x of [a, b, c2, g, f2]) assertEqual(x.echoes().length, 0, `frames echoed to ${x.name}`);
    },
  },
];
