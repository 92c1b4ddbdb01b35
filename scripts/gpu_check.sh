#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one call that fits 12 minutes on an H100/H200:
#   build     editable build with the machine's own torch (never installs one), VAE_FAST_CUDA=ON,
#             asserts build_info()['cuda']
#   selftest  the kernels' self-test compiled natively (nvcc, sm_90) and run on the GPU
#   tests     every test that runs on CUDA (the `device` fixture's cuda cases and tests/test_cuda.py)
#   memcheck, racecheck   compute-sanitizer on `-m cuda_smoke` (PYTORCH_NO_CUDA_MEMORY_CACHING=1)
#   bench     fused vs eager against the device copy bandwidth at 16 MB, 256 MB and 1 GB per tensor,
#             float32 and bfloat16; then torch.compile and the model lines at 1 GB (as time allows)
# Every step has its own timeout and runs whatever the earlier ones gave (nothing stops at the first
# failure; a step that needs the build is skipped when the build failed). Logs and results go to
# $OUT (or ./gpu-out): summary.md (the table printed at the end), logs.tar.gz (one log per step),
# bench-fast/ and bench-compile/ (the benchmark's JSON and Markdown). At most 8 files, as the device
# tool brings back.
# Usage: bash scripts/gpu_check.sh [STEP ...]   (default: all steps; GPU_CHECK_BUDGET_S=690 total)
# Before a device run, carry what the machine lacks: `pip download --no-deps -d .whl expecttest`
# (.whl/ is git-ignored; name it in the run's carry list).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
WORK="$(mktemp -d)"
LOGS="$WORK/logs"
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
command -v nvcc >/dev/null 2>&1 || export PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
BUDGET="${GPU_CHECK_BUDGET_S:-690}"
T0=$SECONDS
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(build selftest tests memcheck racecheck bench)
SUMMARY=()
BUILD_OK=0

# run_step NAME LIMIT_S COMMAND...: runs with a timeout of min(LIMIT_S, what is left of the budget
# minus a reserve for the summary); records PASS / FAIL (rc) / TIMEOUT / SKIPPED and the seconds.
run_step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - T0) - 15))
  local t=$((limit < left ? limit : left))
  if [ "$t" -lt 20 ]; then
    SUMMARY+=("| $name | SKIPPED | 0 | no time left in the ${BUDGET} s budget |")
    echo "== $name: skipped (no time left)"
    return 0
  fi
  echo "== $name (timeout ${t} s)"
  local s=$SECONDS rc=0
  timeout --kill-after=10 "$t" bash -c "$*" >"$LOGS/$name.log" 2>&1 || rc=$?
  local d=$((SECONDS - s)) status=PASS
  [ $rc -ne 0 ] && status="FAIL (rc $rc)"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="TIMEOUT (${t} s)"
  local note
  note="$(grep -E -h "passed|failed|ERROR SUMMARY|RACECHECK SUMMARY|'cuda': |copy bandwidth|wrote " "$LOGS/$name.log" | tail -2 | tr '|\n' '/ ' | cut -c1-160)"
  SUMMARY+=("| $name | $status | $d | $note |")
  tail -5 "$LOGS/$name.log"
  return $rc
}

step_build() {
  # The selftest binary compiles meanwhile (it needs no torch).
  (nvcc -std=c++17 -O3 --expt-relaxed-constexpr -gencode arch=compute_90,code=sm_90 -Icsrc \
     csrc/cuda/selftest.cu csrc/cuda/rows.cu csrc/cuda/sample.cu -o "$WORK/selftest" >"$LOGS/selftest-build.log" 2>&1 &)
  run_step build 330 "
    set -e
    $PY -c 'import torch; print(\"torch\", torch.__version__, \"CUDA\", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no GPU visible\")'
    nvcc --version | tail -2
    # Test-only packages the machine lacks (expecttest, for torch's OpInfo tests), carried as wheels in
    # .whl/ (no network there); torch itself is never installed.
    if compgen -G '.whl/*.whl' >/dev/null; then $PY -m pip install -q --no-index --no-deps .whl/*.whl; fi
    VAE_FAST_CUDA=ON $PY -m pip install --no-build-isolation --no-deps -v -e .
    $PY -c 'import vae_fast._C as C; i = C.build_info(); print(i); assert i[\"cuda\"], \"build_info says no CUDA\"'
  " && BUILD_OK=1
}

step_selftest() {
  run_step selftest 200 "
    for i in \$(seq 1 180); do [ -x '$WORK/selftest' ] && break; pgrep -f 'nvcc.*selftest' >/dev/null || break; sleep 1; done
    cat '$LOGS/selftest-build.log'
    [ -x '$WORK/selftest' ] || { echo 'selftest did not build'; exit 1; }
    '$WORK/selftest' | grep -E '^FAIL|passed'
  "
}

needs_build() {
  if [ $BUILD_OK -ne 1 ]; then
    SUMMARY+=("| $1 | SKIPPED | 0 | the build failed |")
    return 1
  fi
}

step_tests() {
  needs_build tests || return 0
  run_step tests 240 "$PY -m pytest -q -p no:cacheprovider -o faulthandler_timeout=100 --durations=10 -k cuda tests"
}

step_sanitizer() {  # $1: memcheck or racecheck
  needs_build "$1" || return 0
  run_step "$1" 150 "PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool $1 --error-exitcode 1 \
    $PY -m pytest -q -p no:cacheprovider -m cuda_smoke tests/test_cuda.py"
}

step_bench() {
  needs_build bench-fast || { needs_build bench-compile; return 0; }
  run_step bench-fast 200 "$PY -m vae_fast bench --device cuda --no-compile --no-model --out '$WORK/bench-fast'"
  if [ $((BUDGET - (SECONDS - T0))) -lt 260 ]; then  # it needs minutes: do not start what cannot finish
    SUMMARY+=("| bench-compile | SKIPPED | 0 | under 260 s of the budget left |")
    return 0
  fi
  run_step bench-compile 400 "$PY -m vae_fast bench --device cuda --sizes 262144x1024 --out '$WORK/bench-compile'"
}

for step in "${STEPS[@]}"; do
  case "$step" in
    build) step_build ;;
    selftest) step_selftest ;;
    tests) step_tests ;;
    memcheck | racecheck) step_sanitizer "$step" ;;
    bench) step_bench ;;
    *) echo "unknown step $step (build selftest tests memcheck racecheck bench)"; exit 2 ;;
  esac
done

for b in bench-fast bench-compile; do
  if compgen -G "$WORK/$b/*.json" >/dev/null; then
    mkdir -p "$OUT/$b"
    cp "$WORK/$b"/*.json "$WORK/$b"/*.md "$OUT/$b"/ 2>/dev/null
  fi
done
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs
{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo
  echo "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
  echo
  echo "| step | status | s | note |"
  echo "|---|---|---|---|"
  printf '%s\n' "${SUMMARY[@]}"
  echo
  echo "total $((SECONDS - T0)) s of a ${BUDGET} s budget; logs in logs.tar.gz"
} >"$OUT/summary.md"
echo
cat "$OUT/summary.md"
rm -rf "$WORK"
grep -q -E "FAIL|TIMEOUT" "$OUT/summary.md" && exit 1
exit 0
