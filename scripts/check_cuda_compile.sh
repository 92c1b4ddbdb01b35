#!/usr/bin/env bash
# Compiles every CUDA source for sm_80 and sm_90 with nvcc. The .cu files include no torch header,
# so this works with a CPU-only torch and no GPU (CI runs it: a CUDA compile error fails CI).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1; then
  echo "nvcc not found: CUDA compile check skipped"
  exit 0
fi
.venv/bin/cmake -S . -B build/cuda-check -G Ninja -DPython3_EXECUTABLE="$PWD/.venv/bin/python" \
  -DCMAKE_CUDA_COMPILER="$(command -v nvcc)" >build/cuda-check.log 2>&1 || { cat build/cuda-check.log; exit 1; }
.venv/bin/cmake --build build/cuda-check --target vf_cuda_check 2>&1 | tee -a build/cuda-check.log | grep -E "error|warning|FAILED|registers|spill" || true
.venv/bin/cmake --build build/cuda-check --target vf_cuda_check >/dev/null
echo "CUDA compile check: every csrc/cuda/*.cu built for sm_80 and sm_90"
