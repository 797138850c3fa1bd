"""An .onnx file exported elsewhere (for example by Optimum), with its tokenizer beside it.

The task is read from the graph (`--task` overrides it):
- causal-lm:  `input_ids` [batch, sequence] and a first output `logits` [batch, sequence, vocab];
  extra `attention_mask` / `position_ids` inputs of an export without a cache are bound to
  "no padding" and "0..S-1" inside the graph, so the file takes kiln's export contract
  (`input_ids` only) and gets the KV-cache pass like a kiln export;
- sequence-classification: an output `logits` [batch, labels];
- embedding: an output `sentence_embedding` or `embedding` [batch, hidden], or
  `last_hidden_state` [batch, sequence, hidden] pooled here (mean over the mask by default,
  or what a sentence-transformers folder beside it says; L2-normalised if it says so).
Anything else compiles as a custom graph. A file that already takes a KV cache is refused:
kiln inserts its own. Metadata (vocab, position limit, eos ids, labels) comes from the
`config.json` and `generation_config.json` beside the file when they are there.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir

from kiln.errors import KilnError
from kiln.ir import load_model
from kiln.models.export import Prepared
from kiln.models.local import TASKS, folder_tokenizer, read_json, sentence_transformers_info
from kiln.manifest import sha256_file


class OnnxFileError(KilnError):
    pass


def _dims(value: ir.Value) -> list:
    return [] if value.shape is None else [d if isinstance(d, int) else str(d) for d in value.shape]


def infer_onnx_task(model: ir.Model) -> str:
    inputs = {v.name for v in model.graph.inputs}
    outputs = {v.name: v for v in model.graph.outputs}
    if any("past" in name for name in inputs):
        raise OnnxFileError("the ONNX file already takes a KV cache (past inputs); kiln inserts its own: "
                            "export it without one (Optimum: --task text-generation, not text-generation-with-past)")
    if "input_ids" not in inputs:
        return "custom"
    first = model.graph.outputs[0]
    if first.name == "logits" and len(_dims(first)) == 3:
        return "causal-lm"
    if "logits" in outputs and len(_dims(outputs["logits"])) == 2:
        return "sequence-classification"
    if any(n in outputs for n in ("sentence_embedding", "embedding", "last_hidden_state")):
        return "embedding"
    return "custom"


MAX_INPUT_DIM = 1 << 20  # a fixed input size beyond this cannot be fed sample inputs (a million tokens)


def _check_declared_shapes(model: ir.Model, name: str) -> None:
    """Fixed sizes of the graph's inputs and outputs must be >= 0, and an input's small enough to feed."""
    for kind, values in (("input", model.graph.inputs), ("output", model.graph.outputs)):
        for value in values:
            if kind == "input" and value.dtype in (None, ir.DataType.UNDEFINED):
                raise OnnxFileError(f"{name}: the graph's input '{value.name}' declares no element type: "
                                    f"kiln cannot feed it")
            for axis, dim in enumerate(_dims(value)):
                if kind == "input" and isinstance(dim, int) and dim == 0:
                    raise OnnxFileError(f"{name}: the graph's input '{value.name}' declares size 0 on axis {axis}: "
                                        f"an empty input cannot be fed or checked")
                if isinstance(dim, int) and dim < 0:
                    raise OnnxFileError(f"{name}: the graph's {kind} '{value.name}' declares size {dim} on axis {axis}: "
                                        f"a size must be >= 0 (or symbolic)")
                if kind == "input" and isinstance(dim, int) and dim > MAX_INPUT_DIM:
                    raise OnnxFileError(f"{name}: the graph's input '{value.name}' declares size {dim} on axis {axis}: "
                                        f"more than kiln can feed (at most {MAX_INPUT_DIM})")


def _bind_causal_inputs(model: ir.Model) -> None:
    """attention_mask := ones [B, S], position_ids := 0..S-1 in every row, computed from input_ids."""
    graph = model.graph
    ids = next(v for v in graph.inputs if v.name == "input_ids")
    others = [v for v in graph.inputs if v is not ids]
    unknown = [v.name for v in others if v.name not in ("attention_mask", "position_ids")]
    if unknown:
        raise OnnxFileError(f"the causal LM's input '{unknown[0]}' is not one kiln can bind (input_ids, "
                            "attention_mask, position_ids)")
    tape = ir.tape.Tape()

    def const(array) -> ir.Value:
        return tape.op("Constant", [], attributes={"value": ir.tensor(np.asarray(array))})

    shape = tape.op("Shape", [ids])
    for value in others:
        if value.name == "attention_mask":
            new = tape.op("ConstantOfShape", [shape], attributes={"value": ir.tensor(np.array([1], dtype=np.int64))})
        else:
            length = tape.op("Squeeze", [tape.op("Shape", [ids], attributes={"start": 1, "end": 2})])
            counter = tape.op("Unsqueeze", [tape.op("Range", [const(np.int64(0)), length, const(np.int64(1))]),
                                            const(np.array([0]))])
            new = tape.op("Expand", [counter, shape])
        if value.dtype not in (None, ir.DataType.INT64):
            new = tape.op("Cast", [new], attributes={"to": value.dtype})
        value.replace_all_uses_with(new)
    graph.insert_before(next(iter(graph)), tape.nodes)
    for value in others:
        graph.inputs.remove(value)


def _pool(model: ir.Model, pooling: str, normalize: bool) -> None:
    """last_hidden_state [B, S, D] -> embedding [B, D]: mean over the mask, or the first token."""
    graph = model.graph
    hidden = next(v for v in graph.outputs if v.name == "last_hidden_state")
    mask = next((v for v in graph.inputs if v.name == "attention_mask"), None)
    if mask is None or pooling not in ("mean", "cls"):
        raise OnnxFileError(f"cannot pool last_hidden_state by {pooling} "
                            f"{'without an attention_mask input' if mask is None else ''}".strip())
    tape = ir.tape.Tape()

    def const(array) -> ir.Value:
        return tape.op("Constant", [], attributes={"value": ir.tensor(np.asarray(array))})

    if pooling == "mean":
        weights = tape.op("Unsqueeze", [tape.op("Cast", [mask], attributes={"to": ir.DataType.FLOAT}),
                                        const(np.array([-1]))])
        summed = tape.op("ReduceSum", [tape.op("Mul", [hidden, weights]), const(np.array([1]))],
                         attributes={"keepdims": 0})
        count = tape.op("Max", [tape.op("ReduceSum", [weights, const(np.array([1]))], attributes={"keepdims": 0}),
                                const(np.array(1e-9, dtype=np.float32))])
        pooled = tape.op("Div", [summed, count])
    else:
        pooled = tape.op("Gather", [hidden, const(np.int64(0))], attributes={"axis": 1})
    if normalize:
        norm = tape.op("Max", [tape.op("ReduceL2", [pooled, const(np.array([-1]))], attributes={"keepdims": 1}),
                               const(np.array(1e-12, dtype=np.float32))])
        pooled = tape.op("Div", [pooled, norm])
    graph.extend(tape.nodes)
    for node in graph:  # the output's contract name may be taken by an internal value
        for value in node.outputs:
            if value.name == "embedding" and value is not pooled:
                value.name = "embedding_internal"
    pooled.name, pooled.dtype = "embedding", ir.DataType.FLOAT
    pooled.shape = ir.Shape([hidden.shape[0], hidden.shape[2]]) if hidden.shape is not None else None
    graph.outputs.clear()
    graph.outputs.append(pooled)


def _meta_from_config(folder: Path, config: dict, task: str, model: ir.Model) -> dict:
    meta: dict = {"task": task}
    if "auto_map" in config:
        raise OnnxFileError(f"{folder / 'config.json'}: auto_map asks for custom model code, which kiln never runs")
    logits = next((v for v in model.graph.outputs if v.name == "logits"), None)
    vocab = config.get("vocab_size") or (_dims(logits)[-1] if logits is not None and task == "causal-lm" else None)
    meta["vocab_size"] = vocab if isinstance(vocab, int) else None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(config.get(key), int):
            meta["max_positions"] = config[key]
            break
    window = config.get("sliding_window")
    if isinstance(window, int) and config.get("use_sliding_window", True) is not False:
        meta["attention_windows"] = [window]
    if task == "sequence-classification":
        labels = config.get("id2label") or {}
        n = _dims(logits)[-1] if logits is not None else len(labels)
        if not isinstance(n, int):
            n = len(labels) or 1
        meta["labels"] = [str(labels.get(str(i), f"LABEL_{i}")) for i in range(n)]
        meta["problem_type"] = config.get("problem_type") or ("regression" if n == 1 else "single_label_classification")
    return meta


def onnx_prepared(path: Path, task: str | None, workdir: Path) -> Prepared:
    """Check, normalise and describe an ONNX file; the normalised copy goes to `workdir`."""
    if task is not None and task not in TASKS:
        raise OnnxFileError(f"unknown task '{task}' (known: {', '.join(TASKS)})")
    model = load_model(path)
    if not model.graph.outputs:
        raise OnnxFileError(f"{path.name}: the ONNX graph has no outputs: there is nothing to compile")
    _check_declared_shapes(model, path.name)
    task = task or infer_onnx_task(model)
    folder = path.parent
    config_file = folder / "config.json"
    config = read_json(config_file, "config.json") if config_file.is_file() else {}
    meta = {"source": path.name, "sha256": sha256_file(path), **_meta_from_config(folder, config, task, model)}
    tokenizer_json, template, special = folder_tokenizer(folder) if task != "custom" else (None, None, None)
    changed = False
    if task == "causal-lm":
        if [v.name for v in model.graph.inputs] != ["input_ids"]:
            _bind_causal_inputs(model)
            changed = True
        gen_file = folder / "generation_config.json"
        gen = read_json(gen_file, "generation_config.json") if gen_file.is_file() else {}
        eos = gen.get("eos_token_id", config.get("eos_token_id", getattr(special, "eos_token_id", None)))
        eos_ids = sorted({e for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int)})
        pad = gen.get("pad_token_id", config.get("pad_token_id", getattr(special, "pad_token_id", None)))
        meta["generation"] = {"eos_token_ids": eos_ids, "bos_token_id": gen.get("bos_token_id"),
                              "pad_token_id": pad if pad is not None else (eos_ids[0] if eos_ids else None),
                              "chat_template": template}
    elif task == "embedding":
        outputs = {v.name: v for v in model.graph.outputs}
        st = sentence_transformers_info(folder) or {"pooling": "mean", "normalize": False}
        meta.update(pooling=st["pooling"], normalize=st["normalize"],
                    max_sequence_length=st.get("max_sequence_length") or meta.get("max_positions"))
        if "embedding" not in outputs:
            pooled = outputs.get("sentence_embedding")
            if pooled is not None and len(_dims(pooled)) == 2:
                pooled.name = "embedding"
                model.graph.outputs.clear()
                model.graph.outputs.append(pooled)
                meta["pooling"] = "in the graph"
            else:
                _pool(model, st["pooling"], st["normalize"])
            changed = True
    elif task == "sequence-classification":
        meta["max_sequence_length"] = meta.get("max_positions")
    if not changed:
        return Prepared(path, meta, _write_tokenizer(tokenizer_json, workdir))
    ir.save(model, workdir / "model.onnx", external_data="model.onnx.data")
    (workdir / "meta.json").write_text(json.dumps(meta, indent=2))
    return Prepared(workdir / "model.onnx", meta, _write_tokenizer(tokenizer_json, workdir))


def _write_tokenizer(text: str | None, workdir: Path) -> Path | None:
    if text is None:
        return None
    (workdir / "tokenizer.json").write_text(text)
    return workdir / "tokenizer.json"
