"""vf.DiagonalGaussianDistribution against diffusers' own class (skipped when diffusers is not installed) and
float64 references: values, gradients, the logvar clamp's edges, deterministic mode, samples' statistics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.utils._python_dispatch

import vae_fast as vf
from vae_fast.ops import _composite as ref
from vae_fast.ops.distributions import DiagonalGaussianDistribution as Ours

SHAPES = [(3, 8, 5, 4), (2, 6, 3, 4, 5)]  # (B, 2C, H, W) images and (B, 2C, T, H, W) video latents


@pytest.fixture(scope="module")
def Theirs():
    return pytest.importorskip("diffusers.models.autoencoders.vae").DiagonalGaussianDistribution


def _parameters(shape, dtype=torch.float64, seed=0):
    """Random parameters whose logvar half also crosses both clamp edges (and sits exactly on them)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=g, dtype=torch.float64)
    c = shape[1] // 2
    lv = p[:, c:]
    lv.mul_(2.0)
    flat = lv.reshape(-1)
    edges = torch.tensor([-30.0, 20.0, -31.5, 23.0, -45.0, 29.5, -29.0, 19.0], dtype=torch.float64)
    flat[: len(edges)] = edges
    return p.to(dtype)


def _sum_all_but_batch(t):
    return t.reshape(t.shape[0], -1).sum(1)


def _outputs(d, x, other):
    """Everything the class computes for one upstream-gradient check."""
    kl, kl_other, nll = d.kl(), d.kl(other), d.nll(x, dims=list(range(1, x.dim())))
    return {"mean": d.mean, "logvar": d.logvar, "std": d.std, "var": d.var, "mode": d.mode(),
            "kl": kl, "kl_other": kl_other, "nll": nll}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_and_gradients_equal_diffusers(Theirs, shape, dtype):
    p = _parameters(shape, dtype).requires_grad_()
    q = _parameters(shape, dtype, seed=1)
    x = torch.randn(shape[0], shape[1] // 2, *shape[2:], dtype=dtype)
    ours = _outputs(Ours(p), x, Ours(q))
    theirs = _outputs(Theirs(p), x, Theirs(q))
    if len(shape) == 5:
        # diffusers' kl sums dims 1, 2, 3 only, leaving (B, W) for video latents; ours sums every dim but the batch
        theirs["kl"], theirs["kl_other"] = theirs["kl"].sum(-1), theirs["kl_other"].sum(-1)
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-10}
    g = torch.Generator().manual_seed(7)
    for name in ours:
        assert ours[name].shape == theirs[name].shape, name
        torch.testing.assert_close(ours[name], theirs[name], **tol, msg=name)
        upstream = torch.randn(ours[name].shape, generator=g, dtype=torch.float64).to(dtype)
        (g_ours,) = torch.autograd.grad(ours[name], p, upstream, retain_graph=True)
        (g_theirs,) = torch.autograd.grad(theirs[name], p, upstream, retain_graph=True)
        torch.testing.assert_close(g_ours, g_theirs, **tol, msg=f"gradient of {name}")


def test_kl_against_diffusers_other_and_nll_over_some_dims(Theirs):
    p = _parameters((2, 6, 4, 3)).requires_grad_()
    q = _parameters((2, 6, 4, 3), seed=3)
    x = torch.randn(2, 3, 4, 3, dtype=torch.float64)
    torch.testing.assert_close(Ours(p).kl(Theirs(q)), Theirs(p).kl(Theirs(q)))  # `other` may be theirs
    for dims in ([1, 3], [2], [-1, 1]):
        torch.testing.assert_close(Ours(p).nll(x, dims=dims), Theirs(p).nll(x, dims=dims), msg=str(dims))
    torch.testing.assert_close(Ours(p).nll(x), Theirs(p).nll(x))  # the default dims


@pytest.mark.parametrize("ours_dtype, other_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32),
                                                     (torch.bfloat16, torch.float64)], ids=str)
