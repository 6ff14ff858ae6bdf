"""Write a synthetic sharded Hugging Face checkpoint (safetensors) for streaming / memory / scale tests.

Two layouts:

- default (``build``): attention projections only, as below;
- ``--llama`` (``build_llama``): a complete LlamaForCausalLM with the shapes of a real model (default: Llama-2
  7B's hidden 4096, intermediate 11008, 32 heads), every projection, norms, embeddings and output head (a small
  vocabulary), and a byte-level BPE tokenizer, so that every command (GGUF export included) can run on it.
  ``--perturb-of BASE`` writes a "fine-tune" of such a checkpoint: the same weights plus a random low-rank
  change and a little noise on every projection (for extract-lora).

Layout: ``layers`` transformer blocks, each with four square float32 Linear weights
(``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight``, [hidden, hidden]) and one 1-D norm
(``model.layers.{i}.input_layernorm.weight``), plus a llama-style ``config.json``. Shards hold
``layers_per_shard`` blocks and are listed in ``model.safetensors.index.json``.

Each shard is generated and written by itself (``safetensors.torch.save_file``) and then freed, so
building a 4 GB checkpoint needs about one shard of memory, not the whole model.

Defaults: 16 blocks x 4 x [4096, 4096] float32 = 64 tensors of 64 MiB = 4 GiB, in 4 shards of 1 GiB.

    python scripts/make_synthetic_checkpoint.py /tmp/synthetic-4g
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def build(out: Path, *, layers: int = 16, hidden: int = 4096, layers_per_shard: int = 4,
          dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, object]:
    """Write the checkpoint into ``out`` (created; must not exist). Returns a summary dict."""
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    n_shards = -(-layers // layers_per_shard)
    weight_map: dict[str, str] = {}
    total = 0
    started = time.perf_counter()
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors" if n_shards > 1 else "model.safetensors"
        shard: dict[str, torch.Tensor] = {}
        for i in range(s * layers_per_shard, min((s + 1) * layers_per_shard, layers)):
            shard[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
            for j, proj in enumerate(PROJECTIONS):
                # Roughly what trained weights look like: Gaussian, a per-tensor scale, a few outliers.
                w = torch.randn(hidden, hidden, generator=gen)
                w.mul_(0.02 * (1 + 0.25 * j))
                w.view(-1)[:: 4099] *= 8.0
                shard[f"model.layers.{i}.self_attn.{proj}.weight"] = w.to(dtype)
        save_file(shard, str(out / name), metadata={"format": "pt"})
        for k, v in shard.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
        del shard
    if n_shards > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": hidden, "num_hidden_layers": layers, "num_attention_heads": max(hidden // 128, 1),
        "num_key_value_heads": max(hidden // 128, 1), "vocab_size": 32000, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096, "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    files = sorted(p.name for p in out.iterdir())
    return {"path": str(out), "tensors": len(weight_map), "quantizable": layers * len(PROJECTIONS),
            "tensor_bytes": total, "file_bytes": sum(p.stat().st_size for p in out.iterdir()),
            "shards": n_shards, "files": files, "build_seconds": round(time.perf_counter() - started, 2)}


LLAMA_PROJECTIONS = {"self_attn.q_proj": "hh", "self_attn.k_proj": "kh", "self_attn.v_proj": "kh",
                     "self_attn.o_proj": "hh", "mlp.gate_proj": "ih", "mlp.up_proj": "ih", "mlp.down_proj": "hi"}


def byte_level_tokenizer(folder: Path) -> None:
    """tokenizer.json: a byte-level BPE over the 256 byte symbols and three merges, GPT-2 style."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]  # a few, so that the vocabulary has merges to carry
    vocab = {c: i for i, c in enumerate(alphabet)} | {a + b: len(alphabet) + k for k, (a, b) in enumerate(merges)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(folder / "tokenizer.json"))


