// Ephemeral messages travel in both directions, to every other client, never to the sender.

import { waitForConnected, waitForEphemeral, waitForEphemeralSession, waitForSynced } from "../lib/client.mjs";
import { waitUntil, assertEqual } from "../lib/wait.mjs";

export default [
  {
    name: "ephemeral-both-directions-no-echo",
    async run(ctx) {
      const doc = await ctx.newDoc();
      // The session handshake (PROTOCOL.md 2.8) starts when a client loads a `document` that
      // has a snapshot, so the document gets one before the others join.
      const a = await ctx.client(doc, { name: "A" });
      await waitForConnected(a);
      a.append("<A0>");
      await waitForSynced(a);
      const b = await ctx.client(doc, { name: "B" });
      const c = await ctx.client(doc, { name: "C" });
      await Promise.all([waitForSynced(b), waitForSynced(c)]);
      await Promise.all([
        waitForEphemeralSession(a, b),
        waitForEphemeralSession(a, c),
        waitForEphemeralSession(b, c),
      ]);

      a.sendEphemeral("ping from A");
      await Promise.all([waitForEphemeral(b, "ping from A"), waitForEphemeral(c, "ping from A")]);
      b.sendEphemeral("pong from B");
      await Promise.all([waitForEphemeral(a, "pong from B"), waitForEphemeral(c, "pong from B")]);

      // a burst keeps its order (the receivers' replay protection drops anything out of order)
      const burst = Array.from({ length: 20 }, (_, i) => `C burst ${i}`);
      for (const m of burst) c.sendEphemeral(m);
      await waitUntil([a, b], () => [a, b].every((x) => burst.every((m) => x.ephemeral.some((e) => e.text === m))), {
        label: "C's burst at A and B",
      });
      for (const x of [a, b]) {
        const got = x.ephemeral.filter((e) => e.from === c.pubKey).map((e) => e.text);
        assertEqual(got.join("|"), burst.join("|"), `C's burst as received by ${x.name}`);
      }

      for (const x of [a, b, c]) {
        assertEqual(x.ephemeral.filter((e) => e.from === x.pubKey).length, 0, `own messages delivered to ${x.name}`);
        assertEqual(x.echoes().length, 0, `frames echoed to ${x.name}`);
        const errors = x.context._ephemeralMessageReceivingErrors.map((e) => e.message);
        // 302 (no session yet) is normal during the handshake; anything else is not
        const unexpected = errors.filter((m) => m !== "SECSYNC_ERROR_302");
        assertEqual(unexpected.join(","), "", `ephemeral errors at ${x.name}`);
      }
      assertEqual(a.text(), "<A0>", "document content untouched by ephemeral traffic");
    },
  },
];
