"""The one executor: runs a plan's tasks serially, on a local process pool, or as Ray tasks, and feeds their
results to the sink in plan order.

Every writing command goes through :func:`execute`. Whatever runs the tasks, the sink receives the same
tensors in the same order, so the output is byte-identical across ``--workers 1``, ``--workers N`` and
``--executor ray``. Memory stays bounded: the tasks handed out and not yet written hold at most the input bytes of
``workers + 1`` of the largest task (:class:`Window`), whatever the model size.

- **serial** (``--workers 1``): in this process, with the inputs the command already opened.
- **process pool** (``--workers N``): N worker processes (started by a fork server, so that CUDA and
  torch's thread pools are never inherited half-initialised), each opening the inputs by path once and
  reading its own tensors by positioned reads. Ctrl-C stops the workers; a worker that dies ends the run
  with one line.
- **Ray** (``--executor ray``): the same tasks as Ray tasks, on a local Ray (``num_cpus`` from ``--workers``)
  or a cluster (``--ray-address``); a task whose worker dies, or that hits an I/O error, is retried
  (``RAY_RETRIES`` times); one that keeps failing ends the run with one line.

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
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from compress.errors import CompressError, OptionError
from compress.formats.checkpoint import CheckpointReader
from compress.formats.sink import Encoded
from compress.pipeline.tasks import FAULT_ENV, Source, Task, TaskContext, TaskResult, fault_hook, run_task

Progress = Callable[[str, int], None]  # (task name, input bytes just finished)
EXECUTORS = ("local", "ray")
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
    stats = ExecutionStats(options.describe())
    started = time.perf_counter()
    with _runner(options, sources, opened, device) as run:
        for task, result in zip(tasks, run(tasks), strict=True):
            if sink is not None:
                for name, tensor in result.tensors:
                    sink.write(name, tensor)
            for row in result.rows:
                collect(row)
            if stats.first_result_seconds is None:
                stats.first_result_seconds, stats.first_task_bytes = time.perf_counter() - started, task.nbytes
            stats.tasks += 1
            stats.input_bytes += task.nbytes
            if progress is not None:
                progress(task.name, task.nbytes)
    stats.seconds = time.perf_counter() - started
    return stats


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
        with _ProcessPool(sources, device, options.workers, options.task_threads) as pool:
            yield pool.results
    else:
        with _RayRunner(sources, device, options) as ray_runner:
            yield ray_runner.results


# --- the local process pool ------------------------------------------------------------------------------

_WORKER_CONTEXT: TaskContext | None = None  # a pool worker's inputs, opened once
_WORKER_FAULT: str | None = None


def _init_pool_worker(sources: Mapping[str, Source], device: str, threads: int, fault: str | None) -> None:
    global _WORKER_CONTEXT, _WORKER_FAULT
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the workers
    tune_allocator()
    torch.set_num_threads(threads)
    _WORKER_CONTEXT = TaskContext(sources, torch.device(device))
    _WORKER_FAULT = fault


def _run_pool_task(task: Task) -> TaskResult:
    assert _WORKER_CONTEXT is not None
    fault_hook(task, _WORKER_FAULT)
    result = run_task(task, _WORKER_CONTEXT)
    result.tensors = SharedTensors(result.tensors)  # type: ignore[assignment]
    return result


class SharedTensors:
    """A task's tensors in one torch uint8 buffer: multiprocessing moves a torch tensor between local processes
    through shared memory (one copy in the worker, none in the parent, one file descriptor for the whole task)
    instead of pickling bytes through a pipe. Iterates as (name, Encoded) pairs, each a view of the buffer."""

    def __init__(self, tensors: list[tuple[str, Encoded]]) -> None:
        self.buffer = torch.empty(sum(t.nbytes for _, t in tensors), dtype=torch.uint8)
        self.entries: list[tuple[str, str, tuple[int, ...], int, int]] = []
        start = 0
        for name, tensor in tensors:
            self.buffer[start:start + tensor.nbytes].numpy()[:] = tensor.array()
            self.entries.append((name, tensor.dtype, tensor.shape, start, tensor.nbytes))
            start += tensor.nbytes

    def __iter__(self) -> Iterator[tuple[str, Encoded]]:
        for name, dtype, shape, start, size in self.entries:
            yield name, Encoded(dtype, shape, self.buffer[start:start + size])

    def __len__(self) -> int:
        return len(self.entries)


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


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Ctrl-C that arrives inside the block takes effect (KeyboardInterrupt) when it ends. Only the main thread
    handles signals; elsewhere the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """SIGINT blocked for this thread inside the block: a process started meanwhile inherits the mask."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


