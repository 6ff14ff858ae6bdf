"""Benchmark `compress extract-lora` (speed, accuracy and peak memory) against exact SVD and
`mergekit-extract-lora`.

Sections (each can be skipped with --skip):

1. ``svd``: truncated SVD of realistic weight deltas at ranks 16 and 64 -- [2048, 2048]: a power-law
   spectrum plus noise, an exponential spectrum plus noise, a fine-tune-like delta made by a few Adam
   steps on a linear layer; [4096, 4096]: power-law and Adam; optionally a few deltas of a real
   base / full fine-tune pair (``--real-pair``): ``compress.lowrank.svd.svd_randomized`` (defaults:
   oversample 8, n_iter 2) and ``low_rank(..., engine="auto")`` against exact float32
   ``torch.linalg.svd``. The contenders are interleaved in every round (the order rotates) and we
   report min and median. Error: ||M - U_r S_r V_r^T||_F against the Eckart-Young optimum
   sqrt(sum of the dropped s_i^2) from the exact SVD of the same matrix. Plus a small interleaved
   comparison of 1 thread against the default thread count (the machine is shared).
2. ``e2e``: a base/tuned Llama pair (hidden 1024, intermediate 2816, 4 layers, vocab 8192, float32,
   ``save_pretrained``; TUNED = BASE + a full-rank perturbation with a decaying spectrum on every
   Linear of the blocks). ``mergekit-extract-lora`` (run from a separate venv, ``--mergekit-venv``)
   and ``compress extract-lora`` (``--svd auto`` every round; ``--svd exact`` and ``--svd auto`` with
   OMP_NUM_THREADS=1 once) at the same max rank, in subprocesses, interleaved: wall time, peak RSS
   (the command's own ``wait4`` rusage, through a small launcher) plus sampled peaks of anonymous /
   file-backed RSS, and the reconstruction error of each adapter, read from its files:
   ||dW - scaling * B @ A||_F / ||dW||_F per module (scaling = alpha / r, honouring rank_pattern /
   alpha_pattern / use_rslora as PEFT does), and the total over all modules.
3. ``memory``: ``compress extract-lora`` on a pair twice as large (8 layers; mergekit too with
   ``--memory-mergekit``): its peak RSS should not double.

Writes ``<out>.json`` (raw numbers, machine info, versions, commands) and ``<out>.md`` (tables + the
command). Scratch checkpoints live under ``--workdir`` and are deleted afterwards.

    python scripts/bench_extract_lora.py                                # full run, ~10-20 min on 2 busy cores
    python scripts/bench_extract_lora.py --quick --out /tmp/bench_el   # smaller, a few minutes
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchlib
from benchlib import compress_exe, loadavg, log, run_measured, stats

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
SVD_SPEEDUP_TARGET = 10.0
SVD_ERROR_TARGET = 1.02  # randomized error within 2% of the optimal rank-r error
E2E_SPEEDUP_TARGET = 3.0
# Default threads (2 here) and OMP_NUM_THREADS=1 for both tools; --svd exact once, at 1 thread (at 2 threads on
# the busy shared machine it took 2-4 minutes a run, see the notes in the report).
E2E_CONTENDERS = ["mergekit", "compress_auto", "mergekit_1thread", "compress_auto_1thread", "compress_exact_1thread"]
E2E_ERROR_TOL = 1e-3  # "equal" total error: within 0.1% (relative) of mergekit's exact-SVD error


# --- helpers -------------------------------------------------------------------------------------


def machine_info(mergekit_python: str | None) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if mergekit_python:
        code = ("import importlib.metadata as m, json; print(json.dumps({d: m.version(d) for d in "
                "('mergekit', 'torch', 'transformers', 'safetensors')}))")
        try:
            res = subprocess.run([mergekit_python, "-c", code], capture_output=True, text=True, check=True)
            extra["mergekit_venv"] = json.loads(res.stdout)
        except (OSError, subprocess.CalledProcessError, json.JSONDecodeError) as e:
            extra["mergekit_venv"] = f"unavailable: {e}"
    return benchlib.machine_info(("compress", "safetensors", "transformers", "peft", "numpy"), extra)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    t0 = time.perf_counter()
    res = fn()
    return time.perf_counter() - t0, res


def single_threaded(fn: Callable[[], Any]) -> Any:
    """Run an unmeasured build step on one thread: on a shared 2-core machine, LAPACK (QR) with 2
    OpenMP threads can be many times slower than with one while other jobs hold a core."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(saved)


# --- 1. SVD engines on realistic deltas ----------------------------------------------------------


def random_orthonormal(n: int, k: int, gen: Any) -> Any:
    import torch

    Q, _ = torch.linalg.qr(torch.randn(n, k, generator=gen))
    return Q


