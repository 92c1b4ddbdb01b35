"""Data sets: digits, the synthetic ground truth, the MNIST loaders (on small files written here), binarisation."""

from __future__ import annotations

import gzip
import math
import struct

import numpy as np
import pytest
import torch

from vae_fast.train import data


def test_digits_is_a_fixed_split_in_unit_range():
    train, test = data.load("digits")
    assert train.shape == (1500, 64) and test.shape == (297, 64)
    assert train.dtype == test.dtype == torch.float32
    assert train.min() == 0 and train.max() == 1
    train2, test2 = data.load("digits")
    assert torch.equal(train, train2) and torch.equal(test, test2)
    from sklearn.datasets import load_digits

    everything = torch.from_numpy(load_digits().data.astype(np.float32) / 16)
    key = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert key(torch.cat([train, test])) == key(everything)  # a partition of the data set


def test_binarisation_modes():
    grey_train, grey_test = data.load("digits")
    fixed_train, fixed_test = data.load("digits", binarize="fixed")
    dyn_train, dyn_test = data.load("digits", binarize="dynamic")
    for t in (fixed_train, fixed_test, dyn_test):
        assert set(t.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(dyn_train, grey_train)  # drawn per batch by the trainer
    assert torch.equal(dyn_test, fixed_test)  # evaluation is repeatable
    assert torch.equal(fixed_train, data.load("digits", binarize="fixed")[0])
    # A draw follows the grey levels: pixels at 1 stay 1, at 0 stay 0, the mean matches.
    assert (fixed_train[grey_train == 1] == 1).all() and (fixed_train[grey_train == 0] == 0).all()
    assert abs(fixed_train.mean() - grey_train.mean()) < 0.01
    # Dynamic: a fresh draw per call.
    gen = torch.Generator().manual_seed(0)
    a, b = data.binarize_batch(grey_train, gen), data.binarize_batch(grey_train, gen)
    assert not torch.equal(a, b) and abs(a.mean() - b.mean()) < 0.01
    with pytest.raises(ValueError, match="binarize"):
        data.load("digits", binarize="yes")
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        data.load("synthetic", binarize="fixed")


def test_synthetic_exposes_its_exact_model():
    model = data.synthetic_model()
    train, test = data.load("synthetic")
    d, q = model.W.shape
    assert train.shape == (4000, d) and test.shape == (1000, d) and q < d
    # The data follow the stated model: sample moments match b and W W^T + s^2 I.
    cov = model.W @ model.W.T + model.noise_std**2 * torch.eye(d, dtype=torch.float64)
    x = torch.cat([train, test]).double()
    assert (x.mean(0) - model.b).abs().max() < 4 * cov.diagonal().sqrt().max() / math.sqrt(len(x))
    assert (torch.cov(x.T) - cov).abs().max() < 0.1 * cov.abs().max()
    # log_prob is the Gaussian density, checked against a hand-written one.
    diff = test[:5].double() - model.b
    expected = -0.5 * (d * math.log(2 * math.pi) + torch.logdet(cov)
                       + (diff @ torch.linalg.inv(cov) * diff).sum(1))
    torch.testing.assert_close(model.log_prob(test[:5]), expected)
    # And it is the best model of its own data: another W does worse.
    assert model.log_prob(test).mean() > data.marginal_log_prob(test, 1.2 * model.W, model.b, 0.25).mean()


def test_unknown_data_set():
    with pytest.raises(ValueError, match="unknown data set 'cifar'"):
        data.load("cifar")


# ---- MNIST ------------------------------------------------------------------------------------------------------


def _images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 5, 4), dtype=np.uint8)


def _idx_bytes(images: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, images.ndim]) + struct.pack(f">{images.ndim}I", *images.shape) + images.tobytes()


def _write_idx(folder, train, test, gz):
    for stem, images in (("train-images-idx3-ubyte", train), ("t10k-images-idx3-ubyte", test)):
        if gz:
            with gzip.open(folder / (stem + ".gz"), "wb") as f:
                f.write(_idx_bytes(images))
        else:
            (folder / stem).write_bytes(_idx_bytes(images))


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(tmp_path, gz):
    train_imgs, test_imgs = _images(7, 0), _images(3, 1)
    _write_idx(tmp_path, train_imgs, test_imgs, gz)
    train, test = data.load(f"mnist:{tmp_path}")
    assert train.shape == (7, 20) and test.shape == (3, 20) and train.dtype == torch.float32
    torch.testing.assert_close(train, torch.from_numpy(train_imgs.reshape(7, 20) / 255.0).float())
    torch.testing.assert_close(test, torch.from_numpy(test_imgs.reshape(3, 20) / 255.0).float())
    fixed, _ = data.load(f"mnist:{tmp_path}", binarize="fixed")
    assert set(fixed.unique().tolist()) <= {0.0, 1.0}


def test_mnist_npz_file_and_folder(tmp_path):
    train_imgs, test_imgs = _images(6, 2), _images(2, 3)
    np.savez(tmp_path / "mnist.npz", x_train=train_imgs, y_train=np.zeros(6), x_test=test_imgs, y_test=np.zeros(2))
    for spec in (tmp_path / "mnist.npz", tmp_path):
        train, test = data.load(f"mnist:{spec}")
        torch.testing.assert_close(train, torch.from_numpy(train_imgs.reshape(6, 20) / 255.0).float())
        torch.testing.assert_close(test, torch.from_numpy(test_imgs.reshape(2, 20) / 255.0).float())


def test_mnist_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load(f"mnist:{tmp_path / 'nowhere'}")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        data.load(f"mnist:{tmp_path}")
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(_images(2, 0)))
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        data.load(f"mnist:{tmp_path}")

    good = _idx_bytes(_images(4, 0))
    cases = {
        "truncated": (good[:-3], "need 96 bytes, file has 93"),
        "magic": (b"\x01\x02" + good[2:], "bad magic"),
        "dtype": (good[:2] + b"\x0d" + good[3:], "element type 0x0d"),
        "header": (good[:6], "truncated header"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}" / "t10k-images-idx3-ubyte"
        path.parent.mkdir()
        path.write_bytes(content)
        (path.parent / "train-images-idx3-ubyte").write_bytes(good)
        with pytest.raises(ValueError, match=f"malformed IDX file .*t10k-images-idx3-ubyte.*{message}"):
            data.load(f"mnist:{path.parent}")

    bad_gz = tmp_path / "gz"
    bad_gz.mkdir()
    (bad_gz / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="malformed IDX file .*train-images-idx3-ubyte.gz"):
        data.load(f"mnist:{bad_gz}")

    np.savez(tmp_path / "partial.npz", x_train=_images(2, 0))
    with pytest.raises(ValueError, match="partial.npz: no x_test"):
        data.load(f"mnist:{tmp_path / 'partial.npz'}")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="malformed MNIST file .*junk.npz: not an .npz"):
        data.load(f"mnist:{tmp_path / 'junk.npz'}")
    (tmp_path / "cut.npz").write_bytes((tmp_path / "partial.npz").read_bytes()[:100])
    with pytest.raises(ValueError, match="malformed MNIST file .*cut.npz"):
        data.load(f"mnist:{tmp_path / 'cut.npz'}")
    np.savez(tmp_path / "floats.npz", x_train=np.zeros((2, 3)), x_test=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="floats.npz: expected uint8 images"):
        data.load(f"mnist:{tmp_path / 'floats.npz'}")
