// secsync-server 0.5.0 (createWebSocketConnection) on loopback with the example backend's store
// on PostgreSQL (pgstore.mjs): the benchmark baseline "reference on Postgres". The in-memory
// baseline is bench/reference/server.mjs.
//
// Environment:
//   DATABASE_URL         postgres://… of a database with schema.sql applied (required)
//   PORT                 port to listen on (0 = any free port; default 0)
//   HOST                 address to bind (default 127.0.0.1; keep it on loopback)
//   BASELINE_PG_POOL     connections in the pool (default 5, Prisma's default on 2 cores)
//
// Prints exactly one line "listening ws://HOST:PORT" on stdout once it accepts connections.

import { createServer } from "node:http";
import { createRequire } from "node:module";
import { WebSocketServer } from "ws";
import { createPostgresStore } from "./pgstore.mjs";

const host = process.env.HOST || "127.0.0.1";
const port = Number.parseInt(process.env.PORT || "0", 10);
const connectionString = process.env.DATABASE_URL;
if (!connectionString) {
  console.error("DATABASE_URL is required");
  process.exit(2);
}
const poolSize = Number.parseInt(process.env.BASELINE_PG_POOL || "5", 10);

process.on("unhandledRejection", (reason) => {
  // secsync-server parses frames with an unguarded JSON.parse inside an async handler.
  console.error("unhandled rejection:", reason instanceof Error ? reason.message : reason);
});

const require = createRequire(import.meta.url);
const sodium = require("libsodium-wrappers");
const { createWebSocketConnection } = require("secsync-server");
await sodium.ready;

const store = createPostgresStore({ connectionString, poolSize });

const webSocketServer = new WebSocketServer({ noServer: true });
webSocketServer.on(
  "connection",
  createWebSocketConnection({
    getDocument: store.getDocument,
    createSnapshot: store.createSnapshot,
    createUpdate: store.createUpdate,
    hasAccess: async () => true,
    hasBroadcastAccess: async ({ websocketSessionKeys }) => websocketSessionKeys.map(() => true),
    logging: "off",
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
  for (const client of webSocketServer.clients) {
    client.terminate();
  }
  server.close(() => store.close().finally(() => process.exit(0)));
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on("SIGTERM", shutdown);
process.on("SIGINT", shutdown);

server.listen(port, host, () => {
  const { address, port: actualPort } = server.address();
  console.log(`listening ws://${address}:${actualPort}`);
});