def test_float64_mixed_with_another_dtype_promotes_as_diffusers(Theirs, ours_dtype, other_dtype):
    """diffusers' arithmetic promotes float32 parameters meeting a float64 sample or `other` to float64; the fused
    ops refuse that mix, so the class casts first: the same dtype and value, gradients to both sides."""
    p = _parameters((2, 6, 4, 3), dtype=ours_dtype).requires_grad_()
    q = _parameters((2, 6, 4, 3), dtype=other_dtype, seed=3).requires_grad_()
    x = torch.randn(2, 3, 4, 3, dtype=torch.float64).to(other_dtype)
    tol = {"rtol": 1e-6, "atol": 1e-6} if ours_dtype != torch.bfloat16 else {"rtol": 1e-2, "atol": 1e-2}
    # diffusers computes var = exp(logvar) and its gradient in bf16 before promoting; we promote first. The
    # reference for bf16 parameters is therefore diffusers on their float64 values (cast inside the graph, so the
    # gradient still reaches the bf16 parameters): the same promotion, without bf16's rounding of intermediates,
    # which made the comparison fail now and then on random samples.
    pt = p.double() if ours_dtype == torch.bfloat16 else p
    for name, ours, theirs in (("nll", Ours(p).nll(x), Theirs(pt).nll(x)),
                               ("nll dims", Ours(p).nll(x, dims=[1, 3]), Theirs(pt).nll(x, dims=[1, 3])),
                               ("kl ours", Ours(p).kl(Ours(q)), Theirs(pt).kl(Theirs(q))),
                               ("kl theirs", Ours(p).kl(Theirs(q)), Theirs(pt).kl(Theirs(q)))):
        assert ours.dtype == theirs.dtype == torch.float64, name
        torch.testing.assert_close(ours, theirs, **tol, msg=name)
        wrt = (p, q) if name.startswith("kl") else (p,)
        for g_ours, g_theirs in zip(torch.autograd.grad(ours.sum(), wrt), torch.autograd.grad(theirs.sum(), wrt)):
            assert g_ours.dtype == g_theirs.dtype
            torch.testing.assert_close(g_ours, g_theirs, **tol, msg=f"gradient of {name}")
    xi = torch.randint(-3, 4, x.shape)  # an integer sample: promoted to the parameters' dtype, as diffusers'
    assert Ours(p).nll(xi).dtype == Theirs(p).nll(xi).dtype or ours_dtype == torch.bfloat16


