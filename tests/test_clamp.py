"""The logvar clamp folded into the kernels (``logvar_clamp=``) and the gradients of two halves of one tensor
written into one buffer (the backward ops' ``concat_dim``): values and gradients against the float64 reference
with torch.clamp, the clamp's edges and NaN, every layout the row engines take, opcheck, gradcheck and
gradgradcheck, and the errors."""

from __future__ import annotations

import math

import pytest
import torch

import vae_fast as vf
from vae_fast.ops import _composite as ref

ops = torch.ops.vae_fast
LO, HI = -3.0, 2.0
CLAMP = (LO, HI)
EDGES = [LO, HI, LO - 1e-3, HI + 1e-3, LO + 1e-3, HI - 1e-3, -9.0, 7.0]  # on, just outside, just inside, far


def _logvar(shape, gen, dtype=torch.float64, nan=False):
    """A logvar that crosses both edges and sits exactly on them (and a NaN when asked)."""
    lv = 2.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
    flat = lv.view(-1)
    n = min(len(EDGES), flat.numel())
    flat[:n] = torch.tensor(EDGES[:n], dtype=torch.float64)
    if nan:
        flat[len(EDGES)] = math.nan
    return lv.to(dtype)


def _randn(shape, gen, dtype=torch.float64):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _eps(mu, seed, num_samples=None, event_dims=1):
    """The sampler's eps for `seed`: z at mu = 0, logvar = 0 is eps itself."""
    zeros = torch.zeros(mu.shape, dtype=mu.dtype)
    return vf.reparameterize(zeros, zeros, num_samples, seed=seed, event_dims=event_dims)


# Each case: (name, fused(*tensors), reference(*tensors), the tensors' makers).
def _cases(gen, dtype, nan=False):
    x, mu, pm = (_randn((4, 37), gen, dtype) for _ in range(3))
    lv, plv = _logvar((4, 37), gen, dtype, nan), _logvar((37,), gen, dtype)
    eps = _eps(mu, 11)
    eps_k = _eps(mu, 12, 3)
    cases = [
        ("kl", (mu, lv), lambda m, l: vf.gaussian_kl(m, l, logvar_clamp=CLAMP),
         lambda m, l: ref.gaussian_kl(m, l, logvar_clamp=CLAMP)),
        ("kl_prior", (mu, lv, pm[0], plv),
         lambda m, l, a, b: vf.gaussian_kl(m, l, a, b, logvar_clamp=CLAMP, prior_logvar_clamp=(-1.0, 1.0)),
         lambda m, l, a, b: ref.gaussian_kl(m, l, a, b, logvar_clamp=CLAMP, prior_logvar_clamp=(-1.0, 1.0))),
        ("log_prob", (x, mu, lv), lambda a, m, l: vf.gaussian_log_prob(a, m, l, logvar_clamp=CLAMP),
         lambda a, m, l: ref.gaussian_log_prob(a, m, l, logvar_clamp=CLAMP)),
        ("sample_kl", (mu, lv), lambda m, l: vf.reparameterize_with_kl(m, l, seed=11, logvar_clamp=CLAMP),
         lambda m, l: ref.sample_terms(m, l, eps.double(), 1, False, CLAMP)[::2]),
    ]
    for path in (False, True):
        cases.append((f"sample_log_q_path{int(path)}", (mu, lv),
                      lambda m, l, p=path: vf.reparameterize(m, l, 3, seed=12, return_log_q=True, log_q_path_only=p,
                                                             logvar_clamp=CLAMP),
                      lambda m, l, p=path: ref.sample_terms(m, l, eps_k.double(), 1, p, CLAMP)[:2]))
    return cases


