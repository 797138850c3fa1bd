"""Weight quantizers (numerics only; the graph rewrite is `quantize_weights.py`).

All work on W [K, N] with K the input (reduction) dimension, blocks of `block` rows
along K (block 0 = one block spanning K, i.e. per output channel):

- `rtn`: round to nearest on a grid per block and output channel. Symmetric: no zero
  point, the extreme value on -2^(bits-1) (or 2^(bits-1) - 1 when it is positive).
  Asymmetric: the block's [min, max] (widened to contain 0) on [0, 2^bits - 1]. Either way
  the range is clipped by the fraction that minimizes the squared error (a search).
- `gptq` (Frantar et al., 2022): rows are quantized in order and each row's rounding
  error is pushed onto the rows not yet quantized through the inverse Hessian
  H = Σ xᵀx of the layer's calibration inputs, which minimizes ‖X·W − X·Q‖² instead of
  ‖W − Q‖². Scales come from the error-updated weights block by block; Hessian
  dampening `damp` × mean(diag H). Rows whose input is always zero are quantized as is.

Compact scales (`scale_step` [N], both quantizers): every block scale is a whole multiple
1..255 of its output channel's step, so it is stored as uint8 beside one fp32 step per
channel (8 bits per block instead of 32, as llama.cpp's k-quants and QLoRA's double
quantization do). The grid search picks among the representable scales, so the integers are
chosen for the scale that is stored. `compact_step` sets the step from the widest block.

`output_error(w, q, gram)` is the relative output error ‖X(W−Q)‖² / ‖XW‖² that ranks
layers by sensitivity. `bits_per_weight` counts the stored bits (values, scales, zero points)
per weight.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

DTYPES = {(4, True): (ir.DataType.INT4, ml_dtypes.int4, -8, 7), (4, False): (ir.DataType.UINT4, ml_dtypes.uint4, 0, 15),
          (8, True): (ir.DataType.INT8, np.int8, -128, 127), (8, False): (ir.DataType.UINT8, np.uint8, 0, 255),
          # 7 bits in int8 storage ("reduce_range"): x86 AVX2 integer GEMMs add u8·s8 products in
          # pairs into int16, which overflows for full-range weights (2·255·128) but not here.
          (7, True): (ir.DataType.INT8, np.int8, -64, 63), (7, False): (ir.DataType.UINT8, np.uint8, 0, 127)}


# Hints other passes leave on initializers (Value.metadata_props) for quantize-weights:
BITS_HINT = "kiln.quantize.bits"  # on a weight: quantize it at these bits ("8"), whatever the pass's bits; "32": never
# on an integer table stored for other weights ("name,name": the tables it indexes): counted in
# the bits per weight when one of those tables is quantized
INDEX_HINT = "kiln.quantize.index"


def storage_bits(bits: int) -> int:
    return 8 if bits == 7 else bits


SCALE_LEVELS = 255  # compact scales: uint8 multiples of a per-channel fp32 step


def bits_per_weight(bits: int, block: int, k: int, symmetric: bool, compact_scales: bool = False) -> float:
    bs, stored = block or k, storage_bits(bits)
    scale_bits = 8 if compact_scales else 32
    return stored + (scale_bits + (0 if symmetric else stored)) / bs + (32 / k if compact_scales else 0)


def compact_step(w: np.ndarray, bits: int, block: int, symmetric: bool) -> np.ndarray:
    """[N] fp32 steps for compact scales: the widest block's unclipped scale is the top level."""
    k, n = w.shape
    bs = block or k
    _, _, lo, hi = DTYPES[(bits, symmetric)]
    pad = (-k) % bs
    g = np.concatenate([w, np.zeros((pad, n), w.dtype)]).reshape(-1, bs, n)
    if symmetric:
        widest = np.abs(g).max(axis=1) / hi  # a positive extreme sets the scale on hi
    else:
        widest = (np.maximum(g.max(axis=1), 0) - np.minimum(g.min(axis=1), 0)) / (hi - lo)
    step = widest.max(axis=0) / SCALE_LEVELS
    return np.where(step > 0, step, 1.0).astype(np.float32)


SHRINK = np.linspace(1.0, 0.7, 13)  # candidate fractions of the block's range (clipping search)


def compact_scale_parts(scale: ir.Value) -> tuple[np.ndarray, np.ndarray] | None:
    """(uint8 levels, step) when `scale` holds compact scales as quantize-weights writes them:
    the output of DequantizeLinear(levels, step [N], axis) of constants, without blocks or zero
    point. The step comes back shaped to broadcast against the levels; None for anything else."""
    dq = scale.producer()
    if (dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx") or len(dq.inputs) != 2
            or dq.attributes.get_int("block_size", 0)):
        return None
    levels, step = (ir.convenience.get_const_tensor(v) if v is not None else None for v in dq.inputs)
    if levels is None or step is None or levels.dtype != ir.DataType.UINT8 or len(levels.shape) != 2 \
            or len(step.shape) != 1:
        return None
    axis = dq.attributes.get_int("axis", 1) % 2
    return levels.numpy(), step.numpy().reshape((-1, 1) if axis == 0 else (1, -1))


def _grid(g: np.ndarray, bits: int, symmetric: bool, importance: np.ndarray | None = None,
          step: np.ndarray | None = None):
    """Scale and zero point (float, or None) of each column of g [rows, N].

    The range is searched: each column takes the clipping of its range (in SHRINK) that
    minimizes the squared rounding error, weighted per row by `importance` (the Hessian's
    diagonal, i.e. the mean squared input of that row's feature) when given. Symmetric
    grids put a negative extreme on -2^(bits-1), using the level a max-abs/qmax scale wastes.
    With `step` [N], each candidate scale is first rounded to a multiple 1..255 of it.
    """
    _, _, lo, hi = DTYPES[(bits, symmetric)]

    def representable(scale):
        return scale if step is None else (step * np.clip(np.round(scale / step), 1, SCALE_LEVELS)).astype(np.float32)

    if symmetric:
        extreme = g[np.abs(g).argmax(axis=0), np.arange(g.shape[1])]
        base = np.abs(extreme) / np.where(extreme < 0, -lo, hi)
        candidates = [(representable(np.float32(f) * base), None) for f in SHRINK]
    else:
        gmin, gmax = np.minimum(g.min(axis=0), 0), np.maximum(g.max(axis=0), 0)
        candidates = []
        for f in SHRINK:
            scale = representable((f * (gmax - gmin) / (hi - lo)).astype(np.float32))
            safe = np.where(scale == 0, 1.0, scale)
            # the zero point puts the clipped range's low end (f·gmin) on the grid's bottom
            candidates.append((scale, np.clip(np.round(lo - f * gmin / safe), lo, hi)))
    weight = np.ones((g.shape[0], 1)) if importance is None else importance.reshape(-1, 1)
    best_err, best = None, None
    for scale, zero in candidates:
        scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
        deq = (_round(g, scale, zero, bits, symmetric) - (0 if zero is None else zero)) * scale
        err = (weight * np.square(g - deq)).sum(axis=0)
        if best is None:
            best_err, best = err, (scale, zero)
            continue
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = (np.where(better, scale, best[0]),
                None if zero is None else np.where(better, zero, best[1]))
    return best[0].astype(np.float32), best[1]


def _round(w: np.ndarray, scale: np.ndarray, zero, bits: int, symmetric: bool) -> np.ndarray:
    _, _, lo, hi = DTYPES[(bits, symmetric)]
    return np.clip(np.round(w / scale) + (0 if zero is None else zero), lo, hi)


def _pack(q_rows: np.ndarray, scales: list, zeros: list, bits: int, symmetric: bool, k: int):
    np_dtype = DTYPES[(bits, symmetric)][1]
    scale = np.stack(scales).astype(np.float32)
    zero = None if symmetric else np.stack(zeros).astype(np_dtype)
    return q_rows[:k].astype(np_dtype), scale, zero


def rtn(w: np.ndarray, bits: int, block: int, symmetric: bool, importance: np.ndarray | None = None,
        scale_step: np.ndarray | None = None):
    """w [K, N] -> (q [K, N], scale [K/block, N], zero_point [K/block, N] or None).

    `importance` [K] (e.g. the mean squared input per feature) weights the range search;
    `scale_step` [N] makes the scales compact (see the module docstring)."""
    k = w.shape[0]
    bs = block or k
    q = np.empty_like(w, dtype=np.float32)
    scales, zeros = [], []
    for start in range(0, k, bs):
        g = w[start:start + bs]
        scale, zero = _grid(g, bits, symmetric, None if importance is None else importance[start:start + bs], scale_step)
        q[start:start + bs] = _round(g, scale, zero, bits, symmetric)
        scales.append(scale)
        zeros.append(zero)
    return _pack(q, scales, zeros, bits, symmetric, k)


