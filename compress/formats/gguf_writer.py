"""Writing a llama.cpp GGUF file from any checkpoint we read (Llama architecture).

:func:`export_gguf` streams a :class:`~compress.formats.checkpoint.CheckpointReader` (a Hugging Face
folder, a ``.safetensors`` file, or a ``.gguf`` read by :class:`~compress.formats.gguf_reader.GGUFReader`)
into one ``.gguf`` file the way llama.cpp's ``convert_hf_to_gguf.py`` (``LlamaModel``) lays it out:

- **metadata**: ``general.architecture = llama``, ``general.type``, ``general.name``,
  ``general.file_type``, ``general.quantization_version``, and ``llama.*``: context_length,
  embedding_length, block_count, feed_forward_length, attention.head_count, attention.head_count_kv,
  attention.layer_norm_rms_epsilon, attention.key_length / value_length, rope.freq_base,
  rope.dimension_count, vocab_size (plus rope scaling, see below);
- **tensor names**: llama.cpp's (``token_embd.weight``, ``blk.N.attn_q.weight``, ...,
  ``output_norm.weight``, ``output.weight`` unless the output layer is tied to the embedding), the
  inverse of the reader's name map;
- **Q/K permutation**: ``attn_q`` / ``attn_k`` rows are permuted with
  :func:`~compress.formats.gguf_reader.permute_qk` (llama.cpp's ``LlamaModel.permute``), which
  :class:`GGUFReader` undoes exactly;
- **types** (``method``): a llama.cpp file type (``q4_0`` ... ``q8_0``, ``q4_k_s`` ... ``q6_k``) gives
  each 2-D weight the type ``llama-quantize`` would (:func:`llama_cpp_type`, a port of
  ``llama_tensor_get_type`` for Llama without an importance matrix), quantized by our bit-exact ports
  of llama.cpp's quantizers (:mod:`compress.quant.ggml`, :mod:`compress.quant.kquants`); the file is
  byte-identical to ``llama-quantize`` run on the F32 export. ``f16`` / ``f32`` use their type
  everywhere. Norms and every 1-D tensor are F32, as llama.cpp requires.
- **embeddings**: as ``llama-quantize``: ``output.weight`` -- and ``token_embd.weight`` when it is tied
  to the output -- at Q6_K (Q8_0 for ``q8_0``, or when rows are not whole blocks of the method's type,
  as in SmolLM2 with 576 columns), because the output projection dominates the quality loss; an
  untied ``token_embd`` (a lookup table, not a matmul) takes the method's type. ``embeddings_type=``
  overrides both.
- **recipe** of the K-quant mixtures: ``q4_k_m`` / ``q5_k_m`` put ``attn_v`` and ``ffn_down`` of
  the first and last eighth of the layers and of every third layer between in Q6_K; ``q4_k_s`` puts
  the first four ``attn_v`` and the first eighth of ``ffn_down`` in Q5_K. A tensor whose rows are not
  whole 256-element super-blocks falls back as llama.cpp does (Q4_K -> Q5_0, Q5_K -> Q5_1,
  Q6_K -> Q8_0), and rows that are not whole 32-element blocks to F16, each with a note.
- **RoPE scaling**: ``linear`` -> ``llama.rope.scaling.type/factor``; ``llama3`` (Llama 3.1+) -> the
  ``rope_freqs.weight`` tensor computed as ``convert_hf_to_gguf.py`` does; a GGUF input's
  ``llama.rope.scaling.*`` keys and ``rope_freqs.weight`` tensor are copied. Other scaling types
  raise :class:`InputError`.
- **tokenizer** (``tokenizer="auto"``): from a GGUF input every ``tokenizer.*`` key (all
  ``tokenizer.ggml.*`` plus ``tokenizer.chat_template``) is copied with its GGUF type; from a
  Hugging Face folder, a byte-level BPE ``tokenizer.json`` ("gpt2" in llama.cpp: GPT-2, Llama 3,
  SmolLM, Qwen-style vocabularies) is converted as ``convert_hf_to_gguf.py``'s ``_set_vocab_gpt2``
  does (see :func:`hf_bpe_vocab`); SentencePiece tokenizers (``tokenizer.model``, Llama 1/2,
  Mistral) are not supported yet and raise :class:`InputError`. ``tokenizer="none"`` writes no
  tokenizer (llama.cpp cannot run such a file, but every tensor reader can read it).

Memory: tensors are read, permuted, quantized and written one at a time (``GGUFWriter``'s
``add_tensor_info`` for all of them first, then ``write_tensor_data`` as each one comes), so peak
memory is a few tensors. The file is written beside ``out_file`` under a temporary name and renamed
into place only on success.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress.errors import InputError, OptionError, OutputError
from compress.formats.checkpoint import CheckpointReader, TensorInfo
from compress.formats.gguf_reader import LLAMA_GLOBAL_NAMES, LLAMA_LAYER_NAMES, permute_qk
from compress.metrics import ErrorMetrics, compare
from compress.quant.ggml import (
    GGML_TYPES,
    K_MIXTURES,
    GGMLConfig,
    GGMLTensor,
    ggml_block_size,
    ggml_nbytes,
    quantize_ggml,
)

logger = logging.getLogger(__name__)

TOKENIZER_MODES = ("auto", "none")
TENSOR_TYPES = (*GGML_TYPES, "f16", "f32")
# method -> gguf.LlamaFileType value (general.file_type)
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q4_k_s": 14, "q4_k_m": 15,
              "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18}
METHODS = tuple(FILE_TYPES)  # what export_gguf writes: the file types above
# llama-quantize's fallback when rows are not whole 256-element super-blocks (tensor_type_fallback)
K_FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
GGML_QUANT_VERSION = 2  # gguf.GGML_QUANT_VERSION, written by every llama.cpp converter

# Hugging Face name -> GGUF name: the inverse of the reader's maps, plus biases (optional in llama.cpp).
_HF_GLOBAL = {hf: gg for gg, hf in LLAMA_GLOBAL_NAMES.items()}
_HF_LAYER = {hf: gg for gg, hf in LLAMA_LAYER_NAMES.items()}
_HF_LAYER.update({hf.replace(".weight", ".bias"): gg.replace(".weight", ".bias")
                  for hf, gg in list(_HF_LAYER.items()) if "proj" in hf})
_HF_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)  # buffers some old checkpoints saved; llama.cpp drops them
_SUPPORTED_MODEL_TYPES = ("llama", "mistral")  # both are general.architecture = llama in llama.cpp


def gguf_name(hf_name: str) -> str | None:
    """The llama.cpp name of a Hugging Face Llama tensor, or None if llama.cpp has no such tensor."""
    if hf_name in _HF_GLOBAL:
        return _HF_GLOBAL[hf_name]
    m = _HF_LAYER_RE.fullmatch(hf_name)
    if m and m.group(2) in _HF_LAYER:
        return f"blk.{int(m.group(1))}.{_HF_LAYER[m.group(2)]}"
    return None


# --- config -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaParams:
    """What the GGUF metadata needs from a Llama config.json (checked)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rms_eps: float
    rope_theta: float
    context: int | None
    tied: bool
    rope_scaling: dict[str, Any] | None  # None or {"rope_type": ..., ...}


