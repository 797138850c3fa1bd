"""Roofline arithmetic: what a token costs, read from the graph without running it, and the
machine's ceilings (read bandwidth, matmul FLOP/s) measured with numpy.

Per token, for an LLM artifact with a KV cache:
- weight bytes: every matmul weight is read once per decode step (MatMul / Gemm with a
  constant B, MatMulNBits: packed bytes + scales + zero points); an embedding lookup
  (Gather / GatherBlockQuantized on a constant table) reads one row; other initializers
  (norm weights, small constants) are read whole, rotary caches one row. A tied table is
  counted once for the LM head plus one row for the lookup.
- KV bytes per token of context: layers x kv_heads x (head_dim + value_head_dim) x dtype size;
  a decode step at depth d reads d of them.
- FLOPs: 2 x (matmul weight parameters) + attention, 2 x layers x heads x (head_dim +
  value_head_dim) per token of context (QK^T and AV); 0 at depth 0.
The predicted bound compares the arithmetic intensity (FLOPs / byte) with the machine's balance
(peak FLOP/s / bandwidth); the ceiling is max(bytes / bandwidth, FLOPs / peak) per token.

The machine: `measure(threads)` times a max-reduction over a 512 MB float32 array split across
`threads` threads (read bandwidth, best of N) and numpy's sgemm at 2048^3 (best of N); numpy's
BLAS is the compute ceiling used. `ceiling(threads)` measures in a subprocess (so the BLAS thread
count can be set) and caches the result in $KILN_CACHE/roofline.json.

    python -m kiln.roofline [--threads N] [--fresh]     # the ceilings of this machine, as JSON
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from kiln.errors import KilnError

WEIGHT_MATMULS = {"MatMul", "Gemm", "MatMulNBits", "FusedMatMul"}
GATHERS = {"Gather", "GatherBlockQuantized"}
ATTENTIONS = {"GroupQueryAttention", "MultiHeadAttention", "Attention"}
# Ops through which a constant stays constant (the weight's bytes are its sources' bytes).
_PASS_THROUGH = {"Transpose", "Cast", "Identity", "Reshape", "DequantizeLinear", "Squeeze", "Unsqueeze",
                 "Flatten", "Mul", "Add", "Sub", "Concat", "Split", "Slice"}


@dataclasses.dataclass
class Layout:
    """What the attention costs per token of context; from the manifest or the source config."""

    num_layers: int = 0
    heads: int = 0  # query heads
    kv_heads: int = 0
    head_dim: int = 0
    value_head_dim: int = 0
    kv_dtype_bytes: int = 4
    kv_cache: bool = False
    causal: bool = True

    @property
    def kv_bytes_per_token(self) -> int:
        return self.num_layers * self.kv_heads * (self.head_dim + self.value_head_dim) * self.kv_dtype_bytes if self.kv_cache else 0

    @property
    def attention_flops_per_context_token(self) -> int:
        return 2 * self.num_layers * self.heads * (self.head_dim + self.value_head_dim)


def layout_from_manifest(manifest: dict) -> Layout:
    src = manifest.get("source", {})
    kv = manifest.get("kv_cache")
    heads = int(src.get("num_attention_heads") or 0)
    if kv:
        return Layout(kv["num_layers"], heads or kv["kv_heads"], kv["kv_heads"], kv["head_dim"], kv["value_head_dim"],
                      2 if kv.get("dtype") == "float16" else 4, True, True)
    return layout_from_config(src, causal=manifest.get("task") == "causal-lm")


def layout_from_config(config: dict, causal: bool = True) -> Layout:
    """A layout without a KV cache (raw export, encoder) from a config dict (HF names or kiln's)."""
    heads = int(config.get("num_attention_heads") or 0)
    layers = int(config.get("num_layers") or config.get("num_hidden_layers") or 0)
    hidden = int(config.get("hidden_size") or 0)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or (hidden // heads if heads else 0))
    return Layout(layers, heads, kv_heads, head_dim, head_dim, 4, False, causal)


@dataclasses.dataclass
class Arithmetic:
    """Static per-token costs of one model (see the module docstring)."""

    layout: Layout
    matmul_params: int = 0  # logical weight elements of the matmuls (K x N each)
    matmul_bytes: int = 0  # their stored bytes (packed, with scales)
    gather_row_bytes: int = 0  # bytes of one row of every embedding lookup
    other_bytes_per_token: int = 0  # other initializers read per token
    parameter_bytes: int = 0  # every initializer, stored
    matmuls: int = 0
    gathers: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def weight_bytes_per_token(self) -> int:
        return self.matmul_bytes + self.gather_row_bytes + self.other_bytes_per_token

    @property
    def weight_flops_per_token(self) -> int:
        return 2 * self.matmul_params

    @property
    def kv_bytes_per_token(self) -> int:
        return self.layout.kv_bytes_per_token

    def decode(self, depth: int) -> dict:
        """One decode step with `depth` tokens already in the context."""
        attn = self.layout.attention_flops_per_context_token
        if self.layout.kv_cache or not self.layout.causal:
            kv = self.kv_bytes_per_token * depth
            return {"depth": depth, "bytes": self.weight_bytes_per_token + kv, "kv_bytes": kv,
                    "flops": self.weight_flops_per_token + attn * depth}
        # No cache: the step recomputes all depth + 1 positions.
        n = depth + 1
        return {"depth": depth, "bytes": self.matmul_bytes + n * self.gather_row_bytes + self.other_bytes_per_token,
                "kv_bytes": 0, "flops": n * self.weight_flops_per_token + attn * depth * n // 2}

    def prefill(self, tokens: int) -> dict:
        """A prompt of `tokens` from an empty cache: weights read once, causal attention."""
        attn = self.layout.attention_flops_per_context_token
        flops = tokens * self.weight_flops_per_token + attn * tokens * (tokens - 1) // 2
        nbytes = (self.matmul_bytes + tokens * self.gather_row_bytes + self.other_bytes_per_token
                  + tokens * self.kv_bytes_per_token)
        return {"tokens": tokens, "bytes": nbytes, "flops": flops,
                "bytes_per_token": nbytes / tokens, "flops_per_token": flops / tokens}

    def forward(self, batch: int, seq: int) -> dict:
        """An encoder pass over batch x seq tokens (full attention)."""
        attn = self.layout.attention_flops_per_context_token
        tokens = batch * seq
        flops = tokens * self.weight_flops_per_token + batch * attn * seq * seq
        nbytes = self.matmul_bytes + tokens * self.gather_row_bytes + self.other_bytes_per_token
        return {"batch": batch, "seq": seq, "bytes": nbytes, "flops": flops,
                "bytes_per_token": nbytes / tokens, "flops_per_token": flops / tokens}

    def as_dict(self) -> dict:
        return {"weight_bytes_per_token": self.weight_bytes_per_token,
                "weight_flops_per_token": self.weight_flops_per_token,
                "kv_bytes_per_token": self.kv_bytes_per_token,
                "matmul_params": self.matmul_params, "matmul_bytes": self.matmul_bytes,
                "gather_row_bytes": self.gather_row_bytes, "other_bytes_per_token": self.other_bytes_per_token,
                "parameter_bytes": self.parameter_bytes, "matmuls": self.matmuls, "gathers": self.gathers,
                "layout": dataclasses.asdict(self.layout), "notes": self.notes}


def _itemsize(data_type: int) -> float:
    import onnx

    if data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return 0.5
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize
    except Exception:  # noqa: BLE001 (float8 and friends without a numpy dtype)
        return 1


def _tensor_info(t) -> tuple[int, int]:
    """(elements, bytes) of a TensorProto, from its dims and type (external data is not read)."""
    elements = math.prod(t.dims)
    return elements, math.ceil(elements * _itemsize(t.data_type))


def analyze(model_path: str | Path, layout: Layout) -> Arithmetic:
    """Count the weight-bearing ops of an ONNX file (shapes only: external data is not loaded)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    consts: dict[str, tuple[int, int, list[int]]] = {}  # name -> (elements, bytes, dims)
    for t in graph.initializer:
        consts[t.name] = (*_tensor_info(t), list(t.dims))
    producer = {}
    for node in graph.node:
        for o in node.output:
            producer[o] = node
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = (*_tensor_info(a.t), list(a.t.dims))

    memo: dict[str, frozenset | None] = {}

    def sources(name: str) -> frozenset | None:
        """The constants a value is computed from, or None if it depends on an input."""
        if name in memo:
            return memo[name]
        memo[name] = None  # cycles cannot happen in a DAG; this also stops re-entry
        if name in consts:
            result: frozenset | None = frozenset([name])
        elif name in producer and producer[name].op_type in _PASS_THROUGH:
            parts = [sources(i) for i in producer[name].input if i]
            result = frozenset().union(*parts) if parts and all(p is not None for p in parts) else None
        else:
            result = None
        memo[name] = result
        return result

    def elements(name: str) -> int:
        """Elements of a constant-derived value: its largest source (scales and shapes are smaller)."""
        return max((consts[s][0] for s in sources(name) or ()), default=0)

    def shape(name: str) -> list[int] | None:
        """Dims of a constant-derived value, followed through layout-only ops."""
        if name in consts:
            return consts[name][2]
        node = producer.get(name)
        if node is None:
            return None
        if node.op_type in ("Cast", "Identity", "DequantizeLinear"):
            return shape(node.input[0])
        if node.op_type == "Transpose":
            dims = shape(node.input[0])
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            return None if dims is None else [dims[i] for i in perm] if perm else dims[::-1]
        return None

    out = Arithmetic(layout, parameter_bytes=sum(c[1] for c in consts.values()))
    matmul_sources: set[str] = set()
    gather_sources: set[str] = set()
    row_read: set[str] = set()  # other constants read one row per token (rotary caches)
    for node in graph.node:
        op = node.op_type
        if op in WEIGHT_MATMULS:
            if op == "MatMulNBits":
                attrs = {a.name: a.i for a in node.attribute}
                srcs = [sources(i) for i in node.input[1:] if i]
                if not srcs or srcs[0] is None:
                    continue
                params = attrs["K"] * attrs["N"]
                used = frozenset().union(*(s for s in srcs if s is not None))
            else:
                b = node.input[1]
                a_src = sources(node.input[0])
                b_src = sources(b)
                if b_src is None or a_src is not None:
                    continue  # activation x activation (attention) or fully constant
                used = b_src
                params = elements(b)
                if op == "Gemm" and len(node.input) > 2 and node.input[2]:
                    used = used | (sources(node.input[2]) or frozenset())
            out.matmuls += 1
            out.matmul_params += params
            matmul_sources |= used
        elif op in GATHERS:
            table = sources(node.input[0])
            if table is None or sources(node.input[1]) is not None:
                continue
            axis = next((a.i for a in node.attribute if a.name in ("axis", "gather_axis")), 0)
            extra = [sources(i) or frozenset() for i in node.input[2:] if i] if op == "GatherBlockQuantized" else []
            used = table.union(*extra)
            dims = shape(node.input[0]) or consts[max(table, key=lambda s: consts[s][0])][2]
            rows = dims[axis] if dims else 1
            out.gathers += 1
            out.gather_row_bytes += math.ceil(sum(consts[s][1] for s in used) / max(rows, 1))
            gather_sources |= used
        elif op == "GroupQueryAttention":
            for i in node.input[7:9]:  # cos_cache, sin_cache: one row per position
                row_read |= (sources(i) or frozenset()) if i else frozenset()
    out.matmul_bytes = sum(consts[s][1] for s in matmul_sources)
    for name in row_read - matmul_sources - gather_sources:
        rows = consts[name][2][0] if consts[name][2] else 1
        out.other_bytes_per_token += consts[name][1] // max(rows, 1)
    for name in set(consts) - matmul_sources - gather_sources - row_read:
        out.other_bytes_per_token += consts[name][1]
    if not layout.num_layers or not layout.heads:
        out.notes.append("no attention layout: attention FLOPs are not counted")
    return out


def from_artifact(path: str | Path) -> Arithmetic:
    """The arithmetic of an artifact directory (graph + manifest) or a bare .onnx file."""
    path = Path(path)
    if path.is_dir():
        from kiln.manifest import read_manifest

        manifest = read_manifest(path)
        return analyze(graph_file(path, manifest), layout_from_manifest(manifest))
    return analyze(path, Layout())


def graph_file(path: Path, manifest: dict) -> Path:
    """The ONNX graph of an artifact; backends that compile it away (TVM) have none to analyze."""
    backend = manifest["backend"]
    if "model" not in backend:
        raise KilnError(f"{path}: a {backend.get('name')} artifact holds compiled code, not an ONNX graph; "
                        "inspect the ORT artifact of the same recipe")
    return path / backend["model"]


def from_gguf(path: str | Path, layout: Layout) -> Arithmetic:
    """The same arithmetic for a GGUF file (llama.cpp): every 2-D weight is a matmul, except the
    token embedding, which is a lookup unless the model has no separate output matrix (tied)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    tied = "output.weight" not in tensors
    out = Arithmetic(layout, parameter_bytes=sum(int(t.n_bytes) for t in tensors.values()))
    for name, t in tensors.items():
        dims = [int(d) for d in t.shape if int(d) > 1]
        nbytes, elements = int(t.n_bytes), int(t.n_elements)
        if name == "token_embd.weight":
            rows = elements // int(t.shape[0])
            out.gathers += 1
            out.gather_row_bytes += nbytes // rows
            if tied:
                out.matmuls += 1
                out.matmul_params += elements
                out.matmul_bytes += nbytes
        elif len(dims) == 2:
            out.matmuls += 1
            out.matmul_params += elements
            out.matmul_bytes += nbytes
        else:
            out.other_bytes_per_token += nbytes
    return out


# --------------------------------------------------------------------------------------------
# The machine


@dataclasses.dataclass
class Ceiling:
    bandwidth_gb_s: float  # read bandwidth, GB/s (1e9 bytes)
    flops_gflop_s: float  # numpy sgemm, GFLOP/s
    threads: int = 0
    source: str = "measured"

    @property
    def balance(self) -> float:
        """FLOPs per byte at which a kernel stops being memory bound."""
        return self.flops_gflop_s / self.bandwidth_gb_s


def bound(nbytes: float, flops: float, ceiling: Ceiling) -> dict:
    """Predicted bound of work that reads `nbytes` and does `flops`, and its minimum time."""
    t_mem = nbytes / (ceiling.bandwidth_gb_s * 1e9)
    t_cmp = flops / (ceiling.flops_gflop_s * 1e9)
    intensity = flops / nbytes if nbytes else float("inf")
    return {"intensity": intensity, "bound": "memory" if t_mem >= t_cmp else "compute",
            "seconds": max(t_mem, t_cmp), "memory_seconds": t_mem, "compute_seconds": t_cmp}


def measure(threads: int = 1, mbytes: int = 512, gemm: int = 2048, repeats: int = 5) -> Ceiling:
    """Measure in this process (numpy's BLAS uses whatever thread count it started with)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    a = np.ones(mbytes * 2**20 // 4, dtype=np.float32)
    chunks = np.array_split(a, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.max, chunks))  # a SIMD reduction: reads, no writes
            best = min(best, time.perf_counter() - t0)
    bandwidth = a.nbytes / best / 1e9
    del a, chunks
    x = np.random.default_rng(0).random((gemm, gemm), dtype=np.float32)
    x @ x
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x @ x
        best = min(best, time.perf_counter() - t0)
    return Ceiling(round(bandwidth, 2), round(2 * gemm**3 / best / 1e9, 2), threads)


def _cache_file() -> Path:
    from kiln.models.cache import cache_dir

    return cache_dir() / "roofline.json"


def _machine_key(threads: int) -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return f"{platform.node()}|{cpu}|{threads}"


def ceiling(threads: int, fresh: bool = False, mbytes: int = 512, gemm: int = 2048, repeats: int = 5) -> Ceiling:
    """This machine's ceilings at `threads` (measured in a subprocess; cached unless `fresh`)."""
    cache = _cache_file()
    key = _machine_key(threads)
    known = json.loads(cache.read_text()) if cache.exists() else {}
    if not fresh and key in known:
        return Ceiling(**{**known[key], "source": "cached"})
    env = {**os.environ, **{v: str(threads) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
    code = ("import json, dataclasses, sys; from kiln.roofline import measure; "
            f"print(json.dumps(dataclasses.asdict(measure({threads}, {mbytes}, {gemm}, {repeats}))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    result = Ceiling(**json.loads(proc.stdout.strip().splitlines()[-1]))
    known[key] = dataclasses.asdict(result)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(known, indent=2))
    return result


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Measure this machine's read bandwidth and sgemm FLOP/s.")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    parser.add_argument("--fresh", action="store_true", help="Measure again instead of using the cached numbers.")
    args = parser.parse_args(argv)
    print(json.dumps(dataclasses.asdict(ceiling(args.threads, fresh=args.fresh))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
