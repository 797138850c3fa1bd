// Shared by the command-line scripts: one-line errors (`error: ...`, exit 1), like `kiln`.

import { parseArgs } from "node:util";

import { KilnError } from "./kiln.js";

export async function main(usage, options, body) {
  try {
    let parsed;
    try {
      parsed = parseArgs({ options: { ...options, help: { type: "boolean", short: "h" } }, allowPositionals: true });
    } catch (err) {
      throw new KilnError(`${err.message} (usage: ${usage})`);
    }
    if (parsed.values.help) {
      process.stdout.write(`usage: ${usage}\n`);
      return;
    }
    await body(parsed.values, parsed.positionals);
  } catch (err) {
    if (process.env.KILN_DEBUG) throw err;
    const message = err instanceof KilnError ? err.message : String(err?.message ?? err).split("\n")[0];
    process.stderr.write(`error: ${message}\n`);
    process.exitCode = 1;
  }
}

export function positiveInt(value, flag) {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1) throw new KilnError(`${flag} must be a positive integer (got ${value})`);
  return n;
}
