"""On-disk layouts. ``FORMATS`` is the registry of export formats (``--format``): layouts inside a
checkpoint folder (:class:`WeightFormat`) and single-file formats (GGUF).

The registry is built on first use (PEP 562 module ``__getattr__``): the package's torch-free modules
(:mod:`compress.formats.output`, which every command uses first) load without the formats' math."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from compress.formats.base import ExportFormat, WeightFormat

_registry: dict[str, ExportFormat] = {}


def _formats() -> dict[str, ExportFormat]:
    if not _registry:
        from compress.formats.bnb import BnbFormat
        from compress.formats.compressed_tensors import CompressedTensorsFormat
        from compress.formats.gguf_format import GgufFormat
        from compress.formats.gptq import GptqFormat
        from compress.formats.native import NativeFormat

        _registry.update({f.name: f for f in (BnbFormat(), GptqFormat(), NativeFormat(), GgufFormat(),
                                              CompressedTensorsFormat())})
    return _registry


def detect_format(keys: set[str]) -> WeightFormat | None:
    """The layout whose quantized weights appear among ``keys`` (None for a float checkpoint)."""
    from compress.formats.base import WeightFormat

    for fmt in _formats().values():
        if isinstance(fmt, WeightFormat) and fmt.weight_names(keys):
            return fmt
    return None


def __getattr__(name: str) -> Any:
    if name == "FORMATS":
        return _formats()
    if name in ("ExportFormat", "WeightFormat"):
        from compress.formats import base

        return getattr(base, name)
    raise AttributeError(f"module 'compress.formats' has no attribute {name!r}")


__all__ = ["FORMATS", "ExportFormat", "WeightFormat", "detect_format"]
