"""`kiln.compile`: source -> export -> verified pass pipeline -> backend -> artifact dir.

The artifact is built in a temporary sibling directory and renamed into place only
after it has been written, reloaded and run once, so a failed or interrupted compile
leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import inspect
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import kiln
from kiln.backends import create_session, get_backend
from kiln.errors import KilnError
from kiln.ir import VerificationError, kv_layout, load_model, summary, verify
from kiln.manifest import MANIFEST, SCHEMA_VERSION, ManifestError, check_manifest, describe_files, write_manifest
from kiln.models import Loaded, Prepared, export_loaded, get_source, prepare, sample_inputs
from kiln.models.export import read_export, write_export
from kiln.models.local import module_fingerprint, tokenizer_text
from kiln.models.onnx_file import onnx_prepared
from kiln.models.cache import atomic_dir, cache_root, exclusive, remove_stale
from kiln.models.sources import SOURCES
from kiln.parity import parity_gate
from kiln.passes.numerics import compare
from kiln.passes.pipeline import run_pipeline
from kiln.passes.quality import QualityBudget, budget_problem
from kiln.recipes import default_recipe, load_recipe
from kiln.targets import get_target


class CompileError(KilnError):
    pass


@dataclasses.dataclass
class CompileResult:
    path: Path
    manifest: dict[str, Any]


def _from_module(module, example_inputs, dynamic_shapes, workdir: Path, task: str | None,
                 tokenizer) -> tuple[Prepared, dict]:
    """A plain torch.nn.Module: exported with its example inputs. With `task="causal-lm"` (inputs
    `input_ids` only, first output logits [batch, sequence, vocab]) and a tokenizer it becomes an
    LLM artifact that the runtime generates with; otherwise a custom graph."""
    import torch

    if isinstance(example_inputs, (tuple, list)):
        # Positional inputs take the names of forward()'s parameters.
        names = list(inspect.signature(module.forward).parameters)[: len(example_inputs)]
        example_inputs = dict(zip(names, example_inputs))
    if not isinstance(example_inputs, dict) or not example_inputs:
        raise CompileError("a torch.nn.Module needs example_inputs: a tuple of tensors or a dict name -> tensor")
    if task not in (None, "causal-lm"):
        raise CompileError(f"a plain torch.nn.Module compiles as task causal-lm or as a custom graph, not {task}")
    meta: dict[str, Any] = {"task": task or "custom", "source": type(module).__name__}
    if task == "causal-lm":
        if list(example_inputs) != ["input_ids"]:
            raise CompileError(f"a causal-lm module takes input_ids alone, not {list(example_inputs)}")
        with torch.no_grad():
            logits = module(example_inputs["input_ids"])
        logits = getattr(logits, "logits", logits)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
            raise CompileError("a causal-lm module returns logits [batch, sequence, vocab]")
        eos = getattr(tokenizer, "eos_token_id", None)
        meta.update(vocab_size=int(logits.shape[-1]), generation={
            "eos_token_ids": [eos] if eos is not None else [], "bos_token_id": getattr(tokenizer, "bos_token_id", None),
            "pad_token_id": getattr(tokenizer, "pad_token_id", None) or eos,
            "chat_template": getattr(tokenizer, "chat_template", None)})
        dynamic_shapes = dynamic_shapes or {"input_ids": {0: "batch", 1: "sequence"}}
        from kiln.models.wrappers import LogitsOf

        module = LogitsOf(module)
    loaded = Loaded(module, example_inputs, dynamic_shapes, meta)
    seconds = export_loaded(loaded, workdir)
    meta.update({"export_seconds": round(seconds, 1),
                 "sha256": hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in module.state_dict().values()
                                                   if isinstance(t, torch.Tensor))).hexdigest()})
    tok_path = None
    if tokenizer is not None:
        tok_path = workdir / "tokenizer.json"
        tok_path.write_text(tokenizer_text(tokenizer))
    feeds = {k: v.detach().numpy() for k, v in example_inputs.items()}
    if task == "causal-lm":
        feeds = None  # sample inputs of the causal-LM signature (batch 2, real text) are made later
    return Prepared(workdir / "model.onnx", meta, tok_path), feeds


def compile(  # noqa: A001
    model,
    output: str | Path,
    *,
    recipe: str | Path | None = None,
    target: str = "cpu",
    backend: str = "ort",
    force: bool = False,
    example_inputs: dict | None = None,
    dynamic_shapes: dict | None = None,
    calibration: str | Path | None = None,
    target_params: float | None = None,
    target_mb: float | None = None,
    max_ppl_increase: float | None = None,
    min_cosine: float | None = None,
    tune_minutes: float | None = None,
    task: str | None = None,
    tokenizer=None,
    allow_pickle: bool = False,
    lora: str | Path | None = None,
    lora_slots: int | None = None,
    lora_rank: int = 16,
    lora_targets: list[str] | None = None,
    progress: bool = True,
    console=None,
) -> CompileResult:
    """Compile `model` into the artifact directory `output`. `model` is a kiln model name, the
    path of a Hugging Face or sentence-transformers folder, a .gguf or an .onnx file, a
    transformers model object (with its `tokenizer`), or a torch.nn.Module with `example_inputs`.

    `task` overrides the inferred one (causal-lm, embedding, sequence-classification).
    Pickle checkpoints are refused unless `allow_pickle`.

    `recipe` defaults to the target's (cpu, gpu: fp32; npu: npu-int8), except that a causal
    LM on the cpu through ORT gets int4. `calibration` is a text file for data-aware passes
    (default: kiln's calibration corpus, which is disjoint from the evaluation corpus).
    `max_ppl_increase` (LLMs, e.g. 0.05 for +5%) and `min_cosine` (encoders) are quality
    budgets measured on held-out text after every lossy pass; the first pass over budget
    fails the compile and nothing is written.

    `lora` is a PEFT LoRA adapter folder merged into the weights before export; `lora_slots` instead
    compiles the base with that many swappable adapters of rank <= `lora_rank` on the linear layers
    named in `lora_targets` (default: all but the output head), chosen per row at run time
    (docs/lora.md)."""
    start = time.perf_counter()
    # Validate everything cheap before any expensive work.
    profile = get_target(target)
    source, loaded = _resolve(model, task, allow_pickle, tokenizer, example_inputs)
    if lora is not None or lora_slots is not None:
        source = _with_lora(source, lora, lora_slots, lora_rank, lora_targets)
    source_task = source.task if source else loaded.meta["task"] if loaded else task
    plan = load_recipe(recipe or default_recipe(profile, backend, source_task))
    if target_params is not None or target_mb is not None:
        from kiln.passes.structural import retarget_steps

        plan = dataclasses.replace(plan, steps=retarget_steps(plan.steps, target_params, target_mb))
    be = get_backend(backend, **({} if tune_minutes is None else {"tune_minutes": tune_minutes}))
    if getattr(be, "static_cache_length", 0):
        plan = dataclasses.replace(plan, steps=[(n, {**p, "static_length": be.static_cache_length}
                                                 if n == "insert-kv-cache" else p) for n, p in plan.steps])
    if problem := budget_problem(max_ppl_increase, min_cosine):
        raise CompileError(problem)
    output = _check_output(Path(output).expanduser(), force)
    remove_stale(Path(tempfile.gettempdir()), "kiln-export-tmp-*")

    with _writer_lock(output), tempfile.TemporaryDirectory(prefix=f"kiln-export-tmp-{os.getpid()}-") as scratch:
        feeds = None
        if source is not None:
            prepared = prepare(source, progress=progress, console=console)
            if source.path is not None:  # not from the export cache: two folders may share one entry
                prepared.meta["path"] = source.path.name  # its name: no path of the compiling machine
        elif loaded is not None:
            write_export(loaded, Path(scratch), {"source": type(model).__name__,
                                                 "sha256": module_fingerprint(model)})
            prepared = read_export(Path(scratch))
        elif _is_onnx_path(model):
            path = Path(model).expanduser()
            if not path.is_file():
                raise CompileError(f"{path}: no such ONNX file")
            prepared = onnx_prepared(path, task, Path(scratch))
        else:
            prepared, feeds = _from_module(model, example_inputs, dynamic_shapes, Path(scratch), task, tokenizer)

        ir_model = load_model(prepared.path)
        try:
            verify(ir_model)
        except VerificationError as exc:
            raise CompileError(f"source model is invalid: {exc}") from exc
        slots = prepared.meta.get("lora", {}).get("mode") == "slots"
        if slots:
            from kiln.models.lora import slot_initializers

            prepared.meta["lora"] = slot_initializers(ir_model, prepared.meta["lora"])
        before = summary(ir_model)
        if feeds is None:
            feeds = sample_inputs(prepared.meta, _static_signature(before.inputs, profile.static_shapes),
                                  tokenizer=prepared.tokenizer)
        lowering = be.lowering_passes(profile) if plan.lower else []
        passes = plan.build() + lowering
        limit = prepared.meta.get("max_positions")
        for p in passes:
            if limit and p.name == "fuse-attention":  # the rotary cache covers the model's positions, no more
                p.max_positions = limit
        calib, calib_info = _calibration(passes, prepared, before.inputs, feeds, calibration, plan.calibration_windows)
        quality = _quality_budget(prepared, before.inputs, max_ppl_increase, min_cosine)
        gate = None
        if prepared.reference is not None:
            reference = dict(np.load(prepared.reference))
            gate = lambda m, done: parity_gate(m, reference, prepared.task, done)  # noqa: E731
        blocks = source.blocks() if source is not None and source.blocks and any(p.uses_source_blocks for p in passes) \
            else None
        run = run_pipeline(ir_model, passes, feeds, calibration=calib, source_blocks=blocks, quality=quality,
                           progress=progress, console=console, checkpoint=gate)
        ir_model, records, feeds = run.model, run.records, run.feeds
        if slots:  # the probe adapters leave: an artifact's slots are empty until a runtime loads adapters
            from kiln.models.lora import bind_slots

            prepared.meta["lora"] = bind_slots(ir_model, prepared.meta["lora"])
            feeds = {**feeds, "adapter_index": np.ones(feeds["input_ids"].shape[0], dtype=np.int64)}
        after = summary(ir_model)

        try:
            with atomic_dir(output, "replace" if force else "new") as tmp:
                backend_info = be.write(ir_model, tmp, profile)
                backend_info["lowering"] = [p.name for p in lowering]
                tokenizer = None
                if prepared.tokenizer is not None:
                    shutil.copy(prepared.tokenizer, tmp / "tokenizer.json")
                    tokenizer = "tokenizer.json"
                manifest = _manifest(ir_model, prepared, plan, profile, backend_info, records, before, after, tokenizer)
                if calib_info:
                    manifest["compile"]["calibration"] = calib_info
                if run.quality:
                    manifest["compile"]["quality_budget"] = run.quality
                if run.checkpoint is not None:
                    manifest["compile"]["parity"] = run.checkpoint
                check = be.check_feeds(ir_model, feeds) if hasattr(be, "check_feeds") else feeds
                manifest["compile"]["artifact_check"] = _check_artifact(tmp, backend_info, ir_model, check,
                                                                        profile.precision)
                manifest["compile"]["seconds"] = round(time.perf_counter() - start, 1)
                manifest["files"] = describe_files(tmp)
                try:
                    check_manifest(manifest, "the manifest")
                except ManifestError as exc:
                    raise CompileError(f"{exc} (a kiln bug or an invalid recipe field); nothing was written") from exc
                write_manifest(tmp, manifest)
        except FileExistsError as exc:
            raise CompileError(f"{output} appeared while compiling (another process wrote it); nothing was written") from exc
        except OSError as exc:
            raise CompileError(f"could not write the artifact to {output}: {exc.strerror or exc}; nothing was written") from exc
    return CompileResult(output, manifest)


def _check_output(output: Path, force: bool) -> Path:
    """Refuse, before any work, an output that `--force` must not replace or that cannot be written:
    `--force` replaces only a kiln artifact or an empty directory, never `/`, the home directory,
    the working directory or one above it, or the kiln cache."""
    where = output.resolve()
    cwd, cache = Path.cwd().resolve(), cache_root().resolve()
    for what, path in (("the root directory", Path("/")), ("your home directory", Path.home().resolve()),
                       ("the working directory", cwd), ("the kiln cache", cache)):
        if where == path:
            raise CompileError(f"refusing to write the artifact to {output}: it is {what}")
    if where in cwd.parents:
        raise CompileError(f"refusing to write the artifact to {output}: it holds the working directory")
    if where in cache.parents or any(where == d or d in where.parents for d in map(cache.joinpath, CACHE_ENTRIES)):
        raise CompileError(f"refusing to write the artifact to {output}: it holds the kiln cache or is one of its entries")
    if output.is_symlink():
        raise CompileError(f"{output} is a symbolic link; give the artifact directory itself")
    if output.exists():
        if not output.is_dir():
            raise CompileError(f"{output} is a file, not an artifact directory; nothing was written")
        if not force:
            raise CompileError(f"{output} already exists (use --force to replace it)")
        entries = sorted(p.name for p in output.iterdir())
        if entries and not _is_artifact(output):
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise CompileError(f"{output} is not a kiln artifact (it holds {shown} and no kiln.json): --force "
                               f"replaces only a kiln artifact or an empty directory")
    parent = output.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CompileError(f"cannot create {output}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CompileError(f"cannot write the artifact to {output}: {parent} is not writable")
    return output


def _is_artifact(directory: Path) -> bool:
    """A directory kiln wrote: its kiln.json is a JSON object naming a kiln and schema version."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(manifest, dict) and {"kiln_version", "schema_version"} <= manifest.keys()


@contextlib.contextmanager
def _writer_lock(output: Path):
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive(output):
            yield
    except BlockingIOError as exc:
        raise CompileError(f"another kiln compile is writing {output}; nothing was written") from exc


def _is_onnx_path(model) -> bool:
    return isinstance(model, (str, Path)) and str(model).lower().endswith(".onnx")


def _resolve(model, task, allow_pickle, tokenizer, example_inputs):
    """(a Source to prepare, or a Loaded transformers object, or neither for ONNX files and
    plain modules). Checks everything cheap: names, paths, configs, weight files."""
    from kiln.models.local import TASKS, module_loaded, path_source

    if task is not None and task not in TASKS:
        raise CompileError(f"unknown task '{task}' (known: {', '.join(TASKS)})")
    if isinstance(model, str) and model in SOURCES:
        if task is not None and task != SOURCES[model].task:
            raise CompileError(f"{model} is a {SOURCES[model].task} model; --task {task} does not apply")
        return SOURCES[model], None
    if _is_onnx_path(model):
        return None, None
    if isinstance(model, (str, Path)):
        path = Path(model).expanduser()
        if not path.exists() and isinstance(model, str) and "/" not in model and not path.suffix:
            get_source(model)  # an unknown name: its error lists the known ones
        return path_source(path, task=task, allow_pickle=allow_pickle), None
    if example_inputs is None and hasattr(model, "config") and hasattr(model, "state_dict"):
        return None, module_loaded(model, tokenizer, task)
    return None, None


def _with_lora(source, lora, slots, rank, targets):
    """The source with the LoRA adapter merged, or with LoRA slots, when it loads (models/lora.py)."""
    option = "--lora" if slots is None else "--lora-slots"
    if lora is not None and slots is not None:
        raise CompileError("--lora merges one adapter and --lora-slots serves adapters chosen at run time: give one")
    if source is None:
        raise CompileError(f"{option} needs a model folder, a .gguf file or a kiln model name (its PyTorch weights), "
                           "not an ONNX file or a model object")
    from kiln.models.lora import lora_source, slots_source

    return lora_source(source, lora)[0] if slots is None else slots_source(source, slots, rank, targets)


def _static_signature(signature: list[dict], static: dict[str, int] | None) -> list[dict]:
    """The signature with the target's fixed dims: sample inputs must already have the shapes
    that the lowering's shape specialisation gives the graph."""
    if not static:
        return signature
    return [{**spec, "shape": [static.get(d, d) if isinstance(d, str) else d for d in spec["shape"] or []]}
            for spec in signature]


def _calibration(passes, prepared: Prepared, signature, feeds, text, windows: int | None,
                 ) -> tuple[list | None, dict | None]:
    """Calibration feeds when some pass is data-aware: windows of real text, or the sample
    inputs when kiln has no tokenizer for the model (recorded, as they are a poor sample)."""
    if not any(p.uses_calibration for p in passes):
        return None, None
    from kiln.corpus import CALIBRATION_WINDOWS, calibration_corpus, text_feeds

    if prepared.tokenizer is None:
        return [feeds], {"text": None, "note": "no tokenizer: calibrated on the sample inputs only"}
    path = Path(text) if text else calibration_corpus()
    calib = text_feeds(prepared.tokenizer, signature, path, samples=windows or CALIBRATION_WINDOWS,
                       length=_window(prepared, 256))
    return calib, {"text": path.name, "windows": len(calib), "tokens": int(sum(f["input_ids"].size for f in calib))}


def _quality_budget(prepared: Prepared, signature, max_ppl_increase, min_cosine) -> QualityBudget | None:
    """Held-out windows of the evaluation corpus (never the calibration text)."""
    if max_ppl_increase is None and min_cosine is None:
        return None
    from kiln.corpus import default_corpus, text_feeds

    if max_ppl_increase is not None and prepared.task != "causal-lm":
        raise CompileError(f"--max-ppl-increase needs a causal LM; this model's task is {prepared.task} "
                           "(use --min-cosine for encoders)")
    if min_cosine is not None and prepared.task == "causal-lm":
        raise CompileError("--min-cosine is for encoders; use --max-ppl-increase for causal LMs")
    if prepared.tokenizer is None:
        raise CompileError("a quality budget needs the model's tokenizer (kiln has none for this source)")
    if max_ppl_increase is not None:
        return QualityBudget("ppl_increase", max_ppl_increase, text_feeds(
            prepared.tokenizer, signature, default_corpus(), samples=4, length=_window(prepared, 256)))
    return QualityBudget("cosine", min_cosine, text_feeds(prepared.tokenizer, signature, default_corpus(),
                                                         samples=16, length=_window(prepared, 128)))


def _window(prepared: Prepared, tokens: int) -> int:
    """`tokens`, or fewer where the model holds fewer positions: no window runs past its table."""
    limits = [n for n in (prepared.meta.get("max_sequence_length"), prepared.meta.get("max_positions")) if n]
    return min([tokens, *limits])


# The kiln cache's own folders (exports, fetched wheels and sources, corpora, TVM tuning logs):
# an artifact may be written elsewhere in the cache (the benchmarks do), never over these.
CACHE_ENTRIES = ("exports", "wheels", "sources", "corpus", "tvm-tuning")


# max_rel allowed between the written artifact and the pipeline's last stage: the backend's own
# graph optimizations reorder arithmetic, which fp16 rounds ten times more coarsely (SmolLM2 on
# the gpu profile measured 2.5e-3 on the CPU EP)
ARTIFACT_TOLERANCE = {"fp16": 1e-2}


def _check_artifact(directory: Path, backend_info: dict, model, feeds: dict[str, np.ndarray],
                    precision: str = "fp32") -> dict:
    """Reload the written artifact with the backend's own session settings and compare it
    with the pipeline's last stage, run by ORT, on the sample inputs (for a TVM artifact this
    is the cross-check against ORT)."""
    from kiln.passes.numerics import run_ort

    session = create_session(directory, backend_info)
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(names, feeds)))
    delta = compare(run_ort(model, feeds), got)
    tolerance = ARTIFACT_TOLERANCE.get(precision, 1e-3)
    if delta["max_rel"] > tolerance:
        raise CompileError(f"the written artifact disagrees with the compiled graph: max_rel {delta['max_rel']:.3g} "
                           f"(tolerance {tolerance:g} for {precision})")
    return {k: float(f"{v:.4g}") for k, v in delta.items()}


