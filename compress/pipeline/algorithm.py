"""How a quantize run chooses its grids and codes: the algorithm and its calibration inputs, checked against the
output container before anything is read.

- folder layouts (bnb, gptq, compressed-tensors, native): ``rtn``, ``optimize`` (calibration-free), ``gptq``
  (calibration: ``--calibration``, samples, length, seed, ``--act-order``);
- GGUF: ``rtn`` (llama.cpp's reference quantizers), ``optimize`` (llama.cpp's importance-weighted searches with
  uniform importance), and with an importance matrix -- ``--imatrix FILE`` (llama-imatrix's, or ours) or one
  computed from ``--calibration`` -- the searches weighted by it, byte-identical to ``llama-quantize --imatrix``
  (an importance matrix implies ``optimize``); ``--save-imatrix FILE`` writes the matrix used.
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
            raise OptionError("--algorithm gptq does not write GGUF files yet",
                              fix="For GGUF use an importance matrix: --calibration default (or --imatrix FILE).")
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
        return self.imatrix is not None or self.calibration is not None
