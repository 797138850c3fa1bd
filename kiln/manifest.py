"""kiln.json: the artifact manifest, enough for any runtime in any language to drive it.

This module is a leaf (it imports nothing of the compiler): the passes and backends that
write a manifest and the runtimes that read it share its types (`KVLayout`,
`SessionSettings`, `Classification`).

Versioned by `schema_version` "MAJOR.MINOR": readers refuse an unknown MAJOR and
accept any MINOR (minor versions only add fields). The fields are documented in
docs/manifest.md and checked by the JSON Schema `manifest.schema.json` (next to this
file), which every runtime (Python here, examples/node) validates against.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

from kiln.errors import KilnError

MANIFEST = "kiln.json"
SCHEMA_VERSION = "1.0"
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")


class ManifestError(KilnError):
    pass


def read_manifest(directory: str | Path) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ManifestError(f"{directory}: no such artifact directory")
    if not path.is_file():
        raise ManifestError(f"{directory}: not a kiln artifact (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: invalid JSON ({exc})") from exc
    check_manifest(manifest, str(path))
    return manifest


def check_manifest(manifest, where: str = MANIFEST) -> None:
    """Refuse an unknown major version, then validate against the JSON Schema.

    Schema validation needs the `jsonschema` package; without it only the version is checked."""
    if not isinstance(manifest, dict):
        raise ManifestError(f"{where}: invalid manifest: the top level is not a JSON object")
    version = manifest.get("schema_version")
    if not isinstance(version, str) or not version:
        raise ManifestError(f"{where}: invalid manifest: schema_version is {'missing' if version is None else 'not a string'}"
                            f" (expected \"MAJOR.MINOR\")")
    supported = SCHEMA_VERSION.split(".")[0]
    if version.split(".")[0] != supported:
        raise ManifestError(f"{where}: manifest schema version {version} is not supported (this kiln reads {supported}.x)")
    validator = _validator()
    if validator is None:
        return
    import jsonschema

    error = jsonschema.exceptions.best_match(validator.iter_errors(manifest))
    if error is not None:
        raise ManifestError(f"{where}: invalid manifest: {_describe(error)}")


def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


@functools.cache
def _validator():
    try:
        import jsonschema
    except ImportError:
        return None
    return jsonschema.Draft202012Validator(schema())


def _describe(error) -> str:
    """`field.path: problem`, one line, naming the field (the missing one for `required`)."""
    path = list(error.absolute_path)
    if error.validator == "required":
        missing = next((r for r in error.validator_value if r not in error.instance), None)
        return f"{_field(path + [missing])} is missing" if missing else error.message
    text = error.message if len(error.message) <= 160 else error.message[:157] + "..."
    return f"{_field(path)}: {text}"


def _field(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def write_manifest(directory: Path, manifest: dict) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")


# --- typed sections ---------------------------------------------------------------------------
# Each reads one section of a validated manifest (`from_manifest`) and names the fields a runtime
# uses; `as_dict` writes the same JSON back. Unknown keys are kept in `extra` (minor versions add
# fields), so reading and writing a section loses nothing.

DEFAULT_PAST = "past_key_values.{layer}.{key|value}"
DEFAULT_PRESENT = "present.{layer}.{key|value}"


def cache_names(template: str, num_layers: int) -> list[tuple[str, str]]:
    """A cache name template ("past_key_values.{layer}.{key|value}"; text after ': ' is
    commentary) expanded to (key, value) names per layer."""
    pattern = template.split(": ")[0].strip()
    return [tuple(pattern.replace("{layer}", str(layer)).replace("{key|value}", kind) for kind in ("key", "value"))
            for layer in range(num_layers)]


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """The manifest's `kv_cache`: how the graph takes and returns its cache (docs/manifest.md)."""

    num_layers: int
    kv_heads: int
    head_dim: int
    value_head_dim: int
    dtype: str = "float"  # float | float16 | bfloat16
    past: str = DEFAULT_PAST
    present: str = DEFAULT_PRESENT
    static: bool = False
    max_length: int | None = None  # slots of a static cache
    sequence_axis: int = 2
    padded_prefill: bool = True
    max_positions: int | None = None  # every position_id must stay below this
    shared_buffer: bool = False
    extra: dict = dataclasses.field(default_factory=dict, compare=False)

    @classmethod
    def from_manifest(cls, section: dict | None) -> KVLayout | None:
        if section is None:
            return None
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in section.items() if k in names}
        if known.get("padded_prefill") is None:
            known.pop("padded_prefill", None)
        if known.get("shared_buffer") is None:
            known.pop("shared_buffer", None)
        return cls(**known, extra={k: v for k, v in section.items() if k not in names})

    def as_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        for optional in ("max_length", "max_positions"):
            if out[optional] is None:
                del out[optional]
        return {**self.extra, **out}

    @property
    def past_names(self) -> list[tuple[str, str]]:
        """(key, value) input names per layer."""
        return cache_names(self.past, self.num_layers)

    @property
    def present_names(self) -> list[tuple[str, str]]:
        """(key, value) output names per layer."""
        return cache_names(self.present, self.num_layers)

    def cache_pairs(self) -> dict[str, str]:
        """Each cache input -> the output that is its next value."""
        return {p: q for ps, qs in zip(self.past_names, self.present_names) for p, q in zip(ps, qs)}

    @property
    def windows(self) -> list[int]:
        """The sliding windows the KV pass measured (informational `attention` entries)."""
        return [a["window"] for a in self.extra.get("attention", []) if a.get("window")]

    @property
    def numpy_dtype(self) -> str:
        return {"float": "float32", "float16": "float16", "bfloat16": "float32"}[self.dtype]


