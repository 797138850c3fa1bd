"""Speculative decoding on a causal-LM artifact: acceptance rate, tokens per target forward and
decode tok/s against the same artifact without speculation (docs/speculative.md).

    python -m benchmarks.speculative --artifact DIR [--draft DRAFT_DIR ...] [--prompts 8] [--new-tokens 128]
                                     [--threads 2] [--repeats 3] [--json out.json]

Two tasks, each prompt in the model's chat template:
- grounded: rewrite a news article given in the prompt (the first `--prompts` articles of the Lee
  corpus, lee_background.cor from the gensim wheel, with 600 characters or more, cut at 1,200);
- chat: open-ended requests with nothing in the prompt to copy (`CHAT`).
Per prompt, plain decoding and every speculative mode (prompt lookup, then each draft) run in
turn, `repeats` rounds after one warm-up round, on the same threads. Decode tok/s is (tokens - 1) /
(time of the last token - time of the first): prefill excluded. Per mode and task: the median
over prompts of each prompt's median over rounds; speed-up is that median of the per-prompt
ratios to plain. Greedy tokens are checked equal to plain decoding's (a difference stops the run);
with --inexact (an artifact whose several-token step is not exact, docs/speculative.md) the
prompts whose tokens equal plain decoding's are counted instead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import kiln
from kiln.corpus import default_corpus

INSTRUCTION = "Rewrite the following news article in clear, simple English, keeping every fact.\n\n"
CHAT = ["Write a short story about a dragon who is afraid of the dark.",
        "What are some good habits for staying healthy?",
        "Explain how a rainbow forms.",
        "Give me three ideas for a birthday party.",
        "Why do cats purr?",
        "Write a poem about the sea.",
        "What should I pack for a weekend camping trip?",
        "Describe your ideal city.",
        "How do airplanes stay in the air?",
        "Tell me about the history of chess."]


def grounded_prompts(n: int) -> list[str]:
    articles = [line for line in default_corpus().read_text().splitlines() if len(line) >= 600]
    return [INSTRUCTION + article[:1200] for article in articles[:n]]


def timed(art, ids: list[int], new_tokens: int, speculative) -> tuple[list[int], float, dict | None]:
    """Greedy tokens, decode tok/s (prefill excluded) and the speculation stats of one run."""
    times: list[float] = []
    gen = art.generate(ids, new_tokens, on_token=lambda _: times.append(time.perf_counter()), speculative=speculative)
    return gen.token_ids, (len(times) - 1) / (times[-1] - times[0]), gen.speculation


def run_task(art, prompts: list[str], modes: dict, new_tokens: int, repeats: int, exact: bool) -> dict:
    per_mode = {name: {"tok_s": [], "ratio": [], "proposed": 0, "accepted": 0, "forwards": 0, "tokens": 0,
                       "identical": 0} for name in modes}
    for text in prompts:
        ids = art.encode(art.chat_prompt(text))
        reference = None
        for round_ in range(repeats + 1):  # round 0: warm-up
            for name, spec in modes.items():
                tokens, tok_s, stats = timed(art, ids, new_tokens, spec)
                if reference is None:
                    reference = tokens
                if tokens != reference and exact:
                    raise SystemExit(f"{name}: greedy tokens differ from plain decoding on {text[:40]!r}")
                if round_ == 0:
                    per_mode[name]["identical"] += tokens == reference
                    continue
                per_mode[name].setdefault("runs", []).append(tok_s)
                if stats and round_ == 1:
                    for key, field in (("proposed", "proposed"), ("accepted", "accepted"), ("forwards", "target_forwards"),
                                       ("tokens", "tokens")):
                        per_mode[name][key] += stats[field]
        for name in modes:
            per_mode[name]["tok_s"].append(statistics.median(per_mode[name].pop("runs")))
        for name in modes:
            per_mode[name]["ratio"].append(per_mode[name]["tok_s"][-1] / per_mode["plain"]["tok_s"][-1])
    return {name: {"decode_tok_s": round(statistics.median(m["tok_s"]), 1),
                   "speedup": round(statistics.median(m["ratio"]), 3),
                   "min_speedup": round(min(m["ratio"]), 3),
                   "acceptance": round(m["accepted"] / m["proposed"], 3) if m["proposed"] else None,
                   "tokens_per_forward": round(m["tokens"] / m["forwards"], 3) if m["forwards"] else 1.0,
                   "identical": f"{m['identical']}/{len(prompts)}"}
            for name, m in per_mode.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", required=True)
    parser.add_argument("--draft", action="append", default=[], help="a draft artifact (repeatable)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tasks", default="grounded,chat")
    parser.add_argument("--inexact", action="store_true", help="speculate on an artifact whose several-token step "
                                                                   "is not exact; count identical outputs")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    art = kiln.load(args.artifact, threads=args.threads)
    exact = not args.inexact
    modes = {"plain": None, "lookup": art.speculation("lookup", exact=exact)}
    modes.update({f"draft {d}": art.speculation(d, exact=exact) for d in args.draft})
    prompts = {"grounded": grounded_prompts(args.prompts), "chat": CHAT[:args.prompts]}
    results = {task: run_task(art, prompts[task], modes, args.new_tokens, args.repeats, exact)
               for task in args.tasks.split(",")}
    print(f"artifact {args.artifact}, {args.threads} threads, {args.prompts} prompts x {args.new_tokens} tokens, "
          f"median of {args.repeats} rounds after a warm-up\n")
    print("| task | mode | decode tok/s | speed-up (median, min) | acceptance | tokens per target forward | "
          "= plain greedy |")
    print("|---|---|---|---|---|---|---|")
    for task, rows in results.items():
        for name, r in rows.items():
            acceptance = "-" if r["acceptance"] is None else f"{r['acceptance']:.0%}"
            print(f"| {task} | {name} | {r['decode_tok_s']} | {r['speedup']:.2f}× ({r['min_speedup']:.2f}×) | "
                  f"{acceptance} | {r['tokens_per_forward']:.2f} | {r['identical']} |")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
