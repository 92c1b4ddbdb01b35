"""The discretized mixture of logistics (vae_fast.dmol): values and gradients against the exact float64
composite formula, PixelCNN++'s eager formula where its switch does not fire, layouts read in place,
broadcasting, extremes, autograd (gradcheck, gradgradcheck, opcheck, torch.compile), errors, thread-count
invariance and the sampler (reproducibility, the level grid, chi-square against the exact bin probabilities)."""

from __future__ import annotations

import math

import pytest
import torch

import vae_fast as vf
from vae_fast.ops import _dmol_composite as composite

from conftest import ACC_DTYPE, UNIT_ROUNDOFF

LAYOUTS = ["channels_first", "pixelcnn++"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def n_params(C, M):
    return M * composite.params_per_mixture(C)


def x_dtype_for(dtype, bits=8):
    """x's dtype for params of `dtype`: bfloat16 cannot hold more than 2^6 levels in [-1, 1] (the op refuses it), so
    x stays float32 there."""
    return torch.float32 if dtype == torch.bfloat16 and bits > 6 else dtype


def make_inputs(B, C, H, W, M, layout, dtype=torch.float32, gen=None, bits=8, ls_range=(-8.0, 2.0), lead=None,
                mean_scale=1.0, logit_scale=3.0, interior=False):
    """x on the 2^bits grid (edges included, unless `interior`) and params with spread log-scales, in `layout`."""
    lead = (B,) if lead is None else lead
    P = n_params(C, M)
    levels = 2 ** bits - 1
    k = torch.randint(1 if interior else 0, levels if interior else levels + 1, (*lead[-1:], C, H, W), generator=gen)
    if not interior:
        k[..., 0, 0] = 0
        k[..., -1, -1] = levels  # both edge bins present
    x = (2.0 * k.double() / levels - 1.0)
    params = torch.randn((*lead, P, H, W), generator=gen, dtype=torch.float64)
    logits, means, ls, coeffs = composite.split_params(params, C, "channels_first")
    with torch.no_grad():
        logits.mul_(logit_scale)
        means.mul_(mean_scale)
        ls.uniform_(*ls_range, generator=gen)
    if layout == "pixelcnn++":
        x = x.movedim(-3, -1)
        params = to_pixelcnn(params, C)
    return x.to(x_dtype_for(dtype, bits)), params.to(dtype)


def to_pixelcnn(params_cf, C):
    """channels_first params (..., P, H, W) -> the same parameters as pixelcnn++ params (..., H, W, P)."""
    logits, means, ls, coeffs = composite.split_params(params_cf, C, "channels_first")
    per_channel = [means, ls] + ([coeffs] if C == 3 else [])
    rest = torch.cat(per_channel, dim=-1)  # (..., H, W, C, 2M or 3M)
    return torch.cat([logits, rest.flatten(-2)], dim=-1)


def pixel_scale(x, params, bits, layout):
    """Per pixel, the magnitudes the kernel's rounding scales with: 1 + max_k(|shifted logit| + sum_c(|a| + |b| +
    |log-scale| + |f|)) (float64): a bound on the float error of log p is a few roundoffs of it."""
    x64, p64 = x.double(), params.double()
    xl = composite.pixels_last(x64, layout)
    C = xl.shape[-1]
    logits, means, ls, coeffs = composite.split_params(p64, C, layout)
    xc = xl.unsqueeze(-1)
    if C == 3:
        t = torch.tanh(coeffs)
        means = torch.stack([means[..., 0, :], means[..., 1, :] + t[..., 0, :] * xc[..., 0, :],
                             means[..., 2, :] + t[..., 1, :] * xc[..., 0, :] + t[..., 2, :] * xc[..., 1, :]], -2)
    ls = ls.clamp(min=-7)
    hw = 1.0 / (2 ** bits - 1)
    a, b = (xc - means + hw) * torch.exp(-ls), (xc - means - hw) * torch.exp(-ls)
    f, _ = composite.channel_terms(x64, p64, bits, layout)
    per_k = (a.abs() + b.abs() + ls.abs() + f.abs() + (xc.abs() + means.abs()) * torch.exp(-ls)).sum(-2)
    shifted = (logits - logits.amax(-1, keepdim=True)).abs()
    return 1.0 + (shifted + per_k).amax(-1)


def check_values(got, ref, scale, acc, what):
    bound = 64 * UNIT_ROUNDOFF[acc] * scale + UNIT_ROUNDOFF[got.dtype] * ref.abs()
    err = (got.double() - ref).abs()
    assert torch.isfinite(got).all(), what
    bad = ~(err <= bound)
    assert not bad.any(), f"{what}: {int(bad.sum())} of {err.numel()} outside; worst err {err.max().item():.3g}, " \
                          f"bound there {bound.flatten()[int(torch.argmax(err / bound))].item():.3g}"


def reduce_like(lp, layout, event_dims):
    if event_dims == 1:
        return lp
    return lp.sum(-1) if event_dims == 2 else lp.sum((-2, -1))


# ------------------------------------------------------------------------------------------------
# values against the float64 composite
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("M", [1, 5, 30])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_composite(dtype, C, M, layout, gen):
    x, params = make_inputs(2, C, 3, 5, M, layout, dtype, gen)
    event_dims = 3 if layout == "channels_first" else 1
    got = vf.discretized_mix_logistic_log_prob(x, params, layout=layout, event_dims=event_dims)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref_pix = composite.log_prob_pixels(x.double(), params.double(), 8, layout)
    scale = pixel_scale(x, params, 8, layout)
    check_values(got, reduce_like(ref_pix, layout, event_dims), reduce_like(scale, layout, event_dims),
                 ACC_DTYPE[dtype], f"{dtype} C={C} M={M} {layout}")


@pytest.mark.parametrize("event_dims", [1, 2, 3])
@pytest.mark.parametrize("bits", [1, 5, 8, 16])
def test_event_dims_and_bits(event_dims, bits, gen):
    x, params = make_inputs(3, 3, 4, 6, 4, "pixelcnn++", torch.float32, gen, bits=bits)
    got = vf.discretized_mix_logistic_log_prob(x, params, layout="pixelcnn++", event_dims=event_dims, num_bits=bits)
    ref = composite.dmol_log_prob(x.double(), params.double(), bits, "pixelcnn++", event_dims)
    check_values(got, ref, reduce_like(pixel_scale(x, params, bits, "pixelcnn++"), "pixelcnn++", event_dims),
                 torch.float32, f"event_dims={event_dims} bits={bits}")


@pytest.mark.parametrize("C", [1, 3])
def test_pixelcnn_eager_formula(C, gen):
    # Where every bin probability is above 1e-5 (moderate scales), PixelCNN++'s eager formula is exact too.
    x, params = make_inputs(2, C, 4, 4, 5, "channels_first", torch.float64, gen, ls_range=(-0.5, 0.5),
                            mean_scale=0.3)
    params_pp = to_pixelcnn(params, C).movedim(-1, -3)  # PixelCNN++'s P order, NCHW as the PyTorch port takes it
    ref = composite.pixelcnn_pp_log_prob(x, params_pp)
    got = vf.discretized_mix_logistic_log_prob(x.permute(0, 2, 3, 1), params_pp.permute(0, 2, 3, 1),
                                               layout="pixelcnn++", event_dims=3)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-10)
    got_cf = vf.discretized_mix_logistic_log_prob(x, params)
    torch.testing.assert_close(got_cf, ref, rtol=1e-12, atol=1e-10)


