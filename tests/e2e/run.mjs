#!/usr/bin/env node
// Runs the end-to-end scenarios against running server endpoints.
//
// Environment:
//   SECSYNC_E2E_ENDPOINTS            required; comma-separated ws:// base URLs. The clients of
//                                    each document are spread over them round-robin.
//   SECSYNC_E2E_FILTER               optional; comma-separated substrings, a scenario runs if
//                                    its name contains one of them
//   SECSYNC_E2E_SCENARIO_TIMEOUT_MS  per-scenario limit (default 60000; scenarios may ask for more)
//   SECSYNC_E2E_WAIT_TIMEOUT_MS      default limit of a single wait (default 15000)
//   SECSYNC_E2E_RESTART_CMD_<i>      optional shell command that restarts endpoint i and exits 0
//                                    once it accepts connections again; scenarios needing it
//                                    are skipped without it
//   SECSYNC_E2E_RUST_PEER            optional; path of the secsync-yrs-peer binary (the Rust
//                                    client); scenarios needing it are skipped without it
//   SECSYNC_E2E_FAIL_ON_SKIP=1       count skipped scenarios as failed
//   SECSYNC_E2E_VERBOSE=1            print client diagnostics for failures on stderr
//
// stdout: one line per scenario ("ok - name", "FAIL - name: reason", "skipped - name: reason"),
// then exactly "N passed, M failed". Exit status 1 if anything failed, 2 for a usage error
// (no endpoints, or a filter that matches no scenario).

import { readdirSync } from "node:fs";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { ScenarioContext } from "./lib/context.mjs";
import { sodiumReady } from "./lib/deps.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));

function parseEndpoints() {
  const raw = process.env.SECSYNC_E2E_ENDPOINTS || "";
  const endpoints = raw
    .split(",")
    .map((s) => s.trim().replace(/\/+$/, ""))
    .filter(Boolean);
  if (endpoints.length === 0) {
    console.error('SECSYNC_E2E_ENDPOINTS is required, e.g. "ws://127.0.0.1:4000,ws://127.0.0.1:4001"');
    process.exit(2);
  }
  for (const e of endpoints) {
    if (!/^wss?:\/\//.test(e)) {
      console.error(`not a ws:// or wss:// URL: ${e}`);
      process.exit(2);
    }
  }
  return endpoints;
}

async function loadScenarios() {
  const dir = path.join(here, "scenarios");
  const files = readdirSync(dir)
    .filter((f) => f.endsWith(".mjs"))
    .sort();
  const all = [];
  for (const file of files) {
    const mod = await import(pathToFileURL(path.join(dir, file)).href);
    const list = Array.isArray(mod.default) ? mod.default : [mod.default];
    all.push(...list);
  }
  const names = new Set();
  for (const s of all) {
    if (names.has(s.name)) throw new Error(`duplicate scenario name ${s.name}`);
    names.add(s.name);
  }
  return all;
}

function oneLine(text) {
  return String(text).replace(/\s+/g, " ").trim();
}

// Errors escaping the client library (e.g. a send on a socket that is not open) would kill
// the process by default; charge them to the running scenario instead.
let currentUnhandled = null;
process.on("unhandledRejection", (reason) => {
  const message = reason instanceof Error ? reason.message : String(reason);
  if (currentUnhandled) currentUnhandled.push(message);
  else console.error(`# unhandled rejection outside a scenario: ${oneLine(message)}`);
});

// secsync 0.5 calls onDocumentUpdated after loading a document that has no snapshot yet,
// dereferences the missing snapshot info, catches the TypeError and console.error()s it.
// Harmless and expected for every new document; keep it out of the output.
let suppressedClientNoise = 0;
const consoleError = console.error.bind(console);
console.error = (...args) => {
  const first = args[0];
  if (first instanceof TypeError && String(first.stack).includes("invokeOnDocumentUpdated")) {
    suppressedClientNoise += 1;
    return;
  }
  consoleError(...args);
};

async function runScenario(scenario, endpoints, defaultTimeout) {
  const ctx = new ScenarioContext({ endpoints, name: scenario.name });
  const skipReason = scenario.skip?.(ctx);
  if (skipReason) return { status: "skipped", reason: skipReason, ctx };

  const unhandled = [];
  currentUnhandled = unhandled;
  const timeoutMs = scenario.timeoutMs ?? defaultTimeout;
  let timer;
  const run = Promise.resolve().then(() => scenario.run(ctx));
  run.catch(() => {}); // after a timeout its late rejection is expected
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`scenario timed out after ${timeoutMs} ms`)), timeoutMs);
  });
  let result;
  try {
    await Promise.race([run, timeout]);
    result = unhandled.length
      ? { status: "failed", reason: `unhandled rejection: ${unhandled[0]}` }
      : { status: "passed" };
  } catch (err) {
    result = { status: "failed", reason: err?.message ?? String(err) };
  } finally {
    clearTimeout(timer);
  }
  const diagnostics = ctx.describeAll();
  await ctx.cleanup();
  currentUnhandled = null;
  return { ...result, ctx, diagnostics };
}

async function main() {
  const endpoints = parseEndpoints();
  const filters = (process.env.SECSYNC_E2E_FILTER || "")
    .split(",")
    .map((s) => s.trim())
    .filter(Boolean);
  const defaultTimeout = Number.parseInt(process.env.SECSYNC_E2E_SCENARIO_TIMEOUT_MS || "60000", 10);
  const failOnSkip = process.env.SECSYNC_E2E_FAIL_ON_SKIP === "1";
  const verbose = process.env.SECSYNC_E2E_VERBOSE === "1";

  await sodiumReady();
  const scenarios = (await loadScenarios()).filter(
    (s) => filters.length === 0 || filters.some((f) => s.name.includes(f)),
  );

  if (scenarios.length === 0) {
    // a mistyped filter must not look like a green run
    console.error(`no scenario matches SECSYNC_E2E_FILTER=${process.env.SECSYNC_E2E_FILTER}`);
    console.log("0 passed, 0 failed");
    process.exit(2);
  }

  let passed = 0;
  let failed = 0;
  let skipped = 0;
  for (const scenario of scenarios) {
    const started = Date.now();
    const r = await runScenario(scenario, endpoints, defaultTimeout);
    const ms = Date.now() - started;
    if (r.status === "passed") {
      passed += 1;
      console.log(`ok - ${scenario.name}`);
    } else if (r.status === "skipped") {
      skipped += 1;
      if (failOnSkip) failed += 1;
      console.log(`skipped - ${scenario.name}: ${oneLine(r.reason)}`);
    } else {
      failed += 1;
      console.log(`FAIL - ${scenario.name}: ${oneLine(r.reason)}`);
      if (verbose) for (const d of r.diagnostics) console.error(`#   ${d}`);
    }
    if (verbose) {
      for (const n of r.ctx.notes) console.error(`#   note: ${oneLine(n)}`);
      console.error(`#   (${scenario.name}: ${ms} ms)`);
    }
  }
  if (verbose && suppressedClientNoise > 0) {
    console.error(`# suppressed ${suppressedClientNoise} onDocumentUpdated TypeError(s) logged by secsync`);
  }
  if (skipped > 0) console.error(`# ${skipped} skipped${failOnSkip ? " (counted as failed)" : ""}`);
  console.log(`${passed} passed, ${failed} failed`);
  // stray client timers (secsync's 5 s connect guard, retry back-off) must not delay the exit
  process.exit(failed > 0 ? 1 : 0);
}

main().catch((err) => {
  console.error(err?.stack ?? err);
  console.log("0 passed, 1 failed");
  process.exit(1);
});
