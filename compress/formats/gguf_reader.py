"""Reading a llama.cpp GGUF file as if it were a Hugging Face checkpoint.

:class:`GGUFReader` memory-maps the file with the ``gguf`` package and presents it the way
``transformers`` loads it (``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)``):

- tensor names are Hugging Face names (``blk.0.attn_q.weight`` -> ``model.layers.0.self_attn.q_proj.weight``);
- shapes are torch order (GGUF lists dimensions innermost first; a Linear weight comes out ``[out, in]``);
- every tensor is dequantized to float32 by ``gguf.quants.dequantize`` -- one tensor per ``get`` call,
  nothing at open time -- as transformers' loader does (it turns F16/BF16 tensors into float32 too);
- the row permutation llama.cpp applies to ``attn_q`` / ``attn_k`` of Llama models (to turn the
  Hugging Face "rotate halves" RoPE layout into GGML's "rotate pairs" one) is undone;
- :attr:`GGUFReader.config` is the ``config.json`` dict transformers derives from the metadata;
- :meth:`GGUFReader.extra_files` is the tokenizer transformers builds from the metadata (needs
  ``transformers``; without it the reader still works and returns no tokenizer files).

Supported architectures: ``llama`` only (Llama 1/2/3, Mistral, SmolLM, TinyLlama... -- everything
llama.cpp writes as ``general.architecture = "llama"``), without ``transformers`` installed. The
name map, config map and permutation are written here, following
``transformers/modeling_gguf_pytorch_utils.py`` and ``transformers/integrations/ggml.py``. Other
architectures, and llama-architecture mixture-of-experts files (Mixtral), raise :class:`InputError`.

Every structural problem with the file (wrong magic, truncation, a corrupt header, an unexpected
tensor, shapes that disagree with the metadata) is an :class:`InputError` with a one-line message,
found at open time by :func:`~compress.formats.gguf_scan.scan_gguf` before the ``gguf`` package touches the file.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress.errors import InputError
from compress.formats.checkpoint import CheckpointReader, TensorInfo
from compress.formats.gguf_names import LLAMA_SKIPPED, llama_hf_name, reverse_permute_qk
from compress.formats.gguf_scan import (
    FIX_CORRUPT,
    FIX_QTYPE,
    FIX_TRUNCATED,
    GGUFLayout,
    dequantizable,
    open_gguf_package,
    scan_gguf,
)

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("llama",)

# --- config ------------------------------------------------------------------------------------------

# llama.<key> -> config key, as transformers' GGUF_CONFIG_MAPPING["llama"].
LLAMA_CONFIG_KEYS: dict[str, str] = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.dimension_count": "head_dim",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
TOKEN_ID_KEYS: dict[str, str] = {  # tokenizer.ggml.<key> -> config key
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "unknown_token_id": "unk_token_id",
    "padding_token_id": "pad_token_id",
}
_REQUIRED_LLAMA_KEYS = ("block_count", "embedding_length", "attention.head_count", "feed_forward_length")
_INT_KEYS = {"context_length", "block_count", "feed_forward_length", "embedding_length",
             "rope.dimension_count", "attention.head_count", "attention.head_count_kv", "vocab_size"}


def llama_config(layout: GGUFLayout, where: str) -> dict[str, Any]:
    """The ``config.json`` dict transformers derives from a llama GGUF's metadata.

    The keys and values of transformers' ``load_gguf_checkpoint(path)["config"]`` (floats such as
    rms_norm_eps stay the float32 value the file stores, e.g. 9.999999747378752e-06), without its
    ``_model_name_or_path`` (``general.name``), plus ``architectures``, ``hidden_act``, ``dtype`` and
    an explicit ``num_key_value_heads`` so that the dict is a complete config.json.
    ``LlamaConfig(**config)`` equals the config transformers builds from the file.
    """
    meta = layout.metadata
    fix_meta = "The GGUF metadata is incomplete or corrupt; convert the model again with llama.cpp."
    for key in _REQUIRED_LLAMA_KEYS:
        if f"llama.{key}" not in meta:
            raise InputError(f"metadata key 'llama.{key}' is missing", where=where, fix=fix_meta)
    config: dict[str, Any] = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    for gguf_key, hf_key in LLAMA_CONFIG_KEYS.items():
        value = meta.get(f"llama.{gguf_key}")
        if value is None:
            continue
        if gguf_key in _INT_KEYS:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                per_layer = " (per-layer values are not supported)" if isinstance(value, list) else ""
                raise InputError(f"metadata 'llama.{gguf_key}' is {value!r}, expected a positive integer"
                                 f"{per_layer}", where=where, fix=fix_meta)
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"metadata 'llama.{gguf_key}' is {value!r}, expected a number", where=where,
                             fix=fix_meta)
        config[hf_key] = float(value) if gguf_key not in _INT_KEYS else int(value)
    # llama.cpp's own default; transformers leaves the key out (LlamaConfig then uses the same value).
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in layout.array_lengths:
        config["vocab_size"] = layout.array_lengths["tokenizer.ggml.tokens"]
    elif "vocab_size" not in config and "token_embd.weight" in layout.tensors:
        config["vocab_size"] = int(layout.tensors["token_embd.weight"][0][-1])
    config["tie_word_embeddings"] = "output.weight" not in layout.tensors
    for gguf_key, hf_key in TOKEN_ID_KEYS.items():
        value = meta.get(f"tokenizer.ggml.{gguf_key}")
        if isinstance(value, int) and not isinstance(value, bool):
            config[hf_key] = value
    config["hidden_act"] = "silu"
    config["dtype"] = "float32"
    return config


# --- the reader --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    index: int  # position in gguf.GGUFReader.tensors
    gguf_name: str
    shape: tuple[int, ...]  # Hugging Face (torch) order
    permute_heads: int | None  # undo llama.cpp's q/k permutation with this many heads


class GGUFReader(CheckpointReader):
    """A llama.cpp ``.gguf`` file seen as a Hugging Face checkpoint (architectures: ``llama``).

    Opening parses and checks the header and memory-maps the file; it dequantizes nothing, so memory
    does not grow with the model. ``get(name)`` dequantizes one tensor to float32.

    Attributes:
        path: the .gguf file.
        architecture: ``general.architecture`` (``"llama"``).
        config: the config.json dict (see :func:`llama_config`).
        metadata: the GGUF metadata (scalars, strings, short numeric arrays).
        notes: things the conversion drops, for the caller to show (e.g. RoPE scaling factors).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        where = str(self.path)
        self.notes: list[str] = []
        layout = scan_gguf(self.path)
        self.metadata: dict[str, Any] = layout.metadata
        arch = layout.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise InputError("metadata has no 'general.architecture'", where=where,
                             fix="The file is not a model GGUF or is corrupt; "
                                 "convert it again with llama.cpp.")
        self.architecture = arch
        if arch not in SUPPORTED_ARCHITECTURES:
            raise InputError(f"GGUF architecture '{arch}' is not supported (supported: "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)})", where=where,
                             fix="Use the original Hugging Face checkpoint of this model instead.")
        if layout.metadata.get("llama.expert_count"):
            experts = layout.metadata["llama.expert_count"]
            raise InputError(f"mixture-of-experts llama GGUF ({experts} experts, e.g. Mixtral) is not "
                             "supported", where=where,
                             fix="Use the original Hugging Face checkpoint of this model instead.")
        self.config: dict[str, Any] = llama_config(layout, where)
        self._entries = self._map_tensors(layout)
        scaling = layout.metadata.get("llama.rope.scaling.type")
        if "rope_freqs.weight" in layout.tensors or scaling not in (None, "none"):
            self.notes.append("the GGUF carries RoPE scaling (rope_freqs / llama.rope.scaling.*) that "
                              "transformers' GGUF loader ignores; the config has no rope_scaling")
            logger.warning("%s: %s", where, self.notes[-1])
        self._reader: Any = open_gguf_package(self.path)
        if getattr(self._reader, "byte_order", "I") != "I":
            raise InputError("GGUF file is in the other byte order, which is not supported", where=where,
                             fix="Convert it again with llama.cpp on a little-endian machine.")
        index = {t.name: i for i, t in enumerate(self._reader.tensors)}
        for hf_name, entry in list(self._entries.items()):
            i = index.get(entry.gguf_name)
            if i is None:  # scan_gguf and the gguf package disagree: should not happen
                raise InputError(f"tensor '{entry.gguf_name}' not found by the gguf package", where=where,
                                 fix=FIX_CORRUPT)
            qtype = self._reader.tensors[i].tensor_type
            if not dequantizable(qtype):
                raise InputError(f"tensor '{entry.gguf_name}' is {qtype.name}, which gguf "
                                 "cannot dequantize", where=where, fix=FIX_QTYPE)
            self._entries[hf_name] = _Entry(i, entry.gguf_name, entry.shape, entry.permute_heads)
        self._infos = [TensorInfo(name, e.shape, torch.float32, self.path)
                       for name, e in sorted(self._entries.items(), key=lambda kv: kv[1].index)]
        self._extra: dict[str, bytes | Path] | None = None

    def stored(self, name: str) -> tuple[str, str, int]:
        """(GGUF name, GGML type name such as 'Q4_0' or 'F32', bytes in the file) of tensor ``name``."""
        entry = self._entries[name]
        t = self._reader.tensors[entry.index]
        return entry.gguf_name, t.tensor_type.name, int(t.n_bytes)

    def _map_tensors(self, layout: GGUFLayout) -> dict[str, _Entry]:
        """Hugging Face name -> entry (index filled in later); checks names and shapes against the config."""
        where = str(self.path)
        c = self.config
        hidden, heads, kv_heads = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
        layers, inter, vocab = c["num_hidden_layers"], c["intermediate_size"], c.get("vocab_size")
        head_dim = c.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise InputError(f"hidden size {hidden} is not a multiple of {heads} heads", where=where,
                                 fix=FIX_CORRUPT)
            head_dim = hidden // heads
        if head_dim % 2 or heads % kv_heads:
            raise InputError(f"head_dim {head_dim} is odd or {heads} heads are not a multiple of {kv_heads} "
                             "key/value heads", where=where, fix=FIX_CORRUPT)
        expected: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (vocab or -1, hidden),
            "model.norm.weight": (hidden,),
        }
        if not c["tie_word_embeddings"]:
            expected["lm_head.weight"] = (vocab or -1, hidden)
        per_layer = {
            "input_layernorm.weight": (hidden,),
            "self_attn.q_proj.weight": (heads * head_dim, hidden),
            "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            "self_attn.o_proj.weight": (hidden, heads * head_dim),
            "post_attention_layernorm.weight": (hidden,),
            "mlp.gate_proj.weight": (inter, hidden),
            "mlp.up_proj.weight": (inter, hidden),
            "mlp.down_proj.weight": (hidden, inter),
        }
        for i in range(layers):
            for leaf, shape in per_layer.items():
                expected[f"model.layers.{i}.{leaf}"] = shape
        entries: dict[str, _Entry] = {}
        for gguf_name, (dims, _type) in layout.tensors.items():
            if gguf_name in LLAMA_SKIPPED:
                continue
            hf_name = llama_hf_name(gguf_name)
            if hf_name is None or hf_name not in expected:
                raise InputError(f"tensor '{gguf_name}' has no counterpart in a {layers}-layer "
                                 "LlamaForCausalLM", where=where,
                                 fix="This GGUF variant is not supported; use the original Hugging Face "
                                     "checkpoint instead.")
            shape = tuple(int(d) for d in reversed(dims))
            want = expected[hf_name]
            if len(shape) != len(want) or any(w not in (-1, s) for w, s in zip(want, shape, strict=True)):
                implied = [s if s != -1 else "vocab" for s in want]
                raise InputError(f"tensor '{gguf_name}' has shape {list(shape)} but the metadata implies "
                                 f"{implied}", where=where, fix=FIX_CORRUPT)
            permute = None
            if gguf_name.endswith(".attn_q.weight"):
                permute = heads
            elif gguf_name.endswith(".attn_k.weight"):
                permute = kv_heads
            entries[hf_name] = _Entry(-1, gguf_name, shape, permute)
        missing = [n for n in expected if n not in entries]
        if missing:
            raise InputError(f"tensor '{missing[0]}' is missing ({len(missing)} missing in all)", where=where,
                             fix=FIX_TRUNCATED)
        return entries

    @property
    def gguf(self) -> Any:
        """The underlying ``gguf.GGUFReader``: every metadata field with its type, raw tensor data."""
        if self._reader is None:
            raise ValueError(f"{self.path}: reader is closed")
        return self._reader

    def infos(self) -> list[TensorInfo]:
        """All tensors in file order, Hugging Face names and shapes, dtype float32."""
        return list(self._infos)

    def get(self, name: str) -> torch.Tensor:
        """Dequantize one tensor: float32, Hugging Face shape (Linear ``[out, in]``), owned by the caller."""
        import gguf

        entry = self._entries.get(name)
        if entry is None:
            raise KeyError(name)
        if self._reader is None:
            raise ValueError(f"{self.path}: reader is closed")
        tensor = self._reader.tensors[entry.index]
        try:
            arr = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except (NotImplementedError, ValueError) as e:
            raise InputError(f"cannot dequantize tensor '{entry.gguf_name}' ({e})", where=str(self.path),
                             fix=FIX_QTYPE) from e
        arr = np.asarray(arr, dtype=np.float32).reshape(entry.shape)
        if entry.permute_heads is not None:
            arr = reverse_permute_qk(arr, entry.permute_heads)
        if np.may_share_memory(arr, tensor.data) or not arr.flags.writeable or not arr.flags.c_contiguous:
            arr = np.array(arr, dtype=np.float32, order="C", copy=True)  # never hand out the memory map
        return torch.from_numpy(arr)

    def extra_files(self) -> dict[str, bytes | Path]:
        """The tokenizer transformers builds from the GGUF, as ``{file name: bytes}`` (computed once).

        Files are what ``AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(dir)``
        writes (tokenizer.json, tokenizer_config.json, chat_template.jinja...), minus load-time keys
        (``is_local``, ``local_files_only``) so the bytes do not depend on the environment.
        ``{}`` when transformers is not installed.
        """
        if self._extra is None:
            self._extra = _tokenizer_files(self.path)
        return dict(self._extra)

    def close(self) -> None:
        self._reader = None  # drops the memory map


