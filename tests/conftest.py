"""Shared fixtures: devices, the per-dtype tolerance table, random inputs."""

from __future__ import annotations

import math

import pytest
import torch

CUDA = torch.cuda.is_available()

# Every op is compared with vae_fast._composite evaluated in float64, element by element, within a bound
# built from one table: the unit roundoff of the dtype a value is stored in and of the dtype the kernels
# compute in (float32 for float16/bfloat16). float16/bfloat16 inputs are rounded before both sides see
# them, so the bound covers the kernels' arithmetic and the rounding of the stored result only.
ACC_DTYPE = {torch.float64: torch.float64, torch.float32: torch.float32, torch.float16: torch.float32,
             torch.bfloat16: torch.float32}
UNIT_ROUNDOFF = {d: torch.finfo(d).eps / 2 for d in ACC_DTYPE}
# Roundoffs per term: a handful of + - * and exp/log/log1p/expm1 (Sleef ~1 ulp), first order.
TERM_ULPS = 16


def tol(*dtypes: torch.dtype) -> dict:
    """Loose rtol/atol for checks that are not element-wise error bounds (compile vs eager, layouts)."""
    t = max(2 * UNIT_ROUNDOFF[d] + 300 * UNIT_ROUNDOFF[ACC_DTYPE[d]] for d in dtypes)
    return {"rtol": t, "atol": t}


def error_bound(expected, magnitude, sensitivity, n_terms, stored, acc):
    """Per-element bound on |computed - exact| for a value stored in dtype `stored`, computed in `acc`:
    the rounding of the result itself, TERM_ULPS roundoffs of each term's magnitude and of its
    sensitivity to its inputs (so cancellation inside a term is allowed for), and n - 1 roundoffs of the
    summed magnitudes for a sum of n terms (recursive summation's worst case)."""
    u_acc = UNIT_ROUNDOFF[acc]
    bound = UNIT_ROUNDOFF[stored] * expected.abs() + u_acc * (TERM_ULPS * (sensitivity + magnitude)
                                                             + (n_terms - 1) * magnitude)
    # Half the spacing of the stored dtype's subnormals: a tiny result can be no closer than that.
    return bound + torch.finfo(stored).smallest_normal * UNIT_ROUNDOFF[stored]


def _leaves(inputs, shape):
    # Each input expanded to the broadcast shape with its own storage: derivatives per position.
    return [x.detach().double().cpu().expand(shape).clone().requires_grad_() for x in inputs]


def _sensitivity(value_sum, leaves, create_graph=False, retain_graph=None):
    """sum_k |d v_j / d x_kj| (|x_kj| + 1) per position j for an element-wise v (value_sum = v.sum()):
    how much v_j moves when each input moves by a roundoff relative to its size (or to 1 near zero)."""
    grads = torch.autograd.grad(value_sum, leaves, create_graph=create_graph, retain_graph=retain_graph,
                                allow_unused=True, materialize_grads=True)
    return sum(g.abs() * (x.detach().abs() + 1) for g, x in zip(grads, leaves)), grads


def value_bounds(terms_fn, inputs, event_dims, expected, stored, acc, shape=None):
    """Error bound per element of sum over the trailing event_dims of terms_fn(*inputs) (element-wise,
    broadcasting), e.g. a reference op called with event_dims=0. `shape`: that of the terms, when
    terms_fn broadcasts the inputs against something of its own (the sampler's eps)."""
    shape = shape or torch.broadcast_shapes(*(x.shape for x in inputs))
    leaves = _leaves(inputs, shape)
    terms = terms_fn(*leaves)
    sens, _ = _sensitivity(terms.sum(), leaves)
    dims = tuple(range(terms.dim() - event_dims, terms.dim()))
    reduce = (lambda t: t.sum(dims)) if dims else (lambda t: t)
    n = math.prod(shape[terms.dim() - event_dims:])
    return error_bound(expected.detach().double().cpu(), reduce(terms.detach().abs()), reduce(sens.detach()), n,
                       stored, acc)


def grad_bounds(loss_terms_fn, inputs, expected_grads, stored_dtypes, acc, shape=None):
    """Error bound per element of each input's gradient of loss_terms_fn(*inputs).sum(), where
    loss_terms_fn is element-wise over the broadcast shape (upstream gradients already multiplied in).
    A broadcast input's gradient sums its positions' terms. `shape` as for value_bounds."""
    shape = shape or torch.broadcast_shapes(*(x.shape for x in inputs))
    leaves = _leaves(inputs, shape)
    _, per_position = _sensitivity(loss_terms_fn(*leaves).sum(), leaves, create_graph=True)
    bounds = []
    for x, d, expected, stored in zip(inputs, per_position, expected_grads, stored_dtypes):
        sens = _sensitivity(d.sum(), leaves, retain_graph=True)[0] if d.requires_grad else torch.zeros_like(d)
        n = math.prod(shape) // max(1, x.numel())
        bounds.append(error_bound(expected.detach().double().cpu(), d.detach().abs().sum_to_size(x.shape),
                                  sens.detach().sum_to_size(x.shape), n, stored, acc))
    return bounds


def assert_within(actual, expected, bound, what=""):
    """|actual - expected| <= bound element by element (NaN and inf must agree exactly)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, (what, a.shape, e.shape)
    # Beyond the stored dtype's range (its max plus half an ulp) the correctly rounded result is inf.
    info = torch.finfo(actual.dtype)
    e = torch.where(e.abs() > info.max * (1 + info.eps / 4), e.sign() * math.inf, e)
    special = ~torch.isfinite(e)
    assert torch.equal(a[special].nan_to_num(0.0, 1.0, -1.0), e[special].nan_to_num(0.0, 1.0, -1.0)), what
    err = (a - e).abs().masked_fill(special, 0.0)
    bad = ~(err <= bound)
    if bad.any():
        worst = int(torch.argmax(torch.where(bad, err / bound, torch.zeros_like(err))))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.numel()} elements outside their error bound; worst at flat index "
            f"{worst}: got {a.flatten()[worst].item()!r}, expected {e.flatten()[worst].item()!r}, "
            f"error {err.flatten()[worst].item():.3g} > bound {bound.flatten()[worst].item():.3g}")


DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


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


@pytest.fixture()
def cut_patches(monkeypatch):
    """``cut_patches(n_train, n_test)``: the patches set cut to its first n_train train and n_test test images, so a
    run tests the machinery, not the quality, in seconds."""
    from vae_fast.train import data

    full = data._patches

    def cut(n_train: int, n_test: int) -> None:
        monkeypatch.setattr(data, "_patches", lambda: tuple(t[:n] for t, n in zip(full(), (n_train, n_test))))

    return cut
