#!/usr/bin/env bash
# A separate environment for the llm-compressor GPTQ baseline (scripts/llmcompressor_gptq.py):
# /work/main/.venv-llmc, so that llmcompressor and its pins (transformers<=5.17, datasets<=5.0.1,
# compressed-tensors==0.19.0, accelerate==1.15.0, auto-round) never change what the project's own
# .venv and tests see.
#
# torch goes in first and alone, as the CPU build: `pip install torch==2.13.0` takes the
# torch-2.13.0+cpu wheel from the machine's find-links (/opt/wheels); everything after it is
# installed under a constraints file pinning torch==2.13.0, so no resolver step can swap in the
# multi-GB CUDA build from PyPI. llmcompressor 0.14.0 asks for torch>=2.10,<=2.14.0, so 2.13.0 fits
# its metadata and no --no-deps is needed.
#
# Idempotent: exits at once when .venv-llmc already imports the pinned versions.
# Usage: bash scripts/setup_llmcompressor.sh      (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv-llmc
PY=$VENV/bin/python
TORCH=2.13.0
LLMC=0.14.0
TRANSFORMERS=5.17.0   # llmcompressor 0.14.0: transformers>=5.15.0,<=5.17.0
GGUF=0.19.0           # the main .venv's gguf (transformers' GGUF loader needs gguf>=0.10)
export PIP_DISABLE_PIP_VERSION_CHECK=1

versions() {
    "$PY" - <<'PYEOF'
import importlib.metadata as md
names = ["torch", "llmcompressor", "compressed-tensors", "transformers", "datasets", "accelerate",
         "auto-round", "gguf", "numpy", "safetensors", "tokenizers", "psutil"]
print("# installed versions: " + ", ".join(f"{n}=={md.version(n)}" for n in names))
PYEOF
}

if [ -x "$PY" ] && "$PY" - "$TORCH" "$LLMC" "$TRANSFORMERS" "$GGUF" <<'PYEOF' 2>/dev/null; then
import sys, importlib.metadata as md
torch_v, llmc_v, tf_v, gguf_v = sys.argv[1:]
import torch, llmcompressor, transformers, gguf, datasets, compressed_tensors  # noqa: F401
ok = (torch.__version__.split("+")[0] == torch_v and torch.version.cuda is None
      and md.version("llmcompressor") == llmc_v and transformers.__version__ == tf_v
      and md.version("gguf") == gguf_v)
sys.exit(0 if ok else 1)
PYEOF
    [ -f "$VENV/.gitignore" ] || echo '*' > "$VENV/.gitignore"
    echo "$VENV already has torch $TORCH (CPU), llmcompressor $LLMC, transformers $TRANSFORMERS, gguf $GGUF"
    versions
    exit 0
fi

[ -x "$PY" ] || "$PYTHON" -m venv "$VENV"
# The repo's .gitignore names only .venv/: the venv ignores itself (as Python 3.13's venv does), so
# nothing in it can reach git.
[ -f "$VENV/.gitignore" ] || echo '*' > "$VENV/.gitignore"
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH" > "$CONSTRAINTS"
pip_install() { "$PY" -m pip install -q --no-cache-dir "$@"; }
pip_install --upgrade pip
# 1. the CPU torch (the +cpu wheel in /opt/wheels ranks above PyPI's CUDA build of the same version)
pip_install "torch==$TORCH"
"$PY" -c "import sys, torch; print('torch', torch.__version__, 'cuda', torch.version.cuda); sys.exit(torch.version.cuda is not None)" \
    || { echo "error: $VENV got a CUDA torch; remove $VENV and make sure the torch-$TORCH+cpu wheel is reachable" >&2; exit 1; }
# 2. llmcompressor and what it needs, torch held at the CPU build
pip_install -c "$CONSTRAINTS" "llmcompressor==$LLMC" "transformers==$TRANSFORMERS" "gguf==$GGUF" psutil
"$PY" -c "import sys, torch; sys.exit(torch.version.cuda is not None or not torch.__version__.startswith('$TORCH'))" \
    || { echo "error: torch changed during the llmcompressor install" >&2; exit 1; }
"$PY" -c "import llmcompressor, compressed_tensors; from llmcompressor import oneshot; from llmcompressor.modifiers.quantization import GPTQModifier"
versions
