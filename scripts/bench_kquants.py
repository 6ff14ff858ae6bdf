"""Speed and exactness of our llama.cpp quantizers against llama.cpp's own C reference, side by side.

For each GGML type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K), on one float32 [rows, cols] matrix
of Gaussian weights (std 0.02):

- ``ours``: ``compress.quant.ggml.quantize_ggml`` (torch, ``--threads`` intra-op threads);
- ``llama.cpp``: ``quantize_row_<type>_ref`` from the ``libggml-base.so`` that llama-cpp-python ships
  (what ``llama-quantize`` runs per row chunk without an importance matrix; single-threaded C), via ctypes;
- ``gguf-py``: ``gguf.quants.quantize`` (numpy), for the types it implements.

The contenders run interleaved in every round (the order rotates), so a busy shared machine slows them
alike; min and median of the rounds are reported, with the ratio of medians. Before timing, our bytes are
checked to equal llama.cpp's (the script fails otherwise). Also reported: bits per weight and the relative
Frobenius error of the dequantized matrix.

Writes ``<out>.json`` (raw numbers, machine) and ``<out>.md``.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_kquants.py          # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import ctypes
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from benchlib import REPO, log, machine_info, stats

TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k")
SIZES = {"q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24, "q8_0": 34, "q4_k": 144, "q5_k": 176, "q6_k": 210}


def ggml_base() -> ctypes.CDLL:
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    return ctypes.CDLL(str(next(lib_dir.glob("libggml-base.so*"))))


def reference(lib: ctypes.CDLL, qtype: str) -> Any:
    name = f"quantize_row_{qtype[:-2]}_K_ref" if qtype.endswith("_k") else f"quantize_row_{qtype}_ref"
    fn = getattr(lib, name)
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    block = 256 if qtype.endswith("_k") else 32

    def run(x: np.ndarray) -> np.ndarray:
        out = np.empty(x.size // block * SIZES[qtype], dtype=np.uint8)
        fn(x.ctypes.data, out.ctypes.data, x.size)
        return out

    return run


def bench(rows: int, cols: int, rounds: int, threads: int) -> dict[str, Any]:
    import gguf

    from compress.quant.ggml import GGMLConfig, quantize_ggml

    torch.set_num_threads(threads)
    lib = ggml_base()
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.02
    xn = np.ascontiguousarray(x.numpy())
    results: dict[str, Any] = {}
    for qtype in TYPES:
        ref = reference(lib, qtype)
        contenders = {"ours": lambda q=qtype: quantize_ggml(x, GGMLConfig(q)).packed(),
                      "llama.cpp": lambda r=ref: r(xn.reshape(-1))}
        gtype = gguf.GGMLQuantizationType[qtype.upper()]
        try:
            gguf.quants.quantize(xn[:1], gtype)
            contenders["gguf-py"] = lambda g=gtype: gguf.quants.quantize(xn, g)
        except NotImplementedError:
            pass
        q = quantize_ggml(x, GGMLConfig(qtype))
        ours_bytes = q.packed().numpy().reshape(-1)
        identical = bool(np.array_equal(ours_bytes, ref(xn.reshape(-1))))
        if not identical:
            raise SystemExit(f"{qtype}: our bytes differ from llama.cpp's quantize_row_*_ref")
        rel = float((q.dequantize(torch.float32) - x).norm() / x.norm())
        times: dict[str, list[float]] = {name: [] for name in contenders}
        names = list(contenders)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                start = time.perf_counter()
                contenders[name]()
                times[name].append(time.perf_counter() - start)
        per = {name: stats(v) for name, v in times.items()}
        results[qtype] = {"identical_to_llamacpp": identical, "rel_fro_error": rel,
                          "bits_per_weight": q.storage_bits() / x.numel(), "seconds": per,
                          "ours_over_llamacpp_median": per["ours"]["median"] / per["llama.cpp"]["median"]}
        log(f"{qtype}: ours {per['ours']['median']:.2f} s, llama.cpp {per['llama.cpp']['median']:.2f} s, "
            f"identical {identical}, rel error {rel:.4f}")
    return results


def render(d: dict[str, Any]) -> str:
    m = d["machine"]
    lines = [
        "# llama.cpp quantizers: ours against llama.cpp's C reference",
        "",
        f"Command: `{d['command']}`",
        "",
        f"Machine: {m['cpu_model']}, {m['usable_cores']} usable cores, torch {m['versions']['torch']}, "
        f"load at start {m['loadavg_start']}; {d['rows']}x{d['cols']} float32 Gaussian weights (std 0.02), "
        f"{d['rounds']} interleaved rounds, ours on {d['threads']} thread(s); llama.cpp's "
        "`quantize_row_*_ref` is single-threaded C (llama-quantize runs it on row chunks in parallel).",
        "",
        "| type | bits/weight | rel. error | bytes = llama.cpp | ours (median s) | llama.cpp C (median s) | "
        "gguf-py numpy (median s) | ours / llama.cpp |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for qtype, r in d["results"].items():
        s = r["seconds"]
        gg = f"{s['gguf-py']['median']:.2f}" if "gguf-py" in s else "not implemented"
        lines.append(f"| {qtype.upper()} | {r['bits_per_weight']:.4g} | {r['rel_fro_error']:.4f} | "
                     f"{'yes' if r['identical_to_llamacpp'] else 'NO'} | {s['ours']['median']:.2f} | "
                     f"{s['llama.cpp']['median']:.2f} | {gg} | {r['ours_over_llamacpp_median']:.2f}x |")
    lines += ["", "Min over rounds (s): " + "; ".join(
        f"{q.upper()} ours {r['seconds']['ours']['min']:.2f} / llama.cpp {r['seconds']['llama.cpp']['min']:.2f}"
        for q, r in d["results"].items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "bench_kquants")
    a = ap.parse_args(argv)
    d: dict[str, Any] = {"command": shlex.join(["python", "scripts/bench_kquants.py", *(argv or sys.argv[1:])]),
                         "rows": a.rows, "cols": a.cols, "rounds": a.rounds, "threads": a.threads,
                         "machine": machine_info(("gguf", "llama_cpp_python", "numpy"))}
    d["results"] = bench(a.rows, a.cols, a.rounds, a.threads)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(d, indent=1) + "\n")
    a.out.with_suffix(".md").write_text(render(d))
    log(f"wrote {a.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
