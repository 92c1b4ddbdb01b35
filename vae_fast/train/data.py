"""Data sets: scikit-learn's digits, image sets by name, MNIST from a path, and a synthetic linear-Gaussian
ground truth.

``load(name, binarize=None, data_dir=None)`` returns ``(train, test)`` float32 tensors with a fixed train/test
split: ``digits``, ``synthetic`` and ``mnist:PATH`` one flat example per row ``(N, D)``; the image sets by name
(:data:`IMAGE_SETS`: ``mnist``, ``fashion-mnist``, ``cifar10``, ``patches``) as ``(N, C, H, W)`` images.

Images, one convention: :func:`load_images` gives the 8-bit data in their canonical form, uint8 levels 0..255
``(N, C, H, W)``; :func:`from_levels` is the one conversion to the range a likelihood reads (``"unit"``: k / 255
in [0, 1], what ``load`` returns, for Bernoulli and Gaussian models; ``"signed"``: k / 127.5 - 1 in [-1, 1], the
discretized-logistic convention), :func:`to_range` the same from [0, 1] data, and :func:`dequantize` spreads each
level uniformly over its bin (of width 1/256 on [0, 1]) for a continuous density. MNIST, Fashion-MNIST and
CIFAR-10 are read from their published files in ``data_dir`` (default ``~/.cache/vae_fast/NAME``), downloaded
there by torchvision when it is installed and they are missing; ``patches`` needs no download (32x32 crops of the
two photographs scikit-learn ships). Binarisation for Bernoulli models:

- ``None``: the values as they are (in [0, 1] for images);
- ``"fixed"``: one Bernoulli draw of each value, the same every time (seeded);
- ``"dynamic"``: the train set stays as probabilities, to be drawn afresh for every batch with
  :func:`binarize_batch` (as in the IWAE paper); the test set gets the fixed draw, so evaluations are repeatable.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..models.likelihoods import DATA_RANGES
from .messages import flag

BINARIZE = (None, "fixed", "dynamic")
_FIXED_SEED = 1234  # the seed of the fixed binarisation: part of the data set's definition
_DEQUANTIZE_SEED = 4321  # the seed of the test set's fixed dequantisation
IMAGE_SETS = ("mnist", "fashion-mnist", "cifar10", "patches")  # (N, C, H, W), 8-bit
NAMES = ("digits", "synthetic", *IMAGE_SETS)  # and "mnist:PATH"


def binarize_batch(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh Bernoulli draw of each value of ``x`` (probabilities in [0, 1])."""
    return torch.bernoulli(x, generator=generator)


