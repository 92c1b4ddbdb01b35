#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one call of at most 8 minutes (GPU_CHECK_BUDGET_S=480),
# the numbers that matter first:
#   build      editable build with the machine's own torch (never installs one), VAE_FAST_CUDA=ON, asserts
#              build_info()['cuda']; installs the test extras carried in .whl/ (expecttest, diffusers)
#   smoke      tests/test_cuda.py (CUDA-only: Philox across devices, CUDA graphs by hand, torch.compile
#              reduce-overhead in a training loop, a whole training step in one graph, autocast, ...)
#   selftest   the kernels' self-test (tests/cuda/selftest.cu) compiled natively (nvcc, sm_90, during the build), run
#   ops-1gb-f32, ops-1gb-bf16    every op at 262144 x 1024 (1 GB per float32 tensor): fused, eager and
#              torch.compile (compiled per op, dtype and pass), against the device copy bandwidth
#   train, train-ldm    training steps: the 784-512-20 MLP VAE at batch 1024 and 16384 and IWAE K = 50 (one
#              process, each config saved as it finishes), then a small diffusers AutoencoderKL step with
#              vae_fast's posterior; fused vs eager vs compile vs compile with CUDA graphs (reduce-overhead) vs
#              the whole step captured in one CUDA graph, and the ELBO ops' share. A config gets 45 s (LDM 70 s)
#              to compile and capture: what is not built by then is left out (recorded in its row)
#   train-images   the image models' steps with the mixture of logistics: the conv VAE (batch 32) and VDVAE's
#              CIFAR-10 hierarchical VAE (batch 16), fused vs VDVAE's / PixelCNN++'s eager objective (60 s each to build)
#   dmol       the discretized mixture of logistics (x (16, 3, 32, 32) and (32, 3, 64, 64), M = 10): fused vs
#              PixelCNN++'s eager formula vs torch.compile of it, fwd and fwd+bwd (no GPU numbers for it yet)
#   then, as time allows: bench-rest (ops at 16 MB and 256 MB, per-call, LDM posterior rows, log-likelihood
#   memory; no compile), tests (every other test that runs on CUDA), memcheck, racecheck (compute-sanitizer on
#   `-m cuda_smoke`), compile-rest (the compile column at 16 MB and 256 MB)
# Every step has its own timeout, cut to what is left of the budget; a step that would get under 20 s is
# skipped; a step that needs the build is skipped when the build failed; nothing stops at a failure. The
# benchmark saves its JSON after every row, so a step stopped by its timeout keeps what it measured.
# Results in $OUT (or ./gpu-out): results/<device>-<date>.json, .md, .png (all benchmark steps merged, ready
# to commit to benchmarks/results/), results/gpu-check-<device>-<date>.md (the summary under the name to
# commit), summary.md, logs.tar.gz (one log per step and each step's own JSON).
# Usage: bash scripts/gpu_check.sh [STEP|GROUP ...]   groups: ops-1gb, rest; default: everything.
# GPU_CHECK_DRY=1: a CPU rehearsal of the same steps (no build, no nvcc, no sanitizer; toy sizes).
# Carry what the machine lacks (no network there) as wheels in .whl/ (git-ignored; name it in the run's carry
# list), made on a machine with network by:
#   pip download --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl diffusers expecttest
#   rm .whl/numpy-*      # the GPU machine has numpy; the rest is about 22 MB
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
WORK="$(mktemp -d)"
LOGS="$WORK/logs"
mkdir -p "$LOGS" "$WORK/bench"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
command -v nvcc >/dev/null 2>&1 || export PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
BUDGET="${GPU_CHECK_BUDGET_S:-480}"
DRY="${GPU_CHECK_DRY:-0}"
T0=$SECONDS
if [ "$DRY" = 1 ]; then  # the CPU rehearsal: same steps and flags, toy sizes, nothing compiled
  DEV=cpu BIG=64x256 SMALL=16x256,32x256 EXTRA="--repeats 2" OPS_COMPILE="--no-compile"
  IMPLS="--train-impls fused,eager,eager_graph,fused_graph"
  CFG_MLP=digits CFG_LDM=ldm-autoencoderkl-tiny CFG_IMG=conv-dmol
else
  DEV=cuda BIG=262144x1024 SMALL=4096x1024,65536x1024 EXTRA="" OPS_COMPILE="" IMPLS=""
  CFG_MLP=mnist-mlp-b1024,mnist-mlp-b16384,mnist-mlp-iwae50 CFG_LDM=ldm-autoencoderkl
  CFG_IMG=conv-dmol,hvae-cifar10-dmol
