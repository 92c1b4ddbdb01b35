"""Whole training steps and the large-K log-likelihood: one Adam step of a VAE (an MLP VAE, or a small diffusers
AutoencoderKL with vae_fast's posterior) with the fused ops and with the same maths in plain PyTorch, eager,
compiled, with CUDA graphs; the ELBO ops' share of the step; the memory of ``model.log_likelihood`` with many
samples."""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..ops import _composite as R
from ..ops import _dmol_composite as D
from . import timing  # timing.CONFIG_BUDGET_S is read at call time (the tests shorten it)
from .cases import input_sets, make_call
from .ldm import baseline, posterior_case
from .timing import peak_mb, percentiles, sync, time_interleaved


def _ref_reparameterize(mu, logvar, num_samples=None, *, seed=None, generator=None, return_log_q=False,
                        log_q_path_only=False, event_dims=1):
    shape = mu.shape if num_samples is None else (num_samples, *mu.shape)
    eps = torch.randn(shape, dtype=mu.dtype, device=mu.device, generator=generator)
    z = R.reparameterize(mu, logvar, eps)
    if not return_log_q:
        return z
    return z, R.sample_log_q(mu, logvar, z, eps, event_dims=event_dims, log_q_path_only=log_q_path_only)


def _ref_reparameterize_with_kl(mu, logvar, num_samples=None, *, seed=None, generator=None, event_dims=1):
    return R.sample_eager(mu, logvar, num_samples, event_dims=event_dims)


def _eager_layer_kl(mu, logvar, prior_mu=None, prior_logvar=None, *, event_dims=1):
    """A hierarchical VAE's per-layer KL as VDVAE computes it in eager PyTorch (its log-std form, written here
    in log-variances): 0.5 (lv_p - lv_q + (e^lv_q + (mu_q - mu_p)^2) / e^lv_p - 1), summed over the layer."""
    if prior_mu is None:
        return R.gaussian_kl(mu, logvar, event_dims=event_dims)
    term = 0.5 * (prior_logvar - logvar + (torch.exp(logvar) + (mu - prior_mu) ** 2) / torch.exp(prior_logvar) - 1.0)
    return term.sum(tuple(range(-event_dims, 0)))


_PIXELCNN_ORDER: dict = {}


def _eager_dmol(x, params, *, num_bits=8, layout="channels_first", event_dims=3):
    """The mixture of logistics as PixelCNN++ and VDVAE compute it (``_dmol_composite.pixelcnn_pp_log_prob``: the
    (B, H, W, C, M) temporaries, the 1e-5 switch), the model's channels_first parameters put in its P order."""
    c = x.shape[-3]
    m = params.shape[-3] // (10 if c == 3 else 3)
    key = (c, m, params.device)
    if key not in _PIXELCNN_ORDER:  # [logits | per channel: means, log-scales, coeffs] from [logits | means | ...]
        per_channel = [[m + i * m + j for j in range(m)] + [m + c * m + i * m + j for j in range(m)]
                       + ([m + 2 * c * m + i * m + j for j in range(m)] if c == 3 else []) for i in range(c)]
        _PIXELCNN_ORDER[key] = torch.tensor(list(range(m)) + sum(per_channel, []), device=params.device)
    lead = params.shape[:-3]
    pp = params.reshape(-1, *params.shape[-3:]).index_select(1, _PIXELCNN_ORDER[key])
    out = D.pixelcnn_pp_log_prob(x.expand(*lead, *x.shape[-3:]).reshape(-1, *x.shape[-3:]), pp, num_bits)
    return out.reshape(lead)