def test_beyond_pixelcnn_switch():
    # A bin of probability far below 1e-5 (a narrow logistic far from x): exact here, where PixelCNN++ takes
    # the bin-centre density.
    C, M = 1, 1
    params = torch.tensor([0.0, 0.8, -6.0], dtype=torch.float64).view(1, 3, 1, 1)
    x0 = 128 / 127.5 - 1  # level 128
    x = torch.tensor([x0], dtype=torch.float64).view(1, 1, 1, 1)
    got = vf.discretized_mix_logistic_log_prob(x, params)
    ref = composite.dmol_log_prob(x, params)
    hw, s = 1 / 255, math.exp(-6.0)
    exact = math.log(1 / (1 + math.exp(-(x0 - 0.8 + hw) / s)) - 1 / (1 + math.exp(-(x0 - 0.8 - hw) / s)))
    assert abs(got.item() - exact) < 1e-9 * abs(exact) and abs(ref.item() - exact) < 1e-9 * abs(exact)
    pp = composite.pixelcnn_pp_log_prob(x, params)
    assert abs(pp.item() - exact) > 0.1  # the published formula's switch fired: off by 0.39 here


# ------------------------------------------------------------------------------------------------
# layouts read in place, broadcasting
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("C", [1, 3])
def test_strided_inputs_in_place(C, gen):
    M = 3
    x, params = make_inputs(3, C, 5, 6, M, "channels_first", torch.float32, gen)
    ref = vf.discretized_mix_logistic_log_prob(x, params)
    # channels_last
    got = vf.discretized_mix_logistic_log_prob(x.contiguous(memory_format=torch.channels_last),
                                               params.contiguous(memory_format=torch.channels_last))
    assert torch.equal(got, ref)
    # a chunk of a larger decoder output, and x a slice
    big = torch.cat([torch.randn_like(params), params], dim=1)
    chunk = big.chunk(2, dim=1)[1]
    xbig = torch.stack([x, -x], dim=-1)[..., 0]
    assert not chunk.is_contiguous() and not xbig.is_contiguous()
    assert torch.equal(vf.discretized_mix_logistic_log_prob(xbig, chunk), ref)
    # pixelcnn++ on permuted views of channels-first tensors (per pixel, summed afterwards)
    p_pp = to_pixelcnn(params, C)  # (B, H, W, P)
    lp = vf.discretized_mix_logistic_log_prob(x.permute(0, 2, 3, 1), p_pp.movedim(-1, 1).permute(0, 2, 3, 1),
                                              layout="pixelcnn++", event_dims=1)
    torch.testing.assert_close(lp.double().sum((-2, -1)), ref.double(), rtol=1e-5, atol=1e-3)
    # gradients of strided inputs land in tensors of the inputs' layout
    pc = params.contiguous(memory_format=torch.channels_last).requires_grad_()
    vf.discretized_mix_logistic_log_prob(x, pc).sum().backward()
    p0 = params.clone().requires_grad_()
    vf.discretized_mix_logistic_log_prob(x, p0).sum().backward()
    assert torch.equal(pc.grad, p0.grad)


