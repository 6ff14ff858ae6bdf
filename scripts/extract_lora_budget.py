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
- activation-aware + budgeted (``--mean-rank r --calibration default``);
- plain with ``--lora-only`` (changed norm weights left out, as vLLM needs) and mergekit-extract-lora at the same
  rank (``--mergekit``: mergekit 0.1.5 from ``.venv-mergekit``, scripts/setup_mergekit.sh; embeddings excluded, as
  the fine-tune froze them; it keeps changed norms whole in modules_to_save, as our default does).

With ``--qalora``: the QA-LoRA form against an INT4 g32 model of the base (``--quantized-base``), folded with
``compress merge --strategy fold --format native`` and dequantized (``compress dequantize``) for scoring, beside INT4
g32 RTN and GPTQ of the fine-tune itself and the base's INT4 model alone.

improvement kept = (loss_base - loss_adapter) / (loss_base - loss_full). The calibration pass alone (the base model
run block by block on the same samples, statistics of every Linear) is timed in this process, so that the cost of
activation-aware extraction can be set against "plain extraction + the calibration pass".

    python scripts/extract_lora_budget.py                 # fine-tunes if needed (~5 min), then ~20 min
    python scripts/extract_lora_budget.py --samples 32    # quicker calibration
    python scripts/extract_lora_budget.py --work /tmp/smollm2_ft_norms --full-params linear+norms --samples 32 \
        --mergekit --qalora --out reports/extract_lora_norms        # norms trained too; mergekit; QA-LoRA
Results: reports/extract_lora_budget.{md,json} (or --out).
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
benchlib = _load("benchlib")
MERGEKIT = REPO / ".venv-mergekit" / "bin" / "mergekit-extract-lora"
QALORA_GROUP = 32

VARIANTS = [  # key, label, arguments given a rank and the calibration arguments
    ("plain", "plain SVD, rank r everywhere", lambda r, c: ["--rank", str(r)]),
    ("aware", "activation-aware (diagonal, the default), rank r everywhere", lambda r, c: ["--rank", str(r), *c]),
    ("whitened", "activation-aware whitened (output error), rank r everywhere",
     lambda r, c: ["--rank", str(r), *c, "--aware", "whitened"]),
    ("budget", "budgeted (size of rank r)", lambda r, c: ["--mean-rank", str(r)]),
    ("aware_budget", "activation-aware + budgeted", lambda r, c: ["--mean-rank", str(r), *c]),
    ("lora_only", "plain SVD, rank r everywhere, --lora-only (norm changes left out)",
     lambda r, c: ["--rank", str(r), "--lora-only"]),
    # --refine-steps: the factors refined end to end (KL against the fine-tune) on the calibration text ...
    ("refine", "activation-aware, rank r, refined on the built-in text (--refine-steps)",
     lambda r, c: ["--rank", str(r), *c, "--refine-steps", str(REFINE["steps"]), *REFINE["lr"]]),
    # ... or on the fine-tune's own training text (the Language Reference topics it trained on, disjoint from the
    # held-out ones), as a user who has the training data would
    ("refine_train", "activation-aware, rank r, refined on the fine-tune's training text (--refine-steps)",
     lambda r, c: ["--rank", str(r), "--calibration", str(REFINE["train_text"]), *c[2:],
                   "--refine-steps", str(REFINE["steps"]), *REFINE["lr"]]),
]
# set by measure() from --refine-steps, --refine-lr and the work folder
REFINE: dict[str, Any] = {"steps": 100, "train_text": None, "lr": []}
MERGEKIT_LABEL = "mergekit-extract-lora 0.1.5, rank r everywhere"


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
                        "--only", "full", "--full-params", a.full_params], check=True)
    held = ft.load_blocks(work)["heldout"][: a.heldout_blocks]
    ref = {"base": real.mean_token_loss(ft.load_causal_lm(base), held),
           "full": real.mean_token_loss(ft.load_causal_lm(full), held)}
    print(f"held-out loss: base {ref['base']:.4f}, full {ref['full']:.4f}", flush=True)
    calib = ["--calibration", "default", "--calibration-samples", str(a.samples), "--calibration-length",
             str(a.length)]
    REFINE["steps"], REFINE["train_text"] = a.refine_steps, write_training_text(work)
    REFINE["lr"] = [] if a.refine_lr is None else ["--refine-lr", str(a.refine_lr)]
    calibration_seconds = (calibration_pass_seconds(base, a.samples, a.length) if not a.no_calibration_timing
                           else None)
    print(f"calibration pass alone: {calibration_seconds} s", flush=True)
    adapters = work / "adapters_budget"
    adapters.mkdir(exist_ok=True)
    rows = []
    wanted = set(a.variants.split(","))
    for r in [int(x) for x in a.ranks.split(",")]:
        if a.mergekit:
            rows.append(run_mergekit(base, full, adapters, r, held, ref))
        for key, label, args_of in VARIANTS:
            if key not in wanted:
                continue
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
    qalora = measure_qalora(base, full, work, held, ref, a) if a.qalora else None
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "versions": ft.versions(),
            "machine": ft.machine(), "command": shlex.join(["python", f"scripts/{Path(__file__).name}",
                                                            *(a.argv or [])]),
            "work": str(work), "samples": a.samples, "length": a.length, "reference_loss": ref,
            "refine_steps": a.refine_steps, "refine_lr": a.refine_lr,
            "heldout_blocks": int(held.shape[0]), "calibration_pass_seconds": (None if calibration_seconds is None
                                                                      else round(calibration_seconds, 1)),
            "finetune": json.loads((work / "finetune.json").read_text()).get("full", {}),
            "runs": rows, "qalora": qalora}


