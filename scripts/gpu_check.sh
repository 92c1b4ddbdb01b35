#!/usr/bin/env bash
# Everything a lent GPU machine should run, in the order device time allows (build + tests, then
# compute-sanitizer on the small cuda_smoke subset, then benchmarks). Logs go to $OUT (or ./gpu-out).
# Usage: bash scripts/gpu_check.sh [build|test|sanitize|bench|all]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
step="${1:-all}"
export PYTHONUNBUFFERED=1

build() {
  python3 -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -20 | tee "$OUT/build.log"
  python3 -c "import vae_fast._C as C; print(C.build_info())" | tee -a "$OUT/build.log"
  [ -x csrc/cuda/selftest ] || nvcc -std=c++17 -O3 --expt-relaxed-constexpr -arch=native -Icsrc \
    csrc/cuda/selftest.cu csrc/cuda/rows.cu csrc/cuda/sample.cu -o "$OUT/selftest" 2>&1 | tail -5
  [ -x "$OUT/selftest" ] && "$OUT/selftest" | tee "$OUT/selftest.log" | tail -3
}
tests() { python3 -m pytest -q -x -p no:cacheprovider --durations=15 tests 2>&1 | tee "$OUT/tests.log" | tail -30; }
sanitize() {
  for tool in memcheck racecheck; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 1 \
      python3 -m pytest -q -p no:cacheprovider -m cuda_smoke tests/test_cuda.py 2>&1 | tee "$OUT/sanitizer-$tool.log" | tail -8
  done
}
bench() { python3 -m vae_fast bench --device cuda --out benchmarks/results 2>&1 | tee "$OUT/bench.log" | tail -40; cp benchmarks/results/*.json benchmarks/results/*.md "$OUT"/ 2>/dev/null; }

case "$step" in
  build) build ;; test) tests ;; sanitize) sanitize ;; bench) bench ;;
  all) build && tests; sanitize; bench ;;
  *) echo "unknown step $step"; exit 2 ;;
esac