# Where the model code calls each ELBO op, (module of vae_fast.models, name), and the plain-PyTorch maths put in its
# place: vae.py and hierarchical.py draw z and take the KL and log p(z); likelihoods.py scores the data, log p(x | z).
REFERENCE_MODEL_OPS = {
    ("vae", "gaussian_kl"): R.gaussian_kl,
    ("vae", "gaussian_log_prob"): R.gaussian_log_prob,
    ("vae", "reparameterize"): _ref_reparameterize,
    ("vae", "reparameterize_with_kl"): _ref_reparameterize_with_kl,
    ("likelihoods", "bernoulli_log_prob"): R.bernoulli_log_prob,
    ("likelihoods", "gaussian_log_prob"): R.gaussian_log_prob,
    ("likelihoods", "discretized_mix_logistic_log_prob"): _eager_dmol,
    ("hierarchical", "gaussian_kl"): _eager_layer_kl,
    ("hierarchical", "gaussian_log_prob"): R.gaussian_log_prob,
    ("hierarchical", "reparameterize"): _ref_reparameterize,
}


@contextlib.contextmanager
def _model_ops_replaced(replace):
    """Each ELBO op where the model code calls it (REFERENCE_MODEL_OPS' places) bound to
    ``replace((module, name), the function bound there now)``, and put back afterwards."""
    from ..models import hierarchical, likelihoods, vae

    modules = {"vae": vae, "likelihoods": likelihoods, "hierarchical": hierarchical}
    saved = {key: getattr(modules[key[0]], key[1]) for key in REFERENCE_MODEL_OPS}
    for key, fn in saved.items():
        setattr(modules[key[0]], key[1], replace(key, fn))
    try:
        yield
    finally:
        for key, fn in saved.items():
            setattr(modules[key[0]], key[1], fn)


def reference_ops_in_model():
    """The model code with _composite.py's plain-PyTorch maths in place of the fused ops."""
    return _model_ops_replaced(lambda key, fn: REFERENCE_MODEL_OPS[key])


def elbo_ops_in_ranges():
    """The model's ELBO ops (fused or reference, whichever are bound) each inside a profiler range "elbo::<name>"."""

    def ranged(key, fn):
        def call(*args, **kwargs):
            with torch.profiler.record_function(f"elbo::{key[1]}"):
                return fn(*args, **kwargs)
        return call

    return _model_ops_replaced(ranged)