def write_training_text(work: Path) -> Path:
    """WORK/train_text.txt: the Language Reference topics the fine-tune trained on (finetune_smollm2.split_topics),
    one after another, as a --calibration file."""
    from pydoc_data.topics import topics

    path = work / "train_text.txt"
    every = json.loads((work / "finetune.json").read_text()).get("data", {}).get("heldout_every", 5)
    train, _ = ft.split_topics(every)
    path.write_text("\n\n".join(topics[n] for n in train), encoding="utf-8")
    return path


def measured(cmd: list[str], log_dir: Path, tag: str) -> dict[str, Any]:
    """Wall seconds and peak RSS of one command (benchlib.run_measured)."""
    res = benchlib.run_measured(cmd, log_dir=log_dir, tag=tag)
    return {"wall_seconds": round(res["wall_s"], 2), "peak_rss_mib": round(res["max_rss_bytes"] / 2**20, 1)}


def run_mergekit(base: Path, full: Path, adapters: Path, r: int, held: torch.Tensor,
                 ref: dict[str, float]) -> dict[str, Any]:
    """mergekit-extract-lora at rank r (embeddings excluded: frozen in the fine-tune), scored like ours."""
    import shutil

    if not MERGEKIT.is_file():
        raise SystemExit(f"{MERGEKIT} is missing: run scripts/setup_mergekit.sh")
    out = adapters / f"mergekit-r{r}"
    if out.exists():
        shutil.rmtree(out)
    cmd = [str(MERGEKIT), "--model", str(full), "--base-model", str(base), "--out-path", str(out), "--max-rank",
           str(r), "-e", "embed_tokens", "-e", "lm_head"]
    timing = measured(cmd, adapters, f"mergekit-r{r}")
    model = real.peft_model(base, out)
    loss = real.mean_token_loss(model, held)
    del model
    config = json.loads((out / "adapter_config.json").read_text())
    row = {"name": f"mergekit-r{r}", "variant": "mergekit", "label": MERGEKIT_LABEL, "size_rank": r, **timing,
           "command": shlex.join([".venv-mergekit/bin/mergekit-extract-lora", *cmd[1:]]),
           "adapter_file_bytes": real.adapter_bytes_on_disk(out), "heldout_loss": loss,
           "improvement_kept": (ref["base"] - loss) / (ref["base"] - ref["full"]), "ranks_min": r, "ranks_max": r,
           "mean_weight_error": None, "rms_output_error": None,
           "modules_to_save": len(config.get("modules_to_save") or [])}
    print(f"{row['name']:>16}: {row['adapter_file_bytes'] / 2**20:.1f} MiB, loss {loss:.4f}, kept "
          f"{row['improvement_kept']:.3f}, {timing['wall_seconds']} s", flush=True)
    return row


def quantized_loss(model: Path, work: Path, held: torch.Tensor) -> float:
    """Held-out loss of a quantized checkpoint, through `compress dequantize` (float32) and transformers."""
    import shutil

    floating = work / (model.name + "_float")
    if floating.exists():
        shutil.rmtree(floating)
    real.run_cli(["dequantize", str(model), "-o", str(floating), "--dtype", "float32", "--quiet"],
                 work / f"{model.name}_dequantize.log")
    loss = real.mean_token_loss(ft.load_causal_lm(floating), held)
    shutil.rmtree(floating)
    return loss


