"""Experiment, not part of the tool: refine an extracted LoRA adapter by distillation against the tuned model.

Loads the float base of ``scripts/finetune_smollm2.py``'s work folder with the adapter (PEFT, trainable) and the full
fine-tune as teacher, and runs Adam on the mean per-token KL(teacher || student) over batches of 4 blocks of 256
tokens: the built-in calibration text, or with ``--train-text`` the fine-tune's own training blocks (disjoint from
the held-out blocks). Prints the held-out loss and the share of the improvement kept before and after, every 10
steps the loss and the seconds. Results: reports/extract_lora_distill_experiment.md.

    python scripts/distill_adapter_experiment.py ADAPTER [--steps 40] [--lr 2e-4] [--train-text]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from compress.calib.importance import calibration_tokens
from compress.calib.text import CalibrationOptions
from compress.evaluation import mean_token_loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("adapter", type=Path)
    p.add_argument("--work", type=Path, default=Path("/tmp/smollm2_ft"))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--samples", type=int, default=64, help="calibration samples (without --train-text)")
    p.add_argument("--train-text", action="store_true", help="distil on the fine-tune's own training blocks")
    a = p.parse_args()
    import transformers
    from peft import PeftModel

    torch.manual_seed(0)
    blocks = torch.load(a.work / "blocks.pt")
    held = blocks["heldout"][:16]
    teacher = transformers.AutoModelForCausalLM.from_pretrained(a.work / "full", dtype=torch.float32).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(a.work / "base", dtype=torch.float32)
    student = PeftModel.from_pretrained(base, str(a.adapter), is_trainable=True)
    loss_base, loss_full = mean_token_loss(base.eval(), held), mean_token_loss(teacher, held)

    def kept() -> tuple[float, float]:
        student.eval()
        loss = mean_token_loss(student, held)
        return loss, (loss_base - loss) / (loss_base - loss_full)

    print("start", kept(), flush=True)
    tokens = blocks["train"] if a.train_text else calibration_tokens(
        a.work / "base", CalibrationOptions("default", a.samples, 256, 0), [])[0]
    optimizer = torch.optim.Adam([q for q in student.parameters() if q.requires_grad], lr=a.lr)
    started = time.time()
    for step in range(a.steps):
        student.train()
        x = tokens[torch.randint(0, tokens.shape[0], (4,))]
        with torch.no_grad():
            target = teacher(x).logits.float().log_softmax(-1)
        logits = student(x).logits.float().log_softmax(-1)
        loss = torch.nn.functional.kl_div(logits, target, log_target=True, reduction="batchmean") / x.shape[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 9:
            print(step + 1, float(loss), round(time.time() - started, 1), flush=True)
    print("end", kept(), round(time.time() - started, 1), flush=True)


if __name__ == "__main__":
    main()
