#!/usr/bin/env bash
# Creates .venv (if missing) with the pinned torch and the build tools, then builds vae_fast into it.
# torch goes in first and the extension is built with --no-build-isolation: an isolated build
# environment would let pip resolve an unpinned torch (gigabytes of CUDA packages).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${VAE_FAST_TORCH:-2.13.0}"
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==${TORCH_VERSION}"
# diffusers: the optional test extra (tests of vf.DiagonalGaussianDistribution against diffusers' own
# class); it depends on no torch (checked with pip install --dry-run --report).
.venv/bin/python -m pip install -q --disable-pip-version-check "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja \
  numpy tqdm matplotlib scikit-learn pytest hypothesis expecttest "diffusers==0.42.1"
.venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[test]"
.venv/bin/python -c "import vae_fast, vae_fast._C as C; print('vae_fast built:', C.build_info())"
