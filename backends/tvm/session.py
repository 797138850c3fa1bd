"""A TVM artifact behind the session surface the runtime uses for ORT.

Only TVM's runtime is needed: the Relax VM from `tvm.runtime.vm`, never `tvm.relax`. With
TVM_USE_RUNTIME_LIB=1 (set by `kiln run`, `kiln eval` and `kiln bench`, which never compile)
`import tvm` loads libtvm_runtime alone, not the compiler library.

    session.get_inputs() / get_outputs()         objects with `.name`, in the graph's order
    session.run(names, feeds)                    numpy in, numpy out
    session.run_with_ort_values(names, feeds)    values out that stay on the TVM side (they have
                                                 `.numpy()`), so a KV cache goes from one step's
                                                 outputs to the next step's inputs without a copy

Any batch and sequence length are served by the batch-1, static-shape functions:
- rows of a batch run one by one (rows are independent) and are stacked;
- without a cache, `main` runs the inputs padded at the end to its length, and outputs with
  a sequence axis are cut back (exact: padding is masked, or later tokens for a causal LM);
- with a static cache, the tokens go through `prefill` in chunks of its length (the last one
  padded into free slots after the real tokens, masked out, when the cache has room; else
  one token at a time through `decode`), each call writing its slots and handing the cache on.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from kiln.backends.static import host, pad_chunk, run_padded, run_rows, sequence_length, shape, take
from kiln.errors import KilnError
from kiln.manifest import ManifestError, artifact_path, session_threads, sha256_file


@dataclasses.dataclass(frozen=True)
class _Arg:
    name: str


def checked_libraries(directory: Path, functions: dict, files: dict | None) -> dict[str, Path]:
    """Each function's library, refused (one line naming it) unless it is inside the artifact
    (`artifact_path`) and its sha256 is recorded (the manifest's `files`, or the function's
    `sha256`) and matches. A TVM library is compiled code: nothing is loaded before every one
    of them passes."""
    paths = {}
    for fn, spec in functions.items():
        field = f"backend.functions.{fn}.library"
        rel = spec["library"]
        path = artifact_path(directory, rel, field)
        recorded = [h for h in ((files or {}).get(rel, {}).get("sha256"), spec.get("sha256")) if h]
        if not recorded:
            raise ManifestError(f"{directory}: the TVM library {rel} ({field}) has no sha256 in the manifest: "
                                f"compiled code is loaded only when its hash is recorded: refused")
        if not path.is_file():
            raise ManifestError(f"{directory}: the TVM library {rel} ({field}) is missing")
        if any(sha256_file(path) != h for h in recorded):
            raise ManifestError(f"{directory}: the TVM library {rel} ({field}) does not match its sha256 in the "
                                f"manifest: refused (not loaded)")
        paths[fn] = path
    return paths


class TvmSession:
    def __init__(self, directory: Path, backend_manifest: dict, threads: int | None = None,
                 files: dict | None = None):
        libraries = checked_libraries(directory, backend_manifest["functions"], files)
        params = artifact_path(directory, backend_manifest["params"], "backend.params")
        import tvm
        from tvm.runtime.vm import VirtualMachine  # the Relax VM's runtime half (tvm.relax re-exports it)

        # TVM's pool would pin the calling thread to core 0 (for the whole process); its size
        # is set where the backend is imported (TVM_NUM_THREADS), the threads it runs on here.
        os.environ.setdefault("TVM_BIND_THREADS", "0")
        threads = threads or session_threads(backend_manifest["session"])
        if threads:
            tvm.get_global_func("runtime.config_threadpool")(1, threads)  # 1: kBig, all cores alike
        self._tvm = tvm
        self.functions = backend_manifest["functions"]
        self.vms = {fn: VirtualMachine(tvm.runtime.load_module(str(libraries[fn])), tvm.cpu())
                    for fn in self.functions}
        self.sequence_axes = backend_manifest["sequence_axes"]
        self.batch_axes = backend_manifest["batch_axes"]
        self.cache = backend_manifest.get("cache", {})  # past input -> present output
        with np.load(params) as stored:
            tensors = {k: tvm.runtime.tensor(stored[k]) for k in stored.files}
        self.params = {fn: [tensors[k] for k in spec["params"]] for fn, spec in self.functions.items()}
        first = next(iter(self.functions.values()))
        self._inputs, self._outputs = [_Arg(n) for n in first["inputs"]], [_Arg(n) for n in first["outputs"]]

    def get_inputs(self) -> list[_Arg]:
        return self._inputs

    def get_outputs(self) -> list[_Arg]:
        return self._outputs

    def run(self, names, feeds: dict) -> list[np.ndarray]:
        return [v.numpy() for v in self.run_with_ort_values(names, feeds)]

    def run_with_ort_values(self, names, feeds: dict) -> list:
        names = names or [o.name for o in self._outputs]
        missing = [i.name for i in self._inputs if i.name not in feeds]
        if missing:
            raise KilnError(f"missing input '{missing[0]}'")
        out = run_rows(self._row, feeds, self.batch_axes)
        return [self._tensor(out[n]) for n in names]

    def _row(self, feeds: dict) -> dict:
        if "decode" in self.functions:
            return self._through_cache(feeds)
        return run_padded(lambda padded: self._call("main", padded), feeds, self.sequence_axes,
                          self.functions["main"]["sequence"])

    def _through_cache(self, feeds: dict) -> dict:
        chunk, seq = self.functions["prefill"]["sequence"], sequence_length(feeds, self.sequence_axes)
        slots = shape(feeds["attention_mask"])[1]
        axes, feeds, pieces, start = self.sequence_axes, dict(feeds), [], 0
        while start < seq:
            n = min(chunk, seq - start)
            step = {k: take(v, axes[k], range(start, start + n)) if k in axes else v for k, v in feeds.items()}
            fn = "decode" if n == 1 else "prefill"
            if 1 < n < chunk:
                end = int(host(step["cache_position"])[-1]) + 1
                if end + chunk - n > slots:  # no free slots for the padding: one token at a time
                    fn, n = "decode", 1
                    step = {k: take(v, axes[k], 0) if k in axes else v for k, v in step.items()}
                else:
                    step = pad_chunk(step, axes, chunk, end)
            out = self._call(fn, step)
            if fn == "prefill" and n < chunk:
                out = {k: take(v, axes[k], range(n)) if k in axes else v for k, v in out.items()}
            feeds.update({past: out[present] for past, present in self.cache.items()})
            pieces.append(out)
            start += n
        last = pieces[-1]
        return {k: np.concatenate([host(p[k]) for p in pieces], axis=axes[k]) if k in axes and len(pieces) > 1 else v
                for k, v in last.items()}

    def _call(self, fn: str, feeds: dict) -> dict:
        spec = self.functions[fn]
        result = self.vms[fn]["main"](*[self._tensor(feeds[n]) for n in spec["inputs"]], *self.params[fn])
        values = [result] if len(spec["outputs"]) == 1 else list(result)
        return dict(zip(spec["outputs"], values))

    def _tensor(self, value):
        if isinstance(value, self._tvm.runtime.Tensor):
            return value
        return self._tvm.runtime.tensor(np.ascontiguousarray(host(value)))
