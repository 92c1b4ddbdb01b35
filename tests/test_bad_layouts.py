"""Tensors the ops have no kernel for (sparse, nested, mkldnn, quantized) get a TypeError naming the argument and
what it is, raised by the Python wrappers before anything runs (not the dispatcher's NotImplementedError "Could not
run ... backend", nor a crash)."""

from __future__ import annotations

import types
import warnings

import pytest
import torch

import vae_fast as vf
from vae_fast.ops.distributions import DiagonalGaussianDistribution


def _bad_tensors():
    """(id, builder, what the message says) for each kind; a builder gets a dense (4, 6) float32 tensor."""
    kinds = [
        ("sparse_coo", lambda d: d.to_sparse(), "torch.sparse_coo"),
        ("sparse_csr", lambda d: d.to_sparse_csr(), "torch.sparse_csr"),
        ("sparse_csc", lambda d: d.to_sparse_csc(), "torch.sparse_csc"),
        ("sparse_bsr", lambda d: d.to_sparse_bsr((2, 2)), "torch.sparse_bsr"),
        ("nested", lambda d: torch.nested.nested_tensor(list(d.unbind())), "nested"),
        ("nested_jagged", lambda d: torch.nested.nested_tensor([d[0], d[1, :4]], layout=torch.jagged), "nested"),
        ("quantized", lambda d: torch.quantize_per_tensor(d, 0.1, 0, torch.qint8), "quantized"),
    ]
    if torch.backends.mkldnn.is_available():
        kinds.append(("mkldnn", lambda d: d.to_mkldnn(), "torch._mkldnn"))
    return kinds


BAD = _bad_tensors()

# op -> (call taking the arguments by name, argument names)
OPS = {
    "gaussian_kl": (lambda a: vf.gaussian_kl(**a), ("mu", "logvar", "prior_mu", "prior_logvar")),
    "gaussian_log_prob": (lambda a: vf.gaussian_log_prob(**a), ("x", "mean", "logvar")),
    "bernoulli_log_prob": (lambda a: vf.bernoulli_log_prob(**a), ("x", "logits")),
    "reparameterize": (lambda a: vf.reparameterize(a["mu"], a["logvar"], return_log_q=True, generator=a["g"]),
                       ("mu", "logvar")),
    "reparameterize_with_kl": (lambda a: vf.reparameterize_with_kl(a["mu"], a["logvar"], generator=a["g"]),
                               ("mu", "logvar")),
    "gaussian_nll_loss": (lambda a: vf.gaussian_nll_loss(**a), ("input", "target", "var")),
}
CASES = [(op, name) for op, (_, names) in OPS.items() for name in names]


def _build(builder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested and sparse-compressed constructors warn that they are prototypes
        return builder(torch.rand(4, 6) + 0.5)


@pytest.mark.parametrize("kind, builder, says", BAD, ids=[k for k, _, _ in BAD])
@pytest.mark.parametrize("op, name", CASES, ids=[f"{op}-{name}" for op, name in CASES])
def test_every_op_refuses_it_naming_the_argument(op, name, kind, builder, says):
    call, names = OPS[op]
    args = {n: torch.rand(4, 6) + 0.5 for n in names}
    args[name] = _build(builder)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    if op.startswith("reparameterize"):
        args["g"] = g
    with pytest.raises(TypeError, match=rf"vae_fast\.{op}: `{name}` must be a dense tensor.*{says}"):
        call(args)
    assert torch.equal(g.get_state(), state)  # refused before the seed was drawn


@pytest.mark.parametrize("kind, builder, says", BAD, ids=[k for k, _, _ in BAD])
def test_distribution_refuses_it_naming_the_argument(kind, builder, says):
    bad = _build(builder)
    with pytest.raises(TypeError, match=rf"`parameters` must be a dense tensor.*{says}"):
        DiagonalGaussianDistribution(bad)
    d = DiagonalGaussianDistribution(torch.randn(4, 6))
    with pytest.raises(TypeError, match=rf"nll: `sample` must be a dense tensor.*{says}"):
        d.nll(bad)
    other = types.SimpleNamespace(mean=bad, logvar=torch.zeros(4, 3))  # another class's posterior
    with pytest.raises(TypeError, match=rf"`prior_mu` must be a dense tensor.*{says}"):
        d.kl(other)


def test_dense_tensors_of_every_kind_still_pass():
    """The check lets through what the ops take: views, non-contiguous and 0-stride tensors, Parameters."""
    base = torch.randn(6, 8)
    for t in (base.t(), base[:, ::2], torch.zeros(()).expand(6, 8), torch.nn.Parameter(base.clone())):
        vf.gaussian_kl(t, t)
        vf.gaussian_nll_loss(t, t, t.detach().abs() + 0.1)
