"""kiln.json: the artifact manifest, enough for any runtime in any language to drive it.

Versioned by `schema_version` "MAJOR.MINOR": readers refuse an unknown MAJOR and
accept any MINOR (minor versions only add fields). The fields are documented in
docs/manifest.md and checked by the JSON Schema `manifest.schema.json` (next to this
file), which every runtime (Python here, examples/node) validates against.
"""

from __future__ import annotations

import functools
import json
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