def gptq(w: np.ndarray, gram: np.ndarray, bits: int, block: int, symmetric: bool, damp: float = 0.01,
         act_order: bool = False, lazy: int = 128, scale_step: np.ndarray | None = None):
    """GPTQ; `gram` = Σ xᵀx [K, K] of the layer's inputs. Same outputs as `rtn`.

    Without `act_order`, rows go in order and each block's grid is set from the
    error-updated weights when the block starts. With `act_order`, rows go by decreasing
    Hessian diagonal (the most used input features first, while the most freedom is left to
    absorb their error) and every block's grid is fixed beforehand from the original weights
    ("static groups"), since a block's rows are no longer contiguous in time.
    """
    k, n = w.shape
    bs = block or k
    h = gram.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    diag = np.diag(h).copy()
    h[np.diag_indices(k)] += damp * float(np.mean(diag))
    grids = [_grid(w[s:s + bs].astype(np.float32), bits, symmetric, diag[s:s + bs], scale_step) for s in range(0, k, bs)] \
        if act_order else None
    order = np.argsort(-diag, kind="stable") if act_order else np.arange(k)
    w = w[order].astype(np.float64)  # (gather first: one float64 copy, not two)
    h = h[np.ix_(order, order)]
    # Upper Cholesky factor of H⁻¹: row i holds the update coefficients for rows after i.
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T
    step = max(lazy // bs, 1) * bs if bs < k else k  # lazy-update width, a multiple of the block
    q = np.empty((k, n), dtype=np.float32)
    scales, zeros = ([g[0] for g in grids], [g[1] for g in grids]) if act_order else ([], [])
    for i1 in range(0, k, step):
        i2 = min(i1 + step, k)
        w1 = w[i1:i2]
        err = np.zeros_like(w1)
        for i in range(i2 - i1):
            row = i1 + i
            original = order[row]
            if act_order:
                scale, zero = grids[original // bs]
            elif row % bs == 0:  # in order: step is whole blocks, so the block lies in w1
                scale, zero = _grid(w1[i:i + bs].astype(np.float32), bits, symmetric, diag[row:row + bs], scale_step)
                scales.append(scale)
                zeros.append(zero)
            qi = _round(w1[i], scale, zero, bits, symmetric)
            q[original] = qi
            deq = (qi - (0 if zero is None else zero)) * scale
            e = (w1[i] - deq) / hinv[row, row]
            w1[i + 1:] -= np.outer(hinv[row, row + 1:i2], e)
            err[i] = e
        w[i2:] -= hinv[i1:i2, i2:].T @ err
    return _pack(q, scales, zeros, bits, symmetric, k)


def dequantize(q, scale, zero, block: int) -> np.ndarray:
    k = q.shape[0]
    bs = block or k
    s = np.repeat(scale, bs, axis=0)[:k]
    z = np.repeat(zero.astype(np.float32), bs, axis=0)[:k] if zero is not None else 0.0
    return (q.astype(np.float32) - z) * s


def output_error(w: np.ndarray, w_hat: np.ndarray, gram: np.ndarray | None) -> float:
    """‖X(W − Ŵ)‖² / ‖XW‖² from Σ xᵀx; plain relative Frobenius error without calibration."""
    num, den = output_error_terms(w, w_hat, gram)
    return float(num / max(den, 1e-30))


def output_error_terms(w: np.ndarray, w_hat: np.ndarray, gram: np.ndarray | None) -> tuple[float, float]:
    """(‖X(W − Ŵ)‖², ‖XW‖²) of `output_error`, summable over chunks of output columns."""
    d = (w - w_hat).astype(np.float64)
    if gram is None:
        return float(np.sum(d * d)), float(np.sum(np.square(w, dtype=np.float64)))
    num = float(np.sum(d * (gram @ d)))
    del d
    w64 = w.astype(np.float64)
    return num, float(np.sum(w64 * (gram @ w64)))


def require_opset(model: ir.Model, version: int) -> None:
    """Blocked int4 DequantizeLinear needs opset 21. From 20, only types were added: bump it."""
    current = model.opset_imports.get("", 1)
    if current < 20:
        raise ValueError(f"blocked DequantizeLinear needs opset >= 20 to upgrade to {version}, the model has {current}")
    model.opset_imports[""] = max(current, version)