def llama_params(config: dict[str, Any] | None, infos: list[TensorInfo], where: str) -> LlamaParams:
    """Read and check the Llama hyper-parameters (transformers 4 and 5 config styles)."""
    fix = "Give a Llama-architecture checkpoint with a complete config.json."
    if not isinstance(config, dict):
        raise InputError("checkpoint has no config.json", where=where, fix=fix)
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type not in _SUPPORTED_MODEL_TYPES and not any(a in ("LlamaForCausalLM", "MistralForCausalLM")
                                                             for a in archs):
        raise InputError(f"model type {model_type!r} is not supported for GGUF export (supported: "
                         f"{', '.join(_SUPPORTED_MODEL_TYPES)})", where=where, fix=fix)
    if config.get("num_local_experts"):
        raise InputError("mixture-of-experts models are not supported for GGUF export", where=where, fix=fix)

    def integer(key: str, default: int | None = None) -> int:
        value = config.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InputError(f"config '{key}' is {value!r}, expected a positive integer", where=where, fix=fix)
        return value

    hidden, layers, heads = integer("hidden_size"), integer("num_hidden_layers"), integer("num_attention_heads")
    kv_heads = integer("num_key_value_heads", heads)
    intermediate = integer("intermediate_size")
    head_dim = config.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise InputError(f"hidden size {hidden} is not a multiple of {heads} heads", where=where, fix=fix)
        head_dim = hidden // heads
    head_dim = integer("head_dim", head_dim)
    if head_dim % 2 or heads % kv_heads:
        raise InputError(f"head_dim {head_dim} is odd or {heads} heads are not a multiple of {kv_heads} "
                         "key/value heads", where=where, fix=fix)
    by_name = {i.name: i for i in infos}
    embed = by_name.get("model.embed_tokens.weight")
    if embed is None or len(embed.shape) != 2:
        raise InputError("tensor 'model.embed_tokens.weight' is missing", where=where, fix=fix)
    vocab = config.get("vocab_size") or embed.shape[0]
    vocab = integer("vocab_size", vocab)
    if embed.shape != (vocab, hidden):
        raise InputError(f"'model.embed_tokens.weight' has shape {list(embed.shape)}, expected "
                         f"[{vocab}, {hidden}] from the config", where=where, fix=fix)
    tied = "lm_head.weight" not in by_name or bool(config.get("tie_word_embeddings", False))
    rms_eps = config.get("rms_norm_eps", 1e-6)
    rope = dict(config.get("rope_scaling") or {})
    rope.update(config.get("rope_parameters") or {})  # transformers 5 keeps theta and scaling here
    rope_theta = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
    for key, value in (("rms_norm_eps", rms_eps), ("rope_theta", rope_theta)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise InputError(f"config '{key}' is {value!r}, expected a positive number", where=where, fix=fix)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None if rope_type in (None, "default") else {**rope, "rope_type": rope_type}
    context = config.get("max_position_embeddings")
    return LlamaParams(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                       intermediate=intermediate, vocab=vocab, rms_eps=float(rms_eps),
                       rope_theta=float(rope_theta), context=context if isinstance(context, int) else None,
                       tied=tied, rope_scaling=scaling)


def llama3_rope_factors(p: LlamaParams) -> torch.Tensor:
    """``rope_freqs.weight`` for ``rope_type = llama3``, as convert_hf_to_gguf.py's LlamaModel computes it."""
    s = p.rope_scaling or {}
    freqs = 1.0 / (p.rope_theta ** (torch.arange(0, p.head_dim, 2, dtype=torch.float32) / p.head_dim))
    factor = s.get("factor", 8.0)
    low, high = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_context = s.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


# --- what each tensor becomes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedTensor:
    source: str | None  # Hugging Face name in the reader (None: generated or copied)
    name: str  # GGUF name
    shape: tuple[int, ...]  # torch order (GGUF lists it reversed)
    qtype: str  # a tensor type: GGML_TYPES ("q4_0" ... "q6_k"), "f16" or "f32"
    permute_heads: int | None = None

    @property
    def nbytes(self) -> int:
        if self.qtype in GGML_TYPES:
            return ggml_nbytes(self.shape, self.qtype)
        return math.prod(self.shape) * (2 if self.qtype == "f16" else 4)


def _use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers, and every third between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def llama_cpp_type(method: str, name: str, columns: int, n_layers: int, tied: bool) -> tuple[str, str | None]:
    """The type ``llama-quantize`` gives the 2-D weight ``name`` (GGUF name, rows of ``columns``) for file type
    ``method``, in a Llama model of ``n_layers`` without experts or an importance matrix; plus a note when it
    had to fall back for the row length. A port of ``llama_tensor_get_type`` (src/llama-quant.cpp) for the
    file types we write."""
    base = K_MIXTURES.get(method, method)
    qtype = base
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        if columns % ggml_block_size(base):
            qtype = "q8_0"
        elif base != "q8_0":
            qtype = "q6_k"
    elif name.endswith(".attn_v.weight"):
        if method in ("q4_k_m", "q5_k_m") and _use_more_bits(layer, n_layers):
            qtype = "q6_k"
        elif method == "q4_k_s" and layer < 4:
            qtype = "q5_k"
    elif name.endswith(".ffn_down.weight"):
        if method in ("q4_k_m", "q5_k_m") and _use_more_bits(layer, n_layers):
            qtype = "q6_k"
        elif method == "q4_k_s" and layer < n_layers // 8:
            qtype = "q5_k"
    note = None
    if columns % ggml_block_size(qtype):
        chosen = K_FALLBACK.get(qtype, qtype)
        if columns % ggml_block_size(chosen):
            chosen = "f16"
        note = f"{name} ({columns} columns): {qtype.upper()} -> {chosen.upper()}"
        qtype = chosen
    return qtype, note


def plan_tensors(infos: list[TensorInfo], p: LlamaParams, method: str, embeddings_type: str | None,
                 where: str) -> tuple[list[PlannedTensor], list[str]]:
    """GGUF name, shape and type of every tensor, in the reader's order; plus notes."""
    notes: list[str] = []
    fallbacks: list[str] = []
    plan: list[PlannedTensor] = []
    for info in infos:
        if info.name.endswith(_SKIPPED_SUFFIXES):
            continue
        if info.name == "lm_head.weight" and p.tied:
            notes.append("lm_head.weight is tied to the embedding (tie_word_embeddings); not written")
            continue
        name = gguf_name(info.name)
        if name is None:
            raise InputError(f"tensor '{info.name}' has no llama.cpp counterpart", where=where,
                             fix="Only Llama-architecture checkpoints (LlamaForCausalLM) can be exported.")
        if not info.dtype.is_floating_point:
            raise InputError(f"tensor '{info.name}' is {info.dtype}, not a float tensor", where=where,
                             fix="Export from a float checkpoint (dequantize it first).")
        shape = tuple(info.shape)
        if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
            qtype = "f32"
        elif embeddings_type is not None and name in ("token_embd.weight", "output.weight"):
            qtype = embeddings_type
            if qtype in GGML_TYPES and shape[-1] % ggml_block_size(qtype):
                notes.append(f"{name}: rows of {shape[-1]} are not whole {qtype.upper()} blocks; written as F16")
                qtype = "f16"
        elif method in ("f16", "f32"):
            qtype = method
        else:
            qtype, note = llama_cpp_type(method, name, shape[-1], p.layers, p.tied)
            if note:
                fallbacks.append(note)
        permute = None
        if name.endswith((".attn_q.weight", ".attn_q.bias")):
            permute = p.heads
        elif name.endswith((".attn_k.weight", ".attn_k.bias")):
            permute = p.kv_heads
        plan.append(PlannedTensor(info.name, name, shape, qtype, permute))
    if fallbacks:
        notes.append(f"{len(fallbacks)} tensors have rows that are not whole blocks of their type and fell back as "
                     "llama-quantize does: " + "; ".join(fallbacks[:3]) + ("; ..." if len(fallbacks) > 3 else ""))
    names = {t.name for t in plan}
    wanted = ["token_embd.weight", "output_norm.weight"] + ([] if p.tied else ["output.weight"])
    for i in range(p.layers):
        wanted += [f"blk.{i}.{leaf}" for leaf in LLAMA_LAYER_NAMES]
    missing = [n for n in wanted if n not in names]
    if missing:
        raise InputError(f"tensor '{missing[0]}' (GGUF name) is missing ({len(missing)} missing in all)",
                         where=where, fix="The checkpoint is incomplete or not a LlamaForCausalLM.")
    return plan, notes


# --- tokenizer -------------------------------------------------------------------------------------------

# llama.cpp's convert_hf_to_gguf.py identifies a BPE pre-tokenizer by encoding this text and hashing the ids.
_CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# chkhsh -> tokenizer.ggml.pre, for the byte-level BPE vocabularies of llama-architecture models
# (from convert_hf_to_gguf.py's get_vocab_base_pre).
_KNOWN_PRE_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
}
# Llama 3's split regex (tokenizer.json pre_tokenizer Split pattern), which llama.cpp calls "llama-bpe".
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED = 1, 3, 4, 5


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf.py's ``does_token_look_special``."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _pre_from_structure(tok: dict[str, Any]) -> str | None:
    """The llama.cpp pre-tokenizer whose regexes are exactly this tokenizer.json's, if one is."""
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # "\p{N}" then GPT-2's regex (also llama.cpp's starcoder/refact)
    if (kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True)
            and (steps[0].get("pattern") or {}).get("Regex") == _LLAMA3_PATTERN):
        return "llama-bpe"
    return None