def test_broadcast_over_samples(gen):
    K, B, C, H, W, M = 3, 2, 3, 4, 5, 4
    x, params = make_inputs(B, C, H, W, M, "channels_first", torch.float64, gen, lead=(K, B))
    assert x.shape == (B, C, H, W) and params.shape[:2] == (K, B)
    xr = x.clone().requires_grad_()
    pr = params.clone().requires_grad_()
    got = vf.discretized_mix_logistic_log_prob(xr, pr)
    assert got.shape == (K, B)
    ref = composite.dmol_log_prob(x, params)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-10)
    g = torch.randn(K, B, dtype=torch.float64, generator=gen)
    dx, dp = torch.autograd.grad(got, (xr, pr), g)
    x2, p2 = x.clone().requires_grad_(), params.clone().requires_grad_()
    rdx, rdp = torch.autograd.grad(composite.dmol_log_prob(x2, p2), (x2, p2), g)
    torch.testing.assert_close(dx, rdx, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dp, rdp, rtol=1e-10, atol=1e-10)
    # params broadcast against x (one decoder output for several x)
    got2 = vf.discretized_mix_logistic_log_prob(x.expand(K, B, C, H, W).contiguous(), params[0])
    torch.testing.assert_close(got2, composite.dmol_log_prob(x, params[0]).expand(K, B), rtol=1e-12, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# extremes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("C", [1, 3])
def test_extreme_params(dtype, C, gen):
    M, H, W = 4, 6, 6
    x, params = make_inputs(2, C, H, W, M, "channels_first", torch.float64, gen)
    logits, means, ls, coeffs = composite.split_params(params, C, "channels_first")
    with torch.no_grad():
        flat_ls = ls.reshape(-1)
        choices = torch.tensor([-7.0, -7.5, -30.0, 20.0, 60.0 if dtype == torch.float32 else 300.0, 0.0],
                               dtype=torch.float64)
        flat_ls.copy_(choices[torch.randint(0, len(choices), flat_ls.shape, generator=gen)])
        means.mul_(torch.tensor([1.0, 50.0, 1e4], dtype=torch.float64)[
            torch.randint(0, 3, means.shape, generator=gen)])
        logits.mul_(torch.tensor([1.0, 1e3, 1e6], dtype=torch.float64)[
            torch.randint(0, 3, logits.shape, generator=gen)])
        if C == 3:
            coeffs.mul_(20.0)
    x[..., 0, :] = -1.0
    x[..., -1, :] = 1.0
    xd, pd = x.to(dtype).requires_grad_(), params.to(dtype).requires_grad_()
    got = vf.discretized_mix_logistic_log_prob(xd, pd)
    ref = composite.dmol_log_prob(x, params)
    assert torch.isfinite(got).all()
    check_values(got, ref, pixel_scale(x, params, 8, "channels_first").sum((-2, -1)), dtype, "extreme values")
    dx, dp = torch.autograd.grad(got.sum(), (xd, pd))
    assert torch.isfinite(dx).all() and torch.isfinite(dp).all()
    x2, p2 = x.clone().requires_grad_(), params.clone().requires_grad_()
    rdx, rdp = torch.autograd.grad(composite.dmol_log_prob(x2, p2).sum(), (x2, p2))
    assert torch.isfinite(rdp).all()
    tol = 1e-9 if dtype == torch.float64 else 2e-3
    torch.testing.assert_close(dp.double(), rdp, rtol=tol, atol=tol * (1 + rdp.abs().amax().item()) * 1e-3)


# ------------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradients_match_composite(dtype, C, layout, gen):
    x, params = make_inputs(2, C, 3, 4, 5, layout, dtype, gen)
    event_dims = 3 if layout == "channels_first" else 2
    xr, pr = x.clone().requires_grad_(), params.clone().requires_grad_()
    out = vf.discretized_mix_logistic_log_prob(xr, pr, layout=layout, event_dims=event_dims)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    dx, dp = torch.autograd.grad(out, (xr, pr), g)
    assert dx.dtype == x.dtype and dp.dtype == dtype
    x2, p2 = x.double().requires_grad_(), params.double().requires_grad_()
    rdx, rdp = torch.autograd.grad(composite.dmol_log_prob(x2, p2, 8, layout, event_dims), (x2, p2), g.double())
    acc = ACC_DTYPE[dtype]
    rtol = 64 * UNIT_ROUNDOFF[acc] * 100 + 2 * UNIT_ROUNDOFF[dtype]
    for got, ref, name in ((dx, rdx, "dx"), (dp, rdp, "dparams")):
        atol = rtol * (1 + ref.abs().amax().item())
        torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck(C, layout, gen):
    # x's gradient is that of the bin of width 2 / (2^bits - 1) centred on x; finite differences move x off the
    # grid by 1e-6, inside the op's tolerance (0.1 of a level) on the 16-bit grid, and off the edges (|x| <= 1)
    x, params = make_inputs(1, C, 2, 3, 2, layout, torch.float64, gen, ls_range=(-3.0, 0.5), bits=16, interior=True)
    event_dims = 3 if layout == "channels_first" else 1
    fn = lambda a, b: vf.discretized_mix_logistic_log_prob(a, b, layout=layout, event_dims=event_dims,  # noqa: E731
                                                           num_bits=16)
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), params.requires_grad_()))
    # params only, on the 8-bit grid with both edge bins
    x8, params8 = make_inputs(1, C, 2, 3, 2, layout, torch.float64, gen, ls_range=(-3.0, 0.5))
    assert torch.autograd.gradcheck(lambda b: vf.discretized_mix_logistic_log_prob(
        x8, b, layout=layout, event_dims=event_dims), (params8.requires_grad_(),))


