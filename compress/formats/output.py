"""Where a run's output goes: one check of the output path, and one way to make it appear atomically.

Every writing command checks its output with :func:`check_output` before it reads any data, and writes
through a :class:`Staging`: everything goes to temporary paths beside the output (a hidden folder, or a
hidden file per output file) and is renamed into place by :meth:`Staging.commit`, only after the whole
run succeeded. On any error :meth:`Staging.abort` removes the temporary paths and the parent folders
that were made for them, so the output is either complete or absent, and an existing output is left
as it was unless ``--force`` was given.

Two shapes: :class:`OutputFolder` (a checkpoint or adapter folder) and :class:`OutputFile` (one file,
such as a ``.gguf``, plus sidecar files beside it, e.g. ``OUT.report.md``).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compress.errors import OutputError

_FIX_OTHER_PATH = "Choose a different output path."


def _overlaps(out: Path, src: Path, *, nested_output: bool) -> bool:
    out_abs, src_abs = out.resolve(), src.resolve()
    return out_abs == src_abs or src_abs in out_abs.parents or (nested_output and out_abs in src_abs.parents)


def check_output(out: Path, *, force: bool, inputs: list[Path], kind: str = "folder",
                 sidecars: tuple[Path, ...] = ()) -> None:
    """Refuse an output that would lose data: one that overlaps an input, or exists without ``force``.

    ``kind="folder"``: ``out`` is a folder; with ``force`` only a folder is replaced (never a file or a
    symlink). ``kind="file"``: ``out`` and each sidecar are files; none may be a folder.
    """
    for src in inputs:
        if _overlaps(out, src, nested_output=kind == "folder"):
            raise OutputError(f"output {out} overlaps the input {src}", fix=_FIX_OTHER_PATH)
    if kind == "folder":
        if out.exists() or out.is_symlink():
            if not force:
                raise OutputError(f"output {out} already exists",
                                  fix="Pass --force to replace it, or choose another path.")
            if not out.is_dir() or out.is_symlink():
                raise OutputError(f"output {out} exists and is not a folder",
                                  fix="Remove it or choose another path (--force only replaces folders).")
        return
    for path in (out, *sidecars):
        if path.is_dir():
            raise OutputError(f"output {path} is a folder", fix="Remove it or choose another output path.")
        if (path.exists() or path.is_symlink()) and not force:
            raise OutputError(f"output {path} already exists",
                              fix="Pass --force to replace it, or choose another path.")


def _hidden(path: Path, tag: str) -> Path:
    """A hidden path beside ``path`` naming the writing process: ``.NAME.tmp-PID-XXXXXXXX``."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


class _Writing:
    """The output being written now and its projected size, for the message a full disk gets."""

    out: Path | None = None
    expected_bytes: int | None = None


WRITING = _Writing()


def start_command() -> None:
    """Forget the previous command's output and projected size (commands run in one process: tests, a library)."""
    WRITING.out = None
    WRITING.expected_bytes = None


def expect_output_bytes(nbytes: int) -> None:
    """The projected size of the output about to be written (said when the disk fills up)."""
    WRITING.expected_bytes = int(nbytes)


def disk_full_message(error: OSError) -> str:
    """One line for ENOSPC / EDQUOT: where, how much the output needs (when projected) and how much was free."""
    out = WRITING.out
    place = out if out is not None else Path(error.filename or ".")
    probe = place
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
        free_text = f"{free / 2**20:.1f} MiB were free there"
    except OSError:
        free_text = "the free space could not be read"
    kind = "the disk quota is exhausted" if error.errno == errno.EDQUOT else "no space left on the device"
    need = (f"the output needs about {WRITING.expected_bytes / 2**20:.1f} MiB, "
            if WRITING.expected_bytes is not None else "")
    return f"{kind} while writing {place}: {need}{free_text}; nothing was written"


