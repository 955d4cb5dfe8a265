// The first edit of a new document is sent as its initial snapshot; a second client loads it.

import { waitForConnected, waitForSynced, waitForText } from "../lib/client.mjs";
import { INITIAL_PARENT_SNAPSHOT_PROOF } from "../lib/frames.mjs";
import { assert, assertEqual } from "../lib/wait.mjs";

export default [
  {
    name: "initial-snapshot-then-load",
    async run(ctx) {
      const doc = await ctx.newDoc();
      const a = await ctx.client(doc, { name: "A" });
      await waitForConnected(a);

      // a new document loads as an empty `document` frame
      const firstA = a.framesIn()[0];
      assertEqual(firstA.type, "document", "first frame for A");
      assert(!firstA.msg.snapshot, "a new document must not carry a snapshot");
      assertEqual(firstA.msg.updates?.length, 0, "updates of a new document");

      a.append("hello");
      await waitForSynced(a);

      const sent = a.framesOut().filter((f) => f.type !== "ephemeral");
      assertEqual(sent.length, 1, "content frames sent by A");
      assertEqual(sent[0].type, "snapshot", "A's first content frame");
      const pd = sent[0].msg.publicData;
      assertEqual(pd.parentSnapshotId, "", "parentSnapshotId of the first snapshot");
      assertEqual(JSON.stringify(pd.parentSnapshotUpdateClocks), "{}", "parentSnapshotUpdateClocks of the first snapshot");
      assertEqual(pd.parentSnapshotProof, INITIAL_PARENT_SNAPSHOT_PROOF, "parentSnapshotProof of the first snapshot");
      assertEqual(pd.docId, doc.docId, "docId of the snapshot");
      const saved = a.framesIn("snapshot-saved");
      assertEqual(saved.length, 1, "snapshot-saved frames for A");
      assertEqual(saved[0].msg.snapshotId, pd.snapshotId, "snapshot-saved id");
      assertEqual(a.activeSnapshotId(), pd.snapshotId, "A's active snapshot");

      const b = await ctx.client(doc, { name: "B" });
      await waitForText(b, "hello");
      await waitForSynced(b);
      const firstB = b.framesIn()[0];
      assertEqual(firstB.type, "document", "first frame for B");
      assertEqual(firstB.msg.snapshot?.publicData?.snapshotId, pd.snapshotId, "snapshot B loaded");
      assertEqual(firstB.msg.updates.length, 0, "updates B loaded");
      assertEqual(b.activeSnapshotId(), pd.snapshotId, "B's active snapshot");
      assertEqual(a.echoes().length + b.echoes().length, 0, "frames echoed to their author");
    },
  },
];
