#!/usr/bin/env bash
# The real GPTQ loader check: transformers + optimum + gptqmodel load our GPTQ output on CPU and give
# exactly the logits of our dequantized weights (tests/test_loaders.py -k gptqmodel).
# gptqmodel 7.7 needs torch >= 2.14.1, so it lives in its own environment (.venv-gptq, ~6 GB: that
# torch build carries CUDA libraries), apart from the project's CPU-only .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv-gptq/bin/python ] || "$PYTHON" -m venv .venv-gptq
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv-gptq/bin/python -m pip install -q --upgrade pip
.venv-gptq/bin/python -m pip install -q "torch==2.14.1" "gptqmodel==7.7.0" "optimum==2.3.0"
.venv-gptq/bin/python -m pip install -q -e ".[test]"
.venv-gptq/bin/python -c "import gptqmodel, optimum; print('gptqmodel', gptqmodel.__version__)"
HF_HUB_OFFLINE=1 .venv-gptq/bin/python -m pytest -q tests/test_loaders.py -k gptqmodel -p no:cacheprovider
