"""How a command runs and what it records: device, executor, progress display, and the provenance file.

:class:`RunOptions` is what every command's pipeline function takes besides its own request: where the
math runs, which executor runs the tasks, where progress goes, and the command line (for provenance).
Provenance (:func:`write_provenance`) is the one place for run-specific details (times, paths, versions),
so that weights and reports stay byte-identical between runs.
"""

from __future__ import annotations

import datetime as dt
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from compress import __version__
from compress.formats.output import write_json
from compress.pipeline.execute import ExecutorOptions


class Progress(Protocol):
    """Where a run reports progress (the CLI draws a bar; None draws nothing)."""

    def start(self, label: str, total_bytes: int, total_tasks: int) -> None: ...

    def advance(self, name: str, nbytes: int) -> None: ...

    def stage(self, text: str) -> None: ...


@dataclass(frozen=True)
class RunOptions:
    """How to run a command: ``device`` for the math, ``executor`` for the tasks, ``progress`` display,
    ``argv`` (the command line, for provenance) and ``started`` (its start time)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    executor: ExecutorOptions = field(default_factory=ExecutorOptions)
    progress: Progress | None = None
    argv: tuple[str, ...] = ()
    started: float = field(default_factory=time.time)

    def start(self, label: str, total_bytes: int, total_tasks: int) -> None:
        if self.progress is not None:
            self.progress.start(label, total_bytes, total_tasks)

    def advance(self, name: str, nbytes: int) -> None:
        if self.progress is not None:
            self.progress.advance(name, nbytes)

    def stage(self, text: str) -> None:
        """What the run does now, between tasks (e.g. "block 3/30: calibration forward")."""
        if self.progress is not None:
            self.progress.stage(text)

    @property
    def on_task(self) -> Any:
        """The executor's per-task callback (None when nothing is displayed)."""
        return self.advance if self.progress is not None else None


def provenance(run: RunOptions, command: str, source: Path, out: Path, details: dict[str, Any]) -> dict[str, Any]:
    """What produced an output: tool, version, command line, options, input and output, times, versions."""
    finished = time.time()
    return {
        "tool": "compress", "version": __version__, "command": command, "argv": ["compress", *run.argv],
        **details,
        "input": str(source.resolve()), "output": str(out.resolve()), "device": str(run.device),
        "started_at": dt.datetime.fromtimestamp(run.started, dt.timezone.utc).isoformat(),
        "finished_at": dt.datetime.fromtimestamp(finished, dt.timezone.utc).isoformat(),
        "wall_seconds": round(finished - run.started, 3),
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
    }


def write_provenance(path: Path, run: RunOptions, command: str, source: Path, out: Path,
                     details: dict[str, Any]) -> None:
    """The provenance file at ``path`` (``compress_provenance.json`` in a folder, or a GGUF's sidecar)."""
    write_json(path, provenance(run, command, source, out, details))


def json_safe(obj: Any) -> Any:
    """JSON has no inf/nan: write them as strings so report.json stays standard JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj
