// Event-driven waiting: a condition is re-checked whenever one of its sources reports a
// change, and the wait fails after a timeout. No polling, no sleeps.

export const DEFAULT_WAIT_MS = Number.parseInt(process.env.SECSYNC_E2E_WAIT_TIMEOUT_MS || "15000", 10);

/** Something that changes: clients and raw connections each own one. */
export class Signal {
  #listeners = new Set();
  #closedReason = null;

  notify() {
    for (const listener of [...this.#listeners]) listener();
  }

  /** After close every current and future wait on this signal fails with `reason`. */
  close(reason) {
    this.#closedReason ??= reason;
    this.notify();
  }

  get closedReason() {
    return this.#closedReason;
  }

  subscribe(listener) {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }
}

export class WaitTimeout extends Error {}

/**
 * Wait until `check()` returns a truthy value (which the promise resolves with).
 * `check` may throw to fail the wait at once (e.g. the client entered state "failed").
 * `describe()` adds the current situation to the timeout message.
 */
export function waitUntil(sources, check, { timeoutMs = DEFAULT_WAIT_MS, label = "condition", describe } = {}) {
  const signals = (Array.isArray(sources) ? sources : [sources]).map((s) => (s instanceof Signal ? s : s.signal));
  return new Promise((resolve, reject) => {
    const unsubscribes = [];
    let timer = null;
    let done = false;
    const finish = (fn, value) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      for (const u of unsubscribes) u();
      fn(value);
    };
    const evaluate = () => {
      if (done) return;
      try {
        const value = check();
        if (value) {
          finish(resolve, value);
          return;
        }
      } catch (err) {
        finish(reject, err);
        return;
      }
      const closed = signals.find((s) => s.closedReason);
      if (closed) finish(reject, new Error(`${label}: ${closed.closedReason}`));
    };
    for (const s of signals) unsubscribes.push(s.subscribe(evaluate));
    timer = setTimeout(() => {
      let extra = "";
      try {
        extra = describe ? ` (${describe()})` : "";
      } catch {
        // the description is best effort
      }
      finish(reject, new WaitTimeout(`timed out after ${timeoutMs} ms waiting for ${label}${extra}`));
    }, timeoutMs);
    evaluate();
  });
}

export function assert(condition, message) {
  if (!condition) throw new Error(message);
}

export function assertEqual(actual, expected, what) {
  if (actual !== expected) {
    throw new Error(`${what}: expected ${JSON.stringify(expected)}, got ${JSON.stringify(actual)}`);
  }
}

/**
 * Independent sub-checks of one scenario: each runs even if an earlier one failed, and the
 * scenario then fails listing every failed check (useful where a server fails several).
 */
export class Checks {
  #failures = [];
  #count = 0;

  async check(name, fn) {
    this.#count += 1;
    try {
      await fn();
    } catch (err) {
      this.#failures.push(`${name}: ${err?.message ?? err}`);
    }
  }

  done() {
    if (this.#failures.length > 0) {
      throw new Error(`${this.#failures.length} of ${this.#count} checks failed: ${this.#failures.join("; ")}`);
    }
  }
}