def _pre_from_hash(tokenizer_json: dict[str, Any]) -> str | None:
    """llama.cpp's identification: sha256 of the ids of :data:`_CHKTXT` (None without ``tokenizers``)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    try:
        ids = Tokenizer.from_str(json.dumps(tokenizer_json)).encode(_CHKTXT).ids
    except Exception as e:  # the tokenizers library has no common exception base
        logger.debug("tokenizers cannot load tokenizer.json: %s", e)
        return None
    return _KNOWN_PRE_HASHES.get(hashlib.sha256(str(ids).encode()).hexdigest())


@dataclass
class BPEVocab:
    """A byte-level BPE vocabulary in llama.cpp's terms."""

    tokens: list[str]
    token_types: list[int]
    pre: str
    pre_source: str  # "hash" (llama.cpp's own identification) or "structure"


def hf_bpe_vocab(tokenizer_json: dict[str, Any], vocab_size: int, where: str) -> BPEVocab:
    """Tokens, token types and pre-tokenizer name of a byte-level BPE ``tokenizer.json``.

    As ``convert_hf_to_gguf.py``'s ``get_vocab_base``: ids ``0..vocab_size-1`` (the model's vocabulary
    size), missing ids as ``[PAD{i}]`` (UNUSED), added tokens CONTROL when ``special`` or when they
    look special (``<|...|>``), else USER_DEFINED, all others NORMAL. The pre-tokenizer is identified
    by llama.cpp's hash of the ids of a test text (needs the ``tokenizers`` package), else from the
    structure of ``pre_tokenizer`` when it is exactly one llama.cpp implements (GPT-2, SmolLM,
    Llama 3). Differences from llama.cpp: added tokens are not re-normalised through
    encode/decode (a no-op for byte-level BPE special tokens).
    """
    fix = "Pass tokenizer='none' to write the GGUF without a tokenizer (llama.cpp cannot run it then)."
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "SentencePiece-style BPE (byte_fallback)" if model.get("byte_fallback") else model.get("type")
        raise InputError(f"tokenizer.json is {kind}; only byte-level BPE (GPT-2 / Llama 3 style) tokenizers "
                         "can be carried into GGUF yet", where=where, fix=fix)
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {t["id"]: t for t in tokenizer_json.get("added_tokens", []) if isinstance(t, dict) and "id" in t}
    reverse = {i: tok for tok, i in vocab.items()}
    for i, t in added.items():
        reverse[i] = t["content"]
    if reverse and max(reverse) >= vocab_size:
        raise InputError(f"tokenizer has token id {max(reverse)} but the model's vocabulary is {vocab_size}",
                         where=where, fix="Use the tokenizer that belongs to this checkpoint.")
    tokens, types = [], []
    for i in range(vocab_size):
        tok = reverse.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(_TOKEN_UNUSED)
        elif i in added:
            if added[i].get("special") or _looks_special(tok):
                types.append(_TOKEN_CONTROL)
            else:
                tok = tok.replace("\u2581", " ")
                types.append(_TOKEN_USER_DEFINED)
            tokens.append(tok)
        else:
            tokens.append(tok)
            types.append(_TOKEN_NORMAL)
    pre, source = _pre_from_hash(tokenizer_json), "hash"
    if pre is None:
        pre, source = _pre_from_structure(tokenizer_json), "structure"
    if pre is None:
        raise InputError("the tokenizer's pre-tokenizer is not one llama.cpp is known to implement (checked by "
                         "llama.cpp's hash and by structure: GPT-2, SmolLM, Llama 3)", where=where, fix=fix)
    return BPEVocab(tokens, types, pre, source)


def _add_hf_tokenizer(writer: Any, reader: CheckpointReader, p: LlamaParams, where: str) -> dict[str, Any]:
    """Convert a Hugging Face tokenizer (tokenizer.json + tokenizer_config.json) into ``writer``."""
    import gguf

    extra = reader.extra_files()
    fix = "Pass tokenizer='none' to write the GGUF without a tokenizer (llama.cpp cannot run it then)."
    if "tokenizer.json" not in extra:
        sp = " (tokenizer.model, SentencePiece, is not supported yet)" if "tokenizer.model" in extra else ""
        raise InputError(f"checkpoint has no tokenizer.json to carry into the GGUF{sp}", where=where, fix=fix)
    with tempfile.TemporaryDirectory(prefix="compress-gguf-vocab-") as tmp:
        folder = Path(tmp)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "chat_template.jinja", "chat_template.json"):
            src = extra.get(name)
            if src is not None:
                (folder / name).write_bytes(src if isinstance(src, bytes) else Path(src).read_bytes())
        if isinstance(reader.config, dict):
            (folder / "config.json").write_text(json.dumps(reader.config), encoding="utf-8")
        try:
            tokenizer_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"tokenizer.json is not valid JSON ({e})", where=where, fix=fix) from e
        vocab = hf_bpe_vocab(tokenizer_json, p.vocab, where)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(vocab.pre)
        writer.add_token_list(vocab.tokens)
        writer.add_token_types(vocab.token_types)
        special = gguf.SpecialVocab(folder, load_merges=True)
        special.add_to_gguf(writer, quiet=True)
        # convert_hf_to_gguf.py's LlamaModel.set_vocab adds these two
        config_file = folder / "tokenizer_config.json"
        tokenizer_config = {}
        if config_file.is_file():
            with contextlib.suppress(UnicodeDecodeError, json.JSONDecodeError):
                tokenizer_config = json.loads(config_file.read_text(encoding="utf-8"))
        if isinstance(tokenizer_config, dict) and isinstance(tokenizer_config.get("add_prefix_space"), bool):
            writer.add_add_space_prefix(tokenizer_config["add_prefix_space"])
        if p.vocab == 49152:  # llama.cpp's rule for SmolLM / Granite-small vocabularies
            writer.add_add_bos_token(False)
    return {"source": "tokenizer.json", "model": "gpt2", "pre": vocab.pre, "pre_identified_by": vocab.pre_source,
            "tokens": len(vocab.tokens), "merges": len(special.merges)}


