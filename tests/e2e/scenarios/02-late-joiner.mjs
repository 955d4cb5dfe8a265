// Late joiners load the active snapshot plus its updates, also while others keep editing.

import { waitForConnected, waitForConvergence, waitForFrame, waitForSynced } from "../lib/client.mjs";
import { assert, assertEqual } from "../lib/wait.mjs";
import { assertEachTokenOnce } from "../lib/tokens.mjs";

/** Per author, the clocks of `updates` must run 0,1,2,… in the order given. */
function assertContiguousClocks(updates, what) {
  const next = new Map();
  for (const u of updates) {
    const { pubKey, clock } = u.publicData;
    const expected = next.get(pubKey) ?? 0;
    assertEqual(clock, expected, `${what}: clock of ${pubKey.slice(0, 8)}`);
    next.set(pubKey, expected + 1);
  }
}

export default [
  {
    name: "late-joiner-loads-snapshot-and-updates",
    async run(ctx) {
      const doc = await ctx.newDoc();
      const a = await ctx.client(doc, { name: "A" });
      const b = await ctx.client(doc, { name: "B" });
      await Promise.all([waitForConnected(a), waitForConnected(b)]);

      a.append("<A0>");
      await waitForSynced(a);
      const snapshotId = a.activeSnapshotId();
      // one update per edit: wait for each to be confirmed before the next
      for (const t of ["<A1>", "<A2>", "<A3>"]) {
        a.append(t);
        await waitForSynced(a);
      }
      for (const t of ["<B1>", "<B2>"]) {
        b.append(t);
        await waitForSynced(b);
      }
      await waitForConvergence([a, b]);
      const saved = a.framesIn("update-saved").length + b.framesIn("update-saved").length;
      assertEqual(saved, 5, "updates accepted before the late join");

      const c = await ctx.client(doc, { name: "C" });
      await waitForConvergence([a, b, c]);
      const loaded = c.framesIn()[0];
      assertEqual(loaded.type, "document", "C's first frame");
      assertEqual(loaded.msg.snapshot?.publicData?.snapshotId, snapshotId, "snapshot C loaded");
      assertEqual(loaded.msg.updates.length, 5, "updates C loaded");
      assertContiguousClocks(loaded.msg.updates, "C's document frame");
      assertEachTokenOnce(c.text(), ["<A0>", "<A1>", "<A2>", "<A3>", "<B1>", "<B2>"]);

      c.append("<C1>");
      await waitForConvergence([a, b, c], { expected: (t) => t.includes("<C1>") });
      for (const x of [a, b, c]) assertEqual(x.echoes().length, 0, `frames echoed to ${x.name}`);
    },
  },
  {
    name: "join-during-edits",
    async run(ctx) {
      const doc = await ctx.newDoc();
      const a = await ctx.client(doc, { name: "A" });
      await waitForConnected(a);
      a.append("<start>");
      await waitForSynced(a);

      // A keeps editing, paced by the server's acknowledgements (no timers), from before D
      // connects until well after D has loaded, so D's load overlaps a stream of commits.
      const edits = [];
      let d = null;
      let editsAfterLoad = 0;
      const writer = (async () => {
        for (let i = 0; i < 2000 && editsAfterLoad < 15; i++) {
          const t = `<A:${i}>`;
          edits.push(t);
          const from = a.frames.length;
          a.append(t);
          await waitForFrame(a, (f) => f.dir === "in" && (f.type === "update-saved" || f.type === "update-save-failed"), {
            from,
            label: `ack for ${t}`,
          });
          if (d?.isLoaded()) editsAfterLoad += 1;
        }
      })();
      // join once A is part-way through
      await waitForFrame(a, (f) => f.type === "update-saved" && f.msg.clock >= 5, { label: "5 acknowledged updates" });
      d = await ctx.client(doc, { name: "D" });
      await writer;
      assert(editsAfterLoad >= 15, "A stopped editing before D had loaded");
      await waitForConvergence([a, d]);
      assertEachTokenOnce(d.text(), ["<start>", ...edits]);
      const loaded = d.framesIn()[0];
      assert(loaded.type === "document", "D's first frame must be document");
      ctx.note(`D loaded ${loaded.msg.updates.length} updates and received ${d.framesIn("update").length} live`);
    },
  },
];
