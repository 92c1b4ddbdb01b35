"""Exact everywhere (long sums, extreme values, the drop-in loss's edges, autodiff modes, fake-kernel
checks) and the layouts users pass (chunks read in place, seeds drawn without extra ops)."""

import math

import pytest
import torch
import torch.nn.functional as F

import vae_fast as vf
from vae_fast.ops import _composite as ref

ops = torch.ops.vae_fast


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _rel(a, b):
    return ((a.double() - b) / b).abs().max().item()


# ---- long float32 sums agree with float64 (issue: 9.5% off on an image batch before) -------------
def test_gaussian_nll_loss_image_batch_is_exact():
    g = _gen(1)
    x = torch.randn(16, 3, 128, 128, generator=g)
    t = x + 0.1 * torch.randn(x.shape, generator=g)
    v = torch.ones_like(x)
    for reduction in ("mean", "sum"):
        want = F.gaussian_nll_loss(x.double(), t.double(), v.double(), reduction=reduction)
        assert _rel(vf.gaussian_nll_loss(x, t, v, reduction=reduction), want) < 1e-6, reduction


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_rows_keep_their_digits(dtype):
    g = _gen(2)
    n = 2_000_000
    mu = torch.randn(2, n, generator=g).to(dtype)
    lv = (0.5 * torch.randn(2, n, generator=g)).to(dtype)
    x = torch.rand(2, n, generator=g).round().to(dtype)
    m64, l64, x64 = mu.double(), lv.double(), x.double()
    assert _rel(vf.gaussian_kl(mu, lv), ref.gaussian_kl(m64, l64)) < 1e-6
    assert _rel(vf.bernoulli_log_prob(x, mu), ref.bernoulli_log_prob(x64, m64)) < 1e-6
    assert _rel(vf.gaussian_log_prob(x, mu, lv), ref.gaussian_log_prob(x64, m64, l64)) < 1e-6
    z, kl = vf.reparameterize_with_kl(mu, lv, seed=3)
    assert _rel(kl, ref.gaussian_kl(m64, l64)) < 1e-6


def test_long_sums_are_bitwise_the_same_for_any_thread_count():
    g = _gen(3)
    mu, lv = torch.randn(3, 700_001, generator=g), torch.randn(3, 700_001, generator=g)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = vf.gaussian_kl(mu, lv), vf.gaussian_kl(mu, lv, event_dims=2)
        torch.set_num_threads(2)
        two = vf.gaussian_kl(mu, lv), vf.gaussian_kl(mu, lv, event_dims=2)
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


# ---- every formula is right wherever the maths is finite -----------------------------------------
@pytest.mark.parametrize("dtype, lv", [(torch.float32, -89.0), (torch.float32, -1e4), (torch.float64, -720.0),
                                       (torch.float64, -1e4)])
def test_zero_difference_with_tiny_variance(dtype, lv):
    zero, lvt = torch.zeros(1, dtype=dtype), torch.full((1,), lv, dtype=dtype)
    assert vf.gaussian_log_prob(zero, zero, lvt).item() == pytest.approx(-0.5 * (math.log(2 * math.pi) + lv))
    assert vf.gaussian_kl(zero, lvt, zero, lvt).item() == 0.0
    zero.requires_grad_(True)
    lvt.requires_grad_(True)
    (g_x, g_lv) = torch.autograd.grad(vf.gaussian_log_prob(zero, zero, lvt).sum(), (zero, lvt))
    assert g_x.item() == 0.0 and g_lv.item() == -0.5


def test_tiny_nonzero_difference_with_tiny_variance_is_finite():
    # (1e-30)^2 / e^-150 = 1.39e5: finite, although e^150 overflows float32
    x, m, lv = torch.tensor([1e-30]), torch.zeros(1), torch.tensor([-150.0])
    want = -0.5 * (math.log(2 * math.pi) - 150.0 + math.exp(2 * math.log(1e-30) + 150.0))
    assert vf.gaussian_log_prob(x, m, lv).item() == pytest.approx(want, rel=1e-5)


def test_infinite_logits_and_huge_logvar():
    inf = math.inf
    x, logits = torch.tensor([0.0, 1.0, 0.0, 1.0]), torch.tensor([inf, inf, -inf, -inf])
    assert vf.bernoulli_log_prob(x, logits, event_dims=0).tolist() == [-inf, 0.0, 0.0, -inf]
    assert vf.gaussian_kl(torch.zeros(1), torch.tensor([1e4])).item() == inf
    assert vf.gaussian_kl(torch.zeros(1), torch.tensor([-1e4])).item() == pytest.approx(0.5 * (1e4 - 1))


