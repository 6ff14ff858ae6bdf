"""GPU throughput of the quantizers and of the extraction SVD, on Llama-2 7B-shaped tensors, against bitsandbytes'
CUDA ``quantize_4bit`` and against the device's memory-bandwidth limit.

What a task does on the GPU (``--device cuda``): the weight goes to the device, is quantized and measured there,
packed, and its bytes come back to the CPU once. Timed here per tensor shape, CUDA-synchronised, the median of
``--reps`` runs after warm-up:

- ``nf4``, ``int4`` (group 128, asymmetric) and ``q4_k``: the quantizer alone, then the whole task (quantize +
  error metrics + the bytes to the CPU);
- ``bnb_nf4``: bitsandbytes' CUDA ``quantize_4bit(W, blocksize=64, quant_type='nf4')`` on the same tensor, with
  its codes and absmax checked equal to ours;
- ``svd_r64``: the rank-64 factorisation extract-lora does (randomized SVD) of a 11008 x 4096 delta, and the
  exact SVD for scale;
- the bandwidth limit: the least traffic a quantizer needs (read W, write the codes and scales) at the measured
  device-to-device copy bandwidth, against which each time is given as a fraction.

On a CPU (``--device cpu --small``) the same code runs on small shapes: the check to make before a GPU run.

    python scripts/bench_gpu.py --device cuda [--reps 10]          # writes reports/bench_gpu.{md,json}
    python scripts/bench_gpu.py --device cpu --small --report /tmp/bench_gpu_check

On the lent GPU machines (no network; torch is installed, bitsandbytes is not) carry the bitsandbytes wheel:
``pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_24_x86_64 -d .whl
bitsandbytes==0.50.2`` here, then there ``pip install --no-deps --target /tmp/site .whl/*.whl`` and
``PYTHONPATH=/tmp/site:. python3 scripts/bench_gpu.py``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPES = {"attn 4096x4096": (4096, 4096), "mlp up 11008x4096": (11008, 4096), "mlp down 4096x11008": (4096, 11008)}
SMALL_SHAPES = {"512x512": (512, 512), "1024x512": (1024, 512)}
# Bytes a quantizer must move per weight at the least: read the bf16 weight, write the packed codes and scales.
MIN_TRAFFIC = {"nf4": 2 + 0.5 + 4 / 64, "int4": 2 + 0.5 + 2.5 / 128, "q4_k": 2 + 144 / 256, "bnb_nf4": 2 + 0.5 + 4 / 64}


def timer(device: torch.device, fn: Callable[[], Any], reps: int) -> tuple[float, Any]:
    """Median seconds of ``fn()`` over ``reps`` runs after two warm-ups, synchronised; and the last result."""
    out = None
    for _ in range(2):
        out = fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def copy_bandwidth(device: torch.device, reps: int) -> float:
    """Bytes per second of a device-to-device copy of 1 GiB (counting bytes read and written)."""
    n = (1 << 30) // 4 if device.type == "cuda" else (1 << 26) // 4
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds, _ = timer(device, lambda: dst.copy_(src), reps)
    return 2 * src.numel() * 4 / seconds


def quantize_task(W: torch.Tensor, method: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(the quantizer alone, the whole task: quantize + metrics + bytes to the CPU)."""
    from compress.formats import FORMATS
    from compress.quant import METHODS, make_config
    from compress.quant.kquants import quantize_kquant

    if method == "q4_k":
        def quant() -> Any:
            return quantize_kquant(W, "q4_k")

        def task() -> Any:
            q = quant()
            return q.error_against(W), q.packed().to("cpu")
        return quant, task
    config = make_config(method)
    layout = FORMATS["bnb" if method == "nf4" else "gptq"]

    def quant() -> Any:
        return METHODS[method].quantize(W, config)

    def task() -> Any:
        q = quant()
        return q.error_against(W), {k: v.to("cpu") for k, v in layout.pack("m.weight", q.to("cpu")).items()}
    return quant, task


def bnb_check(W: torch.Tensor) -> tuple[Callable[[], Any] | None, str]:
    """bitsandbytes' quantize_4bit on ``W``, and whether its codes and absmax equal ours."""
    try:
        import bitsandbytes.functional as F
    except ImportError as e:
        return None, f"bitsandbytes not importable ({e})"
    from compress.formats.bnb import pack_nibbles
    from compress.quant.nf4 import NF4Config, quantize_nf4, zero_code

    def run() -> Any:
        return F.quantize_4bit(W, blocksize=64, quant_type="nf4")

    packed, state = run()
    ours = quantize_nf4(W, NF4Config(block_size=64))
    same = (torch.equal(packed.reshape(-1).cpu(), pack_nibbles(ours.codes, zero_code("nf4")).reshape(-1).cpu())
            and torch.equal(state.absmax.float().cpu(), ours.absmax.float().cpu()))
    return run, "identical codes and absmax" if same else "codes or absmax DIFFER"


