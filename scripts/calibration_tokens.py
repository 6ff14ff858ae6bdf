"""Write the calibration token samples that compress itself uses, for other tools to calibrate on.

    .venv/bin/python scripts/calibration_tokens.py MODEL --samples 32 --length 512 --seed 0 -o tokens.npy

MODEL: a checkpoint folder with tokenizer files (e.g. the output of `compress dequantize`). The samples come
from compress.calib.importance.calibration_tokens, the same sampler `compress quantize --calibration ...` runs,
so a baseline fed this file (scripts/llmcompressor_gptq.py) sees exactly the tokens our GPTQ sees.
OUT: an int64 [samples, length] array, .npy (numpy) or .pt (torch). Beside it, OUT.json records the
calibration options and the text's sha256.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="checkpoint folder with tokenizer files")
    parser.add_argument("--calibration", default="default", help="calibration text: 'default' or a UTF-8 file")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", type=Path, required=True, help="tokens file (.npy or .pt)")
    args = parser.parse_args(argv)

    import torch

    from compress.calib.importance import calibration_tokens
    from compress.calib.text import CalibrationOptions

    options = CalibrationOptions(args.calibration, args.samples, args.length, args.seed)
    tokens, sha256 = calibration_tokens(Path(args.model), options, keep=[])
    tokens = tokens.to(torch.int64).contiguous()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if args.output.suffix == ".pt":
        torch.save(tokens, args.output)
    elif args.output.suffix == ".npy":
        import numpy as np

        np.save(args.output, tokens.numpy())
    else:
        parser.error(f"{args.output}: use a .npy or .pt file name")
    meta = {**options.as_dict(), "text_sha256": sha256, "shape": list(tokens.shape), "model": str(args.model)}
    Path(f"{args.output}.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{args.output}: {tuple(tokens.shape)} int64 tokens, calibration text sha256 {sha256[:16]}…")
    return 0


if __name__ == "__main__":
    sys.exit(main())
