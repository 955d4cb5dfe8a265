// Unique edit tokens and "every edit exactly once" checks on document text.

/** ["<A:00>", "<A:01>", …]: tokens that cannot occur inside one another. */
export function tokens(prefix, count) {
  return Array.from({ length: count }, (_, i) => `<${prefix}:${String(i).padStart(2, "0")}>`);
}

function occurrences(text, token) {
  let n = 0;
  for (let i = text.indexOf(token); i !== -1; i = text.indexOf(token, i + token.length)) n += 1;
  return n;
}

/** Every token occurs exactly once in `text`. */
export function assertEachTokenOnce(text, expectedTokens) {
  const wrong = expectedTokens
    .map((t) => [t, occurrences(text, t)])
    .filter(([, n]) => n !== 1)
    .map(([t, n]) => `${t}×${n}`);
  if (wrong.length > 0) {
    throw new Error(`tokens not present exactly once: ${wrong.slice(0, 10).join(" ")}${wrong.length > 10 ? " …" : ""}`);
  }
}

/** `text` consists of exactly these tokens (each once, in any order) and nothing else. */
export function assertExactlyTokens(text, expectedTokens) {
  assertEachTokenOnce(text, expectedTokens);
  const rest = expectedTokens.reduce((acc, t) => acc.replace(t, ""), text);
  if (rest !== "") throw new Error(`unexpected text besides the tokens: ${JSON.stringify(rest.slice(0, 80))}`);
}