def build_llama(out: Path, *, layers: int = 4, hidden: int = 4096, intermediate: int = 11008, heads: int = 32,
                kv_heads: int = 32, vocab: int = 4096, dtype: torch.dtype = torch.float16, seed: int = 0,
                perturb_of: Path | None = None, rank: int = 32) -> dict[str, object]:
    """A LlamaForCausalLM checkpoint in ``out`` (one shard per decoder layer). With ``perturb_of``, the weights
    of that checkpoint plus ``B @ A`` (rank ``rank``) and noise on every projection."""
    from safetensors import safe_open

    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed + (1000 if perturb_of is not None else 0))
    dims = {"h": hidden, "i": intermediate, "k": kv_heads * (hidden // heads)}
    shards: list[dict[str, torch.Tensor]] = []
    for i in range(layers):
        shard = {f"model.layers.{i}.input_layernorm.weight": torch.ones(hidden, dtype=dtype),
                 f"model.layers.{i}.post_attention_layernorm.weight": torch.ones(hidden, dtype=dtype)}
        for j, (name, shape) in enumerate(LLAMA_PROJECTIONS.items()):
            shard[f"model.layers.{i}.{name}.weight"] = (dims[shape[0]], dims[shape[1]], 0.02 * (1 + 0.1 * j))
        shards.append(shard)
    shards[0]["model.embed_tokens.weight"] = (vocab, hidden, 0.02)
    shards[-1]["model.norm.weight"] = torch.ones(hidden, dtype=dtype)
    shards[-1]["lm_head.weight"] = (vocab, hidden, 0.02)
    names = [f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors" for s in range(len(shards))]
    weight_map: dict[str, str] = {}
    total = 0
    started = time.perf_counter()
    for name, spec in zip(names, shards, strict=True):
        tensors: dict[str, torch.Tensor] = {}
        for key, value in spec.items():
            if isinstance(value, torch.Tensor):
                tensors[key] = value
                continue
            rows, cols, scale = value
            if perturb_of is None:
                w = torch.randn(rows, cols, generator=gen).mul_(scale)
                w.view(-1)[:: 4099] *= 8.0  # a few outliers, as trained weights have
            else:
                with safe_open(str(perturb_of / name), framework="pt") as f:
                    w = f.get_tensor(key).float()
                if key.endswith("proj.weight"):
                    A, B = torch.randn(rank, cols, generator=gen), torch.randn(rows, rank, generator=gen)
                    w.addmm_(B, A, alpha=scale / 20 / rank**0.5)
                    w.add_(torch.randn(rows, cols, generator=gen), alpha=scale / 50)
            tensors[key] = w.to(dtype)
            del w
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "vocab_size": vocab, "rms_norm_eps": 1e-5,
              "max_position_embeddings": 4096, "rope_theta": 10000.0, "tie_word_embeddings": False,
              "torch_dtype": str(dtype).removeprefix("torch.")}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    byte_level_tokenizer(out)
    return {"path": str(out), "tensors": len(weight_map), "tensor_bytes": total,
            "file_bytes": sum(p.stat().st_size for p in out.iterdir()), "shards": len(shards),
            "build_seconds": round(time.perf_counter() - started, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder to create")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--layers-per-shard", type=int, default=4)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--force", action="store_true", help="replace OUT if it exists")
    ap.add_argument("--llama", action="store_true", help="a complete Llama with real-model shapes (see above)")
    ap.add_argument("--intermediate", type=int, default=11008, help="--llama: MLP width")
    ap.add_argument("--vocab", type=int, default=4096, help="--llama: vocabulary size")
    ap.add_argument("--perturb-of", type=Path, default=None, help="--llama: write a fine-tune of this checkpoint")
    args = ap.parse_args(argv)
    if args.out.exists():
        if not args.force:
            print(f"error: {args.out} exists (use --force)", file=sys.stderr)
            return 2
        shutil.rmtree(args.out)
    if args.llama:
        summary = build_llama(args.out, layers=args.layers, hidden=args.hidden, intermediate=args.intermediate,
                              vocab=args.vocab, dtype=getattr(torch, args.dtype), perturb_of=args.perturb_of)
    else:
        summary = build(args.out, layers=args.layers, hidden=args.hidden, layers_per_shard=args.layers_per_shard,
                        dtype=getattr(torch, args.dtype))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
