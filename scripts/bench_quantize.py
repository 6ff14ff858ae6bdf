"""Benchmark the quantizers and the `compress quantize` pipeline (speed and peak memory).

Sections (each can be skipped with --skip):

1. ``micro``: one [size, size] matrix (fp32 and bf16), block 64: our NF4 (``quantize_nf4`` + packing
   to bitsandbytes' bytes) against ``bitsandbytes.functional.quantize_4bit``, with and without double
   quantization, and our INT4 (group 128, asym and sym). The contenders are interleaved in every
   round (the order rotates), so a noisy shared machine slows them alike; we report min and median.
   Before timing, the packed codes and the statistics are checked to be identical to bitsandbytes'
   (the script fails otherwise). Runs once per ``--threads`` setting.
2. ``stages``: what a quantize task does with a tensor (quantize, measure the error piece by piece,
   pack), on the same matrix, for nf4 and int4.
3. ``e2e``: ``compress quantize`` of the SmolLM2-135M GGUF (nf4, int4, and nf4 with ``--workers 2``) in a
   subprocess (the ``compress`` console script): wall time and peak RSS (``wait4`` rusage), and the task
   phase as the executor records it in the provenance file (its seconds, the time to the first result).
4. ``stream``: a synthetic sharded float32 checkpoint (default 4 GiB, 64 MiB tensors, 1 GiB shards;
   ``scripts/make_synthetic_checkpoint.py``) under ``--workdir``, quantized to nf4 and int4 with the
   console script, measuring peak RSS. Everything written under the work folder is deleted afterwards.

Peak RSS is measured by ``benchlib.run_measured``: a tiny launcher process forks the measured command
and reads its ``wait4`` rusage (see benchlib for why this process must not be the parent).

Writes ``<out>.json`` (all raw numbers, machine info) and ``<out>.md`` (tables + the command).

    python scripts/bench_quantize.py                            # full run, ~10-15 min on 2 cores
    python scripts/bench_quantize.py --quick --out /tmp/bench   # smaller, a few minutes
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import benchlib
from benchlib import compress_exe, dir_bytes, loadavg, run_measured, smollm2_gguf, stats

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
RSS_LIMIT_BYTES = int(1.5 * 1024**3)  # acceptance criterion: streaming peak RSS below 1.5 GiB
SPEEDUP_TARGET = 2.0
TENSOR_BYTES = 4096 * 4096 * 4  # the synthetic checkpoint's tensors: float32 [4096, 4096]


# --- helpers -------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    return benchlib.machine_info(("bitsandbytes", "safetensors", "transformers", "gguf", "numpy"))


def contention_probe(reps: int = 200) -> dict[str, Any]:
    """Latency of one small parallel op (abs of 2^18 float32) at each thread count: shows whether
    the other cores are busy (a multi-threaded op then waits for a descheduled worker)."""
    import torch

    x = torch.randn(1 << 18)
    saved = torch.get_num_threads()
    out: dict[str, Any] = {}
    for n in sorted({saved, 1}, reverse=True):
        torch.set_num_threads(n)
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            x.abs()
            ts.append(time.perf_counter() - t)
        ts.sort()
        out[f"threads_{n}"] = {"min_us": ts[0] * 1e6, "median_us": statistics.median(ts) * 1e6,
                               "p95_us": ts[int(0.95 * len(ts))] * 1e6}
    torch.set_num_threads(saved)
    out["loadavg"] = loadavg()
    return out


def make_matrix(rows: int, cols: int, seed: int = 0) -> Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g).mul_(0.02)
    W.view(-1)[::4099] *= 8.0  # a few outliers, as trained weights have
    return W


# --- 1. micro benchmark --------------------------------------------------------------------------


def micro(size: int, rounds: int, threads: int) -> dict[str, Any]:
    import bitsandbytes.functional as bnbF
    import torch

    from compress.formats.bnb import pack_nibbles
    from compress.quant.int4 import Int4Config, quantize_int4
    from compress.quant.nf4 import NF4Config, quantize_nf4, zero_code

    torch.set_num_threads(threads)
    zc = zero_code("nf4")
    cfg, cfg_dq = NF4Config(64), NF4Config(64, double_quant=True)
    asym, sym = Int4Config(128, symmetric=False), Int4Config(128, symmetric=True)

    def ours(X: Any, c: NF4Config = cfg) -> Any:
        q = quantize_nf4(X, c)
        return q, pack_nibbles(q.codes, zc)

    contenders: dict[str, Callable[[Any], Any]] = {
        "ours_nf4": ours,
        "bnb_nf4": lambda X: bnbF.quantize_4bit(X, blocksize=64, quant_type="nf4"),
        "ours_nf4_dq": lambda X: ours(X, cfg_dq),
        "bnb_nf4_dq": lambda X: bnbF.quantize_4bit(X, blocksize=64, quant_type="nf4", compress_statistics=True),
        "int4_asym": lambda X: quantize_int4(X, asym),
        "int4_sym": lambda X: quantize_int4(X, sym),
    }
    names = list(contenders)
    W32 = make_matrix(size, size)
    n = W32.numel()
    result: dict[str, Any] = {"threads": threads, "size": [size, size], "params": n, "rounds": rounds,
                              "block_size": 64, "group_size": 128, "dtypes": {}}
    for dtype in (torch.float32, torch.bfloat16):
        X = W32.to(dtype)
        # Warm-up (builds look-up tables, faults memory in) and the identity check.
        q, packed = contenders["ours_nf4"](X)
        ref_packed, ref_state = contenders["bnb_nf4"](X)
        same = torch.equal(packed, ref_packed) and torch.equal(q.absmax, ref_state.absmax)
        q, packed = contenders["ours_nf4_dq"](X)
        ref_packed, ref_state = contenders["bnb_nf4_dq"](X)
        same_dq = (torch.equal(packed, ref_packed) and torch.equal(q.absmax, ref_state.absmax)
                   and torch.equal(q.nested_absmax, ref_state.state2.absmax)
                   and torch.equal(q.nested_code, ref_state.state2.code)
                   and q.offset == float(ref_state.offset))
        if not (same and same_dq):
            raise AssertionError(f"{dtype}: our NF4 bytes differ from bitsandbytes' "
                                 f"(plain identical: {same}, double-quant identical: {same_dq})")
        del q, packed, ref_packed, ref_state
        for name in ("int4_asym", "int4_sym"):
            contenders[name](X)
        times: dict[str, list[float]] = {k: [] for k in names}
        load_before = loadavg()
        for r in range(rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                gc.collect()
                t = time.perf_counter()
                out = contenders[name](X)
                times[name].append(time.perf_counter() - t)
                del out
        per = {k: stats(v) for k, v in times.items()}
        for v in per.values():
            v["mparams_per_s_best"] = n / v["min"] / 1e6
            v["mparams_per_s_median"] = n / v["median"] / 1e6

        def ratio(a: str, b: str, times: dict[str, list[float]] = times) -> dict[str, float]:
            """How many times faster b is than a: per-round a/b (median over rounds) and min(a)/min(b)."""
            rr = [x / y for x, y in zip(times[a], times[b], strict=True)]
            return {"per_round_median": statistics.median(rr), "of_mins": min(times[a]) / min(times[b]),
                    "per_round_min": min(rr), "per_round_max": max(rr)}

        result["dtypes"][str(dtype).removeprefix("torch.")] = {
            "identical_codes": same, "identical_codes_double_quant": same_dq,
            "times": per,
            "speedup_nf4_vs_bnb": ratio("bnb_nf4", "ours_nf4"),
            "speedup_nf4_dq_vs_bnb": ratio("bnb_nf4_dq", "ours_nf4_dq"),
            "int4_asym_vs_ours_nf4": ratio("ours_nf4", "int4_asym"),
            "int4_sym_vs_ours_nf4": ratio("ours_nf4", "int4_sym"),
            "loadavg": [load_before, loadavg()],
        }
    return result


# --- 2. per-tensor pipeline stages ---------------------------------------------------------------

STAGES = ("quantize", "error", "pack")


def stages(size: int, rounds: int, threads: int) -> dict[str, Any]:
    """What a quantize task does with a weight (pipeline.quantize.QuantizeWeight), timed step by step."""
    import torch

    torch.set_num_threads(threads)
    from compress.formats import FORMATS
    from compress.quant import METHODS, make_config

    W = make_matrix(size, size)
    out: dict[str, Any] = {"size": [size, size], "dtype": "float32", "threads": torch.get_num_threads(),
                           "rounds": rounds, "methods": {}}
    for method, fmt in (("nf4", "bnb"), ("int4", "gptq")):
        m, f = METHODS[method], FORMATS[fmt]
        cfg = make_config(method, block_size=64, double_quant=False, group_size=128, symmetric=False)
        times: dict[str, list[float]] = {k: [] for k in STAGES}
        m.quantize(W, cfg)  # warm-up
        for _ in range(rounds):
            gc.collect()
            t0 = time.perf_counter()
            qt = m.quantize(W, cfg)
            t1 = time.perf_counter()
            qt.error_against(W)
            t2 = time.perf_counter()
            f.pack("model.layers.0.mlp.up_proj.weight", qt)
            t3 = time.perf_counter()
            for k, a, b in zip(STAGES, (t0, t1, t2), (t1, t2, t3), strict=True):
                times[k].append(b - a)
            del qt
        per = {k: stats(v) for k, v in times.items()}
        total_med = sum(v["median"] for v in per.values())
        out["methods"][method] = {"format": fmt, "times": per, "sum_of_medians": total_med,
                                  "pipeline_over_quantize": total_med / per["quantize"]["median"]}
    return out


# --- 3. end-to-end GGUF --------------------------------------------------------------------------


def provenance_execution(out: Path) -> dict[str, Any]:
    """The executor's figures of a run, from its provenance file (a folder's or a GGUF's sidecar)."""
    prov = out / "compress_provenance.json" if out.is_dir() else out.with_name(out.name.removesuffix(".gguf")
                                                                              + ".provenance.json")
    return json.loads(prov.read_text())["execution"]