def structured_delta(n: int, kind: str, seed: int) -> Any:
    """[n, n] float32: U diag(s) V^T over n/4 directions (power law i^-0.5 or exp(-i/16)), scaled to
    Frobenius norm 1, plus Gaussian noise of Frobenius norm ``noise`` (a full-rank floor)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    k = n // 4
    i = torch.arange(1, k + 1, dtype=torch.float32)
    if kind == "power":
        s, noise = i ** -0.5, 0.15
    else:
        s, noise = torch.exp(-i / 16), 0.05
    s = s / s.norm()
    U, V = random_orthonormal(n, k, gen), random_orthonormal(n, k, gen)
    M = (U * s) @ V.T
    N = torch.randn(n, n, generator=gen)
    return M + N * (noise / float(N.norm()))


def adam_finetune_delta(n: int, seed: int, steps: int = 12, batch: int = 256) -> Any:
    """A fine-tune-like delta: W0 [n, n] trained for 12 Adam steps (lr 2e-4, batch 256) towards a teacher that
    differs by a rank-8 shift plus 2% full-rank noise, on anisotropic inputs (feature scales j^-0.5,
    rotated). Adam's per-coordinate normalisation makes the update far from low rank, as in real
    full fine-tunes."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    W0 = torch.randn(n, n, generator=gen) / math.sqrt(n)
    shift = (torch.randn(n, 8, generator=gen) @ torch.randn(8, n, generator=gen))
    shift *= 0.05 * float(W0.norm()) / float(shift.norm())
    full = torch.randn(n, n, generator=gen)
    full *= 0.02 * float(W0.norm()) / float(full.norm())
    teacher = W0 + shift + full
    R = random_orthonormal(n, n // 4, gen)  # inputs live mostly in a random n/4-dim subspace
    scales = torch.arange(1, n // 4 + 1, dtype=torch.float32) ** -0.5
    W = torch.nn.Parameter(W0.clone())
    opt = torch.optim.Adam([W], lr=2e-4)
    for _ in range(steps):
        Z = torch.randn(batch, n // 4, generator=gen) * scales
        X = Z @ R.T + 0.05 * torch.randn(batch, n, generator=gen)
        loss = ((X @ W.T - X @ teacher.T) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (W.detach() - W0).contiguous()


def real_deltas(spec: str | None, names: list[str]) -> list[tuple[str, str, Any]]:
    """(shape label, kind, dW) for a few weights of a real base/fine-tuned pair ("BASE:TUNED" folders with
    model.safetensors); [] when not given or unreadable. Copied into memory at once."""
    if not spec:
        return []
    from safetensors import safe_open

    base, tuned = (Path(p) for p in spec.split(":", 1))
    out = []
    try:
        with safe_open(str(base / "model.safetensors"), framework="pt") as hb, \
                safe_open(str(tuned / "model.safetensors"), framework="pt") as ht:
            for name in names:
                dW = (ht.get_tensor(name).float() - hb.get_tensor(name).float()).contiguous()
                out.append(("x".join(map(str, dW.shape)), "real:" + name.removeprefix("model."), dW))
    except (OSError, KeyError, ValueError) as e:
        log(f"svd: real pair {spec} unusable: {e}")
        return []
    return out


def section_svd(kinds: dict[int, list[str]], ranks: list[int], rounds: int, exact_rounds: dict[int, int],
                real: list[tuple[str, str, Any]], real_exact_rounds: int) -> dict[str, Any]:
    import torch

    from compress.lowrank.svd import RankRule, low_rank, svd_randomized

    results: list[dict[str, Any]] = []
    cases: list[tuple[str, str, Callable[[], Any], int]] = []
    for n, size_kinds in kinds.items():
        for kind in size_kinds:
            cases.append((f"{n}x{n}", kind, lambda n=n, kind=kind: adam_finetune_delta(n, seed=n) if kind == "adam"
                          else structured_delta(n, kind, seed=n), exact_rounds.get(n, rounds)))
    for label, kind, dW in real:
        cases.append((label, kind, lambda dW=dW: dW, real_exact_rounds))
    for label, kind, build, n_exact in cases:
        log(f"svd: building {kind} [{label}]")
        t_build, M = timed(lambda build=build: single_threaded(build))
        contenders: dict[str, Callable[[], Any]] = {"exact": lambda M=M: torch.linalg.svd(M, full_matrices=False)}
        for r in ranks:
            contenders[f"randomized_r{r}"] = lambda M=M, r=r: svd_randomized(M, r)
            contenders[f"randomized_8_2_r{r}"] = lambda M=M, r=r: svd_randomized(M, r, oversample=8, n_iter=2)
            contenders[f"auto_r{r}"] = lambda M=M, r=r: low_rank(M, RankRule(rank=r), engine="auto")
        times: dict[str, list[float]] = {k: [] for k in contenders}
        outputs: dict[str, Any] = {}
        names = list(contenders)
        for rnd in range(rounds):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for name in order:
                if name == "exact" and rnd >= n_exact:
                    continue
                t, out = timed(contenders[name])
                times[name].append(t)
                outputs.setdefault(name, out)
            log(f"svd: {kind} [{label}] round {rnd + 1}/{rounds}: "
                + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items() if v))
        S = outputs["exact"][1].double()
        fro = float(torch.linalg.vector_norm(M, dtype=torch.float64))
        for r in ranks:
            optimal = float(S[r:].pow(2).sum().sqrt())
            Ur, Sr, Vhr = outputs[f"randomized_r{r}"]
            err_rand = float(torch.linalg.vector_norm(M - (Ur * Sr) @ Vhr, dtype=torch.float64))
            Ur, Sr, Vhr = outputs[f"randomized_8_2_r{r}"]
            err_82 = float(torch.linalg.vector_norm(M - (Ur * Sr) @ Vhr, dtype=torch.float64))
            lr = outputs[f"auto_r{r}"]
            err_auto = float(torch.linalg.vector_norm(M - lr.B @ lr.A, dtype=torch.float64))
            Ue, Se, Vhe = outputs["exact"]
            err_exact = float(torch.linalg.vector_norm(M - (Ue[:, :r] * Se[:r]) @ Vhe[:r], dtype=torch.float64))
            t_exact = stats(times["exact"])
            t_rand = stats(times[f"randomized_r{r}"])
            t_auto = stats(times[f"auto_r{r}"])
            t_82 = stats(times[f"randomized_8_2_r{r}"])
            results.append({
                "size": label, "kind": kind, "rank": r, "build_s": t_build,
                "fro_norm": fro, "optimal_error": optimal, "optimal_rel_error": optimal / fro,
                "retained_energy_optimal": 1 - (optimal / fro) ** 2,
                "exact_s": t_exact, "randomized_s": t_rand, "auto_s": t_auto, "auto_engine": lr.engine,
                "speedup_randomized_median": t_exact["median"] / t_rand["median"],
                "speedup_randomized_min": t_exact["min"] / t_rand["min"],
                "speedup_auto_median": t_exact["median"] / t_auto["median"],
                "speedup_auto_min": t_exact["min"] / t_auto["min"],
                "error_ratio_randomized": err_rand / optimal,
                "randomized_8_2_s": t_82, "speedup_8_2_min": t_exact["min"] / t_82["min"],
                "speedup_8_2_median": t_exact["median"] / t_82["median"], "error_ratio_8_2": err_82 / optimal,
                "error_ratio_auto": err_auto / optimal,
                "error_ratio_exact_truncated": err_exact / optimal,
            })
        del M, outputs
        gc.collect()
    sig = inspect.signature(svd_randomized).parameters
    return {"rows": results, "rounds": rounds, "exact_rounds": exact_rounds | {"real": real_exact_rounds},
            "randomized_defaults": {"oversample": sig["oversample"].default, "n_iter": sig["n_iter"].default},
            "threads": torch.get_num_threads(), "loadavg_after": loadavg()}


def section_threads(n: int, ranks: list[int], rounds: int) -> dict[str, Any]:
    """The same engines at 1 thread and at the default thread count, interleaved: on a shared 2-core
    machine, OpenMP/MKL with 2 threads can be much slower than with 1 while other jobs hold a core."""
    import torch

    from compress.lowrank.svd import svd_randomized

    M = single_threaded(lambda: structured_delta(n, "power", seed=n))
    default = torch.get_num_threads()
    contenders: dict[str, tuple[int, Callable[[], Any]]] = {}
    for th in sorted({default, 1}, reverse=True):
        contenders[f"exact@{th}"] = (th, lambda M=M: torch.linalg.svd(M, full_matrices=False))
        for r in ranks:
            contenders[f"randomized_r{r}@{th}"] = (th, lambda M=M, r=r: svd_randomized(M, r))
    times: dict[str, list[float]] = {k: [] for k in contenders}
    names = list(contenders)
    loads = []
    for rnd in range(rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for name in order:
            th, fn = contenders[name]
            torch.set_num_threads(th)
            try:
                times[name].append(timed(fn)[0])
            finally:
                torch.set_num_threads(default)
        loads.append(loadavg()[0])
        log(f"threads: round {rnd + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()))
    return {"size": n, "kind": "power", "rounds": rounds, "default_threads": default,
            "times": {k: stats(v) for k, v in times.items()}, "loadavg_1min_per_round": loads}


# --- 2./3. end to end ----------------------------------------------------------------------------


def build_pair(folder: Path, layers: int, seed: int, *, hidden: int = 1024, intermediate: int = 2816,
               vocab: int = 8192, delta_rel: float = 0.02) -> dict[str, Any]:
    """BASE: a random Llama saved with save_pretrained (float32). TUNED: BASE with every Linear of the
    blocks perturbed by U diag(s) V^T, s_i ~ i^-0.5 over all min(out, in) directions (full rank, not
    low rank), ||dW||_F = delta_rel * ||W||_F."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=16, vocab_size=vocab, tie_word_embeddings=False,
                      max_position_embeddings=2048, torch_dtype="float32")
    model = LlamaForCausalLM(cfg).float().eval()
    base, tuned = folder / "base", folder / "tuned"
    model.save_pretrained(base, safe_serialization=True)
    gen = torch.Generator().manual_seed(seed + 1)
    modules = 0
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                W = mod.weight
                out_f, in_f = W.shape
                k = min(out_f, in_f)
                U = random_orthonormal(out_f, k, gen)
                V = random_orthonormal(in_f, k, gen)
                s = torch.arange(1, k + 1, dtype=torch.float32) ** -0.5
                dW = (U * s) @ V.T
                dW *= delta_rel * float(W.norm()) / float(dW.norm())
                W.add_(dW)
                modules += 1
    model.save_pretrained(tuned, safe_serialization=True)
    size = sum(p.stat().st_size for p in base.rglob("*.safetensors"))
    del model
    gc.collect()
    return {"base": str(base), "tuned": str(tuned), "layers": layers, "hidden": hidden,
            "intermediate": intermediate, "vocab": vocab, "perturbed_modules": modules,
            "checkpoint_bytes": size, "delta_rel": delta_rel, "spectrum": "s_i ~ i^-0.5, full rank"}


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's get_pattern_key: the first key k with re.match(rf"(.*\\.)?({k})$", module)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def adapter_error(adapter: Path, base: Path, tuned: Path) -> dict[str, Any]:
    """Per-module ||dW - scaling * B @ A||_F / ||dW||_F of a PEFT LoRA adapter, read from its files."""
    import torch
    from safetensors import safe_open

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    r0, alpha0 = cfg["r"], cfg["lora_alpha"]
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    rslora = bool(cfg.get("use_rslora"))
    files = sorted(adapter.glob("*.safetensors"))
    factors: dict[str, dict[str, Any]] = {}
    full_saved: list[str] = []
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():  # noqa: SIM118 - safe_open has no __iter__
                m = re.match(r"base_model\.model\.(.+)\.lora_([AB])\.weight$", key)
                if m:
                    factors.setdefault(m.group(1), {})[m.group(2)] = h.get_tensor(key)
                elif key.startswith("base_model.model.") and ".lora_" not in key:
                    full_saved.append(key.removeprefix("base_model.model."))
    with safe_open(str(base / "model.safetensors"), framework="pt") as hb, \
            safe_open(str(tuned / "model.safetensors"), framework="pt") as ht:
        names = [k for k in ht.keys() if k.endswith(".weight") and ".layers." in k]  # noqa: SIM118
        rows = []
        num2 = den2 = 0.0
        for name in names:
            dW = ht.get_tensor(name).float() - hb.get_tensor(name).float()
            d = float(torch.linalg.vector_norm(dW, dtype=torch.float64))
            if d == 0:
                continue
            module = name.removesuffix(".weight")
            fa = factors.get(module)
            if fa is None:
                res, rank, scaling, issue = d, 0, 0.0, "missing"
            else:
                A, B = fa["A"].float(), fa["B"].float()
                r = pattern_value(rank_pattern, module, r0)
                alpha = pattern_value(alpha_pattern, module, alpha0)
                scaling = alpha / math.sqrt(r) if rslora else alpha / r
                issue = None if A.shape[0] == r else f"config r={r} but A has {A.shape[0]} rows"
                res = float(torch.linalg.vector_norm(dW - scaling * (B @ A), dtype=torch.float64))
                rank = A.shape[0]
            rows.append({"module": module, "rank": rank, "scaling": scaling, "rel_error": res / d, "issue": issue})
            num2 += res * res
            den2 += d * d
    return {"total_rel_error": math.sqrt(num2 / den2) if den2 else 0.0,
            "max_rel_error": max((r["rel_error"] for r in rows), default=0.0),
            "mean_rel_error": statistics.fmean(r["rel_error"] for r in rows) if rows else 0.0,
            "modules": len(rows), "missing": sum(r["issue"] == "missing" for r in rows),
            "issues": [r for r in rows if r["issue"]][:5], "ranks": sorted({r["rank"] for r in rows}),
            "full_saved": full_saved, "adapter_bytes": sum(f.stat().st_size for f in adapter.rglob("*") if f.is_file()),
            "config": {k: cfg.get(k) for k in ("r", "lora_alpha", "use_rslora", "modules_to_save", "target_modules")}
            | {"rank_pattern_entries": len(rank_pattern)}}


@dataclass
class Contender:
    """One end-to-end contender: how to build its command for a round, extra environment, rounds."""

    name: str
    command: Callable[[Path], list[str]]  # output folder -> argv
    env: dict[str, str] = field(default_factory=dict)
    rounds: int | None = None  # None: every round
    pair: dict[str, Any] | None = None  # the checkpoints it reads, when not the block's pair


def e2e_contenders(pair: dict[str, Any], rank: int, mergekit_exe: str | None, which: list[str],
                   exact_rounds: int) -> list[Contender]:
    """Absolute paths everywhere (mergekit crashes offline with relative ones, writing its model card)."""
    base, tuned = pair["base"], pair["tuned"]
    out: list[Contender] = []

    def compress_cmd(engine: str) -> Callable[[Path], list[str]]:
        return lambda o: [compress_exe(), "extract-lora", "--base", base, "--tuned", tuned, "-o", str(o),
                          "--rank", str(rank), "--svd", engine, "--device", "cpu", "-q", "--force"]

    one_thread = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def mergekit_cmd(o: Path) -> list[str]:
        assert mergekit_exe
        return [mergekit_exe, "--model", tuned, "--base-model", base, "--out-path", str(o), "--max-rank", str(rank),
                "--no-copy-tokenizer", "--quiet"]

    for name in which:
        if name == "mergekit":
            if mergekit_exe:
                out.append(Contender(name, mergekit_cmd))
        elif name == "mergekit_1thread":
            if mergekit_exe:
                out.append(Contender(name, mergekit_cmd, env=one_thread))
        elif name == "compress_auto":
            out.append(Contender(name, compress_cmd("auto")))
        elif name == "compress_exact":
            out.append(Contender(name, compress_cmd("exact"), rounds=exact_rounds))
        elif name == "compress_exact_1thread":
            out.append(Contender(name, compress_cmd("exact"), env=one_thread, rounds=exact_rounds))
        elif name == "compress_auto_1thread":
            out.append(Contender(name, compress_cmd("auto"), env=one_thread))
        else:
            raise ValueError(name)
    return out


def run_contenders(pair: dict[str, Any], work: Path, contenders: list[Contender], rounds: int,
                   env: dict[str, str], label: str) -> dict[str, Any]:
    """Every round runs each contender once (those with fewer rounds drop out), rotating the order."""
    names = [c.name for c in contenders]
    by_name = {c.name: c for c in contenders}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in names}
    errors: dict[str, Any] = {}
    for rnd in range(rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for name in order:
            c = by_name[name]
            if c.rounds is not None and rnd >= c.rounds:
                continue
            out_dir = work / f"out-{label}" / f"{name}-{rnd}"
            cmd = c.command(out_dir)
            log(f"{label}: round {rnd + 1}/{rounds}: {name} ...")
            res = run_measured(cmd, env=env | c.env, log_dir=work / "logs", tag=f"{label}-{name}-{rnd}", cwd="/")
            res["env"] = c.env
            log(f"{label}: {name}: {res['wall_s']:.2f}s, peak RSS {res['max_rss_bytes'] / MIB:.0f} MiB, "
                f"load {res['loadavg_after'][0]}")
            runs[name].append(res)
            if name not in errors:
                own = c.pair or pair
                errors[name] = adapter_error(out_dir, Path(own["base"]), Path(own["tuned"]))
                log(f"{label}: {name}: total rel. error {errors[name]['total_rel_error']:.5f}")
            shutil.rmtree(out_dir, ignore_errors=True)
    summary = {}
    for name in names:
        summary[name] = {
            "wall_s": stats([r["wall_s"] for r in runs[name]]),
            "cpu_s": stats([r["user_s"] + r["sys_s"] for r in runs[name]]),
            "max_rss_bytes": stats([float(r["max_rss_bytes"]) for r in runs[name]]),
            "peak_anon_bytes": stats([float(r["sampled_peak_bytes"]["RssAnon"]) for r in runs[name]]),
            "peak_file_bytes": stats([float(r["sampled_peak_bytes"]["RssFile"]) for r in runs[name]]),
            "error": errors[name], "env": by_name[name].env,
            "command": " ".join(f"{k}={v}" for k, v in by_name[name].env.items()) + (" " if by_name[name].env
                                                                                   else "") + runs[name][0]["command"],
        }
    return {"pair": pair, "rounds": rounds, "summary": summary, "runs": runs}


def idle_python_rss(py: str, log_dir: Path) -> int:
    """Peak RSS of the interpreter importing torch (the floor every contender pays)."""
    res = run_measured([py, "-c", "import torch"], env=dict(os.environ), log_dir=log_dir, tag="idle-torch",
                       cwd="/")
    return res["max_rss_bytes"]


# --- report --------------------------------------------------------------------------------------


def fmt_s(st: dict[str, Any]) -> str:
    return f"{st['min']:.3f} / {st['median']:.3f}"


MATRIX_DOCS = {
    "power": "`power` = U diag(s) V^T over n/4 random orthonormal directions, s_i ~ i^-0.5, + Gaussian noise "
             "(15% of the norm)",
    "exp": "`exp` = the same with s_i ~ exp(-i/16) + 5% noise",
    "adam": "`adam` = the weight change of a linear layer after 12 Adam steps towards a teacher differing by a "
            "rank-8 shift + 2% full-rank noise (anisotropic inputs): fine-tune-like, far from low rank",
    "real:": "`real:NAME` = the delta of that weight in the real pair `{real_pair}` (SmolLM2-135M and a 3-step "
             "AdamW full fine-tune of it, float32)",
}


def derived_notes(result: dict[str, Any]) -> list[str]:
    """Observations computed from the numbers (kept in the JSON too)."""
    notes = []
    for block in result.get("e2e", []):
        s = block["summary"]
        if "mergekit" in s and "compress_auto" in s:
            mk, ca = s["mergekit"]["error"], s["compress_auto"]["error"]
            notes.append(f"mergekit's adapter is {mk['adapter_bytes'] / MIB:.1f} MiB against compress's "
                         f"{ca['adapter_bytes'] / MIB:.1f} MiB: besides the LoRA factors it copies "
                         f"{len(mk['full_saved'])} unchanged tensors whole into modules_to_save (embed_tokens and "
                         "lm_head by default, and every RMSNorm weight as an 'unsupported module type'); compress "
                         "leaves unchanged tensors out (and skips embeddings by default).")
            notes.append(f"Peak RSS on the {block['pair']['layers']}-layer pair: mergekit "
                         f"{s['mergekit']['max_rss_bytes']['median'] / MIB:.0f} MiB (of which file-backed, i.e. "
                         f"memory-mapped checkpoint pages, {s['mergekit']['peak_file_bytes']['median'] / MIB:.0f} "
                         f"MiB), compress {s['compress_auto']['max_rss_bytes']['median'] / MIB:.0f} MiB "
                         f"({s['compress_auto']['peak_file_bytes']['median'] / MIB:.0f} MiB file-backed: shared "
                         "libraries only, it reads tensors with positioned reads); the floor of an interpreter "
                         f"that imports torch is {result.get('idle_torch_rss_bytes', 0) / MIB:.0f} MiB.")
    ms = result.get("memory_scaling", {}).get("compress_auto_1thread")
    if ms:
        floor = result.get("idle_torch_rss_bytes", 0) / MIB
        lp = result["memory"][0]["large_pair"]
        emb_mib = lp["vocab"] * lp["hidden"] * 4 / MIB
        notes.append(f"compress's peak RSS: median {ms['rss_mib'][0]:.0f} -> {ms['rss_mib'][1]:.0f} MiB "
                     f"({ms['ratio']:.2f}x; min {ms['rss_min_mib'][0]:.0f} -> {ms['rss_min_mib'][1]:.0f}, max "
                     f"{ms['rss_max_mib'][0]:.0f} -> {ms['rss_max_mib'][1]:.0f}) while the checkpoints grow "
                     f"{ms['ckpt_mib'][1] / ms['ckpt_mib'][0]:.2f}x; {ms['rss_mib'][0] - floor:.0f} -> "
                     f"{ms['rss_mib'][1] - floor:.0f} MiB above the torch floor. The peak is set by the largest "
                     f"tensors (embed_tokens / lm_head, {emb_mib:.0f} MiB each in float32) and their temporaries, "
                     "not by the "
                     "number of layers.")
    return notes


def full_copies(names: list[str]) -> str:
    if not names:
        return "-"
    return f"{len(names)}: " + ", ".join(f"`{n}`" for n in names[:2]) + (", ..." if len(names) > 2 else "")


def mib(x: float) -> str:
    return f"{x / MIB:.0f}"


def to_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# `compress extract-lora` benchmark: speed, accuracy, peak memory", "",
        f"Produced by `{result['command']}` on {m['date']} "
        f"({m['cpu_model']}, {m['usable_cores']} usable cores, {m['mem_total_bytes'] / 1024**3:.0f} GiB, "
        f"torch {m['versions']['torch']}, {m['torch_threads_default']} threads; load average at start "
        f"{m['loadavg_start']}). The machine is shared: contenders are interleaved (rotating order) in every "
        "round and times are given as **min / median** over rounds. Raw numbers: `bench_extract_lora.json`.", "",
    ]
    mk = m["versions"].get("mergekit_venv")
    if mk:
        lines += [f"mergekit: `{json.dumps(mk)}` (separate venv).", ""]
    if "svd" in result:
        sv = result["svd"]
        lines += [
            "## 1. Truncated SVD engines on realistic deltas", "",
            f"Exact = float32 `torch.linalg.svd` (full spectrum); randomized = `svd_randomized` with the package's "
            f"current defaults (oversample {sv['randomized_defaults']['oversample']}, n_iter "
            f"{sv['randomized_defaults']['n_iter']}); (8, 2) = `svd_randomized(oversample=8, n_iter=2)`, the issue's "
            "settings; auto = `low_rank(M, RankRule(rank=r), engine='auto')` (adds ||M||_F and the factor split, "
            f"current defaults). **{sv['threads']} torch thread(s)** (`--svd-threads`). {sv['rounds']} rounds "
            f"(exact: {sv['exact_rounds']}). Error ratio = "
            "||M - U_r S_r V_r^T||_F / sqrt(sum of dropped s_i^2) (1.000 = optimal). "
            f"Targets: speed-up >= {SVD_SPEEDUP_TARGET:.0f}x, error ratio <= {SVD_ERROR_TARGET}.", "",
            "Matrices: " + "; ".join(d for k, d in MATRIX_DOCS.items()
                                     if any(r["kind"].startswith(k) for r in sv["rows"])).format(
                real_pair=result.get("real_pair")) + ".",
            "",
            "| size | matrix | rank | optimal rel. error | exact s | randomized s | speed-up (best / median) "
            "| error ratio | (8, 2) s | (8, 2) speed-up (best / median) | (8, 2) error ratio | auto engine | auto s "
            "| auto speed-up (best / median) | auto error ratio |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sv["rows"]:
            fast = "" if r["speedup_randomized_min"] >= SVD_SPEEDUP_TARGET else " **✗**"
            good = "" if r["error_ratio_randomized"] <= SVD_ERROR_TARGET else " **✗**"
            lines.append(
                f"| {r['size']} | {r['kind']} | {r['rank']} | {r['optimal_rel_error']:.4f} | {fmt_s(r['exact_s'])} | "
                f"{fmt_s(r['randomized_s'])} | {r['speedup_randomized_min']:.1f}x{fast} / "
                f"{r['speedup_randomized_median']:.1f}x | {r['error_ratio_randomized']:.4f}{good} | "
                f"{fmt_s(r['randomized_8_2_s'])} | {r['speedup_8_2_min']:.1f}x / {r['speedup_8_2_median']:.1f}x | "
                f"{r['error_ratio_8_2']:.4f}{'' if r['error_ratio_8_2'] <= SVD_ERROR_TARGET else ' **✗**'} | "
                f"{r['auto_engine']} | {fmt_s(r['auto_s'])} | {r['speedup_auto_min']:.1f}x / "
                f"{r['speedup_auto_median']:.1f}x | {r['error_ratio_auto']:.4f} |")
        lines += ["", "Speed-up *best* = min exact time / min engine time (the least-disturbed runs); *median* = ratio "
                  "of medians. ✗ marks a row that misses a target (speed on the best-of ratio).", ""]
    if "threads" in result:
        th = result["threads"]
        lines += [f"### Thread count on this shared machine ({th['size']}x{th['size']} `{th['kind']}`, "
                  f"{th['rounds']} interleaved rounds, 1-min load per round {th['loadavg_1min_per_round']})", "",
                  "| engine | threads | s (min / median) | vs 1 thread (min / median) |", "|---|---|---|---|"]
        for k, v in th["times"].items():
            name, _, n = k.partition("@")
            one = th["times"].get(f"{name}@1", v)
            lines.append(f"| {name} | {n} | {fmt_s(v)} | {v['min'] / one['min']:.1f}x / "
                         f"{v['median'] / one['median']:.1f}x |")
        lines += ["", "On this 2-vCPU machine shared with other jobs, 2 OpenMP threads make every small parallel "
                  "region (QR panels, the small SVD, norms) wait for a descheduled worker; single-threaded runs are "
                  "far faster and far less noisy, so section 1 runs at `--svd-threads` and section 2 shows both "
                  "thread settings for both tools.", ""]
    for key, title in (("e2e", "## 2. End to end: `compress extract-lora` vs `mergekit-extract-lora`"),
                       ("memory", "## 3. Peak memory on a pair twice as large")):
        if key not in result:
            continue
        for block in result[key]:
            p = block["pair"]
            lines += [
                title + f" ({p['layers']} layers)", "",
                f"Pair: Llama hidden {p['hidden']}, intermediate {p['intermediate']}, {p['layers']} layers, vocab "
                f"{p['vocab']}, float32, {p['checkpoint_bytes'] / MIB:.0f} MiB per checkpoint; TUNED = BASE + "
                f"full-rank delta ({p['spectrum']}, ||dW|| = {p['delta_rel']} ||W||) on all "
                f"{p['perturbed_modules']} block Linears. Max rank {block['rank']}, {block['rounds']} round(s). "
                "Error = ||dW - scaling B A||_F / ||dW||_F read from the adapter files; total = over all modules.",
                *([f"Rows `@NL` ran on the N-layer pair (the {block['small_pair']['layers']}-layer one is section "
                   "2's), interleaved, at OMP_NUM_THREADS=1."] if "small_pair" in block else []),
                "",
                "| tool | wall s (min / median) | CPU s (median) | peak RSS MiB (min / median) "
                "| peak anon / file RSS MiB (median, sampled) | total rel. error | max module error | modules "
                "| adapter MiB | full copies |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
            s = block["summary"]
            for name, v in s.items():
                e = v["error"]
                lines.append(
                    f"| {name} | {fmt_s(v['wall_s'])} | {v['cpu_s']['median']:.1f} | "
                    f"{mib(v['max_rss_bytes']['min'])} / {mib(v['max_rss_bytes']['median'])} | "
                    f"{mib(v['peak_anon_bytes']['median'])} / {mib(v['peak_file_bytes']['median'])} | "
                    f"{e['total_rel_error']:.5f} | {e['max_rel_error']:.5f} | {e['modules']} (missing "
                    f"{e['missing']}) | {e['adapter_bytes'] / MIB:.1f} | {full_copies(e['full_saved'])} |")
            envs = {n: v["env"] for n, v in s.items() if v.get("env")}
            if envs:
                lines += ["", "Environment overrides: " + "; ".join(
                    f"{n}: " + " ".join(f"`{k}={x}`" for k, x in e.items()) for n, e in envs.items())]
            if "mergekit" in s:
                lines.append("")
                for name in s:
                    if name.startswith("mergekit"):
                        continue
                    ref = "mergekit_1thread" if name.endswith("_1thread") and "mergekit_1thread" in s else "mergekit"
                    mk = s[ref]
                    sp_med = mk["wall_s"]["median"] / s[name]["wall_s"]["median"]
                    sp_min = mk["wall_s"]["min"] / s[name]["wall_s"]["min"]
                    de = s[name]["error"]["total_rel_error"] - mk["error"]["total_rel_error"]
                    rel = de / mk["error"]["total_rel_error"]
                    lines.append(f"- {name} vs {ref}: {sp_min:.2f}x faster best-of ({sp_med:.2f}x on medians), "
                                 f"total rel. error {de:+.5f} ({rel:+.3%} of mergekit's); target >= "
                                 f"{E2E_SPEEDUP_TARGET:.0f}x at equal-or-lower error: speed "
                                 f"{'met' if sp_min >= E2E_SPEEDUP_TARGET else 'missed'}, error "
                                 f"{'equal or lower (within 0.1%)' if rel <= E2E_ERROR_TOL else 'higher'}")
            lines.append("")
    if "memory_scaling" in result:
        ms = result["memory_scaling"]
        lines += ["### Peak RSS scaling (small pair -> twice as large)", "",
                  f"Floor: `python -c 'import torch'` peaks at {mib(result.get('idle_torch_rss_bytes', 0))} MiB.", "",
                  "| tool | checkpoint MiB | peak RSS MiB, small -> large: min | median | max | ratio of medians | "
                  "peak anon MiB (median) | peak file-backed MiB (median) |", "|---|---|---|---|---|---|---|---|"]
        for name, v in ms.items():
            lines.append(f"| {name} | {v['ckpt_mib'][0]:.0f} -> {v['ckpt_mib'][1]:.0f} | "
                         f"{v.get('rss_min_mib', [0, 0])[0]:.0f} -> {v.get('rss_min_mib', [0, 0])[1]:.0f} | "
                         f"{v['rss_mib'][0]:.0f} -> {v['rss_mib'][1]:.0f} | "
                         f"{v.get('rss_max_mib', [0, 0])[0]:.0f} -> {v.get('rss_max_mib', [0, 0])[1]:.0f} | "
                         f"{v['ratio']:.2f} | {v['anon_mib'][0]:.0f} -> "
                         f"{v['anon_mib'][1]:.0f} | {v['file_mib'][0]:.0f} -> {v['file_mib'][1]:.0f} |")
        lines.append("")
    notes = [*result.get("notes", []), *derived_notes(result)]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    lines += ["## Commands", ""]
    for c in result.get("commands", []):
        lines.append(f"    {c}")
    lines += ["", f"Total benchmark wall time: {result['total_wall_s']:.0f} s.", ""]
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "reports" / "bench_extract_lora"),
                    help="output prefix: writes <out>.json and <out>.md")
    ap.add_argument("--workdir", default="/tmp/bench_extract_lora", help="scratch folder (deleted afterwards)")
    ap.add_argument("--mergekit-venv", default="/tmp/mkvenv", help="venv holding mergekit (bin/mergekit-extract-lora)")
    ap.add_argument("--skip", action="append", default=[], choices=["svd", "e2e", "memory"])
    ap.add_argument("--quick", action="store_true", help="2048 only, fewer rounds, 2-layer pair")
    ap.add_argument("--rank", type=int, default=32, help="max rank of the end-to-end runs")
    ap.add_argument("--svd-rounds", type=int, default=None)
    ap.add_argument("--e2e-rounds", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None, help="layers of the small pair (the large one has twice)")
    ap.add_argument("--hidden", type=int, default=1024, help="hidden size of the pairs")
    ap.add_argument("--intermediate", type=int, default=2816, help="MLP size of the pairs")
    ap.add_argument("--real-pair", default=None, metavar="BASE:TUNED",
                    help="folders of a real base / full fine-tune pair (model.safetensors, Llama names): adds a few of "
                         "its deltas to section 1")
    ap.add_argument("--real-tensors", default="model.layers.15.mlp.down_proj.weight,"
                    "model.layers.15.self_attn.q_proj.weight", help="comma-separated weights of --real-pair")
    ap.add_argument("--memory-mergekit", action="store_true",
                    help="also run mergekit on the large pair (section 3; ~5 min more on a busy 2-core machine)")
    ap.add_argument("--svd-threads", type=int, default=1,
                    help="torch threads for section 1 (default 1: on a shared 2-core machine 2 OpenMP threads make "
                         "small LAPACK calls wait on the scheduler; the 'threads' table shows both)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--render", metavar="JSON", default=None,
                    help="only re-render <out>.md from an existing result JSON (no measurement)")
    args = ap.parse_args()
    if args.render:
        result = json.loads(Path(args.render).read_text())
        Path(args.out).with_suffix(".md").write_text(to_markdown(result), encoding="utf-8")
        return 0

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    t_start = time.perf_counter()
    mk_exe = Path(args.mergekit_venv) / "bin" / "mergekit-extract-lora"
    mergekit_exe = str(mk_exe) if mk_exe.exists() else None
    mergekit_python = str(Path(args.mergekit_venv) / "bin" / "python") if mergekit_exe else None
    notes: list[str] = []
    if not mergekit_exe:
        notes.append(f"mergekit-extract-lora not found under {args.mergekit_venv}: mergekit was not run")
    result: dict[str, Any] = {
        "command": shlex.join(["python", *[a if not a.startswith(str(REPO)) else os.path.relpath(a, REPO)
                                            for a in sys.argv]]),
        "machine": machine_info(mergekit_python), "notes": notes, "commands": [],
    }
    log(f"machine: {result['machine']['cpu_model']}, load {result['machine']['loadavg_start']}")
    if args.quick:
        ranks, kinds = [16, 64], {2048: ["power", "adam"]}
        svd_rounds, exact_rounds, thread_rounds = args.svd_rounds or 3, {2048: 2}, 1
        e2e_rounds, layers, memory_rounds = args.e2e_rounds or 1, args.layers or 2, 2
    else:
        ranks, kinds = [16, 64], {2048: ["power", "adam"], 4096: ["power", "adam"]}
        svd_rounds, exact_rounds, thread_rounds = args.svd_rounds or 4, {2048: 2, 4096: 1}, 2
        e2e_rounds, layers, memory_rounds = args.e2e_rounds or 2, args.layers or 4, 3

    if "svd" not in args.skip:
        real = real_deltas(args.real_pair, args.real_tensors.split(","))
        if args.real_pair and not real:
            notes.append(f"--real-pair {args.real_pair} could not be read: no real delta in section 1")
        result["real_pair"] = args.real_pair
        import torch

        default_threads = torch.get_num_threads()
        result["threads"] = section_threads(2048, ranks, thread_rounds)
        torch.set_num_threads(args.svd_threads)
        try:
            result["svd"] = section_svd(kinds, ranks, svd_rounds, exact_rounds, real, real_exact_rounds=2)
        finally:
            torch.set_num_threads(default_threads)

    work = Path(args.workdir).resolve()
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    try:
        if "e2e" not in args.skip or "memory" not in args.skip:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            result["idle_torch_rss_bytes"] = idle_python_rss(sys.executable, work / "logs")
        pairs: dict[int, dict[str, Any]] = {}

        def get_pair(n_layers: int) -> dict[str, Any]:
            if n_layers not in pairs:
                log(f"building the {n_layers}-layer pair")
                t, pair = timed(lambda: single_threaded(lambda: build_pair(
                    work / f"pair{n_layers}", n_layers, seed=n_layers, hidden=args.hidden,
                    intermediate=args.intermediate)))
                pairs[n_layers] = pair | {"build_s": t}
            return pairs[n_layers]

        if "e2e" not in args.skip:
            pair = get_pair(layers)
            contenders = e2e_contenders(pair, args.rank, mergekit_exe, E2E_CONTENDERS, exact_rounds=1)
            block = run_contenders(pair, work, contenders, e2e_rounds, env, f"e2e{layers}") | {"rank": args.rank}
            result["e2e"] = [block]
            result["commands"] += [v["command"] for v in block["summary"].values()]
        if "memory" not in args.skip:
            # compress (and mergekit with --memory-mergekit) on the pair and on one twice as large, interleaved,
            # at 1 thread (peak RSS does not depend on it; the runs are several times faster on this machine).
            big = 2 * layers
            small_pair, large_pair = get_pair(layers), get_pair(big)
            which = ["compress_auto_1thread", *(["mergekit_1thread"] if args.memory_mergekit else [])]
            contenders = []
            for pr in (small_pair, large_pair):
                for c in e2e_contenders(pr, args.rank, mergekit_exe, which, exact_rounds=1):
                    c.name, c.pair = f"{c.name}@{pr['layers']}L", pr
                    if c.name.startswith("mergekit"):
                        c.rounds = 1
                    contenders.append(c)
            block = run_contenders(large_pair, work, contenders, memory_rounds, env, "mem") | {
                "rank": args.rank, "small_pair": small_pair, "large_pair": large_pair}
            result["memory"] = [block]
            result["commands"] += [v["command"] for v in block["summary"].values()]
            s_ = block["summary"]
            scaling = {}
            for name in which:
                a_, b_ = s_.get(f"{name}@{layers}L"), s_.get(f"{name}@{big}L")
                if not (a_ and b_):
                    continue
                scaling[name] = {
                    "ckpt_mib": [small_pair["checkpoint_bytes"] / MIB, large_pair["checkpoint_bytes"] / MIB],
                    "rss_mib": [a_["max_rss_bytes"]["median"] / MIB, b_["max_rss_bytes"]["median"] / MIB],
                    "rss_min_mib": [a_["max_rss_bytes"]["min"] / MIB, b_["max_rss_bytes"]["min"] / MIB],
                    "rss_max_mib": [a_["max_rss_bytes"]["max"] / MIB, b_["max_rss_bytes"]["max"] / MIB],
                    "ratio": b_["max_rss_bytes"]["median"] / a_["max_rss_bytes"]["median"],
                    "anon_mib": [a_["peak_anon_bytes"]["median"] / MIB, b_["peak_anon_bytes"]["median"] / MIB],
                    "file_mib": [a_["peak_file_bytes"]["median"] / MIB, b_["peak_file_bytes"]["median"] / MIB],
                }
            result["memory_scaling"] = scaling
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    result["machine"]["loadavg_end"] = loadavg()
    result["total_wall_s"] = time.perf_counter() - t_start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(to_markdown(result), encoding="utf-8")
    log(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} ({result['total_wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
