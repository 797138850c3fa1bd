"""TVM backend: kiln's portable IR compiled by Apache TVM (Relax) into shared libraries.

Artifact files written by this backend:
    <function>.so  one Relax VM executable per function (static shape, see below), entry `main`
    params.npz     the weights, by name, shared by the functions (passed after their inputs)

Functions (all batch 1, static shapes; the session in kiln.backends.tvm.session picks them):
    main      models without a KV cache (encoders, full-recompute LMs): sequence `sequence`;
              shorter inputs are padded at the end (masked or causal, so exact) and outputs cut
    prefill   with a static KV cache: `sequence` tokens written into the cache at once
    decode    with a static KV cache: one token
A causal LM gets a static cache (insert-kv-cache with `static_length = cache_length`, set
by the compiler from `static_cache_length`), so both functions take and return the whole
cache. They are two libraries rather than two functions of one Relax module: each import
brings its own helper functions, whose names would collide in one module.

Lowering (in the pipeline): `expand-dequantize`. The importer takes no blocked
DequantizeLinear, so quantized weights (kiln's QDQ int8/int4) become integer storage (4-bit
packed two per byte) plus Cast/Sub/Mul/Reshape (and BitShift/BitwiseAnd for 4 bits); an
embedding table's Gather dequantizes only the rows it reads. params.npz keeps them quantized.

Per function: Constant nodes lifted to initializers and weights made inputs (the importer
would otherwise embed every weight in every function, a weight-sized initializer it makes a
parameter turns shape tensors dynamic, and the folding below would turn quantized weights
back into float ones), `specialize-shapes` (kiln pass: fixed dims, shape chains folded),
`relax.frontend.onnx.from_onnx`, then per Relax module: LegalizeOps -> FuseOps/FuseTIR ->
each weight's dequantize kernel grouped into its matmul's kernel (FuseOps fuses only what
follows a matmul) -> MetaSchedule records from the tuning database -> for kernels without a
record, kiln's CPU matmul rule (`schedules.CpuMatmul`: register-tiled GEMM, row-streaming
GEMV over [K, N] weights), DLight's CPU rules (GEMV, reductions), then kiln's elementwise rule
(`schedules.CpuElementwise`), kernel by kernel (a kernel a rule fails on keeps the default
lowering) -> tvm.compile.

Tuning: `tune_minutes` > 0 runs MetaSchedule over the kernels (of all functions together)
that have no record yet, largest first, a batch of trials each, until the budget is spent.
The database lives in the kiln cache (`$KILN_CACHE/tvm-tuning/<target hash>`) and is keyed
by workload (MetaSchedule's structural hash of each kernel), so a recompile, or another model
with the same kernels, reuses it. apache-tvm 0.27.0.post1 needs apache-tvm-ffi 0.1.14: with
0.1.15 serializing any TIR object to JSON (which MetaSchedule does for every kernel)
segfaults, hence the pin in pyproject.toml.
The target is a dict: llvm with the host CPU (`mcpu`) and `mattr` disabling the vector
extensions that CPU model has but this host lacks (a VM may hide AVX-512; `mcpu=native`
would silently mean `generic`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass

from kiln.errors import KilnError
from kiln.ir import dims, kv_layout
from kiln.manifest import sha256_file
from kiln.models.cache import cache_dir
from kiln.passes.base import KilnPass
from kiln.passes.expand_dequantize import ExpandDequantizePass
from kiln.passes.kv_layout import cache_feeds
from kiln.passes.registry import create_pass
from kiln.targets import Target


PARAMS_FILE = "params.npz"
WEIGHT_MIN_ELEMENTS = 1024  # smaller initializers stay constants (shape tensors must, to stay static)
_ISA_PREFIXES = ("avx", "fma", "f16c", "gfni", "vaes", "vpclmulqdq", "amx")


class TvmBackendError(KilnError):
    pass


def host_target() -> dict:
    """The llvm target for this machine, as TVM 0.27 takes it (a dict)."""
    import tvm
    from tvm.target import codegen

    cpu = codegen.llvm_get_system_cpu()
    # MetaSchedule needs the core count; its schedules are parallelised for it.
    target = {"kind": "llvm", "mcpu": cpu, "num-cores": len(os.sched_getaffinity(0))}
    flags = _cpu_flags()
    if flags:
        features = codegen.llvm_get_cpu_features(tvm.target.Target(target))
        missing = sorted(f for f in features if f.startswith(_ISA_PREFIXES) and f.replace(".", "_") not in flags)
        if missing:
            target["mattr"] = ["-" + f for f in missing]
    return target


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


class TvmBackend:
    name = "tvm"

    def __init__(self, tune_minutes: float = 0.0, sequence: int = 128, cache_length: int = 256):
        if tune_minutes < 0:
            raise TvmBackendError(f"--tune-minutes must be >= 0, not {tune_minutes}")
        if not 1 <= sequence <= cache_length:
            raise TvmBackendError(f"the TVM sequence length must lie in [1, {cache_length}], not {sequence}")
        self.tune_minutes = tune_minutes
        self.sequence = sequence
        self.static_cache_length = cache_length

    def lowering_passes(self, target: Target) -> list[KilnPass]:
        """Quantized weights expanded into ops the importer takes (it rejects blocked
        DequantizeLinear), weights read through a Transpose stored transposed (the weights are
        the compiled functions' inputs: nothing folds them); shapes are specialised per function
        from the final graph in `write`."""
        return [ExpandDequantizePass(), create_pass("transpose-weights")]

    def functions(self, model: ir.Model) -> dict[str, int]:
        """Function name -> the sequence length it is specialised to."""
        layout = kv_layout(model)
        if layout is None:
            return {"main": self.sequence}
        if not layout.static:
            raise TvmBackendError("the TVM backend needs a static KV cache (insert-kv-cache static_length)")
        return {"prefill": self.sequence, "decode": 1}

    def check_feeds(self, model: ir.Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Sample inputs that run every function: one row of the samples, `sequence` tokens
        (+1 with a cache, so that a decode step follows the prefill)."""
        layout = kv_layout(model)
        if layout is not None:
            return cache_feeds(layout, np.resize(feeds["input_ids"][:1], (1, self.sequence + 1)))
        fixed, out = {"batch": 1, "sequence": self.sequence}, {}
        for value in model.graph.inputs:
            shape = dims(value)
            array = feeds[value.name][:1] if "batch" in shape else feeds[value.name]
            out[value.name] = np.resize(array, [fixed.get(d, d) for d in shape])
        return out

    def write(self, model: ir.Model, directory: Path, target: Target) -> dict:
        import tvm
        from tvm.relax.frontend.onnx import from_onnx

        tvm_target = host_target()
        functions, params, modules = {}, {}, {}
        for fn, sequence in self.functions(model).items():
            spec = ir.from_proto(ir.to_proto(model))
            inputs, outputs = [v.name for v in spec.graph.inputs], [v.name for v in spec.graph.outputs]
            # Weights become inputs before the shape folding, which would otherwise fold the
            # dequantize chains of quantized weights (Cast, Sub, Mul) into float weights; then
            # once more for the constants the folding made.
            weights = _weights_to_inputs(spec)
            specialized = create_pass("specialize-shapes", {"batch": 1, "sequence": sequence})(spec).stats
            weights.update(_weights_to_inputs(spec))
            try:
                with warnings.catch_warnings():  # one "Renaming name ..." per dotted ONNX name
                    warnings.simplefilter("ignore", UserWarning)
                    modules[fn] = from_onnx(ir.to_proto(spec), keep_params_in_input=False)
            except Exception as exc:
                raise TvmBackendError(f"TVM cannot import the graph for '{fn}': {_first_line(exc)}") from exc
            keys = []
            for name, array in weights.items():
                key = name if name not in params or np.array_equal(params[name], array) else f"{fn}:{name}"
                params[key] = array
                keys.append(key)
            functions[fn] = {"library": f"{fn}.so", "sequence": sequence, "inputs": inputs, "outputs": outputs,
                             "params": keys, "specialize": specialized}
        start = time.perf_counter()
        executables, tuning = build(modules, tvm_target, self.tune_minutes)
        for fn, executable in executables.items():
            executable.export_library(str(directory / functions[fn]["library"]))
            # the runtime loads this compiled code only if the file still has this hash
            functions[fn]["sha256"] = sha256_file(directory / functions[fn]["library"])
        np.savez(directory / PARAMS_FILE, **params)
        return {
            "name": self.name,
            "tvm_version": tvm.__version__,
            "target": tvm_target,
            "params": PARAMS_FILE,
            "batch": 1,
            "functions": functions,
            "sequence_axes": _axes(model, "sequence"),
            "batch_axes": _axes(model, "batch"),
            "cache": _cache_pairs(model),
            "tuning": {**tuning, "build_seconds": round(time.perf_counter() - start, 1)},
            "session": {"intra_op_num_threads": target.threads},
        }


def build(modules: dict, target: dict, tune_minutes: float) -> tuple[dict, dict]:
    """Legalize, fuse, tune (within the budget), schedule and compile Relax modules."""
    import tvm
    from tvm import relax
    from tvm.s_tir import dlight
    from tvm.s_tir import meta_schedule as ms

    from .schedules import CpuElementwise, CpuMatmul

    tvm_target = tvm.target.Target(target)
    with tvm_target:
        fuse = tvm.transform.Sequential([
            # erf, exp, tanh and softmax by TOPI's fast (vectorizable, float32-accurate)
            # approximations: a scalar erf call per element made BERT's GELU epilogue cost more
            # than its matmul. The cross-check against ORT still holds the result to 1e-3.
            relax.transform.FastMathTransform(),
            relax.transform.DecomposeOpsForInference(), relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
            relax.transform.FuseOps(), relax.transform.FuseTIR(),
        ])
        modules = {fn: _fuse_dequantize_matmul(fuse(mod)) for fn, mod in modules.items()}
    db_dir = tuning_dir(target)
    database = ms.database.JSONDatabase(work_dir=str(db_dir))
    tasks = [t for mod in modules.values() for t in ms.relax_integration.extract_tasks(mod, tvm_target)]
    untuned = [t for t in tasks if database.query_tuning_record(t.dispatched[0], tvm_target, t.task_name) is None]
    trials = _tune(untuned, tvm_target, db_dir, tune_minutes * 60) if tune_minutes > 0 and untuned else 0
    database = ms.database.JSONDatabase(work_dir=str(db_dir))
    executables = {}
    for fn, mod in modules.items():
        with tvm_target, database:
            mod = relax.transform.MetaScheduleApplyDatabase()(mod)
            mod = _default_schedules(mod, dlight.ApplyDefaultSchedule(CpuMatmul(), dlight.cpu.GEMV(),
                                                                         dlight.cpu.Reduction(), CpuElementwise()))
        executables[fn] = tvm.compile(mod, target=tvm_target)
    tuned = sum(database.query_tuning_record(t.dispatched[0], tvm_target, t.task_name) is not None for t in tasks)
    return executables, {"database": str(db_dir), "tasks": len(tasks), "tasks_with_record": tuned,
                         "trials": trials, "minutes": tune_minutes}


_INJECTIVE, _OUT_EWISE_FUSABLE = 2, 4  # TVM's OpPatternKind
_MATMUL_ARITIES = (2, 3, 4, 5)  # x, w, then a bias and a residual that FuseOps may have added


def _fuse_dequantize_matmul(mod):
    """Put each weight dequantize kernel into the matmul kernel that is its only reader.

    FuseOps fuses what follows a matmul, never an injective producer into it, so the
    expanded DequantizeLinear (kiln's expand-dequantize: Cast, Sub, Mul, Reshape of 8-bit
    integers) stays a kernel of its own that writes the whole float weight on every call.
    Grouped with its matmul, one kernel reads the integer weight (which MetaSchedule then
    schedules as one, inlining the dequantize)."""
    from tvm import relax
    from tvm.relax.dpl import GlobalVarPattern, TuplePattern, is_op, wildcard
    from tvm.relax.transform import FusionPattern

    mod = relax.transform.AnnotateTIROpPattern()(mod)  # FuseTIR leaves its kernels unannotated

    def kind(gv) -> int:
        attrs = mod[gv].attrs
        return int(attrs["op_pattern"]) if attrs is not None and "op_pattern" in attrs else -1

    def check(context) -> bool:
        dequantize, matmul = context.annotated_expr["dequantize"], context.annotated_expr["matmul"]
        reads_bytes = any(str(getattr(a.ty, "dtype", "")) in ("int8", "uint8") for a in dequantize.args[1].fields)
        bound = [v for v, e in context.matched_bindings.items() if e.same_as(dequantize)]
        return (reads_bytes and 0 <= kind(dequantize.args[0]) <= _INJECTIVE
                and kind(matmul.args[0]) == _OUT_EWISE_FUSABLE and _has_block(mod[matmul.args[0]], "matmul")
                and all(len(context.var_usages.get(v, [])) == 1 for v in bound))

    patterns = []
    for arity in _MATMUL_ARITIES:
        dequantize = is_op("relax.call_tir")(GlobalVarPattern(), wildcard())
        args = [wildcard() for _ in range(arity)]
        args[1] = dequantize
        matmul = is_op("relax.call_tir")(GlobalVarPattern(), TuplePattern(args))
        patterns.append(FusionPattern("dequantize_matmul", matmul, {"dequantize": dequantize, "matmul": matmul}, check))
    group = relax.transform.FuseOpsByPattern(patterns, bind_constants=False)
    return relax.transform.FuseTIR()(group(mod))


def _has_block(func, name: str) -> bool:
    from tvm import s_tir

    try:
        s_tir.Schedule(func).get_sblock(name)
    except Exception:  # noqa: BLE001 (the schedule raises its own error type for a missing block)
        return False
    return True


def _default_schedules(mod, rules):
    """DLight's rules, kernel by kernel: a rule that fails on a kernel (its CPU GEMV rule
    asserts on a matmul with a dequantize inlined) leaves that kernel to the default
    lowering, as a kernel no rule matches is, instead of failing the build."""
    import tvm
    from tvm import tirx

    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tirx.PrimFunc):
            continue
        try:
            scheduled = rules(tvm.IRModule({gv: func}))[gv]
        except Exception:  # noqa: BLE001 (DLight raises assertion and schedule errors alike)
            continue
        mod[gv] = scheduled
    return mod


