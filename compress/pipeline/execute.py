"""The one executor: runs a plan's tasks serially, on a local process pool, or as Ray tasks, and feeds their
results to the sink in plan order.

Every writing command goes through :func:`execute`. Whatever runs the tasks, the sink receives the same
tensors in the same order, so the output is byte-identical across ``--workers 1``, ``--workers N`` and
``--executor ray``. Memory stays bounded: the tasks handed out and not yet written hold at most the input
bytes of ``workers + 1`` of the largest task (:class:`Window`), whatever the model size.

- **serial** (``--workers 1``): in this process, with the inputs the command already opened.
- **process pool** (``--workers N``, :mod:`compress.pipeline.pool`): N worker processes (started by a fork
  server, so that CUDA and torch's thread pools are never inherited half-initialised), each opening the
  inputs by path once and reading its own tensors by positioned reads. Ctrl-C stops the workers; a worker
  that dies ends the run with one line.
- **Ray** (``--executor ray``, :mod:`compress.pipeline.ray_runner`): the same tasks as Ray tasks, on a local
  Ray (``num_cpus`` from ``--workers``) or a cluster (``--ray-address``); a task whose worker dies, or that
  hits an I/O error, is retried (``RAY_RETRIES`` times); one that keeps failing ends the run with one line.

Threads: every task runs with the same number of torch threads, ``--threads`` (default 1), whichever executor
runs it: parallelism comes from the workers, and the few results that depend on how a reduction is split
between threads (float64 error sums in the reports, the SVDs of extract-lora) come out the same bit for bit.
On a shared machine intra-op threads mostly wait for each other anyway. ``--threads auto`` divides the cores
among the workers.

Device placement (``--device``) is decided here: tasks receive it in their context and move their inputs
to it; results leave the device once, encoded.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from compress.catalog import EXECUTORS  # re-exported
from compress.errors import CompressError, OptionError
from compress.formats.checkpoint import CheckpointReader
from compress.formats.sink import Encoded
from compress.pipeline.tasks import Source, Task, TaskContext, TaskResult, run_task

Progress = Callable[[str, int], None]  # (task name, input bytes just finished)
RAY_RETRIES = 3


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ExecutorOptions:
    """How tasks run: ``kind`` local or ray; ``workers`` processes (local) or tasks in flight (ray; 0 = the
    cluster's CPUs); ``threads`` torch threads per task, in every executor (0: the cores divided among the
    workers, at least 1)."""

    kind: str = "local"
    workers: int = 1
    ray_address: str | None = None
    threads: int = 1

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise OptionError(f"--executor {self.kind!r} is not one of {', '.join(EXECUTORS)}", fix="Pick one.")
        if self.workers < 0 or (self.kind == "local" and self.workers < 1):
            raise OptionError(f"--workers {self.workers} must be at least 1", fix="Pass --workers N or auto.")
        if self.ray_address is not None and self.kind != "ray":
            raise OptionError("--ray-address applies only with --executor ray", fix="Add --executor ray.")
        if self.threads < 0:
            raise OptionError(f"--threads {self.threads} must be at least 1", fix="Pass a positive number or auto.")

    @property
    def serial(self) -> bool:
        return self.kind == "local" and self.workers == 1

    @property
    def task_threads(self) -> int:
        """Torch threads each task runs with."""
        return self.threads or max(1, available_cores() // max(self.workers, 1))

    def describe(self) -> str:
        threads = f"{self.task_threads} torch thread{'s' if self.task_threads > 1 else ''} per task"
        if self.serial:
            return f"serial, {threads}"
        if self.kind == "local":
            return f"{self.workers} worker processes, {threads}"
        where = self.ray_address or "local Ray"
        return f"Ray ({where}), {self.workers or 'all'} {'task' if self.workers == 1 else 'tasks'} in flight, {threads}"


def parse_threads(text: str) -> int:
    """``--threads``: a positive number, or ``auto`` (0: the cores divided among the workers)."""
    if text == "auto":
        return 0
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise OptionError(f"--threads {text!r} is not a positive number or 'auto'",
                          fix="Pass e.g. --threads 1 (the default), or --threads auto to divide the cores among "
                              "the workers.")
    return value


def parse_workers(text: str) -> int:
    """``--workers``: a positive number, or ``auto`` (the cores available to this process)."""
    if text == "auto":
        return available_cores()
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise OptionError(f"--workers {text!r} is not a positive number or 'auto'",
                          fix="Pass e.g. --workers 4, or --workers auto for every core.")
    return value


_ALLOCATOR_TUNED = False


def tune_allocator() -> None:
    """Keep freed memory blocks of up to 32 MB for reuse instead of returning them to the kernel.

    glibc's malloc hands blocks of a few MB back to the kernel when they are freed (mmap'd chunks, and heap
    trimming), and the next allocation faults them in again, zeroed page by page. Tasks allocate and free
    the same few-MB temporaries thousands of times (float32 pieces of a tensor), so most of their time went
    to the kernel: measured on a 45M-parameter tensor, quantizing and measuring NF4 / INT4 ran 3.2x / 5.2x
    faster with this, at the same peak RSS. Blocks over 32 MB are still mapped and unmapped at once. Called
    once in every process that runs tasks; a no-op where the C library is not glibc."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return
    _ALLOCATOR_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
        libc.mallopt(m_mmap_threshold, 32 << 20)
        libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):
        pass


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU. Asking for an absent CUDA is an option error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device cuda was asked for but no CUDA device is available",
                          fix="Use --device cpu or --device auto.")
    if name not in ("cpu", "cuda"):
        raise OptionError(f"--device {name!r} is not one of auto, cpu, cuda", fix="Pick one of those.")
    return torch.device(name)


