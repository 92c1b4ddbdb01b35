#!/usr/bin/env bash
# Compiles every CUDA source for sm_80 and sm_90 with nvcc (-Werror=all-warnings): the shipped
# kernels (csrc/cuda/*.cu) and the test-only ones (tests/cuda/: the self-test, linked with the
# kernels, and the race check), then builds and runs the kernels' own self-test on the CPU emulator
# (tests/cuda/emu.h). The .cu files include no torch header, so this works with a CPU-only torch and
# no GPU (CI runs it: a CUDA compile error, a failed self-test or an undetected shared-memory race
# fails CI). nvcc's self-test binary (for a GPU) is left at build/cuda-check/vf_cuda_selftest.
# Leaves the emulated self-test at build/cuda-emu/selftest (tests/test_known_answers.py runs its
# --dump-eps). Python: $PYTHON, else .venv/bin/python.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1; then
  echo "nvcc not found: CUDA compile check skipped"
  exit 0
fi
py="${PYTHON:-$PWD/.venv/bin/python}"
cmake="$(dirname "$py")/cmake"
[ -x "$cmake" ] || cmake=cmake
mkdir -p build
"$cmake" -S . -B build/cuda-check -G Ninja -DPython3_EXECUTABLE="$py" \
  -DCMAKE_CUDA_COMPILER="$(command -v nvcc)" >build/cuda-check.log 2>&1 || { cat build/cuda-check.log; exit 1; }
"$cmake" --build build/cuda-check --target vf_cuda_check vf_cuda_selftest vf_cuda_race_check \
  >>build/cuda-check.log 2>&1 || {
  grep -E -B2 -A8 "error|warning|FAILED" build/cuda-check.log | head -80
  exit 1
}
echo "CUDA compile check: every csrc/cuda/*.cu and tests/cuda/*.cu built for sm_80 and sm_90 with -Werror=all-warnings"

# The CUDA kernels' own self-test, run on the CPU through tests/cuda/emu.h (the same kernel source,
# compiled by g++ with an emulator that aborts on races, out-of-bounds accesses and broken barriers;
# -Itests/cuda is how common.cuh's #include "emu.h" under VF_EMULATE finds it).
# The toolkit's headers (cuda_runtime.h): nvcc may be a wrapper script, so ask nvcc where they are.
cuda_include="$(nvcc --dryrun -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/.*INCLUDES="*-I\([^" ]*\).*/\1/p' | head -1)"
[ -f "$cuda_include/cuda_runtime.h" ] || cuda_include="${CUDA_HOME:-/usr/local/cuda}/include"
emu=build/cuda-emu
mkdir -p "$emu"
emu_cxx() { g++ -std=c++17 -O1 -DVF_EMULATE -x c++ -I"$cuda_include" -Icsrc -Itests/cuda "$@"; }
pids=()
for f in tests/cuda/selftest csrc/cuda/rows csrc/cuda/sample; do
  emu_cxx -c "$f.cu" -o "$emu/$(basename "$f").o" & pids+=($!)
done
# The race check: every barrier in place must pass; each needed barrier dropped must be caught.
for d in 0 1 2; do
  emu_cxx -DVF_DROP_BARRIER=$d tests/cuda/race_check.cu -o "$emu/race_check_$d" & pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done  # (set -e: a failed compile stops here)
g++ "$emu/selftest.o" "$emu/rows.o" "$emu/sample.o" -o "$emu/selftest" -lpthread
"$emu/race_check_0"
for d in 1 2; do
  # (in a subshell that reports the expected abort into the log, not on the terminal)
  if ("$emu/race_check_$d"; rc=$?; exit $rc) >"$emu/race_check_$d.log" 2>&1; then
    echo "FAIL: the emulator did not catch the race of group_sum without barrier $d"
    exit 1
  fi
  grep -q "shared memory" "$emu/race_check_$d.log" || { cat "$emu/race_check_$d.log"; exit 1; }
  echo "race check: group_sum without barrier $d caught: $(grep -o 'emu: [^(]*' "$emu/race_check_$d.log")"
done
rc=0
"$emu/selftest" >"$emu/selftest.log" 2>&1 || rc=$?
grep -E "^FAIL|^emu:|CUDA error" "$emu/selftest.log" | head -40 || true
tail -2 "$emu/selftest.log"
exit $rc