_LOAD_TIME_KEYS = ("is_local", "local_files_only", "_commit_hash", "cache_dir", "name_or_path")


def _tokenizer_files(path: Path) -> dict[str, bytes | Path]:
    """Build the tokenizer with transformers in a scratch folder holding only a link to the GGUF."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return {}
    where = str(path)
    with tempfile.TemporaryDirectory(prefix="compress-gguf-tokenizer-") as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        src.mkdir()
        folder, name = path.resolve().parent, path.name
        try:  # a folder with nothing but the GGUF: stray tokenizer files next to it must not leak in
            (src / name).symlink_to(path.resolve())
            folder = src
        except OSError:
            pass
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
            tokenizer.save_pretrained(str(out))
        except Exception as e:  # transformers' conversion errors have no common base class
            msg = str(e).splitlines()[0] if str(e) else ""
            raise InputError(f"transformers cannot build a tokenizer from this GGUF "
                             f"({type(e).__name__}: {msg})", where=where,
                             fix="Update transformers, or use the original Hugging Face checkpoint.") from e
        files: dict[str, bytes | Path] = {}
        for p in sorted(out.iterdir()):
            if p.is_file():
                data = p.read_bytes()
                if p.name == "tokenizer_config.json":
                    data = _scrub_tokenizer_config(data)
                files[p.name] = data
    return files


def _scrub_tokenizer_config(data: bytes) -> bytes:
    """Drop keys that record how the tokenizer was loaded (they vary with HF_HUB_OFFLINE etc.)."""
    try:
        cfg = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return data
    if not isinstance(cfg, dict) or not any(k in cfg for k in _LOAD_TIME_KEYS):
        return data
    for k in _LOAD_TIME_KEYS:
        cfg.pop(k, None)
    return (json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