@dataclasses.dataclass(frozen=True)
class SessionSettings:
    """The manifest's `backend.session`: how to open the graph and feed it."""

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    intra_op_num_threads: int = 0
    graph_optimization_level: str = "all"
    chunk: int | None = None  # static-cache LM (target npu): tokens go in chunks of exactly this many
    padding: dict | None = None  # batch-1 fixed-length graph: {"sequence", "inputs", "outputs"}

    @classmethod
    def from_manifest(cls, backend: dict) -> SessionSettings:
        s = backend.get("session", {})
        return cls(tuple(s.get("providers", cls.providers)), s.get("intra_op_num_threads", 0),
                   s.get("graph_optimization_level", "all"), s.get("chunk"), s.get("padding"))


def host_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def session_threads(session: dict) -> int:
    """The threads to open a manifest's session with: its `intra_op_num_threads` (the compiling
    machine's choice; 0 lets the engine decide) capped at this host's cores. More threads than cores
    only make every step wait for descheduled ones, and a manifest must not size a thread pool."""
    return min(int(session.get("intra_op_num_threads", 0)), host_cores())


CLASSIFICATION_PROBLEMS = ("single_label_classification", "multi_label_classification", "regression")


@dataclasses.dataclass(frozen=True)
class Classification:
    """The manifest's `classification` (task `sequence-classification`): logits [batch, num_labels]."""

    labels: tuple[str, ...]
    problem_type: str = "single_label_classification"
    max_sequence_length: int | None = None

    @classmethod
    def from_manifest(cls, section: dict) -> Classification:
        return cls(tuple(section["labels"]), section.get("problem_type") or "single_label_classification",
                   section.get("max_sequence_length"))

    def as_dict(self) -> dict:
        return {"labels": list(self.labels), "problem_type": self.problem_type,
                "max_sequence_length": self.max_sequence_length}


# --- the artifact's files: containment and integrity ------------------------------------------