def notice(line: str, *, kind: str = "note") -> None:
    """One line to stderr for the user (the CLI prints errors itself; this is for what it should know):
    ``note`` or ``warning`` (the run goes on, but the input was odd)."""
    print(f"{kind}: {line}", file=sys.stderr, flush=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _path_bytes(path: Path) -> int:
    if path.is_dir() and not path.is_symlink():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
    return path.lstat().st_size


def remove_leftovers(out: Path) -> list[Path]:
    """Temporary outputs (``.NAME.tmp-PID-*``, ``.NAME.old-PID-*``) that a killed run (SIGKILL, a power cut) left
    beside ``out``: removed when the process that made them is gone, each with one line saying so. Those of a run
    still going on are left alone."""
    parent = out.parent if str(out.parent) else Path(".")
    removed: list[Path] = []
    try:
        candidates = sorted(parent.glob(f".{glob.escape(out.name)}.*-*"))
    except OSError:
        return removed
    for path in candidates:
        match = _LEFTOVER.fullmatch(path.name[len(out.name) + 1:])
        if match is None or _process_alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            size = _path_bytes(path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
            notice(f"removed {path}, a temporary output ({size / 2**20:.1f} MiB) left by an interrupted run")
    return removed


_LEFTOVER = re.compile(r"\.(?:tmp|old)-(\d+)-[0-9a-f]{8}")


class Staging:
    """Temporary paths beside the output, renamed into place on :meth:`commit`. A context manager:
    leaving it with an exception aborts; leaving it normally without a commit aborts too."""

    def __init__(self, out: Path, *, force: bool) -> None:
        self.out = out
        self.force = force
        self.parent = out.parent if str(out.parent) else Path(".")
        self._created: list[Path] = []
        self._done = False

    def _make_parent(self) -> None:
        WRITING.out = self.out
        self._created = [p for p in (self.parent, *self.parent.parents) if not p.exists()]  # innermost first
        if not self._created:
            remove_leftovers(self.out)
        try:
            self.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create folder {self.parent} ({e.strerror})",
                              fix="Choose an output path you can write to.") from e
        if not os.access(self.parent, os.W_OK):
            raise OutputError(f"folder {self.parent} is not writable", fix="Choose an output path you can write to.")

    def _remove_created_parents(self) -> None:
        for folder in self._created:
            with contextlib.suppress(OSError):  # not empty: something else wrote there meanwhile
                folder.rmdir()

    def _check_still_free(self, path: Path) -> None:
        if (path.exists() or path.is_symlink()) and not self.force:  # appeared while we were working
            raise OutputError(f"output {path} already exists", fix="Pass --force to replace it.")

    def commit(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __exit__(self, exc_type: object, *_: object) -> None:
        if not self._done:
            self.abort()


class OutputFolder(Staging):
    """A folder output: ``path`` is a hidden temporary folder beside ``out``, renamed to ``out`` on commit
    (an existing ``out`` is replaced only with ``force``, after the new one is complete)."""

    def __enter__(self) -> OutputFolder:
        self._make_parent()
        self.path = _hidden(self.out, "tmp")
        self.path.mkdir()
        return self

    def commit(self) -> None:
        try:
            self._check_still_free(self.out)
            if self.out.exists():
                backup = _hidden(self.out, "old")
                self.out.rename(backup)
                self.path.rename(self.out)
                shutil.rmtree(backup, ignore_errors=True)
            else:
                self.path.rename(self.out)
        except BaseException:
            self.abort()
            raise
        self._done = True

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self._remove_created_parents()
        self._done = True


class OutputFile(Staging):
    """One file plus sidecar files beside it: ``path`` and ``sidecar(final)`` are hidden temporary files,
    renamed into place on commit (the main file first)."""

    def __init__(self, out: Path, *, force: bool, must_exist_parent: bool = False) -> None:
        super().__init__(out, force=force)
        self.must_exist_parent = must_exist_parent
        self._sidecars: dict[Path, Path] = {}

    def __enter__(self) -> OutputFile:
        if self.must_exist_parent and not self.parent.is_dir():
            raise OutputError(f"folder {self.parent} does not exist", fix="Create it or choose another output path.")
        self._make_parent()
        self.path = _hidden(self.out, "tmp")
        return self

    def sidecar(self, final: Path) -> Path:
        """The temporary path to write the sidecar ``final`` to."""
        if final not in self._sidecars:
            self._sidecars[final] = _hidden(final, "tmp")
        return self._sidecars[final]

    def commit(self) -> None:
        try:
            for final in (self.out, *self._sidecars):
                self._check_still_free(final)
            os.replace(self.path, self.out)
            for final, tmp in self._sidecars.items():
                os.replace(tmp, final)
        except BaseException:
            self.abort()
            raise
        self._done = True

    def abort(self) -> None:
        for tmp in (self.path, *self._sidecars.values()):
            with contextlib.suppress(OSError):
                tmp.unlink()
        self._remove_created_parents()
        self._done = True


@contextlib.contextmanager
def atomic_output_dir(out: Path, *, force: bool) -> Iterator[Path]:
    """A temporary folder beside ``out`` that replaces ``out`` when the block succeeds (else is removed)."""
    with OutputFolder(out, force=force) as staging:
        yield staging.path
        staging.commit()


def json_text(obj: Any, *, ascii_only: bool = False) -> str:
    """Deterministic, human-readable JSON (insertion order kept: sorted keys would reorder configs)."""
    return json.dumps(obj, indent=2, ensure_ascii=ascii_only) + "\n"


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it and a rename: never half-written."""
    tmp = _hidden(path, "tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json_text(obj))