def _gguf_package_reader(reader: CheckpointReader) -> Any | None:
    """The ``gguf.GGUFReader`` behind a GGUF input (reused when the reader holds one), else None."""
    from compress.formats.gguf_reader import GGUFReader

    if not isinstance(reader, GGUFReader):
        return None
    return reader.gguf  # the file our reader already parsed: parsing it again costs seconds


def _field_value(field: Any) -> tuple[Any, Any, Any]:
    """(value, GGUFValueType, sub type) of a ``gguf.ReaderField``, strings as raw bytes."""
    import gguf

    vt = gguf.GGUFValueType
    main = field.types[0]
    if main == vt.ARRAY:
        sub = field.types[-1]
        if len(field.types) != 2:
            raise ValueError("nested arrays")
        if sub == vt.STRING:
            return [bytes(field.parts[i]) for i in field.data], main, sub
        return [field.parts[i].tolist()[0] for i in field.data], main, sub
    if main == vt.STRING:
        return bytes(field.parts[-1]), main, None
    return field.parts[-1].tolist()[0], main, None


# general.* keys the writer sets itself (or GGUFWriter writes), never copied from a source GGUF
_GENERAL_OWN = frozenset({"general.architecture", "general.type", "general.name", "general.file_type",
                          "general.quantization_version", "general.alignment"})


