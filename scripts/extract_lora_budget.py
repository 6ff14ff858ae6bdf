"""Measure activation-aware extraction and the global budget of ``compress extract-lora`` on the real full fine-tune
of SmolLM2-135M (``scripts/finetune_smollm2.py``), side by side in one run.

At the sizes of rank 8, 16 and 64 everywhere, four adapters per size, each made by the real CLI (wall time and peak
RSS of the process) and loaded the way a user would (``peft.PeftModel.from_pretrained`` on the float32 base,
unmerged), then scored on the held-out blocks (Language Reference topics the fine-tune never saw; the calibration
text is compress' built-in one, standard-library docstrings, disjoint from both):

- plain: truncated SVD of each delta, the same rank everywhere (``--rank r``);
- activation-aware: the default ASVD diagonal scaling of the inputs (``--rank r --calibration default``), and the
  whitened form, SVD of dW L, the least output error on the base model's inputs (``--aware whitened``);
- budgeted: ranks allocated across modules under the size of rank r everywhere (``--mean-rank r``);
- activation-aware + budgeted (``--mean-rank r --calibration default``).

improvement kept = (loss_base - loss_adapter) / (loss_base - loss_full). The calibration pass alone (the base model
run block by block on the same samples, statistics of every Linear) is timed in this process, so that the cost of
activation-aware extraction can be set against "plain extraction + the calibration pass".

    python scripts/extract_lora_budget.py                 # fine-tunes if needed (~5 min), then ~20 min
    python scripts/extract_lora_budget.py --samples 32    # quicker calibration
Results: reports/extract_lora_budget.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


real = _load("extract_lora_real")  # run_cli, summarize_report, peft_model, adapter_bytes_on_disk, ft
ft = real.ft

VARIANTS = [  # key, label, arguments given a rank and the calibration arguments
    ("plain", "plain SVD, rank r everywhere", lambda r, c: ["--rank", str(r)]),
    ("aware", "activation-aware (diagonal, the default), rank r everywhere", lambda r, c: ["--rank", str(r), *c]),
    ("whitened", "activation-aware whitened (output error), rank r everywhere",
     lambda r, c: ["--rank", str(r), *c, "--aware", "whitened"]),
    ("budget", "budgeted (size of rank r)", lambda r, c: ["--mean-rank", str(r)]),
    ("aware_budget", "activation-aware + budgeted", lambda r, c: ["--mean-rank", str(r), *c]),
]


def calibration_pass_seconds(base: Path, samples: int, length: int) -> float:
    """The calibration pass alone: the base model block by block on the samples, every Linear's statistics."""
    from compress.calib.importance import calibration_tokens
    from compress.calib.runner import CalibrationRunner
    from compress.calib.text import CalibrationOptions
    from compress.formats.inputs import open_model
    from compress.pipeline.calibrated import torch_threads
    from compress.pipeline.execute import available_cores

    tokens, _ = calibration_tokens(base, CalibrationOptions("default", samples, length, 0), [])
    started = time.perf_counter()
    with open_model(base) as reader, torch_threads(available_cores()):
        for block in CalibrationRunner(reader, tokens, torch.device("cpu")):
            block.statistics()
            block.finish({})
    return time.perf_counter() - started


