"""The ``gguf`` entry of the ``--format`` registry: a single llama.cpp file, written by
:class:`compress.formats.gguf_writer.GGUFSink` (not a layout inside a checkpoint folder)."""

from __future__ import annotations

from compress.formats.base import ExportFormat
from compress.quant import GGML_METHODS


class GgufFormat(ExportFormat):
    name = "gguf"
    summary = ("llama.cpp GGUF file (Llama architecture): llama-quantize's file types (Q4_0 ... Q8_0, Q4_K_M ...), "
               "llama.cpp names and metadata, tokenizer carried over; llama.cpp, llama-cpp-python, Ollama, "
               "transformers")
    methods = GGML_METHODS
    container = "file"
