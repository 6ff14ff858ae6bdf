"""The ``gguf`` entry of the ``--format`` registry: a single llama.cpp file, written by
:func:`compress.formats.gguf_writer.export_gguf` (not a layout inside a checkpoint folder)."""

from __future__ import annotations

from compress.formats.base import ExportFormat


class GgufFormat(ExportFormat):
    name = "gguf"
    summary = ("llama.cpp GGUF file (Llama architecture): Linear weights in Q4_0/Q4_1/Q8_0, llama.cpp names "
               "and metadata, tokenizer carried over; llama.cpp, llama-cpp-python, Ollama, transformers")
    methods = ("q4_0", "q4_1", "q8_0")
    container = "file"
