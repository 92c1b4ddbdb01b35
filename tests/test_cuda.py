"""CUDA-only checks (the rest of the suite runs on CUDA through the `device` fixture): CPU/GPU
agreement of the Philox stream, CUDA graphs (captured by hand, torch.compile's reduce-overhead, a whole
training step), autocast, determinism, and the
`cuda_smoke` subset that runs under compute-sanitizer. Skipped cleanly without a GPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vae_fast as vf
from vae_fast.ops import _composite as ref

pytestmark = pytest.mark.cuda


@pytest.mark.cuda_smoke
@pytest.mark.parametrize("num_samples", [None, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_same_eps_on_cpu_and_cuda(num_samples, dtype):
    mu = torch.randn(37, 129, dtype=dtype)
    lv = torch.randn(37, 129, dtype=dtype)
    z_cpu, kl_cpu = vf.reparameterize_with_kl(mu, lv, num_samples, seed=1234)
    z_gpu, kl_gpu = vf.reparameterize_with_kl(mu.cuda(), lv.cuda(), num_samples, seed=1234)
    rtol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(z_gpu.cpu(), z_cpu, rtol=rtol, atol=rtol)
    torch.testing.assert_close(kl_gpu.cpu(), kl_cpu, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(z_cpu)
    for dev in ("cpu", "cuda"):
        m = mu.to(dev).requires_grad_()
        v = lv.to(dev).requires_grad_()
        z, kl = vf.reparameterize_with_kl(m, v, num_samples, seed=1234)
        grads = torch.autograd.grad((z * g.to(dev)).sum() + kl.sum(), (m, v))
        if dev == "cpu":
            expected = grads
        else:
            for a, b in zip(grads, expected):
                torch.testing.assert_close(a.cpu(), b, rtol=rtol, atol=rtol)


@pytest.mark.cuda_smoke
def test_row_ops_small_subset():
    x = torch.rand(5, 33, device="cuda")
    logits = torch.randn(3, 5, 33, device="cuda", requires_grad=True)
    mean = torch.randn(3, 5, 33, device="cuda", requires_grad=True)
    lv = torch.randn(33, device="cuda", requires_grad=True)
    lp = vf.bernoulli_log_prob(x, logits) + vf.gaussian_log_prob(x, mean, lv)
    kl = vf.gaussian_kl(mean, lv.expand(3, 5, 33), torch.zeros(33, device="cuda"), lv.detach())
    (lp.sum() + kl.sum()).backward()
    lp_ref = ref.bernoulli_log_prob(x.cpu().double(), logits.detach().cpu().double()) + ref.gaussian_log_prob(
        x.cpu().double(), mean.detach().cpu().double(), lv.detach().cpu().double())
    torch.testing.assert_close(lp.detach().cpu().double(), lp_ref, rtol=1e-5, atol=1e-4)
    assert torch.isfinite(lv.grad).all()


def test_broadcast_gradients_are_bitwise_deterministic():
    x = torch.randn(512, 300, device="cuda")
    mean = torch.randn(16, 512, 300, device="cuda")
    lv = torch.randn((), device="cuda", requires_grad=True)
    lv_d = torch.randn(300, device="cuda", requires_grad=True)
    grads = []
    for _ in range(3):
        g1, g2 = torch.autograd.grad(vf.gaussian_log_prob(x, mean, lv).sum() + vf.gaussian_log_prob(x, mean, lv_d).sum(),
                                     (lv, lv_d))
        grads.append((g1, g2))
    for g in grads[1:]:
        assert torch.equal(g[0], grads[0][0]) and torch.equal(g[1], grads[0][1])


def test_cuda_graph_capture_draws_fresh_samples_per_replay():
    mu = torch.randn(64, 16, device="cuda")
    lv = torch.randn(64, 16, device="cuda")
    seed = torch.zeros(1, dtype=torch.int64, device="cuda")
    static_z = None
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        vf.reparameterize(mu, lv, seed=seed)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_z, static_kl = vf.reparameterize_with_kl(mu, lv, seed=seed)
    outs = []
    for value in (1, 2, 1):
        seed.fill_(value)  # the seed is read on the device at replay time
        graph.replay()
        outs.append(static_z.clone())
    assert not torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    torch.testing.assert_close(outs[0], vf.reparameterize(mu, lv, seed=1))
    torch.testing.assert_close(static_kl, vf.gaussian_kl(mu, lv))


def _small_vae_loss():
    """A loss as a VAE's training step computes it: encoder, the fused sampler with its KL (K = 4), decoder,
    Bernoulli log-likelihood; the sampler's seed a device tensor, so an eager run can draw the same eps."""
    torch.manual_seed(0)
    enc, dec = torch.nn.Linear(8, 2 * 4).cuda(), torch.nn.Linear(4, 8).cuda()

    def loss(x, seed):
        mu, lv = enc(x).chunk(2, dim=-1)
        z, kl = vf.reparameterize_with_kl(mu, lv, 4, seed=seed)
        return (kl - vf.bernoulli_log_prob(x, dec(z)).mean(0)).mean()
    return torch.nn.ModuleList([enc, dec]), loss


