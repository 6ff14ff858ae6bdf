"""Time `compress eval` of three SmolLM2-135M models at 2,048 tokens (issue 13: under 60 s on this machine).

The models: the shipped Q4_1 GGUF (llama.cpp when llama-cpp-python is installed, else dequantized by compress),
its NF4 and its INT4 g64 outputs of `compress quantize` (made into --work if missing). Each run is one
`compress eval GGUF NF4 INT4 --tokens 2048 --window 1024 --json` process (wall time and peak RSS from the kernel,
scripts/benchlib.py), and the report keeps each model's load and score seconds and tokens per second from its JSON.
With ``--baseline REV`` the same command from a git worktree of REV runs in alternation, side by side in one run
(the machine is shared: only ratios within one run mean much).

    python scripts/bench_eval.py [--runs 2] [--baseline f701b5b] [--out reports/bench_eval]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import benchlib

REPO = benchlib.REPO


def prepare(work: Path) -> list[Path]:
    gguf = benchlib.smollm2_gguf()
    models = [gguf]
    for name, args in (("nf4", ["--method", "nf4"]), ("int4", ["--method", "int4", "--group-size", "64"])):
        out = work / f"smollm2-{name}"
        if not (out / "config.json").is_file():
            subprocess.run([sys.executable, "-m", "compress", "quantize", str(gguf), "-o", str(out), *args, "-q",
                            "--force"], check=True, cwd=REPO)
        models.append(out)
    return models


def worktree(rev: str, work: Path) -> Path:
    """A checkout of ``rev`` (the baseline's code) under ``work``."""
    path = work / f"baseline-{rev}"
    if not path.is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], check=True, cwd=REPO,
                       capture_output=True)
    return path


def one_run(models: list[Path], tokens: int, code: Path, work: Path, tag: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "compress", "eval", *map(str, models), "--tokens", str(tokens), "--window", "1024",
           "--json"]
    env = os.environ | {"PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1"}
    measured = benchlib.run_measured(cmd, log_dir=work / "logs", tag=tag, env=env, cwd=code)
    result = json.loads((work / "logs" / f"{tag}.out").read_text())
    return {"wall_s": round(measured["wall_s"], 2), "peak_rss_mib": round(measured["max_rss_bytes"] / 2**20, 1),
            "models": [{k: row.get(k) for k in ("model", "loader", "load_seconds", "score_seconds",
                                                 "tokens_per_second", "perplexity")} for row in result["models"]]}


def render(res: dict[str, Any]) -> str:
    lines = ["# compress eval: three SmolLM2-135M models at 2,048 tokens\n",
             f"Produced by `{res['command']}` on {res['date']} ({res['machine']['usable_cores']} cores, "
             f"{res['machine']['cpu_model']}); raw numbers in "
             "the .json beside this file. One `compress eval GGUF NF4 INT4 --tokens 2048 --window 1024` process per "
             "run (wall time from the kernel, including Python, torch and the three loads).\n",
             "| code | run | wall s | peak RSS MiB | per model: load s / score s / tokens per s |",
             "|---|---|---:|---:|---|"]
    for row in res["runs"]:
        models = "; ".join(f"{Path(m['model']).name}: {m['load_seconds']} / {m['score_seconds']:.1f} / "
                           f"{m['tokens_per_second']}" for m in row["models"])
        lines.append(f"| {row['code']} | {row['run']} | {row['wall_s']} | {row['peak_rss_mib']} | {models} |")
    lines += ["", "| code | median wall s |", "|---|---:|"]
    for code, value in res["median_wall_s"].items():
        lines.append(f"| {code} | {value} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_eval"))
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--baseline", default=None, help="a git revision to time beside the working tree")
    p.add_argument("--out", type=Path, default=REPO / "reports" / "bench_eval")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    models = prepare(a.work)
    codes = {"this tree": REPO}
    if a.baseline:
        codes[f"baseline {a.baseline}"] = worktree(a.baseline, a.work)
    runs = []
    for run in range(a.runs):
        for label, code in codes.items():
            row = one_run(models, a.tokens, code, a.work, f"{label.replace(' ', '_')}-{run}")
            runs.append({"code": label, "run": run + 1, **row})
            benchlib.log(f"{label} run {run + 1}: {row['wall_s']} s")
    res = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": shlex.join(["python", "scripts/bench_eval.py", *sys.argv[1:]]),
           "machine": benchlib.machine_info(("torch", "transformers", "llama-cpp-python")),
           "models": [str(m) for m in models], "tokens": a.tokens, "runs": runs,
           "median_wall_s": {label: statistics.median(r["wall_s"] for r in runs if r["code"] == label)
                             for label in codes}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    a.out.with_suffix(".md").write_text(render(res))
    print(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