def measure_qalora(base: Path, full: Path, work: Path, held: torch.Tensor, ref: dict[str, float],
                   a: argparse.Namespace) -> dict[str, Any]:
    """The QA-LoRA form at group size 32 against INT4 g32 models of the base, folded and scored; beside them INT4 g32
    RTN and GPTQ of the fine-tune itself. improvement kept as above (against the float base and fine-tune)."""
    root = work / "qalora"
    root.mkdir(exist_ok=True)
    g = str(QALORA_GROUP)
    int4 = ["--method", "int4", "--group-size", g, "--asym", "--format", "gptq", "--force", "--quiet"]
    gptq = ["--algorithm", "gptq", "--calibration-samples", str(a.samples), "--calibration-length", str(a.length)]
    calib = ["--calibration", "default", "--calibration-samples", str(a.samples), "--calibration-length",
             str(a.length)]
    rows: list[dict[str, Any]] = []

    def add(name: str, label: str, model: Path, extra: dict[str, Any]) -> None:
        loss = quantized_loss(model, root, held)
        row = {"name": name, "label": label, "heldout_loss": loss,
               "improvement_kept": (ref["base"] - loss) / (ref["base"] - ref["full"]),
               "model_file_bytes": sum(f.stat().st_size for f in model.glob("*.safetensors")), **extra}
        print(f"{name:>22}: loss {loss:.4f}, kept {row['improvement_kept']:.3f}", flush=True)
        rows.append(row)

    quantized = {}
    for key, label, src, more in (("base_rtn", "INT4 g32 RTN of the base", base, []),
                                  ("base_gptq", "INT4 g32 GPTQ of the base", base, gptq),
                                  ("tuned_rtn", "INT4 g32 RTN of the fine-tune", full, []),
                                  ("tuned_gptq", "INT4 g32 GPTQ of the fine-tune", full, gptq)):
        out = root / key
        args = ["quantize", str(src), "-o", str(out), *int4, *more]
        timing = real.run_cli(args, root / f"{key}.log")
        quantized[key] = out
        add(key, label, out, {"command": shlex.join(["compress", *args]), **timing})
    for q_key in ("base_rtn", "base_gptq"):
        whitened = [*calib, "--aware", "whitened"]
        for r, extra, tag in ((16, [], ""), (48, [], ""), (16, whitened, "_whitened"), (48, whitened, "_whitened")):
            name = f"qalora-r{r}{tag}-on-{q_key}"
            adapter, merged = root / f"{name}-adapter", root / f"{name}-merged"
            args = ["extract-lora", "--base", str(base), "--tuned", str(full), "--quantized-base",
                    str(quantized[q_key]), "-o", str(adapter), "--rank", str(r), *extra, "--force", "--quiet"]
            timing = real.run_cli(args, root / f"{name}.log")
            merge = ["merge", str(quantized[q_key]), "--adapter", str(adapter), "-o", str(merged), "--quantize",
                     "int4", "--strategy", "fold", "--format", "native", "--force", "--quiet"]
            real.run_cli(merge, root / f"{name}-merge.log")
            merge_report = json.loads((merged / "report.json").read_text())
            label = (f"{quantized[q_key].name.replace('_', ' ')} + QA-LoRA rank {r}"
                     + (" (calibrated, whitened)" if tag else "") + ", folded")
            add(name, label, merged, {"command": shlex.join(["compress", *args]), "merge_command":
                                      shlex.join(["compress", *merge]), **timing,
                                      "adapter_file_bytes": real.adapter_bytes_on_disk(adapter),
                                      "fold_error_vs_ideal": fold_error(merge_report)})
    return {"group_size": QALORA_GROUP, "rows": rows}


def fold_error(report: dict[str, Any]) -> float:
    """The merge report's largest relative error of a folded tensor against dequant(Q) + the adapter's update."""
    return float(report["requantization"]["totals"]["max_rel_error"])


