#!/usr/bin/env bash
# Install a pinned llama-cpp-python (llama.cpp's C library + Python bindings) into .venv, built from
# source for the CPU. Used by tests/test_llamacpp.py and scripts/check_gguf_llamacpp.py to load our
# GGUF exports in llama.cpp itself; everything else in the project works without it.
#
# PyPI ships llama-cpp-python as source only, so this compiles llama.cpp: 11 min wall on 2 cores shared
# with other work (10 CPU-minutes, so ~5-6 min on 2 idle cores).
# The build is portable to any x86-64 machine with AVX2/FMA/F16C/BMI2 (x86-64-v3, Haswell and later):
# GGML_NATIVE=OFF stops -march=native, which would tie the binary to this CPU's AVX-512.
# OpenMP is off (ggml's own thread pool instead) so llama.cpp's libgomp and torch's bundled one do not
# fight over threads when both live in one pytest process. The multimodal library (mtmd) is not built.
#
# Idempotent: does nothing when the pinned version is already importable. pip keeps the wheel it
# built in its cache (~/.cache/pip/wheels, 20 MB), so a new .venv on the same machine installs it in
# seconds; the cache key is the version, not CMAKE_ARGS: after changing them, run
# `.venv/bin/pip cache remove llama_cpp_python` first.
# Writes .venv/llama-cpp-python.build.json (seconds, flags, load) for scripts/check_gguf_llamacpp.py.
# Needs: a C/C++ compiler (g++ or clang++); cmake >= 3.21 and ninja are taken from PyPI by the build
# when the system has none.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
PY=.venv/bin/python
[ -x "$PY" ] || { echo "error: $PY not found; run scripts/setup.sh first" >&2; exit 2; }

if "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
    echo "llama-cpp-python $VERSION already installed"
    exit 0
fi
if ! command -v "${CXX:-c++}" >/dev/null && ! command -v g++ >/dev/null && ! command -v clang++ >/dev/null; then
    echo "error: no C++ compiler found; install one (e.g. apt-get install -y g++) and rerun" >&2
    exit 2
fi

export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_OPENMP=OFF -DGGML_CCACHE=OFF -DLLAVA_BUILD=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
if "$PY" -m pip cache list "llama_cpp_python-$VERSION-*" 2>/dev/null | grep -q "llama_cpp_python-$VERSION-"; then
    how="cached wheel"  # built earlier on this machine
    echo "installing llama-cpp-python $VERSION from pip's cache of the wheel built earlier"
else
    how="source build"
    echo "building llama-cpp-python $VERSION from source ($CMAKE_BUILD_PARALLEL_LEVEL jobs, load: $load_before)"
fi
start=$(date +%s)
# --no-binary: never a prebuilt wheel from an index (CUDA or -march=native builds exist elsewhere);
# pip's cache of the wheel built here is still used. Its runtime dependencies (numpy, typing-extensions,
# jinja2, diskcache) are small and pure Python except numpy, which .venv already has.
"$PY" -m pip install -q --no-binary llama-cpp-python "llama-cpp-python==$VERSION"
end=$(date +%s)
cpu_file=$(mktemp)
times > "$cpu_file"  # in this shell (not a subshell): its second line is the build's user and system CPU time
cpu=$(tail -1 "$cpu_file")
rm -f "$cpu_file"
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
"$PY" - "$VERSION" "$((end - start))" "$CMAKE_BUILD_PARALLEL_LEVEL" "$load_before" "$load_after" "$cpu" "$how" <<'PYEOF'
import json, os, sys, llama_cpp
version, seconds, jobs, before, after, cpu, how = sys.argv[1:]
info = {"version": version, "how": how, "seconds": int(seconds), "jobs": int(jobs), "cpus": os.cpu_count(),
        "loadavg_before": before, "loadavg_after": after, "cpu_user_sys": cpu, "cmake_args": os.environ["CMAKE_ARGS"],
        "system_info": llama_cpp.llama_print_system_info().decode().strip()}
with open(".venv/llama-cpp-python.build.json", "w") as f:
    json.dump(info, f, indent=1)
print("llama-cpp-python", llama_cpp.__version__, "|", info["system_info"])
PYEOF
echo "llama-cpp-python install time ($how): $((end - start)) s, CPU user/sys $cpu (load average before: $load_before, after: $load_after)"
