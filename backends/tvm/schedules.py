"""DLight schedule rules for the CPU, for kernels without a MetaSchedule record: matmuls (below) and
elementwise kernels (`CpuElementwise`).

TVM 0.27's DLight CPU rules (GEMV, Reduction) take `y[s] = sum_r W[s, r] x[r]`: the reduction
innermost in the weight. An ONNX MatMul's weight is [K, N] with N innermost, so without tuning
every projection of a transformer fell through to TVM's unscheduled loop nest (SmolLM2 decoded
at about 1 token/s). This rule schedules

    C[..., m, n] = sum_k A[..., m, k] * B[..., k, n]      (+ one injective epilogue, e.g. bias, GELU)

GEMM (M > 1): register tiles of mt × nt outputs (mt from 4, 3, 2, 1 and nt from 16, 8,
the largest that divide M and N, so no tile is partial); loops (n-tile, m-tile) parallel, then k,
then the tile, its nt columns vectorized and its mt rows unrolled; the tile accumulates in a local
buffer and is written back, through the epilogue, right after its k loop.
A plain 2-D weight B[K, N] is first copied, one nt-column panel at a time, into a contiguous
[K, nt] buffer (the n-tiles parallel, the m-tiles in turn reusing the panel): read in place, a
panel's rows lie N floats apart, and at the widths of transformer projections (N = 384, 1152,
1536, 3072) that stride maps the whole panel onto a few L1 sets, which evict each other.
Measured on 2 threads at M = 128: N = 3072 went from 33 to 71 GFLOP/s, N = 384 from 58 to 77.
GEMV (M = 1): the columns are split into chunks (one parallel task each); a chunk streams its part
of every weight row in order (k outer, columns vectorized inside), which reads the weight
sequentially instead of one column panel at a time.

A dequantize fused into the kernel (kiln's expanded DequantizeLinear) is inlined into the matmul
block, so the weight is read as integers and scales inside the k loop.

Not handled (returns None, so the next rule or TVM's default applies): a weight whose reduction
axis is innermost (Q·Kᵀ), dynamic extents, N not a multiple of 8, more than one epilogue block.
"""

from __future__ import annotations

import math

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule, try_inline_contiguous_spatial
from tvm.target import Target

M_TILES = (4, 3, 2, 1)
N_TILES = (16, 8)  # 4 x 16 outputs: 8 AVX2 accumulators; 24 and 32 measured slower (spills, shuffles)
GEMV_CHUNKS = 8  # parallel tasks per GEMV: a few per core evens out the load
PARALLEL_PANELS = 4  # a packed GEMM needs 2x this many column panels, its only parallel loop
LANES = 8  # float32 lanes of an AVX2 register
MIN_PARALLEL_ELEMENTS = 4096  # smaller elementwise kernels cost less than waking the pool


def _extent(sch: s_tir.Schedule, loop) -> int | None:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _indices(region) -> list:
    return [r.min for r in region]


def _uses(expr, var) -> bool:
    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(expr))


def _is_matmul(block: tirx.Block) -> bool:
    """C[spatial...] += A[..., m, k] * W(k, n) with k the only reduction, n the last spatial var,
    A's last index k, and no other operand's last index a function of k, one of them of n: a plain
    weight B[k, n], or the integers, scales and constants of a dequantize inlined into the block."""
    iters = list(block.iter_vars)
    if len(iters) < 2 or any(v.iter_type != tirx.IterVar.DataPar for v in iters[:-1]) \
            or iters[-1].iter_type != tirx.IterVar.CommReduce or len(block.reads) < 2 or len(block.writes) != 1:
        return False
    spatial, k = [v.var for v in iters[:-1]], iters[-1].var
    out = [i for i in _indices(block.writes[0].region) if not isinstance(i, tirx.IntImm)]  # unit dims are 0
    if len(out) != len(spatial) or any(not (isinstance(i, tirx.Var) and i.same_as(v)) for i, v in zip(out, spatial)):
        return False
    n = spatial[-1]
    lasts = [_indices(r.region)[-1] for r in block.reads]
    activations = [i for i, last in enumerate(lasts) if isinstance(last, tirx.Var) and last.same_as(k)]
    if len(activations) != 1:
        return False
    weights = [last for i, last in enumerate(lasts) if i != activations[0]]
    return any(_uses(last, n) for last in weights) and not any(_uses(last, k) for last in weights)