def measure(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    shapes = SMALL_SHAPES if args.small else SHAPES
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    bandwidth = copy_bandwidth(device, args.reps)
    results: list[dict[str, Any]] = []

    def record(shape_name: str, what: str, params: int, fn: Callable[[], Any] | None, note: str = "") -> None:
        row: dict[str, Any] = {"shape": shape_name, "what": what, "params": params, "note": note}
        if fn is not None:
            try:
                seconds, _ = timer(device, fn, args.reps)
                row.update(seconds=seconds, params_per_s=params / seconds)
                method = what.split(" ")[0]
                if method in MIN_TRAFFIC:
                    row["bandwidth_bound_s"] = params * MIN_TRAFFIC[method] / bandwidth
                    row["fraction_of_bandwidth_limit"] = row["bandwidth_bound_s"] / seconds
            except Exception as e:  # one failing measurement must not lose the others of a short GPU run
                row["error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
        results.append(row)
        print(json.dumps(row), flush=True)

    for shape_name, (rows, cols) in shapes.items():
        W = (torch.randn(rows, cols, generator=gen) * 0.02).to(dtype).to(device)
        for method in ("nf4", "int4", "q4_k"):
            quant, task = quantize_task(W, method)
            record(shape_name, f"{method} quantize", W.numel(), quant)
            record(shape_name, f"{method} task (quantize + metrics + bytes to CPU)", W.numel(), task)
        fn, note = bnb_check(W)
        record(shape_name, "bnb_nf4 quantize_4bit", W.numel(), fn, note)
        del W
    from compress.lowrank.svd import RankRule, low_rank

    rows, cols = (11008, 4096) if not args.small else (1024, 512)
    A = torch.randn(rows, 32, generator=gen) @ torch.randn(32, cols, generator=gen) * 1e-3
    delta = (A + torch.randn(rows, cols, generator=gen) * 1e-4).to(device)
    record(f"{rows}x{cols}", "svd_r64 randomized (extract-lora)", delta.numel(),
           lambda: low_rank(delta, RankRule(rank=64), engine="randomized"))
    record(f"{rows}x{cols}", "svd exact (for scale)", delta.numel(),
           lambda: torch.linalg.svd(delta, full_matrices=False))
    return {"device": device_name(device), "dtype": args.dtype, "copy_bandwidth_bytes_per_s": bandwidth,
            "reps": args.reps, "results": results}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def markdown(data: dict[str, Any]) -> str:
    lines = ["# GPU: quantizers and the extraction SVD on 7B-shaped tensors", "",
             f"Produced by `{data['command']}` on {data['date']}; raw numbers in `bench_gpu.json`.", "",
             f"Device: {data['device']}; torch {data['torch']}; weights in {data['dtype']}; median of {data['reps']} "
             f"CUDA-synchronised runs after two warm-ups. Device-to-device copy: "
             f"{data['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s (bytes read + written), the limit each time is "
             "compared with: the least traffic a quantizer needs (read the 16-bit weight, write codes and "
             "scales).", "",
             "| shape | what | time ms | G params/s | bandwidth-bound ms | fraction of the limit | note |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in data["results"]:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['what']} | - | - | - | - | error: {r['error']} |")
            continue
        if "seconds" not in r:
            lines.append(f"| {r['shape']} | {r['what']} | - | - | - | - | {r['note']} |")
            continue
        bound = f"{r['bandwidth_bound_s'] * 1e3:.3f}" if "bandwidth_bound_s" in r else "-"
        frac = f"{r['fraction_of_bandwidth_limit']:.0%}" if "fraction_of_bandwidth_limit" in r else "-"
        lines.append(f"| {r['shape']} | {r['what']} | {r['seconds'] * 1e3:.3f} | {r['params_per_s'] / 1e9:.2f} | "
                     f"{bound} | {frac} | {r['note']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--small", action="store_true", help="small shapes: the CPU check of this script")
    parser.add_argument("--report", type=Path, default=REPO / "reports" / "bench_gpu")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; run with --device cpu --small to check the script", file=sys.stderr)
        return 2
    data = measure(args)
    data.update(command="python scripts/bench_gpu.py " + shlex.join(sys.argv[1:]), torch=torch.__version__,
                date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    args.report.with_suffix(".md").write_text(markdown(data))
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
