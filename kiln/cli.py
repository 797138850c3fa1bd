"""The `kiln` command line.

Expected failures (KilnError) print one line `error: ...` and exit 1; an interrupt
exits 130; anything else is reported in one line as an internal error. `--debug`
shows the traceback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kiln.errors import KilnError, missing_extra

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="kiln: compile transformer models ahead of time into validated ONNX artifacts.")
out = Console()
err = Console(stderr=True)
_state = {"debug": False, "verbose": False}


def _version(value: bool):
    if value:
        import kiln

        print(f"kiln {kiln.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More detail (per-pass stats, rejection reasons)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
):
    _state["debug"] = debug
    _state["verbose"] = verbose


@app.command("models")
def models_cmd():
    """List the named model sources (any model folder, .gguf or .onnx file compiles by path too)."""
    from kiln.models import SOURCES

    table = Table("name", "task", "weights from", "description")
    for s in SOURCES.values():
        table.add_row(s.name, s.task, s.wheel or "random init", s.description)
    out.print(table)


@app.command("passes")
def passes_cmd():
    """List registered passes (built-in and plugins) with their parameters."""
    from kiln.passes import available_passes

    table = Table("pass", "kind", "parameters", "module")
    for name, cls in available_passes().items():
        kind = "exact" if cls.exact else f"lossy ({cls.metric})"
        table.add_row(name, kind, ", ".join(cls.parameter_names()) or "-", cls.__module__)
    out.print(table)


@app.command("fetch")
def fetch_cmd(name: str = typer.Argument(..., help="Model name (see `kiln models`).")):
    """Download a model's wheel into the cache ($KILN_CACHE, default ~/.cache/kiln) and unpack it."""
    from kiln.models import get_source

    source = get_source(name)
    path = source.fetch()
    out.print(f"{name}: {path or 'nothing to fetch (random init)'}")


@app.command("compile")
def compile_cmd(
    model: str = typer.Argument(..., help="A model name (see `kiln models`), or the path of a Hugging Face or "
                                          "sentence-transformers folder, a .gguf file or an .onnx file."),
    output: Path = typer.Option(..., "--output", "-o", help="Artifact directory to create."),
    task: Optional[str] = typer.Option(
        None, "--task", help="causal-lm, embedding or sequence-classification (default: inferred from the "
                             "config's architecture and sentence-transformers files)."),
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="Load pickle checkpoints (pytorch_model.bin), which can run code: only "
                                      "for files you trust. Safetensors never need it."),
    recipe: Optional[str] = typer.Option(
        None, "--recipe", "-r", help="Preset name (see kiln/recipes) or path to a .toml recipe "
                                     "(default: the target's: fp32, int4 for LLMs on cpu with ort, npu-int8 on npu)."),
    target: str = typer.Option("cpu", "--target", "-t", help="Deployment target profile: cpu, gpu (fp16, CUDA EP) "
                                                             "or npu (static shapes, int8 QDQ, op allow-list)."),
    backend: str = typer.Option("ort", "--backend", "-b", help="Backend that writes the artifact: ort or tvm."),
    tune_minutes: Optional[float] = typer.Option(
        None, "--tune-minutes", min=0.0, help="TVM: MetaSchedule tuning budget for kernels without a record in the "
                                              "tuning database (default 0: DLight schedules only)."),
    force: bool = typer.Option(False, "--force", help="Replace OUTPUT if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars, no summary."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="All stats, fusion coverage and reasons."),
    calibration: Optional[Path] = typer.Option(
        None, "--calibration", help="Text file for data-aware passes (default: kiln's calibration text, "
                                    "disjoint from the evaluation corpus)."),
    max_ppl_increase: Optional[str] = typer.Option(
        None, "--max-ppl-increase", help="LLM quality budget, e.g. 5% or 0.05: perplexity on held-out text, "
                                         "checked after every lossy pass; over budget = no artifact."),
    min_cosine: Optional[float] = typer.Option(
        None, "--min-cosine", help="Encoder quality budget: mean cosine of the outputs to the source's."),
    target_params: Optional[float] = typer.Option(
        None, "--target-params", min=0.0, max=1.0,
        help="Keep this fraction of the parameters (embeddings included), e.g. 0.8; given to the recipe's "
             "one structural pass (factorize-low-rank, prune-heads, prune-mlp, drop-layers)."),
    target_size: Optional[str] = typer.Option(
        None, "--target-size", help="Weights of at most this size, e.g. 60MB, counted at the model's bytes per "
                                    "parameter where the structural pass runs (fp32: 4)."),
    draft: bool = typer.Option(
        False, "--draft", help="Also derive a draft for speculative decoding from the model (recipe draft: drop-layers, "
                               "int4) and bundle it in the artifact; `kiln run` then drafts with it."),
    lora: Optional[Path] = typer.Option(
        None, "--lora", help="A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) to merge "
                             "into the weights before export (docs/lora.md)."),
    lora_slots: Optional[int] = typer.Option(
        None, "--lora-slots", help="Instead of merging: compile the base with N swappable LoRA adapters, loaded at run "
                                   "time (`kiln run --lora NAME=DIR --adapter NAME`) and chosen per request."),
    lora_rank: int = typer.Option(16, "--lora-rank", help="With --lora-slots: the highest adapter rank (smaller ones "
                                                          "are zero-padded)."),
    lora_targets: Optional[str] = typer.Option(
        None, "--lora-targets", help="With --lora-slots: comma-separated linear layer names (default: every linear "
                                     "layer but the output head, e.g. q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,"
                                     "down_proj)."),
):
    """Export MODEL (a name, or the path of your model folder, .gguf or .onnx file), run the recipe's
    verified passes, check the result against the PyTorch model, and write the artifact directory."""
    import kiln

    _state["verbose"] |= verbose
    result = kiln.compile(model, output, recipe=recipe, target=target, backend=backend, force=force,
                          calibration=calibration, max_ppl_increase=_fraction(max_ppl_increase, "--max-ppl-increase"),
                          min_cosine=min_cosine, target_params=target_params, tune_minutes=tune_minutes,
                          target_mb=_size_mb(target_size), task=task, allow_pickle=allow_pickle,
                          progress=not quiet, console=err, draft=draft, **_lora_options(lora, lora_slots, lora_rank,
                                                                                        lora_targets))
    if not quiet:
        _print_summary(result.path, result.manifest)