@pytest.mark.parametrize("C, layout", [(1, "channels_first"), (3, "pixelcnn++")])
def test_gradgradcheck(C, layout, gen):
    # double backward: the backward op's autograd (the composite formula's), on a small problem (it is slow)
    x, params = make_inputs(1, C, 1, 1 if C == 3 else 2, 2, layout, torch.float64, gen, ls_range=(-3.0, 0.5), bits=16,
                            interior=True)
    event_dims = 3 if layout == "channels_first" else 1
    fn = lambda a, b: vf.discretized_mix_logistic_log_prob(a, b, layout=layout, event_dims=event_dims,  # noqa: E731
                                                           num_bits=16)
    assert torch.autograd.gradgradcheck(fn, (x.requires_grad_(), params.requires_grad_()))


def test_params_only_and_no_grad(gen):
    x, params = make_inputs(2, 3, 3, 3, 2, "channels_first", torch.float32, gen)
    pr = params.clone().requires_grad_()
    out = vf.discretized_mix_logistic_log_prob(x, pr)
    (dp,) = torch.autograd.grad(out.sum(), (pr,))
    assert dp.shape == params.shape
    with torch.no_grad():
        assert not vf.discretized_mix_logistic_log_prob(x, pr).requires_grad


def test_opcheck(gen):
    x, params = make_inputs(2, 3, 3, 4, 2, "channels_first", torch.float32, gen)
    torch.library.opcheck(torch.ops.vae_fast.dmol_log_prob.default, (x, params.requires_grad_(), 8, 0, 3))
    xp, pp = make_inputs(2, 1, 3, 4, 2, "pixelcnn++", torch.float64, gen, bits=5)
    quick = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.vae_fast.dmol_log_prob.default, (xp.requires_grad_(), pp.requires_grad_(), 5, 1, 1),
                          test_utils=quick)
    g = torch.randn(2)
    torch.library.opcheck(torch.ops.vae_fast.dmol_log_prob_backward.default,
                          (g, x, params.detach(), 8, 0, 3, [True, True]), test_utils=quick)
    torch.library.opcheck(torch.ops.vae_fast.sample_dmol.default, (params.detach(), None, 123, 3, 8, 0),
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph(gen):
    x, params = make_inputs(2, 3, 4, 4, 3, "channels_first", torch.float32, gen)

    def loss(x, p):
        return -vf.discretized_mix_logistic_log_prob(x, p).mean()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    pr = params.clone().requires_grad_()
    val = compiled(x, pr)
    val.backward()
    p0 = params.clone().requires_grad_()
    ref = loss(x, p0)
    ref.backward()
    torch.testing.assert_close(val, ref)
    torch.testing.assert_close(pr.grad, p0.grad)
    sampler = torch.compile(lambda p: vf.sample_discretized_mix_logistic(p, seed=7), fullgraph=True, backend="aot_eager")
    assert torch.equal(sampler(params), vf.sample_discretized_mix_logistic(params, seed=7))


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------
def test_bad_inputs():
    f = vf.discretized_mix_logistic_log_prob
    x = torch.full((2, 3, 4, 4), 1 / 255)  # level 128 of 8-bit data
    p = torch.zeros(2, 20, 4, 4)  # M = 2
    f(x, p)
    with pytest.raises(TypeError, match="x"):
        f(x.long(), p)
    with pytest.raises(TypeError, match="float64 cannot be mixed"):
        f(x.double(), p)
    with pytest.raises(ValueError, match="params.*P axis"):
        f(x, torch.zeros(2, 21, 4, 4))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        f(torch.zeros(2, 2, 4, 4), p)
    with pytest.raises(ValueError, match="same H and W"):
        f(torch.zeros(2, 3, 4, 5), p)
    with pytest.raises(ValueError, match="event_dims must be 3 for layout channels_first"):
        f(x, p, event_dims=1)
    with pytest.raises(ValueError, match="event_dims must be 1"):
        f(x.permute(0, 2, 3, 1), p.permute(0, 2, 3, 1), layout="pixelcnn++", event_dims=0)
    with pytest.raises(ValueError, match="num_bits must be in"):
        f(x, p, num_bits=17)
    with pytest.raises(ValueError, match="layout must be"):
        f(x, p, layout="nhwc")
    with pytest.raises(TypeError, match="num_bits must be an int"):
        f(x, p, num_bits=8.0)
    with pytest.raises(ValueError, match="do not broadcast"):
        f(torch.zeros(3, 3, 4, 4), p)
    with pytest.raises(ValueError, match="must have shape"):
        f(torch.zeros(4, 4), p)
    with pytest.raises(ValueError, match=r"M mixture components in \[1, 32\]"):
        f(x, torch.zeros(2, 330, 4, 4))
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        vf.sample_discretized_mix_logistic(p, channels=2)
    with pytest.raises(TypeError, match="seed"):
        vf.sample_discretized_mix_logistic(p, seed=1.5)
    # the fake kernels raise what eager code raises
    with pytest.raises((ValueError, torch._dynamo.exc.TorchRuntimeError), match="event_dims must be 3"):
        torch.compile(lambda a, b: f(a, b, event_dims=2), fullgraph=True, backend="eager")(x, p)


# ------------------------------------------------------------------------------------------------
# determinism
# ------------------------------------------------------------------------------------------------
def test_thread_count_invariance(gen):
    x, params = make_inputs(5, 3, 9, 11, 6, "channels_first", torch.float32, gen)
    results = []
    old = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            pr = params.clone().requires_grad_()
            xr = x.clone().requires_grad_()
            out = vf.discretized_mix_logistic_log_prob(xr, pr)
            out.sum().backward()
            per_row = vf.discretized_mix_logistic_log_prob(x.permute(0, 2, 3, 1), to_pixelcnn(params, 3),
                                                           layout="pixelcnn++", event_dims=2)
            results.append((out, pr.grad, xr.grad, per_row))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# sampler
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sampler_reproducible_on_grid(C, layout, gen):
    bits = 5
    _, params = make_inputs(2, C, 4, 5, 3, layout, torch.float32, gen)
    a = vf.sample_discretized_mix_logistic(params, channels=C, layout=layout, num_bits=bits, seed=1234)
    b = vf.sample_discretized_mix_logistic(params, channels=C, layout=layout, num_bits=bits, seed=1234)
    c = vf.sample_discretized_mix_logistic(params, channels=C, layout=layout, num_bits=bits, seed=1235)
    expect = (2, C, 4, 5) if layout == "channels_first" else (2, 4, 5, C)
    assert a.shape == expect and a.dtype == params.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    levels = 2 ** bits - 1
    k = ((a.double() + 1) * levels / 2).round()
    assert torch.equal(a, ((2 * k - levels) / levels).to(a.dtype))  # the levels, rounded to params' dtype
    assert a.min() >= -1 and a.max() <= 1
    g = torch.Generator().manual_seed(5)
    d = vf.sample_discretized_mix_logistic(params, channels=C, layout=layout, num_bits=bits, generator=g)
    g.manual_seed(5)
    assert torch.equal(d, vf.sample_discretized_mix_logistic(params, channels=C, layout=layout, num_bits=bits,
                                                             generator=g))
    # the sample is valid data for the likelihood
    assert torch.isfinite(vf.discretized_mix_logistic_log_prob(a, params, layout=layout, num_bits=bits,
                                                               event_dims=3)).all()


def _chi2_pvalue(counts, probs):
    n = counts.sum()
    expected = probs * n
    keep = expected > 5
    stat = (((counts - expected) ** 2) / expected)[keep].sum()
    # pool the rest into one cell
    rest_c, rest_e = counts[~keep].sum(), expected[~keep].sum()
    df = int(keep.sum()) - 1
    if rest_e > 0:
        stat = stat + (rest_c - rest_e) ** 2 / rest_e
        df += 1
    return torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2.0).item()


