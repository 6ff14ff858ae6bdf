"""On-disk layouts. ``FORMATS`` is the registry of quantized weight layouts (``--format``)."""

from __future__ import annotations

from compress.formats.base import WeightFormat
from compress.formats.bnb import BnbFormat
from compress.formats.gptq import GptqFormat

FORMATS: dict[str, WeightFormat] = {f.name: f for f in (BnbFormat(), GptqFormat())}


def detect_format(keys: set[str]) -> WeightFormat | None:
    """The layout whose quantized weights appear among ``keys`` (None for a float checkpoint)."""
    for fmt in FORMATS.values():
        if fmt.weight_names(keys):
            return fmt
    return None


__all__ = ["FORMATS", "WeightFormat", "detect_format"]
