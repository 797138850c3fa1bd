"""kiln's CPU matmul schedule rule (backends/tvm/schedules.py): which kernels it takes, and exactness."""

import numpy as np
import pytest
import tvm
from tvm import te

from kiln.backends.tvm import host_target
from kiln.backends.tvm.schedules import CpuMatmul

pytestmark = pytest.mark.slow  # TVM builds kernels

TARGET = tvm.target.Target(host_target())


def _matmul(m, k, n, epilogue=False, dequantize=False):
    """[1, m, k] x [k, n] (+ bias and GELU); with `dequantize`, the weight is int8 x per-32-rows scales."""
    a, bias = te.placeholder((1, m, k), name="A"), te.placeholder((n,), name="bias")
    if dequantize:
        q, s = te.placeholder((k, n), name="Q", dtype="int8"), te.placeholder((k // 32, n), name="S")
        w = te.compute((k, n), lambda i, j: q[i, j].astype("float32") * s[i // 32, j], name="dq")
        params = [a, q, s]
    else:
        w = te.placeholder((k, n), name="B")
        params = [a, w]
    r = te.reduce_axis((0, k), name="r")
    out = te.compute((1, m, n), lambda b, i, j: te.sum(a[b, i, r] * w[r, j], axis=r), name="matmul")
    if epilogue:
        out = te.compute((1, m, n), lambda b, i, j: out[b, i, j] + bias[j], name="add")
        out = te.compute((1, m, n), lambda b, i, j: out[b, i, j] * 0.5 * (1 + te.erf(out[b, i, j] * 0.7071)), name="gelu")
        params.append(bias)
    return te.create_prim_func([*params, out]).with_attr("global_symbol", "main")


@pytest.mark.parametrize("m, k, n, epilogue, dequantize", [
    (128, 64, 48, True, False),   # GEMM with a fused bias + GELU
    (6, 96, 40, False, False),    # M and N that need smaller tiles (3 x 8)
    (1, 96, 200, False, False),   # GEMV, N not a multiple of the chunking
    (1, 64, 64, True, True),      # GEMV with a dequantize inlined and an epilogue
    (32, 64, 64, False, True),    # GEMM with a dequantize inlined
    (24, 48, 256, True, False),   # GEMM whose weight is copied panel by panel (16 panels)
])
def test_rule_schedules_matmuls_exactly(m, k, n, epilogue, dequantize):
    func = _matmul(m, k, n, epilogue, dequantize)
    sch = CpuMatmul().apply(func, TARGET, False)
    assert sch is not None
    rng = np.random.default_rng(0)
    a = rng.standard_normal((1, m, k)).astype(np.float32)
    if dequantize:
        q = rng.integers(-8, 8, (k, n)).astype(np.int8)
        s = rng.random((k // 32, n)).astype(np.float32)
        w, weights = q.astype(np.float32) * np.repeat(s, 32, 0), [q, s]
    else:
        w = rng.standard_normal((k, n)).astype(np.float32)
        weights = [w]
    bias = rng.standard_normal(n).astype(np.float32)
    ref = a[0] @ w
    if epilogue:
        from math import erf

        ref = ref + bias
        ref = ref * 0.5 * (1 + np.vectorize(erf)(ref * 0.7071))
    args = [a, *weights, *([bias] if epilogue else []), np.zeros((1, m, n), np.float32)]
    tensors = [tvm.runtime.tensor(x) for x in args]
    tvm.compile(sch.mod, target=TARGET)["main"](*tensors)
    np.testing.assert_allclose(tensors[-1].numpy()[0], ref, rtol=1e-5, atol=1e-4 * np.abs(ref).max())
    # the schedule really is one: parallel loops and vector lanes
    text = sch.mod.script()
    assert "T.parallel" in text and "T.vectorized" in text
    # a plain weight wide enough for the parallel panels is read through a contiguous copy
    assert ("B_global" in text) == (not dequantize and m > 1 and n // 16 >= 8)


def test_thread_pool_has_every_core():
    """TVM would size its pool at half the cores (one on a 2-core machine); the backend sizes it
    at every core, so a session asked for 2 threads runs on 2."""
    import os

    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        pytest.skip("one core")
    assert os.environ["TVM_NUM_THREADS"] == str(cores)
    tvm.get_global_func("runtime.config_threadpool")(1, 2)
    assert tvm.get_global_func("runtime.NumThreads")() == 2


def test_rule_leaves_other_kernels_alone():
    q = te.placeholder((1, 4, 16, 8), name="Q")
    key = te.placeholder((1, 4, 16, 8), name="K")
    r = te.reduce_axis((0, 8), name="r")
    # Q·Kᵀ: the reduction is innermost in both operands
    scores = te.compute((1, 4, 16, 16), lambda b, h, i, j: te.sum(q[b, h, i, r] * key[b, h, j, r], axis=r))
    assert CpuMatmul().apply(te.create_prim_func([q, key, scores]), TARGET, False) is None
    x = te.placeholder((4, 64), name="x")
    c = te.reduce_axis((0, 64), name="c")
    total = te.compute((4,), lambda i: te.sum(x[i, c], axis=c))  # a plain reduction
    assert CpuMatmul().apply(te.create_prim_func([x, total]), TARGET, False) is None


def test_elementwise_kernels_run_in_parallel_and_exactly():
    """SwiGLU's gate·up on a packed projection: one parallel, vectorized loop; tiny kernels stay serial."""
    from kiln.backends.tvm.schedules import CpuElementwise

    a = te.placeholder((1, 64, 256), name="a")
    out = te.compute((1, 64, 128), lambda b, i, j: a[b, i, j] * te.sigmoid(a[b, i, j]) * a[b, i, j + 128])
    sch = CpuElementwise().apply(te.create_prim_func([a, out]), TARGET, False)
    text = sch.mod.script()
    assert "T.parallel" in text and "T.vectorized" in text
    x = np.random.default_rng(0).standard_normal((1, 64, 256)).astype(np.float32)
    tensors = [tvm.runtime.tensor(x), tvm.runtime.tensor(np.zeros((1, 64, 128), np.float32))]
    tvm.compile(sch.mod, target=TARGET)["main"](*tensors)
    ref = x[..., :128] / (1 + np.exp(-x[..., :128])) * x[..., 128:]
    np.testing.assert_allclose(tensors[1].numpy(), ref, rtol=1e-5, atol=1e-6)
    small = te.placeholder((4, 8), name="s")
    assert CpuElementwise().apply(te.create_prim_func([small, te.compute((4, 8), lambda i, j: small[i, j] * 2)]),
                                  TARGET, False) is None
    r = te.reduce_axis((0, 256), name="r")
    total = te.compute((1, 64), lambda b, i: te.sum(a[b, i, r], axis=r))
    assert CpuElementwise().apply(te.create_prim_func([a, total]), TARGET, False) is None