def _outputs_and_grads(fn, tensors, upstream_gen):
    leaves = [t.detach().requires_grad_() for t in tensors]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    ups = [torch.randn(o.shape, generator=upstream_gen, dtype=torch.float64).to(o.device, o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, leaves, ups)
    return outs, grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_values_and_gradients_equal_torch_clamp(dtype):
    """Every op with a clamp equals the float64 reference that clamps with torch.clamp, values and gradients,
    edges included (the gradient passes at lo and hi, is 0 just outside)."""
    tol = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=1e-4),
           torch.bfloat16: dict(rtol=2e-2, atol=5e-2)}[dtype]
    for name, tensors, fused, reference in _cases(torch.Generator().manual_seed(0), dtype):
        outs, grads = _outputs_and_grads(fused, tensors, torch.Generator().manual_seed(1))
        want, want_grads = _outputs_and_grads(reference, [t.double() for t in tensors],
                                              torch.Generator().manual_seed(1))
        for o, w in zip(outs, want):
            torch.testing.assert_close(o.double(), w, **tol, msg=name)
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g.double(), w, **tol, msg=f"gradient of {name}")
        lv_index = 2 if name == "log_prob" else 1
        raw = tensors[lv_index].double().view(-1)
        g_lv = grads[lv_index].view(-1)
        outside = (raw < LO) | (raw > HI)
        assert outside.any() and (g_lv[outside] == 0).all(), name  # exactly 0 outside
        assert (g_lv[:2] != 0).all(), name  # passed at the edges themselves


def test_nan_logvar_gets_zero_gradient_with_a_clamp_and_nan_without():
    """torch.clamp keeps a NaN (the values are NaN) and gives it gradient 0; with no clamp nothing is masked."""
    for name, tensors, fused, reference in _cases(torch.Generator().manual_seed(2), torch.float64, nan=True):
        outs, grads = _outputs_and_grads(fused, tensors, torch.Generator().manual_seed(3))
        want, want_grads = _outputs_and_grads(reference, tensors, torch.Generator().manual_seed(3))
        for o, w in zip(outs, want):
            torch.testing.assert_close(o, w, rtol=1e-10, atol=1e-10, equal_nan=True, msg=name)
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, equal_nan=True, msg=f"gradient of {name}")
        lv_index = 2 if name == "log_prob" else 1
        assert grads[lv_index].view(-1)[len(EDGES)] == 0, name
    mu, lv = torch.zeros(2, 3, requires_grad=True), torch.tensor([[0.0, math.nan, 1.0], [0.0] * 3], requires_grad=True)
    (g,) = torch.autograd.grad(vf.gaussian_kl(mu, lv).sum(), lv)
    assert g[0, 1].isnan() and not g[1].isnan().any()


