// One place that loads the client libraries, so every module shares the same instances.
//
// CommonJS on purpose: libsodium-wrappers 0.7.16 ships a broken ESM entry point, and secsync
// (which has no "exports" map) loads xstate and libsodium through require(). Importing xstate
// as ESM here would give a second xstate instance next to the one secsync's machine uses.

import { createRequire } from "node:module";

const require = createRequire(import.meta.url);

export const sodium = require("libsodium-wrappers");
export const secsync = require("secsync");
export const xstate = require("xstate");
export const canonicalize = require("canonicalize");

let ready;
/** Resolves once libsodium is initialised; call before anything touches crypto. */
export function sodiumReady() {
  ready ??= sodium.ready;
  return ready;
}

export const SECSYNC_VERSION = require("secsync/package.json").version;
