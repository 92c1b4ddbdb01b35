"""Argument checks shared by the ops' Python wrappers (functional, nll, dmol) and their fake kernels: what only
Python can check (non-tensor arguments, dense layouts, seeds under torch.compile) before the C++ op checks
the rest (csrc: the glue's argument checks).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _C  # noqa: F401  (loads the library: registers torch.ops.vae_fast.*)

OPS = torch.ops.vae_fast
SEED_HIGH = 2**62
_STRIDED = torch.strided


def not_dense(t: torch.Tensor) -> bool:
    """True for what the ops have no kernel for, which the dispatcher would refuse with "Could not run ...
    backend" (or worse): sparse, mkldnn and jagged layouts, and strided-layout nested and quantized tensors.
    Three attribute reads: this runs on every call."""
    return t.layout is not _STRIDED or t.is_nested or t.is_quantized


def _kind(t: torch.Tensor) -> str:
    if t.is_nested:
        return f"a nested tensor (layout {t.layout})"
    if t.is_quantized:
        return f"a quantized tensor ({t.dtype})"
    return f"layout {t.layout}"


def dense_error(what: str, t: torch.Tensor) -> TypeError:
    return TypeError(f"{what} must be a dense tensor (layout torch.strided, not nested or quantized), got {_kind(t)}")


def require_tensor(fn: str, **tensors) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"vae_fast.{fn}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
        if t.layout is not _STRIDED or t.is_nested or t.is_quantized:  # not_dense, inlined (every call)
            raise dense_error(f"vae_fast.{fn}: `{name}`", t)


def require_int(fn: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"vae_fast.{fn}: {name} must be an int, got {type(value).__name__}")


def seed_args(fn: str, seed, generator, like: torch.Tensor):
    """(seed tensor or None, seed value or None) for the sampling op.

    Neither given: eager CPU calls leave the draw to C++ (torch's CPU generator, no extra op); under
    torch.compile, and on CUDA, the seed is a device tensor from the opaque op `draw_seed` (the same
    C++ draw; torch.randint on CUDA), so compiled code draws what eager code draws, no two calls
    share a seed (the op is tagged nondeterministic_seeded), and CUDA graphs replay fresh draws (the
    seed is drawn and read on the device).
    """
    device = like.device
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"vae_fast.{fn}: generator must be a torch.Generator, got {type(generator).__name__}")
        if seed is not None:
            raise ValueError(f"vae_fast.{fn}: give seed= or generator=, not both")
        drawn = torch.randint(0, SEED_HIGH, (1,), dtype=torch.int64, device=generator.device, generator=generator)
        return drawn.to(device), None
    if seed is None:
        if device.type == "cpu" and not torch.compiler.is_compiling():
            return None, None  # drawn in C++, no extra op
        # a fresh empty tensor per call: graph CSE never merges two draws (it never merges aten.empty)
        return OPS.draw_seed(torch.empty(0, device=device)), None
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise TypeError(f"vae_fast.{fn}: seed must be an int or a 1-element int64 tensor, got {seed.dtype} of "
                            f"shape {tuple(seed.shape)}")
        if seed.is_meta and device.type != "meta":  # no value to copy: torch would say "Cannot copy out of meta"
            raise ValueError(f"vae_fast.{fn}: seed is a meta tensor (it holds no value) but the samples are drawn on "
                             f"{device}: give seed on {device} or as an int")
        return seed.reshape(1).to(device), None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"vae_fast.{fn}: seed must be an int or a 1-element int64 tensor, got {type(seed).__name__}")
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"vae_fast.{fn}: seed must fit in 64 bits, got {seed}")
    return None, seed - 2**64 if seed >= 2**63 else seed  # passed by value: no host-to-device copy


def clamp_arg(fn: str, name: str, clamp) -> Optional[list]:
    """None, or ``[low, high]`` as floats for the op's ``float[]?`` argument (the op checks low <= high)."""
    if clamp is None:
        return None
    if (not isinstance(clamp, (tuple, list)) or len(clamp) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in clamp)):
        raise TypeError(f"vae_fast.{fn}: {name} must be None or a pair of numbers (low, high), got {clamp!r}")
    return [float(clamp[0]), float(clamp[1])]


def num_samples_arg(fn: str, num_samples) -> int:
    if num_samples is None:
        return 1
    if isinstance(num_samples, bool) or not isinstance(num_samples, int):
        raise TypeError(f"vae_fast.{fn}: num_samples must be an int or None, got {type(num_samples).__name__}")
    if not 1 <= num_samples < 2**62:
        raise ValueError(f"vae_fast.{fn}: num_samples must be in [1, 2**62), got {num_samples}")
    return num_samples


def static_shapes(*tensors) -> bool:
    return all(isinstance(s, int) for t in tensors if t is not None for s in (*t.shape, *t.stride()))


def schema_args(name: str, args, kwargs) -> list:
    """A call's arguments in the order of op `name`'s schema, defaults filled in (a caller may leave them out)."""
    schema = getattr(OPS, name).default._schema
    return [*args, *(kwargs.get(a.name, a.default_value) for a in schema.arguments[len(args):])]