def _lora_options(lora, slots, rank, targets) -> dict:
    options = {"lora": lora} if lora else {}
    if slots is not None:
        options.update(lora_slots=slots, lora_rank=rank,
                       lora_targets=[t.strip() for t in targets.split(",") if t.strip()] if targets else None)
    elif targets is not None or rank != 16:
        raise typer.BadParameter("--lora-rank and --lora-targets go with --lora-slots", param_hint="--lora-slots")
    return options


def _named_adapters(specs: list[str] | None) -> dict[str, Path] | None:
    """`--lora NAME=ADAPTER_DIR` options as {name: folder}."""
    if not specs:
        return None
    named: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise typer.BadParameter(f"'{spec}' is not NAME=ADAPTER_DIR", param_hint="--lora")
        if name in named:
            raise typer.BadParameter(f"the adapter name '{name}' is given twice", param_hint="--lora")
        named[name] = Path(folder)
    return named


def _size_mb(text: str | None, option: str = "--target-size") -> float | None:
    if text is None:
        return None
    from kiln.passes.structural import parse_size_mb

    try:
        return parse_size_mb(text)
    except ValueError:
        raise typer.BadParameter(f"'{text}' is not a size like 60MB", param_hint=option) from None


def _fraction(text: str | None, option: str) -> float | None:
    """'5%' -> 0.05, '0.05' -> 0.05."""
    if text is None:
        return None
    try:
        return float(text[:-1]) / 100 if text.strip().endswith("%") else float(text)
    except ValueError:
        raise typer.BadParameter(f"'{text}' is not a number or a percentage", param_hint=option) from None


def _fmt_delta(delta: dict | None) -> str:
    if delta is None:
        return "not checked"
    parts = [f"max_rel {delta.get('max_rel', 0):.1e}"]
    if "kl" in delta:
        parts.append(f"kl {delta['kl']:.1e}")
    if "cosine" in delta:
        parts.append(f"cos {delta['cosine']:.6f}")
    return ", ".join(parts)


