"""Edges the maths defines and a differential fuzz found: second derivatives against torch's own autograd
of independent formulas (Hessian-vector products on random directions, not only gradgradcheck's
self-consistency), results up to the dtype's largest finite value, infinite log-variances, and clamp
bounds compared in the clamped input's dtype (as torch.clamp does)."""

from __future__ import annotations

import math
from decimal import Decimal, getcontext

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

import vae_fast as vf

from conftest import randn

F64 = torch.float64


# ---- second derivatives ----------------------------------------------------------------------------
def _hvp(fn, params, gen):
    """(outputs, H v) of L = sum_j <w_j, out_j> with random w and v: the Hessian-vector product of every
    op output weighted at once, so each mixed second derivative is exercised."""
    outs = fn(*params)
    outs = outs if isinstance(outs, tuple) else (outs,)
    weights = [randn(o.shape, F64, gen=gen) for o in outs]
    loss = sum((w * o).sum() for w, o in zip(weights, outs))
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True, materialize_grads=True)
    directions = [randn(p.shape, F64, gen=gen) for p in params]
    return outs, torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, directions)), params,
                                     allow_unused=True, materialize_grads=True)


def _compare_hvp(fused, reference, shapes, gen, scale=None):
    scale = scale or [1.0] * len(shapes)
    params = [randn(s, F64, gen=gen, scale=c).requires_grad_() for s, c in zip(shapes, scale)]
    state = gen.get_state()
    got_out, got = _hvp(fused, params, gen)
    gen.set_state(state)  # the same weights and directions for the reference
    want_out, want = _hvp(reference, params, gen)
    for a, b in zip(got_out, want_out):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def _normal(mean, logvar):
    return Normal(mean, torch.exp(0.5 * logvar))


def test_row_ops_hessian_vector_products_match_torch(gen):
    _compare_hvp(lambda m, lv: vf.gaussian_kl(m, lv),
                 lambda m, lv: kl_divergence(_normal(m, lv), Normal(0.0, 1.0)).sum(-1), [(3, 4), (3, 4)], gen)
    _compare_hvp(lambda m, lv, pm, plv: vf.gaussian_kl(m, lv, pm, plv),
                 lambda m, lv, pm, plv: kl_divergence(_normal(m, lv), _normal(pm, plv)).sum(-1),
                 [(3, 4), (3, 4), (4,), (3, 1)], gen)
    # the decoder's (K, B, D) mean against (B, D) data, a scalar log-variance
    _compare_hvp(lambda x, m, lv: vf.gaussian_log_prob(x, m, lv),
                 lambda x, m, lv: _normal(m, lv).log_prob(x).sum(-1), [(3, 4), (2, 3, 4), ()], gen)
    # the data x = sigmoid(u) in (0, 1), the Bernoulli's support
    _compare_hvp(lambda u, l: vf.bernoulli_log_prob(torch.sigmoid(u), l),
                 lambda u, l: (torch.sigmoid(u) * l - F.softplus(l)).sum(-1), [(2, 3, 4), (2, 3, 4)], gen,
                 scale=[1.0, 3.0])
    for reduction in ("none", "sum"):
        _compare_hvp(lambda i, t, v: vf.gaussian_nll_loss(i, t, v.exp(), full=True, reduction=reduction),
                     lambda i, t, v: F.gaussian_nll_loss(i, t, v.exp(), full=True, reduction=reduction),
                     [(3, 4), (3, 4), (3, 4)], gen)


def _eps(shape_mu, num_samples, seed):
    """The op's own eps for `seed`: z at mu = 0, logvar = 0 is eps exactly."""
    zeros = torch.zeros(shape_mu, dtype=F64)
    return vf.reparameterize(zeros, zeros, num_samples, seed=seed)


