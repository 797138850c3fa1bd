#!/usr/bin/env node
// Token ids of each TEXT as the artifact's runtime would feed them: for an LLM the prompt
// ids, for an encoder the truncated ids with special tokens. No model is loaded.
//
//   node tokenize.js ARTIFACT TEXT [TEXT ...]        prints {"ids": [[...], ...]}
//   node tokenize.js ARTIFACT - < texts.json         the texts as a JSON array on stdin

import fs from "node:fs";

import { main } from "./lib/cli.js";
import { encodeTruncated, encoderLimit, KilnError, loadTokenizer, readManifest } from "./lib/kiln.js";

const USAGE = "node tokenize.js ARTIFACT TEXT [TEXT ...] | node tokenize.js ARTIFACT - < texts.json";

await main(USAGE, {}, async (_opts, args) => {
  if (args.length < 2) throw new KilnError(`give an artifact directory and at least one text (usage: ${USAGE})`);
  const [dir, ...rest] = args;
  const texts = rest.length === 1 && rest[0] === "-" ? JSON.parse(fs.readFileSync(0, "utf8")) : rest;
  if (!Array.isArray(texts) || !texts.every((t) => typeof t === "string")) throw new KilnError("stdin must hold a JSON array of strings");
  const manifest = readManifest(dir);
  const tok = loadTokenizer(dir, manifest);
  if (!tok) throw new KilnError(`${dir}: the artifact has no tokenizer`);
  const ids = texts.map((t) => (manifest.task === "embedding" ? encodeTruncated(tok, t, encoderLimit(manifest)).ids : tok.encode(t).ids));
  process.stdout.write(JSON.stringify({ ids }) + "\n");
});