def artifact_path(directory: str | Path, relpath, field: str) -> Path:
    """`directory / relpath` for a file the manifest names in `field`, refused (one line naming
    the field) unless `relpath` is relative and normalised (no `..`, `.` or empty parts, no
    backslash, not absolute) and resolves, symlinks included, inside the artifact directory.
    Every runtime path to a file of an artifact goes through here."""
    where = f"{Path(directory) / MANIFEST}"
    if not isinstance(relpath, str) or not relpath:
        raise ManifestError(f"{where}: {field} is not a file name")
    shown = relpath.encode("unicode_escape").decode("ascii")
    parts = relpath.split("/")
    if (relpath.startswith(("/", "\\")) or "\\" in relpath or "\0" in relpath or (len(relpath) > 1 and relpath[1] == ":")
            or any(p in ("", ".", "..") for p in parts)):
        raise ManifestError(f"{where}: {field} '{shown}' is not a plain relative path inside the artifact "
                            f"(absolute, '..', '.', or not normalised): refused")
    root = Path(directory).resolve()
    path = Path(directory) / relpath
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise ManifestError(f"{where}: {field} '{shown}' cannot be resolved ({exc.__class__.__name__}): refused") from exc
    if resolved != root and root not in resolved.parents:
        raise ManifestError(f"{where}: {field} '{shown}' resolves outside the artifact directory (a symlink?): refused")
    return path


def file_fields(manifest: dict) -> list[tuple[str, str]]:
    """(field, relative path) of every file the manifest names (the `files` record included)."""
    backend = manifest.get("backend") if isinstance(manifest.get("backend"), dict) else {}
    out = []
    for key in ("model", "external_data", "params"):
        if backend.get(key) is not None:
            out.append((f"backend.{key}", backend[key]))
    functions = backend.get("functions")
    if isinstance(functions, dict):
        for fn, spec in functions.items():
            if isinstance(spec, dict) and "library" in spec:
                out.append((f"backend.functions.{fn}.library", spec["library"]))
    if manifest.get("tokenizer") is not None:
        out.append(("tokenizer", manifest["tokenizer"]))
    draft = manifest.get("draft")
    if isinstance(draft, dict) and draft.get("path") is not None:
        out.append(("draft.path", draft["path"]))
    for rel in (manifest.get("files") or {}):
        out.append((f"files[{rel!r}]", rel))
    return out


def check_paths(directory: str | Path, manifest: dict) -> None:
    """Every file the manifest names must be inside the artifact (`artifact_path`)."""
    for field, rel in file_fields(manifest):
        artifact_path(directory, rel, field)


def sha256_file(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_files(directory: str | Path) -> dict:
    """{relative path: {"bytes": size, "sha256": hex}} of every file of the artifact but kiln.json,
    sorted by path (the manifest's `files`)."""
    directory = Path(directory)
    out = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = path.relative_to(directory).as_posix()
        if rel != MANIFEST:
            out[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return out


def verify_files(directory: str | Path, manifest: dict, hashes: bool = False) -> None:
    """Each file the manifest's `files` records must be there with its size (always) and its
    sha256 (with `hashes`); a mismatch is one line naming the file. A manifest without `files`
    (an artifact from an older kiln) has nothing to check sizes against; asking for `hashes`
    on it is refused, since nothing can be verified."""
    directory = Path(directory)
    files = manifest.get("files")
    where = directory / MANIFEST
    if files is None:
        if hashes:
            raise ManifestError(f"{where}: cannot verify: the manifest records no file sizes and hashes "
                                f"(`files`; compiled by an older kiln): recompile it, or load it without --verify")
        return
    for rel, record in files.items():
        path = artifact_path(directory, rel, f"files[{rel!r}]")
        if not path.is_file():
            raise ManifestError(f"{directory}: file {rel} is missing (the manifest records it)")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise ManifestError(f"{directory}: file {rel} has {size} bytes, the manifest records {record['bytes']}: "
                                f"the artifact is damaged or was changed")
        if hashes and sha256_file(path) != record["sha256"]:
            raise ManifestError(f"{directory}: file {rel} does not match its sha256 in the manifest: "
                                f"the artifact is damaged or was changed")