fi
BENCH="$PY -m vae_fast bench --device $DEV $EXTRA"
ALL=(build smoke selftest ops-1gb-f32 ops-1gb-bf16 train train-ldm train-images dmol bench-rest tests memcheck racecheck
     compile-rest)
STEPS=()
for s in "$@"; do
  case "$s" in
    ops-1gb) STEPS+=(ops-1gb-f32 ops-1gb-bf16) ;;
    rest) STEPS+=(bench-rest tests memcheck racecheck compile-rest) ;;
    *) STEPS+=("$s") ;;
  esac
done
[ ${#STEPS[@]} -eq 0 ] && STEPS=("${ALL[@]}")
SUMMARY=()
BUILD_OK=0

# run_step NAME LIMIT_S COMMAND: runs with a timeout of min(LIMIT_S, what is left of the budget minus a
# reserve for merging and the summary); records PASS / FAIL (rc) / TIMEOUT / SKIPPED and the seconds.
run_step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - T0) - 25))
  local t=$((limit < left ? limit : left))
  if [ "$t" -lt 20 ]; then
    SUMMARY+=("| $name | SKIPPED | 0 | no time left in the ${BUDGET} s budget |")
    echo "== $name: skipped (no time left)"
    return 0
  fi
  echo "== $name (timeout ${t} s, $((SECONDS - T0)) s into the run)"
  local s=$SECONDS rc=0
  STEP_TIMEOUT_S=$t timeout --kill-after=10 "$t" bash -c "$*" >"$LOGS/$name.log" 2>&1 || rc=$?
  local d=$((SECONDS - s)) status=PASS
  [ $rc -ne 0 ] && status="FAIL (rc $rc)"
  { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && status="TIMEOUT (${t} s)"
  local note
  note="$(grep -E -h "passed|failed|skipped in|ERROR SUMMARY|RACECHECK SUMMARY|'cuda': |copy bandwidth|^train step|wrote " "$LOGS/$name.log" | tail -2 | tr '|\n' '/ ' | cut -c1-200)"
  SUMMARY+=("| $name | $status | $d | $note |")
  tail -4 "$LOGS/$name.log"
  return $rc
}

needs_build() {
  if [ $BUILD_OK -ne 1 ]; then
    SUMMARY+=("| $1 | SKIPPED | 0 | the build failed or was not run |")
    return 1
  fi
}

step_build() {
  if [ "$DRY" = 1 ]; then  # never rebuild in a rehearsal: check that the installed build imports
    run_step build 60 "$PY -c 'import vae_fast._C as C; print(C.build_info())'" && BUILD_OK=1
    return 0
  fi
  # The selftest binary compiles meanwhile (it needs no torch).
  (nvcc -std=c++17 -O3 --expt-relaxed-constexpr -gencode arch=compute_90,code=sm_90 -Icsrc \
     tests/cuda/selftest.cu csrc/cuda/rows.cu csrc/cuda/sample.cu -o "$WORK/selftest" >"$LOGS/selftest-build.log" 2>&1 &)
  run_step build 180 "
    set -e
    $PY -c 'import torch; print(\"torch\", torch.__version__, \"CUDA\", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no GPU visible\")'
    nvcc --version | tail -2
    # Test extras the machine lacks, from the wheels carried in .whl/ (no network there); torch is never
    # installed. diffusers is optional: without it the AutoencoderKL step is skipped (recorded).
    if compgen -G '.whl/*.whl' >/dev/null; then
      $PY -m pip install -q --no-index --find-links .whl expecttest || echo 'expecttest not installed'
      $PY -m pip install -q --no-index --find-links .whl diffusers || echo 'diffusers not installed'
    fi
    VAE_FAST_CUDA=ON $PY -m pip install --no-build-isolation --no-deps -v -e .
    $PY -c 'import vae_fast._C as C; i = C.build_info(); print(i); assert i[\"cuda\"], \"build_info says no CUDA\"'
  " && BUILD_OK=1
}

step_selftest() {
  if [ "$DRY" = 1 ]; then SUMMARY+=("| selftest | SKIPPED | 0 | rehearsal (needs nvcc and a GPU) |"); return 0; fi
  run_step selftest 120 "
    for i in \$(seq 1 110); do [ -x '$WORK/selftest' ] && break; pgrep -f 'nvcc.*selftest' >/dev/null || break; sleep 1; done
    cat '$LOGS/selftest-build.log'
    [ -x '$WORK/selftest' ] || { echo 'selftest did not build'; exit 1; }
    '$WORK/selftest' | grep -E '^FAIL|passed'
  "
}