def test_sampler_chi_square_one_channel():
    bits, M, N = 3, 3, 200_000
    params = torch.tensor([0.5, -0.3, 0.1, -0.6, 0.1, 0.7, -1.0, -2.0, -0.5], dtype=torch.float64).view(1, 9, 1, 1)
    probs = composite.mixture_bin_probs(params, bits).flatten()
    assert abs(probs.sum().item() - 1) < 1e-12
    s = vf.sample_discretized_mix_logistic(params.float().expand(N, 9, 1, 1), channels=1, num_bits=bits, seed=20240601)
    idx = ((s.double().flatten() + 1) * (2 ** bits - 1) / 2).round().long()
    counts = torch.bincount(idx, minlength=2 ** bits).double()
    assert _chi2_pvalue(counts, probs) > 1e-4


def test_sampler_chi_square_coupled_channels():
    # 3 channels of 1 bit: 8 joint outcomes, their exact probabilities from the likelihood itself.
    bits, M, N = 1, 2, 100_000
    params = torch.tensor([0.3, -0.2,  # logits
                           0.2, -0.4, 0.1, 0.5, -0.3, 0.0,  # means (C x M)
                           -0.5, 0.0, -1.0, -0.2, 0.3, -0.7,  # log-scales
                           1.0, -0.8, 0.5, 2.0, -1.5, 0.3], dtype=torch.float64).view(1, 20, 1, 1)
    grid = torch.tensor([[a, b, c] for a in (-1.0, 1.0) for b in (-1.0, 1.0) for c in (-1.0, 1.0)],
                        dtype=torch.float64).view(8, 3, 1, 1)
    probs = composite.dmol_log_prob(grid, params, bits).exp()
    assert abs(probs.sum().item() - 1) < 1e-12
    s = vf.sample_discretized_mix_logistic(params.expand(N, 20, 1, 1), channels=3, num_bits=bits, seed=99)
    bitsv = ((s.view(N, 3) + 1) / 2).long()
    idx = bitsv[:, 0] * 4 + bitsv[:, 1] * 2 + bitsv[:, 2]
    counts = torch.bincount(idx, minlength=8).double()
    assert _chi2_pvalue(counts, probs) > 1e-4


