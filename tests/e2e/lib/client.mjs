// A real secsync 0.5 client: createSyncMachine wired to a Y.Doc exactly like secsync's own
// Yjs binding (secsync-react-yjs 0.5 `useYjsSync`), minus React and awareness.
//
// - Y.Doc "updateV2" events whose origin is not "secsync-remote" become
//   send({ type: "ADD_CHANGES", data: [update] }).
// - applySnapshot / applyChanges use Y.applyUpdateV2(doc, bytes, "secsync-remote").
// - Changes are (de)serialised with secsync's serializeUint8ArrayUpdates /
//   deserializeUint8ArrayUpdates.
// - getSnapshotKey always returns the document key, getNewSnapshotData encodes the whole doc
//   with encodeStateAsUpdateV2 and empty publicData, isValidClient accepts everyone (the
//   machine's default rejects everyone).
//
// The machine opens its connection with the global `WebSocket`, which Node 20 lacks; this
// module installs `ws` there, wrapped so that every frame each client sends and receives is
// recorded (the socket is matched to its client by the unique sessionKey in the URL).

import * as Y from "yjs";
import WebSocket from "ws";
import { secsync, sodium, sodiumReady, xstate } from "./deps.mjs";
import { Signal, waitUntil } from "./wait.mjs";
import { sessionKeyFor } from "./session.mjs";

const REMOTE_ORIGIN = "secsync-remote";
const TEXT_NAME = "text";

// sessionKey -> Client, filled before the machine opens a socket
const clientsBySessionKey = new Map();

class TappedWebSocket extends WebSocket {
  constructor(url, protocols) {
    super(url, protocols);
    let sessionKey = null;
    try {
      sessionKey = new URL(url).searchParams.get("sessionKey");
    } catch {
      // an unparsable URL just goes untapped
    }
    clientsBySessionKey.get(sessionKey)?._attachSocket(this, String(url));
  }
}

if (globalThis.WebSocket !== TappedWebSocket) {
  globalThis.WebSocket = TappedWebSocket;
}

/** What a client frame is, judged the way the server classifies it (PROTOCOL.md 4). */
export function classifyOutgoing(msg) {
  if (msg?.publicData?.snapshotId) return "snapshot";
  if (msg?.publicData?.refSnapshotId) return "update";
  return "ephemeral";
}

let clientCounter = 0;