def e2e_gguf(rounds: int, workdir: Path, env: dict[str, str]) -> dict[str, Any]:
    """Each round runs every variant once (rotating order): nf4, int4, and nf4 on 2 worker processes."""
    gguf = smollm2_gguf()
    variants: dict[str, list[str]] = {"nf4": ["--method", "nf4"], "int4": ["--method", "int4"],
                                      "nf4, --workers 2": ["--method", "nf4", "--workers", "2"]}
    names = list(variants)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in names}
    for r in range(rounds):
        shift = r % len(names)
        for i, name in enumerate(names[shift:] + names[:shift]):
            out = workdir / f"gguf-{i}"
            res = run_measured([compress_exe(), "quantize", str(gguf), "-o", str(out), *variants[name], "-q",
                                "--force"], env=env, log_dir=workdir / "logs", tag=f"gguf-{names.index(name)}-{r}")
            res["output_bytes"] = dir_bytes(out)
            res["execution"] = provenance_execution(out)
            shutil.rmtree(out)
            runs[name].append(res)
    result: dict[str, Any] = {"input": str(gguf), "input_bytes": gguf.stat().st_size, "rounds": rounds,
                              "methods": {}}
    for name in names:
        rs = runs[name]
        result["methods"][name] = {
            "wall_s": stats([x["wall_s"] for x in rs]),
            "user_s": stats([x["user_s"] for x in rs]),
            "task_phase_s": stats([x["execution"]["seconds"] for x in rs]),
            "max_rss_bytes": stats([x["max_rss_bytes"] for x in rs]),
            "output_bytes": rs[0]["output_bytes"], "runs": rs,
        }
    return result


