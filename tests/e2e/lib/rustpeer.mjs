// The Rust client as a peer of the JS clients: spawns `secsync-yrs-peer` (services/client,
// secsync-client + yrs) on one document and drives it over its line protocol. The binary's
// doc comment is the protocol's reference: one command per stdin line, one answer per stdout
// line, "ok <command> [details]" or "error <reason>", the first line "ok ready <publicKey>".

import { spawn } from "node:child_process";
import { createInterface } from "node:readline";
import { sodium } from "./deps.mjs";
import { DEFAULT_WAIT_MS } from "./wait.mjs";
import { sessionKeyFor, usesTokens } from "./session.mjs";

/** Path of the peer binary, or null when the environment does not name one. */
export function rustPeerBinary() {
  return process.env.SECSYNC_E2E_RUST_PEER || null;
}

const STDERR_LINES_KEPT = 20;

export class RustPeer {
  constructor({ binary, endpoint, docId, documentKey, name = "rust", timeoutMs = DEFAULT_WAIT_MS }) {
    this.name = name;
    this.endpoint = endpoint;
    this.timeoutMs = timeoutMs;
    this.pubKey = null;
    this.exited = null;
    this.stderr = [];
    this.history = [];
    this._lines = [];
    this._readers = [];
    // Commands are answered in order; one at a time keeps each answer with its command.
    this._queue = Promise.resolve();
    this.child = spawn(
      binary,
      [
        "--endpoint",
        endpoint,
        "--doc",
        docId,
        // what getSnapshotKey returns to the JS clients, as libsodium's URL-safe unpadded base64
        "--key",
        sodium.to_base64(documentKey),
        "--timeout-ms",
        String(timeoutMs),
        // in jwt mode, a token of its own (otherwise the peer picks a random key)
        ...(usesTokens() ? ["--session-key", sessionKeyFor(docId, () => "")] : []),
      ],
      { stdio: ["pipe", "pipe", "pipe"] },
    );
    createInterface({ input: this.child.stdout }).on("line", (line) => this._deliver(line));
    createInterface({ input: this.child.stderr }).on("line", (line) => {
      this.stderr.push(line);
      if (this.stderr.length > STDERR_LINES_KEPT) this.stderr.shift();
    });
    this.child.stdin.on("error", () => {
      // the process died; its exit is reported to the reader waiting for an answer
    });
    this.child.on("error", (err) => this._end(`could not run ${binary}: ${err.message}`));
    this.child.on("exit", (code, signal) => this._end(`exited with ${code ?? signal}`));
  }

  _deliver(line) {
    const reader = this._readers.shift();
    if (reader) reader.resolve(line);
    else this._lines.push(line);
  }

  _end(reason) {
    this.exited ??= reason;
    for (const reader of this._readers.splice(0)) reader.reject(new Error(`${this.name} ${reason}`));
  }

  _nextLine(label, timeoutMs) {
    if (this._lines.length > 0) return Promise.resolve(this._lines.shift());
    if (this.exited) return Promise.reject(new Error(`${this.name} ${this.exited}`));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._readers = this._readers.filter((r) => r !== reader);
        reject(new Error(`timed out after ${timeoutMs} ms waiting for ${this.name}'s answer to ${label}`));
      }, timeoutMs);
      const reader = {
        resolve: (line) => {
          clearTimeout(timer);
          resolve(line);
        },
        reject: (err) => {
          clearTimeout(timer);
          reject(err);
        },
      };
      this._readers.push(reader);
    });
  }

  static _parse(label, line) {
    if (line.startsWith("ok ")) return line.slice(3);
    if (line.startsWith("error ")) throw new Error(`${label}: ${line.slice(6)}`);
    throw new Error(`${label}: unexpected answer ${JSON.stringify(line)}`);
  }

  /** Resolves once connected (the document loaded), with the peer's public key. */
  async ready() {
    const answer = RustPeer._parse(`${this.name} start`, await this._nextLine("start", this.timeoutMs));
    if (!answer.startsWith("ready ")) throw new Error(`${this.name} start: unexpected ${answer}`);
    this.pubKey = answer.slice("ready ".length);
    return this.pubKey;
  }

  /** Sends one command line; resolves with the answer after "ok ", rejects on "error". */
  command(line) {
    const label = `${this.name} ${line.split(" ")[0]}`;
    const run = async () => {
      if (this.exited) throw new Error(`${this.name} ${this.exited}`);
      this.child.stdin.write(`${line}\n`);
      // The peer bounds each of its own waits by timeoutMs; a snapshot may retry several
      // times, so allow it a few rounds before deciding the peer hangs.
      const answer = RustPeer._parse(label, await this._nextLine(label, this.timeoutMs * 4));
      this.history.push(`${line} -> ${answer}`);
      return answer;
    };
    const result = this._queue.then(run);
    this._queue = result.catch(() => {});
    return result;
  }

  insert(text) {
    return this.command(`insert ${JSON.stringify(text)}`);
  }

  snapshot() {
    return this.command("snapshot");
  }

  /** Resolves once the peer's document text contains `text`. */
  waitFor(text) {
    return this.command(`wait ${JSON.stringify(text)}`);
  }

  async text() {
    const answer = await this.command("text");
    return JSON.parse(answer.slice("text ".length));
  }

  describe() {
    const last = this.history.at(-1) ?? "no command yet";
    const stderr = this.stderr.slice(-5).join(" / ");
    return `${this.name}: ${this.exited ?? "running"} endpoint=${this.endpoint} last=[${last}] stderr=[${stderr}]`;
  }

  /** Kills the process (idempotent); resolves once it is gone. */
  stop() {
    if (!this.exited && this.child.exitCode === null && this.child.signalCode === null) {
      this.child.kill("SIGKILL");
    }
    if (this.exited) return Promise.resolve();
    return new Promise((resolve) => this.child.once("exit", resolve));
  }
}
