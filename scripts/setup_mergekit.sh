#!/usr/bin/env bash
# A separate environment for the mergekit-extract-lora baseline (scripts/extract_lora_budget.py
# --mergekit): /work/main/.venv-mergekit, so that mergekit and its dependencies (accelerate, datasets,
# pydantic, scipy) never change what the project's own .venv and tests see.
#
# torch goes in first and alone, as the CPU build (`pip install torch==2.13.0` takes the CPU wheel
# from the machine's find-links); mergekit follows under a constraints file pinning that torch, so
# no resolver step can swap in the multi-GB CUDA build. mergekit 0.1.5 asks for torch>=2.0 and
# transformers>=5,<6, so the main environment's versions fit.
#
# Idempotent: exits at once when .venv-mergekit already runs mergekit-extract-lora.
# Usage: bash scripts/setup_mergekit.sh      (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv-mergekit
PY=$VENV/bin/python
TORCH=2.13.0
MERGEKIT=0.1.5
TRANSFORMERS=5.25.0   # the main .venv's, so both load the checkpoints the same way
PEFT=0.21.2
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ -x "$VENV/bin/mergekit-extract-lora" ] && "$PY" -c "import importlib.metadata as m; assert m.version('mergekit') == '$MERGEKIT'" 2>/dev/null; then
    echo "mergekit $MERGEKIT ready in $VENV"; exit 0
fi
[ -x "$PY" ] || "$PYTHON" -m venv "$VENV"
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
printf 'torch==%s\ntransformers==%s\npeft==%s\n' "$TORCH" "$TRANSFORMERS" "$PEFT" > "$CONSTRAINTS"
"$PY" -m pip install -q --no-cache-dir --upgrade pip
"$PY" -m pip install -q --no-cache-dir "torch==$TORCH"
"$PY" -m pip install -q --no-cache-dir -c "$CONSTRAINTS" "mergekit==$MERGEKIT" "transformers==$TRANSFORMERS" "peft==$PEFT"
"$PY" -c "import importlib.metadata as m; print('mergekit', m.version('mergekit'), 'torch', m.version('torch'), 'transformers', m.version('transformers'))"