class _ProcessPool:
    """N worker processes; results in plan order, tasks handed out through a :class:`Window`."""

    def __init__(self, sources: Mapping[str, Source], device: torch.device, workers: int, threads: int) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("forkserver" if "forkserver" in multiprocessing.get_all_start_methods()
                                          else "spawn")
        if ctx.get_start_method() == "forkserver":
            from multiprocessing import forkserver

            ctx.set_forkserver_preload([__name__])  # workers start from a process that has torch imported
            # The fork server, and every worker forked from it, starts with Ctrl-C (SIGINT) blocked: the terminal
            # sends it to the whole process group, but stopping the workers is this process's job (it terminates
            # them), and a worker interrupted while it starts up would print a traceback.
            with _sigint_deferred(), _sigint_blocked():
                forkserver.ensure_running()
        self.workers = workers
        self.pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_pool_worker,
                                        initargs=(dict(sources), str(device), threads, os.environ.get(FAULT_ENV)))
        # The executor's own table of its processes (it forgets it on shutdown; we may need it after).
        self.processes: dict[int, Any] = self.pool._processes  # type: ignore[attr-defined]

    def results(self, tasks: Sequence[Task]) -> Iterator[TaskResult]:
        from concurrent.futures.process import BrokenProcessPool

        pending: deque[tuple[Task, Any]] = deque()
        window = Window(tasks, self.workers)

        def submit() -> None:
            while (task := window.next()) is not None:
                with _sigint_deferred():  # a submit may start a worker: never leave one half-started
                    pending.append((task, self.pool.submit(_run_pool_task, task)))

        submit()
        while pending:
            task, future = pending.popleft()
            try:
                result = future.result()
            except BrokenProcessPool as e:
                raise WorkerError(f"a worker process died while running '{task.name}' (or a task beside it); "
                                  "nothing was written",
                                  fix="It may have run out of memory: run again with fewer --workers.") from e
            window.done(task)
            submit()
            yield result

    def __enter__(self) -> _ProcessPool:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.pool.shutdown(wait=True)
            return
        # An error or Ctrl-C: stop the running tasks now and drop the queued ones (the executor has no public way
        # to stop its workers before Python 3.14).
        for process in list(self.processes.values()):
            with contextlib.suppress(Exception):
                process.terminate()
        self.pool.shutdown(wait=False, cancel_futures=True)
        for process in list(self.processes.values()):  # including one started meanwhile
            with contextlib.suppress(Exception):
                process.terminate()
                process.join(5)


class WorkerError(CompressError):
    """A worker process or Ray task failed for a reason other than the input (it died, or kept failing)."""

    exit_code = 1


# --- Ray ------------------------------------------------------------------------------------------------

_RAY_CONTEXT: tuple[str, TaskContext] | None = None  # (run id, context) of the run this Ray worker serves


def _run_ray_task(run_id: str, sources: Mapping[str, Source], device: str, threads: int, fault: str | None,
                  task: Task) -> TaskResult:
    global _RAY_CONTEXT
    if _RAY_CONTEXT is None or _RAY_CONTEXT[0] != run_id:
        if _RAY_CONTEXT is not None:
            _RAY_CONTEXT[1].close()
        tune_allocator()
        torch.set_num_threads(threads)
        _RAY_CONTEXT = (run_id, TaskContext(sources, torch.device(device)))
    fault_hook(task, fault)
    return run_task(task, _RAY_CONTEXT[1])


class _RayRunner:
    """The tasks as Ray tasks, results fetched in plan order, tasks handed out through a :class:`Window`."""

    def __init__(self, sources: Mapping[str, Source], device: torch.device, options: ExecutorOptions) -> None:
        try:
            import ray
        except ImportError as e:
            raise OptionError("--executor ray needs Ray, which is not installed",
                              fix="pip install 'compress[cluster]' (or pip install ray), or use --workers N.") from e
        self.ray = ray
        self.started_here = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR,
                                      "log_to_driver": False, "configure_logging": True}
            try:
                if options.ray_address is None:
                    ray.init(num_cpus=max(options.workers, 1), **kwargs)
                else:
                    ray.init(address=options.ray_address, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise OptionError(f"cannot start or reach Ray at {options.ray_address or 'a new local instance'} "
                                  f"({' '.join(str(e).split())[:200]})",
                                  fix="Check --ray-address (the head's host:port, as `ray start --head` printed it).") \
                    from e
            self.started_here = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.in_flight = options.workers or cpus
        threads = options.task_threads
        self.remote = ray.remote(_run_ray_task).options(num_cpus=1, max_retries=RAY_RETRIES,
                                                        retry_exceptions=[OSError])
        self.args = (os.urandom(8).hex(), ray.put(dict(sources)), str(device), threads, os.environ.get(FAULT_ENV))

    def results(self, tasks: Sequence[Task]) -> Iterator[TaskResult]:
        ray = self.ray
        pending: deque[tuple[Task, Any]] = deque()
        window = Window(tasks, self.in_flight)

        def submit() -> None:
            while (task := window.next()) is not None:
                pending.append((task, self.remote.remote(*self.args, task)))

        submit()
        while pending:
            task, ref = pending.popleft()
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, CompressError):
                    raise cause from None
                raise WorkerError(f"Ray task '{task.name}' failed ({type(cause or e).__name__}: "
                                  f"{' '.join(str(cause or e).split())[:300]}); nothing was written",
                                  fix="See the error; I/O errors were retried "
                                      f"{RAY_RETRIES} times.") from e
            except (ray.exceptions.WorkerCrashedError, ray.exceptions.RaySystemError,
                    ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError) as e:
                raise WorkerError(f"the Ray worker running '{task.name}' died {RAY_RETRIES + 1} times; nothing "
                                  "was written", fix="It may have run out of memory: check the nodes, or run "
                                  "with fewer tasks in flight (--workers).") from e
            window.done(task)
            submit()
            yield result

    def __enter__(self) -> _RayRunner:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if self.started_here:
            with contextlib.suppress(Exception):
                self.ray.shutdown()