# --- 4. streaming a large synthetic checkpoint ---------------------------------------------------


def stream(gib: int, workdir: Path, env: dict[str, str], keep: bool) -> dict[str, Any]:
    layers = gib * 4  # 4 x [4096, 4096] float32 (64 MiB each) per layer = 256 MiB per layer
    per_shard = 4 if gib >= 2 else 1  # 1 GiB shards (256 MiB for the small --quick checkpoint)
    ckpt_dir = workdir / f"synthetic-{gib}g"
    build = run_measured([sys.executable, str(REPO / "scripts" / "make_synthetic_checkpoint.py"), str(ckpt_dir),
                          "--layers", str(layers), "--layers-per-shard", str(per_shard), "--force"],
                         env=env, log_dir=workdir / "logs", tag="build")
    built = json.loads((workdir / "logs" / "build.out").read_text())
    result: dict[str, Any] = {
        "checkpoint": built, "build": {k: build[k] for k in ("wall_s", "max_rss_bytes")},
        "input_bytes": dir_bytes(ckpt_dir), "largest_tensor_bytes": TENSOR_BYTES,
        "limit_bytes": RSS_LIMIT_BYTES, "runs": {},
        "note": "The input was just written, so it is read from the page cache (warm), not from disk",
    }
    try:
        for method in ("nf4", "int4"):
            out = workdir / f"synthetic-{method}"
            res = run_measured([compress_exe(), "quantize", str(ckpt_dir), "-o", str(out), "--method", method,
                                "-q", "--force"], env=env, log_dir=workdir / "logs", tag=f"stream-{method}")
            res["output_bytes"] = dir_bytes(out)
            res["below_limit"] = res["max_rss_bytes"] < RSS_LIMIT_BYTES
            res["execution"] = provenance_execution(out)
            shutil.rmtree(out)
            result["runs"][method] = res
    finally:
        if not keep:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    return result


