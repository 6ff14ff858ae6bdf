"""Writing a llama.cpp GGUF file: the metadata of a Llama model and a sink for its tensors' bytes.

This module only encodes: what each tensor becomes (names, types, the Q/K permutation) is planned by
:mod:`compress.pipeline.gguf` with llama-quantize's recipe (:mod:`compress.quant.llama_cpp`), and the bytes
come from the quantizers. The layout follows llama.cpp's ``convert_hf_to_gguf.py`` (``LlamaModel``):

- **metadata**, in the converter's order: ``general.architecture = llama``, ``general.type``,
  ``general.name``, ``llama.*`` (block_count, context_length, embedding_length, feed_forward_length,
  attention.head_count / head_count_kv, rope.freq_base, attention.layer_norm_rms_epsilon,
  attention.key_length / value_length), ``general.file_type``, ``llama.vocab_size``,
  ``llama.rope.dimension_count``, the tokenizer, ``general.quantization_version``;
- **model card**: a GGUF input's ``general.*`` keys (license, base model, languages, size label...) are
  carried over;
- **RoPE scaling**: ``linear`` -> ``llama.rope.scaling.type/factor``; ``llama3`` (Llama 3.1+) -> a
  ``rope_freqs.weight`` tensor computed as the converter does; a GGUF input's ``llama.rope.scaling.*``
  keys and ``rope_freqs.weight`` tensor are copied. Other scaling types raise :class:`InputError`;
- **tokenizer** (``tokenizer="auto"``): every ``tokenizer.*`` key of a GGUF input, with its GGUF type; from
  a Hugging Face folder, a byte-level BPE ``tokenizer.json`` (:mod:`compress.formats.gguf_tokenizer`).
  ``tokenizer="none"`` writes none (llama.cpp cannot run such a file; every tensor reader can read it).

:class:`GGUFSink` declares every tensor (``add_tensor_info``), writes the header, then each tensor's bytes
as they arrive, under a temporary name renamed into place on commit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress.errors import InputError
from compress.formats.checkpoint import CheckpointReader, TensorInfo
from compress.formats.gguf_tokenizer import TOKENIZER_FILES, TOKENIZER_FIX, add_hf_tokenizer
from compress.formats.output import OutputFile
from compress.formats.sink import Encoded, Sink
from compress.ggml_types import FTYPE_IDS, GGML_TYPES, ggml_nbytes

TOKENIZER_MODES = ("auto", "none")  # or a path: a tokenizer.json, or a folder holding one
GGML_QUANT_VERSION = 2  # gguf.GGML_QUANT_VERSION, written by every llama.cpp converter
_SUPPORTED_MODEL_TYPES = ("llama", "mistral")  # both are general.architecture = llama in llama.cpp


def tokenizer_files(path: Path) -> dict[str, bytes | Path]:
    """The tokenizer files --tokenizer PATH names: a tokenizer.json file (its folder's other tokenizer files come
    with it), or a folder holding one."""
    if not path.exists():
        raise InputError(f"--tokenizer {path}: no such file or folder", fix=TOKENIZER_FIX)
    folder = path if path.is_dir() else path.parent
    files: dict[str, bytes | Path] = {n: folder / n for n in TOKENIZER_FILES if (folder / n).is_file()}
    if path.is_file():
        files["tokenizer.json"] = path
    if "tokenizer.json" not in files:
        raise InputError(f"--tokenizer {path}: no tokenizer.json there", fix=TOKENIZER_FIX)
    return files


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


def gguf_package_reader(reader: CheckpointReader) -> Any | None:
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

# --- the file -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFTensorInfo:
    """A tensor as declared in the file: GGUF name, shape (torch order; GGUF lists it reversed) and type (a
    GGML block type, ``f16`` or ``f32``)."""

    name: str
    shape: tuple[int, ...]
    qtype: str

    @property
    def nbytes(self) -> int:
        if self.qtype in GGML_TYPES:
            return ggml_nbytes(self.shape, self.qtype)
        return math.prod(self.shape) * (2 if self.qtype == "f16" else 4)


def model_name(reader: CheckpointReader) -> str:
    """``general.name``: a GGUF input's own, else the input folder's name (or a single file's stem), as
    convert_hf_to_gguf.py does; never the output path, so that the bytes do not depend on it."""
    src = gguf_package_reader(reader)
    field = src.fields.get("general.name") if src is not None else None
    if field is not None:
        return bytes(field.parts[-1]).decode("utf-8", "replace")
    path = Path(reader.path)
    return path.name if path.is_dir() else path.stem


class GGUFSink(Sink):
    """The GGUF file ``out`` for ``reader``'s model: metadata and every tensor's info are written on
    construction (errors in the metadata, such as an unconvertible tokenizer, surface before any tensor is
    computed), then :meth:`write` takes each declared tensor in order. The file is staged under a temporary
    name (``staging``, where sidecar files can be staged too) until :meth:`commit`."""

    def __init__(self, out: Path, *, force: bool, reader: CheckpointReader, params: LlamaParams, file_type: str,
                 tensors: Sequence[GGUFTensorInfo], tokenizer: str = "auto", name: str | None = None) -> None:
        import gguf

        self.staging = OutputFile(out, force=force, must_exist_parent=True).__enter__()
        self.notes: list[str] = []
        self.tokenizer: dict[str, Any] | None = None
        self.finished = False
        self.writer = gguf.GGUFWriter(str(self.staging.path), "llama")
        try:
            prelude = self._metadata(reader, params, file_type, tokenizer, name or model_name(reader))
            self.tensors = [t for t, _ in prelude] + list(tensors)
            for t in self.tensors:
                self.writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes,
                                            raw_dtype=gguf.GGMLQuantizationType[t.qtype.upper()])
            self.writer.write_header_to_file()
            self.writer.write_kv_data_to_file()
            self.writer.write_ti_data_to_file()
            for _, data in prelude:
                self.writer.write_tensor_data(data)
        except BaseException:
            self.abort()
            raise
        self._next = len(prelude)

    def _metadata(self, reader: CheckpointReader, p: LlamaParams, file_type: str, tokenizer: str,
                  name: str) -> list[tuple[GGUFTensorInfo, np.ndarray]]:
        """Write every metadata key; returns the tensors the metadata implies (rope_freqs) with their data."""
        import gguf

        writer, notes, where = self.writer, self.notes, str(reader.path)
        src = gguf_package_reader(reader)
        writer.add_type("model")
        writer.add_name(name)
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
        writer.add_file_type(FTYPE_IDS[file_type])
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
        if tokenizer == "auto":
            if src is not None:
                keys = _copy_fields(writer, src, ("tokenizer.",), notes)
                if "tokenizer.ggml.model" not in keys:
                    raise InputError("the source GGUF has no tokenizer (tokenizer.ggml.model)", where=where,
                                     fix=TOKENIZER_FIX)
                self.tokenizer = {"source": "gguf", "keys": keys}
            else:
                self.tokenizer = add_hf_tokenizer(writer, reader.extra_files(), reader.config, p.vocab, where)
        elif tokenizer != "none":  # a path given with --tokenizer
            self.tokenizer = add_hf_tokenizer(writer, tokenizer_files(Path(tokenizer)), reader.config, p.vocab,
                                              tokenizer)
            self.tokenizer["source"] = str(Path(tokenizer).resolve())
        else:
            notes.append("no tokenizer written (--tokenizer none): llama.cpp cannot run this file")
        writer.add_quantization_version(GGML_QUANT_VERSION)
        if rope_freqs is None:
            return []
        return [(GGUFTensorInfo("rope_freqs.weight", tuple(rope_freqs.shape), "f32"), rope_freqs)]

    def write(self, name: str, tensor: Encoded) -> None:
        if self._next >= len(self.tensors):
            raise RuntimeError(f"tensor {name!r} was not declared")
        declared = self.tensors[self._next]
        if declared.name != name or declared.nbytes != tensor.nbytes:
            raise RuntimeError(f"declared {declared}, got {name} ({tensor.nbytes} bytes)")
        self.writer.write_tensor_data(tensor.array())
        self._next += 1

    def finish(self) -> None:
        """Complete the file (still under its temporary name: sidecars can be staged beside it now)."""
        if self._next != len(self.tensors):
            raise RuntimeError(f"only {self._next} of {len(self.tensors)} declared tensors were written")
        self.writer.close()
        self.finished = True

    @property
    def bytes(self) -> int:
        """Size of the finished file."""
        return (self.staging.out if self.committed else self.staging.path).stat().st_size

    def commit(self) -> None:
        if not self.finished:
            self.finish()
        self.staging.commit()
        self.committed = True

    def abort(self) -> None:
        self.writer.close()
        self.staging.abort()
