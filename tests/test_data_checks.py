"""Wrong data refused, never scored (issue 29), and the last edges a differential fuzz found: the likelihoods'
supports (the mixture of logistics' grid in [-1, 1], the Bernoulli's [0, 1]), the models' batch dtypes, double
backward of half inputs in float32, gaussian_nll_loss without intermediate overflow, the mixture's infinite
parameters, the exact sech^2, broadcast half gradients rounded once, and seeds on the meta device."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vae_fast as vf
from vae_fast.ops import _dmol_composite as composite

dmol = vf.discretized_mix_logistic_log_prob


def levels_signed(shape, gen, bits=8):
    """Data on the 2^bits grid in [-1, 1] (k / half_levels - 1), both edges included."""
    levels = 2 ** bits - 1
    k = torch.randint(0, levels + 1, shape, generator=gen)
    k.view(-1)[0], k.view(-1)[-1] = 0, levels
    return k.double() * (2.0 / levels) - 1.0


# ------------------------------------------------------------------------------------------------
# the mixture of logistics reads 2^bits-level data in [-1, 1], nothing else
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [1.5, -1.001, 100.0, math.inf, -math.inf, math.nan])
def test_dmol_refuses_data_outside_its_range(bad, gen):
    x = levels_signed((2, 3, 4, 4), gen).float()
    params = torch.randn(2, 100, 4, 4, generator=gen)
    dmol(x, params)  # valid data: scored
    x[1, 2, 3, 1] = bad
    with pytest.raises(ValueError, match=r"`x` must be 8-bit data in \[-1, 1\].*\(1 of 96 outside \[-1, 1\] or not "
                                         r"finite\).*vf\.data\.from_levels\(k, \"signed\"\)"):
        dmol(x, params)


def test_dmol_refuses_unit_range_data(gen):
    # what vf.data.load returns: k / 255 in [0, 1]; inside [-1, 1] but off the grid for even k
    k = torch.randint(0, 256, (2, 3, 4, 4), generator=gen)
    params = torch.randn(2, 100, 4, 4, generator=gen)
    with pytest.raises(ValueError, match=r"must lie on the 256 levels .* off it .*data in \[0, 1\]\?.*x \* 2 - 1"):
        dmol(k.float() / 255, params)
    on_grid = vf.data.from_levels(k.to(torch.uint8), "signed")
    torch.testing.assert_close(dmol(on_grid, params), dmol(k.float() / 127.5 - 1, params))


def test_dmol_grid_follows_num_bits(gen):
    x5 = levels_signed((2, 3, 4, 4), gen, bits=5).float()
    params = torch.randn(2, 100, 4, 4, generator=gen)
    dmol(x5, params, num_bits=5)
    with pytest.raises(ValueError, match="off it"):
        dmol(x5, params, num_bits=8)  # 5-bit levels are not 8-bit ones
    # within 0.1 of a level of the grid: accepted (float rounding of the levels), beyond refused
    x8 = (torch.tensor([3.0, 100.0, 200.0, 17.0]) / 127.5 - 1).view(1, 1, 2, 2)
    p1 = torch.randn(1, 3, 2, 2, generator=gen)
    dmol(x8 + 0.05 / 127.5, p1)
    with pytest.raises(ValueError, match="off it"):
        dmol(x8 + 0.2 / 127.5, p1)


def test_dmol_x_dtype_must_hold_the_levels(gen):
    x = levels_signed((2, 3, 4, 4), gen)
    params = torch.randn(2, 100, 4, 4, generator=gen, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"`x` in BFloat16 cannot hold the 256 levels .* pass x as float32"):
        dmol(x.bfloat16(), params)
    ref = dmol(x.float(), params)  # float32 x against bfloat16 params: fine
    # float16 holds 8-bit levels to 1/8 of a level: scored as stored (the bin centred on each value)
    torch.testing.assert_close(dmol(x.half(), params), dmol(x.half().float(), params), rtol=0, atol=0)
    torch.testing.assert_close(dmol(x.half(), params), ref, rtol=1e-3, atol=0)
    with pytest.raises(ValueError, match="Half cannot hold the 1024 levels"):
        dmol(levels_signed((2, 3, 4, 4), gen, bits=10).half(), params, num_bits=10)
    dmol(levels_signed((2, 3, 4, 4), gen, bits=6).bfloat16(), params, num_bits=6)  # bfloat16 holds 64 levels


def test_dmol_nan_params_stay_nan_on_valid_data(gen):
    x = levels_signed((2, 3, 4, 4), gen).float()
    params = torch.randn(2, 100, 4, 4, generator=gen)
    params[0, 15, 1, 1] = math.nan  # a mean of sample 0
    out = dmol(x, params)
    assert math.isnan(out[0].item()) and math.isfinite(out[1].item())


def test_dmol_data_check_under_compile(gen):
    params = torch.randn(2, 100, 4, 4, generator=gen)
    fn = torch.compile(lambda x, p: dmol(x, p).sum(), fullgraph=True, backend="aot_eager")
    fn(levels_signed((2, 3, 4, 4), gen).float(), params)
    with pytest.raises(ValueError, match="8-bit data in"):
        fn(torch.full((2, 3, 4, 4), 3.0), params)


def _aten_ops(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def test_data_checks_cost_no_pass_over_valid_data(gen):
    # valid data: the only extra work is the glue's scan of the output for NaN; the data are not read again
    x = levels_signed((2, 3, 4, 4), gen).float()
    params = torch.randn(2, 100, 4, 4, generator=gen)
    checks = {"aten::isfinite", "aten::_to_copy", "aten::nonzero", "aten::floor", "aten::abs", "aten::gt"}
    assert not _aten_ops(lambda: dmol(x, params)) & checks
    assert not _aten_ops(lambda: vf.bernoulli_log_prob(torch.rand(4, 9), torch.randn(4, 9))) & checks
    bad = x.clone()
    bad[0, 0, 0, 0] = 0.0  # between two 8-bit levels: now the data are checked
    with pytest.raises(ValueError):
        _aten_ops(lambda: dmol(bad, params))


def test_dmol_glue_and_kernel_agree_at_the_grid_tolerance(gen):
    # 16-bit levels moved by about the tolerance (0.1 level): each value is either scored or refused, never a
    # silent NaN (the glue measures the distance from the grid in float32, as the kernel does)
    half_levels = (2 ** 16 - 1) / 2
    k = torch.randint(1, 2 ** 16 - 1, (400,), generator=gen).double()
    offset = 0.1 + (torch.rand(400, generator=gen, dtype=torch.float64) - 0.5) * 0.02
    x = ((k + offset) / half_levels - 1).float().view(400, 1, 1, 1)
    params = torch.randn(1, 3, 1, 1, generator=gen)
    scored = refused = 0
    for i in range(400):
        try:
            out = dmol(x[i:i + 1], params, num_bits=16)
        except ValueError:
            refused += 1
            continue
        assert torch.isfinite(out).all(), x[i].item()
        scored += 1
    assert scored > 0 and refused > 0


# ------------------------------------------------------------------------------------------------
# the Bernoulli reads data in [0, 1]
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [255.0, -0.25, 1.0 + 2**-20, math.inf, math.nan])
def test_bernoulli_refuses_data_outside_unit_range(bad, gen):
    x = torch.rand(4, 30, generator=gen)
    logits = torch.randn(4, 30, generator=gen)
    vf.bernoulli_log_prob(x, logits)
    x[2, 7] = bad
    with pytest.raises(ValueError, match=r"bernoulli_log_prob: `x` must be data in \[0, 1\].*1 of 120.*from_levels"):
        vf.bernoulli_log_prob(x, logits)


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_support_checks_on_every_cpu_isa(isa, monkeypatch, gen):
    # VAE_FAST_CPU_ISA only ever lowers the variant: an unsupported one runs the best the CPU has
    monkeypatch.setenv("VAE_FAST_CPU_ISA", isa)
    x = torch.rand(3, 37, generator=gen)
    logits = torch.randn(3, 37, generator=gen)
    x[1, 36] = -1e-30  # the last element of a row: the vector loops' tail
    with pytest.raises(ValueError, match="1 of 111"):
        vf.bernoulli_log_prob(x, logits)
    xd = levels_signed((2, 3, 3, 21), gen).float()
    xd[1, 1, 2, 20] += 0.5 / 127.5
    with pytest.raises(ValueError, match="1 of 378 values are off it"):
        dmol(xd, torch.randn(2, 40, 3, 21, generator=gen))


def test_bernoulli_edges_and_nan_logits(gen):
    x = torch.tensor([[0.0, 1.0, 0.5]])
    logits = torch.tensor([[2.0, -3.0, math.nan]])
    assert math.isnan(vf.bernoulli_log_prob(x, logits).item())  # a NaN logit: NaN, no error
    out = vf.bernoulli_log_prob(x[:, :2], logits[:, :2])
    torch.testing.assert_close(out, (x[:, :2] * logits[:, :2] - F.softplus(logits[:, :2])).sum(-1))


# ------------------------------------------------------------------------------------------------
# the models refuse batches no layer would take, with the conversion
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("likelihood, convert", [("dmol", "signed"), ("bernoulli", "unit"), ("gaussian", "unit")])
def test_models_refuse_integer_and_float64_batches(likelihood, convert, gen):
    torch.manual_seed(0)
    model = vf.conv_vae((3, 8, 8), latent_channels=2, likelihood=likelihood)
    k = torch.randint(0, 256, (2, 3, 8, 8), generator=gen)
    with pytest.raises(TypeError, match=rf"x must be a floating batch.*uint8.*from_levels\(x, \"{convert}\"\)"):
        model(k.to(torch.uint8))
    with pytest.raises(TypeError, match="x must be a floating batch.*int64"):
        model.elbo(k)
    with pytest.raises(TypeError, match=r"x is float64 but the model's parameters are torch.float32: pass x.to"):
        model.iwae(vf.data.from_levels(k.to(torch.uint8), convert).double(), 2)
    loss, _ = model(vf.data.from_levels(k.to(torch.uint8), convert))
    assert torch.isfinite(loss)


def test_bfloat16_model_scores_float32_data(gen):
    # model.to(bfloat16): the float32 batch enters the encoder in bfloat16, the likelihood scores the float32
    # levels (bfloat16 cannot hold them: the op refuses a bfloat16 x at 8 bits)
    torch.manual_seed(0)
    model = vf.conv_vae((3, 8, 8), latent_channels=2, likelihood="dmol").to(torch.bfloat16)
    x = vf.data.from_levels(torch.randint(0, 256, (2, 3, 8, 8), generator=gen).to(torch.uint8), "signed")
    loss, _ = model(x)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="BFloat16 cannot hold the 256 levels"):
        model(x.bfloat16())


@pytest.mark.parametrize("likelihood, match", [("dmol", r"8-bit data in \[-1, 1\]"), ("bernoulli", r"data in \[0, 1\]")])
def test_models_refuse_raw_levels_as_floats(likelihood, match, gen):
    model = vf.conv_vae((3, 8, 8), latent_channels=2, likelihood=likelihood)
    raw = torch.randint(0, 256, (2, 3, 8, 8), generator=gen).float()
    with pytest.raises(ValueError, match=match):
        model(raw)


# ------------------------------------------------------------------------------------------------
# double backward of half inputs in float32
# ------------------------------------------------------------------------------------------------
def _dmol_hvp(x, params, v):
    p = params.clone().requires_grad_()
    (g,) = torch.autograd.grad(dmol(x, p, num_bits=3).sum(), p, create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), p)
    return hv


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_dmol_double_backward_of_half_params_in_float32(dtype, gen):
    # the issue's reproduction: the log-scale entry was -5.55e-4 in float16 where float32 gives 3.877e-5
    x = torch.full((1, 1, 1, 1), -1 / 7)
    params = torch.tensor([0.0, 0.0, 4.0]).view(1, 3, 1, 1)
    v = torch.ones(1, 3, 1, 1)
    want = _dmol_hvp(x, params.to(dtype).float(), v)
    got = _dmol_hvp(x, params.to(dtype), v.to(dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.to(dtype).float(), rtol=0, atol=0)
    # and on random problems
    for _ in range(5):
        x = levels_signed((2, 3, 2, 2), gen, bits=3).float()
        params = torch.randn(2, 20, 2, 2, generator=gen).to(dtype)
        v = torch.randn(2, 20, 2, 2, generator=gen).to(dtype)
        want = _dmol_hvp(x, params.float(), v.float()).to(dtype)
        got = _dmol_hvp(x, params, v)
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0)


def _sampled_loss(m, l):
    z, kl = vf.reparameterize_with_kl(m, l, 3, seed=5)
    w = ((torch.arange(z.numel()) % 7 - 3) / 4).view(z.shape).to(z.dtype)  # exact in bfloat16
    return (w * z).sum() + kl.sum()


@pytest.mark.parametrize("loss, dtype", [(lambda m, l: vf.gaussian_kl(m, l).sum(), torch.float16),
                                         (_sampled_loss, torch.bfloat16)], ids=["gaussian_kl", "sampler"])
def test_row_op_and_sampler_double_backward_of_half_inputs_in_float32(loss, dtype, gen):
    mu, lv, v = (torch.randn(4, 6, generator=gen).to(dtype) for _ in range(3))

    def hvp(m, l, v):
        m, l = m.clone().requires_grad_(), l.clone().requires_grad_()
        gm, gl = torch.autograd.grad(loss(m, l), (m, l), create_graph=True)
        return torch.autograd.grad((gm * v).sum() + (gl * v).sum(), (m, l))

    for got, want in zip(hvp(mu, lv, v), hvp(mu.float(), lv.float(), v.float())):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want.to(dtype), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# gaussian_nll_loss without intermediate overflow
# ------------------------------------------------------------------------------------------------
def test_gaussian_nll_loss_elementwise_up_to_the_largest_float(gen):
    big = torch.finfo(torch.float32).max
    inp = torch.tensor([1.9e38, -1.5e38, 1e-30, 0.01, 1.0])
    tgt = torch.tensor([-1.9e38, 1.5e38, 0.0, 0.0, -1.0]).bfloat16()
    var = torch.tensor([3e38, big, 1e-44, 2.9e-41, 1e-3])
    got = vf.gaussian_nll_loss(inp, tgt, var, full=True, eps=0.0, reduction="none")
    d = inp.double() - tgt.double()
    want = 0.5 * (torch.log(var.double()) + d * d / var.double() + math.log(2 * math.pi))
    assert torch.isfinite(want).all() and (want.abs() < big).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    # the gradient too, where it is finite
    i, v = inp.clone().requires_grad_(), var.clone().requires_grad_()
    vf.gaussian_nll_loss(i, tgt, v, eps=0.0, reduction="none").sum().backward()
    id_, vd = inp.double().requires_grad_(), var.double().requires_grad_()
    (0.5 * (torch.log(vd) + (id_ - tgt.double()) ** 2 / vd)).sum().backward()
    finite = torch.isfinite(id_.grad.float()) & torch.isfinite(vd.grad.float())
    torch.testing.assert_close(i.grad[finite].double(), id_.grad[finite], rtol=1e-5, atol=0)
    torch.testing.assert_close(v.grad[finite].double(), vd.grad[finite], rtol=1e-5, atol=1e-30)


def test_gaussian_nll_loss_subnormal_differences_keep_their_digits():
    # x - t and var subnormal (eps=0): the difference is exact, never halved (halving a subnormal rounds it)
    tiny = 2.0 ** -149
    inp = torch.tensor([tiny, 3 * tiny, 1e-40]).requires_grad_()
    tgt = torch.tensor([0.0, 0.0, -1e-40])
    var = torch.tensor([1e-44, 2e-44, 1e-38])
    vf.gaussian_nll_loss(inp, tgt, var, eps=0.0, reduction="sum").backward()
    i64 = inp.detach().double().requires_grad_()
    (0.5 * (torch.log(var.double()) + (i64 - tgt.double()) ** 2 / var.double())).sum().backward()
    torch.testing.assert_close(inp.grad.double(), i64.grad, rtol=1e-6, atol=0)
    assert (inp.grad > 0).all()


def test_gaussian_nll_loss_issue_case(gen):
    # input float32, target bfloat16, var (8, 8, 7, 1) float32, full=True, eps=0: near the top of float32
    inp = torch.empty(8, 8, 7, 5).uniform_(-1.7e38, 1.7e38, generator=gen)
    tgt = torch.empty(8, 8, 7, 5).uniform_(-1.7e38, 1.7e38, generator=gen).bfloat16()
    var = torch.empty(8, 8, 7, 1).uniform_(1e37, 3e38, generator=gen)
    got = vf.gaussian_nll_loss(inp, tgt, var, full=True, eps=0.0, reduction="none")
    d = inp.double() - tgt.double()
    want = 0.5 * (torch.log(var.double()) + d * d / var.double() + math.log(2 * math.pi))
    finite = want.abs() < torch.finfo(torch.float32).max
    assert finite.float().mean() > 0.9
    torch.testing.assert_close(got.double()[finite], want[finite], rtol=1e-6, atol=0)
    assert torch.isinf(got[~finite]).all()


# ------------------------------------------------------------------------------------------------
# the mixture's infinite parameters: the maths' limits
# ------------------------------------------------------------------------------------------------
def _one_component_log_prob(x, params_m1, logits):
    """log p(x) when the mixture's other components have weight 0 there: component 1's term plus its log weight."""
    return composite.dmol_log_prob(x, params_m1) + torch.log_softmax(logits, 0)[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("which, value", [("logit", -math.inf), ("mean", math.inf), ("mean", -math.inf),
                                          ("log_scale", math.inf)])
def test_dmol_infinite_parameters_give_the_limit(dtype, which, value):
    # C = 1, M = 2, x at level 128; component 0's parameter infinite, component 1 finite ([logits | means | log-scales])
    x = torch.full((1, 1, 1, 1), 128 / 127.5 - 1, dtype=torch.float64)
    params = torch.tensor([0.3, 0.1, 0.2, -0.4, -2.0, -1.5], dtype=torch.float64)
    index = {"logit": 0, "mean": 2, "log_scale": 4}[which]
    params[index] = value
    p = params.to(dtype).view(1, 6, 1, 1).requires_grad_()
    got = dmol(x.to(dtype), p)
    logits = params[:2].clone()
    want = _one_component_log_prob(x, params[[1, 3, 5]].view(1, 3, 1, 1), logits)
    if which == "logit":  # a logit of -inf: the component is out of the mixture, weights renormalised
        want = composite.dmol_log_prob(x, params[[1, 3, 5]].view(1, 3, 1, 1))
    torch.testing.assert_close(got.double(), want.view(1), rtol=1e-6, atol=1e-6)
    (grad,) = torch.autograd.grad(got.sum(), p)
    assert torch.isfinite(grad).all(), grad
    assert (grad.view(6)[[2, 4]] == 0).all()  # the weightless component's mean and log-scale


@pytest.mark.parametrize("level, mean", [(0, -math.inf), (255, math.inf)])
def test_dmol_infinite_mean_at_an_edge_bin_holds_all_its_mass(level, mean):
    # a mean of -inf puts all its mass in the bottom (open-ended) bin, +inf in the top one: that component's
    # term is log 1 = 0 there, its weight nonzero, its log-scale's gradient 0 (a sigma(-a) = 0 at a = +inf)
    x = torch.full((1, 1, 1, 1), level / 127.5 - 1, dtype=torch.float64)
    params = torch.tensor([0.3, 0.1, mean, -0.4, -2.0, -1.5], dtype=torch.float64).view(1, 6, 1, 1)
    p = params.clone().requires_grad_()
    got = dmol(x, p)
    other = composite.dmol_log_prob(x, params[:, [1, 3, 5]]).exp()
    w = torch.softmax(params[0, :2, 0, 0], 0)
    want = torch.log(w[0] + w[1] * other)
    torch.testing.assert_close(got, want.view(1), rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(got.sum(), p)
    assert torch.isfinite(grad).all(), grad
    assert grad.view(6)[4] == 0 and grad.view(6)[0] != 0


def test_dmol_infinite_logit_matches_a_huge_one():
    x = torch.full((1, 1, 1, 1), 128 / 127.5 - 1)
    p_inf = torch.tensor([-math.inf, 0, 0, 0, -2, -2.0]).view(1, 6, 1, 1)
    p_big = p_inf.clone()
    p_big[0, 0] = -1e30
    torch.testing.assert_close(dmol(x, p_inf), dmol(x, p_big))
    assert math.isnan(dmol(x, torch.full((1, 6, 1, 1), -math.inf)).item())  # no component at all: undefined


# ------------------------------------------------------------------------------------------------
# the coupling coefficients' gradient where tanh saturates
# ------------------------------------------------------------------------------------------------
_TANH = torch.tanh  # the composite's tanh is patched below; its backward (1 - tanh^2) cancels as the fused one did


class _ExactTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r):
        ctx.save_for_backward(r)
        return _TANH(r)

    @staticmethod
    def backward(ctx, g):
        (r,) = ctx.saved_tensors
        e = torch.exp(-2 * r.abs())
        return g * 4 * e / (1 + e) ** 2


def test_dmol_coupling_gradient_exact_where_tanh_saturates(gen, monkeypatch):
    x = levels_signed((1, 3, 1, 4), gen)
    params = torch.randn(1, 10, 1, 4, generator=gen, dtype=torch.float64)  # M = 1: logit, 3 means, 3 ls, 3 coeffs
    params[0, 7:10, 0] = torch.tensor([[15.0, 20.0, 25.0, -18.0], [-15.0, 21.0, 3.0, 30.0], [19.0, -16.0, 0.5, 40.0]])
    params[0, 4:7] = -1.0
    p = params.clone().requires_grad_()
    (got,) = torch.autograd.grad(dmol(x, p).sum(), p)
    monkeypatch.setattr(torch, "tanh", _ExactTanh.apply)
    p2 = params.clone().requires_grad_()
    (want,) = torch.autograd.grad(composite.dmol_log_prob(x, p2).sum(), p2)
    coeff_got, coeff_want = got[0, 7:10], want[0, 7:10]
    nonzero = coeff_want != 0
    assert nonzero.sum() >= 8  # sech^2(40) = 7e-35: still a number in float64
    torch.testing.assert_close(coeff_got, coeff_want, rtol=1e-10, atol=0)


# ------------------------------------------------------------------------------------------------
# broadcast gradients of half inputs: summed in float32, rounded once
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_dmol_broadcast_half_params_gradient_rounded_once(dtype, gen):
    K = 16
    x = levels_signed((K, 2, 3, 4, 4), gen).float()
    params = (torch.randn(2, 100, 4, 4, generator=gen) * 3).to(dtype)  # broadcast over the K samples of x
    g = torch.randn(K, 2, generator=gen) * 500
    p = params.clone().requires_grad_()
    (got,) = torch.autograd.grad(dmol(x, p), p, g)
    p32 = params.float().requires_grad_()
    (want,) = torch.autograd.grad(dmol(x, p32), p32, g)
    assert got.dtype == dtype
    assert torch.equal(got, want.to(dtype))


def test_dmol_broadcast_half_x_gradient_rounded_once(gen):
    K = 8
    x = levels_signed((2, 3, 4, 4), gen).half().requires_grad_()  # broadcast over the K samples of params
    params = torch.randn(K, 2, 100, 4, 4, generator=gen)
    g = torch.randn(K, 2, generator=gen) * 500
    (got,) = torch.autograd.grad(dmol(x, params), x, g)
    x32 = x.detach().float().requires_grad_()
    (want,) = torch.autograd.grad(dmol(x32, params), x32, g)
    assert got.dtype == torch.float16
    assert torch.equal(got, want.half())


def test_row_op_broadcast_half_gradient_rounded_once(gen):
    mu = torch.randn(256, 8, generator=gen).half()
    lv = torch.randn(256, 8, generator=gen).half()
    prior_mu = torch.randn(8, generator=gen).half()  # broadcast over the 256 rows by the op itself
    g = torch.randn(256, generator=gen).half() * 300
    pm = prior_mu.clone().requires_grad_()
    (got,) = torch.autograd.grad(vf.gaussian_kl(mu, lv, pm, torch.zeros(8).half()), pm, g.float())
    pm32 = prior_mu.float().requires_grad_()
    (want,) = torch.autograd.grad(vf.gaussian_kl(mu.float(), lv.float(), pm32, torch.zeros(8)), pm32, g.float())
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    torch.testing.assert_close(got, want.half(), rtol=2**-10, atol=0)


# ------------------------------------------------------------------------------------------------
# seeds on the meta device
# ------------------------------------------------------------------------------------------------
def test_meta_seed_refused_with_a_message_on_a_real_device():
    seed = torch.tensor([1], device="meta")
    with pytest.raises(ValueError, match="seed is a meta tensor .* give seed on cpu or as an int"):
        vf.reparameterize(torch.randn(2, 3), torch.randn(2, 3), seed=seed)
    with pytest.raises(ValueError, match="seed is a meta tensor"):
        vf.sample_discretized_mix_logistic(torch.randn(2, 100, 4, 4), seed=seed)
    meta = dict(device="meta")
    assert vf.reparameterize(torch.empty(2, 3, **meta), torch.empty(2, 3, **meta), 4, seed=seed).shape == (4, 2, 3)
    assert vf.sample_discretized_mix_logistic(torch.empty(2, 100, 4, 4, **meta), seed=seed).shape == (2, 3, 4, 4)
