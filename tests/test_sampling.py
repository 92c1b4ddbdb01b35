"""The sampling ops: Philox stream statistics, reproducibility, exact gradients from regenerated eps,
log q, nothing K-sized saved for backward, torch.compile."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

import vae_fast as vf
from vae_fast.ops import _composite as ref
from conftest import DTYPES, assert_within, grad_bounds, randn, value_bounds


def eps_for(shape, seed, num_samples=None, device="cpu"):
    """The exact eps the ops draw for `seed`: with mu = 0 and logvar = 0, z = 0 + 1 * eps."""
    zeros = torch.zeros(shape, device=device)
    return vf.reparameterize(zeros, zeros, num_samples, seed=seed)


# ---- statistics of the stream ------------------------------------------------------------------
def test_moments_and_ks_against_standard_normal(device):
    eps = eps_for((512, 1000), seed=1234, device=device).double().cpu().flatten()
    n = eps.numel()
    assert abs(eps.mean().item()) < 5 / n**0.5
    assert abs(eps.var().item() - 1) < 5 * (2 / n) ** 0.5
    assert abs(stats.skew(eps.numpy())) < 5 * (6 / n) ** 0.5
    assert abs(stats.kurtosis(eps.numpy())) < 5 * (24 / n) ** 0.5
    assert stats.kstest(eps[:200_000].numpy(), "norm").pvalue > 1e-4


def test_no_correlation_between_elements_samples_or_calls(device):
    z = eps_for((2000, 64), seed=99, num_samples=2, device=device).cpu().double()
    n = z[0].numel()
    bound = 5 / n**0.5
    # Neighbouring elements (same Philox block and across blocks), samples, and rows.
    assert abs(np.corrcoef(z[0, :, :-1].flatten(), z[0, :, 1:].flatten())[0, 1]) < bound
    assert abs(np.corrcoef(z[0, :, :-4].flatten(), z[0, :, 4:].flatten())[0, 1]) < bound
    assert abs(np.corrcoef(z[0].flatten(), z[1].flatten())[0, 1]) < bound
    assert abs(np.corrcoef(z[0, :-1].flatten(), z[0, 1:].flatten())[0, 1]) < bound
    # Two calls with seeds drawn from torch's generator.
    mu, lv = torch.zeros(2000, 64, device=device), torch.zeros(2000, 64, device=device)
    a, b = vf.reparameterize(mu, lv), vf.reparameterize(mu, lv)
    assert abs(np.corrcoef(a.cpu().flatten(), b.cpu().flatten())[0, 1]) < bound


def test_box_muller_pairs_are_uncorrelated_in_square(device):
    # The two normals from one (radius, angle) pair: independent only if the transform is right.
    e = eps_for((100_000,), seed=5, device=device).cpu().double()
    x, y = e[0::2], e[1::2]
    assert abs(np.corrcoef(x**2, y**2)[0, 1]) < 5 / len(x) ** 0.5


# ---- reproducibility --------------------------------------------------------------------------------
def test_seed_sources_reproduce(device):
    mu = torch.randn(16, 8, device=device)
    lv = torch.randn(16, 8, device=device)
    torch.manual_seed(3)
    a = vf.reparameterize(mu, lv)
    torch.manual_seed(3)
    b = vf.reparameterize(mu, lv)
    torch.manual_seed(4)
    c = vf.reparameterize(mu, lv)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(vf.reparameterize(mu, lv, seed=11), vf.reparameterize(mu, lv, seed=11))
    seed_t = torch.tensor([11], device=device)
    assert torch.equal(vf.reparameterize(mu, lv, seed=seed_t), vf.reparameterize(mu, lv, seed=11))
    g1 = torch.Generator(device=device).manual_seed(8)
    g2 = torch.Generator(device=device).manual_seed(8)
    assert torch.equal(vf.reparameterize(mu, lv, generator=g1), vf.reparameterize(mu, lv, generator=g2))
    z = vf.reparameterize(mu, lv, 3, seed=11)
    assert not torch.equal(z[0], z[1]) and not torch.equal(z[1], z[2])
    # reparameterize_with_kl draws the same z for the same seed.
    assert torch.equal(vf.reparameterize_with_kl(mu, lv, 3, seed=11)[0], z)
    # Large seeds, including ones with the top bit set, are accepted and distinct.
    assert not torch.equal(vf.reparameterize(mu, lv, seed=2**64 - 1), vf.reparameterize(mu, lv, seed=2**63 - 1))


def test_counter_layout_is_the_documented_one():
    # Element i of z with K samples is eps(seed, i) in C order: sample k of row r is at k*rows*D + r*D.
    seed = 21
    flat = eps_for((3 * 5 * 7,), seed=seed)
    z = eps_for((5, 7), seed=seed, num_samples=3)
    assert torch.equal(z.flatten(), flat)
    # Independent of how the same elements are shaped or chunked across rows.
    assert torch.equal(eps_for((35,), seed)[:35], eps_for((5, 7), seed).flatten())


# ---- values, gradients, log q -----------------------------------------------------------------------
def check_against_reference(dtype, num_samples, device, gen, perturb=None):
    """z, the KL and log q, and the gradients through (z, log q) and (z, kl) (upstream gradients that are not 1)
    against the float64 reference from the same eps, each element within its own error bound
    (conftest.error_bound). `perturb` (name, factor) scales one fused gradient: the tests of the bound."""
    mu = randn((6, 9), dtype, device, gen).requires_grad_()
    lv = randn((6, 9), dtype, device, gen).requires_grad_()
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    eps = eps_for((6, 9), seed, num_samples, device).double().cpu()
    mu64, lv64 = (t.detach().double().cpu().requires_grad_() for t in (mu, lv))
    z, kl = vf.reparameterize_with_kl(mu, lv, num_samples, seed=seed)
    _, log_q = vf.reparameterize(mu, lv, num_samples, seed=seed, return_log_q=True)
    z64 = ref.reparameterize(mu64, lv64, eps)
    kl64 = ref.gaussian_kl(mu64, lv64)
    log_q64 = ref.standard_normal_log_prob(eps, lv64.expand_as(eps))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert z.dtype == dtype and kl.dtype == log_q.dtype == acc
    shape = eps.shape
    assert_within(z, z64, value_bounds(lambda m, l: ref.reparameterize(m, l, eps), (mu64, lv64), 0, z64, dtype, acc,
                                       shape), "z")
    assert_within(kl, kl64, value_bounds(lambda m, l: ref.gaussian_kl(m, l, event_dims=0), (mu64, lv64), 1, kl64,
                                         acc, acc), "kl")
    assert_within(log_q, log_q64, value_bounds(lambda m, l: ref.standard_normal_log_prob(eps, l, event_dims=0),
                                               (mu64, lv64), 1, log_q64, acc, acc, shape), "log_q")
    # Upstream gradients that are not 1, through (z, log q) of one call and (z, kl) of another: each
    # backward is one kernel, so each gradient is rounded once (autograd's sum of several calls'
    # gradients in bfloat16 would round again).
    gz, gkl, glq = randn(z.shape, dtype, device, gen), randn(kl.shape, kl.dtype, device, gen), randn(
        log_q.shape, log_q.dtype, device, gen)
    gz64, gkl64, glq64 = (t.double().cpu() for t in (gz, gkl, glq))
    z_and_log_q = vf.reparameterize(mu, lv, num_samples, seed=seed, return_log_q=True)
    z_and_kl = vf.reparameterize_with_kl(mu, lv, num_samples, seed=seed)
    # The same losses as element-wise terms over (K, B, D); the KL counted once per (B, D) position.
    once = torch.zeros(shape, dtype=torch.float64)
    once.view(-1, *mu.shape)[0] = 1.0
    checks = [
        ("z, log q", z_and_log_q, (gz, glq), (z64 * gz64).sum() + (log_q64 * glq64).sum(),
         lambda m, l: gz64 * ref.reparameterize(m, l, eps) + glq64[..., None] * ref.standard_normal_log_prob(
             eps, l, event_dims=0)),
        ("z, kl", z_and_kl, (gz, gkl), (z64 * gz64).sum() + (kl64 * gkl64).sum(),
         lambda m, l: gz64 * ref.reparameterize(m, l, eps) + once * gkl64[..., None] * ref.gaussian_kl(
             m, l, event_dims=0)),
    ]
    for what, outputs, upstream, loss64, loss_terms in checks:
        dmu, dlv = torch.autograd.grad(outputs, (mu, lv), upstream)
        dmu64, dlv64 = torch.autograd.grad(loss64, (mu64, lv64), retain_graph=True)
        bounds = grad_bounds(loss_terms, (mu64, lv64), (dmu64, dlv64), (dtype, dtype), acc, shape)
        for name, got, expected, bound in zip(("mu", "logvar"), (dmu, dlv), (dmu64, dlv64), bounds):
            if perturb is not None and perturb[0] == name:
                got = (got.double() * perturb[1]).to(dtype)
            assert_within(got, expected, bound, f"d{name} through {what} ({dtype})")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_samples", [None, 3])
def test_values_and_gradients_against_reference(dtype, num_samples, device, gen):
    check_against_reference(dtype, num_samples, device, gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_samples", [None, 3])
def test_a_one_percent_error_in_a_gradient_fails(dtype, num_samples, gen):
    # The bound is per element: a 1% error in dlogvar (or dmu) fails in every dtype, bfloat16 included.
    for name in ("mu", "logvar"):
        with pytest.raises(AssertionError, match=f"d{name}"):
            check_against_reference(dtype, num_samples, "cpu", gen, perturb=(name, 1.01))


@pytest.mark.parametrize("num_samples", [None, 2])
@pytest.mark.parametrize("event_dims", [0, 1, 2])
def test_gradcheck(num_samples, event_dims, device, gen):
    mu = randn((3, 4), torch.float64, device, gen).requires_grad_()
    lv = randn((3, 4), torch.float64, device, gen).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: vf.reparameterize_with_kl(a, b, num_samples, seed=17, event_dims=event_dims), (mu, lv))
    assert torch.autograd.gradcheck(
        lambda a, b: vf.reparameterize(a, b, num_samples, seed=17, return_log_q=True, event_dims=event_dims), (mu, lv))


def test_bf16_gradient_is_exact_not_from_rounded_z(gen):
    # z is rounded to bf16; dlogvar from z - mu would inherit that error, the regenerated eps does not.
    mu = randn((64, 32), torch.bfloat16, gen=gen).requires_grad_()
    lv = randn((64, 32), torch.bfloat16, gen=gen).requires_grad_()
    z = vf.reparameterize(mu, lv, seed=3)
    (dlv,) = torch.autograd.grad(z.float().sum(), lv)
    eps = eps_for((64, 32), 3).double()
    exact = 0.5 * torch.exp(0.5 * lv.detach().double()) * eps
    exact_bf16 = exact.to(torch.bfloat16)
    ours = (dlv == exact_bf16).double().mean()
    from_z = (0.5 * (z.detach().double() - mu.detach().double())).to(torch.bfloat16)
    via_z = (from_z == exact_bf16).double().mean()
    assert ours > 0.99, "dlogvar should be the exact value rounded once to bf16"
    assert via_z < ours - 0.1, "the test should show that z - mu is not good enough"


def test_nothing_sample_sized_is_saved_for_backward():
    mu = torch.randn(32, 16, requires_grad=True)
    lv = torch.randn(32, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        z, kl = vf.reparameterize_with_kl(mu, lv, 50)
        z2, lq = vf.reparameterize(mu, lv, 50, return_log_q=True)
    assert saved and max(saved) <= mu.numel()
    (z.sum() + kl.sum() + z2.sum() + lq.sum()).backward()
    assert torch.isfinite(mu.grad).all()


def test_k1_dmu_is_upstream_gradient_itself():
    mu = torch.randn(8, 4, requires_grad=True)
    lv = torch.randn(8, 4, requires_grad=True)
    g = torch.randn(8, 4)
    z = vf.reparameterize(mu, lv)
    (dmu,) = torch.autograd.grad(z, mu, g)
    assert torch.equal(dmu, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype, device, gen):
    mu = randn((5, 7), dtype, device, gen).requires_grad_()
    lv = randn((5, 7), dtype, device, gen).requires_grad_()
    seed = torch.tensor([42], device=device)
    for seeds in [(seed, None), (None, 42)]:  # a device seed tensor, or a seed by value
        for args in [(2, True, 1, True, True, False), (1, False, 0, False, True, False), (1, False, 1, True, False, True)]:
            torch.library.opcheck(torch.ops.vae_fast.sample_gaussian.default, (mu, lv, *seeds, *args))


def test_empty_and_shapes(device):
    z, kl = vf.reparameterize_with_kl(torch.zeros(0, 4, device=device), torch.zeros(0, 4, device=device), 3)
    assert z.shape == (3, 0, 4) and kl.shape == (0,)
    z, lq = vf.reparameterize(torch.zeros(2, 3, 4, device=device), torch.zeros(2, 3, 4, device=device), 5,
                              return_log_q=True, event_dims=2)
    assert z.shape == (5, 2, 3, 4) and lq.shape == (5, 2)


# ---- torch.compile ----------------------------------------------------------------------------------
def test_compile_fallback_random_matches_eager_and_calls_differ():
    import torch._inductor.config as inductor_config

    mu = torch.randn(8, 6, requires_grad=True)
    lv = torch.randn(8, 6, requires_grad=True)

    def two_draws(a, b):
        z1, kl = vf.reparameterize_with_kl(a, b, 2)
        z2 = vf.reparameterize(a, b)
        return z1, z2, kl

    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True):
        compiled = torch.compile(two_draws, fullgraph=True)
        torch.manual_seed(5)
        cz1, cz2, ckl = compiled(mu, lv)
    torch.manual_seed(5)
    ez1, ez2, ekl = two_draws(mu, lv)
    torch.testing.assert_close(cz1, ez1)
    torch.testing.assert_close(cz2, ez2)
    torch.testing.assert_close(ckl, ekl)
    assert not torch.equal(cz1[0], cz2)  # two calls in one graph draw different samples
    (cz1.sum() + cz2.sum() + ckl.sum()).backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(lv.grad).all()


# ---- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, exc, match", [
    (lambda: vf.reparameterize(torch.zeros(3, 2), torch.zeros(3, 3)), ValueError, "same shape"),
    (lambda: vf.reparameterize(torch.zeros(3), torch.zeros(3), 0), ValueError, "num_samples"),
    (lambda: vf.reparameterize(torch.zeros(3), torch.zeros(3), 2.5), TypeError, "num_samples"),
    (lambda: vf.reparameterize(torch.zeros(3), torch.zeros(3, dtype=torch.float64)), TypeError, "float64"),
    (lambda: vf.reparameterize(torch.zeros(3), torch.zeros(3, dtype=torch.bfloat16)), TypeError, "one dtype"),
    (lambda: vf.reparameterize(torch.zeros(3, dtype=torch.int32), torch.zeros(3)), TypeError, "`mu`"),
    (lambda: vf.reparameterize(torch.zeros(3), torch.zeros(3), seed=1.5), TypeError, "seed"),
    (lambda: vf.reparameterize(torch.zeros(3), torch.zeros(3), seed=torch.zeros(2, dtype=torch.int64)), TypeError,
     "seed"),
    (lambda: vf.reparameterize(torch.zeros(3), torch.zeros(3), seed=2**64), ValueError, "64 bits"),
    (lambda: vf.reparameterize_with_kl(torch.zeros(3), torch.zeros(3), event_dims=2), ValueError, "event_dims"),
    (lambda: vf.reparameterize("mu", torch.zeros(3)), TypeError, "`mu` must be a torch.Tensor"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_event_dims_and_thread_count_do_not_change_results():
    mu = torch.randn(300, 37)
    lv = torch.randn(300, 37)
    z0, kl0 = vf.reparameterize_with_kl(mu, lv, 2, seed=9, event_dims=0)
    z1, kl1 = vf.reparameterize_with_kl(mu, lv, 2, seed=9, event_dims=1)
    assert torch.equal(z0, z1)
    torch.testing.assert_close(kl0.sum(-1), kl1)
    _, lq0 = vf.reparameterize(mu, lv, 2, seed=9, return_log_q=True, event_dims=0)
    _, lq1 = vf.reparameterize(mu, lv, 2, seed=9, return_log_q=True, event_dims=1)
    torch.testing.assert_close(lq0.sum(-1), lq1)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = vf.reparameterize(mu.repeat(40, 1), lv.repeat(40, 1), 2, seed=9, return_log_q=True)
        torch.set_num_threads(2)
        two = vf.reparameterize(mu.repeat(40, 1), lv.repeat(40, 1), 2, seed=9, return_log_q=True)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
