// Session keys for the harness's clients: unique random ids, or — when the server checks
// tokens (`--auth jwt`) — a signed token per client.
//
// With SECSYNC_E2E_JWT_SECRET_FILE set (the gateway's --jwt-key-file holding an HS256 secret),
// every client gets its own HS256 JWT for its document: `{doc, access: "read-write", exp, iat,
// jti}` (claims as README.md "Access control" documents them). The random `jti` keeps keys
// unique, which the socket tap relies on to find a socket's owner.

import { createHmac, randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";

let secret;

function jwtSecret() {
  const file = process.env.SECSYNC_E2E_JWT_SECRET_FILE;
  if (!file) return null;
  if (secret === undefined) {
    const bytes = readFileSync(file);
    // The gateway ignores one trailing line break in a secret file.
    let end = bytes.length;
    if (end > 0 && bytes[end - 1] === 0x0a) end -= 1;
    if (end > 0 && bytes[end - 1] === 0x0d) end -= 1;
    secret = bytes.subarray(0, end);
  }
  return secret;
}

const b64url = (value) => Buffer.from(value).toString("base64url");

/** An HS256 JWT over `claims`. */
export function signJwt(claims, key) {
  const body = `${b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }))}.${b64url(JSON.stringify(claims))}`;
  return `${body}.${createHmac("sha256", key).update(body).digest("base64url")}`;
}

/** Whether clients get tokens (the suite runs against `--auth jwt`). */
export function usesTokens() {
  return jwtSecret() !== null;
}

/**
 * The session key for a new client of `docId`: a fresh token valid for an hour in jwt mode,
 * `fallback()` (a random id) otherwise.
 */
export function sessionKeyFor(docId, fallback) {
  const key = jwtSecret();
  if (key === null) return fallback();
  const now = Math.floor(Date.now() / 1000);
  return signJwt(
    { doc: docId, access: "read-write", iat: now, exp: now + 3600, jti: randomBytes(12).toString("base64url") },
    key,
  );
}
