"""The block-quantized weights of a GGUF file, as `import-source-blocks` takes them.

transformers' GGUF loader dequantizes every tensor to fp32, so the exported graph holds the
file's weights as floats. `GGUFBlocks(path).find(rows)` gives back the file's own integers and
block scales for a weight whose rows (output channels) are rows of block-quantized tensors in
the file: matched by content (a hash of each row's dequantized fp32 bytes), so a permutation of
rows (the loader's Q/K head reordering) or rows packed from several tensors (Q, K and V in one
MatMul) are found as well.

Formats, each row split into blocks along K with W = scale · q + offset per block
(`SourceBlocks`; q signed, stored in 4 or 8 bits):

    Q4_0  block 32   d·(n − 8)               q = n − 8 (4 bits), no offset
    Q4_1  block 32   d·n + m                 q = n − 8 (4 bits), offset m + 8d
    Q8_0  block 32   d·n                     q = n (8 bits), no offset
    Q5_0  block 32   d·(n − 16)              q = n − 16 (8 bits), no offset
    Q5_1  block 32   d·n + m                 q = n − 16 (8 bits), offset m + 16d
    Q4_K  block 32   (d·sc)·n − dmin·mn      q = n − 8 (4 bits), offset 8·d·sc − dmin·mn
    Q5_K  block 32   (d·sc)·n − dmin·mn      q = n − 16 (8 bits), offset 16·d·sc − dmin·mn
    Q6_K  block 16   (d·sc)·(n − 32)         q = n − 32 (8 bits), no offset

(n the stored unsigned integer, d/m/dmin fp16, sc/mn the sub-block's 6- or 8-bit scales).
Every decoded row is checked against gguf-py's own dequantization before it is handed out.
Other formats (Q2_K, Q3_K, the IQ and ternary types, F16, BF16) are not offered: their weights
stay float and a later pass quantizes them as usual.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf.quants import Q4_K, dequantize

from kiln.passes.import_source_blocks import SourceBlocks

QK_K = 256


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, group: int) -> np.ndarray:
    """Low nibbles of each `group` bytes, then their high nibbles (ggml's order)."""
    nb = qs.shape[0]
    q = qs.reshape(nb, -1, 1, group) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(nb, -1)


def _high_bits(qh: np.ndarray, count: int) -> np.ndarray:
    """Q5_0/Q5_1's fifth bits: bit i of a little-endian uint32 is element i."""
    bits = np.unpackbits(np.ascontiguousarray(qh), axis=-1, bitorder="little")
    return bits[:, :count]


def _q4_0(b):
    d = _f16(b[:, :2])
    n = _nibbles(b[:, 2:], 16).astype(np.int16)
    return n - 8, d[:, None], None, 32


def _q4_1(b):
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    n = _nibbles(b[:, 4:], 16).astype(np.int16)
    return n - 8, d[:, None], (m + 8 * d)[:, None], 32


def _q8_0(b):
    return b[:, 2:].view(np.int8).astype(np.int16), _f16(b[:, :2])[:, None], None, 32


def _q5_0(b):
    d = _f16(b[:, :2])
    n = (_nibbles(b[:, 6:], 16) | (_high_bits(b[:, 2:6], 32) << 4)).astype(np.int16)
    return n - 16, d[:, None], None, 32


def _q5_1(b):
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    n = (_nibbles(b[:, 8:], 16) | (_high_bits(b[:, 4:8], 32) << 4)).astype(np.int16)
    return n - 16, d[:, None], (m + 16 * d)[:, None], 32


def _k_scales(b):
    """(d·sc [nb, 8], dmin·mn [nb, 8]) of Q4_K / Q5_K super-blocks, as gguf-py computes them."""
    nb = b.shape[0]
    d, dmin = _f16(b[:, :2]).reshape(nb, 1), _f16(b[:, 2:4]).reshape(nb, 1)
    sc, mn = Q4_K.get_scale_min(np.ascontiguousarray(b[:, 4:16]))
    return d * sc.astype(np.float32), dmin * mn.astype(np.float32)


def _q4_k(b):
    nb = b.shape[0]
    scale, dm = _k_scales(b)
    n = _nibbles(b[:, 16:], 32).astype(np.int16).reshape(nb * 8, 32)
    return n - 8, scale.reshape(-1, 1), (8 * scale - dm).reshape(-1, 1), 32


def _q5_k(b):
    nb = b.shape[0]
    scale, dm = _k_scales(b)
    qh = b[:, 16:48].reshape(nb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    n = (_nibbles(b[:, 48:], 32).reshape(nb, 8, 32) | ((qh & 1) << 4)).astype(np.int16).reshape(nb * 8, 32)
    return n - 16, scale.reshape(-1, 1), (16 * scale - dm).reshape(-1, 1), 32


def _q6_k(b):
    nb = b.shape[0]
    ql, qh = b[:, :QK_K // 2], b[:, QK_K // 2:QK_K // 2 + QK_K // 4]
    sc = b[:, QK_K // 2 + QK_K // 4:QK_K // 2 + QK_K // 4 + QK_K // 16].view(np.int8).astype(np.float32)
    d = _f16(b[:, -2:]).reshape(nb, 1)
    lo = (ql.reshape(nb, -1, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    hi = (qh.reshape(nb, -1, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 0x03
    n = (lo.reshape(nb, -1, 32) | (hi.reshape(nb, -1, 32) << 4)).astype(np.int16)
    return (n - 32).reshape(nb * 16, 16), (d * sc).reshape(-1, 1), None, 16


# format -> (decoder, elements per stored block, bits the integers need)
DECODERS = {
    T.Q4_0: (_q4_0, 32, 4), T.Q4_1: (_q4_1, 32, 4), T.Q8_0: (_q8_0, 32, 8),
    T.Q5_0: (_q5_0, 32, 8), T.Q5_1: (_q5_1, 32, 8),
    T.Q4_K: (_q4_k, QK_K, 4), T.Q5_K: (_q5_k, QK_K, 8), T.Q6_K: (_q6_k, QK_K, 8),
}


def _row_hash(row: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(row, dtype=np.float32).tobytes(), digest_size=16).digest()


class GGUFBlocks:
    """The block-quantized tensors of one GGUF file, found by the content of their rows."""

    def __init__(self, path: str | Path):
        self._reader = GGUFReader(str(path))
        self._tensors = [t for t in self._reader.tensors if t.tensor_type in DECODERS and len(t.shape) == 2]
        self._rows: dict[bytes, tuple[int, int]] = {}
        for i, t in enumerate(self._tensors):
            values = dequantize(t.data, t.tensor_type).reshape(-1, int(t.shape[0]))
            for r in range(values.shape[0]):
                self._rows.setdefault(_row_hash(values[r]), (i, r))
            del values

    def __len__(self) -> int:
        return len(self._tensors)

    def find(self, rows: np.ndarray) -> list[SourceBlocks] | None:
        """The file's blocks for `rows` [N, K] (output channels × inputs), as runs of rows of one
        format, or None unless every row is a row of a block-quantized tensor in the file."""
        hits = [self._rows.get(_row_hash(r)) for r in rows]
        if not hits or any(h is None for h in hits):
            return None
        kinds = [self._tensors[i].tensor_type for i, _ in hits]
        parts, start = [], 0
        for end in range(1, len(hits) + 1):
            if end == len(hits) or kinds[end] != kinds[start]:
                part = self._decode(kinds[start], hits[start:end], rows[start:end])
                if part is None:
                    return None
                parts.append(part)
                start = end
        return parts

    def _decode(self, kind, hits: list[tuple[int, int]], rows: np.ndarray) -> SourceBlocks | None:
        decode, per_block, bits = DECODERS[kind]
        k = rows.shape[1]
        if k % per_block:
            return None
        q = np.empty(rows.shape, dtype=np.int16)
        scale = offset = None
        for tensor_index in sorted({i for i, _ in hits}):
            mine = [j for j, (i, _) in enumerate(hits) if i == tensor_index]
            data = self._tensors[tensor_index].data
            raw = np.asarray(data).reshape(-1, k // per_block, data.shape[-1] // (k // per_block))
            picked = raw[[hits[j][1] for j in mine]]
            tq, ts, to, block = decode(picked.reshape(-1, picked.shape[-1]))
            q[mine] = tq.reshape(len(mine), k)
            if scale is None:
                scale = np.empty((len(rows), k // block), dtype=np.float32)
                offset = np.empty_like(scale) if to is not None else None
            scale[mine] = ts.reshape(len(mine), -1)
            if to is not None:
                offset[mine] = to.reshape(len(mine), -1)
        blocks = SourceBlocks(kind.name, bits, block, q.astype(np.int8), scale, offset)
        # the decoders against gguf-py's dequantization (what the graph holds), to rounding
        rebuilt = blocks.dequantize()
        if not np.allclose(rebuilt, rows, rtol=1e-6, atol=1e-6 * float(np.abs(rows).max(initial=1.0))):
            raise ValueError(f"{kind.name} blocks decode to other values than gguf's dequantization")
        return blocks
