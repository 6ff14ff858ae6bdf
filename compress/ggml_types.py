"""llama.cpp's block types and file types, one table each; every other list of them derives from these.

A *block type* (``ggml_type``) is how one tensor is stored: elements per block, bytes per block and the
GGUF type id. A *file type* (``llama_ftype``, what ``llama-quantize`` is asked for) is a recipe over
block types: most tensors take its base type, some take others (:mod:`compress.quant.llama_cpp`). Our
quantization methods ``q4_0`` ... ``q6_k`` are the file types.
"""

from __future__ import annotations

from dataclasses import dataclass

GGML_QUANTS_C = "https://github.com/ggml-org/llama.cpp/blob/master/ggml/src/ggml-quants.c"
LLAMA_QUANT_CPP = "https://github.com/ggml-org/llama.cpp/blob/master/src/llama-quant.cpp"


@dataclass(frozen=True)
class BlockType:
    """One GGML block type: ``type_id`` (gguf.GGMLQuantizationType), ``block_size`` elements stored in
    ``type_size`` bytes."""

    name: str
    type_id: int
    block_size: int
    type_size: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size


BLOCK_TYPES: dict[str, BlockType] = {t.name: t for t in (
    BlockType("q4_0", 2, 32, 18),
    BlockType("q4_1", 3, 32, 20),
    BlockType("q5_0", 6, 32, 22),
    BlockType("q5_1", 7, 32, 24),
    BlockType("q8_0", 8, 32, 34),
    BlockType("q4_k", 12, 256, 144),
    BlockType("q5_k", 13, 256, 176),
    BlockType("q6_k", 14, 256, 210),
)}


@dataclass(frozen=True)
class FileType:
    """One llama.cpp file type: ``ftype`` (general.file_type, gguf.LlamaFileType) and ``base``, the block type
    most of its tensors take."""

    name: str
    ftype: int
    base: str
    summary: str
    reference: str = LLAMA_QUANT_CPP


# In the order `compress methods` and --help list them.
FILE_TYPES: dict[str, FileType] = {t.name: t for t in (
    FileType("q4_0", 2, "q4_0", "llama.cpp Q4_0: 4-bit, one fp16 scale per 32 weights (4.5 bits/weight), "
             "bit-identical to llama.cpp's quantizer", GGML_QUANTS_C),
    FileType("q4_1", 3, "q4_1", "llama.cpp Q4_1: 4-bit, fp16 scale and minimum per 32 weights (5 bits/weight)",
             GGML_QUANTS_C),
    FileType("q8_0", 7, "q8_0", "llama.cpp Q8_0: 8-bit, one fp16 scale per 32 weights (8.5 bits/weight)",
             GGML_QUANTS_C),
    FileType("q5_0", 8, "q5_0", "llama.cpp Q5_0: 5-bit, one fp16 scale per 32 weights (5.5 bits/weight)"),
    FileType("q5_1", 9, "q5_1", "llama.cpp Q5_1: 5-bit, fp16 scale and minimum per 32 weights (6 bits/weight)"),
    FileType("q4_k_s", 14, "q4_k", "llama.cpp Q4_K_S: Q4_K (super-blocks of 256, 6-bit sub-block scales and "
             "minimums; 4.5 bits/weight), Q5_K for the first attn_v and ffn_down layers"),
    FileType("q4_k_m", 15, "q4_k", "llama.cpp Q4_K_M: Q4_K, with Q6_K for half of the attn_v and ffn_down layers "
             "(llama.cpp's usual default)"),
    FileType("q5_k_s", 16, "q5_k", "llama.cpp Q5_K_S: Q5_K (5.5 bits/weight)"),
    FileType("q5_k_m", 17, "q5_k", "llama.cpp Q5_K_M: Q5_K, with Q6_K for half of the attn_v and ffn_down layers"),
    FileType("q6_k", 18, "q6_k", "llama.cpp Q6_K: 6-bit, int8 scales per 16 weights under an fp16 scale per 256 "
             "(6.56 bits/weight)"),
)}
# Unquantized GGUF files (every matrix in one float type): what export_gguf also writes.
FLOAT_FILE_TYPES = {"f32": 0, "f16": 1}

# --- derived lists ----------------------------------------------------------------------------------------
GGML_TYPES = tuple(BLOCK_TYPES)
LEGACY_TYPES = tuple(n for n, t in BLOCK_TYPES.items() if t.block_size == 32)
K_TYPES = tuple(n for n, t in BLOCK_TYPES.items() if t.block_size == 256)
TYPE_SIZES = {n: t.type_size for n, t in BLOCK_TYPES.items()}
GGML_TYPE_IDS = {n: t.type_id for n, t in BLOCK_TYPES.items()}
GGML_METHODS = tuple(FILE_TYPES)
K_MIXTURES = {n: t.base for n, t in FILE_TYPES.items() if t.base in K_TYPES}  # file type -> its K base type
FTYPE_IDS = {**FLOAT_FILE_TYPES, **{n: t.ftype for n, t in FILE_TYPES.items()}}  # general.file_type per method
QK_K = 256


def ggml_block_size(qtype: str) -> int:
    """Elements per block of block type ``qtype``."""
    return BLOCK_TYPES[qtype].block_size


def ggml_nbytes(shape: tuple[int, ...], qtype: str) -> int:
    """Bytes a tensor of ``shape`` takes in ``qtype`` (rows must be whole blocks)."""
    block = ggml_block_size(qtype)
    if not shape or shape[-1] % block:
        raise ValueError(f"{qtype.upper()} needs rows that are a multiple of {block}, got shape {tuple(shape)}")
    n = 1
    for s in shape:
        n *= s
    return n // block * TYPE_SIZES[qtype]