def test_compile_reduce_overhead_training_loop():
    """torch.compile(mode="reduce-overhead") (CUDA graph trees) in a training loop as one is written: grads set
    to None each step (zero_grad's default) and cudagraph_mark_step_begin() before each step. The losses and the
    trained weights follow the same loop run eagerly, step for step (each step draws with its own seed)."""
    x = (torch.rand(32, 8, device="cuda", generator=torch.Generator(device="cuda").manual_seed(3)) < 0.5).float()
    seed = torch.zeros((), dtype=torch.int64, device="cuda")
    results = {}
    for mode in ("eager", "reduce-overhead"):
        params, loss = _small_vae_loss()
        opt = torch.optim.SGD(params.parameters(), lr=0.1)
        torch._dynamo.reset()
        run = loss if mode == "eager" else torch.compile(loss, mode="reduce-overhead", fullgraph=True)
        losses = []
        for step in range(5):
            seed.fill_(100 + step)
            opt.zero_grad(set_to_none=True)
            if mode != "eager":
                torch.compiler.cudagraph_mark_step_begin()
            out = run(x, seed)
            out.backward()
            opt.step()
            losses.append(out.item())
        results[mode] = losses, [p.detach().clone() for p in params.parameters()]
    torch._dynamo.reset()
    (eager_losses, eager_params), (graph_losses, graph_params) = results["eager"], results["reduce-overhead"]
    assert all(math.isfinite(v) for v in graph_losses)
    assert len(set(graph_losses)) == len(graph_losses)  # each replay drew and trained anew
    torch.testing.assert_close(graph_losses, eager_losses, rtol=1e-4, atol=1e-5)
    for got, want in zip(graph_params, eager_params):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_compile_reduce_overhead_trains_the_model():
    """The model as `vae-fast train --compile` would run it under mode="reduce-overhead": the loss of a fixed
    batch goes down and stays finite over steps, and a step's stats can be read before the next one begins."""
    torch.manual_seed(0)
    model = vf.mlp_vae(64, 8, hidden=(32,)).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = (torch.rand(128, 64, device="cuda") < 0.3).float()
    losses = []
    torch._dynamo.reset()
    compiled = torch.compile(model, mode="reduce-overhead")
    for _ in range(30):
        opt.zero_grad(set_to_none=True)
        torch.compiler.cudagraph_mark_step_begin()
        loss, stats = compiled(x)
        loss.backward()
        opt.step()
        losses.append((loss.item(), stats["elbo"].item()))
    torch._dynamo.reset()
    assert all(math.isfinite(v) for pair in losses for v in pair)
    assert sum(v for v, _ in losses[-5:]) < sum(v for v, _ in losses[:5])


def test_graphed_training_step_trains():
    """The benchmark's whole-step CUDA graph (forward, backward, capturable fused Adam, fused sampler inside):
    each replay draws new samples and trains, so the loss of a fixed batch goes down."""
    from vae_fast.bench import train_steps

    cfg = next(c for c in train_steps.TRAIN_CONFIGS if c.name == "digits")
    dev = torch.device("cuda")
    x = train_steps._train_data(cfg, dev, torch.Generator(device="cuda").manual_seed(0))
    base, make_loss, _ = train_steps._trainee(cfg, dev)
    step = train_steps.train_step_impl(cfg, make_loss, "fused_graph", dev, x.clone())
    losses = [step([x]).item() for _ in range(40)]
    assert all(math.isfinite(v) for v in losses)
    assert len(set(losses[:5])) == 5
    assert sum(losses[-5:]) < sum(losses[:5])


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_reads_reduced_precision_without_copies(amp_dtype):
    lin = torch.nn.Linear(16, 32).cuda()
    x = torch.rand(8, 32, device="cuda")
    with torch.autocast("cuda", dtype=amp_dtype):
        logits = lin(torch.randn(8, 16, device="cuda"))
        assert logits.dtype == amp_dtype
        lp = vf.bernoulli_log_prob(x, logits)
        mu, lv = logits.chunk(2, dim=-1)
        z, kl = vf.reparameterize_with_kl(mu, lv)
    assert lp.dtype == torch.float32 and kl.dtype == torch.float32 and z.dtype == amp_dtype
    expected = ref.bernoulli_log_prob(x.double(), logits.double())
    torch.testing.assert_close(lp.double(), expected, rtol=1e-5, atol=1e-4)
    lp.sum().backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


def test_any_gpu_index_and_current_stream():
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    mu = torch.randn(4, 5, device=dev)
    s = torch.cuda.Stream(device=dev)
    with torch.cuda.stream(s):
        kl = vf.gaussian_kl(mu, mu)
    s.synchronize()
    torch.testing.assert_close(kl.cpu().double(), ref.gaussian_kl(mu.cpu().double(), mu.cpu().double()))


def test_mixed_devices_raise():
    with pytest.raises((ValueError, RuntimeError), match="device"):
        vf.gaussian_kl(torch.zeros(3, device="cuda"), torch.zeros(3))


