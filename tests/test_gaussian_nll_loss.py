"""vae_fast.gaussian_nll_loss against torch's F.gaussian_nll_loss: values, gradients, dtypes, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vae_fast as vf
from conftest import randn

# (input shape, var shape or "float"): every var shape torch accepts.
VAR_CASES = [
    ((5, 4), (5, 4)),  # heteroscedastic
    ((5, 4), (5,)),  # input minus its last dim
    ((5, 4), (5, 1)),  # one dim of size 1
    ((3, 5, 4), (3, 1, 4)),  # one (middle) dim of size 1
    ((5, 4), "float"),
    ((2, 3, 4), (2, 3)),
]


@pytest.mark.parametrize("shapes", VAR_CASES, ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_torch(shapes, reduction, full, dtype, device, gen):
    in_shape, var_shape = shapes
    inp = randn(in_shape, dtype, device, gen).requires_grad_()
    target = randn(in_shape, dtype, device, gen)
    if var_shape == "float":
        var = 0.7
    else:
        var = (torch.rand(var_shape, generator=gen, dtype=torch.float64) + 0.05).to(dtype=dtype, device=device)
        var.view(-1)[0] = 1e-9  # below eps: clamped, and the gradient passes straight through
        var.requires_grad_()
    ours = vf.gaussian_nll_loss(inp, target, var, full=full, eps=1e-6, reduction=reduction)
    theirs = F.gaussian_nll_loss(inp, target, var, full=full, eps=1e-6, reduction=reduction)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    rtol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=rtol)
    g = randn(ours.shape, dtype, device, gen)
    wrt = [inp] + ([var] if isinstance(var, torch.Tensor) else [])
    ours_g = torch.autograd.grad(ours, wrt, g)
    theirs_g = torch.autograd.grad(theirs, wrt, g)
    for a, b in zip(ours_g, theirs_g):
        torch.testing.assert_close(a, b, rtol=1e-4 if dtype == torch.float32 else 1e-9, atol=1e-4)


def test_dtype_promotion(gen):
    inp = randn((4, 3), torch.float32, gen=gen)
    target = randn((4, 3), torch.bfloat16, gen=gen)
    var = torch.rand(4, 1, generator=gen, dtype=torch.float64) + 0.1
    for reduction in ("none", "mean"):
        ours = vf.gaussian_nll_loss(inp, target, var, reduction=reduction)
        theirs = F.gaussian_nll_loss(inp, target, var, reduction=reduction)
        assert ours.dtype == theirs.dtype == torch.float64
        # torch forms (input - target) ** 2 in float32 before promoting: ours is the float64 value of the
        # same inputs (closer to exact), so torch agrees to float32 rounding and the exact value to float64's
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
        exact = F.gaussian_nll_loss(inp.double(), target.double(), var, reduction=reduction)
        torch.testing.assert_close(ours, exact)
    low = vf.gaussian_nll_loss(inp.bfloat16(), target, var.bfloat16(), reduction="none")
    assert low.dtype == torch.bfloat16


@pytest.mark.parametrize("var, reduction, match", [
    (torch.full((4, 3), -1.0), "mean", "var has negative entry/entries"),
    (-1.0, "mean", "var has negative entry/entries"),
    (torch.ones(4, 2), "mean", "var is of incorrect size"),
    (torch.ones(2, 3), "mean", "var is of incorrect size"),
    (torch.ones(4, 3), "avg", "avg is not valid"),
])
def test_errors_match_torch(var, reduction, match):
    inp, target = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match=match):
        F.gaussian_nll_loss(inp, target, var, reduction=reduction)
    with pytest.raises(ValueError, match=match):
        vf.gaussian_nll_loss(inp, target, var, reduction=reduction)


def test_compiles_without_graph_break(gen):
    inp = randn((6, 4), gen=gen).requires_grad_()
    target = randn((6, 4), gen=gen)
    var = (torch.rand(6, 1, generator=gen) + 0.1).requires_grad_()
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b, c: vf.gaussian_nll_loss(a, b, c), fullgraph=True, backend="aot_eager")
    out = compiled(inp, target, var)
    torch.testing.assert_close(out, F.gaussian_nll_loss(inp, target, var))
    out.backward()
    assert torch.isfinite(inp.grad).all() and torch.isfinite(var.grad).all()


@pytest.mark.parametrize("where", [0, 131_071, 199_999])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_one_negative_var_entry_anywhere_raises(where, layout):
    """The eager negative-var check (a parallel loop over a contiguous CPU var, torch's kernels otherwise)
    sees a single negative entry wherever it lies, a NaN elsewhere not hiding it, as F.gaussian_nll_loss."""
    x = torch.randn(400, 500)
    var = torch.rand(400, 500) + 0.1
    var.view(-1)[7] = float("nan")
    var.view(-1)[where] = -1e-30
    if layout == "transposed":
        x, var = x.t(), var.t()
    for fn in (F.gaussian_nll_loss, vf.gaussian_nll_loss):
        with pytest.raises(ValueError, match="var has negative entry/entries"):
            fn(x, x, var)
    vf.gaussian_nll_loss(x, x, var.abs())  # no negative left: no error
