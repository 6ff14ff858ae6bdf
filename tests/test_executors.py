"""The executors behind every writing command: serial, ``--workers N`` (a local process pool) and
``--executor ray`` (a local Ray here, as a cluster would run it).

- Every writing command writes byte-identical files (weights, config, report) with each executor.
- A worker process that dies ends the run with one line and leaves no output; Ray retries a task whose worker
  died, and a task that keeps failing ends the run with one line and no output.
- Ctrl-C stops the worker processes and leaves nothing behind.
- Worker processes get the torch threads the executor gives them.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_tiny_llama, run_cli
from test_merge import make_adapter, qalora_adapter

from compress.pipeline.execute import ExecutorOptions, available_cores, execute
from compress.pipeline.tasks import Task, TaskContext, TaskResult

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parent.parent
WORKERS = ["--workers", "2"]
RAY = ["--executor", "ray", "--workers", "2"]
KILLED = "model.layers.1.mlp.up_proj.weight"


def digest(out: Path) -> dict[str, str]:
    """Every file of an output (a folder, or a .gguf with its sidecars), provenance left out."""
    files = sorted(p for p in out.rglob("*") if p.is_file()) if out.is_dir() else \
        sorted(p for p in out.parent.iterdir() if p.name.startswith(out.name.removesuffix(".gguf") + "."))
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files if "provenance" not in p.name}


def default_signals() -> None:
    """preexec_fn of the processes the signal tests start: SIGINT unblocked and at its default disposition, as in
    a process started from a shell. A child inherits its parent's signal mask and ignored signals, and this test
    process's may have been changed by a library an earlier test loaded (once in CI, SIGINT never reached the
    child, which then ran to completion)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def models(tiny_llama_tok: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama with a tokenizer, a LoRA and a QA-LoRA adapter, an INT4 copy and a fine-tune of it."""
    root = tmp_path_factory.mktemp("executors")
    paths = {"base": tiny_llama_tok, "lora": make_adapter(tiny_llama_tok, root / "lora", 1,
                                                          target_modules=["q_proj", "v_proj", "down_proj"]),
             "qa": qalora_adapter(root / "qa", 32, 3, lora_alpha=32), "native": root / "native",
             "tuned": root / "tuned"}
    from compress.cli import main

    assert main(["quantize", str(tiny_llama_tok), "-o", str(paths["native"]), "--method", "int4", "--format",
                 "native", "--group-size", "32", "-q"]) == 0
    assert main(["merge", str(tiny_llama_tok), "--adapter", str(paths["lora"]), "-o", str(paths["tuned"]), "-q"]) == 0
    return paths


@pytest.fixture(scope="module")
def local_ray() -> Any:
    """One local Ray (2 CPUs) for the module's identity checks; the commands find it running and use it."""
    ray = pytest.importorskip("ray")
    import logging

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield ray
    ray.shutdown()


COMMANDS = {
    "quantize-nf4": "quantize {base} -o {out} --method nf4 --double-quant",
    "quantize-int4-gptq": "quantize {base} -o {out} --method int4 --group-size 32 --shard-size 300KB",
    "quantize-gguf-q4_k_m": "quantize {base} -o {out}.gguf --method q4_k_m",
    "dequantize": "dequantize {native} -o {out} --dtype bfloat16",
    "merge-float-ties": "merge {base} --adapter {lora} --adapter {qa} --combine ties -o {out}",
    "merge-qalora-fold-native": "merge {native} --adapter {qa} --quantize int4 --format native -o {out}",
    "merge-lora-float-base": "merge {native} --adapter {lora} --quantize int4 --format native --float-base {base} "
                             "-o {out}",
    "merge-qalora-gguf-q4_1": "merge {base} --adapter {qa} --quantize q4_1 -o {out}.gguf",
    "extract-lora": "extract-lora --base {base} --tuned {tuned} --rank 4 --embeddings full -o {out}",
}


def command(name: str, models: dict[str, Path], out: Path) -> tuple[list[str], Path]:
    argv = COMMANDS[name].format(out=out, **models).split()
    return argv, Path(argv[argv.index("-o") + 1])


@pytest.mark.parametrize("name", COMMANDS)
def test_every_executor_writes_the_same_bytes(name: str, models: dict[str, Path], local_ray: Any, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    digests = {}
    for variant, extra in (("serial", []), ("workers", WORKERS), ("ray", RAY)):
        (tmp_path / variant).mkdir()
        argv, out = command(name, models, tmp_path / variant / "out")
        r = run_cli(capsys, *argv, *extra, "-q")
        assert r.rc == 0, (variant, r.err)
        digests[variant] = digest(out)
    assert len(digests["serial"]) >= 3  # weights, a report, and more
    assert digests["workers"] == digests["serial"]
    assert digests["ray"] == digests["serial"]


def test_a_worker_that_dies_ends_the_run(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMPRESS_FAULT_INJECTION", f"kill:{KILLED}")
    out = tmp_path / "out"
    r = run_cli(capsys, "quantize", models["base"], "-o", out, "--method", "nf4", *WORKERS)
    assert r.rc == 1 and len(r.err.strip().splitlines()) == 1, r.err
    assert "worker process died" in r.err and "fewer --workers" in r.err
    assert not out.exists() and leftovers(tmp_path) == []


def test_ray_retries_a_task_whose_worker_died(models: dict[str, Path], local_ray: Any, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "killed-once"
    serial, retried = tmp_path / "serial", tmp_path / "retried"
    assert run_cli(capsys, "quantize", models["base"], "-o", serial, "--method", "int4", "-q").rc == 0
    monkeypatch.setenv("COMPRESS_FAULT_INJECTION", f"kill-once:{KILLED}:{marker}")
    r = run_cli(capsys, "quantize", models["base"], "-o", retried, "--method", "int4", "-q", *RAY)
    assert r.rc == 0, r.err
    assert marker.exists()  # the worker running that task was killed, and the task ran again elsewhere
    assert digest(retried) == digest(serial)


def test_a_ray_task_that_keeps_failing_ends_the_run(models: dict[str, Path], local_ray: Any, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMPRESS_FAULT_INJECTION", f"kill:{KILLED}")
    out = tmp_path / "out"
    r = run_cli(capsys, "quantize", models["base"], "-o", out, "--method", "int4", *RAY)
    assert r.rc == 1 and len(r.err.strip().splitlines()) == 1, r.err
    assert KILLED in r.err and "died" in r.err
    assert not out.exists() and leftovers(tmp_path) == []


def test_an_input_error_in_a_worker_is_the_usual_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          local_ray: Any) -> None:
    from safetensors.torch import load_file, save_file

    folder = build_tiny_llama(tmp_path / "nan", hidden=64, intermediate=128, layers=2, vocab=64)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    for extra in (WORKERS, RAY):
        r = run_cli(capsys, "quantize", folder, "-o", tmp_path / "out", *extra)
        assert r.rc == 2 and len(r.err.strip().splitlines()) == 1, r.err
        assert "model.layers.1.mlp.up_proj.weight" in r.err and "non-finite" in r.err
        assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc)."""
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


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def stalled_run(models: dict[str, Path], tmp_path: Path, **popen: Any) -> tuple[subprocess.Popen[str], list[int]]:
    """`compress quantize --workers 2` into tmp_path/out with one task sleeping 60 s, once it is writing (its hidden
    output exists) and its fork server and two workers run; returns the process and those workers."""
    env = dict(os.environ, COMPRESS_FAULT_INJECTION=f"sleep:{KILLED}:60")
    proc = subprocess.Popen([sys.executable, "-m", "compress.cli", "quantize", str(models["base"]), "-o",
                             str(tmp_path / "out"), "--method", "nf4", *WORKERS], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_signals,
                            **popen)
    deadline = time.time() + 60
    workers: list[int] = []
    while time.time() < deadline and not (leftovers(tmp_path) and len(workers) >= 3):
        time.sleep(0.2)
        workers = [c for c in children(proc.pid) if "forkserver" in cmdline(c)]  # the fork server and 2 workers
    assert leftovers(tmp_path) and len(workers) >= 3, "the run never started writing"
    time.sleep(1)  # the task before the slow one is written; the slow one is running
    return proc, workers


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize(("signum", "code", "last_line"), [
    (signal.SIGINT, 130, "interrupted; nothing was written"),
    (signal.SIGTERM, 143, "stopped by SIGTERM; nothing was written"),  # a job scheduler, docker stop
    (signal.SIGHUP, 129, "stopped by SIGHUP; nothing was written"),  # the terminal closed
], ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_ctrl_c_stops_the_workers_and_leaves_nothing(models: dict[str, Path], tmp_path: Path, signum: int, code: int,
                                                     last_line: str) -> None:
    out = tmp_path / "out"
    proc, workers = stalled_run(models, tmp_path)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == last_line
    assert not out.exists() and leftovers(tmp_path) == []
    time.sleep(1)
    assert [w for w in workers if alive(w)] == []


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_leftovers_of_a_killed_run_are_removed_by_the_next(models: dict[str, Path], tmp_path: Path, capsys) -> None:
    """SIGKILL leaves the hidden temporary folder (nothing can clean up); the next run into the same place finds it,
    removes it with one line, and leaves a live run's temporary folder alone."""
    out = tmp_path / "out"
    proc, _ = stalled_run(models, tmp_path, start_new_session=True)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, workers included, as the OOM killer or `kill -9 -PGID`
    proc.communicate(timeout=60)
    stale = leftovers(tmp_path)
    assert len(stale) == 1 and stale[0].startswith(".out.tmp-"), stale
    live = tmp_path / f".out.tmp-{os.getpid()}-0123abcd"  # a run still going on (this process)
    live.mkdir()
    r = run_cli(capsys, "quantize", models["base"], "-o", out, "--method", "nf4", "-q")
    assert r.rc == 0, r.err
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"note: removed {tmp_path / stale[0]}, a temporary output ("), r.err
    assert "left by an interrupted run" in lines[0]
    assert leftovers(tmp_path) == [live.name] and out.is_dir()


@dataclass(frozen=True)
class ThreadCount(Task):
    """A task that reports the torch threads of the process running it."""

    def run(self, ctx: TaskContext) -> TaskResult:
        return TaskResult([], [(self.name, torch.get_num_threads(), os.getpid())])


@pytest.mark.parametrize("workers", [1, 2])
def test_every_task_runs_with_the_threads_asked_for(workers: int) -> None:
    rows: list[Any] = []
    saved = torch.get_num_threads()
    execute([ThreadCount(f"t{i}", 1) for i in range(6)], None, rows.append, sources={},
            device=torch.device("cpu"), options=ExecutorOptions(workers=workers))
    assert [r[0] for r in rows] == [f"t{i}" for i in range(6)]  # results in plan order
    assert {r[1] for r in rows} == {1}  # one thread per task by default, serial or not
    assert (os.getpid() in {r[2] for r in rows}) == (workers == 1)
    assert torch.get_num_threads() == saved  # the serial executor restores the caller's threads
    for threads, expected in ((3, 3), (0, max(1, available_cores() // workers))):  # 0: --threads auto
        rows.clear()
        execute([ThreadCount("t", 1)], None, rows.append, sources={}, device=torch.device("cpu"),
                options=ExecutorOptions(workers=workers, threads=threads))
        assert rows[0][1] == expected


@pytest.mark.parametrize("value,problem", [("0", "not a positive number"), ("two", "not a positive number")])
def test_bad_worker_counts(value: str, problem: str, tiny_llama: Path, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    r = run_cli(capsys, "quantize", tiny_llama, "-o", tmp_path / "out", "--workers", value)
    assert r.rc == 2 and problem in r.err and "--workers auto" in r.err
    assert not (tmp_path / "out").exists()


def test_ray_address_needs_ray_executor(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = run_cli(capsys, "quantize", tiny_llama, "-o", tmp_path / "out", "--ray-address", "10.0.0.1:6379")
    assert r.rc == 2 and "--executor ray" in r.err


def test_version_answers_without_torch() -> None:
    code = "import sys; from compress.__main__ import main; rc = main(['--version']); print('torch' in sys.modules, rc)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.splitlines() == ["compress, version 0.1.0", "False 0"], r.stdout + r.stderr


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_ctrl_c_while_the_libraries_load_is_one_line(tiny_llama: Path, tmp_path: Path) -> None:
    """Ctrl-C in the first second (torch still importing): held until the libraries are loaded, then one line, exit
    130, no traceback (raised inside torch's import it could abort the process from C++)."""
    proc = subprocess.Popen([sys.executable, "-m", "compress", "quantize", str(tiny_llama), "-o", str(tmp_path / "o")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_signals)
    time.sleep(0.4)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["interrupted; nothing was written"], err
    assert not (tmp_path / "o").exists()