def test_subnormal_inputs():
    tiny = torch.tensor([1e-42, -1e-42])  # float32 subnormals
    assert torch.isfinite(vf.gaussian_log_prob(tiny, torch.zeros(2), torch.zeros(2))).all()
    assert vf.gaussian_kl(tiny, torch.zeros(2)).item() >= 0.0


# ---- gaussian_nll_loss: PyTorch's own OpInfo samples and error inputs ------------------------------
def _opinfo():
    from torch.testing._internal.common_methods_invocations import op_db
    return next(o for o in op_db if o.name == "nn.functional.gaussian_nll_loss")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gaussian_nll_loss_opinfo_samples(dtype):
    op = _opinfo()
    for i, s in enumerate(op.sample_inputs("cpu", dtype, requires_grad=True)):
        args = (s.input, *s.args)
        want = F.gaussian_nll_loss(*args, **s.kwargs)
        got = vf.gaussian_nll_loss(*args, **s.kwargs)
        assert got.dtype == want.dtype and got.shape == want.shape, (i, s.kwargs)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
        torch.testing.assert_close(got, want, **tol)
        wrt = [t for t in args if isinstance(t, torch.Tensor) and t.requires_grad]
        if want.numel() and wrt:
            g = torch.randn(want.shape, dtype=want.dtype, generator=_gen(i))
            torch.testing.assert_close(torch.autograd.grad(got, wrt, g), torch.autograd.grad(want, wrt, g), **tol)


@pytest.mark.slow
def test_gaussian_nll_loss_opinfo_gradgradcheck():
    op = _opinfo()
    for i, s in enumerate(op.sample_inputs("cpu", torch.float64, requires_grad=True)):
        if i % 15:  # a spread of the samples: gradgradcheck is slow
            continue
        tensors = [t for t in (s.input, *s.args) if isinstance(t, torch.Tensor)]

        def f(*ts, s=s):
            it = iter(ts)
            args = [next(it) if isinstance(a, torch.Tensor) else a for a in (s.input, *s.args)]
            return vf.gaussian_nll_loss(*args, **s.kwargs)

        assert torch.autograd.gradgradcheck(f, tensors)


def test_gaussian_nll_loss_opinfo_error_inputs():
    for e in _opinfo().error_inputs("cpu"):
        s = e.sample_input
        with pytest.raises(e.error_type, match=e.error_regex):
            vf.gaussian_nll_loss(s.input, *s.args, **s.kwargs)


def test_gaussian_nll_loss_drop_in_edges():
    g = _gen(4)
    x, t = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    # integer input with a float var: promoted as torch does, var never truncated
    xi = torch.randint(-3, 3, (5, 3), generator=g)
    torch.testing.assert_close(vf.gaussian_nll_loss(xi, t, 0.153), F.gaussian_nll_loss(xi, t, 0.153))
    # a NaN in var does not hide a negative entry
    v = torch.rand(5, 3, generator=g)
    v[0, 0], v[1, 1] = math.nan, -1.0
    with pytest.raises(ValueError, match="negative"):
        vf.gaussian_nll_loss(x, t, v)
    # an integer var: torch refuses it (clamp_ on an integer tensor), so do we
    with pytest.raises(RuntimeError):
        vf.gaussian_nll_loss(x, t, torch.ones(5, 3, dtype=torch.long))
    # bf16 var: log(var) in float32 (closer to float64 than torch's own bf16 result)
    vb = (torch.rand(5, 3, generator=g) + 0.5).bfloat16()
    exact = F.gaussian_nll_loss(x.double(), t.double(), vb.double())
    assert abs(vf.gaussian_nll_loss(x, t, vb).double() - exact) <= abs(F.gaussian_nll_loss(x, t, vb).double() - exact)
    # shape mismatch: RuntimeError for every reduction, as torch
    for reduction in ("none", "mean", "sum"):
        with pytest.raises(RuntimeError):
            vf.gaussian_nll_loss(x, torch.randn(4, 3), torch.ones(5, 3), reduction=reduction)
    # 0-dim promotion: a 0-dim float64 var is unsqueezed to (1,) and then promotes, as in torch
    v0 = torch.tensor(0.7, dtype=torch.float64)
    assert vf.gaussian_nll_loss(x[0], t[0], v0).dtype == F.gaussian_nll_loss(x[0], t[0], v0).dtype
    with pytest.raises(ValueError, match="reduction"):
        vf.gaussian_nll_loss(x, t, v.abs(), reduction="avg")


# ---- double backward, forward AD, torch.func ------------------------------------------------------
def _f64(*shape, gen):
    return torch.randn(*shape, dtype=torch.float64, generator=gen).requires_grad_()