class TensorWriter(Protocol):
    """What receives a run's tensors: a :class:`~compress.formats.sink.Sink`, or a collector of small results."""

    def write(self, name: str, tensor: Encoded) -> None: ...


@dataclass
class ExecutionStats:
    """How a run's tasks went (for the provenance file and the benchmarks): the wall time of the whole task
    phase (start-up included), the time to the first result, and the steady throughput after it (input
    bytes of the later tasks per second: what more workers or machines multiply)."""

    executor: str
    tasks: int = 0
    input_bytes: int = 0
    seconds: float = 0.0
    first_result_seconds: float | None = None
    first_task_bytes: int = 0

    @property
    def steady_bytes_per_second(self) -> float | None:
        if self.first_result_seconds is None or self.tasks < 2 or self.seconds <= self.first_result_seconds:
            return None
        return (self.input_bytes - self.first_task_bytes) / (self.seconds - self.first_result_seconds)

    def as_dict(self) -> dict[str, Any]:
        steady = self.steady_bytes_per_second
        return {"executor": self.executor, "tasks": self.tasks, "input_bytes": self.input_bytes,
                "seconds": round(self.seconds, 3),
                "first_result_seconds": None if self.first_result_seconds is None else round(self.first_result_seconds,
                                                                                             3),
                "steady_bytes_per_second": None if steady is None else round(steady)}


def execute(tasks: Sequence[Task], sink: TensorWriter | None, collect: Callable[[Any], None], *,
            sources: Mapping[str, Source], opened: Mapping[str, CheckpointReader] | None = None,
            device: torch.device, options: ExecutorOptions = ExecutorOptions(),
            progress: Progress | None = None) -> ExecutionStats:
    """Run ``tasks``; write each result's tensors to ``sink`` and pass its rows to ``collect``, in plan order.

    ``sources``: how workers open the inputs; ``opened``: the same inputs already open in this process
    (used by the serial executor). Errors propagate; the caller's sink context then aborts the output.
    """
    with Executor(options, sources=sources, opened=opened, device=device) as executor:
        executor.run(tasks, sink, collect, progress=progress)
    return executor.stats