def test_nll_over_no_dims_sums_every_dim_as_diffusers(Theirs):
    """diffusers' nll is torch.sum(..., dim=dims), and torch.sum over dim=[] sums every dim."""
    p = _parameters((2, 6, 4, 3)).requires_grad_()
    x = torch.randn(2, 3, 4, 3, dtype=torch.float64)
    for dims in ([], ()):
        ours, theirs = Ours(p).nll(x, dims=dims), Theirs(p).nll(x, dims=dims)
        assert ours.shape == theirs.shape == ()
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(*(torch.autograd.grad(r, p)[0] for r in (ours, theirs)))
    assert Ours(p, deterministic=True).nll(x, dims=[]).tolist() == [0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("generator", ["one", "list", "none"])
def test_deterministic_sample_draws_what_diffusers_draws(Theirs, dtype, generator):
    """diffusers draws its noise even when std is 0: a deterministic sample(generator=g) leaves g (or a list of
    them, or without one the global RNG) in the state diffusers leaves it in, so code mixing the two stays in step."""
    p = _parameters((3, 8, 5, 4), dtype=dtype)

    def generators():
        return {"one": torch.Generator().manual_seed(11),
                "list": [torch.Generator().manual_seed(i) for i in range(3)], "none": None}[generator]

    states = []
    for cls in (Ours, Theirs):
        g = generators()
        torch.manual_seed(5)
        z = cls(p, deterministic=True).sample(generator=g)
        gs = [] if g is None else g if isinstance(g, list) else [g]
        states.append(([x.get_state() for x in gs], torch.get_rng_state(), z))
    (ours_gens, ours_global, z_ours), (theirs_gens, theirs_global, z_theirs) = states
    assert all(torch.equal(a, b) for a, b in zip(ours_gens, theirs_gens))
    assert torch.equal(ours_global, theirs_global)
    torch.testing.assert_close(z_ours, z_theirs, rtol=0, atol=0)


def test_bf16_under_autocast(Theirs):
    """An encoder run under autocast gives bf16 parameters; the ops read them as they are and sum in float32,
    closer to the float64 truth than diffusers' bf16 arithmetic."""
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    img = torch.randn(4, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p = conv(img)
        assert p.dtype == torch.bfloat16
        ours = Ours(p)
        z, kl, nll = ours.sample(), ours.kl(), ours.nll(img[:, :1].expand(-1, 4, -1, -1))
        kl_theirs = Theirs(p).kl()
    exact = Theirs(p.detach().double().requires_grad_())
    assert z.dtype == torch.bfloat16 and ours.mean.dtype == ours.logvar.dtype == torch.bfloat16
    assert kl.dtype == nll.dtype == torch.float32
    kl_exact = exact.kl()
    torch.testing.assert_close(kl.double(), kl_exact, rtol=1e-5, atol=1e-3)
    assert (kl.double() - kl_exact).abs().max() <= (kl_theirs.double() - kl_exact).abs().max()
    torch.testing.assert_close(nll.double(), exact.nll(img[:, :1].expand(-1, 4, -1, -1).double()),
                               rtol=1e-5, atol=1e-2)
    # Gradients reach the encoder in bf16, equal to the float64 ones to bf16 rounding.
    (g_ours,) = torch.autograd.grad(kl.sum(), p)
    (g_exact,) = torch.autograd.grad(kl_exact.sum(), exact.parameters)
    assert g_ours.dtype == torch.bfloat16
    torch.testing.assert_close(g_ours.double(), g_exact, rtol=1.6e-2, atol=1.6e-2)


def test_clamp_edges_gradient_is_torch_clamps():
    """Zero gradient strictly outside [-30, 20], passed at the edges and inside (torch.clamp's rule)."""
    lv = torch.tensor([-45.0, -30.0001, -30.0, -29.0, 0.0, 19.0, 20.0, 20.0001, 29.0], dtype=torch.float64)
    p = torch.cat([torch.zeros_like(lv), lv]).reshape(1, 2, -1).requires_grad_()
    d = Ours(p)
    torch.testing.assert_close(d.logvar.reshape(-1), lv.clamp(-30, 20))
    (g,) = torch.autograd.grad(d.kl().sum(), p)
    expected = 0.5 * torch.expm1(lv.clamp(-30, 20)) * ((lv >= -30) & (lv <= 20))
    torch.testing.assert_close(g[0, 1], expected)
    # A custom clamp, and none.
    torch.testing.assert_close(Ours(p, logvar_clamp=(-1.0, 1.0)).logvar.reshape(-1), lv.clamp(-1, 1))
    torch.testing.assert_close(Ours(p, logvar_clamp=None).logvar.reshape(-1), lv)


def test_clamp_edges_and_nan_in_sample_kl_and_nll():
    """The clamp the kernels apply equals torch.clamp in every method, values and gradients: the edges pass the
    gradient, outside gets 0, a NaN logvar stays NaN in the values and gets gradient 0 (torch.clamp's rule)."""
    lv = torch.tensor([-45.0, -30.0001, -30.0, -29.0, 0.0, 19.0, 20.0, 20.0001, 29.0, math.nan], dtype=torch.float64)
    mean = torch.linspace(-1.0, 1.0, lv.numel(), dtype=torch.float64)
    p = torch.cat([mean, lv]).reshape(1, 2, -1).requires_grad_()
    x = torch.randn(1, 1, lv.numel(), dtype=torch.float64)
    zeros = torch.zeros(1, 1, lv.numel(), dtype=torch.float64)
    eps = vf.reparameterize(zeros, zeros, generator=torch.Generator().manual_seed(3), event_dims=2)

    def ours(p):
        d = Ours(p)
        return d.sample(generator=torch.Generator().manual_seed(3)), d.kl(), d.nll(x)

    def reference(p):
        m, l = p[:, :1], p[:, 1:].clamp(-30, 20)
        return ref.reparameterize(m, l, eps), ref.gaussian_kl(m, l, event_dims=2), -ref.gaussian_log_prob(x, m, l,
                                                                                                            event_dims=2)

    got, want = ours(p), reference(p)
    g = torch.Generator().manual_seed(4)
    for name, a, b in zip(("sample", "kl", "nll"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, equal_nan=True, msg=name)
        upstream = torch.randn(a.shape, generator=g, dtype=torch.float64)
        (ga,) = torch.autograd.grad(a, p, upstream, retain_graph=True)
        (gb,) = torch.autograd.grad(b, p, upstream, retain_graph=True)
        torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12, equal_nan=True, msg=f"gradient of {name}")
        g_lv = ga[0, 1]
        assert (g_lv[[0, 1, 7, 8, 9]] == 0).all() and (g_lv[[2, 3, 5, 6]] != 0).all(), name


def test_kl_other_gradients_reach_both_parameters(Theirs):
    p = _parameters((2, 6, 4, 3)).requires_grad_()
    q = _parameters((2, 6, 4, 3), seed=3).requires_grad_()
    upstream = torch.randn(2, dtype=torch.float64)
    got = torch.autograd.grad(Ours(p).kl(Ours(q)), [p, q], upstream)
    want = torch.autograd.grad(Theirs(p).kl(Theirs(q)), [p, q], upstream)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-10)
    # other's own clamp applies to other's logvar
    got = Ours(p).kl(Ours(q, logvar_clamp=(-0.5, 0.5)))
    m, lv = p.chunk(2, 1)
    qm, qlv = q.chunk(2, 1)
    want = ref.gaussian_kl(m, lv.clamp(-30, 20), qm, qlv.clamp(-0.5, 0.5), event_dims=3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(torch.autograd.grad(got, [p, q], upstream), torch.autograd.grad(want, [p, q], upstream),
                               rtol=1e-12, atol=1e-10)


class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every aten / vae_fast op that runs, forward and backward, with its tensor arguments' sizes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((str(func), [a.numel() for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))


def test_sample_and_kl_copy_nothing_of_the_parameters_size():
    """sample() + kl() forward and backward: no cat, no clamp, no copy of the latents' size: the kernels clamp as
    they read, and the backward writes the parameters' gradient into one buffer that is handed on as it is."""
    p = torch.randn(2, 8, 6, 6, requires_grad=True)
    gz, gkl = torch.randn(2, 4, 6, 6), torch.randn(2)
    with _RecordOps() as rec:
        d = Ours(p)
        z, kl = d.sample(), d.kl()
        (g,) = torch.autograd.grad([z, kl], p, [gz, gkl])
    names = [name for name, _ in rec.calls]
    assert "vae_fast.sample_gaussian_backward.default" in names  # the recorder sees the backward
    assert not any("cat" in n or "clamp" in n for n in names), names
    copies = [sizes for name, sizes in rec.calls if any(w in name for w in ("copy", "clone", "contiguous"))]
    assert not any(max(sizes, default=0) >= p.numel() // 2 for sizes in copies), copies
    m, lv = p.detach().chunk(2, 1)
    eps = (z.detach() - m) * torch.exp(-0.5 * lv)
    torch.testing.assert_close(g, torch.cat([gz + gkl.view(2, 1, 1, 1) * m,
                                             0.5 * gz * eps * torch.exp(0.5 * lv)
                                             + 0.5 * gkl.view(2, 1, 1, 1) * torch.expm1(lv)], 1))
    # A gradient that reaches the halves from two ops is summed by autograd: then one cat joins them (correctly).
    with _RecordOps() as rec:
        d = Ours(p)
        torch.autograd.grad(d.kl().sum() + d.mode().sum(), p)
    assert any("cat" in name for name, _ in rec.calls)


@pytest.mark.parametrize("shape", SHAPES)
def test_deterministic_mode(Theirs, shape):
    p = _parameters(shape).requires_grad_()
    x = torch.randn(shape[0], shape[1] // 2, *shape[2:], dtype=torch.float64)
    ours, theirs = Ours(p, deterministic=True), Theirs(p, deterministic=True)
    assert ours.deterministic
    for name in ("mean", "logvar", "std", "var"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name))
    z = ours.sample()
    torch.testing.assert_close(z, theirs.sample())
    assert z.data_ptr() != ours.mean.data_ptr()  # a new tensor, as theirs
    assert ours.kl().tolist() == ours.nll(x).tolist() == theirs.kl().tolist() == [0.0]
    assert ours.kl().dtype == p.dtype  # on the parameters' device and dtype (diffusers': CPU float32)
    (g,) = torch.autograd.grad(z.sum(), p)
    c = shape[1] // 2
    assert (g[:, :c] == 1).all() and (g[:, c:] == 0).all()


def test_sample_reproducible_differentiable_and_standard_normal():
    p = _parameters((8, 8, 32, 32)).requires_grad_()
    d = Ours(p)
    z1 = d.sample(generator=torch.Generator().manual_seed(3))
    z2 = d.sample(generator=torch.Generator().manual_seed(3))
    z3 = d.sample(generator=torch.Generator().manual_seed(4))
    assert torch.equal(z1, z2) and not torch.equal(z1, z3)
    assert not torch.equal(d.sample(), d.sample())  # torch's generator by default: fresh draws
    # A list of generators, one per example (diffusers' randn_tensor): example i's draw depends on generator i only.
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    z_list = d.sample(generator=gens(range(8)))
    torch.testing.assert_close(Ours(p[2:3]).sample(generator=gens([2])), z_list[2:3], rtol=0, atol=0)
    assert torch.equal(d.sample(generator=gens(range(8))), z_list)
    with pytest.raises(ValueError, match="one per example"):
        d.sample(generator=gens(range(3)))
    torch.manual_seed(5)
    a = d.sample()
    torch.manual_seed(5)
    assert torch.equal(a, d.sample())  # torch.manual_seed reproduces

    eps = ((z1 - d.mean) / d.std).detach()
    inside = (d.logvar > -5).detach()  # where std is large enough for eps to be recovered accurately
    e = eps[inside]
    assert e.numel() > 20000
    assert abs(e.mean().item()) < 4.5 / math.sqrt(e.numel()) and abs(e.var().item() - 1) < 0.05
    scipy_stats = pytest.importorskip("scipy.stats")
    assert scipy_stats.kstest(e.numpy(), "norm").pvalue > 1e-4
    corr = torch.corrcoef(torch.stack([eps.reshape(-1), ((z3 - d.mean) / d.std).detach().reshape(-1)]))[0, 1]
    assert abs(corr.item()) < 4.5 / math.sqrt(eps.numel())  # two generators' draws are independent

    # dz/dmean = 1, dz/dlogvar = 0.5 * std * eps (zero where the clamp is active), on the same eps.
    upstream = torch.randn_like(z1)
    (g,) = torch.autograd.grad(z1, p, upstream)
    raw_lv = p[:, 4:].detach()
    active = (raw_lv >= -30) & (raw_lv <= 20)
    torch.testing.assert_close(g[:, :4], upstream)
    torch.testing.assert_close(g[:, 4:], upstream * 0.5 * d.std.detach() * eps * active, rtol=1e-9, atol=1e-12)


def test_sample_then_kl_is_one_pass_with_the_same_values_and_gradients():
    p = _parameters((2, 8, 6, 6)).requires_grad_()
    d = Ours(p)
    torch.manual_seed(0)
    z = d.sample()
    kl = d.kl()  # from the sampling pass
    assert kl is not d.kl()  # handed out once; the next call computes it
    torch.testing.assert_close(kl, ref.gaussian_kl(d.mean, d.logvar, event_dims=3), rtol=1e-12, atol=1e-10)
    gz = torch.randn_like(z)
    (g,) = torch.autograd.grad((z * gz).sum() + 3.0 * kl.sum(), p)

    eps = (z - d.mean) / d.std
    p2 = p.detach().clone().requires_grad_()
    mean, lv = p2[:, :4], p2[:, 4:].clamp(-30, 20)
    want = (ref.reparameterize(mean, lv, eps.detach()) * gz).sum() + 3.0 * ref.gaussian_kl(mean, lv, event_dims=3).sum()
    (g_ref,) = torch.autograd.grad(want, p2)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-11)

    # A sample drawn without autograd does not hand its (graph-less) KL to a kl() that needs a gradient.
    with torch.no_grad():
        d.sample()
    assert d.kl().requires_grad


def test_attributes_nothing_asks_for_are_not_computed():
    d = Ours(torch.randn(2, 8, 4, 4))
    d.sample()
    d.kl()
    d.nll(torch.randn(2, 4, 4, 4))
    assert "std" not in d._cache and "var" not in d._cache
    d.std
    assert "std" in d._cache and "var" not in d._cache


def test_strided_parameters_and_other_split_dims():
    base = torch.randn(3, 6, 4, 5, dtype=torch.float64)
    for p, dim in ((base.permute(0, 2, 3, 1), -1), (base.transpose(2, 3), 1), (base.contiguous(memory_format=
                   torch.channels_last), 1), (base[:, :, ::2], 1)):
        p = p.detach().requires_grad_()
        d = Ours(p, dim=dim)
        mean, lv = p.chunk(2, dim=dim)
        lv = lv.clamp(-30, 20)
        torch.testing.assert_close(d.kl(), _sum_all_but_batch(ref.gaussian_kl(mean, lv, event_dims=0)))
        (g,) = torch.autograd.grad(d.kl().sum(), p)
        (g_ref,) = torch.autograd.grad(_sum_all_but_batch(ref.gaussian_kl(mean, lv, event_dims=0)).sum(), p)
        torch.testing.assert_close(g, g_ref)
        # a gradient for one half only: the other half's is zero
        (g_mean,) = torch.autograd.grad(d.mode().sum(), p)
        torch.testing.assert_close(g_mean, torch.cat([torch.ones_like(mean), torch.zeros_like(lv)], dim))


def test_bad_input():
    with pytest.raises(TypeError, match="parameters"):
        Ours([[1.0, 2.0]])
    with pytest.raises(TypeError, match="parameters"):
        Ours(torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="even"):
        Ours(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="dim"):
        Ours(torch.ones(2, 4), dim=2)
    with pytest.raises(ValueError, match="batch"):
        Ours(torch.ones(4, 4), dim=0)
    with pytest.raises(TypeError, match="dim"):
        Ours(torch.ones(2, 4), dim=1.0)
    with pytest.raises(ValueError, match="logvar_clamp"):
        Ours(torch.ones(2, 4), logvar_clamp=(1.0, -1.0))
    d = Ours(torch.ones(2, 4, 3))
    with pytest.raises(TypeError, match="other"):
        d.kl(torch.ones(2, 2, 3))
    with pytest.raises(TypeError, match="sample"):
        d.nll(1.0)
    with pytest.raises(ValueError, match="dims"):
        d.nll(torch.ones(2, 2, 3), dims=[1, 1])
    with pytest.raises(ValueError, match="dims"):
        d.nll(torch.ones(2, 2, 3), dims=[3])
    with pytest.raises(ValueError, match="sample"):
        d.nll(torch.ones(2, 2, 3, 1))


def test_exported():
    assert vf.DiagonalGaussianDistribution is Ours


def test_compiles_in_one_graph():
    def f(p):
        d = Ours(p)
        return d.sample(), d.kl(), d.nll(p[:, :4].detach())

    p = torch.randn(2, 8, 4, 4, requires_grad=True)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.manual_seed(0)
    want = f(p)
    torch.manual_seed(0)
    got = compiled(p)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    g_got = torch.autograd.grad(sum(t.sum() for t in got), p)[0]
    g_want = torch.autograd.grad(sum(t.sum() for t in want), p)[0]
    torch.testing.assert_close(g_got, g_want)


def test_ldm_benchmark_rows_have_the_suite_schema():
    from vae_fast.bench.ldm import ldm_rows

    rows = ldm_rows("cpu", quick=True, repeats=3, copy_gbps=10.0)
    assert [r["pass"] for r in rows] == ["fwd", "fwd+bwd"]
    for r in rows:
        assert {"op", "dtype", "shape", "pass", "fused_ms", "eager_ms", "compile_ms", "fused_p20_ms", "fused_p80_ms",
                "bytes", "fused_gbps", "copy_fraction", "peak_mb", "baseline"} <= set(r)
        assert r["op"] == "DiagonalGaussianDistribution.sample+kl" and r["shape"] == [2, 8, 16, 16]
        assert 0 < r["fused_p20_ms"] <= r["fused_ms"] <= r["fused_p80_ms"] and r["eager_ms"] > 0
        assert r["compile_ms"] is None and set(r["peak_mb"]) == {"fused", "eager", "compile"}
        assert r["copy_fraction"] == pytest.approx(r["fused_gbps"] / 10.0)
    n = 2 * 4 * 16 * 16  # latent elements, float32; B = 2 float32 KL values
    assert rows[0]["bytes"] == 3 * 4 * n + 2 * 4  # read mean, logvar; write z, kl
    assert rows[1]["bytes"] == rows[0]["bytes"] + (4 * n + 2 * 4) + 4 * 4 * n  # read gz, gkl, mean, logvar; write grad


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_equals_cpu(dtype):
    """Same generator seed, same eps on both devices (the kernels share the counter layout): values and
    gradients of sample, kl and nll agree to float rounding; bf16 parameters are read as they are."""
    p_cpu = _parameters((4, 8, 16, 16), torch.float32).to(dtype)
    x = torch.randn(4, 4, 16, 16)
    out = {}
    for device in ("cpu", "cuda"):
        p = p_cpu.to(device).requires_grad_()
        d = Ours(p)
        z = d.sample(generator=torch.Generator().manual_seed(3))
        kl, nll = d.kl(), d.nll(x.to(device, dtype))
        (g,) = torch.autograd.grad((z.float().sum() + kl.sum() + nll.sum()), p)
        out[device] = [t.detach().float().cpu() for t in (z, kl, nll, g)]
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1.6e-2}
    for name, a, b in zip(("z", "kl", "nll", "grad"), out["cuda"], out["cpu"]):
        torch.testing.assert_close(a, b, **tol, msg=name)
