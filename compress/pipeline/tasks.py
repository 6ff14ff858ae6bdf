"""Tasks: what every writing command is made of.

A command plans an ordered list of :class:`Task` values and a sink. A task is small, frozen, picklable
data (which tensors to read from which input, which pure function to apply, with which options) with a
:meth:`Task.run` that does the work in a :class:`TaskContext` and returns a :class:`TaskResult`: the
encoded tensors to write, in order, and typed report rows. Because a task names its inputs by a
:class:`Source` key and a tensor name, not by an open file, any process that can see the input paths can
run it (the local process pool, a Ray worker on another machine), and the executor
(:mod:`compress.pipeline.execute`) decides where tasks run and where their tensors live (``--device``).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from compress.errors import InputError
from compress.formats.checkpoint import CheckpointReader
from compress.formats.inputs import open_model
from compress.formats.sink import Encoded, encode


class Source(ABC):
    """An input that a worker can open by itself (frozen and picklable: paths and options, no handles)."""

    @abstractmethod
    def open(self, device: torch.device) -> CheckpointReader:
        """Open the input for reading tensors one at a time."""


@dataclass(frozen=True)
class ModelSource(Source):
    """A checkpoint read as float tensors (quantized layouts dequantized tensor by tensor): ``open_model``."""

    path: str

    def open(self, device: torch.device) -> CheckpointReader:
        return open_model(self.path)


class TaskContext:
    """What a task runs with: the inputs (opened on first use and kept open for the next task of the same
    process) and the device its math runs on."""

    def __init__(self, sources: Mapping[str, Source], device: torch.device,
                 opened: Mapping[str, CheckpointReader] | None = None) -> None:
        self.sources = dict(sources)
        self.device = device
        self._readers: dict[str, CheckpointReader] = dict(opened or {})
        self._owned: list[CheckpointReader] = []
        self._rows: list[Any] = []  # rows the readers made while producing tensors (see run_task)

    def reader(self, key: str) -> CheckpointReader:
        reader = self._readers.get(key)
        if reader is None:
            reader = self.sources[key].open(self.device)
            self._readers[key] = reader
            self._owned.append(reader)
        return reader

    def read(self, key: str, name: str, *, shape: tuple[int, ...] | None = None,
             dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor ``name`` of input ``key`` on the CPU, checked against the shape and dtype its header gave (when
        given). A report row the reader made for it (a merged tensor's) goes to the task's result."""
        reader = self.reader(key)
        tensor = reader.get(name)
        row = reader.report_row(name)
        if row is not None:
            self._rows.append(row)
        if (shape is not None and tuple(tensor.shape) != tuple(shape)) or (dtype is not None and tensor.dtype != dtype):
            raise InputError(f"tensor '{name}' read as {tuple(tensor.shape)} {tensor.dtype}, header says "
                             f"{shape} {dtype}", where=str(self.reader(key).path), fix="The file is corrupt.")
        return tensor

    def take_rows(self) -> list[Any]:
        rows, self._rows = self._rows, []
        return rows

    def close(self) -> None:
        for reader in self._owned:
            reader.close()
        self._owned.clear()


@dataclass
class TaskResult:
    """What a task produced: ``tensors`` (stored name, bytes) in writing order, typed report rows, and ``values``
    a later stage of the plan needs (e.g. a quantized weight as the file reconstructs it, by name)."""

    tensors: list[tuple[str, Encoded]] = field(default_factory=list)
    rows: list[Any] = field(default_factory=list)
    values: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for _, t in self.tensors)


@dataclass(frozen=True)
class Task(ABC):
    """One independent unit of a plan. ``name``: what it is about (progress, messages); ``nbytes``: the
    input bytes it reads (progress)."""

    name: str
    nbytes: int

    @abstractmethod
    def run(self, ctx: TaskContext) -> TaskResult:
        """Read, compute, encode. Pure apart from reading its inputs through ``ctx``."""


@dataclass(frozen=True)
class CopyTensor(Task):
    """Pass one tensor through unchanged (or cast to ``dtype``), with an optional ready-made report row."""

    source: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    cast_to: torch.dtype | None = None
    row: Any = None

    def run(self, ctx: TaskContext) -> TaskResult:
        tensor = ctx.read(self.source, self.name, shape=self.shape, dtype=self.dtype)
        if self.cast_to is not None:
            tensor = tensor.to(self.cast_to)
        return TaskResult([(self.name, encode(tensor))], [] if self.row is None else [self.row])


def run_task(task: Task, ctx: TaskContext) -> TaskResult:
    """Run ``task``; its result carries the rows its inputs made too (first), whichever process ran it."""
    ctx.take_rows()
    result = task.run(ctx)
    result.rows[:0] = ctx.take_rows()
    return result


FAULT_ENV = "COMPRESS_FAULT_INJECTION"


def fault_hook(task: Task, spec: str | None) -> None:
    """Test seam for the executors' failure paths: the value of ``COMPRESS_FAULT_INJECTION`` in the command's
    environment, handed to every worker (None: nothing happens). ``kill:NAME`` ends the worker process running
    task NAME (as an out-of-memory kill would), ``kill-once:NAME:FILE`` does so only if FILE does not exist yet
    (creating it), ``sleep:NAME:SECONDS`` delays the task."""
    if not spec:
        return
    kind, _, rest = spec.partition(":")
    name, _, arg = rest.partition(":")
    if name != task.name:
        return
    if kind == "kill" or (kind == "kill-once" and not os.path.exists(arg)):
        if kind == "kill-once":
            open(arg, "w").close()
        os._exit(137)
    if kind == "sleep":
        import time

        time.sleep(float(arg))