def load(name: str = "digits", binarize: str | None = None, data_dir: str | os.PathLike | None = None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, test)`` float32 tensors: ``(N, D)`` for ``"digits"``, ``"mnist:PATH"``, ``"synthetic"``; images
    ``(N, C, H, W)`` in [0, 1] (k / 255) for the sets in :data:`IMAGE_SETS`, from ``data_dir`` (see
    :func:`load_images`)."""
    if binarize not in BINARIZE:
        raise ValueError(f"binarize must be one of {BINARIZE}, got {binarize!r}")
    if not isinstance(name, str):
        raise ValueError(f"data set must be a name, got {name!r}")
    if name == "digits":
        train, test = _digits()
    elif name == "synthetic":
        train, test = _synthetic()
    elif name.startswith("mnist:"):
        train, test = load_mnist(name[len("mnist:") :])
    elif name in IMAGE_SETS:
        train, test = (from_levels(t) for t in load_images(name, data_dir))
    else:
        raise ValueError(f"unknown data set {name!r}: use {', '.join(map(repr, NAMES))} or 'mnist:PATH'")
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


def levels(name: str) -> int | None:
    """How many values a dimension of data set ``name`` takes when quantised, as its files store it: 256 for the
    8-bit image sets (and ``mnist:PATH``), None for the others (digits' 17 grey levels are not 8-bit data)."""
    return 256 if name in IMAGE_SETS or (isinstance(name, str) and name.startswith("mnist:")) else None


def as_images(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x`` as ``(N, C, H, W)`` images (a view): image sets are so already; flat rows of square grey images
    (digits' 8x8, MNIST's 28x28 from ``mnist:PATH``) become ``(N, 1, side, side)``. ValueError otherwise."""
    if x.dim() == 4:
        return x
    side = math.isqrt(x.shape[1]) if x.dim() == 2 else 0
    if x.dim() == 2 and name != "synthetic" and side > 1 and side * side == x.shape[1]:
        return x.view(x.shape[0], 1, side, side)
    raise ValueError(f"data set {name!r} is not images (examples of shape {tuple(x.shape[1:])}): a convolutional "
                     "model needs (C, H, W) images")


# ---- one convention for 8-bit images --------------------------------------------------------------------------


def from_levels(x: torch.Tensor, data_range: str = "unit") -> torch.Tensor:
    """8-bit levels (uint8, 0..255) as float32 in ``data_range``: ``"unit"`` k / 255 in [0, 1]; ``"signed"``
    k / 127.5 - 1 in [-1, 1]. The one conversion from the canonical form."""
    low, high = _range(data_range)
    if x.dtype != torch.uint8:
        raise ValueError(f"from_levels expects uint8 levels, got {x.dtype}")
    return (x.float() / (255.0 / (high - low)) + low).contiguous()  # k / 255 or k / 127.5 - 1, correctly rounded


def to_range(x: torch.Tensor, data_range: str) -> torch.Tensor:
    """Data in [0, 1] (what :func:`load` returns) mapped linearly to ``data_range`` (the same tensor for
    ``"unit"``)."""
    low, high = _range(data_range)
    return x if (low, high) == (0.0, 1.0) else x * (high - low) + low


def dequantize(x: torch.Tensor, generator: torch.Generator | None = None, levels: int = 256,
               data_range: str = "unit") -> torch.Tensor:
    """Uniform dequantisation: each of the ``levels`` values of ``x`` in ``data_range`` (on [0, 1]: k / (levels -
    1)) moved to a uniform draw in its bin, low + width * (k + u) / levels with u ~ U[0, 1) (on [0, 1]:
    (k + u) / 256 for 8-bit data). A continuous density of such data bounds the probability of the level
    (Theis et al. 2016); see ``likelihoods.bits_per_dim``. (u is capped at 1 - 2^-16, so that k + u rounds
    below k + 1 in float32 too: every value stays inside its own bin.)"""
    low, high = _range(data_range)
    k = torch.round((x - low) * ((levels - 1) / (high - low)))
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype).clamp_max_(1 - 2**-16)
    return low + (k + u) * ((high - low) / levels)


def fixed_dequantize(x: torch.Tensor, levels: int = 256, data_range: str = "unit") -> torch.Tensor:
    """:func:`dequantize` with a fixed seed: the same test set every time (as the fixed binarisation)."""
    return dequantize(x, torch.Generator(device=x.device).manual_seed(_DEQUANTIZE_SEED), levels, data_range)


def _range(data_range: str) -> tuple[float, float]:
    if data_range not in DATA_RANGES:
        raise ValueError(f"data_range must be one of {tuple(DATA_RANGES)}, got {data_range!r}")
    return DATA_RANGES[data_range]


# ---- image sets by name ---------------------------------------------------------------------------------------


def default_data_dir(name: str) -> Path:
    """Where ``load_images(name)`` looks by default: ``$XDG_CACHE_HOME/vae_fast/NAME`` (``~/.cache/vae_fast/NAME``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vae_fast" / name


def load_images(name: str, data_dir: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, test)`` uint8 levels ``(N, C, H, W)`` of an image set in :data:`IMAGE_SETS`: the canonical form.

    - ``mnist``, ``fashion-mnist``: the IDX files ``train-images-idx3-ubyte`` and ``t10k-images-idx3-ubyte``
      (each optionally ``.gz``) in ``data_dir`` or in torchvision's layout below it (``MNIST/raw``,
      ``FashionMNIST/raw``); 60000 + 10000 images 1x28x28.
    - ``cifar10``: the python batches ``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` in
      ``data_dir/cifar-10-batches-py`` (or ``data_dir`` itself); 50000 + 10000 images 3x32x32. Read with an
      unpickler that builds numpy arrays and nothing else.
    - ``patches``: 32x32 RGB crops of the two photographs scikit-learn ships (china.jpg, flower.jpg, 427x640):
      the left 480 columns of each give the train set (crops every 8 pixels: 5700), the right 160 the test
      set (every 16 pixels: 450); no file, ``data_dir`` unused.

    ``data_dir`` defaults to :func:`default_data_dir`. Files that are missing are downloaded there by
    torchvision (``download=True``) when it is installed; otherwise FileNotFoundError names the folder and the
    files to put there.
    """
    if name not in IMAGE_SETS:
        raise ValueError(f"unknown image set {name!r}: use one of {', '.join(map(repr, IMAGE_SETS))}")
    if name == "patches":
        return _patches()
    folder = Path(data_dir).expanduser() if data_dir is not None else default_data_dir(name)
    find, files = (_find_cifar, "data_batch_1 .. data_batch_5 and test_batch (the python version, in "
                                "cifar-10-batches-py/)") if name == "cifar10" else (
        lambda f: _find_idx(f, name), "train-images-idx3-ubyte.gz and t10k-images-idx3-ubyte.gz")
    found = find(folder)
    if found is None:
        why = _download(name, folder)
        found = find(folder)
        if found is None:
            raise FileNotFoundError(f"{name}: its files are not in {folder}: put {files} there, or point "
                                    f"{_data_dir_flag()} at the folder that holds them ({why})")
    if name == "cifar10":
        train = np.concatenate([_read_cifar_batch(p) for p in found[:-1]])
        return torch.from_numpy(train), torch.from_numpy(_read_cifar_batch(found[-1]))
    return tuple(torch.from_numpy(_idx_images(read_idx(p), p)) for p in found)


def _data_dir_flag() -> str:
    return flag("data_dir")


_TORCHVISION = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10"}


def _download(name: str, folder: Path) -> str:
    """Download ``name`` into ``folder`` with torchvision; why it did not, in a few words, if it did not."""
    try:
        import torchvision.datasets as tvd
    except ImportError:
        return "torchvision, which would download them, is not installed"
    try:
        for train in (True, False):
            getattr(tvd, _TORCHVISION[name])(root=str(folder), train=train, download=True)
    except Exception as e:  # no network, a proxy, a full disk: say so in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"torchvision could not download them: {type(e).__name__}{': ' + first if first else ''}"
    return "torchvision's download left no such files there"


def _find_idx(folder: Path, name: str) -> list[Path] | None:
    raw = folder / _TORCHVISION[name] / "raw"  # torchvision's layout
    for where in (folder, raw):
        found = [next((where / (stem + ext) for ext in ("", ".gz") if (where / (stem + ext)).is_file()), None)
                 for stem in _IDX_NAMES.values()]
        if all(found):
            return found
    return None


def _idx_images(images: np.ndarray, path: Path) -> np.ndarray:
    if images.ndim != 3:
        raise ValueError(f"malformed image file {path}: expected (N, H, W) images, got dims {images.shape}")
    return images[:, None].copy()  # (a writable array: torch refuses to share a read-only buffer)


_CIFAR_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def _find_cifar(folder: Path) -> list[Path] | None:
    for where in (folder / "cifar-10-batches-py", folder):
        if all((where / b).is_file() for b in _CIFAR_BATCHES):
            return [where / b for b in _CIFAR_BATCHES]
    return None


class _ArrayUnpickler(pickle.Unpickler):
    """Builds dicts, lists, strings and numpy arrays; refuses any other global (a pickle can run code)."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refused to load the global {module}.{name}")
        if module == "numpy.core.multiarray":  # numpy 2 moved it (and warns on the old name)
            module = "numpy._core.multiarray" if importlib.util.find_spec("numpy._core") else module
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> np.ndarray:
    """One CIFAR-10 python batch: a pickled dict whose ``data`` is uint8 ``(N, 3072)``, each row the red, green
    and blue 32x32 planes; returned as ``(N, 3, 32, 32)``."""
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="latin1").load()  # Python 2 pickles (as torchvision reads them)
    except OSError as e:
        raise OSError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # a truncated or foreign file: pickle raises many kinds
        raise ValueError(f"malformed CIFAR-10 batch {path}: {type(e).__name__}: {e}") from None
    images = batch.get("data", batch.get(b"data")) if isinstance(batch, dict) else None
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3072:
        what = (f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray)
                else "no 'data' array" if isinstance(batch, dict) else type(batch).__name__)
        raise ValueError(f"malformed CIFAR-10 batch {path}: expected 'data' of uint8 (N, 3072), got {what}")
    return images.reshape(-1, 3, 32, 32)


# ---- patches: 32x32 crops of scikit-learn's two sample photographs ---------------------------------------------

PATCH_SIZE = 32
PATCH_TEST_WIDTH = 160  # the right 160 of 640 columns of each photograph: the test set's region
PATCH_STRIDES = (8, 16)  # crops every 8 pixels in the train region, every 16 in the test region


def _sample_images() -> list[np.ndarray]:
    """china.jpg and flower.jpg as uint8 (427, 640, 3), read with Pillow from scikit-learn's folder (without
    importing sklearn.datasets, which takes seconds); through ``load_sample_images`` if they are not there."""
    spec = importlib.util.find_spec("sklearn")
    folder = Path(spec.submodule_search_locations[0]) / "datasets" / "images" if spec else None
    names = ("china.jpg", "flower.jpg")
    if folder is not None and all((folder / n).is_file() for n in names):
        from PIL import Image

        images = []
        for n in names:
            with Image.open(folder / n) as im:
                images.append(np.asarray(im.convert("RGB")))
        return images
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().images)


def _crops(image: np.ndarray, stride: int) -> np.ndarray:
    """Every PATCH_SIZE x PATCH_SIZE crop of ``image`` (H, W, 3) at multiples of ``stride``, row by row, as
    ``(N, 3, PATCH_SIZE, PATCH_SIZE)``."""
    p = PATCH_SIZE
    h, w, _ = image.shape
    crops = [image[r : r + p, c : c + p] for r in range(0, h - p + 1, stride) for c in range(0, w - p + 1, stride)]
    return np.stack(crops).transpose(0, 3, 1, 2)


def _patches() -> tuple[torch.Tensor, torch.Tensor]:
    train, test = [], []
    for image in _sample_images():
        split = image.shape[1] - PATCH_TEST_WIDTH  # disjoint regions: no test pixel is in a train patch
        train.append(_crops(image[:, :split], PATCH_STRIDES[0]))
        test.append(_crops(image[:, split:], PATCH_STRIDES[1]))
    return torch.from_numpy(np.concatenate(train)), torch.from_numpy(np.concatenate(test))
