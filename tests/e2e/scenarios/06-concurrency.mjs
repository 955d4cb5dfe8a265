// Many writers at once: concurrent updates, and several clients racing to snapshot.

import { waitForConnected, waitForConvergence, waitForFrame, waitForSynced } from "../lib/client.mjs";
import { assertEachTokenOnce, tokens } from "../lib/tokens.mjs";
import { assert, assertEqual } from "../lib/wait.mjs";

/** Append `list` one token at a time; each edit waits only for the answer to the previous
 * one, so all writers run at full speed against each other. */
async function writeAll(client, list) {
  for (const t of list) {
    const from = client.frames.length;
    client.append(t);
    await waitForFrame(client, (f) => f.dir === "in" && /^(update|snapshot)-save/.test(f.type), {
      from,
      label: `answer for ${t}`,
    });
  }
}

export default [
  {
    name: "five-clients-concurrent-edits",
    timeoutMs: 90000,
    async run(ctx) {
      const doc = await ctx.newDoc();
      const first = await ctx.client(doc, { name: "C0" });
      await waitForConnected(first);
      first.append("<base>");
      await waitForSynced(first);
      const others = [];
      for (let i = 1; i < 5; i++) others.push(await ctx.client(doc, { name: `C${i}` }));
      const clients = [first, ...others];
      await Promise.all(clients.map((c) => waitForSynced(c)));

      const perClient = clients.map((c, i) => tokens(`c${i}`, 20));
      // unpaced edits too: a burst appended synchronously goes out as pipelined updates
      const bursts = clients.map((c, i) => tokens(`burst${i}`, 5));
      clients.forEach((c, i) => bursts[i].forEach((t) => c.append(t)));
      await Promise.all(clients.map((c, i) => writeAll(c, perClient[i])));

      const expected = ["<base>", ...perClient.flat(), ...bursts.flat()];
      await waitForConvergence(clients, { expected: (t) => expected.every((x) => t.includes(x)) });
      assertEachTokenOnce(clients[0].text(), expected);
      for (const c of clients) assertEqual(c.echoes().length, 0, `frames echoed to ${c.name}`);

      // a late joiner sees exactly the same
      const late = await ctx.client(doc, { name: "late" });
      await waitForConvergence([...clients, late]);
      assertEachTokenOnce(late.text(), expected);
    },
  },
  {
    name: "concurrent-snapshot-race",
    timeoutMs: 90000,
    async run(ctx) {
      const doc = await ctx.newDoc();
      const clients = [];
      for (let i = 0; i < 4; i++) clients.push(await ctx.client(doc, { name: `R${i}` }));
      await Promise.all(clients.map((c) => waitForConnected(c)));
      clients[0].append("<base>");
      await waitForConvergence(clients, { expected: (t) => t.includes("<base>") });
      clients[1].append("<u1>");
      await waitForConvergence(clients, { expected: (t) => t.includes("<u1>") });

      // everyone snapshots on the same parent at the same time, twice in a row
      const expected = ["<base>", "<u1>"];
      for (let round = 0; round < 2; round++) {
        clients.forEach((c, i) => {
          const t = `<race${round}:${i}>`;
          expected.push(t);
          c.requestSnapshot();
          c.append(t);
        });
        await waitForConvergence(clients, { expected: (t) => expected.every((x) => t.includes(x)) });
      }
      assertEachTokenOnce(clients[0].text(), expected);
      const active = clients[0].activeSnapshotId();
      for (const c of clients) assertEqual(c.activeSnapshotId(), active, `${c.name}'s active snapshot`);
      const failures = clients.reduce((n, c) => n + c.framesIn("snapshot-save-failed").length, 0);
      // the real client re-queues a refused snapshot's changes and, once a retried snapshot
      // is accepted, sends them again as an update (content the snapshot already has)
      const updates = clients.reduce((n, c) => n + c.framesOut("update").length, 0);
      ctx.note(`${failures} snapshot-save-failed answers during the races; ${updates} updates sent (only 1 edit was an update)`);
      assert(failures > 0, "no snapshot was refused: the race did not happen");

      // a fresh client agrees on the active snapshot and content
      const late = await ctx.client(doc, { name: "late" });
      await waitForConvergence([...clients, late]);
      assertEqual(late.framesIn()[0].msg.snapshot?.publicData?.snapshotId, active, "snapshot the late client loaded");
    },
  },
];