# --- report --------------------------------------------------------------------------------------


def mib(b: float) -> str:
    return f"{b / MIB:,.0f} MiB"


def _probe_line(p: dict[str, Any]) -> str:
    return "; ".join(f"{k.replace('_', ' ')}: {v['min_us']:.0f} / {v['median_us']:.0f} / {v['p95_us']:.0f}"
                     for k, v in p.items() if k.startswith("threads"))


def write_markdown(path: Path, data: dict[str, Any], json_name: str) -> None:
    m = data["machine"]
    L: list[str] = ["# `compress quantize` benchmark", ""]
    L += [f"Produced by `{data['command']}` on {m['date']} (total {data['total_seconds']:.0f} s); "
          f"raw numbers in `{json_name}`.", ""]
    dirty = " (with uncommitted changes in compress/)" if m["package_dirty"] else ""
    L += [f"Machine: {m['cpu_model']}, {m['usable_cores']} usable cores, {m['mem_total_bytes'] / 1024**3:.0f} GiB "
          f"RAM, torch default threads {m['torch_threads_default']}; "
          f"{', '.join(f'{k} {v}' for k, v in m['versions'].items())}; package commit "
          f"`{(m['package_commit'] or '?')[:12]}`{dirty}. Load average (1/5/15 min) at start "
          f"{m['loadavg_start']}, at end {data['loadavg_end']}.", ""]
    L += ["The machine is shared with other jobs and timings are noisy: the contenders are interleaved in every "
          "round (rotating order) and we report min and median; a speed-up is the median over rounds of the "
          "per-round ratio (the ratio of the minima is shown too).", ""]
    if "probe" in data:
        L += ["Contention probe, one `abs()` of 2^18 float32 repeated 200 times (min / median / p95 µs): "
              f"at start {_probe_line(data['probe']['start'])}"
              + (f"; at end {_probe_line(data['probe']['end'])}" if "end" in data["probe"] else "") + ". "
              "When the multi-threaded median is far above the single-threaded one, other processes hold the "
              "cores and every multi-threaded torch op waits for a descheduled worker thread (milliseconds per "
              "op); code that issues many small ops suffers most. The single-thread tables are then the "
              "reliable comparison.", ""]

    if data.get("summary"):
        L += ["## Acceptance criteria", "", "| criterion | figure | met |", "|---|---|---|"]
        L += [f"| {c} | {f} | {ok} |" for c, f, ok in data["summary"]]
        L.append("")

    for mres in data.get("micro", []):
        t, (r, c) = mres["threads"], mres["size"]
        L += [f"## 1. Quantizers on one {r}x{c} matrix ({mres['params'] / 1e6:.1f} M params), {t} thread(s), "
              f"{mres['rounds']} rounds, interleaved", ""]
        L += ["`ours_nf4` = `quantize_nf4` + `pack_nibbles` (bitsandbytes' bytes); `bnb_nf4` = "
              "`bitsandbytes.functional.quantize_4bit(W, blocksize=64, quant_type='nf4')`; `_dq` = double "
              "quantization (`compress_statistics=True`); `int4_*` = `quantize_int4`, group 128.", ""]
        L += ["| input | contender | min s | median s | Mparam/s (best) | Mparam/s (median) |",
              "|---|---|---:|---:|---:|---:|"]
        for dname, d in mres["dtypes"].items():
            for k, v in d["times"].items():
                L.append(f"| {dname} | {k} | {v['min']:.4f} | {v['median']:.4f} | {v['mparams_per_s_best']:.0f} | "
                         f"{v['mparams_per_s_median']:.0f} |")
        L += ["", "| input | ratio | per-round median | of minima | per-round range | identical codes |",
              "|---|---|---:|---:|---|---|"]
        for dname, d in mres["dtypes"].items():
            for key, label, ident in (
                    ("speedup_nf4_vs_bnb", "NF4 speed-up vs bitsandbytes (bnb / ours)", d["identical_codes"]),
                    ("speedup_nf4_dq_vs_bnb", "NF4 + double quant speed-up vs bitsandbytes",
                     d["identical_codes_double_quant"]),
                    ("int4_asym_vs_ours_nf4", "our NF4 / INT4 asym (≥ 1: INT4 at least as fast)", None),
                    ("int4_sym_vs_ours_nf4", "our NF4 / INT4 sym", None)):
                x = d[key]
                ident_s = "" if ident is None else ("yes" if ident else "NO")
                L.append(f"| {dname} | {label} | {x['per_round_median']:.2f}x | {x['of_mins']:.2f}x | "
                         f"{x['per_round_min']:.2f}–{x['per_round_max']:.2f} | {ident_s} |")
        L.append("")

    all_stages = data.get("stages") or []
    if isinstance(all_stages, dict):  # results written before stages ran once per thread setting
        all_stages = [all_stages]
    if all_stages:
        s0 = all_stages[0]
        L += [f"## 2. Per-tensor pipeline work on one {s0['size'][0]}x{s0['size'][1]} float32 matrix "
              f"({s0['rounds']} rounds, median seconds)", ""]
        L += ["What a quantize task does with a tensor besides reading it and the parent writing its bytes: "
              "quantize, measure the error (the reconstruction taken piece by piece), pack.", ""]
        L += ["| threads | method | quantize | error metrics | pack | sum | sum / quantize |",
              "|---|---|---:|---:|---:|---:|---:|"]
        for s in all_stages:
            for meth, v in s["methods"].items():
                tt = v["times"]
                if set(STAGES) - set(tt):  # an older run, with other stages: not comparable
                    continue
                L.append(f"| {s['threads']} | {meth} | " + " | ".join(f"{tt[k]['median']:.3f}" for k in STAGES)
                         + f" | {v['sum_of_medians']:.3f} | {v['pipeline_over_quantize']:.1f}x |")
        L.append("")

    if "e2e" in data:
        e = data["e2e"]
        L += [f"## 3. End to end: `compress quantize` of SmolLM2-135M-Instruct Q4_1 GGUF "
              f"({mib(e['input_bytes'])}), {e['rounds']} round(s) per method", ""]
        L += ["`compress quantize MODEL.gguf -o OUT --method M -q --force`, the console script in a subprocess "
              "forked by a small launcher; peak RSS is its `wait4` rusage (`ru_maxrss`, the largest single "
              "process). Rounds are interleaved. The task phase is what the executor records in the provenance "
              "file: reading, quantizing and writing the tensors, without Python's start-up and imports.", ""]
        L += ["| method | wall s (min) | wall s (median) | task phase s (median) | CPU user s (median) | "
              "peak RSS (max over runs) | output |", "|---|---:|---:|---:|---:|---:|---:|"]
        for meth, v in e["methods"].items():
            user = f"{v['user_s']['median']:.1f}" if "user_s" in v else ""
            phase = f"{v['task_phase_s']['median']:.1f}" if "task_phase_s" in v else ""
            L.append(f"| {meth} | {v['wall_s']['min']:.1f} | {v['wall_s']['median']:.1f} | {phase} | {user} | "
                     f"{mib(v['max_rss_bytes']['max'])} | {mib(v['output_bytes'])} |")
        L.append("")

    if "stream" in data:
        st = data["stream"]
        c = st["checkpoint"]
        L += [f"## 4. Streaming a {mib(st['input_bytes'])} synthetic checkpoint "
              f"({c['quantizable']} float32 [4096, 4096] tensors of 64 MiB + {c['tensors'] - c['quantizable']} norms, "
              f"{c['shards']} shards)", ""]
        L += [f"Built by `scripts/make_synthetic_checkpoint.py` in {st['build']['wall_s']:.0f} s with peak RSS "
              f"{mib(st['build']['max_rss_bytes'])} (one shard at a time). {st['note']}. Limit: "
              f"{mib(st['limit_bytes'])}. Peak RSS is the command's `wait4` rusage (forked by a small launcher); "
              "anonymous / file-backed are the peaks of `RssAnon` / `RssFile` sampled every 50 ms from "
              "/proc/PID/status.", ""]
        L += ["| run | wall s | peak RSS (rusage) | peak anonymous | peak file-backed | output | < 1.5 GiB |",
              "|---|---:|---:|---:|---:|---:|---|"]
        for name, v in st["runs"].items():
            p = v["sampled_peak_bytes"]
            L.append(f"| {name} | {v['wall_s']:.0f} | {mib(v['max_rss_bytes'])} | {mib(p['RssAnon'])} | "
                     f"{mib(p['RssFile'])} | {mib(v['output_bytes'])} | {'yes' if v['below_limit'] else 'NO'} |")
        L.append("")

    if data.get("findings"):
        L += ["## Automatic observations", ""]
        L += [f"- {f}" for f in data["findings"]]
        L.append("")
    path.write_text("\n".join(L))