def test_sampler_counter_layout_known_answer():
    # The documented counter layout (core/launch_args.h's DmolArgs), recomputed with the numpy Philox of
    # test_known_answers: what the CUDA sampler must reproduce too.
    import numpy as np
    from test_known_answers import MASK32, philox4x32

    B, H, W, M, C, bits, seed = 2, 2, 3, 3, 3, 4, 0x1234_5678_9ABC_DEF0
    g = torch.Generator().manual_seed(3)
    params = torch.randn(B, n_params(C, M), H, W, generator=g, dtype=torch.float64)
    got = vf.sample_discretized_mix_logistic(params, channels=C, num_bits=bits, seed=seed)
    logits, means, ls, coeffs = (t.numpy() for t in composite.split_params(params, C, "channels_first"))
    levels = 2 ** bits - 1
    n = np.arange(B * H * W, dtype=np.uint64)
    blocks = [philox4x32((n & MASK32, n >> np.uint64(32), j, 0x444D4F4C), (seed & 0xFFFFFFFF, seed >> 32))
              for j in range(2)]
    words = [blocks[i // 4][i % 4] for i in range(M + C)]
    u = [((w >> np.uint64(8)).astype(np.float64) + 0.5) * 2.0 ** -24 for w in words]
    expect = np.zeros((B, C, H, W))
    for idx in range(B * H * W):
        b, h, w = idx // (H * W), (idx // W) % H, idx % W
        k = int(np.argmax([logits[b, h, w, j] - np.log(-np.log(u[j][idx])) for j in range(M)]))
        t = np.tanh(coeffs[b, h, w, :, k])
        out = []
        for c in range(C):
            m = means[b, h, w, c, k] + (t[0] * out[0] if c == 1 else 0.0) + \
                (t[1] * out[0] + t[2] * out[1] if c == 2 else 0.0)
            y = m + np.exp(max(ls[b, h, w, c, k], -7.0)) * (np.log(u[M + c][idx]) - np.log1p(-u[M + c][idx]))
            level = np.floor((min(max(y, -1.0), 1.0) + 1) * 0.5 * levels + 0.5)
            out.append((2 * level - levels) / levels)
        expect[b, :, h, w] = out
    assert torch.equal(got, torch.from_numpy(expect))


# ------------------------------------------------------------------------------------------------
# the CUDA kernels (csrc/cuda/dmol.cu) on the CPU emulator, against the CPU op
# ------------------------------------------------------------------------------------------------
def _emu_binary():
    import shutil
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found (the CUDA headers the emulator build needs)")
    out = repo / "build" / "cuda-emu" / "dmol_cuda_emu"
    sources = [repo / "tests" / "cuda" / "dmol_cuda_emu.cpp", repo / "csrc" / "cuda" / "dmol.cu",
               repo / "csrc" / "cuda" / "common.cuh", repo / "csrc" / "core" / "elbo_math.h",
               repo / "csrc" / "core" / "dmol_math.h", repo / "csrc" / "core" / "launch_args.h"]
    if out.exists() and all(out.stat().st_mtime > s.stat().st_mtime for s in sources):
        return out
    dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "/dev/null", "-o", "/dev/null"], capture_output=True,
                         text=True).stderr
    import re
    m = re.search(r'INCLUDES="?-I([^" ]*)', dry)
    inc = m.group(1) if m else "/usr/local/cuda/include"
    out.parent.mkdir(parents=True, exist_ok=True)
    emu_dirs = [f"-I{repo / d}" for d in ("csrc", "csrc/cuda", "tests/cuda")]
    subprocess.run(["g++", "-std=c++17", "-O1", "-DVF_EMULATE", "-x", "c++", f"-I{inc}", *emu_dirs,
                    str(sources[0]), "-o", str(out)], check=True)
    return out


