"""kiln.json: the artifact manifest, enough for any runtime in any language to drive it.

Versioned by `schema_version` "MAJOR.MINOR": readers refuse an unknown MAJOR and
accept any MINOR (minor versions only add fields).
"""

from __future__ import annotations

import json
from pathlib import Path

from kiln.errors import KilnError

MANIFEST = "kiln.json"
SCHEMA_VERSION = "1.0"


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
    version = str(manifest.get("schema_version", ""))
    if version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise ManifestError(
            f"{path}: manifest schema version {version or '(none)'} is not supported (this kiln reads {SCHEMA_VERSION.split('.')[0]}.x)"
        )
    return manifest


def write_manifest(directory: Path, manifest: dict) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