class CpuMatmul(ScheduleRule):
    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        infos = try_inline_contiguous_spatial(sch, normalize_prim_func(sch))
        if infos is None:
            return None
        main = [i for i in infos if i.is_reduction()]
        rest = [i for i in infos if not i.is_reduction()]
        if len(main) != 1 or len(rest) > 1 or (rest and not rest[0].is_injective()):
            return None
        block = main[0].block_rv
        if not _is_matmul(sch.get(block)):
            return None
        *ms, n, k = sch.get_loops(block)
        extents = [_extent(sch, loop) for loop in (*ms, n, k)]
        if None in extents or extents[-2] % 8:
            return None
        epilogue = rest[0].block_rv if rest else None
        if not ms or all(e == 1 for e in extents[:-2]):
            return self._gemv(sch, block, n, k, epilogue)
        return self._gemm(sch, block, sch.fuse(*ms) if len(ms) > 1 else ms[0], n, k, epilogue)

    @staticmethod
    def _plain_weight(block: tirx.Block) -> int | None:
        """Index of the read that is a whole 2-D float weight B[k, n], if the block has one."""
        iters = list(block.iter_vars)
        n, k = iters[-2].var, iters[-1].var
        for i, read in enumerate(block.reads):
            index = _indices(read.region)
            if (len(index) == 2 and "float" in str(read.source.dtype) and isinstance(index[0], tirx.Var)
                    and index[0].same_as(k) and isinstance(index[1], tirx.Var) and index[1].same_as(n)):
                return i
        return None

    @classmethod
    def _gemm(cls, sch, block, m, n, k, epilogue):
        big_m, big_n = _extent(sch, m), _extent(sch, n)
        mt = next(t for t in M_TILES if big_m % t == 0)
        nt = next(t for t in N_TILES if big_n % t == 0)
        weight = cls._plain_weight(sch.get(block))
        mo, mi = sch.split(m, [None, mt])
        no, ni = sch.split(n, [None, nt])
        sch.reorder(no, mo, k, mi, ni)
        if weight is not None and big_n // nt >= 2 * PARALLEL_PANELS:
            sch.parallel(no)
            panel = sch.cache_read(block, weight, "global")
            sch.compute_at(panel, no)
            sch.vectorize(sch.get_loops(panel)[-1])
            tile = mo
        else:
            tile = sch.fuse(no, mo)
            sch.parallel(tile)
        local = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(local, tile)
        if epilogue is not None:
            sch.reverse_compute_at(epilogue, tile)
            sch.vectorize(sch.get_loops(epilogue)[-1])
        sch.vectorize(ni)
        sch.unroll(mi)
        sch.decompose_reduction(block, k)
        sch.vectorize(sch.get_loops(local)[-1])
        return sch

    @staticmethod
    def _gemv(sch, block, n, k, epilogue):
        chunk, columns, lanes = sch.split(n, [GEMV_CHUNKS, None, 8])
        sch.reorder(chunk, k, columns, lanes)
        sch.parallel(chunk)
        if epilogue is not None:
            sch.reverse_compute_at(epilogue, chunk)
        sch.vectorize(lanes)
        sch.decompose_reduction(block, k)
        return sch


class CpuElementwise(ScheduleRule):
    """Kernels of injective blocks only (activations, SwiGLU's gate·up, layout changes): after
    inlining what can be inlined, the last block's loops are fused and split into one parallel
    loop of chunks, its innermost `LANES` iterations vectorized when they divide evenly. Without a
    rule TVM leaves them a serial scalar loop on one core (SmolLM2's prefill SwiGLU: 0.64 ms a
    layer). Returns None for anything with a reduction, or with more than one block left."""

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        infos = try_inline_contiguous_spatial(sch, normalize_prim_func(sch))
        if infos is None or len(infos) != 1 or not infos[0].is_injective():
            return None
        block = infos[0].block_rv
        loops = sch.get_loops(block)
        extents = [_extent(sch, loop) for loop in loops]
        if not loops or None in extents:
            return None
        total = math.prod(extents)
        if total < MIN_PARALLEL_ELEMENTS:
            return None
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        if total % LANES == 0:
            outer, lanes = sch.split(fused, [None, LANES])
            sch.parallel(outer)
            sch.vectorize(lanes)
        else:
            sch.parallel(fused)
        return sch
