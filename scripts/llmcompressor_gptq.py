"""llm-compressor's GPTQ (W4A16, group size 64, symmetric) on a float checkpoint, calibrated on compress' own tokens.

A side-by-side baseline for our GPTQ: same model, same calibration token samples, saved as compressed-tensors
pack-quantized so that `compress eval FLOAT OURS THEIRS` scores both. Runs in its own environment:

    bash scripts/setup_llmcompressor.sh                                   # .venv-llmc (CPU torch 2.13.0)
    .venv/bin/compress dequantize SmolLM2-135M-Instruct.Q4_1.gguf -o /tmp/smollm2-f32 --dtype float32
    .venv/bin/python scripts/calibration_tokens.py /tmp/smollm2-f32 --samples 32 --length 512 --seed 0 \\
        -o /tmp/tokens.npy
    nice -n 19 .venv-llmc/bin/python scripts/llmcompressor_gptq.py /tmp/smollm2-f32 /tmp/tokens.npy \\
        -o /tmp/llmc-smollm2-g64
    .venv/bin/compress eval /tmp/smollm2-f32 /tmp/llmc-smollm2-g64

What it runs: ``oneshot(model, dataset=Dataset{input_ids, attention_mask}, recipe=GPTQModifier(...),
num_calibration_samples=samples, max_seq_length=length, shuffle_calibration_samples=False)`` with

    GPTQModifier(targets="Linear", ignore=["lm_head"], dampening_frac=0.01, block_size=128,
                 config_groups={"group_0": {"targets": ["Linear"], "weights": {
                     "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}}})

i.e. the W4A16 preset with its group size 128 replaced by 64, everything else llm-compressor's defaults:
dampening 1% of the mean Hessian diagonal, activation order "static" (columns processed in decreasing
Hessian-diagonal order, groups kept contiguous, so no g_idx is stored), min-max observer scales fixed from
the float weights before the GPTQ sweep, the sequential pipeline (one decoder layer at a time, each layer
calibrated on the outputs of the already-quantized layers before it), batch size 1. The timed region is
the oneshot call alone (the model is loaded before it); peak RSS is the process' maximum resident set
(ru_maxrss, which includes the loaded model). Output: the compressed model
(``save_pretrained(save_compressed=True)``), the tokenizer, and llmcompressor_run.json.

Workarounds (llmcompressor 0.14.0, compressed-tensors 0.19.0, transformers 5.17.0, torch 2.13.0+cpu):
- Group size: the W4A16 preset is g128, and llm-compressor refuses Linear layers whose input width is not a
  multiple of the group size: SmolLM2-135M's hidden size 576 = 4.5 x 128. Hence a custom config_groups
  scheme with group_size 64 (576 = 9 x 64, 1536 = 24 x 64); our own GPTQ must be run at --group-size 64 too
  for the comparison.
- CPU: GPTQ needs no patch. llm-compressor logs "No accelerator available! Compressing model on CPU
  instead" and runs the sequential pipeline on the CPU (its Triton GPTQ kernel is CUDA-only; the torch
  fallback is used). (AWQ does need a patch on CPU; it is not run here.)
- torch: llmcompressor 0.14.0 accepts torch>=2.10,<=2.14.0, so the CPU 2.13.0 build is installed first and
  held by a constraints file (scripts/setup_llmcompressor.sh); no --no-deps is needed.
- Calibration data: a pre-tokenized datasets.Dataset (it has an input_ids column, so llm-compressor skips
  its own tokenization); shuffle_calibration_samples=False so the samples are seen in file order (the
  Hessians are sums, so order only changes rounding).
- Time, SmolLM2-135M at 32 x 512 on 2 shared cores under nice 19: 484 s in oneshot, 1.42 GiB peak RSS
  (llmcompressor 0.14.0, torch 2.13.0+cpu; an earlier run on busier cores took 45 minutes).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import resource
import shlex
import shutil
import sys
import time
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model")


def load_tokens(path: Path):
    import numpy as np
    import torch

    if path.suffix == ".npy":
        tokens = torch.from_numpy(np.load(path))
    elif path.suffix == ".pt":
        tokens = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise SystemExit(f"{path}: expected a .npy or .pt file of int64 [samples, length] token ids")
    if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise SystemExit(f"{path}: expected an integer [samples, length] tensor, got {tokens.dtype} "
                         f"{list(tokens.shape)}")
    return tokens.to(torch.int64)


def versions() -> dict[str, str]:
    names = ["llmcompressor", "compressed-tensors", "torch", "transformers", "datasets", "accelerate", "numpy"]
    out = {n: md.version(n) for n in names}
    out["python"] = sys.version.split()[0]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="float HF checkpoint folder (e.g. `compress dequantize` output)")
    parser.add_argument("tokens", type=Path, help="int64 [samples, length] calibration tokens (.npy or .pt), "
                        "from scripts/calibration_tokens.py")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output folder (compressed-tensors)")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--dampening", type=float, default=0.01, help="GPTQModifier.dampening_frac")
    parser.add_argument("--block-size", type=int, default=128, help="GPTQModifier.block_size")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)

    if args.output.exists() and not args.force:
        raise SystemExit(f"{args.output} exists; pass --force to replace it")

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = load_tokens(args.tokens)
    samples, length = tokens.shape
    tokens_meta_path = Path(f"{args.tokens}.json")
    tokens_meta = json.loads(tokens_meta_path.read_text()) if tokens_meta_path.exists() else None

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    load_seconds = time.perf_counter() - t0
    has_tokenizer = any((args.model / f).exists() for f in TOKENIZER_FILES)
    tokenizer = AutoTokenizer.from_pretrained(args.model) if has_tokenizer else None
    vocab = model.get_input_embeddings().weight.shape[0]
    if int(tokens.max()) >= vocab or int(tokens.min()) < 0:
        raise SystemExit(f"{args.tokens}: token ids outside the model's vocabulary of {vocab}")

    dataset = Dataset.from_dict({"input_ids": tokens.tolist(),
                                 "attention_mask": torch.ones_like(tokens).tolist()})
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
               "group_size": args.group_size}
    recipe = GPTQModifier(
        targets="Linear",
        ignore=["lm_head"],
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
        dampening_frac=args.dampening,
        block_size=args.block_size,
    )
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"llmcompressor GPTQ W4A16 g{args.group_size} symmetric on {args.model}: {samples} x {length} tokens, "
          f"{torch.get_num_threads()} threads", flush=True)
    t0 = time.perf_counter()
    model = oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=samples,
        max_seq_length=length,
        shuffle_calibration_samples=False,
        batch_size=1,
    )
    seconds = time.perf_counter() - t0
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"oneshot: {seconds:.1f} s, peak RSS {peak_rss / 2**30:.2f} GiB", flush=True)

    tmp = args.output.with_name(args.output.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, save_compressed=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for name in ("chat_template.jinja",):  # kept as in the input when the tokenizer did not write it
        if (args.model / name).exists() and not (tmp / name).exists():
            shutil.copy2(args.model / name, tmp / name)
    run = {
        "tool": "llmcompressor GPTQModifier + oneshot",
        "seconds": round(seconds, 3),
        "load_seconds": round(load_seconds, 3),
        "peak_rss_bytes": peak_rss,
        "rss_before_oneshot_bytes": rss_before,
        "versions": versions(),
        "samples": samples,
        "length": length,
        "group_size": args.group_size,
        "symmetric": True,
        "num_bits": 4,
        "dampening_frac": args.dampening,
        "block_size": args.block_size,
        "actorder": "static (llm-compressor default)",
        "ignore": ["lm_head"],
        "pipeline": "llm-compressor default (sequential), batch_size 1, CPU",
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "model": str(args.model),
        "tokens": str(args.tokens),
        "tokens_meta": tokens_meta,
        "command": shlex.join([sys.executable, *sys.argv]),
    }
    (tmp / "llmcompressor_run.json").write_text(json.dumps(run, indent=2) + "\n")
    if args.output.exists():
        shutil.rmtree(args.output)
    tmp.rename(args.output)
    print(f"wrote {args.output}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