class Executor:
    """The executor kept open across stages: a plan whose later tasks depend on earlier results (calibrated
    quantization: block k+1's statistics come from the quantized block k) calls :meth:`run` once per stage,
    into the same sink, and the workers (or Ray) start once. Each stage is written in its own plan order."""

    def __init__(self, options: ExecutorOptions, *, sources: Mapping[str, Source],
                 opened: Mapping[str, CheckpointReader] | None = None, device: torch.device) -> None:
        self.stats = ExecutionStats(options.describe())
        self._context = _runner(options, sources, opened, device)
        self._run: Callable[[Sequence[Task]], Iterator[TaskResult]] | None = None
        self._started = 0.0

    def __enter__(self) -> Executor:
        self._started = time.perf_counter()
        self._run = self._context.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stats.seconds = time.perf_counter() - self._started
        self._context.__exit__(*exc)

    def run(self, tasks: Sequence[Task], sink: TensorWriter | None, collect: Callable[[Any], None], *,
            progress: Progress | None = None) -> dict[str, torch.Tensor]:
        """Run one stage's ``tasks`` (see :func:`execute`); returns the ``values`` of their results, merged."""
        assert self._run is not None, "use the Executor as a context manager"
        stats = self.stats
        values: dict[str, torch.Tensor] = {}
        for task, result in zip(tasks, self._run(tasks), strict=True):
            values.update(result.values)
            if sink is not None:
                for name, tensor in result.tensors:
                    sink.write(name, tensor)
            for row in result.rows:
                collect(row)
            if stats.first_result_seconds is None:
                stats.first_result_seconds = time.perf_counter() - self._started
                stats.first_task_bytes = task.nbytes
            stats.tasks += 1
            stats.input_bytes += task.nbytes
            if progress is not None:
                progress(task.name, task.nbytes)
        return values


@contextlib.contextmanager
def _runner(options: ExecutorOptions, sources: Mapping[str, Source], opened: Mapping[str, CheckpointReader] | None,
            device: torch.device) -> Iterator[Callable[[Sequence[Task]], Iterator[TaskResult]]]:
    if options.serial:
        tune_allocator()
        ctx = TaskContext(sources, device, opened)
        threads = torch.get_num_threads()
        torch.set_num_threads(options.task_threads)
        try:
            yield lambda tasks: (run_task(task, ctx) for task in tasks)
        finally:
            torch.set_num_threads(threads)
            ctx.close()
    elif options.kind == "local":
        from compress.pipeline.pool import ProcessPool

        with ProcessPool(sources, device, options.workers, options.task_threads) as pool:
            yield pool.results
    else:
        from compress.pipeline.ray_runner import RayRunner

        with RayRunner(sources, device, options) as ray_runner:
            yield ray_runner.results


class Window:
    """Which tasks may be handed out: in plan order, while the tasks handed out and not yet written hold no
    more input bytes than ``workers + 1`` of the largest task. Results must be written in plan order, so a
    worker that finishes early takes the next task while an earlier, larger one still runs; the byte budget
    (rather than a count of tasks) lets many small tasks flow past one large one, while the memory held by
    unwritten results stays that of ``workers + 1`` large tasks, whatever the model's size."""

    def __init__(self, tasks: Sequence[Task], workers: int) -> None:
        self.queue = deque(tasks)
        self.budget = (workers + 1) * max((t.nbytes for t in tasks), default=1)
        self.held = 0
        self.count = 0

    def next(self) -> Task | None:
        """The next task to hand out, or None while the budget is spent (or none is left)."""
        if not self.queue or (self.count and self.held + self.queue[0].nbytes > self.budget):
            return None
        task = self.queue.popleft()
        self.held += task.nbytes
        self.count += 1
        return task

    def done(self, task: Task) -> None:
        self.held -= task.nbytes
        self.count -= 1


class WorkerError(CompressError):
    """A worker process or Ray task failed for a reason other than the input (it died, or kept failing)."""

    exit_code = 1
