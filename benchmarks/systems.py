"""The systems the speed benchmark times: their names, and one runner per kind behind a shared interface.

LLM runners (`kiln.bench.LMRunner`: prefill, then decode steps): kiln artifacts, the raw export in
plain ORT, PyTorch eager, onnxruntime-genai and llama.cpp. Encoder runners: an ORT session (a kiln
artifact or the raw export) and PyTorch eager. `open_llm` / `open_encoder` open one from the spec
that `benchmarks.artifacts` builds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kiln.bench import LMRunner, encoder_feeds

LLM_SYSTEMS = ["kiln-ort-fp32", "kiln-ort-int8", "kiln-ort-int4", "kiln-tvm-fp32", "ort-raw-fp32", "pytorch-eager",
               "ort-genai-fp32", "ort-genai-int4", "llama.cpp-q4_1", "llama.cpp-q4_0"]
ENCODER_SYSTEMS = ["kiln-ort-fp32", "kiln-ort-int8", "kiln-tvm-fp32", "ort-raw-fp32", "pytorch-eager"]
LLM_MODEL, ENCODER_MODEL = "smollm2-135m", "minilm-l6"


def _dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in path.glob(pattern) if f.is_file())


# --- LLM systems ----------------------------------------------------------------------------

class KilnLM(LMRunner):
    def __init__(self, path: Path, threads: int, name: str):
        import kiln
        from kiln.bench import ArtifactLM

        self.inner = ArtifactLM(kiln.load(path, threads=threads), name)
        self.name, self.size_bytes = name, self.inner.size_bytes
        layout = self.inner.model.kv or {}
        self.max_tokens = layout.get("max_length") if layout.get("static") else None

    def prefill(self, ids):
        return self.inner.prefill(ids)

    def decode(self, token, steps):
        return self.inner.decode(token, steps)


class RawOrtLM(LMRunner):
    """The export as it comes out of torch.export, in ORT with default optimizations."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        self.name = "ort-raw-fp32"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.size_bytes = _dir_bytes(path.parent, "model.onnx*")

    def _next(self):
        (logits,) = self.session.run(None, {"input_ids": np.array([self.seq], dtype=np.int64)})
        return int(np.argmax(logits[0, -1]))

    def prefill(self, ids):
        self.seq = list(ids)
        return self._next()

    def decode(self, token, steps):
        out = []
        for _ in range(steps):
            self.seq.append(token)
            token = self._next()
            out.append(token)
        return out


class TorchLM(LMRunner):
    def __init__(self, threads: int):
        import torch
        from kiln.models import get_source

        torch.set_num_threads(threads)
        self.name = "pytorch-eager"
        self.model = get_source(LLM_MODEL).load().reference
        self.size_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())

    def prefill(self, ids):
        import torch

        with torch.no_grad():
            out = self.model(torch.tensor([ids]), use_cache=True)
        self.past = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def decode(self, token, steps):
        import warnings

        import torch

        out = []
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the past_key_values keyword's rename
            for _ in range(steps):
                res = self.model(torch.tensor([[token]]), past_key_values=self.past, use_cache=True)
                self.past = res.past_key_values
                token = int(res.logits[0, -1].argmax())
                out.append(token)
        return out


class GenAILM(LMRunner):
    def __init__(self, path: Path, threads: int, name: str):
        import onnxruntime_genai as og

        self.og, self.name = og, name
        config = json.loads((path / "genai_config.json").read_text())
        config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
        (path / "genai_config.json").write_text(json.dumps(config, indent=2))
        self.model = og.Model(str(path))
        self.size_bytes = _dir_bytes(path, "*.onnx*")

    def prefill(self, ids):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(ids) + 1024)
        self.gen = self.og.Generator(self.model, params)
        self.gen.append_tokens(ids)
        return int(np.argmax(self.gen.get_logits()[0, -1]))

    def decode(self, token, steps):
        out = []
        for _ in range(steps):
            self.gen.append_tokens([token])
            token = int(np.argmax(self.gen.get_logits()[0, -1]))
            out.append(token)
        return out


class LlamaCppLM(LMRunner):
    def __init__(self, gguf: Path, threads: int, name: str):
        from llama_cpp import Llama

        self.name = name
        self.llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=2048,
                         n_batch=512, verbose=False)
        self.size_bytes = gguf.stat().st_size

    def prefill(self, ids):
        # llama-cpp-python keeps no logits without logits_all; its own greedy generator
        # (top_k=1) evaluates the prompt, then one token per next().
        self.llm.reset()  # otherwise generate() reuses the cached prefix of the previous round
        self.stream = self.llm.generate(ids, top_k=1, temp=0.0, reset=True)
        return next(self.stream)

    def decode(self, token, steps):
        return [next(self.stream) for _ in range(steps)]


def open_llm(name: str, spec: dict, threads: int) -> LMRunner:
    kind, path = spec["kind"], Path(spec.get("path", "."))
    if kind == "kiln":
        return KilnLM(path, threads, name)
    if kind == "raw":
        return RawOrtLM(path, threads)
    if kind == "torch":
        return TorchLM(threads)
    if kind == "genai":
        return GenAILM(path, threads, name)
    if kind == "llama.cpp":
        return LlamaCppLM(path, threads, name)
    raise ValueError(kind)


# --- encoder systems ------------------------------------------------------------------------

class EncoderSystem:
    name = ""
    size_bytes = 0

    def run(self, ids: np.ndarray) -> None:
        raise NotImplementedError


class OrtEncoder(EncoderSystem):
    def __init__(self, name: str, path: Path, threads: int):
        import onnxruntime as ort

        self.name = name
        if path.is_dir():  # a kiln artifact: its own session settings, threads overridden
            import kiln

            self.session = kiln.load(path, threads=threads).session
            self.size_bytes = _dir_bytes(path)
        else:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            self.size_bytes = _dir_bytes(path.parent, "model.onnx*")
        self.inputs = [i.name for i in self.session.get_inputs()]

    def run(self, ids):
        self.session.run(None, encoder_feeds(self.inputs, ids))


class TorchEncoder(EncoderSystem):
    def __init__(self, threads: int):
        import torch
        from kiln.models import get_source

        torch.set_num_threads(threads)
        self.name = "pytorch-eager"
        self.module = get_source(ENCODER_MODEL).load().module  # the same pooled output as the export
        self.size_bytes = sum(p.numel() * p.element_size() for p in self.module.parameters())

    def run(self, ids):
        import torch

        t = torch.from_numpy(ids)
        with torch.no_grad():
            self.module(t, torch.ones_like(t), torch.zeros_like(t))


def open_encoder(name: str, spec: dict, threads: int) -> EncoderSystem:
    if spec["kind"] == "torch":
        return TorchEncoder(threads)
    return OrtEncoder(name, Path(spec["path"]), threads)