# ---- the sampler's in-place strided reads, seed by value, log_q's path-only gradient ------------
@pytest.mark.cuda_smoke
@pytest.mark.parametrize("layout", ["last_dim_halves", "channel_halves"])
def test_chunked_encoder_output_matches_contiguous_bitwise(layout):
    # mu, logvar = h.chunk(2, dim) are read in place (SampleArgs run / run stride); the result and the
    # gradients must equal those of contiguous copies bit for bit (same eps, same arithmetic).
    if layout == "last_dim_halves":
        h = torch.randn(6, 2 * 37, device="cuda", requires_grad=True)
        dim = -1
    else:
        h = torch.randn(3, 2 * 4, 5, 7, device="cuda", requires_grad=True)
        dim = 1
    mu, lv = h.chunk(2, dim=dim)
    z, kl = vf.reparameterize_with_kl(mu, lv, 3, seed=99)
    g = torch.randn_like(z)
    (dh,) = torch.autograd.grad((z * g).sum() + kl.sum(), h)
    hc = h.detach().clone().requires_grad_()
    mu_c, lv_c = (t.contiguous() for t in hc.chunk(2, dim=dim))
    z_c, kl_c = vf.reparameterize_with_kl(mu_c, lv_c, 3, seed=99)
    (dh_c,) = torch.autograd.grad((z_c * g).sum() + kl_c.sum(), hc)
    assert torch.equal(z, z_c) and torch.equal(kl, kl_c) and torch.equal(dh, dh_c)


def test_seed_int_and_seed_tensor_draw_the_same():
    mu = torch.randn(5, 33, device="cuda")
    lv = torch.randn(5, 33, device="cuda")
    a = vf.reparameterize(mu, lv, 2, seed=2**40 + 3)
    b = vf.reparameterize(mu, lv, 2, seed=torch.tensor(2**40 + 3, device="cuda"))
    assert torch.equal(a, b)


def test_gaussian_nll_loss_of_a_large_batch_is_exact_and_parallel():
    """A loss reduced to one number on CUDA: per-row sums, then their float64 sum (not one row on one block)."""
    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(16, 3, 128, 128, device="cuda", generator=g)
    t = x + 0.1 * torch.randn(x.shape, device="cuda", generator=g)
    v = torch.rand(x.shape, device="cuda", generator=g) + 0.5
    for reduction in ("mean", "sum"):
        got = vf.gaussian_nll_loss(x, t, v, reduction=reduction)
        want = F.gaussian_nll_loss(x.double(), t.double(), v.double(), reduction=reduction)
        assert abs(got.item() - want.item()) <= 1e-6 * abs(want.item()), reduction


# Each broadcast pattern of the one-pass CUDA backward kernels (rows.cu: bcast_vec_kernel, bcast_row_vec_kernel,
# scalar_acc_vec_kernel) at sizes where they cut the broadcast rows into several segments or blocks, and one the
# general kernel keeps (the data's gradient with a scalar log-variance's): gradients against float64 autograd of
# the composite formula, and bitwise equal on a second run.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pattern", ["data_vs_samples", "per_feature", "per_row", "per_channel", "scalar", "mixed"])
def test_one_pass_broadcast_backward_patterns(pattern, dtype):
    g = torch.Generator(device="cuda").manual_seed(7)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(shape, device="cuda", generator=g)).to(dtype)

    event_dims = 1
    if pattern == "per_channel":  # images: a per-channel log-variance against (B, C, H, W)
        x, mean, lv = rnd(64, 3, 32, 32), rnd(64, 3, 32, 32), rnd(1, 3, 1, 1, scale=0.5)
        event_dims, wanted = 3, (1, 2)
    else:
        x, mean = rnd(512, 300), rnd(8, 512, 300)
        lv = {"data_vs_samples": rnd(8, 512, 300, scale=0.5), "per_feature": rnd(300, scale=0.5),
              "per_row": rnd(512, 1, scale=0.5), "scalar": rnd(scale=0.5), "mixed": rnd(scale=0.5)}[pattern]
        wanted = {"data_vs_samples": (0, 1, 2), "mixed": (0, 1, 2)}.get(pattern, (1, 2))
    args = [x, mean, lv]

    def grads(fn, tensors):
        leaves = [t.detach().requires_grad_(i in wanted) for i, t in enumerate(tensors)]
        out = fn(*leaves, event_dims=event_dims)
        upstream = torch.linspace(-1.0, 1.0, out.numel(), device=out.device, dtype=out.dtype).view(out.shape)
        return torch.autograd.grad((out * upstream).sum(), [leaves[i] for i in wanted])

    got = grads(vf.gaussian_log_prob, args)
    again = grads(vf.gaussian_log_prob, args)
    want = grads(ref.gaussian_log_prob, [a.double() for a in args])
    for i, a, b, w in zip(wanted, got, again, want):
        assert torch.equal(a, b), f"argument {i}: two runs differ"
        scale = w.abs().max().item()
        torch.testing.assert_close(a.double(), w, rtol=2e-2 if dtype == torch.bfloat16 else 1e-4,
                                   atol=1e-5 * scale, msg=lambda m: f"argument {i}: {m}")