step_sanitizer() {  # $1: memcheck or racecheck
  if [ "$DRY" = 1 ]; then SUMMARY+=("| $1 | SKIPPED | 0 | rehearsal (needs compute-sanitizer) |"); return 0; fi
  needs_build "$1" || return 0
  run_step "$1" 150 "PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool $1 --error-exitcode 1 \
    $PY -m pytest -q -p no:cacheprovider -m cuda_smoke tests/test_cuda.py"
}

# bench_step NAME LIMIT_S FLAGS: one benchmark run into its own folder (merged at the end).
bench_step() {
  local name=$1 limit=$2
  shift 2
  needs_build "$name" || return 0
  run_step "$name" "$limit" "$BENCH --out '$WORK/bench/$name' $*"
}

for step in "${STEPS[@]}"; do
  case "$step" in
    build) step_build ;;
    smoke) needs_build smoke && run_step smoke 120 \
      "$PY -m pytest -q -p no:cacheprovider -o faulthandler_timeout=100 --durations=5 tests/test_cuda.py" ;;
    selftest) step_selftest ;;
    ops-1gb-f32) bench_step "$step" 130 --only ops --dtypes float32 --sizes "$BIG" $OPS_COMPILE ;;
    ops-1gb-bf16) bench_step "$step" 120 --only ops --dtypes bfloat16 --sizes "$BIG" $OPS_COMPILE ;;
    train) bench_step "$step" 200 --only train --train-configs "$CFG_MLP" --train-budget-s 45 $IMPLS ;;
    train-ldm) bench_step "$step" 120 --only train --train-configs "$CFG_LDM" --train-budget-s 70 $IMPLS ;;
    train-images) bench_step "$step" 150 --only train --train-configs "$CFG_IMG" --train-budget-s 60 $IMPLS ;;
    dmol) bench_step "$step" 120 --only dmol $OPS_COMPILE ;;  # saved per row: a timeout keeps the rows done
    bench-rest) bench_step "$step" 120 --only ops,per-call,ldm,ll --sizes "$SMALL" --no-compile ;;
    tests) needs_build tests && run_step tests 240 \
      "$PY -m pytest -q -p no:cacheprovider -o faulthandler_timeout=100 --durations=10 -k cuda \
       --ignore=tests/test_cuda.py tests" ;;  # test_cuda.py ran as the smoke step
    memcheck | racecheck) step_sanitizer "$step" ;;
    compile-rest) bench_step "$step" 300 --only ops --sizes "$SMALL" $OPS_COMPILE ;;
    *) echo "unknown step $step (steps: ${ALL[*]}; groups: ops-1gb rest)"; exit 2 ;;
  esac
done

# One results file from every benchmark step (each saved its JSON as it went).
mkdir -p "$OUT/results"
parts=("$WORK"/bench/*/*.json)
if [ -e "${parts[0]}" ]; then
  if $PY -m vae_fast bench --merge "${parts[@]}" --out "$OUT/results" >"$LOGS/merge.log" 2>&1; then
    SUMMARY+=("| merge | PASS | 0 | $(tail -1 "$LOGS/merge.log" | cut -c1-200) |")
  else
    SUMMARY+=("| merge | FAIL | 0 | $(tail -1 "$LOGS/merge.log" | cut -c1-200) |")
  fi
fi
cp -r "$WORK/bench" "$LOGS/bench-parts" 2>/dev/null
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs
{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$([ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && echo ' (uncommitted changes)')"
  echo
  echo "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi ($DEV)")"
  echo
  echo "| step | status | s | note |"
  echo "|---|---|---|---|"
  printf '%s\n' "${SUMMARY[@]}"
  echo
  echo "total $((SECONDS - T0)) s of a ${BUDGET} s budget; logs and each step's JSON in logs.tar.gz"
} >"$OUT/summary.md"
merged=("$OUT"/results/*-????-??-??.json)
if [ -e "${merged[0]}" ]; then
  stem="$(basename "${merged[0]}" .json)"
  cp "$OUT/summary.md" "$OUT/results/gpu-check-${stem#*-}.md"
fi
echo
cat "$OUT/summary.md"
rm -rf "$WORK"
grep -q -E "FAIL|TIMEOUT" "$OUT/summary.md" && exit 1
exit 0