def _copy_fields(writer: Any, src: Any, prefixes: tuple[str, ...], notes: list[str],
                 skip: frozenset[str] = frozenset()) -> list[str]:
    """Copy every metadata key of ``src`` starting with one of ``prefixes`` (except ``skip``), types kept;
    returns the keys."""
    copied = []
    for key, field in src.fields.items():
        if not key.startswith(prefixes) or key in skip:
            continue
        try:
            value, vtype, sub = _field_value(field)
        except ValueError:
            notes.append(f"metadata '{key}' (nested arrays) was not copied")
            continue
        if isinstance(value, list) and not value:
            continue  # GGUFWriter cannot write empty arrays
        writer.add_key_value(key, value, vtype, sub_type=sub)
        copied.append(key)
    return copied


# --- writing -------------------------------------------------------------------------------------------


def _tensor_bytes(t: torch.Tensor, planned: PlannedTensor,
                  measure: bool = False) -> tuple[np.ndarray | None, ErrorMetrics | None]:
    """The GGUF bytes of one tensor (torch order in, already permuted) as a numpy array, or None if
    the tensor holds NaN/inf (or values its GGUF type cannot represent); with ``measure``, the error
    of what is stored against ``t`` (None for exact F32 copies)."""
    if planned.qtype in GGML_TYPES:
        q = quantize_ggml(t, GGMLConfig(planned.qtype))
        if not q.scales_finite():  # NaN/inf reach the block scales
            return None, None
        return q.packed().numpy(), (compare(t, q.dequantize(torch.float32)) if measure else None)
    out = t.float()  # bf16/f16 -> f32 exactly; f16 output rounds from f32, as llama.cpp's converter does
    if planned.qtype == "f16":
        out = out.half()
    if not bool(torch.isfinite(out).all()):
        return None, None
    # F32 copies of f32/bf16/f16 tensors are exact; only F16 from another dtype rounds
    metrics = compare(t, out) if measure and planned.qtype == "f16" and t.dtype != torch.float16 else None
    return np.ascontiguousarray(out.numpy()), metrics


def _model_name(reader: CheckpointReader) -> str:
    """The input folder's name (or a single file's stem): what convert_hf_to_gguf.py calls the model."""
    path = Path(reader.path)
    return path.name if path.is_dir() else path.stem


def _check_out_file(out_file: Path, reader: CheckpointReader, force: bool) -> None:
    src = Path(reader.path)
    if out_file.resolve() == src.resolve() or src.resolve() in out_file.resolve().parents:
        raise OutputError(f"output {out_file} overlaps the input {src}", fix="Choose a different output path.")
    if out_file.exists() or out_file.is_symlink():
        if out_file.is_dir():
            raise OutputError(f"output {out_file} is a folder", fix="Give a file path ending in .gguf.")
        if not force:
            raise OutputError(f"output {out_file} already exists",
                              fix="Pass force=True to replace it, or choose another path.")