def _contiguous_strides(layout, R, C, P, H, W):
    if layout == "channels_first":
        return [0, C * H * W, H * W, W, 1], [0, P * H * W, H * W, W, 1]
    return [0, H * W * C, 1, W * C, C], [0, H * W * P, 1, W * P, P]


def _offsets(layout, C, M):
    if layout == "pixelcnn++":
        return [0, M, 3 * M, 2 * M, 3 * M, 3 * M, 3 * M, 1]
    return [0, M, M, M + C * M, M, M + 2 * C * M, M, 1]


@pytest.mark.parametrize("dtype, C, M, layout, event_dims, H, W", [
    (torch.float32, 3, 5, "channels_first", 3, 10, 30),   # block-wide group sums (tpr 64)
    (torch.float64, 1, 2, "pixelcnn++", 1, 3, 4),
    (torch.float32, 3, 3, "pixelcnn++", 2, 2, 70),        # per image row, warp-slice group sums
])
def test_cuda_kernels_emulated(dtype, C, M, layout, event_dims, H, W, tmp_path, gen):
    import subprocess

    exe = _emu_binary()
    R, bits, seed = 2, 8, 4242
    x, params = make_inputs(R, C, H, W, M, layout, dtype, gen)
    x, params = x.contiguous(), params.contiguous()
    P = n_params(C, M)
    xs, ps = _contiguous_strides(layout, R, C, P, H, W)
    reduce = {3: 2, 2: 1, 1: 0}[event_dims]
    os_ = {2: [0, 1, 0, 0, 0], 1: [0, H, 0, 1, 0], 0: [0, H * W, 0, W, 1]}[reduce]
    fields = [int(dtype == torch.float64), C, M, bits, R, H, W, reduce, *xs, *ps, *os_, *_offsets(layout, C, M), seed]
    (tmp_path / "args.txt").write_text(" ".join(map(str, fields)))
    xr, pr = x.clone().requires_grad_(), params.clone().requires_grad_()
    ref = vf.discretized_mix_logistic_log_prob(xr, pr, layout=layout, event_dims=event_dims, num_bits=bits)
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(ref.dtype)
    rdx, rdp = torch.autograd.grad(ref, (xr, pr), g)
    x.numpy().tofile(tmp_path / "x.bin")
    params.numpy().tofile(tmp_path / "params.bin")
    g.numpy().tofile(tmp_path / "grad.bin")
    run = subprocess.run([str(exe), str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    npd = "float64" if dtype == torch.float64 else "float32"
    load = lambda name, like: torch.from_numpy(  # noqa: E731
        __import__("numpy").fromfile(tmp_path / name, dtype=npd)).view(like.shape)
    rtol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(load("out.bin", ref), ref, rtol=rtol, atol=rtol * 10)
    torch.testing.assert_close(load("dx.bin", x), rdx, rtol=rtol * 10, atol=rtol * 10 * (1 + rdx.abs().max().item()))
    torch.testing.assert_close(load("dparams.bin", params), rdp, rtol=rtol * 10,
                               atol=rtol * 10 * (1 + rdp.abs().max().item()))
    sample = vf.sample_discretized_mix_logistic(params, channels=C, layout=layout, num_bits=bits, seed=seed)
    assert torch.equal(load("sample.bin", x), sample)


def test_cuda_kernels_emulated_give_nan_off_the_support(tmp_path, gen):
    # CUDA keeps the forward's NaN for data off the support (no host sync to raise): row 1 holds data in [0, 1]
    import subprocess

    import numpy as np

    exe = _emu_binary()
    R, C, M, H, W, bits = 3, 3, 2, 2, 5, 8
    x, params = make_inputs(R, C, H, W, M, "channels_first", torch.float32, gen)
    x[1] = torch.randint(0, 128, (C, H, W), generator=gen).float() * 2 / 255  # k / 255 for even k: between levels
    x[2, 0, 0, 0] = 1.5
    P = n_params(C, M)
    xs, ps = _contiguous_strides("channels_first", R, C, P, H, W)
    fields = [0, C, M, bits, R, H, W, 2, *xs, *ps, 0, 1, 0, 0, 0, *_offsets("channels_first", C, M), 1]
    (tmp_path / "args.txt").write_text(" ".join(map(str, fields)))
    x.numpy().tofile(tmp_path / "x.bin")
    params.numpy().tofile(tmp_path / "params.bin")
    torch.ones(R).numpy().tofile(tmp_path / "grad.bin")
    run = subprocess.run([str(exe), str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    out = torch.from_numpy(np.fromfile(tmp_path / "out.bin", dtype="float32"))
    torch.testing.assert_close(out[0], vf.discretized_mix_logistic_log_prob(x[:1], params[:1])[0], rtol=2e-5, atol=2e-4)
    assert math.isnan(out[1].item()) and math.isnan(out[2].item())


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_cpu_isa(isa, monkeypatch, gen):
    # VAE_FAST_CPU_ISA only ever lowers the variant: an unsupported one runs the best the CPU has.
    monkeypatch.setenv("VAE_FAST_CPU_ISA", isa)
    x, params = make_inputs(2, 3, 3, 21, 4, "channels_first", torch.float32, gen)
    pr = params.clone().requires_grad_()
    got = vf.discretized_mix_logistic_log_prob(x, pr)
    check_values(got, composite.dmol_log_prob(x.double(), params.double()),
                 pixel_scale(x, params, 8, "channels_first").sum((-2, -1)), torch.float32, isa)
    (dp,) = torch.autograd.grad(got.sum(), (pr,))
    p2 = params.double().requires_grad_()
    (rdp,) = torch.autograd.grad(composite.dmol_log_prob(x.double(), p2).sum(), (p2,))
    torch.testing.assert_close(dp.double(), rdp, rtol=1e-3, atol=1e-3 * (1 + rdp.abs().max().item()))


def test_empty_inputs():
    f = vf.discretized_mix_logistic_log_prob
    p = torch.zeros(0, 20, 4, 4, requires_grad=True)
    out = f(torch.zeros(0, 3, 4, 4), p)
    assert out.shape == (0,)
    out.sum().backward()
    assert p.grad.shape == p.shape
    q = torch.zeros(2, 20, 0, 4, requires_grad=True)
    out = f(torch.zeros(2, 3, 0, 4), q)
    assert torch.equal(out, torch.zeros(2))
    assert vf.sample_discretized_mix_logistic(q.detach(), seed=1).shape == (2, 3, 0, 4)


# ------------------------------------------------------------------------------------------------
# on a GPU (scripts/gpu_check.sh runs these): the CUDA kernels against the CPU op, and the sampler's stream
# ------------------------------------------------------------------------------------------------
requires_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and vf._C.build_info()["cuda"]),
                                   reason="needs a GPU and a CUDA build (the emulated test above runs everywhere)")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_matches_cpu(dtype, C, layout, gen):
    """CUDA values and gradients equal the CPU op's (the same formulas; sums in another order), x broadcast over
    K = 2 samples of params, and the sampler's draws are the CPU's for one seed (the Philox layout)."""
    x, params = make_inputs(3, C, 6, 7, 10, layout, dtype, gen, lead=(2, 3))
    event_dims = 3 if layout == "channels_first" else 2
    grads = []
    for device in ("cpu", "cuda"):
        p = params.to(device).requires_grad_()
        lp = vf.discretized_mix_logistic_log_prob(x.to(device), p, layout=layout, event_dims=event_dims)
        (g,) = torch.autograd.grad(lp.sum(), p)
        grads.append((lp.cpu(), g.cpu()))
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(grads[1][0], grads[0][0], **tol)
    torch.testing.assert_close(grads[1][1].float(), grads[0][1].float(), **tol)
    draws = [vf.sample_discretized_mix_logistic(params.to(device), channels=C, layout=layout, seed=7).cpu()
             for device in ("cpu", "cuda")]
    same = (draws[0] == draws[1]).float().mean().item()
    assert same > 0.99, f"CUDA samples differ from the CPU's for one seed at {1 - same:.2%} of the values"