def measure(a: argparse.Namespace) -> dict[str, Any]:
    work: Path = a.work
    base, full = work / "base", work / "full"
    if not (ft.done(base) and ft.done(full)):
        subprocess.run([sys.executable, str(HERE / "finetune_smollm2.py"), "--work", str(work), "--only", "base",
                        "--only", "full"], check=True)
    held = ft.load_blocks(work)["heldout"][: a.heldout_blocks]
    ref = {"base": real.mean_token_loss(ft.load_causal_lm(base), held),
           "full": real.mean_token_loss(ft.load_causal_lm(full), held)}
    print(f"held-out loss: base {ref['base']:.4f}, full {ref['full']:.4f}", flush=True)
    calib = ["--calibration", "default", "--calibration-samples", str(a.samples), "--calibration-length",
             str(a.length)]
    calibration_seconds = calibration_pass_seconds(base, a.samples, a.length)
    print(f"calibration pass alone: {calibration_seconds:.1f} s", flush=True)
    adapters = work / "adapters_budget"
    adapters.mkdir(exist_ok=True)
    rows = []
    for r in [int(x) for x in a.ranks.split(",")]:
        for key, label, args_of in VARIANTS:
            name = f"{key}-r{r}"
            out = adapters / name
            args = ["extract-lora", "--base", str(base), "--tuned", str(full), "-o", str(out), *args_of(r, calib),
                    "--quiet", "--force"]
            timing = real.run_cli(args, adapters / f"{name}.log")
            report = json.loads((out / "report.json").read_text())
            model = real.peft_model(base, out)
            loss = real.mean_token_loss(model, held)
            del model
            lora = [m for m in report["modules"] if m["kind"] == "lora"]
            row = {"name": name, "variant": key, "label": label, "size_rank": r, **timing,
                   "command": shlex.join(["compress", *args]), "adapter_file_bytes": real.adapter_bytes_on_disk(out),
                   "heldout_loss": loss, "improvement_kept": (ref["base"] - loss) / (ref["base"] - ref["full"]),
                   "ranks_min": min(m["rank"] for m in lora), "ranks_max": max(m["rank"] for m in lora),
                   "mean_weight_error": sum(m["rel_error"] for m in lora) / len(lora),
                   "rms_output_error": report["totals"].get("rms_output_error"),
                   "ranks_by_type": {t: sum(m["rank"] for m in lora if m["module"].endswith(t)) /
                                     max(1, sum(m["module"].endswith(t) for m in lora))
                                     for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj")}}
            print(f"{name:>16}: {row['adapter_file_bytes'] / 2**20:.1f} MiB, ranks {row['ranks_min']}-"
                  f"{row['ranks_max']}, loss {loss:.4f}, kept {row['improvement_kept']:.3f}, "
                  f"{timing['wall_seconds']} s", flush=True)
            rows.append(row)
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "versions": ft.versions(),
            "machine": ft.machine(), "command": shlex.join(["python", f"scripts/{Path(__file__).name}",
                                                            *(a.argv or [])]),
            "work": str(work), "samples": a.samples, "length": a.length, "reference_loss": ref,
            "heldout_blocks": int(held.shape[0]), "calibration_pass_seconds": round(calibration_seconds, 1),
            "runs": rows}


def render(res: dict[str, Any]) -> str:
    ref = res["reference_loss"]
    lines = ["# extract-lora: activation-aware factors and one budget, on the real full fine-tune of SmolLM2-135M\n",
             f"Produced by `{res['command']}` on {res['date']}; raw numbers in `extract_lora_budget.json`. "
             f"Held-out loss over {res['heldout_blocks']} blocks never trained on: base {ref['base']:.4f}, full "
             f"fine-tune {ref['full']:.4f}. Calibration: compress' built-in text, {res['samples']} x "
             f"{res['length']} tokens, disjoint from the training and held-out text; the calibration pass alone took "
             f"{res['calibration_pass_seconds']} s. Every adapter loaded by PEFT on the float32 base (unmerged).\n",
             "| size | variant | adapter MiB | ranks | mean weight error | output error (rms) | held-out loss | "
             "improvement kept | wall s | peak RSS MiB |", "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in res["runs"]:
        out = f"{row['rms_output_error']:.4f}" if row.get("rms_output_error") is not None else "—"
        lines.append(f"| rank {row['size_rank']} | {row['label']} | {row['adapter_file_bytes'] / 2**20:.1f} | "
                     f"{row['ranks_min']}-{row['ranks_max']} | {row['mean_weight_error']:.4f} | {out} | "
                     f"{row['heldout_loss']:.4f} | {row['improvement_kept']:.3f} | {row['wall_seconds']} | "
                     f"{row['peak_rss_mib']} |")
    lines += ["", "Mean rank per module type in the budgeted adapters (size of rank r everywhere):", "",
              "| adapter | " + " | ".join(("q", "k", "v", "o", "gate", "up", "down")) + " |",
              "|---|" + "---:|" * 7]
    for row in res["runs"]:
        if "budget" in row["variant"]:
            lines.append(f"| {row['name']} | " + " | ".join(f"{v:.1f}" for v in row["ranks_by_type"].values()) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ft.DEFAULT_WORK)
    p.add_argument("--ranks", default="8,16,64")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--heldout-blocks", type=int, default=16)
    p.add_argument("--out", type=Path, default=REPO / "reports" / "extract_lora_budget")
    a = p.parse_args(argv)
    a.argv = argv if argv is not None else sys.argv[1:]
    res = measure(a)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    a.out.with_suffix(".md").write_text(render(res))
    print(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
