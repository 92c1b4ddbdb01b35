"""Shared fixtures: devices, the per-dtype tolerance table, random inputs."""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()

# Every op is compared with vae_fast.reference evaluated in float64. One table, per input dtype:
# (rtol, atol) for values and gradients. float16/bfloat16 inputs are rounded before both sides see
# them, so the tolerances only cover float32 arithmetic and the rounding of the outputs.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def tol(*dtypes: torch.dtype) -> dict:
    rtol = max(TOLERANCES[d][0] for d in dtypes)
    atol = max(TOLERANCES[d][1] for d in dtypes)
    return {"rtol": rtol, "atol": atol}


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def gen():
    """A fresh generator per test, seeded from torch's global RNG so every run draws new inputs."""
    g = torch.Generator()
    g.manual_seed(int(torch.randint(0, 2**62, (1,))))
    return g


def randn(shape, dtype=torch.float32, device="cpu", gen=None, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords or "cuda_smoke" in item.keywords:
            item.add_marker(skip)
