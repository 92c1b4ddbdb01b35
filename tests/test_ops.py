"""The deterministic fused ops (KL, Gaussian and Bernoulli log-likelihoods) against the float64
reference, torch.distributions, gradcheck and opcheck, for every dtype, broadcast and event_dims case."""

from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import vae_fast as vf
from vae_fast.ops import _composite as ref
from conftest import DTYPES, assert_within, grad_bounds, randn, tol, value_bounds

# name -> (fused op, reference op, argument names)
OPS = {
    "gaussian_kl": (vf.gaussian_kl, ref.gaussian_kl, ("mu", "logvar", "prior_mu", "prior_logvar")),
    "gaussian_log_prob": (vf.gaussian_log_prob, ref.gaussian_log_prob, ("x", "mean", "logvar")),
    "bernoulli_log_prob": (vf.bernoulli_log_prob, ref.bernoulli_log_prob, ("x", "logits")),
}

# (op, argument shapes, event_dims): the broadcast cases that matter, the (K, B, D) decoder output
# against (B, D) data with a scalar or per-feature logvar first among them.
CASES = [
    ("gaussian_kl", [(6, 5), (6, 5)], 1),
    ("gaussian_kl", [(6, 5), (6, 5)], 0),
    ("gaussian_kl", [(2, 3, 4, 5), (2, 3, 4, 5)], 3),
    ("gaussian_kl", [(6, 5), (6, 5), (6, 5), (6, 5)], 1),
    ("gaussian_kl", [(6, 5), (6, 5), (5,), (5,)], 1),
    ("gaussian_kl", [(6, 5), (6, 5), (), ()], 1),
    ("gaussian_kl", [(6, 5), (6, 5), (6, 1), (1, 5)], 2),
    ("gaussian_log_prob", [(6, 5), (6, 5), (6, 5)], 1),
    ("gaussian_log_prob", [(6, 5), (3, 6, 5), ()], 1),
    ("gaussian_log_prob", [(6, 5), (3, 6, 5), (5,)], 1),
    ("gaussian_log_prob", [(6, 5), (3, 6, 5), (3, 6, 5)], 0),
    ("gaussian_log_prob", [(2, 3, 4, 4), (2, 3, 4, 4), (3, 4, 4)], 3),
    ("gaussian_log_prob", [(6, 5), (6, 5), (6, 1)], 1),
    ("gaussian_log_prob", [(6, 5), (6, 5), (6, 5)], 2),
    ("gaussian_log_prob", [(), (), ()], 0),
    ("bernoulli_log_prob", [(6, 5), (6, 5)], 1),
    ("bernoulli_log_prob", [(6, 5), (3, 6, 5)], 1),
    ("bernoulli_log_prob", [(6, 5), (3, 6, 5)], 0),
    ("bernoulli_log_prob", [(2, 3, 4, 4), (2, 3, 4, 4)], 3),
    ("bernoulli_log_prob", [(1, 5), (6, 5)], 2),
]


def case_id(case):
    op, shapes, ed = case
    return f"{op}-{'x'.join(str(s) for s in shapes)}-e{ed}"


def make_inputs(op, shapes, dtype, device, gen):
    """Fresh random inputs; Bernoulli data in [0, 1], logits with a wide range."""
    tensors = []
    for name, shape in zip(OPS[op][2], shapes):
        if op == "bernoulli_log_prob" and name == "x":
            t = torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
        else:
            t = randn(shape, dtype, device, gen, scale=4.0 if name == "logits" else 1.0)
        tensors.append(t)
    return tensors


def call(fn, op, args, event_dims):
    if op == "gaussian_kl" and len(args) == 2:
        return fn(args[0], args[1], event_dims=event_dims)
    return fn(*args, event_dims=event_dims)


