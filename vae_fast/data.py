"""Data sets: scikit-learn's digits, MNIST from files on disk, and a synthetic linear-Gaussian ground truth.

``load(name, binarize=None)`` returns ``(train, test)`` float32 tensors, one flat example per row, with a
fixed train/test split. Binarisation for Bernoulli models:

- ``None``: the values as they are (in [0, 1] for images);
- ``"fixed"``: one Bernoulli draw of each value, the same every time (seeded);
- ``"dynamic"``: the train set stays as probabilities, to be drawn afresh for every batch with
  :func:`binarize_batch` (as in the IWAE paper); the test set gets the fixed draw, so evaluations are repeatable.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BINARIZE = (None, "fixed", "dynamic")
_FIXED_SEED = 1234  # the seed of the fixed binarisation: part of the data set's definition


def binarize_batch(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh Bernoulli draw of each value of ``x`` (probabilities in [0, 1])."""
    return torch.bernoulli(x, generator=generator)


def load(name: str = "digits", binarize: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, test)`` float32 tensors of shape ``(N, D)`` for ``"digits"``, ``"mnist:PATH"``, ``"synthetic"``."""
    if binarize not in BINARIZE:
        raise ValueError(f"binarize must be one of {BINARIZE}, got {binarize!r}")
    if name == "digits":
        train, test = _digits()
    elif name == "synthetic":
        train, test = _synthetic()
    elif name.startswith("mnist:"):
        train, test = load_mnist(name[len("mnist:") :])
    else:
        raise ValueError(f"unknown data set {name!r}: use 'digits', 'synthetic' or 'mnist:PATH'")
    if binarize is None:
        return train, test
    for split in (train, test):
        if split.numel() and (split.min() < 0 or split.max() > 1):
            raise ValueError(f"binarize={binarize!r} needs values in [0, 1]; data set {name!r} has others")
    gen = torch.Generator().manual_seed(_FIXED_SEED)
    test = binarize_batch(test, gen)
    if binarize == "fixed":
        train = binarize_batch(train, gen)
    return train, test


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().data.astype(np.float32) / 16.0)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    n_test = 297  # 1797 = 1500 train + 297 test
    return x[perm[n_test:]].contiguous(), x[perm[:n_test]].contiguous()


# ---- synthetic: x = W z + b + noise_std * e, z ~ N(0, I_q), e ~ N(0, I_D) ------------------------------------


@dataclass(frozen=True)
class LinearGaussian:
    """A linear-Gaussian (probabilistic PCA) model; its marginal is N(x; b, W W^T + noise_std^2 I)."""

    W: torch.Tensor  # (D, q), float64
    b: torch.Tensor  # (D,), float64
    noise_std: float

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(n, self.W.shape[1], generator=generator, dtype=torch.float64)
        e = torch.randn(n, self.W.shape[0], generator=generator, dtype=torch.float64)
        return z @ self.W.T + self.b + self.noise_std * e

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) per row, in float64."""
        return marginal_log_prob(x, self.W, self.b, self.noise_std**2)


def marginal_log_prob(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, noise_var) -> torch.Tensor:
    """log N(x; b, W W^T + noise_var I) per row, in float64."""
    W, b = W.double(), b.double()
    cov = W @ W.T + torch.as_tensor(noise_var, dtype=torch.float64) * torch.eye(W.shape[0], dtype=torch.float64)
    return torch.distributions.MultivariateNormal(b, covariance_matrix=cov).log_prob(x.double())


def synthetic_model() -> LinearGaussian:
    """The model that ``load("synthetic")`` draws from (D = 8 observed, q = 2 latent dimensions)."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(8, 2, generator=gen, dtype=torch.float64)
    b = 0.5 * torch.randn(8, generator=gen, dtype=torch.float64)
    return LinearGaussian(W, b, noise_std=0.5)


def _synthetic() -> tuple[torch.Tensor, torch.Tensor]:
    model = synthetic_model()
    gen = torch.Generator().manual_seed(1)
    return model.sample(4000, gen).float(), model.sample(1000, gen).float()


# ---- MNIST from files on disk ------------------------------------------------------------------------------

_IDX_NAMES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}


def load_mnist(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST images scaled to [0, 1], flattened to ``(N, H * W)``.

    ``path`` is a ``.npz`` file with ``x_train`` and ``x_test`` (as Keras' ``mnist.npz``), or a folder with
    ``train-images-idx3-ubyte`` and ``t10k-images-idx3-ubyte`` (each optionally ``.gz``) or ``mnist.npz``.
    """
    path = Path(path)
    if path.is_file():
        return _load_npz(path)
    if not path.is_dir():
        raise FileNotFoundError(f"MNIST path {str(path)!r} does not exist")
    splits = []
    for split, stem in _IDX_NAMES.items():
        found = [path / (stem + ext) for ext in ("", ".gz") if (path / (stem + ext)).is_file()]
        if not found:
            if (path / "mnist.npz").is_file():
                return _load_npz(path / "mnist.npz")
            raise FileNotFoundError(f"MNIST {split} images not found: no {path / stem}[.gz] (or mnist.npz) in {path}")
        splits.append(_scale(read_idx(found[0])))
    return splits[0], splits[1]


def _scale(images: np.ndarray) -> torch.Tensor:
    images = images.reshape(images.shape[0], -1)
    return torch.from_numpy(images.astype(np.float32) / 255.0)


def _load_npz(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # else numpy would try to unpickle it, and say so
            raise ValueError(f"malformed MNIST file {path}: not an .npz (zip) archive")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in ("x_train", "x_test") if k in f.files}
            names = sorted(f.files)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:  # a truncated archive, or object arrays
        raise ValueError(f"malformed MNIST file {path}: {type(e).__name__}: {e}") from None
    missing = [k for k in ("x_train", "x_test") if k not in arrays]
    if missing:
        raise ValueError(f"malformed MNIST file {path}: no {' or '.join(missing)} (has {names})")
    x_train, x_test = arrays["x_train"], arrays["x_test"]
    for arr in (x_train, x_test):
        if arr.ndim < 2 or arr.dtype != np.uint8:
            raise ValueError(f"malformed MNIST file {path}: expected uint8 images, got {arr.dtype} {arr.shape}")
    return _scale(x_train), _scale(x_test)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file of unsigned bytes (``.gz`` read transparently) as a uint8 array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # a truncated, corrupt or non-gzip .gz
        raise ValueError(f"malformed IDX file {path}: {e}") from None
    except OSError as e:  # the file itself (permissions, a folder, ...): no errno numbers for the user
        raise OSError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"malformed IDX file {path}: bad magic number")
    if data[2] != 0x08:
        raise ValueError(f"malformed IDX file {path}: element type 0x{data[2]:02x}, expected 0x08 (unsigned byte)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise ValueError(f"malformed IDX file {path}: truncated header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + math.prod(dims)
    if len(data) != expected:
        raise ValueError(f"malformed IDX file {path}: dims {dims} need {expected} bytes, file has {len(data)}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
