"""Scale: each command with the one executor run serially, on 2 local worker processes, and on a local Ray with
2 CPUs, side by side, on a checkpoint with the layer shapes of Llama-2 7B.

The checkpoint is generated here (scripts/make_synthetic_checkpoint.py --llama): 4 decoder layers of hidden 4096,
intermediate 11008, 32 heads, float16 (1.6 GB of decoder weights), a 4096-token vocabulary and a byte-level
tokenizer; a "fine-tune" of it (a random low-rank change plus noise on every projection) for extract-lora.
Jobs: NF4 (bitsandbytes layout), INT4 g128 (GPTQ layout), Q4_K_M (GGUF) and extract-lora at rank 16. Each
executor runs each job in every round (the order rotates between rounds: the machine is shared and noisy);
we report the median wall time, the speed-up as the median of the per-round ratios, and the peak memory of the
whole process tree (the command, its worker processes, a local Ray's processes: summed PSS, sampled every
0.1 s). Every output is checked byte-identical to the serial one.

What two processes can get from this machine at all is measured beside it (the *ceiling*): the quantize task
of every weight of one decoder layer (read, quantize, measure, pack: the same QuantizeWeight.run the executors
call) in one process alone, then in two processes at once, with no executor and nothing written; the ratio of
throughputs is the most two workers could reach here.

    python scripts/bench_scale.py [--rounds 2] [--jobs nf4,int4,q4_k_m,extract] [--work /tmp/compress-bench-scale]
    python scripts/bench_scale.py --ceiling-only     # measure the ceiling, add it to an existing report

Writes reports/bench_scale.{md,json}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import benchlib
from make_synthetic_checkpoint import build_llama

REPO = benchlib.REPO
JOBS: dict[str, list[str]] = {
    "nf4": ["quantize", "{base}", "-o", "{out}", "--method", "nf4"],
    "int4": ["quantize", "{base}", "-o", "{out}", "--method", "int4", "--group-size", "128"],
    "q4_k_m": ["quantize", "{base}", "-o", "{out}.gguf", "--method", "q4_k_m"],
    "extract": ["extract-lora", "--base", "{base}", "--tuned", "{tuned}", "-o", "{out}", "--rank", "16"],
}
EXECUTORS: dict[str, list[str]] = {"serial": [], "workers2": ["--workers", "2"],
                                   "ray2": ["--executor", "ray", "--workers", "2"]}
CEILING_JOBS: dict[str, list[str]] = {"nf4": ["nf4"], "int4": ["int4", "--group-size", "128"]}
SIZES_B = {"70B": 70e9, "405B": 405e9}  # parameters of the models the projection is for
WORKER_COUNTS = (1, 8, 64)
READ_GBPS = (1.0, 3.0, 10.0)  # per-node read bandwidths the projection considers (shared FS, NVMe, striped)


def digest(out: Path) -> dict[str, str]:
    """Every output file (provenance aside) -> sha256."""
    if out.is_dir():
        files = [p for p in sorted(out.rglob("*")) if p.is_file()]
    else:
        files = sorted(p for p in out.parent.iterdir() if p.name.startswith(out.name.removesuffix(".gguf") + "."))
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files if "provenance" not in p.name}


def decoder_params(path: Path) -> int:
    from compress.formats.inputs import open_checkpoint

    with open_checkpoint(path) as reader:
        return sum(i.numel for i in reader.infos() if ".layers." in i.name)


def run_job(job: str, executor: str, values: dict[str, str], work: Path, tag: str) -> dict[str, Any]:
    folder = work / "runs" / f"{job}-{executor}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    argv = [a.format(out=str(folder / "out"), **values) for a in JOBS[job]]
    out = Path(argv[argv.index("-o") + 1])
    cmd = [benchlib.compress_exe(), *argv, *EXECUTORS[executor], "-q"]
    env = dict(__import__("os").environ, HF_HUB_OFFLINE="1")
    res = benchlib.run_measured(cmd, log_dir=work / "logs", tag=tag, env=env, interval=0.1, tree=True)
    prov = out / "compress_provenance.json" if out.is_dir() else out.with_name(out.name.removesuffix(".gguf")
                                                                              + ".provenance.json")
    res["execution"] = json.loads(prov.read_text())["execution"]
    res["digest"] = digest(out)
    res["output_bytes"] = sum((out.parent / n).stat().st_size for n in res["digest"]) if not out.is_dir() else \
        benchlib.dir_bytes(out)
    return res


def ceiling_worker(argv: list[str]) -> int:
    """Child of :func:`ceiling`: argv = BASE GO_FILE READY_FILE REPEATS METHOD [OPTIONS]. Runs the quantize task
    of every weight of decoder layer 0 once untimed (page cache, allocator), signals READY, waits for GO, then
    runs them REPEATS times and prints the seconds."""
    import torch

    from compress.formats import FORMATS
    from compress.formats.inputs import open_model
    from compress.pipeline.plan import make_plan
    from compress.pipeline.quantize import entry_task
    from compress.pipeline.tasks import ModelSource, TaskContext, run_task
    from compress.quant import make_config

    base, go, ready, repeats, method, *opts = argv
    torch.set_num_threads(1)
    group = int(opts[opts.index("--group-size") + 1]) if "--group-size" in opts else 128
    config = make_config(method, group_size=group)
    with open_model(base) as reader:
        plan = make_plan(reader.infos(), method, config, FORMATS["bnb" if method == "nf4" else "gptq"])
    tasks = [entry_task(e, plan) for e in plan.quantized if ".layers.0." in e.info.name]
    ctx = TaskContext({"model": ModelSource(base)}, torch.device("cpu"))
    for task in tasks:
        run_task(task, ctx)
    Path(ready).touch()
    while not Path(go).exists():
        time.sleep(0.005)
    t0 = time.perf_counter()
    for _ in range(int(repeats)):
        for task in tasks:
            run_task(task, ctx)
    print(json.dumps({"seconds": time.perf_counter() - t0, "bytes": int(repeats) * sum(t.nbytes for t in tasks)}))
    return 0


def ceiling_once(job: str, base: Path, work: Path, processes: int, repeats: int) -> float:
    """Bytes per second of ``processes`` concurrent :func:`ceiling_worker` processes, summed."""
    go, children = work / "ceiling-go", []
    go.unlink(missing_ok=True)
    for i in range(processes):
        ready = work / f"ceiling-ready-{i}"
        ready.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--ceiling-worker", str(base), str(go), str(ready), str(repeats),
               *CEILING_JOBS[job]]
        env = dict(__import__("os").environ, OMP_NUM_THREADS="1")
        children.append((ready, subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)))
    while not all(ready.exists() for ready, _ in children):
        time.sleep(0.01)
    go.touch()
    results = [json.loads(proc.communicate()[0]) for _, proc in children]
    return sum(r["bytes"] / r["seconds"] for r in results)


def ceiling(jobs: list[str], base: Path, work: Path, rounds: int, repeats: int = 3) -> dict[str, Any]:
    """Per job: the task throughput of one process alone and of two at once (alternating, ``rounds`` times
    each), and their ratio: the most two workers can reach on this machine, executor or not."""
    out: dict[str, Any] = {}
    for job in [j for j in jobs if j in CEILING_JOBS]:
        one, two = [], []
        for rnd in range(rounds):
            benchlib.log(f"ceiling round {rnd + 1}: {job}")
            one.append(ceiling_once(job, base, work, 1, repeats))
            two.append(ceiling_once(job, base, work, 2, repeats))
        ratios = [b / a for a, b in zip(one, two, strict=True)]
        out[job] = {"one_process_bytes_per_s": one, "two_processes_bytes_per_s": two, "ratios": ratios,
                    "ratio_median": median(ratios)}
    return out


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--jobs", default=",".join(JOBS))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--work", type=Path, default=Path("/tmp/compress-bench-scale"))
    parser.add_argument("--report", type=Path, default=REPO / "reports" / "bench_scale")
    parser.add_argument("--ceiling-rounds", type=int, default=3)
    parser.add_argument("--ceiling-only", action="store_true",
                        help="measure only the two-process ceiling and add it to the existing report")
    if sys.argv[1:2] == ["--ceiling-worker"]:
        return ceiling_worker(sys.argv[2:])
    args = parser.parse_args()
    jobs = args.jobs.split(",")
    started = time.time()
    info = benchlib.machine_info(("ray", "safetensors"))
    base, tuned = args.work / "llama7b-shapes", args.work / "llama7b-shapes-tuned"
    marker = args.work / f"built-{args.layers}"
    if not marker.exists():
        shutil.rmtree(args.work, ignore_errors=True)
        args.work.mkdir(parents=True)
        benchlib.log(f"building the synthetic checkpoints in {args.work}")
        build_llama(base, layers=args.layers)
        build_llama(tuned, layers=args.layers, perturb_of=base)
        marker.touch()
    if args.ceiling_only:
        data = json.loads(args.report.with_suffix(".json").read_text())
        data["ceiling"] = ceiling(jobs, base, args.work, args.ceiling_rounds)
        data["ceiling_command"] = "python scripts/bench_scale.py " + shlex.join(sys.argv[1:])
        data["ceiling_machine"] = info
        args.report.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
        args.report.with_suffix(".md").write_text(markdown(data, list(data["summary"])))
        print(args.report.with_suffix(".md").read_text())
        return 0
    params = decoder_params(base)
    values = {"base": str(base), "tuned": str(tuned)}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {j: {e: [] for e in EXECUTORS} for j in jobs}
    order = list(EXECUTORS)
    for rnd in range(args.rounds):
        for job in jobs:
            for executor in order[rnd % len(order):] + order[:rnd % len(order)]:
                benchlib.log(f"round {rnd + 1}: {job} / {executor}")
                res = run_job(job, executor, values, args.work, f"{job}-{executor}-{rnd}")
                runs[job][executor].append(res)
                benchlib.log(f"  {res['wall_s']:.1f} s, tree PSS {res['tree_peak_pss_bytes'] / 2**20:.0f} MiB")
    summary: dict[str, Any] = {}
    for job in jobs:
        serial = runs[job]["serial"]
        entry: dict[str, Any] = {}
        for executor, results in runs[job].items():
            walls = [r["wall_s"] for r in results]
            ratios = [s["wall_s"] / r["wall_s"] for s, r in zip(serial, results, strict=True)]
            steady = [r["execution"]["steady_bytes_per_second"] for r in results]
            steady_ratios = [r["execution"]["steady_bytes_per_second"] / s["execution"]["steady_bytes_per_second"]
                             for s, r in zip(serial, results, strict=True)]
            entry[executor] = {
                "wall_s": walls, "median_wall_s": median(walls), "speedup_median": median(ratios),
                "task_phase_s": median([r["execution"]["seconds"] for r in results]),
                "steady_bytes_per_s": median(steady), "steady_speedup_median": median(steady_ratios),
                "speedup_of_minima": min(s["wall_s"] for s in serial) / min(walls),
                "peak_tree_pss_bytes": max(r["tree_peak_pss_bytes"] for r in results),
                "peak_main_rss_bytes": max(r["max_rss_bytes"] for r in results),
                "max_processes": max(r["tree_max_processes"] for r in results),
                "identical_to_serial": all(r["digest"] == serial[0]["digest"] for r in results),
                "decoder_params_per_s": params / median(walls),
            }
        summary[job] = entry
    projection = project(summary, jobs)
    data = {"command": "python scripts/bench_scale.py " + shlex.join(sys.argv[1:]), "machine": info,
            "ceiling": ceiling(jobs, base, args.work, args.ceiling_rounds),
            "checkpoint": {"layers": args.layers, "decoder_params": params, "dtype": "float16",
                           "decoder_bytes": 2 * params}, "rounds": args.rounds, "runs": runs, "summary": summary,
            "projection": projection, "seconds": round(time.time() - started)}
    for job in runs.values():  # the per-run digests are long and equal; keep one
        for results in job.values():
            for r in results:
                r["digest"] = sorted(r["digest"])
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    args.report.with_suffix(".md").write_text(markdown(data, jobs))
    print(args.report.with_suffix(".md").read_text())
    return 0


def project(summary: dict[str, Any], jobs: list[str]) -> dict[str, Any]:
    """Hours for 70B and 405B checkpoints on 1, 8 and 64 workers, from the measured per-worker throughput (the
    --workers 2 rate per worker), and the read bandwidth at which reading the input becomes the limit."""
    out: dict[str, Any] = {}
    for job in jobs:
        per_worker = summary[job]["workers2"]["steady_bytes_per_s"] / 2 / 2  # float16: 2 bytes per parameter
        rows = {}
        for size, n_params in SIZES_B.items():
            for workers in WORKER_COUNTS:
                compute_s = n_params / (per_worker * workers)
                read_s = {f"{g:g} GB/s": 2 * n_params / (g * 1e9) for g in READ_GBPS}
                rows[f"{size} x{workers}"] = {"compute_hours": compute_s / 3600,
                                              "read_hours": {k: v / 3600 for k, v in read_s.items()}}
        out[job] = {"params_per_s_per_worker": per_worker, "bf16_read_GBps_per_worker": 2 * per_worker / 1e9,
                    "workers_to_saturate": {f"{g:g} GB/s": g * 1e9 / (2 * per_worker) for g in READ_GBPS},
                    "estimates": rows}
    return out


def markdown(data: dict[str, Any], jobs: list[str]) -> str:
    m, ck = data["machine"], data["checkpoint"]
    gib = 2**30
    lines = ["# Scale: serial, 2 worker processes, Ray local", "",
             f"Produced by `{data['command']}` on {m['date']} ({data['seconds']} s); raw numbers in "
             "`bench_scale.json`.", "",
             f"Machine: {m['cpu_model']}, {m['usable_cores']} usable cores, {m['mem_total_bytes'] / gib:.0f} GiB RAM; "
             f"torch {m['versions']['torch']}, ray {m['versions'].get('ray')}; package commit "
             f"`{(m['package_commit'] or '?')[:12]}`{' (uncommitted changes)' if m['package_dirty'] else ''}. "
             f"Load average at start {m['loadavg_start']}.", "",
             f"Checkpoint: Llama-2 7B layer shapes, {ck['layers']} decoder layers, {ck['decoder_params'] / 1e6:.0f} M "
             f"decoder parameters in float16 ({ck['decoder_bytes'] / 1e9:.2f} GB), generated by "
             "scripts/make_synthetic_checkpoint.py --llama. Every task runs with one torch thread (the default "
             "--threads 1) in every executor. *Wall* is the whole command (Python and torch start-up, planning, "
             "starting workers or Ray, reading, computing, writing). *Throughput* is the steady rate of the task "
             "phase: input bytes of the tasks after the first, divided by the time from the first result to the "
             "last (from the execution figures each run writes into its provenance file); it excludes the fixed "
             "start-up (a second for the worker processes, several for a local Ray), which a 70B run amortises. "
             "Memory is the peak of the summed PSS of the command and all its descendant processes. "
             f"{data['rounds']} rounds, order rotated; ratios are medians of per-round ratios.", "",
             "| job | executor | wall s | wall speed-up | task phase s | throughput MB/s | throughput speed-up | "
             "peak memory, process tree | processes | output identical to serial |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for job in jobs:
        for executor, e in data["summary"][job].items():
            lines.append(f"| {job} | {executor} | {e['median_wall_s']:.1f} | {e['speedup_median']:.2f}x | "
                         f"{e['task_phase_s']:.1f} | {e['steady_bytes_per_s'] / 1e6:.0f} | "
                         f"{e['steady_speedup_median']:.2f}x | {e['peak_tree_pss_bytes'] / gib:.2f} GiB | "
                         f"{e['max_processes']} | {'yes' if e['identical_to_serial'] else '**no**'} |")
    lines += ceiling_markdown(data)
    lines += ["", "## What this implies for 70B and 405B checkpoints (on paper)", "",
              "From the measured steady rate per worker process with 2 workers (decoder parameters per second; "
              "the per-tensor work is independent, so N workers on N cores scale it N-fold until something shared "
              "saturates). Reading the input: 2 bytes per parameter (bfloat16/float16) at a given aggregate read "
              "bandwidth; the run takes the longer of the two. Writing is 4-5x smaller than reading.", "",
              "| job | rate per worker | reads per worker | workers that saturate 1 / 3 / 10 GB/s |",
              "|---|---:|---:|---|"]
    for job in jobs:
        p = data["projection"][job]
        sat = " / ".join(f"{v:.0f}" for v in p["workers_to_saturate"].values())
        lines.append(f"| {job} | {p['params_per_s_per_worker'] / 1e6:.0f} M params/s | "
                     f"{p['bf16_read_GBps_per_worker'] * 1e3:.0f} MB/s | {sat} |")
    lines += ["", "| job | model x workers | compute h | read h at 1 / 3 / 10 GB/s |", "|---|---|---:|---|"]
    for job in jobs:
        for key, row in data["projection"][job]["estimates"].items():
            reads = " / ".join(f"{v:.2f}" for v in row["read_hours"].values())
            lines.append(f"| {job} | {key} | {row['compute_hours']:.2f} | {reads} |")
    return "\n".join(lines) + "\n"


def ceiling_markdown(data: dict[str, Any]) -> list[str]:
    """The ceiling section, set beside the executors' own throughput speed-ups."""
    if not data.get("ceiling"):
        return []
    lines = ["", "## The ceiling: what two processes get from this machine", ""]
    if data.get("ceiling_command"):
        lines += [f"Measured later by `{data['ceiling_command']}` on {data['ceiling_machine']['date']} (load average "
                  f"at start {data['ceiling_machine']['loadavg_start']}).", ""]
    lines += ["The quantize task of every weight of decoder layer 0 (read from the page cache, quantize, measure the "
              "error, pack; the same `QuantizeWeight.run` the executors call, one torch thread), run 3 times by one "
              "process alone and then by two processes at once, with no executor and nothing written. The ratio is "
              "the most any two-worker executor can reach on these 2 shared cores; the executors' own ratio "
              "(throughput speed-up above) also pays for the parent writing the results.", "",
              "| job | one process MB/s | two processes MB/s | ceiling (median of rounds) | rounds | "
              "workers2 throughput speed-up | share of the ceiling |", "|---|---:|---:|---:|---|---:|---:|"]
    for job, c in data["ceiling"].items():
        reached = data["summary"].get(job, {}).get("workers2", {}).get("steady_speedup_median")
        lines.append(f"| {job} | {median(c['one_process_bytes_per_s']) / 1e6:.0f} | "
                     f"{median(c['two_processes_bytes_per_s']) / 1e6:.0f} | {c['ratio_median']:.2f}x | "
                     f"{', '.join(f'{r:.2f}' for r in c['ratios'])} | "
                     + (f"{reached:.2f}x | {reached / c['ratio_median']:.0%} |" if reached else "— | — |"))
    return lines


if __name__ == "__main__":
    sys.exit(main())