export class Client {
  constructor(options) {
    this.name = options.name ?? `client${++clientCounter}`;
    this.endpoint = options.endpoint;
    this.docId = options.docId;
    this.documentKey = options.documentKey;
    this.keyPair = options.signatureKeyPair ?? sodium.crypto_sign_keypair();
    this.pubKey = sodium.to_base64(this.keyPair.publicKey);
    // unique per client so the socket tap can find its owner (a token in jwt mode)
    this.sessionKey =
      options.websocketSessionKey ?? sessionKeyFor(this.docId, () => secsync.generateId(sodium));
    this.signal = new Signal();
    /** every frame: { dir: "in"|"out", conn, type, msg, raw, at } */
    this.frames = [];
    /** every socket the machine opened: { index, url, ws, opened, closed, closeCode } */
    this.connections = [];
    /** decrypted ephemeral messages: { text, bytes, from } */
    this.ephemeral = [];
    /** what an app would persist (onDocumentUpdated / onPendingChangesUpdated) */
    this.persisted = { knownSnapshotInfo: null, pendingChanges: [] };
    this.stopped = false;
    this._snapshotWanted = false;
    this._snapshotEvery = options.snapshotEvery ?? 0;

    this.yDoc = new Y.Doc();
    if (options.initialState) {
      // restored local state, applied before the listener exists so it is not re-sent
      Y.applyUpdateV2(this.yDoc, options.initialState, REMOTE_ORIGIN);
    }
    this.ytext = this.yDoc.getText(TEXT_NAME);

    const input = {
      documentId: this.docId,
      signatureKeyPair: this.keyPair,
      websocketEndpoint: this.endpoint,
      websocketSessionKey: this.sessionKey,
      sodium,
      logging: options.logging ?? "off",
      getSnapshotKey: async () => this.documentKey,
      getNewSnapshotData: async () => ({
        data: Y.encodeStateAsUpdateV2(this.yDoc),
        key: this.documentKey,
        publicData: {},
      }),
      shouldSendSnapshot: ({ snapshotUpdatesCount }) =>
        this._snapshotWanted || (this._snapshotEvery > 0 && snapshotUpdatesCount >= this._snapshotEvery),
      isValidClient: async () => true,
      applySnapshot: (data) => {
        Y.applyUpdateV2(this.yDoc, data, REMOTE_ORIGIN);
      },
      applyChanges: (changes) => {
        for (const change of changes) Y.applyUpdateV2(this.yDoc, change, REMOTE_ORIGIN);
      },
      applyEphemeralMessage: (bytes, authorPublicKey) => {
        this.ephemeral.push({ text: sodium.to_string(bytes), bytes, from: authorPublicKey });
        this.signal.notify();
      },
      serializeChanges: (changes) => secsync.serializeUint8ArrayUpdates(changes, sodium),
      deserializeChanges: (serialized) => secsync.deserializeUint8ArrayUpdates(serialized, sodium),
      onDocumentUpdated: ({ knownSnapshotInfo }) => {
        this.persisted.knownSnapshotInfo = structuredClone(knownSnapshotInfo);
      },
      onPendingChangesUpdated: (changes) => {
        this.persisted.pendingChanges = [...changes];
      },
    };
    if (options.loadDocumentParams) input.loadDocumentParams = options.loadDocumentParams;
    if (options.pendingChanges) input.pendingChanges = options.pendingChanges;

    this._onYUpdate = (update, origin) => {
      if (origin !== REMOTE_ORIGIN && !this.stopped) {
        this.actor.send({ type: "ADD_CHANGES", data: [update] });
      }
      this.signal.notify();
    };
    this.yDoc.on("updateV2", this._onYUpdate);

    this.actor = xstate.createActor(secsync.createSyncMachine(), { input });
    this.actor.subscribe({
      next: () => this.signal.notify(),
      error: (err) => {
        this.actorError = err;
        this.signal.notify();
      },
    });
    clientsBySessionKey.set(this.sessionKey, this);
  }

  start() {
    this.actor.start();
    return this;
  }

  // ---- socket tap -------------------------------------------------------------------

  _attachSocket(ws, url) {
    const conn = { index: this.connections.length, url, ws, opened: false, closed: false, closeCode: null };
    this.connections.push(conn);
    // registered before the machine's own listeners, so a frame is recorded before it is processed
    ws.on("open", () => {
      conn.opened = true;
      this.signal.notify();
    });
    ws.on("message", (data, isBinary) => {
      const raw = isBinary ? data : data.toString();
      let msg = null;
      try {
        msg = JSON.parse(raw);
      } catch {
        // kept as raw text; the machine will choke on it, which the scenario then sees
      }
      this.frames.push({ dir: "in", conn: conn.index, type: msg?.type ?? "unparsable", msg, raw, at: Date.now() });
      // a requested snapshot stays requested until one of ours is accepted
      if (msg?.type === "snapshot-saved") this._snapshotWanted = false;
      this.signal.notify();
    });
    ws.on("close", (code) => {
      conn.closed = true;
      conn.closeCode = code;
      this.signal.notify();
    });
    ws.on("error", () => {
      // the machine's own "error" listener handles it; this only keeps ws from throwing
    });
    const send = ws.send.bind(ws);
    ws.send = (data, ...rest) => {
      let msg = null;
      try {
        msg = JSON.parse(data);
      } catch {
        // the real client only sends JSON
      }
      this.frames.push({ dir: "out", conn: conn.index, type: classifyOutgoing(msg), msg, raw: data, at: Date.now() });
      this.signal.notify();
      return send(data, ...rest);
    };
  }

  /** Abruptly cut the current socket (like a network drop); the machine reconnects itself. */
  dropConnection() {
    const conn = this.connections.at(-1);
    if (conn && !conn.closed) conn.ws.terminate();
  }

  // ---- editing and events --------------------------------------------------------------

  text() {
    return this.ytext.toString();
  }

  append(str) {
    this.ytext.insert(this.ytext.length, str);
  }

  insert(index, str) {
    this.ytext.insert(index, str);
  }

