"""The parity gate: the compiled graph against the source PyTorch model, before any artifact
is written.

The pipeline checks every pass against the stage before it on short sample inputs. The
gate checks the whole chain against the model the user gave, on inputs chosen to exercise
what the model declares (`kiln.models.export.gate_inputs`): batch 2, the second row padded
(left for a causal LM, as the runtime pads a batch), and longer than any attention window
in the config. It runs where the graph is last exact (just before the first lossy pass, or
at the end); every later stage is tied to it by its own pass check and the final artifact
to the last stage by the compiler's artifact check.

A causal LM is driven as a runtime drives it: a prefill of all but the last DECODE_STEPS
tokens, then one token per step through the KV cache, batched with the padding in the
attention mask and the positions counting real tokens only (one row at a time where the
layout says `padded_prefill: false`). The logits at every real position must match
PyTorch's within TOLERANCE (max_rel, relative to the largest logit). Encoders and
classifiers run the batch once and are compared the same way.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kiln.errors import KilnError
from kiln.ir import kv_layout
from kiln.manifest import KVLayout
from kiln.passes.kv_layout import cache_feeds, quiet_session
from kiln.passes.numerics import compare

TOLERANCE = 1e-3
DECODE_STEPS = 4


class ParityError(KilnError):
    pass


def _session(model: ir.Model):
    session = quiet_session(model)  # basic optimizations, as the pass checks run it; errors as our own line
    names = [o.name for o in session.get_outputs()]
    return lambda feeds: dict(zip(names, session.run(names, feeds)))


def _decode(run, model: ir.Model, layout: KVLayout | None, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Logits [B, S, V] for rows `ids` with `mask`, computed as a runtime would."""
    if layout is None:  # no cache: one full-sequence run
        return run({"input_ids": ids})[model.graph.outputs[0].name]
    seq = ids.shape[1]
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)
    split = max(1, seq - DECODE_STEPS)
    feeds = {**cache_feeds(layout, ids[:, :split]), "attention_mask": mask[:, :split],
             "position_ids": positions[:, :split]}
    logits_name = model.graph.outputs[0].name
    pieces = []
    for end in [split, *range(split + 1, seq + 1)]:
        out = run(feeds)
        pieces.append(out[logits_name])
        if end == seq:
            break
        feeds = {"input_ids": ids[:, end:end + 1], "attention_mask": mask[:, :end + 1],
                 "position_ids": positions[:, end:end + 1]}
        feeds.update({p: out[q] for p, q in layout.cache_pairs().items()})
    return np.concatenate(pieces, axis=1)


def parity_gate(model: ir.Model, reference: dict[str, np.ndarray], task: str, after: list[str]) -> dict:
    """Compare `model` with the source's `reference` outputs; raises ParityError when they differ."""
    ids, mask, want = reference["input_ids"], reference["attention_mask"], reference["output"]
    where = f"parity gate (after {', '.join(after)})" if after else "parity gate (before any pass)"
    layout = kv_layout(model)
    info: dict = {"batch": int(ids.shape[0]), "tokens": int(ids.shape[1]), "padding": int((mask == 0).sum())}
    if layout is not None and layout.static:
        return {**info, "skipped": "a static cache is driven in fixed chunks; checked by the pass checks only"}
    if task == "causal-lm":
        run = _session(model)
        if layout is not None and layout.padded_prefill:
            got = _decode(run, model, layout, ids, mask)
        else:  # one row at a time without its padding, as the runtime prefills such a layout
            got = np.zeros_like(want)
            for row in range(ids.shape[0]):
                real = mask[row] == 1
                got[row, real] = _decode(run, model, layout, ids[row:row + 1, real], mask[row:row + 1, real])[0]
        real = mask == 1
        want_real, got_real = want[real], got[real]
        info["argmax_agreement"] = float(np.mean(want_real.argmax(-1) == got_real.argmax(-1)))
        info["decode_steps"] = DECODE_STEPS if layout is not None else 0
    else:
        run, out = _session(model), model.graph.outputs[0].name
        names = [v.name for v in model.graph.inputs]
        static = next(v for v in model.graph.inputs if v.name == "input_ids").shape
        length = static[1] if static is not None and len(static) == 2 and isinstance(static[1], int) else None

        def feeds(rows_ids, rows_mask):
            return {k: v for k, v in {"input_ids": rows_ids, "attention_mask": rows_mask,
                                      "token_type_ids": np.zeros_like(rows_ids)}.items() if k in names}

        if length is None:
            got_real = run(feeds(ids, mask))[out]
        else:  # static shapes (npu): one row at a time, padded at the end to the graph's length
            rows = []
            for row in range(ids.shape[0]):
                real = int(mask[row].sum())
                row_ids, row_mask = np.zeros((1, length), np.int64), np.zeros((1, length), np.int64)
                row_ids[0, :real], row_mask[0, :real] = ids[row, :real], 1
                rows.append(run(feeds(row_ids, row_mask))[out])
            got_real = np.concatenate(rows)
        want_real = want
    delta = compare({"output": want_real}, {"output": got_real})
    info.update({k: float(f"{v:.4g}") for k, v in delta.items() if k in ("max_abs", "max_rel", "cosine")})
    if delta["max_rel"] > TOLERANCE:
        raise ParityError(f"{where}: the compiled graph differs from the PyTorch model: max_rel {delta['max_rel']:.3g} "
                          f"> {TOLERANCE:g} on {info['tokens']} tokens at batch {info['batch']} with padding; "
                          "a pass does not handle this model's attention, positions or mask")
    return info