def test_gradgradcheck_every_op():
    g = _gen(5)
    mu, lv, pm, plv = _f64(3, 4, gen=g), _f64(3, 4, gen=g), _f64(4, gen=g), _f64(1, gen=g)
    x, mean, olv = _f64(3, 4, gen=g), _f64(2, 3, 4, gen=g), _f64(4, gen=g)
    assert torch.autograd.gradgradcheck(lambda a, b: vf.gaussian_kl(a, b), (mu, lv))
    assert torch.autograd.gradgradcheck(lambda a, b, c, d: vf.gaussian_kl(a, b, c, d), (mu, lv, pm, plv))
    assert torch.autograd.gradgradcheck(lambda a, b, c: vf.gaussian_log_prob(a, b, c), (x, mean, olv))
    xb = (0.1 + 0.8 * torch.rand(3, 4, dtype=torch.float64, generator=g)).requires_grad_()  # inside the support [0, 1]
    assert torch.autograd.gradgradcheck(lambda a, b: vf.bernoulli_log_prob(a, b, event_dims=2), (xb, mean))
    # (log_q_path_only's stop_grad has no Hessian for gradgradcheck to check: test_edges.py compares its
    # second derivatives with torch autograd of Normal(mu.detach(), std.detach()).log_prob(z).)
    assert torch.autograd.gradgradcheck(lambda a, b: vf.reparameterize(a, b, 3, seed=11, return_log_q=True), (mu, lv))
    assert torch.autograd.gradgradcheck(lambda a, b: vf.reparameterize_with_kl(a, b, 2, seed=12), (mu, lv))


def test_forward_mode_ad_raises_naming_the_op():
    import torch.autograd.forward_ad as fwAD
    mu, lv = torch.randn(3, 4), torch.randn(3, 4)
    with fwAD.dual_level():
        dual = fwAD.make_dual(mu, torch.ones_like(mu))
        with pytest.raises(RuntimeError, match="gaussian_kl.*forward-mode"):
            vf.gaussian_kl(dual, lv)
    with pytest.raises(RuntimeError, match="gaussian_kl"):
        torch.func.jvp(lambda m: vf.gaussian_kl(m, lv), (mu,), (torch.ones_like(mu),))


def test_vmap_loops_correctly_and_func_grad_raises():
    logits = torch.randn(3, 4, generator=_gen(9))
    with pytest.warns(UserWarning, match="performance drop") if False else _nullcontext():
        batched = torch.func.vmap(lambda l: vf.bernoulli_log_prob(torch.ones(4), l))(logits)
    torch.testing.assert_close(batched, vf.bernoulli_log_prob(torch.ones(4), logits))
    with pytest.raises(RuntimeError, match="bernoulli_log_prob.*torch.func"):
        torch.func.grad(lambda l: vf.bernoulli_log_prob(torch.ones(4), l))(logits[0])


def _nullcontext():
    import contextlib
    return contextlib.nullcontext()


# ---- fake kernels raise what eager raises -----------------------------------------------------------
@pytest.mark.parametrize("call, error", [
    (lambda a, b: vf.gaussian_kl(a, b[:, :3]), ValueError),
    (lambda a, b: vf.gaussian_kl(a, b.long()), TypeError),
    (lambda a, b: vf.gaussian_kl(a, b, event_dims=3), ValueError),
    (lambda a, b: vf.gaussian_log_prob(a, b, b.double()), TypeError),
    (lambda a, b: vf.reparameterize(a, b[:1], 2, seed=1), ValueError),
])
def test_fake_kernels_raise_what_eager_raises(call, error):
    from torch._subclasses.fake_tensor import FakeTensorMode
    a, b = torch.randn(4, 5), torch.randn(4, 5)
    with pytest.raises(error) as eager:
        call(a, b)
    with FakeTensorMode() as mode:
        fa, fb = mode.from_tensor(a), mode.from_tensor(b)
        with pytest.raises(error) as fake:
            call(fa, fb)
    assert str(fake.value) == str(eager.value)


def test_bad_generator_and_num_samples():
    mu = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="generator"):
        vf.reparameterize(mu, mu, generator=42)
    with pytest.raises(ValueError, match="num_samples"):
        vf.reparameterize(mu, mu, 2**63)


