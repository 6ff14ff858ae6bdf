"""The local process pool behind ``--workers N``: N worker processes started from a fork server, each opening
the inputs by path and running tasks with :func:`~compress.pipeline.tasks.run_task`; results come back in plan
order (tasks handed out through a :class:`~compress.pipeline.execute.Window`), their bytes through shared
memory. Ctrl-C stops the workers; a worker that dies ends the run with one line."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from compress.formats.sink import Encoded
from compress.pipeline.execute import Window, WorkerError, tune_allocator
from compress.pipeline.tasks import FAULT_ENV, Source, Task, TaskContext, TaskResult, fault_hook, run_task

_WORKER_CONTEXT: TaskContext | None = None  # a pool worker's inputs, opened once
_WORKER_FAULT: str | None = None


def _init_pool_worker(sources: Mapping[str, Source], device: str, threads: int, fault: str | None) -> None:
    global _WORKER_CONTEXT, _WORKER_FAULT
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the workers
    for signum in (signal.SIGTERM, signal.SIGHUP):  # the parent's handlers raise; a worker just ends
        signal.signal(signum, signal.SIG_DFL)
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


class ProcessPool:
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

    def __enter__(self) -> ProcessPool:
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
        # The executor's call queue has a feeder thread that the interpreter joins at exit; with its readers (the
        # workers) gone it can stay blocked on a full pipe, and the process would hang after Ctrl-C instead of
        # exiting. Nothing queued there needs delivering any more.
        with contextlib.suppress(Exception):
            self.pool._call_queue.cancel_join_thread()  # type: ignore[attr-defined]
        self.pool.shutdown(wait=False, cancel_futures=True)
        for process in list(self.processes.values()):  # including one started meanwhile
            with contextlib.suppress(Exception):
                process.terminate()
                process.join(5)