def check_against_reference(op, shapes, event_dims, dtypes, device, gen, perturb=None):
    """Values and gradients against the float64 reference, each element within its own error bound
    (conftest.error_bound). `perturb` (name, factor) scales one fused gradient: the tests of the bound."""
    if isinstance(dtypes, torch.dtype):
        dtypes = [dtypes] * len(shapes)
    args = [t.to(d) for t, d in zip(make_inputs(op, shapes, torch.float64, device, gen), dtypes)]
    check_args(op, args, event_dims, gen, perturb)


def check_args(op, args, event_dims, gen, perturb=None):
    """check_against_reference's comparison for given arguments (any dtypes, strides, broadcasts)."""
    fused_fn, ref_fn, names = OPS[op]
    dtypes = [a.dtype for a in args]
    device = args[0].device
    args = [a.detach().requires_grad_() for a in args]
    args64 = [t.detach().to(device="cpu", dtype=torch.float64).requires_grad_() for t in args]
    out = call(fused_fn, op, args, event_dims)
    expected = call(ref_fn, op, args64, event_dims)
    acc = torch.float64 if torch.float64 in dtypes else torch.float32
    assert out.dtype == acc
    assert out.shape == expected.shape
    terms = lambda *a: call(ref_fn, op, a, 0)  # noqa: E731  (the per-element terms of the reduction)
    assert_within(out, expected, value_bounds(terms, args64, event_dims, expected, acc, acc), f"{op} value")
    # An upstream gradient that is not 1, and every gradient in its argument's own shape and dtype.
    g = randn(out.shape, acc, device, gen)
    grads = torch.autograd.grad(out, args, g)
    grads64 = torch.autograd.grad(expected, args64, g.cpu().double())
    g_terms = g.cpu().double().reshape(tuple(g.shape) + (1,) * event_dims)
    bounds = grad_bounds(lambda *a: g_terms * terms(*a), args64, grads64, dtypes, acc)
    for name, a, gr, gr64, d, bound in zip(names, args, grads, grads64, dtypes, bounds):
        assert gr.shape == a.shape and gr.dtype == a.dtype
        if perturb is not None and perturb[0] == name:
            gr = (gr.double() * perturb[1]).to(d)
        assert_within(gr, gr64, bound, f"{op} d{name} ({d})")


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64_reference(case, dtype, device, gen):
    op, shapes, ed = case
    check_against_reference(op, shapes, ed, dtype, device, gen)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_mixed_precision_returns_float32(op, low, device, gen):
    # fp32 data with reduced-precision decoder outputs: the autocast case.
    shapes = {"gaussian_kl": [(6, 5)] * 4, "gaussian_log_prob": [(6, 5), (3, 6, 5), ()],
              "bernoulli_log_prob": [(6, 5), (3, 6, 5)]}[op]
    dtypes = [torch.float32] + [low] * (len(shapes) - 1)
    check_against_reference(op, shapes, 1, dtypes, device, gen)


