"""On-disk layouts. ``FORMATS`` is the registry of export formats (``--format``): layouts inside a
checkpoint folder (:class:`WeightFormat`) and single-file formats (GGUF)."""

from __future__ import annotations

from compress.formats.base import ExportFormat, WeightFormat
from compress.formats.bnb import BnbFormat
from compress.formats.compressed_tensors import CompressedTensorsFormat
from compress.formats.gguf_format import GgufFormat
from compress.formats.gptq import GptqFormat
from compress.formats.native import NativeFormat

FORMATS: dict[str, ExportFormat] = {f.name: f for f in (BnbFormat(), GptqFormat(), NativeFormat(), GgufFormat(),
                                                        CompressedTensorsFormat())}


def detect_format(keys: set[str]) -> WeightFormat | None:
    """The layout whose quantized weights appear among ``keys`` (None for a float checkpoint)."""
    for fmt in FORMATS.values():
        if isinstance(fmt, WeightFormat) and fmt.weight_names(keys):
            return fmt
    return None


__all__ = ["FORMATS", "ExportFormat", "WeightFormat", "detect_format"]
