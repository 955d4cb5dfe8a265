// secsync-server 0.5.0 (createWebSocketConnection) on loopback with an in-memory store.
// Used to validate the e2e suite (tests/e2e) and as the benchmark baseline.
//
// Environment:
//   PORT                 port to listen on (0 = any free port; default 0)
//   HOST                 address to bind (default 127.0.0.1; keep it on loopback)
//   REF_STATE_FILE       if set: state is loaded from this JSON file at start and written on
//                        SIGTERM/SIGINT, so a restart keeps the documents (the example backend
//                        keeps them in Postgres)
//   REF_LOGGING          secsync-server's logging option: "off" (default) or "error"
//   REF_EXIT_ON_UNHANDLED=1  exit on an unhandled rejection like the example backend
//                        (make-promises-safe). By default it is logged and the server keeps
//                        running, so one junk frame cannot take the whole suite down.
//
// Prints exactly one line "listening ws://HOST:PORT" on stdout once it accepts connections.

import { existsSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import { createServer } from "node:http";
import { createRequire } from "node:module";
import { WebSocketServer } from "ws";
import { createMemoryStore } from "./store.mjs";

const host = process.env.HOST || "127.0.0.1";
const port = Number.parseInt(process.env.PORT || "0", 10);
const stateFile = process.env.REF_STATE_FILE || "";
const logging = process.env.REF_LOGGING === "error" ? "error" : "off";

process.on("unhandledRejection", (reason) => {
  // secsync-server parses frames with an unguarded JSON.parse inside an async handler.
  console.error("unhandled rejection:", reason instanceof Error ? reason.message : reason);
  if (process.env.REF_EXIT_ON_UNHANDLED === "1") {
    process.exit(1);
  }
});

// CommonJS on purpose: libsodium-wrappers 0.7.16 ships a broken ESM entry point, and this
// must be the very instance secsync-server uses. secsync-server calls sodium synchronously
// and never awaits readiness itself.
const require = createRequire(import.meta.url);
const sodium = require("libsodium-wrappers");
const { createWebSocketConnection } = require("secsync-server");
await sodium.ready;

const store = createMemoryStore();
if (stateFile && existsSync(stateFile)) {
  store.load(JSON.parse(readFileSync(stateFile, "utf8")));
}

const webSocketServer = new WebSocketServer({ noServer: true });
webSocketServer.on(
  "connection",
  createWebSocketConnection({
    getDocument: store.getDocument,
    createSnapshot: store.createSnapshot,
    createUpdate: store.createUpdate,
    hasAccess: async () => true,
    hasBroadcastAccess: async ({ websocketSessionKeys }) => websocketSessionKeys.map(() => true),
    logging,
  }),
);

const server = createServer((req, res) => {
  res.writeHead(426, { "content-type": "text/plain" });
  res.end("websocket only\n");
});
server.on("upgrade", (request, socket, head) => {
  webSocketServer.handleUpgrade(request, socket, head, (ws) => {
    webSocketServer.emit("connection", ws, request);
  });
});

function shutdown() {
  if (stateFile) {
    // write-then-rename so a crash mid-write never leaves a truncated state file
    writeFileSync(`${stateFile}.tmp`, JSON.stringify(store.dump()));
    renameSync(`${stateFile}.tmp`, stateFile);
  }
  for (const client of webSocketServer.clients) {
    client.terminate();
  }
  server.close(() => process.exit(0));
  // connections that do not close in time must not block the restart
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on("SIGTERM", shutdown);
process.on("SIGINT", shutdown);

server.listen(port, host, () => {
  const { address, port: actualPort } = server.address();
  console.log(`listening ws://${address}:${actualPort}`);
});
