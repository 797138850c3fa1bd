#!/usr/bin/env node
// Greedy generation through a kiln causal-LM artifact: prints the prompt and its
// continuation (streamed), as `kiln run ARTIFACT --prompt PROMPT` does.
//
//   node generate.js ARTIFACT PROMPT [--max-new-tokens N] [--threads N] [--json] [--speculative lookup [--draft-tokens K]]

import { main, positiveInt } from "./lib/cli.js";
import { Artifact, KilnError } from "./lib/kiln.js";

const USAGE = "node generate.js ARTIFACT PROMPT [--max-new-tokens N] [--threads N] [--json] [--speculative lookup [--draft-tokens K]]";

await main(USAGE, {
  "max-new-tokens": { type: "string", short: "n" },
  threads: { type: "string" },
  json: { type: "boolean" },
  speculative: { type: "string" },
  "draft-tokens": { type: "string" },
}, async (opts, args) => {
  if (args.length !== 2) throw new KilnError(`give an artifact directory and a prompt (usage: ${USAGE})`);
  const [dir, prompt] = args;
  const art = await Artifact.load(dir, { threads: positiveInt(opts.threads, "--threads") });
  if (art.task !== "causal-lm") throw new KilnError(`${dir}: a ${art.task} artifact does not generate text${art.task === "embedding" ? " (use embed.js)" : ""}`);
  const maxNewTokens = positiveInt(opts["max-new-tokens"], "--max-new-tokens") ?? 64;
  const draftTokens = positiveInt(opts["draft-tokens"], "--draft-tokens");
  if (draftTokens !== undefined && opts.speculative === undefined) throw new KilnError("--draft-tokens needs --speculative lookup");
  if (opts.speculative !== undefined) await art.promptLookup(opts.speculative);  // refused before anything is printed
  const speculation = { speculative: opts.speculative, ...(draftTokens ? { draftTokens } : {}) };
  if (opts.json) {
    const started = performance.now();
    const gen = await art.generate(prompt, { maxNewTokens, ...speculation });
    const seconds = (performance.now() - started) / 1000;
    process.stdout.write(JSON.stringify({ text: gen.text, token_ids: gen.tokenIds, stop_reason: gen.stopReason,
      prompt_ids: gen.promptIds, seconds: Number(seconds.toFixed(3)), ...(gen.speculation ? { speculation: gen.speculation } : {}) }) + "\n");
    return;
  }
  // Decode the whole continuation each time so multi-byte characters stream correctly.
  const fresh = [];
  let printed = "";
  process.stdout.write(prompt);
  await art.generate(prompt, {
    maxNewTokens,
    ...speculation,
    onToken: (token) => {
      fresh.push(token);
      const full = art.decode(fresh);
      if (!full.endsWith("\ufffd")) {
        process.stdout.write(full.slice(printed.length));
        printed = full;
      }
    },
  });
  process.stdout.write("\n");
});