  /** From the next change on, changes are sent as snapshots until the server accepts one of
   * this client's snapshots. (The machine itself gives up after 5 refusals in a row and
   * reconnects; a one-shot request would then silently turn into an update.) */
  requestSnapshot() {
    this._snapshotWanted = true;
  }

  sendEphemeral(text) {
    this.actor.send({ type: "ADD_EPHEMERAL_MESSAGE", data: sodium.from_string(text) });
  }

  disconnect() {
    this.actor.send({ type: "DISCONNECT" });
  }

  connect() {
    this.actor.send({ type: "CONNECT" });
  }

  // ---- observation -----------------------------------------------------------------------

  get snapshot() {
    return this.actor.getSnapshot();
  }

  get context() {
    return this.actor.getSnapshot().context;
  }

  stateValue() {
    return JSON.stringify(this.actor.getSnapshot().value);
  }

  matches(state) {
    return this.actor.getSnapshot().matches(state);
  }

  isFailed() {
    return this.matches("failed") || this.matches("noAccess");
  }

  /** Connected and the `document` frame fully applied. */
  isLoaded() {
    return this.matches("connected") && this.context._documentDecryptionState === "complete";
  }

  /** Loaded, nothing pending, nothing in flight, nothing unprocessed. */
  isSynced() {
    const ctx = this.context;
    return (
      this.isLoaded() &&
      this.matches({ connected: "idle" }) &&
      ctx._pendingChangesQueue.length === 0 &&
      ctx._updatesInFlight.length === 0 &&
      ctx._snapshotInFlight === null &&
      ctx._incomingQueue.length === 0
    );
  }

  activeSnapshotInfo() {
    return this.context._snapshotInfosWithUpdateClocks.at(-1) ?? null;
  }

  activeSnapshotId() {
    return this.activeSnapshotInfo()?.snapshotId ?? null;
  }

  errors() {
    return (this.context._snapshotAndUpdateErrors || []).map((e) => e?.message ?? String(e));
  }

  framesIn(type) {
    return this.frames.filter((f) => f.dir === "in" && (type === undefined || f.type === type));
  }

  framesOut(type) {
    return this.frames.filter((f) => f.dir === "out" && (type === undefined || f.type === type));
  }

  /** Frames the server relayed back although this client authored them (must be none). */
  echoes() {
    const relayed = new Set(["update", "ephemeral-message"]);
    return this.frames.filter(
      (f) =>
        f.dir === "in" &&
        ((relayed.has(f.type) && f.msg?.publicData?.pubKey === this.pubKey) ||
          (f.type === "snapshot" && f.msg?.snapshot?.publicData?.pubKey === this.pubKey)),
    );
  }

  /** Everything a restarted app would need: local CRDT state plus what secsync reported. */
  persist() {
    return {
      state: Y.encodeStateAsUpdateV2(this.yDoc),
      knownSnapshotInfo: structuredClone(this.persisted.knownSnapshotInfo),
      pendingChanges: [...this.persisted.pendingChanges],
      signatureKeyPair: this.keyPair,
    };
  }

  describe() {
    const ctx = this.context;
    const text = this.text();
    return (
      `${this.name}: state=${this.stateValue()} decryption=${ctx._documentDecryptionState} ` +
      `pending=${ctx._pendingChangesQueue.length} inFlight=${ctx._updatesInFlight.length}` +
      `${ctx._snapshotInFlight ? "+snapshot" : ""} conns=${this.connections.length} ` +
      `errors=[${this.errors().join(",")}] text=${JSON.stringify(text.length > 120 ? `${text.slice(0, 120)}…` : text)}`
    );
  }

  /** Stop the machine and close its socket; pending waits on this client fail. */
  stop() {
    if (this.stopped) return;
    this.stopped = true;
    try {
      this.actor.send({ type: "DISCONNECT" });
      this.actor.stop();
    } catch {
      // already stopped
    }
    for (const conn of this.connections) {
      if (!conn.closed) conn.ws.terminate();
    }
    this.yDoc.off("updateV2", this._onYUpdate);
    clientsBySessionKey.delete(this.sessionKey);
    this.signal.close(`${this.name} was stopped`);
  }
}