TRIALS_PER_TASK = 8  # one MetaSchedule batch per kernel: the budget is checked between kernels
BUILD_TIMEOUT_S = 180  # a builder worker imports TVM first: 30 s (the default) times out on a loaded 2-core host


def _tune(tasks, target, db_dir: Path, seconds: float) -> int:
    """MetaSchedule, kernel by kernel (largest weighted FLOPs first), until `seconds` are spent;
    returns the measured trials added to the database. MetaSchedule takes a trial count, not
    a time, so the budget is checked between kernels and overshoots by at most one kernel's batch."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops

    # MetaSchedule prints every trial at INFO on stdout; its log files (in the database folder) keep them
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    database = ms.database.JSONDatabase(work_dir=str(db_dir))
    before = len(database)
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(tasks, str(db_dir))
    order = sorted(range(len(tasks)), key=lambda i: -weights[i] * estimate_tir_flops(tasks[i].dispatched[0]))
    builder = ms.builder.LocalBuilder(max_workers=1, timeout_sec=BUILD_TIMEOUT_S)
    start = time.perf_counter()
    for i in order:
        if time.perf_counter() - start >= seconds:
            break
        ms.tune_tasks(tasks=[contexts[i]], task_weights=[weights[i]], work_dir=str(db_dir),
                      max_trials_global=TRIALS_PER_TASK, max_trials_per_task=TRIALS_PER_TASK,
                      num_trials_per_iter=TRIALS_PER_TASK, builder=builder, database=database)
    return len(database) - before


def tuning_dir(target: dict) -> Path:
    import tvm

    key = hashlib.sha256(json.dumps([target, tvm.__version__], sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir("tvm-tuning", key)


def _weights_to_inputs(model: ir.Model) -> dict[str, np.ndarray]:
    """Large initializers become trailing graph inputs; returns them by name."""
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    graph, weights = model.graph, {}
    for name, value in list(graph.initializers.items()):
        if value.const_value is not None and value.const_value.size >= WEIGHT_MIN_ELEMENTS:
            weights[name] = value.const_value.numpy()
            graph.initializers.pop(name)
            value.const_value = None
            graph.inputs.append(value)
    return weights


def _axes(model: ir.Model, dim: str) -> dict[str, int]:
    """Input/output name -> the axis of the symbolic dim `dim`, for those that have it."""
    values = [*model.graph.inputs, *model.graph.outputs]
    return {v.name: list(dims(v)).index(dim) for v in values if dim in (dims(v) or ())}


def _cache_pairs(model: ir.Model) -> dict[str, str]:
    layout = kv_layout(model)
    return {} if layout is None else layout.cache_pairs()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
