// What a scenario gets: fresh documents, clients, Rust peers and raw connections spread over
// the endpoints round-robin per document, the optional restart hook, and cleanup of everything
// it created.

import { spawn } from "node:child_process";
import { createClient, resumeClient } from "./client.mjs";
import { secsync, sodium, sodiumReady } from "./deps.mjs";
import { openRaw } from "./raw.mjs";
import { RustPeer, rustPeerBinary } from "./rustpeer.mjs";

export function restartCommand(index) {
  return process.env[`SECSYNC_E2E_RESTART_CMD_${index}`] || null;
}

export class ScenarioContext {
  constructor({ endpoints, name }) {
    this.endpoints = endpoints;
    this.scenario = name;
    this.clients = [];
    this.raws = [];
    this.peers = [];
    this.notes = [];
    this.children = new Set();
    this.closed = false;
  }

  /** A new document: random id (like generateId) and its symmetric key. */
  async newDoc(label = "doc") {
    await sodiumReady();
    return { label, docId: secsync.generateId(sodium), key: sodium.randombytes_buf(32), next: 0 };
  }

  /** Next endpoint for this document: its clients are spread round-robin. */
  endpointFor(doc) {
    const endpoint = this.endpoints[doc.next % this.endpoints.length];
    doc.next += 1;
    return endpoint;
  }

  #track(list, item) {
    if (this.closed) {
      item.stop?.();
      item.close?.();
      throw new Error("scenario already finished");
    }
    list.push(item);
    return item;
  }

  async client(doc, options = {}) {
    const client = await createClient({
      endpoint: options.endpoint ?? this.endpointFor(doc),
      docId: doc.docId,
      documentKey: doc.key,
      ...options,
    });
    return this.#track(this.clients, client);
  }

  /** A client restarted from `persisted` (see Client.persist), resuming in delta mode. */
  async resume(doc, persisted, options = {}) {
    const client = await resumeClient(
      { endpoint: options.endpoint ?? this.endpointFor(doc), docId: doc.docId, documentKey: doc.key, ...options },
      persisted,
    );
    return this.#track(this.clients, client);
  }

  async raw(doc, options = {}) {
    const conn = await openRaw(options.endpoint ?? this.endpointFor(doc), doc.docId, options);
    return this.#track(this.raws, conn);
  }

  /** The Rust client (SECSYNC_E2E_RUST_PEER) on this document, connected and loaded; it is
   * killed after the scenario whatever happens. */
  async rustPeer(doc, options = {}) {
    const binary = rustPeerBinary();
    if (!binary) throw new Error("SECSYNC_E2E_RUST_PEER is not set");
    // tracked before it connects, so a failed start is cleaned up too
    const peer = this.#track(
      this.peers,
      new RustPeer({
        ...options,
        binary,
        endpoint: options.endpoint ?? this.endpointFor(doc),
        docId: doc.docId,
        documentKey: doc.key,
      }),
    );
    await peer.ready();
    return peer;
  }

  /** Record something worth reporting even when the scenario passes. */
  note(text) {
    this.notes.push(text);
  }

  /** Indexes of endpoints that have a restart command. */
  restartableEndpoints() {
    return this.endpoints.map((_, i) => i).filter((i) => restartCommand(i));
  }

  /** Run SECSYNC_E2E_RESTART_CMD_<index> through the shell and wait for it to exit 0. */
  restartEndpoint(index) {
    const command = restartCommand(index);
    if (!command) throw new Error(`no SECSYNC_E2E_RESTART_CMD_${index}`);
    return new Promise((resolve, reject) => {
      const child = spawn("sh", ["-c", command], {
        stdio: ["ignore", "ignore", "pipe"],
        env: { ...process.env, SECSYNC_E2E_ENDPOINT: this.endpoints[index], SECSYNC_E2E_ENDPOINT_INDEX: String(index) },
      });
      this.children.add(child);
      let stderr = "";
      child.stderr.on("data", (d) => {
        stderr += d;
      });
      child.on("error", reject);
      child.on("exit", (code, signal) => {
        this.children.delete(child);
        if (code === 0) resolve();
        else reject(new Error(`restart command ${index} exited with ${code ?? signal}: ${stderr.trim().slice(0, 200)}`));
      });
    });
  }

  describeAll() {
    return [...this.clients, ...this.peers].map((c) => c.describe());
  }

  /** Stop every client and connection and kill every Rust peer; let a running restart command
   * finish (killing it half-way could leave the endpoint down for all later scenarios), up to
   * `graceMs`. */
  async cleanup(graceMs = 30000) {
    this.closed = true;
    for (const c of this.clients) c.stop();
    for (const r of this.raws) r.close();
    const pending = [
      ...[...this.children].map((child) => new Promise((resolve) => child.once("exit", resolve))),
      ...this.peers.map((p) => p.stop()),
    ];
    if (pending.length > 0) {
      let timer;
      await Promise.race([Promise.all(pending), new Promise((resolve) => (timer = setTimeout(resolve, graceMs)))]);
      clearTimeout(timer);
    }
  }
}
