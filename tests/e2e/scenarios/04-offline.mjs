// Going offline and coming back: explicit disconnect with offline edits, a dropped socket,
// and a restart of the whole client from persisted state with pending changes.

import { waitForConnected, waitForConvergence, waitForState, waitForSynced } from "../lib/client.mjs";
import { assertEachTokenOnce } from "../lib/tokens.mjs";
import { assert, assertEqual } from "../lib/wait.mjs";

/** Frames on connection `index` of `client` (the frames of one socket). */
function onConnection(client, index) {
  return client.frames.filter((f) => f.conn === index);
}

export default [
  {
    name: "offline-edit-then-reconnect",
    async run(ctx) {
      const doc = await ctx.newDoc();
      const a = await ctx.client(doc, { name: "A" });
      const b = await ctx.client(doc, { name: "B" });
      await Promise.all([waitForConnected(a), waitForConnected(b)]);
      a.append("<A0>");
      await waitForSynced(a);
      b.append("<B0>");
      await waitForConvergence([a, b]);

      b.disconnect();
      await waitForState(b, (x) => x.matches("disconnected"), { label: "disconnected" });
      b.append("<B:offline1>");
      b.append("<B:offline2>");
      a.append("<A:while-B-offline>");
      await waitForSynced(a);
      assert(!a.text().includes("<B:offline1>"), "an offline edit reached A before B reconnected");

      b.connect();
      const tokens = ["<A0>", "<B0>", "<B:offline1>", "<B:offline2>", "<A:while-B-offline>"];
      await waitForConvergence([a, b], { expected: (t) => t.includes("<B:offline2>") && t.includes("<A:while-B-offline>") });
      assertEachTokenOnce(a.text(), tokens);
      const again = b.connections.at(-1);
      assert(again.index > 0, "B must have opened a second connection");
      assert(again.url.includes("mode=delta&knownSnapshotId="), `B reconnect URL: ${again.url}`);
      // the real client restarts its clock at -1 after a reconnect; note whether the server
      // had to correct it (see the report on update-save-failed after reconnect)
      const failedAfter = onConnection(b, again.index).filter((f) => f.type === "update-save-failed").length;
      ctx.note(`B got ${failedAfter} update-save-failed after reconnecting`);
    },
  },
  {
    name: "dropped-connection-reconnects",
    async run(ctx) {
      const doc = await ctx.newDoc();
      const a = await ctx.client(doc, { name: "A" });
      const b = await ctx.client(doc, { name: "B" });
      await Promise.all([waitForConnected(a), waitForConnected(b)]);
      a.append("<A0>");
      await waitForSynced(a);
      a.append("<A1>");
      await waitForConvergence([a, b]);

      // cut A's socket without a close handshake; the machine must reconnect by itself
      a.dropConnection();
      a.append("<A:during-drop>");
      b.append("<B:during-drop>");
      await waitForState(a, (x) => x.connections.length >= 2 && x.isLoaded(), { label: "reconnected" });
      await waitForConvergence([a, b], { expected: (t) => t.includes("<A:during-drop>") && t.includes("<B:during-drop>") });
      assertEachTokenOnce(b.text(), ["<A0>", "<A1>", "<A:during-drop>", "<B:during-drop>"]);
      assertEqual(a.echoes().length + b.echoes().length, 0, "frames echoed to their author");
    },
  },
  {
    name: "restart-from-persisted-state-with-pending-changes",
    async run(ctx) {
      const doc = await ctx.newDoc();
      const a = await ctx.client(doc, { name: "A" });
      const b = await ctx.client(doc, { name: "B" });
      await Promise.all([waitForConnected(a), waitForConnected(b)]);
      a.append("<A0>");
      await waitForSynced(a);
      b.append("<B0>");
      await waitForSynced(b);
      b.append("<B1>");
      await waitForConvergence([a, b]);

      // B goes offline, edits, and the app is closed: its state and pending changes persist.
      b.disconnect();
      await waitForState(b, (x) => x.matches("disconnected"), { label: "disconnected" });
      b.append("<B:pending1>");
      b.append("<B:pending2>");
      const persisted = b.persist();
      assertEqual(persisted.pendingChanges.length, 2, "pending changes reported by onPendingChangesUpdated");
      assert(persisted.knownSnapshotInfo?.updateClocks?.[b.pubKey] === 1, "B's persisted clock should be 1");
      b.stop();

      a.append("<A:meanwhile>");
      await waitForSynced(a);

      // A new machine from the persisted state: delta load, then the pending changes go out.
      const b2 = await ctx.resume(doc, persisted, { name: "B'" });
      const tokens = ["<A0>", "<B0>", "<B1>", "<B:pending1>", "<B:pending2>", "<A:meanwhile>"];
      await waitForConvergence([a, b2], { expected: (t) => tokens.every((x) => t.includes(x)) });
      assertEachTokenOnce(a.text(), tokens);
      const load = b2.framesIn()[0];
      assertEqual(load.type, "document", "B' first frame");
      assert(!load.msg.snapshot, "delta load of the active snapshot must not carry a snapshot");
      assertEqual(load.msg.updates.length, 1, "updates B' loaded (A's edit while B was away)");
      ctx.note(`B' got ${b2.framesIn("update-save-failed").length} update-save-failed (clock restarted from 0)`);
    },
  },
];
