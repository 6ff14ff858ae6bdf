"""How a quantize run chooses its grids and codes: the algorithm and its calibration inputs, checked against the
output container before anything is read.

- folder layouts (bnb, gptq, compressed-tensors, native): ``rtn``, ``optimize`` (calibration-free), ``gptq``
  (calibration: ``--calibration``, samples, length, seed, ``--act-order``);
- GGUF: ``rtn`` (llama.cpp's reference quantizers), ``optimize`` (llama.cpp's importance-weighted searches with
  uniform importance), ``gptq`` (the block scales by the importance-weighted search, the codes by GPTQ, from
  ``--calibration`` as for folders), and with an importance matrix -- ``--imatrix FILE`` (llama-imatrix's, or
  ours) or one computed from ``--calibration`` -- the searches weighted by it, byte-identical to
  ``llama-quantize --imatrix`` (an importance matrix implies ``optimize``); ``--save-imatrix FILE`` writes the
  matrix used (with ``gptq``: the diagonals of its statistics).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from compress.calib.text import CalibrationOptions
from compress.errors import OptionError
from compress.quant.gptq import GPTQConfig


@dataclass(frozen=True)
class AlgorithmSettings:
    algorithm: str = "rtn"
    calibration: CalibrationOptions | None = None  # None: no --calibration given
    gptq: GPTQConfig | None = None
    imatrix: Path | None = None
    save_imatrix: Path | None = None
    # the sample options given with or without --calibration (gptq calibrates on the default text when it is absent)
    sampling: CalibrationOptions = field(default_factory=CalibrationOptions)

    def for_container(self, container: str) -> AlgorithmSettings:
        """These settings checked for a ``folder`` or ``file`` (GGUF) output; OptionError if they do not apply."""
        if container == "folder":
            if self.imatrix is not None or self.save_imatrix is not None:
                raise OptionError("--imatrix and --save-imatrix apply to --format gguf",
                                  fix="Drop them, or write a GGUF (--format gguf).")
            if self.algorithm == "gptq" and self.calibration is None:
                return replace(self, calibration=self.sampling)
            if self.calibration is not None and self.algorithm != "gptq":
                raise OptionError(f"--calibration applies to --algorithm gptq, not {self.algorithm}",
                                  fix="Add --algorithm gptq, or drop --calibration.")
            return self
        if self.algorithm == "gptq":
            if self.imatrix is not None:
                raise OptionError("--imatrix gives only each column's importance; --algorithm gptq needs the "
                                  "calibration inputs themselves",
                                  fix="Drop --imatrix (gptq calibrates on --calibration, default text if absent).")
            return self if self.calibration is not None else replace(self, calibration=self.sampling)
        if self.imatrix is not None and self.calibration is not None:
            raise OptionError("--imatrix and --calibration both give an importance matrix",
                              fix="Pass one of them.")
        if self.save_imatrix is not None and self.imatrix is None and self.calibration is None:
            raise OptionError("--save-imatrix needs an importance matrix to save",
                              fix="Add --calibration default (or a text file) to compute one.")
        if self.imatrix is not None or self.calibration is not None:
            return replace(self, algorithm="optimize")
        return self

    @property
    def uses_importance_matrix(self) -> bool:
        """Whether a GGUF run quantizes with importance statistics (GPTQ's are one): llama-quantize's recipe
        with an importance matrix applies."""
        return self.imatrix is not None or self.calibration is not None or self.algorithm == "gptq"
