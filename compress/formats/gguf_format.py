"""The ``gguf`` entry of the ``--format`` registry: a single llama.cpp file, written by
:class:`compress.formats.gguf_writer.GGUFSink` (not a layout inside a checkpoint folder)."""

from __future__ import annotations

from compress.catalog import FORMATS as FORMAT_INFO
from compress.formats.base import ExportFormat


class GgufFormat(ExportFormat):
    name = "gguf"
    summary, methods, container = FORMAT_INFO[name].summary, FORMAT_INFO[name].methods, FORMAT_INFO[name].container