def _manifest(model, prepared, plan, profile, backend_info, records, before, after, tokenizer) -> dict:
    meta = prepared.meta
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "kiln_version": kiln.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "task": prepared.task,
        "source": {k: v for k, v in meta.items() if k not in ("generation", "task", "lora")},
        "recipe": {**plan.as_dict(), "path": Path(plan.path).name if plan.path else None},
        "target": profile.as_dict(),
        "backend": backend_info,
        "io": {"inputs": after.inputs, "outputs": after.outputs},
        "passes": records,
        "summary": {
            "source": {"nodes": before.nodes, "parameters": before.parameters, "parameter_bytes": before.parameter_bytes},
            "artifact": {"nodes": after.nodes, "parameters": after.parameters, "parameter_bytes": after.parameter_bytes,
                         "ops": after.ops, "bytes_by_dtype": after.bytes_by_dtype},
        },
        "tokenizer": tokenizer,
        "compile": {"export_seconds": meta.get("export_seconds")},
    }
    if meta.get("lora"):
        manifest["lora"] = meta["lora"]
    layout = kv_layout(model)
    if layout is not None:
        limit = meta.get("max_positions")
        if limit:  # the model's own limit (config, rope scaling), or the rotary cache's if that is shorter
            layout = dataclasses.replace(layout, max_positions=min(limit, layout.max_positions or limit))
        manifest["kv_cache"] = layout.as_dict()
    if prepared.task == "causal-lm":
        manifest["generation"] = {"max_new_tokens": 64, "do_sample": False, **meta.get("generation", {})}
    elif prepared.task in ("embedding", "sequence-classification"):
        longest = meta.get("max_sequence_length", meta.get("max_position_embeddings"))
        if profile.static_shapes:  # the runtime truncates to what the static graph takes
            longest = min(longest or profile.static_shapes["sequence"], profile.static_shapes["sequence"])
        if prepared.task == "embedding":
            manifest["embedding"] = {"pooling": meta.get("pooling", "mean"), "normalize": meta.get("normalize", True),
                                     "max_sequence_length": longest}
        else:
            manifest["classification"] = {"labels": meta["labels"], "problem_type": meta["problem_type"],
                                          "max_sequence_length": longest}
    return manifest
