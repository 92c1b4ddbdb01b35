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


def _raises_like_torch(exc, args, kwargs=None, match=None):
    """torch's F.gaussian_nll_loss raises `exc` for these arguments, and so does ours."""
    for fn in (F.gaussian_nll_loss, vf.gaussian_nll_loss):
        with pytest.raises(exc, match=match):
            fn(*args, **(kwargs or {}))


@pytest.mark.parametrize("reduction", [None, 1, 1.5])
def test_non_string_reduction_is_a_type_error_as_torchs(reduction):
    x = torch.randn(4, 3)
    _raises_like_torch(TypeError, (x, x, torch.ones(4, 3)), {"reduction": reduction})


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool], ids=str)
def test_integer_var_is_checked_in_torchs_order(dtype):
    """torch checks var's entries, then its size, then the reduction, and only then refuses an integer var (its
    clamp_ cannot write a float into it): the first failing check decides the exception."""
    x = torch.randn(4, 3)
    if dtype != torch.bool:
        _raises_like_torch(ValueError, (x, x, torch.full((4, 3), -1, dtype=dtype)), match="negative")
        _raises_like_torch(ValueError, (x, x, torch.full((4, 3), -1, dtype=dtype)), {"reduction": "avg"},
                           match="negative")
    _raises_like_torch(ValueError, (x, x, torch.ones(2, 3, dtype=dtype)), match="incorrect size")
    _raises_like_torch(ValueError, (x, x, torch.ones(2, 3, dtype=dtype)), {"reduction": "avg"}, match="incorrect size")
    _raises_like_torch(ValueError, (x, x, torch.ones(4, 3, dtype=dtype)), {"reduction": "avg"}, match="avg is not valid")
    _raises_like_torch(RuntimeError, (x, x, torch.ones(4, 3, dtype=dtype)), match="can't be cast")


@pytest.mark.parametrize("target", [0.3, -2.5, 2, 0], ids=repr)
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.float64, torch.int64], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_python_number_target_as_torch(target, in_dtype, reduction, gen):
    """torch's loss takes a Python number as `target` (its `input - target` does): same value, dtype, shape and
    gradients."""
    x = (randn((5, 4), gen=gen) * 3).to(in_dtype)
    if in_dtype.is_floating_point:
        x.requires_grad_()
    var = (torch.rand(5, 1, generator=gen, dtype=torch.float64) + 0.1).to(
        in_dtype if in_dtype.is_floating_point else torch.float32).requires_grad_()
    ours = vf.gaussian_nll_loss(x, target, var, reduction=reduction)
    theirs = F.gaussian_nll_loss(x, target, var, reduction=reduction)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs)
    wrt = [x, var] if x.requires_grad else [var]
    g = torch.rand(ours.shape, generator=gen, dtype=torch.float64).to(ours.dtype)
    for a, b in zip(torch.autograd.grad(ours, wrt, g), torch.autograd.grad(theirs, wrt, g)):
        torch.testing.assert_close(a, b)
    assert vf.gaussian_nll_loss(x, 1.5, 0.7, reduction=reduction).dtype == \
        F.gaussian_nll_loss(x, 1.5, 0.7, reduction=reduction).dtype


def test_bool_data_is_refused_as_torch_refuses_it():
    x, b = torch.randn(4, 3), torch.ones(4, 3, dtype=torch.bool)
    var = torch.ones(4, 3)
    for args in ((x, b, var), (b, x, var), (b, b, var), (x, True, var)):
        _raises_like_torch(RuntimeError, args, match="bool")


def test_complex_data_is_refused_naming_the_argument():
    """torch returns a complex 'loss' for complex data; the fused terms are real, so ours refuses it (a TypeError
    naming the argument) rather than dropping the imaginary part."""
    x, var = torch.randn(4, 3), torch.ones(4, 3)
    assert F.gaussian_nll_loss(x.to(torch.complex64), x, var).dtype == torch.complex64
    with pytest.raises(TypeError, match="`input` must be real"):
        vf.gaussian_nll_loss(x.to(torch.complex64), x, var)
    with pytest.raises(TypeError, match="`target` must be real"):
        vf.gaussian_nll_loss(x, x.to(torch.complex128), var)
    with pytest.raises(TypeError, match="`target` must be real"):
        vf.gaussian_nll_loss(x, 1j, var)


def test_non_tensor_input_is_a_type_error():
    """torch raises AttributeError ('list' object has no attribute 'size'), an accident of its code; ours says what
    is wrong (README: the one exception type that differs)."""
    with pytest.raises(AttributeError):
        F.gaussian_nll_loss([1.0, 2.0], torch.ones(2), torch.ones(2))
    with pytest.raises(TypeError, match="`input` must be a torch.Tensor, got list"):
        vf.gaussian_nll_loss([1.0, 2.0], torch.ones(2), torch.ones(2))
