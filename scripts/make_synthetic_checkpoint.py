"""Write a synthetic sharded Hugging Face checkpoint (safetensors) for streaming / memory tests.

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder to create")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--layers-per-shard", type=int, default=4)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = ap.parse_args(argv)
    if args.out.exists():
        if not args.force:
            print(f"error: {args.out} exists (use --force)", file=sys.stderr)
            return 2
        shutil.rmtree(args.out)
    summary = build(args.out, layers=args.layers, hidden=args.hidden, layers_per_shard=args.layers_per_shard,
                    dtype=getattr(torch, args.dtype))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