@pytest.mark.parametrize("clamp", [None, (-1.0, 1.0)])
@pytest.mark.parametrize("num_samples", [None, 3])
@pytest.mark.parametrize("path_only", [False, True])
def test_sampler_hessian_vector_products_match_torch(num_samples, path_only, clamp, gen):
    """log_q_path_only promises log q(z; stop_grad(mu), stop_grad(logvar)) at every order: torch's
    Normal(mu.detach(), std.detach()).log_prob(z) with z = mu + std * eps (logvar clamped first, with a clamp)."""
    shape, seed = (3, 5), int(torch.randint(0, 2**31, (1,), generator=gen))
    eps = _eps(shape, num_samples, seed)

    def fused(m, lv):
        return vf.reparameterize(m, lv, num_samples, seed=seed, return_log_q=True, log_q_path_only=path_only,
                                 logvar_clamp=clamp)

    def reference(m, lv):
        lv = lv if clamp is None else torch.clamp(lv, *clamp)
        z = m + torch.exp(0.5 * lv) * eps
        q = _normal(m.detach(), lv.detach()) if path_only else _normal(m, lv)
        return z, q.log_prob(z).sum(-1)

    _compare_hvp(fused, reference, [shape, shape], gen)
    if clamp is not None:
        return
    _compare_hvp(lambda m, lv: vf.reparameterize_with_kl(m, lv, num_samples, seed=seed),
                 lambda m, lv: (m + torch.exp(0.5 * lv) * eps, kl_divergence(_normal(m, lv), Normal(0.0, 1.0)).sum(-1)),
                 [shape, shape], gen)


def test_path_only_second_derivative_known_value():
    """The fuzz's case: one element at mu = logvar = 0; d/d(mu, logvar) of d log_q / d mu = (-1, -eps/2)."""
    mu = torch.zeros(1, 1, dtype=F64, requires_grad=True)
    lv = torch.zeros(1, 1, dtype=F64, requires_grad=True)
    z, log_q = vf.reparameterize(mu, lv, seed=3, return_log_q=True, log_q_path_only=True)
    (d_mu,) = torch.autograd.grad(log_q.sum(), mu, create_graph=True)
    second = torch.autograd.grad(d_mu.sum(), (mu, lv))
    eps = z.detach().item()
    assert second[0].item() == pytest.approx(-1.0, rel=1e-12)
    assert second[1].item() == pytest.approx(-0.5 * eps, rel=1e-12)


# ---- results up to the dtype's largest finite value ---------------------------------------------------
getcontext().prec = 60


def _d(x) -> Decimal:
    return Decimal(float(x))


def _kl_std(mu, lv):
    return _d(mu) ** 2 / 2 + ((_d(lv).exp() - 1) - _d(lv)) / 2


def _kl(m1, lv1, m2, lv2):
    d = _d(lv1) - _d(lv2)
    return ((d.exp() - 1) - d + (_d(m1) - _d(m2)) ** 2 / _d(lv2).exp()) / 2


def _glp(x, m, lv):
    return -(Decimal(2 * math.pi).ln() + _d(lv) + (_d(x) - _d(m)) ** 2 / _d(lv).exp()) / 2