def export_gguf(reader: CheckpointReader, out_file: str | os.PathLike[str], method: str = "q4_0", *,
                embeddings_type: str | None = None, tokenizer: str = "auto", name: str | None = None,
                force: bool = False, measure: bool = False,
                progress: Callable[[str, int], None] | None = None,
                quantized: Callable[[PlannedTensor, torch.Tensor], tuple[GGMLTensor, torch.Tensor] | None]
                | None = None) -> dict[str, Any]:
    """Write ``reader``'s Llama model as a llama.cpp GGUF file; returns a report (see below).

    Args:
        reader: any open checkpoint (``open_checkpoint(path)``) of a Llama-architecture model.
        out_file: the ``.gguf`` to write (replaced only with ``force``); written via a temporary file
            beside it and renamed on success.
        method: a llama.cpp file type (``METHODS``: ``q4_0`` ... ``q6_k``; see the module docstring), ``f16``
            or ``f32``.
        embeddings_type: one tensor type (``q4_0`` ... ``q8_0``, ``q4_k``, ``q5_k``, ``q6_k``, ``f16``, ``f32``)
            for ``token_embd`` and ``output`` (default: llama-quantize's choice).
        tokenizer: ``"auto"`` (carry the tokenizer; error if it cannot be) or ``"none"``.
        name: ``general.name`` (default: the source GGUF's, else the input's folder or file name, as
            ``convert_hf_to_gguf.py`` does; never the output path, so that the bytes do not depend on it).
        force: replace an existing ``out_file``.
        measure: compute the error of every quantized (or F16-rounded) tensor against its source
            (``metrics`` in its ``tensors`` entry: rel_fro, sqnr_db, max_abs, cosine).
        progress: called with (source name, source bytes) after each tensor is written.
        quantized: optional hook for quantized tensors: given the planned tensor and its (permuted)
            float values, return ``(GGMLTensor, reference)`` to store that tensor instead of quantizing the
            values (the error is then measured against ``reference``), or None for the normal path.

    Returns:
        ``{"file", "method", "file_type", "bytes", "tensors": [{"name", "source", "type", "shape",
        "bytes"}...], "by_type": {TYPE: {"tensors", "params", "bytes"}}, "tokenizer": {...} | None,
        "notes": [...]}``; ``shape`` in GGUF order (innermost first), ``bytes`` without padding.
    """
    import gguf

    if method not in METHODS:
        raise OptionError(f"GGUF method must be one of {', '.join(METHODS)}, got {method!r}")
    if embeddings_type is not None and embeddings_type not in TENSOR_TYPES:
        raise OptionError(f"embeddings type must be one of {', '.join(TENSOR_TYPES)}, got {embeddings_type!r}")
    if tokenizer not in TOKENIZER_MODES:
        raise OptionError(f"tokenizer must be one of {', '.join(TOKENIZER_MODES)}, got {tokenizer!r}")
    out_file = Path(out_file)
    where = str(reader.path)
    _check_out_file(out_file, reader, force)
    infos = reader.infos()
    p = llama_params(reader.config, infos, where)
    plan, notes = plan_tensors(infos, p, method, embeddings_type, where)
    if isinstance(reader.config, dict) and reader.config.get("attention_bias"):
        notes.append("attention biases are written (llama.cpp reads them); compress' GGUF reader does not")
    src = _gguf_package_reader(reader)

    parent = out_file.parent if str(out_file.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"folder {parent} does not exist", fix="Create it or choose another output path.")
    tmp = parent / f".{out_file.name}.tmp-{uuid.uuid4().hex[:8]}"
    writer = gguf.GGUFWriter(str(tmp), "llama")
    try:
        # metadata, in convert_hf_to_gguf.py's order
        writer.add_type("model")
        source_name = src.fields.get("general.name") if src is not None else None
        writer.add_name(name or (bytes(source_name.parts[-1]).decode("utf-8", "replace") if source_name
                                 else _model_name(reader)))
        writer.add_block_count(p.layers)
        if p.context is not None:
            writer.add_context_length(p.context)
        writer.add_embedding_length(p.hidden)
        writer.add_feed_forward_length(p.intermediate)
        writer.add_head_count(p.heads)
        writer.add_head_count_kv(p.kv_heads)
        writer.add_rope_freq_base(p.rope_theta)
        writer.add_layer_norm_rms_eps(p.rms_eps)
        writer.add_key_length(p.head_dim)
        writer.add_value_length(p.head_dim)
        writer.add_file_type(FILE_TYPES[method])
        writer.add_vocab_size(p.vocab)
        writer.add_rope_dimension_count(p.head_dim)
        rope_freqs: np.ndarray | None = None
        if src is not None:
            # the model card of the source (license, base model, languages, size label...) stays with it
            _copy_fields(writer, src, ("general.",), notes, skip=_GENERAL_OWN)
            copied = _copy_fields(writer, src, ("llama.rope.scaling.",), notes)
            for t in src.tensors:
                if t.name == "rope_freqs.weight":
                    rope_freqs = np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
            if copied or rope_freqs is not None:
                notes.append("RoPE scaling copied from the source GGUF (" + ", ".join(
                    copied + (["rope_freqs.weight"] if rope_freqs is not None else [])) + ")")
        elif p.rope_scaling is not None:
            kind = p.rope_scaling["rope_type"]
            if kind == "linear":
                writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
                writer.add_rope_scaling_factor(float(p.rope_scaling["factor"]))
            elif kind == "llama3":
                rope_freqs = llama3_rope_factors(p).numpy()
            else:
                raise InputError(f"RoPE scaling type {kind!r} is not supported for GGUF export yet", where=where,
                                 fix="Only linear and llama3 RoPE scaling can be exported.")
        # tokenizer
        tok_report: dict[str, Any] | None = None
        if tokenizer == "auto":
            if src is not None:
                keys = _copy_fields(writer, src, ("tokenizer.",), notes)
                if "tokenizer.ggml.model" not in keys:
                    raise InputError("the source GGUF has no tokenizer (tokenizer.ggml.model)", where=where,
                                     fix="Pass tokenizer='none' to export without one.")
                tok_report = {"source": "gguf", "keys": keys}
            else:
                tok_report = _add_hf_tokenizer(writer, reader, p, where)
        writer.add_quantization_version(GGML_QUANT_VERSION)

        # tensor infos, then data one tensor at a time
        extra: list[tuple[PlannedTensor, np.ndarray]] = []
        if rope_freqs is not None:
            extra.append((PlannedTensor(None, "rope_freqs.weight", tuple(rope_freqs.shape), "f32"), rope_freqs))
        all_tensors = [t for t, _ in extra] + plan
        for t in all_tensors:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes,
                                   raw_dtype=gguf.GGMLQuantizationType[t.qtype.upper()])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _t, data in extra:
            writer.write_tensor_data(data)
        measured: dict[str, ErrorMetrics] = {}
        reader_bytes = {i.name: i.nbytes for i in infos}
        for t in plan:
            assert t.source is not None
            w = reader.get(t.source)
            if tuple(w.shape) != t.shape:
                raise InputError(f"tensor '{t.source}' has shape {list(w.shape)}, its header said "
                                 f"{list(t.shape)}", where=where, fix="The checkpoint is corrupt.")
            if t.permute_heads is not None:
                w = permute_qk(w, t.permute_heads)
            custom = quantized(t, w) if quantized is not None and t.qtype in GGML_TYPES else None
            if custom is not None:  # the caller made this tensor itself (e.g. an update folded into Q4_1 minimums)
                q, reference = custom
                data = q.packed().numpy() if q.scales_finite() else None
                metrics = compare(reference, q.dequantize(torch.float32)) if measure and data is not None else None
            else:
                data, metrics = _tensor_bytes(w, t, measure)
            if metrics is not None:
                measured[t.name] = metrics
            del w
            if data is None:
                raise InputError(f"tensor '{t.source}' contains NaN or inf, or values too large for "
                                 f"{t.qtype.upper()}", where=where,
                                 fix="Fix the checkpoint; llama.cpp cannot use non-finite weights.")
            writer.write_tensor_data(data)
            del data
            if progress is not None:
                progress(t.source, reader_bytes.get(t.source, 0))
        writer.close()
        if out_file.exists() and not force:  # appeared while we were writing
            raise OutputError(f"output {out_file} already exists", fix="Pass force=True to replace it.")
        os.replace(tmp, out_file)
    except BaseException:
        writer.close()
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise

    by_type: dict[str, dict[str, int]] = {}
    tensors = []
    for t in all_tensors:
        qname = t.qtype.upper()
        entry = by_type.setdefault(qname, {"tensors": 0, "params": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["params"] += math.prod(t.shape)
        entry["bytes"] += t.nbytes
        entry_out: dict[str, Any] = {"name": t.name, "source": t.source, "type": qname,
                                     "shape": list(reversed(t.shape)), "bytes": t.nbytes}
        if t.name in measured:
            entry_out["metrics"] = measured[t.name].as_dict()
        tensors.append(entry_out)
    return {"file": str(out_file), "method": method, "file_type": FILE_TYPES[method],
            "bytes": out_file.stat().st_size, "tensors": tensors, "by_type": by_type, "tokenizer": tok_report,
            "notes": notes}


__all__ = ["METHODS", "LlamaParams", "PlannedTensor", "export_gguf", "gguf_name", "hf_bpe_vocab", "llama_params",
           "plan_tensors"]
