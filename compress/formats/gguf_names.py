"""Llama tensor names in llama.cpp and in Hugging Face, and the Q/K row permutation between the two layouts.

Both directions (``llama_hf_name`` for reading a GGUF, ``gguf_name`` for writing one) come from one pair of
tables, following ``transformers/modeling_gguf_pytorch_utils.py`` and llama.cpp's ``convert_hf_to_gguf.py``.
"""

from __future__ import annotations

import re

import numpy as np

# --- Llama: GGUF name -> Hugging Face name -------------------------------------------------------

LLAMA_GLOBAL_NAMES: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent when the output layer is tied to the embedding
}
LLAMA_LAYER_NAMES: dict[str, str] = {  # blk.{i}.<key> -> model.layers.{i}.<value>
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Tensors a llama GGUF may hold that have no parameter in LlamaForCausalLM: llama.cpp's RoPE
# frequency factors (Llama 3.1 "llama3" scaling). transformers drops them, and so do we (with a note).
LLAMA_SKIPPED = frozenset({"rope_freqs.weight"})
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")


def llama_hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a llama GGUF tensor, or None if LlamaForCausalLM has no such parameter."""
    if gguf_name in LLAMA_GLOBAL_NAMES:
        return LLAMA_GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in LLAMA_LAYER_NAMES:
        return f"model.layers.{int(m.group(1))}.{LLAMA_LAYER_NAMES[m.group(2)]}"
    return None


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation of a Hugging Face q_proj/k_proj weight (``convert_hf_to_gguf.py``).

    ``w``: ``[n_head * head_dim, ...]`` (a weight ``[out, in]`` or a bias ``[out]``). Within each head,
    rows ``[0..head_dim/2)`` and ``[head_dim/2..head_dim)`` (the two RoPE halves) are interleaved.
    ``n_head`` is the attention head count for q and the key/value head count for k.
    """
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def reverse_permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo :func:`permute_qk` exactly (a pure reordering of rows); same shape in and out."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# Hugging Face name -> GGUF name: the inverse of the maps above, plus biases (optional in llama.cpp).
_HF_GLOBAL = {hf: gg for gg, hf in LLAMA_GLOBAL_NAMES.items()}
_HF_LAYER = {hf: gg for gg, hf in LLAMA_LAYER_NAMES.items()}
_HF_LAYER.update({hf.replace(".weight", ".bias"): gg.replace(".weight", ".bias")
                  for hf, gg in list(_HF_LAYER.items()) if "proj" in hf})
_HF_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def gguf_name(hf_name: str) -> str | None:
    """The llama.cpp name of a Hugging Face Llama tensor, or None if llama.cpp has no such tensor."""
    if hf_name in _HF_GLOBAL:
        return _HF_GLOBAL[hf_name]
    m = _HF_LAYER_RE.fullmatch(hf_name)
    if m and m.group(2) in _HF_LAYER:
        return f"blk.{int(m.group(1))}.{_HF_LAYER[m.group(2)]}"
    return None


def qk_heads(gguf_tensor_name: str, heads: int, kv_heads: int) -> int | None:
    """The head count that :func:`permute_qk` needs for this GGUF tensor (None: not permuted)."""
    if gguf_tensor_name.endswith((".attn_q.weight", ".attn_q.bias")):
        return heads
    if gguf_tensor_name.endswith((".attn_k.weight", ".attn_k.bias")):
        return kv_heads
    return None