def _cases(dtype, device):
    """(name, fused value as a float, exact Decimal) near and below the dtype's largest finite value: each
    input solved for a target of 0.25, 0.5 and 0.9 times it (rounded to the dtype, the exact value recomputed)."""
    big = torch.finfo(dtype).max
    r = lambda v: torch.tensor(float(v), dtype=dtype).item()  # noqa: E731  (rounded to the dtype)
    t = lambda v: torch.tensor([[float(v)]], dtype=dtype, device=device)  # noqa: E731
    g_small = 2.0 ** -10
    cases = []
    for frac in (0.25, 0.5, 0.9):
        target = Decimal(big) * Decimal(frac)
        ln2t = float((2 * target).ln())
        # KL to N(0, 1): through the log-variance, and through the mean
        lv = r(ln2t)
        cases.append((f"kl lv={lv}", vf.gaussian_kl(t(0), t(lv)), _kl_std(0, lv)))
        mu = r((2 * target).sqrt())
        cases.append((f"kl mu={mu}", vf.gaussian_kl(t(mu), t(0)), _kl_std(mu, 0)))
        # its log-variance gradient g/2 expm1(lv), with g = 1 and with a small g (e^lv alone overflows)
        for g in (1.0, g_small):
            lv = r(float((2 * target / Decimal(g)).ln()))
            m_, l_ = t(0).requires_grad_(), t(lv).requires_grad_()
            (dl,) = torch.autograd.grad(vf.gaussian_kl(m_, l_), l_, t(g).view(1))
            cases.append((f"dkl/dlv g={g} lv={lv}", dl, Decimal(g) * ((_d(lv).exp() - 1) / 2)))
        # KL between two Gaussians: through d = lv1 - lv2, and through (m1 - m2)^2 / v2
        half = r(ln2t / 2)
        cases.append((f"kl2 d={2 * half}", vf.gaussian_kl(t(0), t(half), t(0), t(-half)), _kl(0, half, 0, -half)))
        lv2 = r(-8.0)
        m1 = r((2 * target * _d(lv2).exp()).sqrt())
        cases.append((f"kl2 m1={m1}", vf.gaussian_kl(t(m1), t(lv2), t(0), t(lv2)), _kl(m1, lv2, 0, lv2)))
        for g in (1.0, g_small):
            lv1 = r(float((2 * target / Decimal(g)).ln()) / 2)
            args = [t(0), t(lv1), t(0), t(-lv1)]
            args = [a.requires_grad_() for a in args]
            d_lv1, d_lv2 = torch.autograd.grad(vf.gaussian_kl(*args), (args[1], args[3]), t(g).view(1))
            d = 2 * _d(lv1)
            cases.append((f"dkl2/dlv1 g={g}", d_lv1, Decimal(g) * (d.exp() - 1) / 2))
            cases.append((f"dkl2/dlv2 g={g}", d_lv2, -Decimal(g) * (d.exp() - 1) / 2))
        # Gaussian log-density: through (x - m)^2 at lv = 0 (the fuzz's 1.9e19), and through e^(-lv)
        x = r((2 * target).sqrt())
        cases.append((f"glp x={x}", vf.gaussian_log_prob(t(x), t(0), t(0)), _glp(x, 0, 0)))
        lv = r(-30.0)
        x = r((2 * target * _d(lv).exp()).sqrt())
        cases.append((f"glp x={x} lv={lv}", vf.gaussian_log_prob(t(x), t(0), t(lv)), _glp(x, 0, lv)))
        # its gradients: g (x - m) / v (lv very negative) and g/2 ((x - m)^2 / v - 1), with a small g too
        for g in (1.0, g_small):
            lv = r(-(float((target / Decimal(g)).ln()) - 4.0))
            x = r(_d(lv).exp() * target / Decimal(g))
            xs, ms, ls = t(x), t(0).requires_grad_(), t(lv).requires_grad_()
            (dm,) = torch.autograd.grad(vf.gaussian_log_prob(xs, ms, ls), ms, t(g).view(1))
            cases.append((f"dglp/dm g={g}", dm, Decimal(g) * _d(x) / _d(lv).exp()))
            x = r((2 * target / Decimal(g)).sqrt())
            xs, ls = t(x), t(0).requires_grad_()
            (dl,) = torch.autograd.grad(vf.gaussian_log_prob(xs, t(0), ls), ls, t(g).view(1))
            cases.append((f"dglp/dlv g={g} x={x}", dl, Decimal(g) * (_d(x) ** 2 - 1) / 2))
        # F.gaussian_nll_loss's term 0.5 (log v + d^2 / v), and its var gradient g/2 (1/v - d^2/v^2)
        var = r(4.0)
        d = r((2 * target * _d(var)).sqrt())
        got = vf.gaussian_nll_loss(t(d), t(0), t(var), reduction="none")
        cases.append((f"nll d={d}", got, (_d(var).ln() + _d(d) ** 2 / _d(var)) / 2))
        for g in (1.0, g_small):
            d = r((2 * target / Decimal(g)).sqrt() * _d(var))
            vs = t(var).requires_grad_()
            (dv,) = torch.autograd.grad(vf.gaussian_nll_loss(t(d), t(0), vs, reduction="none"), vs, t(g))
            cases.append((f"dnll/dvar g={g} d={d}", dv, Decimal(g) * (1 / _d(var) - _d(d) ** 2 / _d(var) ** 2) / 2))
        # Bernoulli: x * l - softplus(l) at logits near the largest value
        cases.append(("bernoulli", vf.bernoulli_log_prob(t(0.5), t(-float(target))), -target / 2))
        # the KL of the fused sampler
        lv = r(ln2t)
        _, kl = vf.reparameterize_with_kl(t(0), t(lv), seed=1)
        cases.append((f"reparameterize_with_kl lv={lv}", kl, _kl_std(0, lv)))
    return cases


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_results_up_to_the_largest_finite_value(dtype, device):
    """README: no intermediate overflow where the result is finite. Each op, forward and backward, at
    results of a quarter, a half and 0.9 of the dtype's largest value, against the exact value."""
    rel = 64 * torch.finfo(dtype).eps
    bad = []
    for name, got, exact in _cases(dtype, device):
        value = got.detach().double().cpu().item()
        assert abs(exact) <= Decimal(torch.finfo(dtype).max), name  # the case is representable
        if not math.isfinite(value) or abs(Decimal(value) - exact) > Decimal(rel) * abs(exact):
            bad.append(f"{name}: got {value!r}, exact {float(exact)!r}")
    assert not bad, "\n".join(bad)