@pytest.mark.parametrize("case", [("gaussian_log_prob", [(64, 300), (8, 64, 300), (300,)], 1),
                                  ("gaussian_kl", [(512, 64), (512, 64), (64,), ()], 1),
                                  ("gaussian_log_prob", [(1000, 300), (3, 1000, 300), ()], 1),
                                  ("bernoulli_log_prob", [(1000, 300), (3, 1000, 300)], 0)], ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_broadcast_gradients_over_many_row_blocks(case, dtype, device, gen):
    # From 2^15 elements on the CPU sums a broadcast argument's gradient in up to 64 row blocks, then
    # adds the blocks' partial sums in order; CASES are small enough for one block. The (3, 1000, 300)
    # cases walk the K samples over tiles of 873 data rows (the CPU row engine's tiling): two tiles,
    # the second partial, each split across blocks.
    check_against_reference(*case, dtype, device, gen)


@pytest.mark.parametrize("case, name", [(CASES[0], "logvar"), (CASES[4], "prior_logvar"), (CASES[9], "logvar"),
                                        (CASES[8], "mean"), (CASES[16], "logits")], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_one_percent_error_in_a_gradient_fails(case, name, dtype, gen):
    # The bound is per element: a 1% error in one gradient (a broadcast one included) fails in every dtype.
    with pytest.raises(AssertionError, match=f"d{name} "):
        check_against_reference(*case, dtype, "cpu", gen, perturb=(name, 1.01))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gradcheck(case, device, gen):
    op, shapes, ed = case
    fused_fn = OPS[op][0]
    args = [t.requires_grad_() for t in make_inputs(op, shapes, torch.float64, device, gen)]
    assert torch.autograd.gradcheck(lambda *a: call(fused_fn, op, a, ed), args)


@pytest.mark.parametrize("case", CASES[::2], ids=case_id)
def test_opcheck(case, device, gen):
    op, shapes, ed = case
    args = [t.requires_grad_() for t in make_inputs(op, shapes, torch.float32, device, gen)]
    if op == "gaussian_kl":
        priors = args[2:] if len(args) == 4 else [None, None]
        torch.library.opcheck(torch.ops.vae_fast.gaussian_kl.default, (args[0], args[1], *priors, ed))
    else:
        torch.library.opcheck(getattr(torch.ops.vae_fast, op).default, (*args, ed))


def test_opcheck_backward_ops(gen):
    x, m, lv = make_inputs("gaussian_log_prob", [(6, 5), (3, 6, 5), (5,)], torch.float32, "cpu", gen)
    g = randn((3, 6), gen=gen)
    torch.library.opcheck(torch.ops.vae_fast.gaussian_log_prob_backward.default, (g, x, m, lv, 1, [False, True, True]))
    mu, lv2 = make_inputs("gaussian_kl", [(6, 5), (6, 5)], torch.float32, "cpu", gen)
    torch.library.opcheck(torch.ops.vae_fast.gaussian_kl_backward.default,
                          (randn((6,), gen=gen), mu, lv2, None, None, 1, [True, True]))
    xb, lb = make_inputs("bernoulli_log_prob", [(6, 5), (6, 5)], torch.float32, "cpu", gen)
    torch.library.opcheck(torch.ops.vae_fast.bernoulli_log_prob_backward.default,
                          (randn((6,), gen=gen), xb, lb, 1, [False, True]))


# ---- agreement with PyTorch's own distributions ---------------------------------------------------
def test_agrees_with_torch_distributions(gen):
    D = torch.distributions
    mu, lv, pm, plv, x = (randn((7, 4), torch.float64, gen=gen) for _ in range(5))
    q = D.Independent(D.Normal(mu, torch.exp(0.5 * lv)), 1)
    p = D.Independent(D.Normal(pm, torch.exp(0.5 * plv)), 1)
    std = D.Independent(D.Normal(torch.zeros_like(mu), torch.ones_like(mu)), 1)
    torch.testing.assert_close(vf.gaussian_kl(mu, lv), D.kl_divergence(q, std))
    torch.testing.assert_close(vf.gaussian_kl(mu, lv, pm, plv), D.kl_divergence(q, p))
    torch.testing.assert_close(vf.gaussian_log_prob(x, mu, lv), q.log_prob(x))
    logits = randn((7, 4), torch.float64, gen=gen, scale=5.0)
    target = torch.bernoulli(torch.full((7, 4), 0.5, dtype=torch.float64), generator=gen)
    torch.testing.assert_close(
        vf.bernoulli_log_prob(target, logits),
        -F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(-1),
    )
    torch.testing.assert_close(vf.bernoulli_log_prob(target, logits),
                               D.Independent(D.Bernoulli(logits=logits), 1).log_prob(target))


# ---- numerics and edge cases ------------------------------------------------------------------------
def test_kl_terms_never_negative_in_float32(device):
    # exp(lv) - lv - 1 rounds below zero for tiny |lv| in float32; expm1(lv) - lv does not.
    lv = torch.linspace(-1e-3, 1e-3, 4097, device=device)
    mu = torch.zeros_like(lv)
    per_dim = vf.gaussian_kl(mu, lv, event_dims=0)
    assert (per_dim >= 0).all()
    naive = 0.5 * (torch.exp(lv) - lv - 1)
    assert (naive < 0).any(), "the naive formula should show the failure this guards against"
    prior = vf.gaussian_kl(mu, lv, torch.zeros((), device=device), torch.full((), 1e-4, device=device), event_dims=0)
    assert (prior >= 0).all()


def test_extreme_values_give_inf_not_nan(device):
    mu = torch.zeros(2, 3, device=device)
    lv = torch.tensor([[200.0, 0.0, 0.0], [0.0, 0.0, 0.0]], device=device)
    kl = vf.gaussian_kl(mu, lv)
    assert kl[0].item() == math.inf and torch.isfinite(kl[1])
    logits = torch.tensor([[1e4, -1e4, 80.0]], device=device)
    lp = vf.bernoulli_log_prob(torch.tensor([[1.0, 0.0, 1.0]], device=device), logits)
    assert torch.isfinite(lp).all() and lp.item() <= 0
    (g,) = torch.autograd.grad(vf.bernoulli_log_prob(torch.ones(1, 3, device=device), logits.requires_grad_()).sum(),
                               logits)
    assert torch.isfinite(g).all()


def test_nan_stays_in_its_row(device):
    x = torch.randn(4, 8, device=device)
    mean = torch.randn(4, 8, device=device)
    mean[2, 3] = math.nan
    lv = torch.zeros((), device=device)
    out = vf.gaussian_log_prob(x, mean, lv)
    assert torch.isnan(out[2]) and torch.isfinite(out[[0, 1, 3]]).all()
    mean.requires_grad_()
    (g,) = torch.autograd.grad(vf.gaussian_log_prob(x, mean, lv).sum(), mean)
    assert torch.isnan(g[2]).any() and torch.isfinite(g[[0, 1, 3]]).all()


@pytest.mark.parametrize("op", list(OPS))
def test_empty_batches(op, device):
    n = len(OPS[op][2]) if op != "gaussian_kl" else 2
    args = [torch.randn(0, 5, device=device, requires_grad=True) for _ in range(n)]
    out = call(OPS[op][0], op, args, 1)
    assert out.shape == (0,)
    grads = torch.autograd.grad(out.sum(), args)
    assert all(g.shape == (0, 5) for g in grads)
    # An empty event sums to 0.
    empty_event = [torch.randn(3, 0, device=device) for _ in range(n)]
    torch.testing.assert_close(call(OPS[op][0], op, empty_event, 1), torch.zeros(3, device=device))


def test_non_contiguous_and_expanded_inputs(device, gen):
    x = randn((5, 8), device=device, gen=gen).t()  # (8, 5), transposed
    mean = randn((3, 8, 10), device=device, gen=gen)[:, :, ::2]  # strided
    lv = randn((5,), device=device, gen=gen).expand(8, 5)  # an expansion the caller made
    lv.requires_grad_(False)
    lv_leaf = randn((5,), device=device, gen=gen).requires_grad_()
    out = vf.gaussian_log_prob(x, mean, lv_leaf.expand(8, 5))
    expected = ref.gaussian_log_prob(x.double(), mean.double(), lv_leaf.double().expand(8, 5))
    torch.testing.assert_close(out.double(), expected, **tol(torch.float32))
    (g,) = torch.autograd.grad(out.sum(), lv_leaf)
    (g64,) = torch.autograd.grad(expected.sum(), lv_leaf)
    torch.testing.assert_close(g.double(), g64.double(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(vf.gaussian_log_prob(x, mean, lv).double(),
                               ref.gaussian_log_prob(x.double(), mean.double(), lv.double()), **tol(torch.float32))


def test_only_needed_gradients_are_computed(gen):
    x, m, lv = make_inputs("gaussian_log_prob", [(6, 5), (3, 6, 5), (5,)], torch.float32, "cpu", gen)
    g = randn((3, 6), gen=gen)
    dx, dm, dlv = torch.ops.vae_fast.gaussian_log_prob_backward(g, x, m, lv, 1, [False, True, False])
    assert dx.numel() == 0 and dlv.numel() == 0 and dm.shape == m.shape


def test_broadcast_gradients_are_deterministic(gen):
    # Partial sums per fixed row block, added in order: bitwise the same every time and whatever
    # the thread count. The second shape walks the samples over two tiles of data rows.
    for rows in (64, 1000):
        x = randn((rows, 300), gen=gen).requires_grad_()
        mean = randn((8, rows, 300), gen=gen)
        lv = randn((300,), gen=gen).requires_grad_()
        results = []
        for threads in (1, 2, 1):
            old = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                results.append(torch.autograd.grad(vf.gaussian_log_prob(x, mean, lv).sum(), (x, lv)))
            finally:
                torch.set_num_threads(old)
        assert all(torch.equal(a, b) for r in results[1:] for a, b in zip(results[0], r))


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_cpu_isa_variant(isa, monkeypatch, gen):
    built = vf._C.build_info()["cpu_isas_built"].split(",")
    if isa not in built:
        pytest.skip(f"{isa} variant not built on this platform")  # only on non-x86 builds
    monkeypatch.setenv("VAE_FAST_CPU_ISA", isa)
    ran = vf._C.build_info()["cpu_isa"]  # the variable only ever lowers the variant: this CPU may lack `isa`
    if ran != isa:
        pytest.skip(f"this CPU lacks {isa}: VAE_FAST_CPU_ISA={isa} runs the {ran} kernels")
    for case in CASES[::3]:
        check_against_reference(*case, torch.float32, "cpu", gen)
    check_against_reference(*CASES[1], torch.bfloat16, "cpu", gen)
    mu, lv = torch.zeros(3, 70), torch.zeros(3, 70)
    z_here = vf.reparameterize(mu, lv, seed=7)
    monkeypatch.delenv("VAE_FAST_CPU_ISA")
    torch.testing.assert_close(z_here, vf.reparameterize(mu, lv, seed=7), rtol=1e-5, atol=1e-5)


# ---- torch.compile ----------------------------------------------------------------------------------
@pytest.mark.parametrize("op", list(OPS))
def test_compile_inductor_fullgraph(op, gen):
    shapes = {"gaussian_kl": [(6, 5)] * 4, "gaussian_log_prob": [(6, 5), (3, 6, 5), ()],
              "bernoulli_log_prob": [(6, 5), (3, 6, 5)]}[op]
    args = [t.requires_grad_() for t in make_inputs(op, shapes, torch.float32, "cpu", gen)]
    fn = OPS[op][0]
    compiled = torch.compile(lambda *a: call(fn, op, a, 1).sum(), fullgraph=True)
    out = compiled(*args)
    grads = torch.autograd.grad(out, args)
    expected = call(fn, op, args, 1).sum()
    expected_grads = torch.autograd.grad(expected, args)
    torch.testing.assert_close(out, expected)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_compile_aot_eager_matrix(case, gen):
    op, shapes, ed = case
    args = [t.requires_grad_() for t in make_inputs(op, shapes, torch.float32, "cpu", gen)]
    fn = OPS[op][0]
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: call(fn, op, a, ed), fullgraph=True, backend="aot_eager")
    out = compiled(*args)
    torch.testing.assert_close(out, call(fn, op, args, ed))
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, args, g), torch.autograd.grad(call(fn, op, args, ed), args, g))


def test_compiled_autograd_runs_the_ops_backward(gen):
    # torch._dynamo's compiled autograd traces the backward graph, the ops' C++ autograd nodes included (a
    # table op's and the sampler's): the same gradients as eager autograd
    mu, lv, pm, plv = (torch.randn(6, 5, generator=gen, requires_grad=True) for _ in range(4))

    def loss():
        z = vf.reparameterize(mu, lv, seed=3)
        return (vf.gaussian_kl(mu, lv, pm, plv) + vf.gaussian_log_prob(z, pm, plv)).sum()

    expected = torch.autograd.grad(loss(), (mu, lv, pm, plv))
    torch._dynamo.reset()
    with torch._dynamo.compiled_autograd._enable(torch.compile(backend="aot_eager")):
        loss().backward()
    for t, e in zip((mu, lv, pm, plv), expected):
        torch.testing.assert_close(t.grad, e)


# ---- hypothesis: shapes, strides, values -------------------------------------------------------------
@st.composite
def broadcast_problem(draw):
    base = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6))
    event_dims = draw(st.integers(0, len(base)))
    shapes = []
    for _ in range(3):
        drop = draw(st.integers(0, len(base)))  # drop leading dims, set some to 1
        shape = list(base[drop:])
        shape = [1 if draw(st.booleans()) and draw(st.booleans()) else s for s in shape]
        shapes.append(tuple(shape))
    shapes[draw(st.integers(0, 2))] = tuple(base)
    transpose = draw(st.booleans())
    scale = draw(st.sampled_from([0.1, 1.0, 5.0]))
    return shapes, event_dims, transpose, scale


