// A bare WebSocket speaking the secsync wire protocol by hand (PROTOCOL.md 3-5), for
// scenarios that need exact bytes. Frame builders live in frames.mjs (re-exported here).

import WebSocket from "ws";
import { secsync, sodium, sodiumReady } from "./deps.mjs";
import { Signal, waitUntil } from "./wait.mjs";
import { sessionKeyFor } from "./session.mjs";

export * from "./frames.mjs";

/** The URL the real client builds (PROTOCOL.md 3.1); clocks are the only encoded part. */
export function documentUrl(endpoint, docId, { sessionKey, mode = "complete", knownSnapshotId, knownSnapshotUpdateClocks } = {}) {
  let url = `${endpoint}/${docId}?sessionKey=${sessionKey}&mode=${mode}`;
  if (knownSnapshotId !== undefined) url += `&knownSnapshotId=${knownSnapshotId}`;
  if (knownSnapshotUpdateClocks !== undefined) {
    url += `&knownSnapshotUpdateClocks=${encodeURIComponent(JSON.stringify(knownSnapshotUpdateClocks))}`;
  }
  return url;
}

let rawCounter = 0;

export class RawConnection {
  constructor(url, name) {
    this.url = url;
    this.name = name ?? `raw${++rawCounter}`;
    this.signal = new Signal();
    /** received frames: { type, msg, raw, at } */
    this.frames = [];
    this.closed = false;
    this.closeCode = null;
    this.ws = new WebSocket(url);
    this.ws.on("message", (data, isBinary) => {
      const raw = isBinary ? data : data.toString();
      let msg = null;
      try {
        msg = JSON.parse(raw);
      } catch {
        // kept raw; a scenario may assert on it
      }
      this.frames.push({ type: msg?.type ?? "unparsable", msg, raw, at: Date.now() });
      this.signal.notify();
    });
    this.ws.on("close", (code) => {
      this.closed = true;
      this.closeCode = code;
      this.signal.notify();
    });
    this.ws.on("error", (err) => {
      this.error = err;
      this.signal.notify();
    });
  }

  /** The first frame the server sent (normally `document`). */
  get first() {
    return this.frames[0] ?? null;
  }

  /** Index to pass as `from` so a later wait only looks at newer frames. */
  mark() {
    return this.frames.length;
  }

  /** Send an object as JSON text, or a string / Buffer exactly as given. */
  send(frame, { binary = false } = {}) {
    const data = typeof frame === "string" || Buffer.isBuffer(frame) ? frame : JSON.stringify(frame);
    this.ws.send(data, { binary });
  }

  /** Wait for a frame with predicate(frame) at index >= from; resolves with the frame. */
  waitFor(predicate, { from = 0, timeoutMs, label = "frame" } = {}) {
    return waitUntil(
      this,
      () => {
        for (let i = from; i < this.frames.length; i++) if (predicate(this.frames[i])) return this.frames[i];
        if (this.closed) throw new Error(`${this.name} closed (code ${this.closeCode}) while waiting for ${label}`);
        return null;
      },
      {
        timeoutMs,
        label: `${this.name} ${label}`,
        describe: () => `received types: [${this.frames.slice(from).map((f) => f.type).join(",")}]`,
      },
    );
  }

  waitForType(type, opts = {}) {
    return this.waitFor((f) => f.type === type, { label: `"${type}" frame`, ...opts });
  }

  /** Frames at index >= from whose type is in `types` (e.g. anything relayed). */
  since(from, types) {
    return this.frames.slice(from).filter((f) => !types || types.includes(f.type));
  }

  waitForClose(opts = {}) {
    return waitUntil(this, () => this.closed, { label: `${this.name} close`, ...opts });
  }

  close() {
    if (!this.closed) this.ws.terminate();
    this.signal.close(`${this.name} was closed`);
  }
}

/**
 * Connect to `${endpoint}/${docId}?sessionKey=…&mode=…` and wait for the first frame.
 * Resolves with the connection; check `conn.first.type` for `document` vs an error.
 */
export async function openRaw(endpoint, docId, options = {}) {
  await sodiumReady();
  const sessionKey = options.sessionKey ?? sessionKeyFor(docId, () => secsync.generateId(sodium));
  const conn = new RawConnection(documentUrl(endpoint, docId, { ...options, sessionKey }), options.name);
  await waitUntil(
    conn,
    () => {
      if (conn.frames.length > 0) return true;
      if (conn.closed) throw new Error(`${conn.name}: closed (code ${conn.closeCode}) before the first frame`);
      if (conn.error && conn.ws.readyState === WebSocket.CLOSED) throw conn.error;
      return false;
    },
    { timeoutMs: options.timeoutMs, label: `${conn.name} first frame` },
  );
  return conn;
}
