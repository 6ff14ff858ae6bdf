"""``--executor ray``: the plan's tasks as Ray tasks, on a local Ray or a cluster. Each Ray worker opens the
inputs by path once per run; results are fetched in plan order (tasks handed out through a
:class:`~compress.pipeline.execute.Window`); a task whose worker dies, or that hits an I/O error, is retried
``RAY_RETRIES`` times, and one that keeps failing ends the run with one line."""

from __future__ import annotations

import contextlib
import logging
import os
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from compress.errors import CompressError, OptionError
from compress.pipeline.execute import RAY_RETRIES, ExecutorOptions, Window, WorkerError, tune_allocator
from compress.pipeline.tasks import FAULT_ENV, Source, Task, TaskContext, TaskResult, fault_hook, run_task

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


class RayRunner:
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

    def __enter__(self) -> RayRunner:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if self.started_here:
            with contextlib.suppress(Exception):
                self.ray.shutdown()