/** Create and start a client. Options: endpoint, docId, documentKey, and optionally name,
 * signatureKeyPair, websocketSessionKey, loadDocumentParams, pendingChanges, initialState,
 * snapshotEvery (send a snapshot once the active one has that many updates), logging. */
export async function createClient(options) {
  await sodiumReady();
  return new Client(options).start();
}

/** Restart a client from what `client.persist()` returned, resuming in delta mode. */
export async function resumeClient(options, persisted) {
  return createClient({
    ...options,
    signatureKeyPair: persisted.signatureKeyPair,
    initialState: persisted.state,
    pendingChanges: persisted.pendingChanges,
    loadDocumentParams: persisted.knownSnapshotInfo
      ? { knownSnapshotInfo: persisted.knownSnapshotInfo, mode: "delta" }
      : undefined,
  });
}

// ---- waits ----------------------------------------------------------------------------------

function failFast(client, allowFailed) {
  if (client.stopped) throw new Error(`${client.name} was stopped`);
  if (client.actorError) throw new Error(`${client.name} actor error: ${client.actorError.message}`);
  if (!allowFailed && client.isFailed()) {
    throw new Error(`${client.name} entered ${client.stateValue()}: ${client.errors().join(",") || "no error recorded"}`);
  }
}

/** Wait until predicate(client) holds. Fails at once if the client enters failed/noAccess. */
export function waitForState(client, predicate, { timeoutMs, label = "state", allowFailed = false } = {}) {
  return waitUntil(
    client,
    () => {
      if (allowFailed && predicate(client)) return true;
      failFast(client, allowFailed);
      return predicate(client);
    },
    { timeoutMs, label: `${client.name} ${label}`, describe: () => client.describe() },
  );
}

export function waitForConnected(client, opts = {}) {
  return waitForState(client, (c) => c.isLoaded(), { label: "connected and loaded", ...opts });
}

export function waitForSynced(client, opts = {}) {
  return waitForState(client, (c) => c.isSynced(), { label: "synced", ...opts });
}

/** `expected` is the exact text, or a predicate on the text. */
export function waitForText(client, expected, opts = {}) {
  const ok = typeof expected === "function" ? expected : (t) => t === expected;
  const label = typeof expected === "function" ? "text condition" : `text ${JSON.stringify(expected)}`;
  return waitForState(client, (c) => ok(c.text()), { label, ...opts });
}

/** Wait for a received frame matching predicate(frame), searching from frame index `from`. */
export function waitForFrame(client, predicate, { from = 0, timeoutMs, label = "frame" } = {}) {
  return waitForState(
    client,
    (c) => {
      for (let i = from; i < c.frames.length; i++) if (predicate(c.frames[i])) return c.frames[i];
      return null;
    },
    { timeoutMs, label },
  );
}

/** All clients loaded, idle with nothing in flight, and showing the same text. */
export function waitForConvergence(clients, { timeoutMs, expected } = {}) {
  return waitUntil(
    clients,
    () => {
      for (const c of clients) failFast(c, false);
      const first = clients[0].text();
      const same = clients.every((c) => c.isSynced() && c.text() === first);
      if (!same) return false;
      return expected === undefined || (typeof expected === "function" ? expected(first) : first === expected);
    },
    {
      timeoutMs,
      label: `convergence of ${clients.map((c) => c.name).join(",")}`,
      describe: () => clients.map((c) => c.describe()).join(" | "),
    },
  );
}

export function waitForEphemeral(client, text, opts = {}) {
  return waitForState(client, (c) => c.ephemeral.some((e) => e.text === text), {
    label: `ephemeral ${JSON.stringify(text)}`,
    ...opts,
  });
}

/** Both clients proved their ephemeral sessions to each other (PROTOCOL.md 2.8). */
export function waitForEphemeralSession(a, b, opts = {}) {
  const knows = (x, y) => Boolean(x.context._ephemeralMessagesSession?.validSessions?.[y.pubKey]);
  return waitUntil([a, b], () => knows(a, b) && knows(b, a), {
    label: `ephemeral session ${a.name}<->${b.name}`,
    describe: () => `${a.describe()} | ${b.describe()}`,
    ...opts,
  });
}