# ---- layouts read in place, seeds without extra ops ----------------------------------------------
def _copies(fn, min_numel=1):
    """Copy events (name, input shapes) of at least `min_numel` elements while fn runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return [(e.name, e.input_shapes) for e in prof.events()
            if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")
            and any(math.prod(s) >= min_numel for s in e.input_shapes if s)]


def test_chunked_encoder_outputs_are_not_copied():
    g = _gen(6)
    h = torch.randn(128, 40, generator=g, requires_grad=True)
    x = torch.rand(128, 20, generator=g).round()

    def step():
        mu, lv = h.chunk(2, dim=-1)
        z, kl = vf.reparameterize_with_kl(mu, lv, seed=1)
        (vf.bernoulli_log_prob(x, z).sum() + vf.gaussian_kl(mu, lv).sum() + kl.sum()).backward()

    # nothing of the encoder output's size is copied, forward or backward (chunk's own backward
    # concatenates the two gradient halves: that cat is torch's, not a copy of an input)
    assert _copies(step, min_numel=128 * 20) == []
    # channel halves of a (B, 2C, H, W) posterior, as in latent diffusion
    p = torch.randn(2, 8, 4, 4, generator=g)
    mean, logvar = p.chunk(2, dim=1)
    assert _copies(lambda: (vf.reparameterize_with_kl(mean, logvar, seed=2, event_dims=3),
                            vf.gaussian_kl(mean, logvar, event_dims=3))) == []


def test_strided_inputs_give_the_contiguous_results():
    g = _gen(7)
    h = torch.randn(6, 5, 8, generator=g)
    for mu, lv in (h.chunk(2, dim=-1), h.chunk(2, dim=1)[0].transpose(1, 2).chunk(2, dim=1), (h[:, :, 0], h[:, :, 3])):
        for ed in range(mu.dim() + 1):
            z, kl = vf.reparameterize_with_kl(mu, lv, 3, seed=9, event_dims=ed)
            zc, klc = vf.reparameterize_with_kl(mu.contiguous(), lv.contiguous(), 3, seed=9, event_dims=ed)
            assert torch.equal(z, zc) and torch.equal(kl, klc)
            torch.testing.assert_close(vf.gaussian_kl(mu, lv, event_dims=ed),
                                       vf.gaussian_kl(mu.contiguous(), lv.contiguous(), event_dims=ed))


def test_eager_cpu_seed_is_drawn_as_randint_draws_it():
    mu, lv = torch.randn(3, 4), torch.randn(3, 4)
    torch.manual_seed(123)
    z = vf.reparameterize(mu, lv)
    torch.manual_seed(123)
    seed = torch.randint(0, 2**62, (1,))
    assert torch.equal(z, vf.reparameterize(mu, lv, seed=seed))
    assert _copies(lambda: vf.reparameterize(mu, lv)) == []


def test_log_q_path_only_gradient_flows_through_z_only():
    g = _gen(8)
    mu, lv = _f64(4, 3, gen=g), _f64(4, 3, gen=g)
    z, log_q = vf.reparameterize(mu, lv, 5, seed=21, return_log_q=True, log_q_path_only=True)
    _, log_q_full = vf.reparameterize(mu, lv, 5, seed=21, return_log_q=True)
    torch.testing.assert_close(log_q, log_q_full)  # same value
    eps = vf.reparameterize(torch.zeros_like(mu), torch.zeros_like(lv), 5, seed=21)
    w = torch.randn(5, 4, dtype=torch.float64, generator=g)
    got = torch.autograd.grad((w * log_q).sum(), (mu, lv))
    _, ref_log_q, _ = ref.sample_terms(mu, lv, eps, 1, log_q_path_only=True)
    want = torch.autograd.grad((w * ref_log_q).sum(), (mu, lv))
    torch.testing.assert_close(got, want)
    assert got[0].abs().sum() > 0  # the path gradient reaches mu (the full log q's does not)


# ---- sums whose error grows no faster than log2 of the row length ---------------------------------
from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=12, deadline=None)
@given(log_n=st.integers(min_value=4, max_value=21), rows=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_float32_sum_error_grows_at_most_like_log2_of_the_row_length(log_n, rows, seed):
    g = _gen(seed)
    n = 2**log_n + int(torch.randint(0, 2**log_n, (), generator=g))  # not a power of two
    mu, lv = torch.randn(rows, n, generator=g), 0.5 * torch.randn(rows, n, generator=g)
    x = torch.rand(rows, n, generator=g).round()
    u = torch.finfo(torch.float32).eps / 2
    for got, terms in ((vf.gaussian_kl(mu, lv), ref.gaussian_kl(mu.double(), lv.double(), event_dims=0)),
                       (vf.bernoulli_log_prob(x, mu), ref.bernoulli_log_prob(x.double(), mu.double(), event_dims=0))):
        want, magnitude = terms.sum(-1), terms.abs().sum(-1)
        # per term a few roundoffs, then a sum whose error is at most ~log2(n) roundoffs of the magnitudes
        bound = u * (16 + 2 * math.log2(n)) * magnitude
        assert ((got.double() - want).abs() <= bound).all(), (n, (got.double() - want).abs() / magnitude)


# ---- a broadcast log-variance's exp computed once (the CPU engines' hoisting) -----------------------
@pytest.mark.parametrize("lv_shape", [(), (1,), (96,)], ids=["scalar", "scalar1", "per_feature"])
@pytest.mark.parametrize("x_shape", [(40, 96), (3, 40, 96)], ids=["flat", "broadcast_x"])
@pytest.mark.parametrize("clamp", [None, (-0.5, 0.375)], ids=["noclamp", "clamp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_hoisted_logvar_equals_the_per_element_formula(lv_shape, x_shape, clamp, dtype):
    """A scalar or per-feature logvar (the flat engine, and the row engine when the data is broadcast
    against K samples) gives the float64 reference's values and gradients, clamped or not, its edges
    included; and the KL against a prior with such a logvar likewise."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    mean = torch.randn(3, 40, 96, generator=g, dtype=torch.float64)
    x = torch.randn(x_shape, generator=g, dtype=torch.float64)
    lv = torch.randn(lv_shape, generator=g, dtype=torch.float64)
    if lv.numel() > 2:
        lv.view(-1)[:4] = torch.tensor([-0.5, 0.375, -0.625, 0.5], dtype=torch.float64)  # on and beyond the edges
    tol = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-4),
           torch.bfloat16: dict(rtol=1e-2, atol=0.3)}[dtype]
    args = [t.to(dtype).requires_grad_() for t in (x, mean, lv)]
    args64 = [t.detach().double().requires_grad_() for t in args]
    out = vf.gaussian_log_prob(*args, logvar_clamp=clamp)
    want = ref.gaussian_log_prob(*args64, logvar_clamp=clamp)
    up = torch.randn(out.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(out.double(), want, **tol)
    for a, b in zip(torch.autograd.grad(out, args, up.to(out.dtype)), torch.autograd.grad(want, args64, up)):
        torch.testing.assert_close(a.double(), b, **tol)
    mu, q_lv = (torch.randn(40, 96, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for _ in range(2))
    kl_args, kl64 = [mu, q_lv, args[1][0], args[2]], [mu.detach().double(), q_lv.detach().double(), *args64[1:]]
    kl64 = [kl64[0].requires_grad_(), kl64[1].requires_grad_(), args64[1][0], args64[2]]
    out = vf.gaussian_kl(*kl_args, prior_logvar_clamp=clamp)
    want = ref.gaussian_kl(*kl64, prior_logvar_clamp=clamp)
    torch.testing.assert_close(out.double(), want, **tol)
    up = up[0]
    got = torch.autograd.grad(out, [kl_args[0], kl_args[1], args[2]], up.to(out.dtype))
    for a, b in zip(got, torch.autograd.grad(want, [kl64[0], kl64[1], args64[2]], up)):
        torch.testing.assert_close(a.double(), b, **tol)


# ---- long rows cut into segments (the flat engine's parallel sums of rows longer than 8192) ----------
@pytest.mark.parametrize("E", [8191, 8192, 8193, 12_000, 20_000, 3 * 8192 + 5])
@pytest.mark.parametrize("R", [1, 2, 3, 7])
def test_rows_cut_by_segments_sum_exactly_for_any_thread_count(R, E):
    """Rows that begin, end or span segments of 8192 elements sum to the float64 reference, forward and
    backward, and bitwise the same with 1 and 2 threads."""
    g = _gen(R * 100_003 + E)
    mu, lv = torch.randn(R, E, generator=g), 0.5 * torch.randn(R, E, generator=g)
    want = ref.gaussian_kl(mu.double(), lv.double())
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            m, l = mu.clone().requires_grad_(), lv.clone().requires_grad_()
            kl = vf.gaussian_kl(m, l)
            results.append((kl, *torch.autograd.grad(kl, (m, l), torch.arange(1.0, R + 1))))
    finally:
        torch.set_num_threads(old)
    assert _rel(results[0][0], want) < 1e-6
    assert all(torch.equal(a, b) for a, b in zip(results[0], results[1]))
    m64, l64 = mu.double().requires_grad_(), lv.double().requires_grad_()
    want_grads = torch.autograd.grad(ref.gaussian_kl(m64, l64), (m64, l64), torch.arange(1.0, R + 1).double())
    for got, w in zip(results[0][1:], want_grads):
        torch.testing.assert_close(got.double(), w, rtol=1e-5, atol=1e-6)
