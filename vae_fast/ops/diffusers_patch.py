"""One call that makes diffusers' image autoencoders use the fused posterior (in the style of Liger-Kernel's
``apply_liger_kernel_to_*``)::

    import vae_fast as vf
    vf.patch_diffusers()     # AutoencoderKL & co. now build vf.DiagonalGaussianDistribution posteriors
    ...                      # train or encode as before
    vf.unpatch_diffusers()   # back to diffusers' own class

The patch rebinds the name ``DiagonalGaussianDistribution`` in the modules of the image autoencoders, whose
posteriors are 4-D ``(B, 2C, H, W)``: AutoencoderKL (Stable Diffusion 1-3, SDXL, Flux), AsymmetricAutoencoderKL
and AutoencoderKLTemporalDecoder. The video autoencoders are left alone: their 5-D posteriors' ``kl()`` sums
dims 1-3 only in diffusers, where vae_fast's sums every dim but the batch's. The class put in is a subclass of
both vae_fast's and diffusers' class, so ``isinstance`` checks against either keep passing.
"""

from __future__ import annotations

import importlib
from typing import Iterable, Optional

from .distributions import DiagonalGaussianDistribution as _FusedPosterior

IMAGE_AUTOENCODER_MODULES = (
    "diffusers.models.autoencoders.autoencoder_kl",
    "diffusers.models.autoencoders.autoencoder_asym_kl",
    "diffusers.models.autoencoders.autoencoder_kl_temporal_decoder",
)
_NAME = "DiagonalGaussianDistribution"
_originals: dict[str, type] = {}  # module name -> the class it held before patch_diffusers
_fused_classes: dict[type, type] = {}  # diffusers' class -> its fused subclass


def _fused_class(stock: type) -> type:
    if stock not in _fused_classes:
        class DiagonalGaussianDistribution(_FusedPosterior, stock):
            """diffusers' posterior computed by vae_fast's fused ops (installed by ``vae_fast.patch_diffusers``)."""

            def __init__(self, parameters, deterministic: bool = False):
                _FusedPosterior.__init__(self, parameters, deterministic)  # dim 1, logvar clamped to [-30, 20]

        DiagonalGaussianDistribution.__module__ = __name__
        DiagonalGaussianDistribution.__qualname__ = _NAME
        _fused_classes[stock] = DiagonalGaussianDistribution
    return _fused_classes[stock]


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"vae_fast.patch_diffusers: cannot import {name} ({e}); install diffusers "
                          "(pip install diffusers)") from e


def patch_diffusers(modules: Optional[Iterable[str]] = None) -> list[str]:
    """Makes the autoencoders in ``modules`` (default: ``IMAGE_AUTOENCODER_MODULES``) build fused posteriors.
    Returns the names of the modules patched. Calling it again is harmless."""
    stock = _import("diffusers.models.autoencoders.vae").DiagonalGaussianDistribution
    fused = _fused_class(stock)
    patched = []
    for name in IMAGE_AUTOENCODER_MODULES if modules is None else tuple(modules):
        module = _import(name)
        current = getattr(module, _NAME, None)
        if current is None:
            raise ValueError(f"vae_fast.patch_diffusers: {name} has no {_NAME} to replace")
        if current is not fused:
            _originals.setdefault(name, current)
            setattr(module, _NAME, fused)
        patched.append(name)
    return patched


def unpatch_diffusers() -> list[str]:
    """Puts diffusers' own posterior class back wherever ``patch_diffusers`` replaced it; returns those modules."""
    restored = []
    for name, original in list(_originals.items()):
        setattr(importlib.import_module(name), _NAME, original)
        del _originals[name]
        restored.append(name)
    return restored