def test_row_engine_layouts_with_a_clamp():
    """Transposed, broadcast and strided operands (the general row engine, accumulated gradients) clamp alike."""
    gen = torch.Generator().manual_seed(4)
    lv = _logvar((5, 6, 7), gen).transpose(1, 2)          # strided: the general engine
    mu = _randn((7,), gen)                                  # broadcast: accumulated gradient
    plv = _logvar((6,), gen)                                # a broadcast prior logvar (edges too), clamped
    x = _randn((3, 1, 7, 6), gen)
    checks = [
        ((mu, lv), lambda m, l: vf.gaussian_kl(m.unsqueeze(-1), l, event_dims=2, logvar_clamp=CLAMP),
         lambda m, l: ref.gaussian_kl(m.unsqueeze(-1), l, event_dims=2, logvar_clamp=CLAMP)),
        ((mu, lv, plv), lambda m, l, p: vf.gaussian_kl(m.unsqueeze(-1), l, torch.zeros((), dtype=torch.float64), p,
                                                       event_dims=1, logvar_clamp=CLAMP, prior_logvar_clamp=(-0.5, 0.5)),
         lambda m, l, p: ref.gaussian_kl(m.unsqueeze(-1), l, torch.zeros((), dtype=torch.float64), p, event_dims=1,
                                         logvar_clamp=CLAMP, prior_logvar_clamp=(-0.5, 0.5))),
        ((x, mu, lv), lambda a, m, l: vf.gaussian_log_prob(a, m.unsqueeze(-1), l, event_dims=0, logvar_clamp=CLAMP),
         lambda a, m, l: ref.gaussian_log_prob(a, m.unsqueeze(-1), l, event_dims=0, logvar_clamp=CLAMP)),
    ]
    for tensors, fused, reference in checks:
        outs, grads = _outputs_and_grads(fused, tensors, torch.Generator().manual_seed(5))
        want, want_grads = _outputs_and_grads(reference, tensors, torch.Generator().manual_seed(5))
        torch.testing.assert_close(outs, want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(grads, want_grads, rtol=1e-10, atol=1e-10)


def test_gradcheck_and_gradgradcheck_with_a_clamp():
    gen = torch.Generator().manual_seed(6)
    mu, x = _randn((3, 4), gen).requires_grad_(), _randn((3, 4), gen).requires_grad_()
    lv = torch.tensor([[-5.0, -1.0, 0.5, 4.0]] * 3, dtype=torch.float64).add_(0.1 * _randn((3, 4), gen))
    lv.requires_grad_()  # inside and outside, away from the edges (where the clamp has no derivative)
    pm, plv = _randn((4,), gen).requires_grad_(), torch.tensor([-4.0, 0.0, 0.3, 3.0], dtype=torch.float64,
                                                                  requires_grad=True)
    fns = [
        (lambda m, l: vf.gaussian_kl(m, l, logvar_clamp=CLAMP), (mu, lv)),
        (lambda m, l, a, b: vf.gaussian_kl(m, l, a, b, logvar_clamp=CLAMP, prior_logvar_clamp=(-1.0, 1.0)),
         (mu, lv, pm, plv)),
        (lambda a, m, l: vf.gaussian_log_prob(a, m, l, logvar_clamp=CLAMP), (x, mu, lv)),
        (lambda m, l: vf.reparameterize_with_kl(m, l, 2, seed=5, logvar_clamp=CLAMP), (mu, lv)),
    ]
    for fn, args in fns:
        assert torch.autograd.gradcheck(fn, args)
        assert torch.autograd.gradgradcheck(fn, args)
    # (path-only log q's second derivatives, with a clamp too: test_edges.py, against torch autograd)


def test_opcheck_with_clamp_and_concat_dim():
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(3, 8, 5, generator=gen)
    mu, lv = base.chunk(2, 1)
    x, g = torch.randn(3, 4, 5, generator=gen), torch.randn(3, generator=gen)
    c = [LO, HI]
    torch.library.opcheck(ops.gaussian_kl.default, (mu, lv, None, None, 2, c, None))
    torch.library.opcheck(ops.gaussian_kl.default, (mu, lv, mu[0], lv[0], 1, c, [-1.0, 1.0]))
    torch.library.opcheck(ops.gaussian_log_prob.default, (x, mu, lv, 2, c))
    torch.library.opcheck(ops.sample_gaussian.default, (mu, lv, None, 5, 2, True, 2, True, True, False, c))
    torch.library.opcheck(ops.gaussian_kl_backward.default, (g, mu, lv, None, None, 2, [True, True], c, None, 1))
    torch.library.opcheck(ops.gaussian_log_prob_backward.default, (g, x, mu, lv, 2, [True, True, True], c, -2))
    torch.library.opcheck(ops.sample_gaussian_backward.default,
                          (torch.randn(3, 4, 5, generator=gen), None, g, mu, lv, None, 5, 1, False, 2, False, True,
                           True, c, 1))


@pytest.mark.parametrize("op", ["kl", "log_prob", "log_prob_broadcast", "sample", "sample_z_only"])
def test_halves_of_one_tensor_get_their_gradients_in_one_buffer(op):
    """mean and logvar that are the two halves of one tensor: both gradients are views of one buffer (mean's
    half first), bitwise equal to the gradients of separate contiguous copies (log_prob_broadcast: mean and logvar
    broadcast against a (2, 4, ...) x, their summed gradients copied into the buffer)."""
    gen = torch.Generator().manual_seed(8)
    base = torch.randn(4, 6, 3, 5, generator=gen).requires_grad_()
    x, g = torch.randn(4, 3, 3, 5, generator=gen), torch.randn(4, generator=gen)
    gz = torch.randn(4, 3, 3, 5, generator=gen)

    def run(mu, lv):
        if op == "kl":
            return torch.autograd.grad(vf.gaussian_kl(mu, lv, event_dims=3, logvar_clamp=(-1.0, 1.0)), [mu, lv], g)
        if op == "log_prob":
            out = vf.gaussian_log_prob(x, mu, lv, event_dims=3, logvar_clamp=(-1.0, 1.0))
            return torch.autograd.grad(out, [mu, lv], g)
        if op == "log_prob_broadcast":
            out = vf.gaussian_log_prob(torch.stack([x, 2 * x]), mu, lv, event_dims=3, logvar_clamp=(-1.0, 1.0))
            return torch.autograd.grad(out, [mu, lv], torch.stack([g, -g]))
        z, kl = vf.reparameterize_with_kl(mu, lv, seed=3, event_dims=3, logvar_clamp=(-1.0, 1.0))
        if op == "sample_z_only":
            return torch.autograd.grad(z, [mu, lv], gz)
        return torch.autograd.grad([z, kl], [mu, lv], [gz, g])

    dmu, dlv = run(*base.chunk(2, 1))
    assert dmu.untyped_storage().data_ptr() == dlv.untyped_storage().data_ptr()
    assert dlv.storage_offset() - dmu.storage_offset() == 3 * dmu.stride(1) and dmu.stride() == (90, 15, 5, 1)
    separate = [t.detach().clone().requires_grad_() for t in base.chunk(2, 1)]
    want = run(*separate)
    assert torch.equal(dmu, want[0]) and torch.equal(dlv, want[1])


def test_bad_clamp_arguments():
    mu, lv = torch.zeros(2, 3), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="logvar_clamp"):
        vf.gaussian_kl(mu, lv, logvar_clamp=(1.0, -1.0))
    with pytest.raises(ValueError, match="logvar_clamp"):
        vf.reparameterize(mu, lv, logvar_clamp=(math.nan, 1.0))
    with pytest.raises(TypeError, match="logvar_clamp"):
        vf.gaussian_log_prob(mu, mu, lv, logvar_clamp=1.0)
    with pytest.raises(TypeError, match="logvar_clamp"):
        vf.reparameterize_with_kl(mu, lv, logvar_clamp=(0.0, 1.0, 2.0))
    with pytest.raises(ValueError, match="prior_logvar_clamp"):
        vf.gaussian_kl(mu, lv, prior_logvar_clamp=(0.0, 1.0))
    with pytest.raises(ValueError, match="logvar_clamp"):
        ops.gaussian_kl(mu, lv, None, None, 1, [0.0])
    with pytest.raises(ValueError, match="concat_dim"):
        ops.gaussian_kl_backward(torch.ones(2), mu, lv, None, None, 1, [True, False], None, None, 1)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cuda_equals_cpu_with_a_clamp_and_one_buffer(dtype):
    """The CUDA kernels clamp as the CPU's (values, gradients, edges, NaN) and write the halves' gradients into
    one buffer too."""
    for name, tensors, fused, _ in _cases(torch.Generator().manual_seed(9), dtype, nan=True):
        # eps is float32 Box-Muller on both devices, with their own sin/cos (a few ulps apart): what depends on
        # it agrees to float32's precision in any dtype
        exact = dtype == torch.float64 and not name.startswith("sample")
        tol = dict(rtol=1e-12, atol=1e-12) if exact else dict(rtol=1e-5, atol=1e-5)
        cpu = _outputs_and_grads(fused, tensors, torch.Generator().manual_seed(10))
        gpu = _outputs_and_grads(fused, [t.cuda() for t in tensors], torch.Generator().manual_seed(10))
        for a, b in zip((*cpu[0], *cpu[1]), (*gpu[0], *gpu[1])):
            torch.testing.assert_close(b.cpu(), a, **tol, equal_nan=True, msg=name)
    base = torch.randn(4, 6, 3, 5, dtype=dtype, device="cuda").requires_grad_()
    mu, lv = base.chunk(2, 1)
    z, kl = vf.reparameterize_with_kl(mu, lv, seed=3, event_dims=3, logvar_clamp=(-1.0, 1.0))
    dmu, dlv = torch.autograd.grad([z, kl], [mu, lv], [torch.ones_like(z), torch.ones_like(kl)])
    assert dmu.untyped_storage().data_ptr() == dlv.untyped_storage().data_ptr()
    assert dlv.storage_offset() - dmu.storage_offset() == 3 * dmu.stride(1)
