"""Benchmark the quantizers and the `compress quantize` pipeline (speed and peak memory).

Sections (each can be skipped with --skip):

1. ``micro``: one [size, size] matrix (fp32 and bf16), block 64: our NF4 (``quantize_nf4`` + packing
   to bitsandbytes' bytes) against ``bitsandbytes.functional.quantize_4bit``, with and without double
   quantization, and our INT4 (group 128, asym and sym). The contenders are interleaved in every
   round (the order rotates), so a noisy shared machine slows them alike; we report min and median.
   Before timing, the packed codes and the statistics are checked to be identical to bitsandbytes'
   (the script fails otherwise). Runs once per ``--threads`` setting.
2. ``stages``: what the pipeline does per tensor besides quantizing (finite check, dequantize,
   error metrics, packing), on the same matrix, for nf4 and int4.
3. ``e2e``: ``compress quantize`` of the SmolLM2-135M GGUF (nf4 and int4) in a subprocess (the
   ``compress`` console script): wall time and peak RSS (``wait4`` rusage), plus peaks of anonymous
   and file-backed RSS sampled from /proc. One extra instrumented run per method (light timers
   around the pipeline's functions, in a child process) tells where the time goes.
4. ``stream``: a synthetic sharded float32 checkpoint (default 4 GiB, 64 MiB tensors, 1 GiB shards;
   ``scripts/make_synthetic_checkpoint.py``) under ``--workdir``, quantized to nf4 and int4 with the
   console script, measuring peak RSS; then once more (nf4, instrumented) with the safetensors
   reader's ``get`` replaced -- in that child process only, the package is not modified -- by the
   memory-mapped reader the package used before commit f5c1b09 (``safe_open(...).get_tensor``
   with the handles kept open), to show what mapped file pages do to RSS. Everything written
   under the work folder is deleted afterwards.

Peak RSS is measured by ``benchlib.run_measured``: a tiny launcher process forks the measured command
and reads its ``wait4`` rusage (see benchlib for why this process must not be the parent).

Writes ``<out>.json`` (all raw numbers, machine info) and ``<out>.md`` (tables + the command).

    python scripts/bench_quantize.py                            # full run, ~10-15 min on 2 cores
    python scripts/bench_quantize.py --quick --out /tmp/bench   # smaller, a few minutes
"""

from __future__ import annotations

import argparse
import functools
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
from benchlib import compress_exe, dir_bytes, loadavg, read_proc_status, run_measured, smollm2_gguf, stats

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

STAGES = ("isfinite", "quantize", "dequantize", "compare", "pack")


def stages(size: int, rounds: int, threads: int) -> dict[str, Any]:
    """The work ``pipeline.run.execute`` does per quantized tensor, timed step by step."""
    import torch

    torch.set_num_threads(threads)
    from compress.formats import FORMATS
    from compress.metrics import compare
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
            bool(torch.isfinite(W).all())
            t1 = time.perf_counter()
            qt = m.quantize(W, cfg)
            t2 = time.perf_counter()
            deq = qt.dequantize(torch.float32)
            t3 = time.perf_counter()
            compare(W.float(), deq)
            t4 = time.perf_counter()
            f.pack("model.layers.0.mlp.up_proj.weight", qt)
            t5 = time.perf_counter()
            for k, a, b in zip(STAGES, (t0, t1, t2, t3, t4), (t1, t2, t3, t4, t5), strict=True):
                times[k].append(b - a)
            del qt, deq
        per = {k: stats(v) for k, v in times.items()}
        total_med = sum(v["median"] for v in per.values())
        out["methods"][method] = {"format": fmt, "times": per, "sum_of_medians": total_med,
                                  "pipeline_over_quantize": total_med / per["quantize"]["median"]}
    return out


# --- subprocess measurement ----------------------------------------------------------------------


def instrumented_cmd(json_out: Path, cli_args: list[str], *, mmap_reader: bool) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_instrumented", str(json_out)]
    if mmap_reader:
        cmd.append("--_mmap")
    return [*cmd, "--", *cli_args]


