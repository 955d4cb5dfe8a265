// An endpoint (gateway) is restarted while clients are connected and editing. Needs the
// restart hook SECSYNC_E2E_RESTART_CMD_<i>; skipped without one.

import { waitForConnected, waitForConvergence, waitForSynced } from "../lib/client.mjs";
import { assertEachTokenOnce } from "../lib/tokens.mjs";
import { assert, waitUntil } from "../lib/wait.mjs";

export default [
  {
    name: "gateway-restarted-mid-session",
    timeoutMs: 120000,
    skip: (ctx) =>
      ctx.restartableEndpoints().length === 0
        ? `no restart hook: set SECSYNC_E2E_RESTART_CMD_<i> for one of ${ctx.endpoints.length} endpoint(s)`
        : null,
    async run(ctx) {
      const index = ctx.restartableEndpoints()[0];
      const target = ctx.endpoints[index];
      const doc = await ctx.newDoc();
      // A sits on the restarted endpoint for sure; the others are spread as usual
      const a = await ctx.client(doc, { name: "A", endpoint: target });
      const b = await ctx.client(doc, { name: "B" });
      const c = await ctx.client(doc, { name: "C" });
      const all = [a, b, c];
      await Promise.all(all.map((x) => waitForConnected(x)));
      a.append("<A0>");
      await waitForSynced(a);
      b.append("<B0>");
      c.append("<C0>");
      await waitForConvergence(all, { expected: (t) => t.includes("<B0>") && t.includes("<C0>") });

      const onTarget = all.filter((x) => x.endpoint === target);
      const before = onTarget.map((x) => x.connections.length);
      const restart = ctx.restartEndpoint(index);
      // edits racing the restart: they may go out before, during or after the outage
      a.append("<A:during>");
      b.append("<B:during>");
      await restart;
      a.append("<A:after>");
      c.append("<C:after>");

      await waitUntil(onTarget, () => onTarget.every((x, i) => x.connections.length > before[i] && x.isLoaded()), {
        label: `clients of ${target} reconnected`,
        describe: () => onTarget.map((x) => x.describe()).join(" | "),
      });
      const expected = ["<A0>", "<B0>", "<C0>", "<A:during>", "<B:during>", "<A:after>", "<C:after>"];
      await waitForConvergence(all, { expected: (t) => expected.every((x) => t.includes(x)) });
      assertEachTokenOnce(a.text(), expected);

      // the restarted endpoint still serves the whole document to a newcomer
      const d = await ctx.client(doc, { name: "D", endpoint: target });
      await waitForConvergence([...all, d]);
      assertEachTokenOnce(d.text(), expected);
      assert(
        all.every((x) => x.echoes().length === 0),
        "frames echoed to their author",
      );
      ctx.note(`reconnects: ${onTarget.map((x, i) => `${x.name} ${x.connections.length - before[i]}`).join(", ")}`);
    },
  },
];