# ---- infinite log-variances -----------------------------------------------------------------------
INF = math.inf


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_infinite_logvar_limits(dtype, device):
    t = lambda *v: torch.tensor([v], dtype=dtype, device=device)  # noqa: E731
    # KL(N(0, e^+inf) || N(0, 1)) = +inf; a posterior variance of 0 is +inf too
    assert vf.gaussian_kl(t(0.5, 0.0), t(INF, 0.0)).item() == INF
    assert vf.gaussian_kl(t(0.5, 0.0), t(-INF, 0.0)).item() == INF
    # a prior of variance 0 (logvar -inf) or of infinite variance: +inf either way
    assert vf.gaussian_kl(t(0.0), t(0.0), t(0.0), t(-INF)).item() == INF
    assert vf.gaussian_kl(t(0.3), t(1.0), t(0.0), t(INF)).item() == INF
    assert vf.gaussian_kl(t(0.0), t(INF), t(0.0), t(0.0)).item() == INF
    # the density of N(m, 0): 0 away from m (log -inf), infinite at m
    assert vf.gaussian_log_prob(t(1.0), t(0.0), t(-INF)).item() == -INF
    assert vf.gaussian_log_prob(t(1.0, 2.0), t(0.0, 2.0), t(-INF, 0.0)).item() == -INF
    assert vf.gaussian_log_prob(t(0.5), t(0.5), t(-INF)).item() == INF
    # an infinite variance: log density -inf everywhere
    assert vf.gaussian_log_prob(t(1.0), t(0.0), t(INF)).item() == -INF
    _, kl = vf.reparameterize_with_kl(t(0.0, 1.0), t(INF, 0.0), seed=0)
    assert kl.item() == INF


def test_infinite_logvar_kl_gradients_have_the_limits_sign(device):
    lv = torch.tensor([[INF, -INF]], device=device, requires_grad=True)
    (g,) = torch.autograd.grad(vf.gaussian_kl(torch.zeros(1, 2, device=device), lv).sum(), lv)
    assert g[0, 0].item() == INF and g[0, 1].item() == -0.5  # d/dlv 0.5 expm1(lv)


# ---- clamp bounds in the input's dtype --------------------------------------------------------------
def _neighbours(value: float, dtype):
    """value rounded to dtype, and its neighbours one unit in the last place of dtype away."""
    v = torch.tensor(value, dtype=dtype).item()
    ulp = torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(abs(v)))
    return torch.tensor([v - ulp, v, v + ulp], dtype=F64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_clamp_bounds_are_compared_in_the_inputs_dtype(dtype, device):
    """logvar at, just inside and just outside each bound: the value and the gradient mask are
    torch.clamp's in that dtype (a bfloat16 0.69921875 with lower bound 0.7 is at the bound, not below)."""
    lo, hi = 0.7, 3.3
    lv = torch.cat([_neighbours(lo, dtype), _neighbours(hi, dtype)]).view(1, -1).to(device)
    mu = torch.full_like(lv, 0.25)
    ref_lv = lv.detach().clone().requires_grad_()
    clamped = torch.clamp(ref_lv, lo, hi)
    clamped.sum().backward()
    expected_mask = ref_lv.grad != 0
    expected_value = clamped.detach().double().cpu()

    def check(name, fn):
        x = lv.detach().clone().requires_grad_()
        out = fn(x)
        (g,) = torch.autograd.grad(out.sum(), x)
        assert torch.equal(g != 0, expected_mask), (name, lv.tolist(), g.tolist(), expected_mask.tolist())
        return out

    kl = check("gaussian_kl", lambda x: vf.gaussian_kl(mu, x, event_dims=0, logvar_clamp=(lo, hi)))
    torch.testing.assert_close(kl.double().cpu(), 0.5 * (0.25 ** 2 + torch.expm1(expected_value) - expected_value),
                               rtol=1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5, atol=1e-6)
    check("gaussian_kl prior", lambda x: vf.gaussian_kl(mu, mu, mu, x, event_dims=0, prior_logvar_clamp=(lo, hi)))
    check("gaussian_log_prob", lambda x: vf.gaussian_log_prob(mu * 3, mu, x, event_dims=0, logvar_clamp=(lo, hi)))
    check("reparameterize", lambda x: vf.reparameterize(mu, x, seed=4, logvar_clamp=(lo, hi)))
    check("DiagonalGaussianDistribution",
          lambda x: vf.DiagonalGaussianDistribution(torch.cat([mu, x], dim=1), dim=1, logvar_clamp=(lo, hi)).kl())