def render(res: dict[str, Any]) -> str:
    ref = res["reference_loss"]
    trained = res.get("finetune", {}).get("trained", "linear")
    lines = ["# extract-lora: activation-aware factors and one budget, on the real full fine-tune of SmolLM2-135M\n",
             f"Produced by `{res['command']}` on {res['date']}; raw numbers in the .json beside this file. "
             f"The fine-tune trained: {trained} (embeddings frozen). "
             f"Held-out loss over {res['heldout_blocks']} blocks never trained on: base {ref['base']:.4f}, full "
             f"fine-tune {ref['full']:.4f}. Calibration: compress' built-in text, {res['samples']} x "
             f"{res['length']} tokens, disjoint from the training and held-out text; the calibration pass alone took "
             f"{res['calibration_pass_seconds'] or '(not timed in this run)'} s. Every adapter loaded by PEFT on the "
             "float32 base (unmerged).\n",
             *([f"Refined rows: `--refine-steps {res.get('refine_steps')}` (Adam, lr {res.get('refine_lr') or 2e-4:g}, "
                "batches of 4 samples, "
                "1/8 of the samples held out); on the built-in text, or on the fine-tune's own training text "
                "(`train_text.txt`: the topics it trained on, disjoint from the held-out ones), with the same sample "
                "count and length. Refinement time is in the wall seconds.\n"]
               if any(r["variant"].startswith("refine") for r in res["runs"]) else []),
             "| size | variant | adapter MiB | ranks | mean weight error | output error (rms) | held-out loss | "
             "improvement kept | wall s | peak RSS MiB |", "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in res["runs"]:
        out = f"{row['rms_output_error']:.4f}" if row.get("rms_output_error") is not None else "—"
        weight = f"{row['mean_weight_error']:.4f}" if row.get("mean_weight_error") is not None else "—"
        lines.append(f"| rank {row['size_rank']} | {row['label']} | {row['adapter_file_bytes'] / 2**20:.1f} | "
                     f"{row['ranks_min']}-{row['ranks_max']} | {weight} | {out} | "
                     f"{row['heldout_loss']:.4f} | {row['improvement_kept']:.3f} | {row['wall_seconds']} | "
                     f"{row['peak_rss_mib']} |")
    if res.get("ranks_plot"):
        lines += ["", f"![rank per module, activation-aware + budgeted at the size of rank 16]({res['ranks_plot']})"]
    lines += ["", "Mean rank per module type in the budgeted adapters (size of rank r everywhere):", "",
              "| adapter | " + " | ".join(("q", "k", "v", "o", "gate", "up", "down")) + " |",
              "|---|" + "---:|" * 7]
    for row in res["runs"]:
        if "budget" in row["variant"]:
            lines.append(f"| {row['name']} | " + " | ".join(f"{v:.1f}" for v in row["ranks_by_type"].values()) + " |")
    commands = sorted({row["command"].split(" -o ")[0].split(" --out-path ")[0] for row in res["runs"]})
    lines += ["", "Commands (one per row, output folder and rank aside): " + "; ".join(f"`{c}`" for c in commands)]
    qalora = res.get("qalora")
    if qalora:
        lines += ["", f"## QA-LoRA form (group size {qalora['group_size']})", "",
                  "The fine-tune shipped as an INT4 g32 model plus a foldable adapter: `extract-lora --quantized-base "
                  "Q`, then `merge Q --adapter A --quantize int4 --strategy fold --format native` (codes and scales of "
                  "Q untouched), scored after `compress dequantize`; beside it, the fine-tune itself quantized. "
                  "fold error: the largest relative error of a folded weight against dequant(Q) + the adapter's "
                  "update (float32 precision: the fold is exact).", "",
                  "| model | held-out loss | improvement kept | adapter MiB | fold error |",
                  "|---|---:|---:|---:|---:|"]
        for row in qalora["rows"]:
            size = f"{row['adapter_file_bytes'] / 2**20:.2f}" if "adapter_file_bytes" in row else "—"
            fold = f"{row['fold_error_vs_ideal']:.1e}" if "fold_error_vs_ideal" in row else "—"
            lines.append(f"| {row['label']} | {row['heldout_loss']:.4f} | {row['improvement_kept']:.3f} | {size} | "
                         f"{fold} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ft.DEFAULT_WORK)
    p.add_argument("--ranks", default="8,16,64")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--heldout-blocks", type=int, default=16)
    p.add_argument("--full-params", default="linear", help="finetune_smollm2.py --full-params, if it must run")
    p.add_argument("--variants", default=",".join(k for k, _, _ in VARIANTS), help="our variants to run")
    p.add_argument("--mergekit", action="store_true", help="mergekit-extract-lora at each rank (.venv-mergekit)")
    p.add_argument("--qalora", action="store_true", help="the QA-LoRA section")
    p.add_argument("--refine-steps", type=int, default=100, help="--refine-steps of the refine variants")
    p.add_argument("--refine-lr", type=float, default=None, help="--refine-lr of the refine variants (default: the "
                                                                   "tool's)")
    p.add_argument("--no-calibration-timing", action="store_true", help="skip timing the calibration pass alone")
    p.add_argument("--out", type=Path, default=REPO / "reports" / "extract_lora_budget")
    p.add_argument("--render-only", action="store_true", help="rewrite the .md from the existing .json")
    a = p.parse_args(argv)
    a.argv = argv if argv is not None else sys.argv[1:]
    if a.render_only:
        res = json.loads(a.out.with_suffix(".json").read_text())
    else:
        res = measure(a)
        plot = a.work / "adapters_budget" / "aware_budget-r16" / "ranks.png"
        # the budget's rank map, as extract-lora draws it in the adapter folder
        if "aware_budget" in a.variants.split(",") and plot.is_file():
            import shutil

            shutil.copy(plot, a.out.with_name(a.out.name + "_ranks_r16.png"))
            res["ranks_plot"] = a.out.name + "_ranks_r16.png"
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    a.out.with_suffix(".md").write_text(render(res))
    print(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