def summarize(data: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for mres in data.get("micro", []):
        for dname, d in mres["dtypes"].items():
            x = d["speedup_nf4_vs_bnb"]
            rows.append((f"NF4 {dname}, block 64, {mres['size'][0]}², {mres['threads']} thread(s): ≥ 2x faster than "
                         "bitsandbytes", f"{x['per_round_median']:.2f}x (ratio of minima {x['of_mins']:.2f}x)",
                         "yes" if x["per_round_median"] >= SPEEDUP_TARGET else "no"))
            rows.append((f"NF4 {dname}, {mres['threads']} thread(s): packed codes and absmax identical to "
                         "bitsandbytes (plain / double quant)",
                         f"{'yes' if d['identical_codes'] else 'no'} / "
                         f"{'yes' if d['identical_codes_double_quant'] else 'no'}",
                         "yes" if d["identical_codes"] and d["identical_codes_double_quant"] else "no"))
            for key, lab in (("int4_asym_vs_ours_nf4", "asym"), ("int4_sym_vs_ours_nf4", "sym")):
                x = d[key]
                rows.append((f"INT4 {lab} g128 {dname}, {mres['threads']} thread(s): at least as fast as our NF4",
                             f"NF4 time / INT4 time = {x['per_round_median']:.2f}",
                             "yes" if x["per_round_median"] >= 1.0 else "no"))
    if "e2e" in data:
        for meth, v in data["e2e"]["methods"].items():
            rows.append((f"end to end, SmolLM2-135M GGUF → {meth}: wall time and peak RSS",
                         f"{v['wall_s']['median']:.1f} s (median), {mib(v['max_rss_bytes']['max'])}", "reported"))
    if "stream" in data:
        for name, v in data["stream"]["runs"].items():
            rows.append((f"streaming {mib(data['stream']['input_bytes'])} → {name}: peak RSS < 1.5 GiB",
                         mib(v["max_rss_bytes"]), "yes" if v["below_limit"] else "no"))
    return rows


def findings(data: dict[str, Any]) -> list[str]:
    """Observations computed from the numbers (the analysis is written up where the results are used)."""
    out = []
    st = data.get("stream")
    if st:
        for name, v in st["runs"].items():
            p = v["sampled_peak_bytes"]
            out.append(f"stream, {name}: peak RSS {mib(v['max_rss_bytes'])}; sampled peaks {mib(p['RssFile'])} "
                       f"file-backed (mapped checkpoint pages + shared libraries) and {mib(p['RssAnon'])} "
                       f"anonymous (= {p['RssAnon'] / st['largest_tensor_bytes']:.1f}x one 64 MiB input tensor); "
                       f"{v['wall_s'] / max(st['checkpoint']['quantizable'], 1):.2f} s per quantized tensor.")
    e = data.get("e2e")
    if e:
        for meth, v in e["methods"].items():
            if "task_phase_s" in v:
                phase, wall = v["task_phase_s"]["median"], v["wall_s"]["median"]
                out.append(f"GGUF → {meth}: the task phase takes {phase:.1f} s of {wall:.1f} s wall "
                           f"({100 * phase / wall:.0f}%); the rest is Python's start-up, imports, opening the GGUF "
                           "and its tokenizer, planning and the output's other files.")
    return out


# --- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smaller run: 2048² matrix, 3 rounds, default threads only, 1 GiB stream, 1 e2e round")
    ap.add_argument("--rounds", type=int, help="micro-benchmark rounds (default 7; quick 3)")
    ap.add_argument("--size", type=int, help="matrix side (default 4096; quick 2048)")
    ap.add_argument("--threads", help="comma-separated torch thread counts for the micro-benchmark and stages "
                                      "(default: torch's default, then 1)")
    ap.add_argument("--e2e-rounds", type=int, help="end-to-end GGUF rounds per method (default 2; quick 1)")
    ap.add_argument("--stream-gib", type=int, help="synthetic checkpoint size in GiB (default 4; quick 1)")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: micro,stages,e2e,stream")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp"), help="where scratch files go (deleted after)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (synthetic checkpoint, logs)")
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "bench_quantize",
                    help="output prefix: writes OUT.json and OUT.md (default reports/bench_quantize)")
    ap.add_argument("--render", type=Path, metavar="JSON",
                    help="only rewrite OUT.md from an existing results JSON (no measurement)")
    args = ap.parse_args(argv)
    md_path = args.out.parent / (args.out.name + ".md")
    if args.render is not None:
        data = json.loads(args.render.read_text())
        data["summary"], data["findings"] = summarize(data), findings(data)
        write_markdown(md_path, data, args.render.name)
        print(f"wrote {md_path}")
        return 0

    import torch

    quick = args.quick
    rounds = args.rounds or (3 if quick else 7)
    size = args.size or (2048 if quick else 4096)
    default_threads = torch.get_num_threads()
    if args.threads:
        threads = [int(t) for t in args.threads.split(",")]
    else:
        threads = [default_threads] if quick or default_threads == 1 else [default_threads, 1]
    e2e_rounds = args.e2e_rounds or (1 if quick else 2)
    stream_gib = args.stream_gib or (1 if quick else 4)
    skip = {s for s in args.skip.split(",") if s}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    os.environ["HF_HUB_OFFLINE"] = "1"
    workdir = args.workdir / f"bench_quantize-{os.getpid()}"
    workdir.mkdir(parents=True)
    started = time.perf_counter()
    me = Path(__file__).resolve()
    cmd = "python " + shlex.join([str(me.relative_to(REPO)) if me.is_relative_to(REPO) else str(me),
                                  *(argv if argv is not None else sys.argv[1:])])
    data: dict[str, Any] = {"command": cmd, "machine": machine_info(),
                            "settings": {"rounds": rounds, "size": size, "threads": threads, "e2e_rounds": e2e_rounds,
                                         "stream_gib": stream_gib, "skip": sorted(skip)}}

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {msg}", flush=True)

    try:
        data["probe"] = {"start": contention_probe()}
        if "micro" not in skip:
            data["micro"] = []
            for t in threads:
                log(f"micro: {size}x{size}, {t} thread(s), {rounds} rounds")
                data["micro"].append(micro(size, rounds, t))
                log("  NF4 speed-up vs bitsandbytes: " + ", ".join(
                    f"{k} {v['speedup_nf4_vs_bnb']['per_round_median']:.2f}x"
                    for k, v in data["micro"][-1]["dtypes"].items()))
            torch.set_num_threads(default_threads)
        if "stages" not in skip:
            data["stages"] = []
            for t in threads:
                log(f"stages: {t} thread(s)")
                data["stages"].append(stages(size, min(rounds, 5), t))
            torch.set_num_threads(default_threads)
        gc.collect()
        if "e2e" not in skip:
            log(f"e2e GGUF: {e2e_rounds} round(s) x nf4 / int4 / nf4 --workers 2")
            data["e2e"] = e2e_gguf(e2e_rounds, workdir, env)
        if "stream" not in skip:
            log(f"stream: {stream_gib} GiB synthetic checkpoint")
            data["stream"] = stream(stream_gib, workdir, env, args.keep)
        data["probe"]["end"] = contention_probe()
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    data["loadavg_end"] = loadavg()
    data["total_seconds"] = time.perf_counter() - started
    data["summary"] = summarize(data)
    data["findings"] = findings(data)
    json_path = args.out.parent / (args.out.name + ".json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    write_markdown(md_path, data, json_path.name)
    log(f"wrote {json_path} and {md_path}")
    for c, f, ok in data["summary"]:
        print(f"  {ok:>8}  {c}: {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
