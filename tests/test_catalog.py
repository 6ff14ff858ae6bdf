"""The catalog (compress.catalog): what the command line offers, torch-free, and the registries built from it.

- Every registry lists exactly the catalog's entries with the catalog's words (so --help and `compress methods`,
  built from the catalog, describe what runs).
- `--help`, `methods`, a command's --help and an option error answer without importing torch (a fresh process
  each, as a user runs them); a command that runs still loads it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from compress import catalog


def test_registries_are_the_catalog() -> None:
    from compress.formats import FORMATS
    from compress.merge.combine import COMBINE_METHODS
    from compress.merge.lora import QALORA_POOLING
    from compress.merge.requant import STRATEGIES
    from compress.pipeline.execute import EXECUTORS
    from compress.quant import ALGORITHMS, METHODS
    from compress.quant.int4 import GROUP_SIZES
    from compress.quant.nf4 import BLOCK_SIZES

    assert list(METHODS) == list(catalog.METHODS)
    for name, method in METHODS.items():
        info = catalog.METHODS[name]
        assert (method.summary, method.default_format, method.reference) == (info.summary, info.default_format,
                                                                            info.reference)
    assert list(FORMATS) == list(catalog.FORMATS)
    for name, fmt in FORMATS.items():
        info = catalog.FORMATS[name]
        assert (fmt.name, fmt.summary, tuple(fmt.methods), fmt.container) == (name, info.summary, info.methods,
                                                                               info.container)
    assert list(COMBINE_METHODS) == list(catalog.COMBINE)
    for name, cls in COMBINE_METHODS.items():
        assert (cls.summary, cls.paper) == (catalog.COMBINE[name].summary, catalog.COMBINE[name].paper)
    assert tuple(QALORA_POOLING) == catalog.QALORA_POOLINGS
    assert STRATEGIES is catalog.STRATEGIES and EXECUTORS is catalog.EXECUTORS and ALGORITHMS is catalog.ALGORITHMS
    assert GROUP_SIZES is catalog.GROUP_SIZES and BLOCK_SIZES is catalog.BLOCK_SIZES
    for fmt in FORMATS.values():  # every method a format stores is one the catalog offers
        assert set(fmt.methods) <= set(METHODS)


PROBE = """
import sys
from compress.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
print("torch loaded" if "torch" in sys.modules else "torch not loaded", rc, file=sys.stderr)
"""


@pytest.mark.parametrize(("argv", "rc"), [(["--help"], 0), (["methods"], 0), (["quantize", "--help"], 0),
                                          (["extract-lora", "--help"], 0), (["merge", "--help"], 0),
                                          (["quantize", "m", "--method", "bogus"], 2),
                                          (["merge", "m", "--strategy", "x"], 2), (["nonsense"], 2)])
def test_help_methods_and_option_errors_need_no_torch(argv: list[str], rc: int) -> None:
    r = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    assert r.stderr.strip().splitlines()[-1] == f"torch not loaded {rc}", r.stderr
    if rc == 2:
        assert r.stderr.startswith("error: "), r.stderr


def test_a_command_that_runs_loads_torch(tmp_path) -> None:
    r = subprocess.run([sys.executable, "-c", PROBE, "inspect", str(tmp_path / "missing")], capture_output=True,
                       text=True, timeout=120)
    assert r.stderr.strip().splitlines()[-1] == "torch loaded 2", r.stderr