def _size(n: int | float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def artifact_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def passes_table(records: list[dict], verbose: bool) -> Table:
    table = Table("pass", "modified", "stats", "Δ vs previous", "seconds", title="passes")
    for r in records:
        stats = r.get("stats", {})
        shown = stats if verbose else {k: v for k, v in stats.items() if v}
        table.add_row(r["name"], "yes" if r["modified"] else "no",
                      ", ".join(f"{k}={v}" for k, v in shown.items()) or "-",
                      _fmt_delta(r.get("delta")), f"{r['seconds']:.2f}")
    return table


def coverage(records: list[dict]) -> list[str]:
    """Fusion coverage from the fusion passes' stats: '<op> fused/sites'."""
    lines = []
    for r in records:
        s = r.get("stats", {})
        if r["name"] == "fuse-attention" and s.get("attentions_seen"):
            lines.append(f"attention {s['attentions_seen']}: GroupQueryAttention {s['gqa_fused']}, MultiHeadAttention {s['mha_fused']}")
        elif r["name"] == "fuse-rms-norm" and s.get("norms_seen"):
            lines.append(f"RMSNorm {s['rms_fused']}/{s['norms_seen']} (with residual add: {s['skip_fused']})")
        elif r["name"] == "fuse-layer-norm" and s.get("residual_norms_seen"):
            lines.append(f"SkipLayerNorm {s['skip_layer_norm_fused']}/{s['residual_norms_seen']}")
        elif r["name"] == "fuse-gelu" and (s.get("gelu_sites") or s.get("bias_gelu_fused")):
            lines.append(f"Gelu {s['gelu_fused']}/{s['gelu_sites']}, BiasGelu {s['bias_gelu_fused']}")
        elif r["name"] == "insert-kv-cache" and r["modified"]:
            lines.append(f"KV cache {s['kv_layers']}/{s['attentions_seen']} layers")
    return lines


def _print_summary(path: Path, manifest: dict) -> None:
    verbose = _state["verbose"]
    out.print(passes_table(manifest["passes"], verbose))
    for r in manifest["passes"]:
        for warning in r.get("warnings", []):
            err.print(f"[yellow]warning:[/] {r['name']}: {escape(warning)}", highlight=False, soft_wrap=True)
    if verbose:
        lines = coverage(manifest["passes"])
        if lines:
            out.print("fusion coverage: " + "; ".join(lines), highlight=False)
        for r in manifest["passes"]:
            for reason in r.get("rejected", []):
                out.print(f"  [yellow]{r['name']}[/]: not applied: {escape(reason)}")
    quality = manifest["compile"].get("quality_budget")
    if quality:
        out.print(f"quality budget {quality['metric']} {quality['limit']:g}: source {quality['source']}, "
                  f"artifact {quality['final']}", highlight=False)
    s = manifest["summary"]
    out.print(
        f"[bold]{path}[/]: {_size(artifact_bytes(path))} on disk, "
        f"nodes {s['source']['nodes']} → {s['artifact']['nodes']}, "
        f"{s['artifact']['parameters']:,} parameters, "
        f"compiled in {manifest['compile']['seconds']:.1f} s "
        f"(export {manifest['compile'].get('export_seconds') or 0:.1f} s, cached exports are reused), "
        f"artifact check {_fmt_delta(manifest['compile'].get('artifact_check'))}"
    )


@app.command("run")
def run_cmd(
    artifact: Path = typer.Argument(..., help="Artifact directory written by `kiln compile`."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt to continue (LLM)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1, help="New tokens to generate."),
    text: Optional[list[str]] = typer.Option(None, "--text", help="Text to embed (encoder) or classify; repeat for a batch."),
    pair: Optional[list[str]] = typer.Option(
        None, "--pair", help="Classifier: the second text of a pair (a cross-encoder's passage), one per --text."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Override the artifact's thread count."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template (one user turn)."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Sample from the k most likely tokens (0 = all)."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling threshold."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    num_beams: int = typer.Option(1, "--num-beams", min=1, help="Beam search with this many beams (not streamed)."),
    speculative: Optional[str] = typer.Option(
        None, "--speculative", metavar="lookup|draft|DRAFT_DIR|none",
        help="Speculative decoding: drafts from n-grams of the prompt and text so far (lookup), from the draft "
             "bundled by `kiln compile --draft` (draft: the default when there is one and the artifact's several-token "
             "step is exact) or from a smaller artifact with the same tokenizer; the same tokens as without (greedy) "
             "or the same distribution."),
    draft_tokens: Optional[int] = typer.Option(
        None, "--draft-tokens", min=1, help="With --speculative: draft at most K tokens per step (adapted down to 0)."),
    inexact: bool = typer.Option(
        False, "--inexact", help="With --speculative: also on an artifact whose several-token step differs from "
                                 "one-token steps (int4 with int8 activations); near ties may then pick other tokens."),
    check: Optional[bool] = typer.Option(
        None, "--check/--no-check",
        help="Compare with the PyTorch source model: greedy tokens (LLM) or cosine (encoder). "
             "Default: on for encoders, off for LLMs (loading an LLM takes a while)."),
    source: Optional[Path] = typer.Option(
        None, "--source", help="With --check: the folder or file the artifact was compiled from by path."),
    verify: bool = typer.Option(False, "--verify", help="Check every file's sha256 against the manifest before loading "
                                                        "(sizes are always checked)."),
    lora: Optional[list[str]] = typer.Option(
        None, "--lora", metavar="NAME=ADAPTER_DIR", help="Load a PEFT LoRA adapter into the artifact's LoRA slots "
                                                         "(compiled with --lora-slots); repeat for several."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="Generate with this loaded LoRA adapter (--lora NAME=...)."),
):
    """Generate a continuation (LLM: streamed, greedy unless --temperature), print embeddings (encoder)
    or a classifier's scores per label."""
    from kiln.runtime import check_text, load

    _runtime_only_tvm()
    art = load(artifact, threads=threads, verify=verify, lora=_named_adapters(lora))
    if adapter is not None:
        art.adapter_slot(adapter)  # an unknown name: one line, before anything runs
    for value, what in ((prompt, "the prompt"), *((t, "a --text") for t in text or ()), *((t, "a --pair") for t in pair or ())):
        if value is not None:
            check_text(value, what)  # before anything is printed
    if pair and art.task != "sequence-classification":
        raise KilnError(f"--pair is for a sequence-classification artifact; this one is {art.task}")
    if (speculative in (None, "none") and (draft_tokens is not None or inexact)
            and not (speculative is None and _bundled_draft_helps(art))):
        flag = "--draft-tokens" if draft_tokens is not None else "--inexact"
        raise KilnError(f"{flag} needs --speculative lookup or --speculative DRAFT_DIR")
    if speculative is not None and art.task != "causal-lm":
        raise KilnError(f"--speculative is for an LLM artifact; this one is {art.task}")
    if art.task == "causal-lm":
        if prompt is None:
            raise KilnError("this is an LLM artifact: give --prompt TEXT")
        shown = prompt
        if chat:
            prompt, shown = art.chat_prompt(prompt), ""
        sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
        if check and temperature > 0:
            raise KilnError("--check compares greedy tokens; it cannot be used with --temperature")
        options = {"exact": not inexact, **({"draft_tokens": draft_tokens} if draft_tokens is not None else {})}
        if speculative not in (None, "none"):
            if num_beams > 1:
                raise KilnError("--speculative and --num-beams cannot be combined")
            sampling["speculative"] = art.speculation(speculative, **options)
        elif speculative is None and num_beams == 1 and adapter is None and _bundled_draft_helps(art):
            speculative = "draft"
            sampling["speculative"] = _bundled_draft(art, options)
        if adapter is not None:
            if num_beams > 1:
                raise KilnError("--adapter and --num-beams cannot be combined yet")
            if check:
                raise KilnError("--check compares with the source model, which has no adapter: drop --check")
            sampling["adapter"] = adapter
        if num_beams > 1:
            if temperature > 0:
                raise KilnError("--num-beams and --temperature cannot be combined")
            gen = art.beam_search(prompt, num_beams, max_new_tokens)
            print(json.dumps({"text": gen.text, "token_ids": gen.token_ids, "stop_reason": gen.stop_reason})
                  if as_json else shown + gen.text)
            return
        if as_json:
            gen = art.generate(prompt, max_new_tokens, **sampling)
            payload = {"text": gen.text, "token_ids": gen.token_ids, "stop_reason": gen.stop_reason}
            if art.max_positions is not None:
                payload["max_positions"] = art.max_positions
            if gen.speculation is not None:
                payload["speculation"] = gen.speculation
            if check:
                payload["reference"] = _check_tokens(art, gen, source)
            print(json.dumps(payload))
            return
        printed = ""
        new: list[int] = []

        def show(token: int):
            nonlocal printed
            new.append(token)
            full = art.tokenizer.decode(new, skip_special_tokens=True)
            # Decode the whole continuation each time so multi-byte characters stream correctly.
            if not full.endswith("\ufffd"):
                sys.stdout.write(full[len(printed):])
                sys.stdout.flush()
                printed = full

        sys.stdout.write(shown)
        gen = art.generate(prompt, max_new_tokens, on_token=show, **sampling)
        sys.stdout.write("\n")
        _say_if_max_positions_stopped(art, gen, max_new_tokens)
        if gen.speculation is not None:
            stats = gen.speculation
            rate = f" ({stats['acceptance_rate']:.0%})" if stats["proposed"] else ""
            err.print(f"speculative ({speculative}): {stats['accepted']}/{stats['proposed']} drafts accepted{rate}, "
                      f"{stats['tokens_per_forward'] or 1:.2f} tokens per target forward", highlight=False, soft_wrap=True)
        if check:
            ref = _check_tokens(art, gen, source)
            verdict = "identical" if ref["identical"] else f"differ from token {ref['first_difference']}"
            err.print(f"transformers generate(do_sample=False): {verdict} "
                      f"({ref['matching']}/{len(gen.token_ids)} tokens match)", highlight=False)
    elif art.task == "embedding":
        if not text:
            raise KilnError("this is an encoder artifact: give --text TEXT")
        vectors = art.embed(text)
        cosines = _check_embeddings(art, text, vectors, check is True, source) if check is not False else None
        if as_json:
            payload = [v.tolist() for v in vectors]
            result = {"embedding": payload[0] if len(payload) == 1 else payload}
            if cosines is not None:
                result["cosine_vs_pytorch"] = [round(float(c), 7) for c in cosines]
            print(json.dumps(result))
        else:
            for i, (t, v) in enumerate(zip(text, vectors)):
                head = ", ".join(f"{x:+.4f}" for x in v[:8])
                line = f"{t!r}: dim {v.shape[0]}, norm {float((v**2).sum() ** 0.5):.4f}, [{head}, ...]"
                if cosines is not None:
                    line += f"\n  cosine vs PyTorch: {cosines[i]:.7f}"
                out.print(line, highlight=False)
    elif art.task == "sequence-classification":
        if not text:
            raise KilnError("this is a classifier artifact: give --text TEXT (and --pair TEXT for a text pair)")
        if pair and len(pair) != len(text):
            raise KilnError(f"{len(text)} --text but {len(pair)} --pair: give one --pair per --text")
        results = art.classify(text, pair or None)
        if as_json:
            print(json.dumps({"results": [r.as_dict() for r in results]}))
            return
        for i, r in enumerate(results):
            head = f"{text[i]!r}" + (f" / {pair[i]!r}" if pair else "")
            kind = {"regression": "value", "multi_label_classification": "sigmoid"}.get(r.problem_type, "softmax")
            out.print(f"{head}: {r.label}", highlight=False)
            for label, score, logit in zip(r.labels, r.scores, r.logits):
                out.print(f"  {label}: {kind} {score:.6f}  logit {logit:+.6f}", highlight=False)
    else:
        raise KilnError(f"`kiln run` does not know how to drive a '{art.task}' artifact")


def _bundled_draft_helps(art) -> bool:
    """Whether the artifact bundles a draft that agrees with it often enough to draft by default."""
    from kiln.runtime.speculative import MIN_AGREEMENT

    return art.manifest.get("draft", {}).get("agreement", 0) >= MIN_AGREEMENT


def _bundled_draft(art, options: dict):
    """The bundled draft's Speculation, or None (plain decoding, the reason on stderr) where it
    cannot serve this artifact exactly."""
    from kiln.runtime import SpeculationError

    try:
        return art.speculation("draft", **options)
    except SpeculationError as exc:
        err.print(f"the bundled draft is not used: {exc}", highlight=False, soft_wrap=True)
        return None


def _runtime_only_tvm() -> None:
    """run, eval and bench never compile: a TVM artifact loads TVM's runtime library alone (and
    tvm_ffi leaves torch unimported)."""
    if "tvm" not in sys.modules:
        os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
        os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")


def _say_if_max_positions_stopped(art, gen, max_new_tokens: int) -> None:
    limit = art.max_positions
    if (limit is not None and gen.stop_reason == "length" and len(gen.token_ids) < max_new_tokens
            and len(gen.prompt_ids) + len(gen.token_ids) >= limit):
        err.print(f"stopped at the model's limit of {limit} positions (prompt and new tokens, "
                  f"kv_cache.max_positions) after {len(gen.token_ids)} new tokens", highlight=False)


def _check_tokens(art, gen, source: Path | None) -> dict:
    from kiln.reference import reference_generate

    ref = reference_generate(art.manifest, gen.prompt_ids, len(gen.token_ids), source=source)
    ours = gen.token_ids
    matching = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
    identical = ours == ref
    return {"identical": identical, "matching": matching,
            "first_difference": None if identical else matching, "token_ids": ref}


def _check_embeddings(art, texts, vectors, required: bool, source: Path | None):
    from kiln.models import SOURCES
    from kiln.reference import cosine, reference_embed

    if not required and source is None and art.manifest.get("source", {}).get("source") not in SOURCES:
        return None  # automatic check: only where kiln knows the source model
    feeds = art.tokenize_batch(texts)
    return cosine(reference_embed(art.manifest, feeds, source=source), vectors)


@app.command("bench", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_cmd(
    ctx: typer.Context,
    artifact: Optional[Path] = typer.Argument(None, help="Artifact directory (not with --compare)."),
    prompt_tokens: int = typer.Option(128, "--prompt-tokens", min=1, help="Prompt length (LLM)."),
    new_tokens: int = typer.Option(128, "--new-tokens", min=2, help="Tokens to decode (LLM)."),
    repeats: int = typer.Option(5, "--repeats", min=1, help="Timed repetitions after one warm-up; medians are reported."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Override the artifact's thread count."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    compare: bool = typer.Option(
        False, "--compare", help="Run the side-by-side benchmark against the peers (python -m benchmarks.run, "
                                 "from a source checkout); the other arguments go to that script, e.g. --quick."),
    verify: bool = typer.Option(False, "--verify", help="Check every file's sha256 against the manifest before loading "
                                                        "(sizes are always checked)."),
):
    """Prefill tok/s, time to first token, decode tok/s and peak RSS (LLM); latency and throughput (encoder)."""
    if compare:
        # Every argument after `bench` goes to benchmarks.run as written (its --threads takes several values).
        argv = sys.argv[sys.argv.index("bench") + 1:] if "bench" in sys.argv else [
            *ctx.args, *(["--threads", str(threads)] if threads else []), *(["--repeats", str(repeats)] if repeats != 5 else [])]
        _bench_compare([a for a in argv if a != "--compare"])
        return
    if ctx.args:
        raise KilnError(f"unexpected arguments: {' '.join(ctx.args)}")
    if artifact is None:
        raise KilnError("give an artifact directory (or --compare for the benchmark against the peers)")
    from kiln.bench import bench_encoder, bench_llm
    from kiln.manifest import session_threads
    from kiln.runtime import load

    _runtime_only_tvm()
    art = load(artifact, threads=threads, verify=verify)
    result = bench_llm(art, prompt_tokens, new_tokens, repeats) if art.task == "causal-lm" else bench_encoder(art, repeats)
    result["threads"] = threads or session_threads(art.manifest["backend"]["session"])
    if as_json:
        print(json.dumps(result))
        return
    table = Table("metric", "value", title=f"kiln bench {artifact}")
    for k, v in result.items():
        table.add_row(k, str(v))
    out.print(table)


def _bench_compare(args: list[str]) -> None:
    """benchmarks/ lives in the source checkout beside the kiln package, not in the wheel."""
    import kiln

    root = Path(kiln.__file__).resolve().parents[1]
    if not (root / "benchmarks" / "run.py").is_file():
        raise KilnError(f"--compare needs the source checkout (benchmarks/run.py not found under {root})")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks.run import main as run_benchmarks

    code = run_benchmarks(args)
    if code:
        raise typer.Exit(code)


@app.command("eval")
def eval_cmd(
    artifact: Path = typer.Argument(..., help="Artifact directory."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Reference artifact (e.g. the fp32 one): adds KL, top-1 agreement, cosine."),
    text: Optional[Path] = typer.Option(None, "--text", help="Text file (default: the Lee news corpus from the gensim wheel)."),
    corpus: Optional[str] = typer.Option(None, "--corpus", help="Instead of --text, one of kiln's texts from the gensim wheel: lee (the default) or newsgroups (20 Newsgroups posts)."),
    context: int = typer.Option(512, "--context", min=2, help="LLM: tokens per window."),
    stride: int = typer.Option(512, "--stride", min=1, help="LLM: tokens between window starts."),
    windows: int = typer.Option(10, "--windows", min=1, help="LLM: number of windows."),
    sentences: int = typer.Option(200, "--sentences", min=2, help="Encoder: number of sentences."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    verify: bool = typer.Option(False, "--verify", help="Check every file's sha256 against the manifest before loading "
                                                        "(sizes are always checked)."),
):
    """Perplexity, KL and top-1 agreement (LLM) or cosine and nearest-neighbour agreement (encoder)."""
    import dataclasses

    from kiln.corpus import EVAL_CORPORA
    from kiln.evaluate import evaluate_encoder, evaluate_lm
    from kiln.runtime import load

    if corpus is not None:
        if text is not None:
            raise KilnError("give --text FILE or --corpus NAME, not both")
        if corpus not in EVAL_CORPORA:
            raise KilnError(f"unknown corpus '{corpus}': choose one of {', '.join(EVAL_CORPORA)}")
    _runtime_only_tvm()
    art = load(artifact, verify=verify)
    if art.task not in ("causal-lm", "embedding"):
        raise KilnError(f"`kiln eval` measures LLMs (perplexity) and encoders (cosine); a '{art.task}' artifact has "
                        f"no evaluation here (try `kiln run {artifact} --text ...` or `kiln bench {artifact}`)")
    if corpus is not None:
        text = EVAL_CORPORA[corpus]()
    ref = load(reference, verify=verify) if reference else None
    if art.task == "causal-lm":
        report = evaluate_lm(art, text, context, stride, windows, ref)
        result = dataclasses.asdict(report) | {"ppl_increase": report.ppl_increase}
    elif art.task == "embedding":
        if ref is None:
            raise KilnError("an encoder is evaluated against a reference: give --reference DIR")
        result = dataclasses.asdict(evaluate_encoder(art, ref, text, sentences))
    else:
        raise KilnError(f"`kiln eval` does not know how to evaluate a '{art.task}' artifact")
    if as_json:
        print(json.dumps(result))
        return
    table = Table("metric", "value", title=f"kiln eval {artifact}")
    for k, v in result.items():
        if v is not None:
            table.add_row(k, f"{v:.6g}" if isinstance(v, float) else str(v))
    out.print(table)


@app.command("serve")
def serve_cmd(
    artifacts: list[str] = typer.Argument(..., help="Artifact directories (causal-lm or embedding), each served "
                                                    "under its directory name, or NAME=DIR to choose the name."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (only this machine by default)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to listen on."),
    max_batch: int = typer.Option(16, "--max-batch", min=1, help="Rows in one LLM's continuous batch."),
    max_queue: int = typer.Option(64, "--max-queue", min=0, help="Requests waiting per model; more get 429."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="KILN_API_KEY",
                                          help="Require Authorization: Bearer KEY (or set KILN_API_KEY)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Override the artifacts' thread count."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check every file's sha256 against the manifest "
                                                                  "at start-up."),
    timeout: float = typer.Option(300.0, "--timeout", min=0.001, help="Seconds a request may take, queueing included "
                                                                      "(then 504)."),
    prefill_chunk: int = typer.Option(64, "--prefill-chunk", min=0, help="Prompt tokens prefilled per decode step "
                                                                         "while other rows decode (0 = whole prompts)."),
    priority_aging: float = typer.Option(5.0, "--priority-aging", min=0.0,
                                         help="Seconds of waiting that raise a request's priority by one (0 = never)."),
    max_body: int = typer.Option(1 << 20, "--max-body", min=1, help="Largest request body in bytes (then 413)."),
    grace: float = typer.Option(10.0, "--grace", min=0.0, help="Seconds in-flight requests get after SIGTERM."),
    log_level: str = typer.Option("warning", "--log-level", help="uvicorn's and kiln.serve's log level."),
    lora: Optional[list[str]] = typer.Option(
        None, "--lora", metavar="[MODEL:]NAME=ADAPTER_DIR",
        help="Load a PEFT LoRA adapter into the LoRA slots of an artifact compiled with --lora-slots and serve it as "
             "the model MODEL:NAME (same batch as the base); repeat for several. NAME=DIR when one artifact is "
             "served, MODEL:NAME=DIR (MODEL: its served name) when several are. docs/lora.md."),
):
    """Serve artifacts over an OpenAI-compatible HTTP API (docs/serve.md): /v1/completions,
    /v1/chat/completions, /v1/embeddings, /v1/models, /health, /metrics. LoRA adapters (--lora)
    are models of their own, MODEL:NAME, batched with their base."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401

        from kiln.serve import serve
    except ModuleNotFoundError as exc:
        raise KilnError(f"`kiln serve` needs the serve extra (no module '{exc.name}'): pip install 'kiln[serve]'") from None
    _runtime_only_tvm()
    serve(artifacts, host=host, port=port, threads=threads, verify=verify, log_level=log_level, lora=lora,
          max_batch=max_batch, max_queue=max_queue, api_key=api_key, max_body=max_body, timeout=timeout,
          prefill_chunk=prefill_chunk or None, aging=priority_aging, grace=grace)


@app.command("search")
def search_cmd(
    model: str = typer.Argument(..., help="A model name or the path of your model folder, .gguf or .onnx file."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the search: trials, pareto.md, best.toml, best/."),
    space: Optional[Path] = typer.Option(None, "--space", help="Search space TOML (default: kiln/search/spaces/TASK.toml)."),
    max_size: Optional[str] = typer.Option(None, "--max-size", help="Size budget of the artifact, e.g. 60MB."),
    max_ppl_increase: Optional[str] = typer.Option(
        None, "--max-ppl-increase", help="LLM quality budget against the fp32 compile, e.g. 5%, on the evaluation text."),
    min_cosine: Optional[float] = typer.Option(None, "--min-cosine", help="Encoder quality budget: mean cosine to the fp32 compile."),
    objective: str = typer.Option("speed", "--objective", help="What the best trial maximises within the budgets: speed, size or quality."),
    trials: int = typer.Option(12, "--trials", min=1, help="Distinct recipes to measure (the fp32 reference not counted)."),
    time_budget: Optional[str] = typer.Option(None, "--time-budget", help="Stop after this long, e.g. 30m or 2h; running trials are stopped."),
    trial_timeout: Optional[str] = typer.Option(None, "--trial-timeout", help="A trial running longer fails, e.g. 20m."),
    address: Optional[str] = typer.Option(None, "--address", help="A running Ray cluster (HOST:PORT, or ray://HOST:10001); default: Ray embedded here."),
    trial_cpus: Optional[int] = typer.Option(None, "--trial-cpus", min=1, help="CPUs per trial (default: all of a node's, one trial per node)."),
    corpus: str = typer.Option("lee", "--corpus", help="Evaluation text: lee or newsgroups (kiln's calibration text is disjoint from both)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampler."),
    task: Optional[str] = typer.Option(None, "--task", help="causal-lm or embedding (default: inferred)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Load pickle checkpoints (can run code)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the search in OUTPUT: finished trials are kept, interrupted ones rerun."),
):
    """Search recipes for the best artifact within size and quality budgets: each trial (compile,
    `kiln eval`, `kiln bench`) is a Ray task, Optuna picks the next; writes pareto.md, best.toml and best/."""
    from kiln.search import search

    result = search(model, output, space=space, max_size_mb=_size_mb(max_size, "--max-size"),
                    max_ppl_increase=_fraction(max_ppl_increase, "--max-ppl-increase"), min_cosine=min_cosine,
                    objective=objective, trials=trials, time_budget=time_budget, trial_timeout=trial_timeout,
                    address=address, trial_cpus=trial_cpus, corpus=corpus, seed=seed, task=task,
                    allow_pickle=allow_pickle, resume=resume, console=err)
    best = result["best"]
    if best is None:
        raise KilnError(f"no trial met every budget ({len(result['trials'])} trials): see {output / 'pareto.md'}")
    out.print(f"best: trial {best['number']}: {output / 'best.toml'} (artifact {output / 'best'}); "
              f"table and plots in {output / 'pareto.md'}", highlight=False, soft_wrap=True)


@app.command("inspect")
def inspect_cmd(
    path: Path = typer.Argument(..., help="Artifact directory or .onnx file."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="All pass stats."),
    depth: int = typer.Option(512, "--depth", min=0, help="KV depth for the second decode row (LLM)."),
    prompt_tokens: int = typer.Option(512, "--prompt-tokens", min=1, help="Prompt length for the prefill row (LLM)."),
    bandwidth: Optional[float] = typer.Option(None, "--bandwidth", min=0.001,
                                              help="Target read bandwidth, GB/s (default: this machine's, measured once and cached)."),
    flops: Optional[float] = typer.Option(None, "--flops", min=0.001,
                                          help="Target matmul peak, GFLOP/s (default: this machine's numpy sgemm)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Threads of the measured target (default: the artifact's)."),
    measure: bool = typer.Option(False, "--measure", help="Measure this machine again instead of using the cached ceilings."),
):
    """Show ops, parameters, bytes by dtype, the roofline arithmetic per token (bytes, FLOPs, KV bytes and the
    predicted bound on a target) and, for artifacts, the passes applied with their deltas."""
    _state["verbose"] |= verbose
    from kiln import roofline
    from kiln.ir import load_model, summary
    from kiln.manifest import read_manifest

    manifest = None
    if path.is_dir():
        manifest = read_manifest(path)
        model_path = roofline.graph_file(path, manifest)
    else:
        model_path = path
    s = summary(load_model(model_path, load_external=False))
    meta = model_path.parent / "meta.json"  # beside a raw export in kiln's cache: the source config
    layout = (roofline.layout_from_manifest(manifest) if manifest else
              roofline.layout_from_config(json.loads(meta.read_text())) if meta.is_file() else roofline.Layout())
    arith = roofline.analyze(model_path, layout)
    target_threads = threads or (manifest["backend"]["session"].get("intra_op_num_threads") if manifest else None) or 1
    if bandwidth and flops and not measure:
        ceiling = roofline.Ceiling(bandwidth, flops, target_threads, "given")
    else:
        ceiling = roofline.ceiling(target_threads, fresh=measure)
        ceiling = roofline.Ceiling(bandwidth or ceiling.bandwidth_gb_s, flops or ceiling.flops_gflop_s, target_threads,
                                   ceiling.source if not (bandwidth or flops) else f"{ceiling.source}, partly given")
    cases = _roofline_cases(arith, manifest, depth, prompt_tokens, ceiling)
    if as_json:
        print(json.dumps({"summary": s.as_dict(), "passes": manifest["passes"] if manifest else None,
                          "arithmetic": arith.as_dict() | {"cases": cases, "ceiling": dataclasses.asdict(ceiling)}},
                         default=str))
        return
    out.print(f"[bold]{path}[/]" + (f"  ({manifest['task']}, source {manifest['source'].get('source')}, "
                                    f"recipe {manifest['recipe']['name']}, target {manifest['target']['name']})" if manifest else ""))
    out.print(f"nodes {s.nodes}, parameters {s.parameters:,}, parameter bytes {_size(s.parameter_bytes)}")
    io = Table("io", "name", "dtype", "shape")
    for kind, values in (("input", s.inputs), ("output", s.outputs)):
        for v in values:
            io.add_row(kind, v["name"], str(v["dtype"]), str(v["shape"]))
    out.print(io)
    dt = Table("dtype", "bytes", title="parameters by dtype")
    for k, v in s.bytes_by_dtype.items():
        dt.add_row(k, _size(v))
    out.print(dt)
    ops = Table("op", "count", title="ops")
    for k, v in s.ops.items():
        ops.add_row(k, str(v))
    out.print(ops)
    _print_arithmetic(arith, cases, ceiling)
    if manifest:
        out.print(passes_table(manifest["passes"], _state["verbose"]))


def _roofline_cases(arith, manifest: dict | None, depth: int, prompt_tokens: int, ceiling) -> list[dict]:
    """Rows of the roofline table: decode at depth 0 and `depth` and a prefill (LLM), or encoder passes."""
    from kiln.roofline import bound

    rows = []
    if manifest and manifest["task"] == "embedding":
        for batch, seq in ((1, 16), (1, 128), (32, 128)):
            f = arith.forward(batch, seq)
            rows.append({"case": f"forward {batch}x{seq}", "tokens": batch * seq, "bytes": f["bytes"], "flops": f["flops"]})
    else:
        for d in sorted({0, depth}):
            x = arith.decode(d)
            rows.append({"case": f"decode @{d}", "tokens": 1, "bytes": x["bytes"], "flops": x["flops"],
                         "kv_bytes": x["kv_bytes"]})
        if manifest and manifest["task"] == "causal-lm":
            x = arith.prefill(prompt_tokens)
            rows.append({"case": f"prefill {prompt_tokens}", "tokens": prompt_tokens, "bytes": x["bytes"], "flops": x["flops"]})
    for r in rows:
        b = bound(r["bytes"], r["flops"], ceiling)
        r |= {"bytes_per_token": r["bytes"] / r["tokens"], "flops_per_token": r["flops"] / r["tokens"],
              "intensity": b["intensity"], "bound": b["bound"], "ceiling_tok_s": r["tokens"] / b["seconds"]}
    return rows


def _count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.3g}"


def _print_arithmetic(arith, cases: list[dict], ceiling) -> None:
    lay = arith.layout
    out.print(
        f"roofline arithmetic: weights read per token {_size(arith.weight_bytes_per_token)} "
        f"(matmul weights {_size(arith.matmul_bytes)} in {arith.matmuls} ops, embedding rows {_size(arith.gather_row_bytes)}, "
        f"other {_size(arith.other_bytes_per_token)}); FLOPs per token {_count(arith.weight_flops_per_token)} "
        f"(2 x {arith.matmul_params:,} matmul parameters) + attention {_count(lay.attention_flops_per_context_token)} "
        f"per token of context; " + (f"KV cache {_size(arith.kv_bytes_per_token)} per token" if lay.kv_cache else "no KV cache"),
        highlight=False)
    for note in arith.notes:
        out.print(f"  note: {note}", highlight=False)
    table = Table("case", "bytes/token", "FLOPs/token", "FLOP/byte", "bound", "ceiling tok/s",
                  title=f"roofline on the target: {ceiling.bandwidth_gb_s:g} GB/s read, {ceiling.flops_gflop_s:g} GFLOP/s "
                        f"(balance {ceiling.balance:.1f} FLOP/byte; {ceiling.threads} thread(s), {ceiling.source})")
    for r in cases:
        table.add_row(r["case"], _size(r["bytes_per_token"]), _count(r["flops_per_token"]), f"{r['intensity']:.2f}",
                      r["bound"], f"{r['ceiling_tok_s']:,.1f}")
    out.print(table)


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def _one_line(text: str) -> str:
    """An error message as one printable line: control characters from user data (a newline, a
    record separator in a manifest field) are written as escapes, never as line breaks."""
    return escape("".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text))


def main() -> None:
    # SIGTERM unwinds like Ctrl-C, so temporary artifact directories are removed.
    signal.signal(signal.SIGTERM, _on_sigterm)
    debug = "--debug" in sys.argv
    try:
        code = app(standalone_mode=False)
        if code == 130:  # typer turns Ctrl-C / SIGTERM into an exit code
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except KilnError as exc:
        if debug:
            raise
        err.print(f"[red]error:[/] {_one_line(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("[red]error:[/] interrupted; no artifact was written", highlight=False)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # usage errors (typer's click) and unexpected failures
        command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
        missing = missing_extra(exc, f"`kiln {command}`") if isinstance(exc, ModuleNotFoundError) else exc
        if missing is not exc and not debug:  # a compile-only command where only the runtime is installed
            err.print(f"[red]error:[/] {_one_line(str(missing))}", highlight=False, soft_wrap=True)
            sys.exit(1)
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            ctx = getattr(exc, "ctx", None)
            where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            err.print(f"[red]error:[/] {_one_line(exc.format_message())}{where}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        if debug:
            raise
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        err.print(f"[red]error:[/] internal error: {type(exc).__name__}: {_one_line(text)} (rerun with --debug for the traceback)",
                  highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