@settings(max_examples=60, deadline=None)
@given(broadcast_problem(), st.integers(0, 2**31 - 1), st.sampled_from(DTYPES))
def test_hypothesis_broadcast_strides_values(problem, seed, dtype):
    """Values and every gradient, each element within its error bound, in every dtype."""
    shapes, ed, transpose, scale = problem
    g = torch.Generator().manual_seed(seed)

    def make(shape, scale=scale):
        t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
        if transpose and t.dim() >= 2:  # same values, transposed memory
            t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
        return t

    x, m, lv = (make(s) for s in shapes)
    check_args("gaussian_log_prob", [x, m, lv], ed, g)
    if x.shape == m.shape:
        check_args("gaussian_kl", [x, m, lv, lv * 0.5], ed, g)
        assert (vf.gaussian_kl(x, m, lv, lv * 0.5, event_dims=0) >= 0).all()
    xb = torch.rand(shapes[0], generator=g, dtype=torch.float64).to(dtype)
    ed_b = min(ed, len(torch.broadcast_shapes(xb.shape, m.shape)))
    check_args("bernoulli_log_prob", [xb, make(m.shape, 10 * scale)], ed_b, g)


# ---- bad input: a clear Python exception before any kernel runs -------------------------------------
BAD = [
    (lambda: vf.gaussian_kl([1.0], torch.zeros(1)), TypeError, "`mu` must be a torch.Tensor"),
    (lambda: vf.gaussian_kl(torch.zeros(3, dtype=torch.int64), torch.zeros(3)), TypeError, "`mu` must be float32"),
    (lambda: vf.gaussian_log_prob(torch.zeros(3, dtype=torch.bool), torch.zeros(3), torch.zeros(3)), TypeError, "`x`"),
    (lambda: vf.gaussian_log_prob(torch.zeros(3, dtype=torch.float64), torch.zeros(3), torch.zeros(3)), TypeError,
     "float64 cannot be mixed"),
    (lambda: vf.gaussian_log_prob(torch.zeros(4, 3), torch.zeros(4, 2), torch.zeros(())), ValueError,
     r"x \(4, 3\), mean \(4, 2\)"),
    (lambda: vf.bernoulli_log_prob(torch.zeros(4, 3), torch.zeros(5, 3)), ValueError, "do not broadcast"),
    (lambda: vf.gaussian_kl(torch.zeros(4, 3), torch.zeros(4, 3), event_dims=3), ValueError, "event_dims"),
    (lambda: vf.gaussian_kl(torch.zeros(4, 3), torch.zeros(4, 3), event_dims=-1), ValueError, "event_dims"),
    (lambda: vf.gaussian_kl(torch.zeros(4, 3), torch.zeros(4, 3), event_dims=1.0), TypeError, "event_dims"),
    (lambda: vf.gaussian_kl(torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(3)), ValueError, "together"),
    (lambda: vf.gaussian_kl(torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(3), torch.zeros(2)), ValueError,
     "prior_logvar"),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_input_raises_clearly(i):
    fn, exc, match = BAD[i]
    with pytest.raises(exc, match=match):
        fn()
