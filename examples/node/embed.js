#!/usr/bin/env node
// Sentence embeddings from a kiln embedding artifact, as `kiln run ARTIFACT --text ...` prints them.
//
//   node embed.js ARTIFACT TEXT [TEXT ...] [--threads N] [--json]

import { main, positiveInt } from "./lib/cli.js";
import { Artifact, KilnError } from "./lib/kiln.js";

const USAGE = "node embed.js ARTIFACT TEXT [TEXT ...] [--threads N] [--json]";

await main(USAGE, { threads: { type: "string" }, json: { type: "boolean" } }, async (opts, args) => {
  if (args.length < 2) throw new KilnError(`give an artifact directory and at least one text (usage: ${USAGE})`);
  const [dir, ...texts] = args;
  const art = await Artifact.load(dir, { threads: positiveInt(opts.threads, "--threads") });
  if (art.task !== "embedding") throw new KilnError(`${dir}: a ${art.task} artifact does not produce embeddings${art.task === "causal-lm" ? " (use generate.js)" : ""}`);
  const vectors = await art.embed(texts);
  if (opts.json) {
    const rows = vectors.map((v) => Array.from(v));
    process.stdout.write(JSON.stringify({ embedding: rows.length === 1 ? rows[0] : rows }) + "\n");
    return;
  }
  texts.forEach((text, i) => {
    const v = vectors[i];
    const norm = Math.sqrt(v.reduce((s, x) => s + x * x, 0));
    const head = Array.from(v.slice(0, 8), (x) => (x >= 0 ? "+" : "") + x.toFixed(4)).join(", ");
    process.stdout.write(`${JSON.stringify(text)}: dim ${v.length}, norm ${norm.toFixed(4)}, [${head}, ...]\n`);
  });
});