# --- instrumented child (runs the `compress` CLI in-process with timers) --------------------------

STAGE_LABELS = {
    "imports": "import compress.cli (torch, click, rich, ...)",
    "cli": "`compress quantize` itself (in-process)",
    "open_model": "  open the checkpoint (open_model)",
    "scan_gguf": "    GGUF: our header scan (scan_gguf)",
    "gguf_package": "    GGUF: gguf.GGUFReader parse (open_gguf_package)",
    "plan": "  plan (make_plan)",
    "execute": "  per-tensor loop (execute)",
    "read": "    read a tensor (reader.get)",
    "isfinite": "    finite check (torch.isfinite)",
    "quantize": "    quantize",
    "dequantize": "    dequantize, for the error metrics",
    "compare": "    error metrics (metrics.compare)",
    "pack": "    pack to the output layout (format.pack)",
    "write": "    write tensors (ShardedWriter.write)",
    "sidecar": "  sidecar files (write_sidecar_files)",
    "tokenizer": "    GGUF: tokenizer via transformers (_tokenizer_files)",
    "startup": "interpreter start + exit (wall - imports - command)",
}


def instrumented_main(json_out: Path, cli_args: list[str], mmap_reader: bool) -> int:
    t_start = time.perf_counter()
    import dataclasses

    import torch

    import compress.cli as cli
    import compress.formats.checkpoint as ckpt
    import compress.formats.gguf_reader as gr
    import compress.pipeline.quantize as run
    from compress.formats.bnb import BnbFormat
    from compress.formats.gptq import GptqFormat
    from compress.formats.writer import ShardedWriter
    from compress.quant import METHODS
    from compress.quant.int4 import Int4Tensor
    from compress.quant.nf4 import NF4Tensor

    t_imported = time.perf_counter()
    timers: dict[str, list[float]] = {}
    rss_after_writes: list[dict[str, int]] = []

    def timed(fn: Callable[..., Any], key: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                slot = timers.setdefault(key, [0.0, 0])
                slot[0] += time.perf_counter() - t
                slot[1] += 1

        return wrapper

    def wrap(owner: Any, attr: str, key: str) -> None:
        setattr(owner, attr, timed(getattr(owner, attr), key))

    if mmap_reader:
        from safetensors import safe_open

        handles: dict[Path, Any] = {}

        def mmap_get(self: Any, name: str) -> torch.Tensor:
            """The reader before commit f5c1b09: a copy out of safe_open's memory map, handle kept open."""
            file = self._file_of[name]
            if file not in handles:
                handles[file] = safe_open(str(file), framework="pt")
            return handles[file].get_tensor(name)

        ckpt.SafetensorsReader.get = mmap_get

    wrap(run, "open_model", "open_model")
    wrap(gr, "scan_gguf", "scan_gguf")
    wrap(gr, "open_gguf_package", "gguf_package")
    wrap(run, "make_plan", "plan")
    wrap(run, "execute", "execute")
    wrap(gr.GGUFReader, "get", "read")
    wrap(ckpt.SafetensorsReader, "get", "read")
    wrap(torch, "isfinite", "isfinite")
    for name, m in list(METHODS.items()):
        METHODS[name] = dataclasses.replace(m, quantize=timed(m.quantize, "quantize"))
    wrap(NF4Tensor, "dequantize", "dequantize")
    wrap(Int4Tensor, "dequantize", "dequantize")
    wrap(run, "compare", "compare")
    wrap(BnbFormat, "pack", "pack")
    wrap(GptqFormat, "pack", "pack")
    wrap(ShardedWriter, "write", "write")
    wrap(run, "write_quantized_files", "sidecar")
    wrap(gr, "_tokenizer_files", "tokenizer")

    timed_write = ShardedWriter.write

    def write_and_sample(self: Any, name: str, tensor: Any) -> None:
        timed_write(self, name, tensor)
        rss_after_writes.append(read_proc_status())  # RSS after each output tensor (outside the timer)

    ShardedWriter.write = write_and_sample

    t_cli = time.perf_counter()
    rc = cli.main(cli_args)
    t_end = time.perf_counter()
    step = max(1, len(rss_after_writes) // 40)
    json_out.write_text(json.dumps({
        "rc": rc, "mmap_reader": mmap_reader, "imports_s": t_imported - t_start, "cli_s": t_end - t_cli,
        "timers": {k: {"seconds": v[0], "calls": v[1]} for k, v in timers.items()},
        "final_status": read_proc_status(), "rss_after_writes": rss_after_writes[::step],
    }, indent=1))
    return rc


def breakdown(child: dict[str, Any], wall: float) -> dict[str, Any]:
    seconds = {"imports": child["imports_s"], "cli": child["cli_s"]}
    seconds.update({k: v["seconds"] for k, v in child["timers"].items()})
    seconds["startup"] = wall - child["imports_s"] - child["cli_s"]
    return {"wall_s": wall, "seconds": seconds, "calls": {k: v["calls"] for k, v in child["timers"].items()}}


# --- 3. end-to-end GGUF --------------------------------------------------------------------------


def e2e_gguf(rounds: int, instrument: bool, workdir: Path, env: dict[str, str],
             one_thread: bool) -> dict[str, Any]:
    """Each round runs every variant once (rotating order). With ``one_thread`` an extra nf4 variant
    runs with OMP_NUM_THREADS=1 (torch then uses one thread), to show the cost of thread contention."""
    gguf = smollm2_gguf()
    variants: dict[str, tuple[str, dict[str, str]]] = {"nf4": ("nf4", {}), "int4": ("int4", {})}
    if one_thread:
        variants["nf4, OMP_NUM_THREADS=1"] = ("nf4", {"OMP_NUM_THREADS": "1"})
    names = list(variants)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in names}
    for r in range(rounds):
        shift = r % len(names)
        for i, name in enumerate(names[shift:] + names[:shift]):
            method, extra_env = variants[name]
            out = workdir / f"gguf-{i}"
            res = run_measured([compress_exe(), "quantize", str(gguf), "-o", str(out), "--method", method, "-q",
                                "--force"], env={**env, **extra_env}, log_dir=workdir / "logs",
                               tag=f"gguf-{names.index(name)}-{r}")
            res["output_bytes"] = dir_bytes(out)
            res["extra_env"] = extra_env
            shutil.rmtree(out)
            runs[name].append(res)
    result: dict[str, Any] = {"input": str(gguf), "input_bytes": gguf.stat().st_size, "rounds": rounds,
                              "methods": {}}
    for name in names:
        rs = runs[name]
        result["methods"][name] = {
            "wall_s": stats([x["wall_s"] for x in rs]),
            "user_s": stats([x["user_s"] for x in rs]),
            "max_rss_bytes": stats([x["max_rss_bytes"] for x in rs]),
            "output_bytes": rs[0]["output_bytes"], "runs": rs,
        }
    if instrument:  # nf4 only: int4 differs only in the quantize and pack rows
        out = workdir / "gguf-nf4-instr"
        js = workdir / "gguf-nf4-instr.json"
        cmd = instrumented_cmd(js, ["quantize", str(gguf), "-o", str(out), "--method", "nf4", "-q", "--force"],
                               mmap_reader=False)
        res = run_measured(cmd, env=env, log_dir=workdir / "logs", tag="gguf-nf4-instr")
        shutil.rmtree(out)
        bd = breakdown(json.loads(js.read_text()), res["wall_s"])
        bd["max_rss_bytes"] = res["max_rss_bytes"]
        result["methods"]["nf4"]["breakdown"] = bd
    return result


# --- 4. streaming a large synthetic checkpoint ---------------------------------------------------


def stream(gib: int, workdir: Path, env: dict[str, str], instrument: bool, keep: bool) -> dict[str, Any]:
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
            shutil.rmtree(out)
            result["runs"][method] = res
        if instrument:
            out = workdir / "synthetic-nf4-mmap"
            js = workdir / "stream-nf4-mmap.json"
            cmd = instrumented_cmd(js, ["quantize", str(ckpt_dir), "-o", str(out), "--method", "nf4", "-q",
                                        "--force"], mmap_reader=True)
            res = run_measured(cmd, env=env, log_dir=workdir / "logs", tag="stream-nf4-mmap")
            res["output_bytes"] = dir_bytes(out)
            res["below_limit"] = res["max_rss_bytes"] < RSS_LIMIT_BYTES
            shutil.rmtree(out)
            child = json.loads(js.read_text())
            res["breakdown"] = breakdown(child, res["wall_s"])
            res["rss_after_writes"] = child["rss_after_writes"]
            result["runs"]["nf4, memory-mapped reader as before f5c1b09 (experiment)"] = res
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
        L += ["What `pipeline.run.execute` does for every quantized tensor besides reading and writing it.", ""]
        L += ["| threads | method | finite check | quantize | dequantize | compare | pack | sum | sum / quantize |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for s in all_stages:
            for meth, v in s["methods"].items():
                tt = v["times"]
                L.append(f"| {s['threads']} | {meth} | " + " | ".join(f"{tt[k]['median']:.3f}" for k in STAGES)
                         + f" | {v['sum_of_medians']:.3f} | {v['pipeline_over_quantize']:.1f}x |")
        L.append("")

    if "e2e" in data:
        e = data["e2e"]
        L += [f"## 3. End to end: `compress quantize` of SmolLM2-135M-Instruct Q4_1 GGUF "
              f"({mib(e['input_bytes'])}), {e['rounds']} round(s) per method", ""]
        L += ["`compress quantize MODEL.gguf -o OUT --method M -q --force`, the console script in a subprocess "
              "forked by a small launcher; peak RSS is its `wait4` rusage (`ru_maxrss`). Rounds are interleaved; "
              "the `OMP_NUM_THREADS=1` row is the same nf4 command with torch limited to one thread.", ""]
        L += ["| method | wall s (min) | wall s (median) | CPU user s (median) | peak RSS (max over runs) | output |",
              "|---|---:|---:|---:|---:|---:|"]
        for meth, v in e["methods"].items():
            user = f"{v['user_s']['median']:.1f}" if "user_s" in v else ""
            L.append(f"| {meth} | {v['wall_s']['min']:.1f} | {v['wall_s']['median']:.1f} | {user} | "
                     f"{mib(v['max_rss_bytes']['max'])} | {mib(v['output_bytes'])} |")
        L.append("")
        bds = {k: v["breakdown"] for k, v in e["methods"].items() if "breakdown" in v}
        if bds:
            L += _breakdown_table("Where the time goes: one instrumented run (nf4; int4 differs only in the "
                                  "quantize and pack rows), timers around the pipeline's functions, seconds; "
                                  "indented rows are part of the row above", bds)

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
              "/proc/PID/status. The experiment row runs the same nf4 command in a child that swaps in the "
              "previous memory-mapped safetensors reader (nothing in the package is modified).", ""]
        L += ["| run | wall s | peak RSS (rusage) | peak anonymous | peak file-backed | output | < 1.5 GiB |",
              "|---|---:|---:|---:|---:|---:|---|"]
        for name, v in st["runs"].items():
            p = v["sampled_peak_bytes"]
            L.append(f"| {name} | {v['wall_s']:.0f} | {mib(v['max_rss_bytes'])} | {mib(p['RssAnon'])} | "
                     f"{mib(p['RssFile'])} | {mib(v['output_bytes'])} | {'yes' if v['below_limit'] else 'NO'} |")
        L.append("")
        bds = {k: v["breakdown"] for k, v in st["runs"].items() if "breakdown" in v}
        if bds:
            L += _breakdown_table("Where the time goes (the instrumented experiment run; only the read row "
                                  "depends on the reader)", bds)

    if data.get("findings"):
        L += ["## Automatic observations", ""]
        L += [f"- {f}" for f in data["findings"]]
        L.append("")
    path.write_text("\n".join(L))


def _breakdown_table(title: str, bds: dict[str, dict[str, Any]]) -> list[str]:
    names = list(bds)
    keys = [k for k in STAGE_LABELS if any(k in b["seconds"] for b in bds.values())]
    out = [title + ":", "", "| stage | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    out.append("| wall (measured outside) | " + " | ".join(f"{bds[n]['wall_s']:.1f}" for n in names) + " |")
    for key in keys:
        label = STAGE_LABELS[key]
        indent = len(label) - len(label.lstrip(" "))
        label = "&nbsp;" * (2 * indent) + label.strip()
        cells = []
        for n in names:
            v = bds[n]["seconds"].get(key)
            calls = bds[n]["calls"].get(key)
            cells.append("" if v is None else f"{v:.2f}" + (f" ({calls} calls)" if calls and calls > 1 else ""))
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return [*out, ""]


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
            if "experiment" in name:
                continue
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
            b = v.get("breakdown")
            if b:
                s = b["seconds"]
                q = s.get("quantize", 0.0)
                out.append(f"GGUF → {meth}: quantize itself {q:.2f} s of {b['wall_s']:.1f} s wall "
                           f"({100 * q / b['wall_s']:.0f}%); tokenizer {s.get('tokenizer', 0):.1f} s, "
                           f"open {s.get('open_model', 0):.1f} s, imports {s.get('imports', 0):.1f} s, "
                           f"GGUF tensor reads (dequantize Q4_1) {s.get('read', 0):.1f} s, error metrics "
                           f"{s.get('dequantize', 0) + s.get('compare', 0):.1f} s.")
    return out


# --- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smaller run: 2048² matrix, 3 rounds, default threads only, 1 GiB stream, 1 e2e round, "
                         "no instrumented runs")
    ap.add_argument("--rounds", type=int, help="micro-benchmark rounds (default 7; quick 3)")
    ap.add_argument("--size", type=int, help="matrix side (default 4096; quick 2048)")
    ap.add_argument("--threads", help="comma-separated torch thread counts for the micro-benchmark and stages "
                                      "(default: torch's default, then 1)")
    ap.add_argument("--e2e-rounds", type=int, help="end-to-end GGUF rounds per method (default 2; quick 1)")
    ap.add_argument("--stream-gib", type=int, help="synthetic checkpoint size in GiB (default 4; quick 1)")
    ap.add_argument("--no-instrument", action="store_true", help="skip the instrumented (breakdown) runs")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: micro,stages,e2e,stream")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp"), help="where scratch files go (deleted after)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (synthetic checkpoint, logs)")
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "bench_quantize",
                    help="output prefix: writes OUT.json and OUT.md (default reports/bench_quantize)")
    ap.add_argument("--render", type=Path, metavar="JSON",
                    help="only rewrite OUT.md from an existing results JSON (no measurement)")
    ap.add_argument("--_instrumented", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--_mmap", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("cli_args", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._instrumented is not None:
        return instrumented_main(args._instrumented, args.cli_args, args._mmap)
    if args.cli_args:
        ap.error(f"unexpected arguments: {args.cli_args}")
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
    instrument = not (quick or args.no_instrument)
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
                                         "stream_gib": stream_gib, "instrument": instrument, "skip": sorted(skip)}}

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
            log(f"e2e GGUF: {e2e_rounds} round(s) x nf4/int4" + (" + instrumented runs" if instrument else ""))
            data["e2e"] = e2e_gguf(e2e_rounds, instrument, workdir, env, one_thread=not quick)
        if "stream" not in skip:
            log(f"stream: {stream_gib} GiB synthetic checkpoint")
            data["stream"] = stream(stream_gib, workdir, env, instrument, args.keep)
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
