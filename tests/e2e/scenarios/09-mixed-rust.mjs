// The Rust client (secsync-client + yrs, services/client) and the published JS client edit one
// document at once and converge: proof that the Rust client is interoperable, in both
// directions, for updates, live snapshots and loading. Needs the peer binary
// (SECSYNC_E2E_RUST_PEER); skipped without it.

import { waitForConnected, waitForConvergence, waitForFrame, waitForState, waitForSynced } from "../lib/client.mjs";
import { rustPeerBinary } from "../lib/rustpeer.mjs";
import { assertExactlyTokens, tokens } from "../lib/tokens.mjs";
import { assert, assertEqual } from "../lib/wait.mjs";

const EDITS = 15;
const SNAPSHOT_AT = 7;

/** JS edits one token at a time at full speed (each waits only for the answer to the previous
 * frame); before token SNAPSHOT_AT it asks for a snapshot, so that edit goes out as one. */
async function writeJs(client, list) {
  let snapshotFrom = null;
  for (const [i, t] of list.entries()) {
    if (i === SNAPSHOT_AT) {
      snapshotFrom = client.frames.length;
      client.requestSnapshot();
    }
    const from = client.frames.length;
    client.append(t);
    await waitForFrame(client, (f) => f.dir === "in" && /^(update|snapshot)-save/.test(f.type), {
      from,
      label: `answer for ${t}`,
    });
  }
  return snapshotFrom;
}

/** The Rust peer appends one token per update (each waits for update-saved) and sends a
 * snapshot of its state before token SNAPSHOT_AT. */
async function writeRust(peer, list) {
  let snapshot = null;
  for (const [i, t] of list.entries()) {
    if (i === SNAPSHOT_AT) snapshot = await peer.snapshot();
    await peer.insert(t);
  }
  return snapshot;
}

export default [
  {
    name: "js-and-rust-clients-converge",
    timeoutMs: 90000,
    skip: () =>
      rustPeerBinary() ? null : "SECSYNC_E2E_RUST_PEER is not set (path of the secsync-yrs-peer binary)",
    async run(ctx) {
      const doc = await ctx.newDoc();
      // the JS client creates the document: its first edit is the initial snapshot
      const js = await ctx.client(doc, { name: "JS" });
      await waitForConnected(js);
      js.append("<base>");
      await waitForSynced(js);
      // the Rust peer joins (on the next endpoint when there are several) and loads it
      const rust = await ctx.rustPeer(doc, { name: "RS" });
      await rust.waitFor("<base>");

      const jsTokens = tokens("js", EDITS);
      const rsTokens = tokens("rs", EDITS);
      const [snapshotFrom, rustSnapshot] = await Promise.all([writeJs(js, jsTokens), writeRust(rust, rsTokens)]);
      const expected = ["<base>", ...jsTokens, ...rsTokens];

      // JS: idle with everything; Rust: everything applied (its waits apply events as they come)
      await waitForConvergence([js], { expected: (t) => expected.every((x) => t.includes(x)) });
      for (const t of expected) await rust.waitFor(t);
      const text = js.text();
      assertEqual(await rust.text(), text, "the Rust peer's text");
      assertExactlyTokens(text, expected);

      // both forced snapshots were accepted, and the JS client verified and applied the Rust
      // one: live, or as recovery data when it refused a JS snapshot racing it (the gateway
      // then skips the broadcast the recovery covered), or in a `document` after the machine
      // gave up on its refused snapshots and reloaded
      await waitForFrame(js, (f) => f.dir === "in" && f.type === "snapshot-saved", {
        from: snapshotFrom,
        label: "the JS client's requested snapshot saved",
      });
      const rustSnapshotId = rustSnapshot.split(" ")[1];
      const carriesRustSnapshot = (f) =>
        f.dir === "in" && f.msg?.snapshot?.publicData?.snapshotId === rustSnapshotId;
      const received = js.frames.filter(carriesRustSnapshot).map((f) => f.type);
      assert(received.length > 0, `the JS client never received the Rust snapshot ${rustSnapshotId}`);
      const snapshotErrors = js.errors().filter((e) => /^SECSYNC_ERROR_1/.test(e));
      assertEqual(snapshotErrors.join(","), "", "the JS client's snapshot errors");
      assertEqual(js.echoes().length, 0, "frames echoed to JS");

      // a newcomer of each kind loads the result (active snapshot plus its updates)
      const lateRust = await ctx.rustPeer(doc, { name: "late-RS" });
      for (const t of expected) await lateRust.waitFor(t);
      assertEqual(await lateRust.text(), text, "the late Rust peer's text");

      // with nothing racing it, a Rust snapshot reaches the JS client as a live broadcast, and
      // a JS newcomer loads it as the active snapshot
      const from = js.frames.length;
      const finalSnapshotId = (await rust.snapshot()).split(" ")[1];
      await waitForState(js, (c) => c.activeSnapshotId() === finalSnapshotId, { label: "the final Rust snapshot active" });
      const live = js.frames.slice(from).filter((f) => f.dir === "in" && f.type !== "ephemeral-message");
      assertEqual(live.map((f) => f.type).join(","), "snapshot", "frames the JS client received for it");
      const lateJs = await ctx.client(doc, { name: "late-JS" });
      await waitForConvergence([js, lateJs]);
      assertEqual(lateJs.framesIn()[0].msg.snapshot?.publicData?.snapshotId, finalSnapshotId, "snapshot the late JS client loaded");
      assertEqual(lateJs.text(), text, "the late JS client's text");
      assertEqual(await rust.text(), text, "the Rust peer's text at the end");

      const refusals = js.framesIn("snapshot-save-failed").length + js.framesIn("update-save-failed").length;
      ctx.note(
        `mid-way Rust snapshot (${rustSnapshot}) reached JS as ${received.join("+")}; ` +
          `JS: ${js.framesOut("snapshot").length} snapshot frame(s), ${refusals} refusal(s), ` +
          `${js.connections.length} connection(s); Rust peer on ${rust.endpoint}, JS on ${js.endpoint}`,
      );
    },
  },
];
