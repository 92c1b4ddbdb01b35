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
.venv/bin/cmake --build build/cuda-check --target vf_cuda_check 2>&1 | tee -a build/cuda-check.log | grep -E "error|warning|FAILED" || true
.venv/bin/cmake --build build/cuda-check --target vf_cuda_check >/dev/null
echo "CUDA compile check: every csrc/cuda/*.cu built for sm_80 and sm_90"

# The CUDA kernels' own self-test, run on the CPU through csrc/cuda/emu.h (the same kernel source,
# compiled by g++ with an emulator that aborts on races, out-of-bounds accesses and broken barriers).
# The toolkit's headers (cuda_runtime.h): nvcc may be a wrapper script, so ask nvcc where they are.
cuda_include="$(nvcc --dryrun -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/.*INCLUDES="*-I\([^" ]*\).*/\1/p' | head -1)"
[ -f "$cuda_include/cuda_runtime.h" ] || cuda_include="${CUDA_HOME:-/usr/local/cuda}/include"
mkdir -p build/cuda-emu
for f in selftest rows sample; do
  g++ -std=c++17 -O1 -DVF_EMULATE -x c++ -I"$cuda_include" -Icsrc -c "csrc/cuda/$f.cu" -o "build/cuda-emu/$f.o"
done
g++ build/cuda-emu/selftest.o build/cuda-emu/rows.o build/cuda-emu/sample.o -o build/cuda-emu/selftest -lpthread
build/cuda-emu/selftest | tail -3