def profiled_elbo_share(step, x, steps: int) -> float:
    """The profiler's share of a training step spent in the ELBO ops: the CPU time of the "elbo::" ranges (the
    ops' forward, with everything they call) plus that of the backward functions of the autograd nodes made
    inside them (matched by sequence number), over the CPU time of the "bench::step" ranges around the steps.
    The profiler's per-op overhead is in both; it weighs more on the eager maths (more, smaller ops)."""
    with elbo_ops_in_ranges():
        step([x])  # warm-up with the ranges in place
        with timing.stderr_silenced(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                with torch.profiler.record_function("bench::step"):
                    step([x])
    events = prof.events()

    def in_elbo_range(e):
        while e is not None:
            if e.name.startswith("elbo::"):
                return True
            e = e.cpu_parent
        return False

    step_us = sum(e.cpu_time_total for e in events if e.name == "bench::step")
    # outermost ranges only, and the sequence numbers of the autograd nodes made inside them
    elbo_us = sum(e.cpu_time_total for e in events if e.name.startswith("elbo::") and not in_elbo_range(e.cpu_parent))
    seqs = {e.sequence_nr for e in events if e.sequence_nr >= 0 and in_elbo_range(e)}
    elbo_us += sum(e.cpu_time_total for e in events
                   if e.name.startswith("autograd::engine::evaluate_function:") and e.sequence_nr in seqs)
    return elbo_us / step_us if step_us > 0 else float("nan")


@dataclass
class TrainConfig:
    name: str
    batch: int
    input_dim: int
    hidden: tuple
    latent: int
    likelihood: str = "bernoulli"
    obs_logvar: str = "scalar"
    objective: str = "elbo"
    num_samples: int = 1
    image: tuple = ()  # image configs: (C, H, W); "ldm": hidden = the autoencoder's block channels
    kind: str = "mlp"  # "mlp": mlp_vae; "conv": conv_vae; "hvae": hierarchical_vae (hidden = (its config,));
    #                    "ldm": diffusers' AutoencoderKL with its posterior swapped


TRAIN_CONFIGS = [
    TrainConfig("digits", 128, 64, (256, 128), 8),
    TrainConfig("mnist-mlp", 128, 784, (512,), 20),
    TrainConfig("mnist-mlp-b1024", 1024, 784, (512,), 20),
    TrainConfig("mnist-mlp-iwae50", 128, 784, (512,), 20, objective="iwae", num_samples=50),
    TrainConfig("mnist-mlp-gauss-perfeature", 512, 784, (512,), 20, likelihood="gaussian",
                obs_logvar="per_feature"),
    TrainConfig("mnist-mlp-b16384", 16384, 784, (512,), 20),
    # The image models users train with the mixture of logistics: the conv VAE, the hierarchical VAE (small on a
    # CPU; VDVAE's CIFAR-10 model, batch 16 per GPU as VDVAE trains it, on a GPU).
    TrainConfig("conv-dmol", 32, 3 * 32 * 32, (32, 64), 32, likelihood="dmol", image=(3, 32, 32), kind="conv"),
    TrainConfig("hvae-small-dmol", 32, 3 * 32 * 32, ("small",), 0, likelihood="dmol", image=(3, 32, 32),
                kind="hvae"),
    TrainConfig("hvae-cifar10-dmol", 16, 3 * 32 * 32, ("vdvae-cifar10",), 0, likelihood="dmol", image=(3, 32, 32),
                kind="hvae"),
    # A small latent-diffusion autoencoder: 3x128x128 images to 4x32x32 latents, (16, 8, 32, 32) moments.
    TrainConfig("ldm-autoencoderkl", 16, 3 * 128 * 128, (32, 64, 64), 4, likelihood="gaussian", image=(3, 128, 128),
                kind="ldm"),
    # The same at toy size: a CPU rehearsal of the code path (tests, dry runs).
    TrainConfig("ldm-autoencoderkl-tiny", 2, 3 * 4 * 4, (32,), 4, likelihood="gaussian", image=(3, 4, 4),
                kind="ldm"),
]
TRAIN_CONFIG_NAMES = tuple(c.name for c in TRAIN_CONFIGS)
CPU_TRAIN_CONFIGS = ("digits", "mnist-mlp", "mnist-mlp-b1024", "mnist-mlp-iwae50", "mnist-mlp-gauss-perfeature",
                     "conv-dmol", "hvae-small-dmol")
CUDA_TRAIN_CONFIGS = ("mnist-mlp-b1024", "mnist-mlp-b16384", "mnist-mlp-iwae50", "ldm-autoencoderkl", "conv-dmol",
                      "hvae-cifar10-dmol")
VAE_KINDS = ("mlp", "conv", "hvae")  # vae_fast's own models: the eager maths patched into them

# name: (reference maths in place of the fused ops, torch.compile mode or None, whole step in one CUDA graph)
TRAIN_IMPLS = {
    "fused": (False, None, False),
    "eager": (True, None, False),
    "compile": (True, "default", False),
    "fused_compile": (False, "default", False),
    "compile_cudagraphs": (True, "reduce-overhead", False),
    "fused_compile_cudagraphs": (False, "reduce-overhead", False),
    "eager_graph": (True, None, True),
    "fused_graph": (False, None, True),
}
CPU_TRAIN_IMPLS = ("fused", "eager", "compile", "fused_compile")  # CUDA graphs are a CUDA matter
CUDA_TRAIN_IMPLS = tuple(TRAIN_IMPLS)
QUICK_TRAIN_IMPLS = ("fused", "eager")
# The order impls are built in, so a time budget drops the least needed: fused and eager first (the share needs
# both), the CUDA graphs without compiling (cheap), then the compiled ones.
TRAIN_IMPL_ORDER = ("fused", "eager", "fused_graph", "eager_graph", "fused_compile_cudagraphs", "compile_cudagraphs",
                    "compile", "fused_compile")
GRAPH_IMPLS = ("compile_cudagraphs", "fused_compile_cudagraphs", "eager_graph", "fused_graph")


class _FixedEncoder(torch.nn.Module):
    """Returns a fixed leaf tensor: the encoder's output without its cost (for timing the ELBO ops alone)."""

    def __init__(self, h):
        super().__init__()
        self.h = torch.nn.Parameter(h)

    def forward(self, x):
        return self.h


class _FixedDecoder(torch.nn.Module):
    """A fixed output that still depends on z (one broadcast add), shaped like the real decoder's."""

    def __init__(self, out):
        super().__init__()
        self.out = torch.nn.Parameter(out)

    def forward(self, z):
        return self.out[: z.shape[0]] + z[:, :1].reshape((z.shape[0],) + (1,) * (self.out.dim() - 1))


class _VaeLoss(torch.nn.Module):
    """x -> the VAE's training loss (what ``vae-fast train`` minimises); compiling it compiles the whole model."""

    def __init__(self, model, cfg: TrainConfig):
        super().__init__()
        self.model, self.num_samples, self.objective = model, cfg.num_samples, cfg.objective

    def forward(self, x):
        return self.model(x, num_samples=self.num_samples, objective=self.objective)[0]


class _LdmLoss(torch.nn.Module):
    """x -> an LDM autoencoder's loss: encode, the posterior's sample() and kl(), decode, MSE + 1e-6 KL (the
    perceptual and adversarial terms left out). ``posterior_cls`` is vae_fast's class or diffusers' own."""

    def __init__(self, vae, posterior_cls, kl_weight: float = 1e-6):
        super().__init__()
        self.vae, self.posterior_cls, self.kl_weight = vae, posterior_cls, kl_weight

    def forward(self, x):
        h = self.vae.encoder(x)
        if getattr(self.vae, "quant_conv", None) is not None:
            h = self.vae.quant_conv(h)
        posterior = self.posterior_cls(h)
        z = posterior.sample()
        kl = posterior.kl()
        rec = self.vae.decode(z).sample
        return F.mse_loss(rec, x) + self.kl_weight * kl.mean()


def _train_data(cfg: TrainConfig, device, gen):
    if cfg.kind == "ldm":
        return torch.rand((cfg.batch, *cfg.image), generator=gen, device=device) * 2 - 1
    if cfg.likelihood == "dmol":  # 8-bit levels in [-1, 1]
        return torch.randint(0, 256, (cfg.batch, *cfg.image), generator=gen, device=device).float() / 127.5 - 1
    x = torch.rand((cfg.batch, cfg.input_dim), generator=gen, device=device)
    return (x < 0.3).float() if cfg.likelihood == "bernoulli" else x


def _trainee(cfg: TrainConfig, device: torch.device):
    """(base model, {False: fused, True: reference} -> loss module factory, model text) for one config; the
    factory deep-copies the base, so every implementation starts from the same weights."""
    torch.manual_seed(0)
    if cfg.kind == "ldm":
        from diffusers import AutoencoderKL
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as Theirs

        from ..ops import DiagonalGaussianDistribution as Ours

        n = len(cfg.hidden)
        base = AutoencoderKL(in_channels=cfg.image[0], out_channels=cfg.image[0],
                             down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                             block_out_channels=cfg.hidden, layers_per_block=1, latent_channels=cfg.latent,
                             norm_num_groups=32, sample_size=cfg.image[-1]).to(device)
        side = cfg.image[-1] // 2 ** (n - 1)
        text = (f"diffusers AutoencoderKL {'x'.join(map(str, cfg.image))} -> {cfg.latent}x{side}x{side}, channels "
                f"{'-'.join(map(str, cfg.hidden))}, posterior sample()+kl(), MSE + 1e-6 KL, Adam")
        return base, (lambda reference: _LdmLoss(_clone_module(base), Theirs if reference else Ours)), text
    from ..models import conv_vae, hierarchical_vae, mlp_vae

    if cfg.kind == "conv":
        base = conv_vae(cfg.image, cfg.latent, likelihood=cfg.likelihood, channels=cfg.hidden).to(device)
        text = (f"conv_vae {'x'.join(map(str, cfg.image))}, channels {'-'.join(map(str, cfg.hidden))}, latent "
                f"{cfg.latent}, {cfg.likelihood}, ELBO, Adam")
        return base, (lambda reference: _VaeLoss(_clone_module(base), cfg)), text
    if cfg.kind == "hvae":
        base = hierarchical_vae(cfg.image, config=cfg.hidden[0], likelihood=cfg.likelihood).to(device)
        text = (f"hierarchical_vae {'x'.join(map(str, cfg.image))} ({cfg.hidden[0]}: {base.num_layers} layers, "
                f"{sum(p.numel() for p in base.parameters()) / 1e6:.2g}M parameters), {cfg.likelihood}, ELBO, Adam")
        return base, (lambda reference: _VaeLoss(_clone_module(base), cfg)), text
    base = mlp_vae(cfg.input_dim, cfg.latent, hidden=cfg.hidden, likelihood=cfg.likelihood,
                   obs_logvar=cfg.obs_logvar).to(device)
    text = (f"mlp_vae {cfg.input_dim}-{'-'.join(map(str, cfg.hidden))}-{cfg.latent}, {cfg.likelihood}"
            + (f" ({cfg.obs_logvar} logvar)" if cfg.likelihood == "gaussian" else "")
            + f", {cfg.objective} K={cfg.num_samples}, Adam")
    return base, (lambda reference: _VaeLoss(_clone_module(base), cfg)), text


def _maths(cfg: TrainConfig, reference: bool):
    """The context a step runs in: _composite.py's maths patched into vae_fast.model for an eager MLP step."""
    return reference_ops_in_model() if reference and cfg.kind in VAE_KINDS else contextlib.nullcontext()


def train_step_impl(cfg: TrainConfig, make_loss, impl: str, device: torch.device, static_x: torch.Tensor):
    """A call of one input set ``[x]`` that runs one training step of ``impl`` (see TRAIN_IMPLS) and returns the
    detached loss. The "_graph" impls capture the whole step in one CUDA graph (``graphed_step``)."""
    reference, mode, graph = TRAIN_IMPLS[impl]
    module = make_loss(reference)
    opt = _adam(module, capturable=graph and device.type == "cuda")
    run = torch.compile(module, mode=mode) if mode is not None else module
    step = make_step(run, opt, lambda: _maths(cfg, reference), mark_step=mode == "reduce-overhead")
    return graphed_step(step, [static_x], device) if graph else step


def make_step(run, opt, maths=contextlib.nullcontext, mark_step: bool = False):
    """One training step as a training loop writes it: grads set to None, forward, backward, optimizer step.
    ``mark_step``: torch.compile(mode="reduce-overhead") is told that a new step begins (CUDA graph trees may
    then reuse the last step's outputs)."""
    def step(inputs):
        (x,) = inputs
        with maths():
            if mark_step:
                torch.compiler.cudagraph_mark_step_begin()
            opt.zero_grad(set_to_none=True)
            loss = run(x)
            loss.backward()
            opt.step()
        return loss.detach()
    return step


def graphed_step(step, static_inputs: list, device: torch.device, warmup: int = 3):
    """``step`` (forward, backward and optimizer step of ``static_inputs``) captured in one CUDA graph, after
    ``warmup`` steps on a side stream (they create the optimizer state); returns a call of one input set that
    copies it into the static inputs and replays the graph, returning the step's (static) loss. The optimizer
    must be capturable. Off CUDA nothing is captured: the same calls run the step on the static inputs (a
    rehearsal of everything but the capture)."""
    graph, out = None, {}
    if device.type == "cuda":
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step(static_inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out["loss"] = step(static_inputs)
    else:
        for _ in range(warmup):
            step(static_inputs)

    def call(inputs):
        for dst, src in zip(static_inputs, inputs):
            if dst is not src:
                dst.copy_(src)
        if graph is None:
            return step(static_inputs)
        graph.replay()
        return out["loss"]
    return call


def bench_train_step(device: torch.device, repeats: int, quick: bool, gen: torch.Generator,
                     configs=None, impls=None, budget_s: float | None = None,
                     on_row: Callable[[list], None] | None = None) -> tuple[list, str]:
    """One Adam step per config and implementation (TRAIN_IMPLS): fused vs reference ops, eager, compiled,
    compiled with CUDA graphs, captured whole in a CUDA graph; and the ELBO ops' share of the step. An impl that
    fails (compiling, capturing) gets its error in the row's ``errors`` and no time; the others go on. Impls are
    built in TRAIN_IMPL_ORDER; once a config has spent ``budget_s`` building them, the rest are left out (in
    ``errors``), so a slow compile cannot cost the config's row. ``on_row(rows)`` is called after each config
    (the command line saves its results there)."""
    if configs is None:
        configs = ["digits"] if quick else list(CUDA_TRAIN_CONFIGS if device.type == "cuda" else CPU_TRAIN_CONFIGS)
    if impls is None:
        impls = QUICK_TRAIN_IMPLS if quick else (CUDA_TRAIN_IMPLS if device.type == "cuda" else CPU_TRAIN_IMPLS)
    impls = [i for i in TRAIN_IMPL_ORDER if i in impls or i in ("fused", "eager")]  # the share needs both
    rows = []
    for cfg in (next(c for c in TRAIN_CONFIGS if c.name == name) for name in configs):
        started = time.perf_counter()
        try:
            base, make_loss, model_text = _trainee(cfg, device)
        except ImportError as e:
            rows.append({"name": cfg.name, "skipped": f"{type(e).__name__}: {e}"})
            print(f"train step {cfg.name}: skipped ({e})", flush=True)
            continue
        x = _train_data(cfg, device, gen)
        calls, errors = {}, {}
        torch._dynamo.reset()
        for impl in impls:
            spent = time.perf_counter() - started
            if budget_s is not None and impl not in ("fused", "eager") and spent > budget_s:
                errors[impl] = f"not run: {spent:.0f} s spent of the config's {budget_s:.0f} s budget"
                print(f"train step {cfg.name} {impl}: {errors[impl]}", file=sys.stderr, flush=True)
                continue
            try:
                call = train_step_impl(cfg, make_loss, impl, device, x.clone())
                for _ in range(3):  # compiles; CUDA graph trees warm up, record, then replay
                    call([x])
                sync(device)
                calls[impl] = call
            except Exception as e:  # noqa: BLE001 -- one failing impl must not lose the others' numbers
                errors[impl] = f"{type(e).__name__}: {str(e).strip()[:400]}"
                print(f"train step {cfg.name} {impl}: failed: {errors[impl]}", file=sys.stderr, flush=True)
        if "fused" not in calls or "eager" not in calls:
            rows.append({"name": cfg.name, "skipped": "fused or eager failed", "errors": errors})
            continue
        samples = time_interleaved(calls, [[x]], repeats, device, budget_s=4 * timing.CONFIG_BUDGET_S)
        stats = {impl: percentiles(s) for impl, s in samples.items()}
        peaks = {impl: peak_mb(lambda c=call: c([x]), device) for impl, call in calls.items()}
        if cfg.kind == "ldm":
            elbo = _posterior_ops_ms(cfg, base, x, repeats, device)
        elif cfg.kind == "mlp":
            elbo = _elbo_ops_ms(base, x, cfg, repeats, device)
        else:  # no fixed stand-in for an image model's networks: the profiler's share says it
            elbo = None
        profiled = {}
        if device.type == "cpu" and cfg.kind in VAE_KINDS:
            for impl in ("fused", "eager"):
                with (reference_ops_in_model() if impl == "eager" else contextlib.nullcontext()):
                    module = make_loss(False)
                    profiled[impl] = profiled_elbo_share(make_step(module, _adam(module)), x,
                                                         steps=3 if quick else 10)
        ms = {impl: (stats[impl][1] if impl in stats else None) for impl in TRAIN_IMPLS}
        rows.append({
            "name": cfg.name, "batch": [cfg.batch, cfg.input_dim], "latent_dim": cfg.latent, "model": model_text,
            **{f"{impl}_ms": v for impl, v in ms.items()},
            "fused_p20_ms": stats["fused"][0], "fused_p80_ms": stats["fused"][2],
            "p20_p80_ms": {impl: [stats[impl][0], stats[impl][2]] for impl in stats},
            "best_fused": _best(ms, fused=True), "best_other": _best(ms, fused=False),
            "elbo_ops_ms": elbo,
            "elbo_share": {impl: elbo[impl] / stats[impl][1] for impl in ("fused", "eager")} if elbo else None,
            "elbo_share_profiler": profiled or None,
            "peak_mb": {impl: peaks.get(impl) for impl in TRAIN_IMPLS},
            "errors": errors,
            "seconds": time.perf_counter() - started,  # compiling included
        })
        del calls
        torch._dynamo.reset()
        if on_row is not None:
            on_row(rows)
    return rows, train_step_note(quick)


def train_step_note(quick: bool) -> str:
    """What the training-step rows mean (the results' ``train_step_note``)."""
    return ("train step: fused = the model as written; eager = the same model with the maths in plain PyTorch "
            "patched into vae_fast's models (_composite.py's; for the image models VDVAE's per-layer KL, "
            "mu + exp(logvar / 2) * randn and PixelCNN++'s mixture of logistics with its (B, H, W, C, M) "
            "temporaries; the LDM config: diffusers' own posterior class); compile = "
            "torch.compile of the eager one, fused_compile = of the fused one (Inductor defaults); *_cudagraphs = "
            "the same compiled with mode='reduce-overhead' (CUDA graph trees; cudagraph_mark_step_begin() and grads "
            "set to None each step); *_graph = the whole step (forward, backward, capturable Adam) captured in one "
            "CUDA graph with static inputs and replayed. Adam (fused=True where the device has it), grads set to "
            "None each step. best_fused / best_other: the fastest fused-op impl and the fastest without the fused "
            "ops. ELBO ops = the same step with the encoder and decoder replaced by fixed tensors (one broadcast "
            "add keeps z in the graph), so what remains is the objective's ops, forward and backward, with the "
            "model code and autograd engine around them (the LDM config: the posterior's sample() and kl(), "
            "forward and backward, at the latent shape); share = that time over the whole step. Profiler share "
            "(CPU): the ops alone, from torch.profiler over 10 steps: the CPU time of the model's ELBO op calls "
            "(each in a range) and of the backward functions of the autograd nodes they made, over the steps' "
            "CPU time. Peak memory of a CUDA-graph replay is near 0: its memory is the graph's private pool."
            + (" Quick mode: fused and eager only." if quick else ""))


def _best(ms: dict, fused: bool):
    """(impl, ms) of the fastest impl with (fused=True) or without the fused ops, or None."""
    timed = [(v, impl) for impl, v in ms.items() if v is not None and (not TRAIN_IMPLS[impl][0]) == fused]
    return [min(timed)[1], min(timed)[0]] if timed else None


def _adam(model, capturable: bool = False):
    kwargs = {"capturable": True} if capturable else {}
    try:
        return torch.optim.Adam(model.parameters(), lr=1e-3, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(model.parameters(), lr=1e-3, **kwargs)


def _elbo_ops_ms(base, x, cfg: TrainConfig, repeats: int, device: torch.device) -> dict:
    """Time of the objective's ops alone (fused and eager), forward and backward, in one step's shapes."""
    model = _clone_module(base)
    with torch.no_grad():
        h = model.encoder(x)
        mu = h[..., : cfg.latent]
        z = mu.expand(cfg.num_samples, *mu.shape).reshape(-1, cfg.latent) if cfg.num_samples > 1 else mu
        out = model.decoder(z)
    model.encoder, model.decoder = _FixedEncoder(h), _FixedDecoder(out)
    model.to(device)
    loss = _VaeLoss(model, cfg)
    calls = {impl: make_step(loss, _NoOptimizer(model), lambda r=impl == "eager": _maths(cfg, r))
             for impl in ("fused", "eager")}
    samples = time_interleaved(calls, [[x]], repeats, device, budget_s=2 * timing.CONFIG_BUDGET_S)
    return {impl: percentiles(s)[1] for impl, s in samples.items()}


def _posterior_ops_ms(cfg: TrainConfig, base, x, repeats: int, device: torch.device) -> dict:
    """The LDM config's ELBO ops: the posterior's sample() and kl(), forward and backward (a random upstream
    gradient), at the encoder's moments shape, vae_fast's class ("fused") and diffusers' ("eager")."""
    with torch.no_grad():
        h = base.encoder(x)
        if getattr(base, "quant_conv", None) is not None:
            h = base.quant_conv(h)
    theirs, _ = baseline()
    case = posterior_case(h.detach(), theirs)
    sets = input_sets(case, "fwd+bwd", 1)
    grad_gen = torch.Generator(device=device).manual_seed(1)
    calls = {name: make_call(fn, case, "fwd+bwd", grad_gen) for name, fn in (("fused", case.fused),
                                                                            ("eager", case.eager))}
    samples = time_interleaved(calls, sets, repeats, device, budget_s=2 * timing.CONFIG_BUDGET_S)
    return {impl: percentiles(s)[1] for impl, s in samples.items()}


class _NoOptimizer:
    """Stands in for the optimizer where only forward and backward are timed: zero_grad, no step."""

    def __init__(self, module):
        self.module = module

    def zero_grad(self, set_to_none: bool = True):
        self.module.zero_grad(set_to_none=set_to_none)

    def step(self):
        pass


def _clone_module(module):
    import copy

    return copy.deepcopy(module)


def bench_log_likelihood(device: torch.device, quick: bool, gen: torch.Generator) -> dict:
    """Memory and time of model.log_likelihood with many samples (chunked, streaming logsumexp)."""
    try:
        from ..models import mlp_vae
    except ImportError as e:
        return {"skipped": f"vae_fast.model is not available ({e})"}
    k, batch, input_dim, latent = (200 if quick else 20000), 256, 64, 16
    torch.manual_seed(0)
    model = mlp_vae(input_dim, latent).to(device).eval()
    x = (torch.rand((batch, input_dim), generator=gen, device=device) < 0.3).float()
    model.log_likelihood(x[:2], num_samples=2)  # warm-up
    t0 = time.perf_counter()
    peak = peak_mb(lambda: model.log_likelihood(x, num_samples=k), device)  # one run, timed and profiled
    seconds = time.perf_counter() - t0
    return {
        "num_samples": k, "batch": [batch, input_dim], "latent_dim": latent, "model": "mlp_vae, bernoulli",
        "chunk_size": "default", "seconds": seconds, "peak_mb": peak,  # seconds: of the profiled run
        # What the decoder's logits alone would take if all K samples were decoded at once.
        "unchunked_logits_mb": k * batch * input_dim * 4 / 2**20,
    }
