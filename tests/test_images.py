"""Image data: the sets by name read from files in their published formats (written here, a few images each),
the torchvision fallback (a stand-in module), the embedded patches, the one 8-bit convention, and bits per
dimension (the formula, and models whose answer is known by hand)."""

from __future__ import annotations

import gzip
import math
import pickle
import struct
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

import vae_fast as vf
from vae_fast.models import likelihoods
from vae_fast.train import cli, data
from vae_fast.train import TrainConfig
from vae_fast.train.build import bits_per_dim_setup, load_data, prepare_batch


def _levels(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


# ---- MNIST and Fashion-MNIST: IDX files ---------------------------------------------------------------------------


def _write_idx(folder, images: dict, gz: bool):
    folder.mkdir(parents=True, exist_ok=True)
    for stem, arr in images.items():
        raw = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
        if gz:
            with gzip.open(folder / (stem + ".gz"), "wb") as f:
                f.write(raw)
        else:
            (folder / stem).write_bytes(raw)


@pytest.mark.parametrize("name,layout,gz", [("mnist", "", True), ("mnist", "MNIST/raw", False),
                                            ("fashion-mnist", "FashionMNIST/raw", True)])
def test_idx_sets_by_name(tmp_path, name, layout, gz):
    train_levels, test_levels = _levels((5, 28, 28), 0), _levels((3, 28, 28), 1)
    _write_idx(tmp_path / layout, {"train-images-idx3-ubyte": train_levels, "t10k-images-idx3-ubyte": test_levels}, gz)
    train_u8, test_u8 = data.load_images(name, tmp_path)
    assert train_u8.dtype == torch.uint8 and train_u8.shape == (5, 1, 28, 28) and test_u8.shape == (3, 1, 28, 28)
    assert np.array_equal(train_u8[:, 0].numpy(), train_levels) and np.array_equal(test_u8[:, 0].numpy(), test_levels)
    train, test = data.load(name, data_dir=tmp_path)
    assert train.dtype == torch.float32 and train.shape == (5, 1, 28, 28)
    torch.testing.assert_close(test, torch.from_numpy(test_levels[:, None].astype(np.float32)) / 255, rtol=0, atol=0)
    assert data.levels(name) == 256


def test_idx_file_that_is_not_images(tmp_path):
    _write_idx(tmp_path, {"train-images-idx3-ubyte": _levels((5, 784), 0),
                          "t10k-images-idx3-ubyte": _levels((3, 28, 28), 1)}, gz=False)
    with pytest.raises(ValueError, match="train-images-idx3-ubyte: expected \\(N, H, W\\) images"):
        data.load_images("mnist", tmp_path)


# ---- CIFAR-10: pickled python batches --------------------------------------------------------------------------


class _Py2Pickler(pickle._Pickler):
    """Pickles bytes as Python 2's str (BINSTRING), as the published CIFAR-10 batches were written (cPickle)."""

    def save_bytes(self, obj):
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes


def _write_cifar_batch(path, levels: np.ndarray):
    """``levels`` (N, 3, 32, 32) as a batch: {'batch_label', 'labels', 'data' (N, 3072), 'filenames'}, str keys
    of Python 2 (bytes here), protocol 2."""
    batch = {b"batch_label": b"test", b"labels": list(range(len(levels))), b"data": levels.reshape(len(levels), -1),
             b"filenames": [b"x.png"] * len(levels)}
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(batch)


def _write_cifar(folder, n=2):
    folder.mkdir(parents=True, exist_ok=True)
    batches = {name: _levels((n, 3, 32, 32), i) for i, name in enumerate(data._CIFAR_BATCHES)}
    for name, levels in batches.items():
        _write_cifar_batch(folder / name, levels)
    return batches


@pytest.mark.parametrize("inner", ["cifar-10-batches-py", ""])
def test_cifar10_batches(tmp_path, inner):
    batches = _write_cifar(tmp_path / inner)
    train, test = data.load_images("cifar10", tmp_path)
    assert train.shape == (10, 3, 32, 32) and test.shape == (2, 3, 32, 32) and train.dtype == torch.uint8
    expected = np.concatenate([batches[f"data_batch_{i}"] for i in range(1, 6)])
    assert np.array_equal(train.numpy(), expected) and np.array_equal(test.numpy(), batches["test_batch"])
    # A row of 'data' is the red, then green, then blue 32x32 plane, row by row.
    row = batches["test_batch"].reshape(2, -1)[1]
    assert np.array_equal(test[1, 2].numpy().ravel(), row[2048:]) and test[1, 0, 0, 1].item() == row[1]


def test_cifar10_refuses_code_and_foreign_batches(tmp_path):
    _write_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("this pickle ran code",))

    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({"data": Evil()}, protocol=2))
    with pytest.raises(ValueError, match="malformed CIFAR-10 batch .*data_batch_3: UnpicklingError: refused .*print"):
        data.load_images("cifar10", tmp_path)
    _write_cifar_batch(tmp_path / "data_batch_3", _levels((2, 3, 32, 32), 0)[:, :, :16])  # 1536 values a row
    with pytest.raises(ValueError, match="data_batch_3: expected 'data' of uint8 \\(N, 3072\\), got uint8 "
                                         "\\(2, 1536\\)"):
        data.load_images("cifar10", tmp_path)
    (tmp_path / "data_batch_3").write_bytes(b"\x80\x02}q\x00")  # cut short
    with pytest.raises(ValueError, match="malformed CIFAR-10 batch"):
        data.load_images("cifar10", tmp_path)


# ---- missing files, torchvision -------------------------------------------------------------------------------


def test_missing_files_name_the_folder_and_the_files(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if not installed: `import` raises ImportError
    with pytest.raises(FileNotFoundError) as e:
        data.load("cifar10", data_dir=tmp_path)
    message = str(e.value)
    assert f"not in {tmp_path}" in message and "data_batch_1 .. data_batch_5 and test_batch" in message
    assert "data_dir" in message and "torchvision" in message and "\n" not in message
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert data.default_data_dir("mnist") == tmp_path / "cache" / "vae_fast" / "mnist"
    with pytest.raises(FileNotFoundError, match=f"not in {tmp_path / 'cache' / 'vae_fast' / 'mnist'}: put "
                                                "train-images-idx3-ubyte.gz and t10k-images-idx3-ubyte.gz there"):
        data.load("mnist")
    with pytest.raises(ValueError, match="unknown data set 'cifar': use 'digits', 'synthetic', 'mnist', "
                                         "'fashion-mnist', 'cifar10', 'patches' or 'mnist:PATH'"):
        data.load("cifar")


def test_cli_missing_files_one_line_naming_the_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    out = tmp_path / "run"
    code = cli.main(["train", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "nothing"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert f"fashion-mnist: its files are not in {tmp_path / 'nothing'}" in err and "--data-dir" in err
    assert not out.exists()  # nothing written before the data loaded


def _fake_torchvision(monkeypatch, calls, fail=None):
    """A stand-in ``torchvision`` whose datasets "download" by writing tiny IDX files where torchvision puts
    them (ROOT/MNIST/raw), or raise ``fail``."""

    def mnist(root, train, download):
        calls.append((root, train, download))
        if fail is not None:
            raise fail
        _write_idx(__import__("pathlib").Path(root) / "MNIST" / "raw",
                   {"train-images-idx3-ubyte" if train else "t10k-images-idx3-ubyte": _levels((4 if train else 2, 8, 8),
                                                                                          int(train))}, gz=True)

    datasets = types.SimpleNamespace(MNIST=mnist)
    module = types.ModuleType("torchvision")
    module.datasets = datasets
    monkeypatch.setitem(sys.modules, "torchvision", module)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)


def test_torchvision_downloads_missing_files(tmp_path, monkeypatch):
    calls = []
    _fake_torchvision(monkeypatch, calls)
    train, test = data.load_images("mnist", tmp_path)
    assert calls == [(str(tmp_path), True, True), (str(tmp_path), False, True)]
    assert train.shape == (4, 1, 8, 8) and test.shape == (2, 1, 8, 8)
    data.load_images("mnist", tmp_path)  # now on disk: no second download
    assert len(calls) == 2


def test_torchvision_download_failure_is_one_line(tmp_path, monkeypatch):
    _fake_torchvision(monkeypatch, [], fail=RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nno route"))
    with pytest.raises(FileNotFoundError, match="torchvision could not download them: RuntimeError: Error "
                                                "downloading train-images-idx3-ubyte.gz:\\)$"):
        data.load_images("mnist", tmp_path)


# ---- patches ---------------------------------------------------------------------------------------------------


def test_patches_are_fixed_crops_of_disjoint_regions():
    train, test = data.load_images("patches")
    assert train.shape == (5700, 3, 32, 32) and test.shape == (450, 3, 32, 32) and train.dtype == torch.uint8
    again = data.load_images("patches")
    assert torch.equal(train, again[0]) and torch.equal(test, again[1])
    china, flower = (torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in data._sample_images())
    assert china.shape == flower.shape == (3, 427, 640)
    # Train: crops every 8 pixels of columns 0..479 of china (50 rows x 57 columns of crops), then of flower.
    assert torch.equal(train[0], china[:, :32, :32]) and torch.equal(train[58], china[:, 8:40, 8:40])
    assert torch.equal(train[2849], china[:, 392:424, 448:480]) and torch.equal(train[2850], flower[:, :32, :32])
    # Test: crops every 16 pixels of columns 480..639 (25 x 9 each): no pixel of a test patch is in a train one.
    assert torch.equal(test[0], china[:, :32, 480:512]) and torch.equal(test[-1], flower[:, 384:416, 608:640])
    assert len(set(map(bytes, train.numpy()))) > 5000 and data.levels("patches") == 256


def test_load_patches_in_unit_range_and_as_images():
    train, test = data.load("patches")
    assert train.shape == (5700, 3, 32, 32) and train.dtype == torch.float32 and train.is_contiguous()
    assert train.min() == 0 and train.max() == 1
    torch.testing.assert_close(test * 255, test.mul(255).round(), rtol=0, atol=2e-5)  # on the 8-bit grid
    assert data.as_images(train, "patches") is train
    digits = data.load("digits")[0]
    assert data.as_images(digits, "digits").shape == (1500, 1, 8, 8)
    assert data.as_images(digits, "digits").data_ptr() == digits.data_ptr()  # a view
    with pytest.raises(ValueError, match="'synthetic' is not images"):
        data.as_images(data.load("synthetic")[0], "synthetic")


# ---- the 8-bit convention: levels, ranges, dequantisation ------------------------------------------------------


def test_levels_ranges_and_dequantisation():
    levels = torch.tensor([0, 1, 127, 128, 254, 255], dtype=torch.uint8)
    unit, signed = data.from_levels(levels), data.from_levels(levels, "signed")
    torch.testing.assert_close(unit, levels.double().div(255).float())
    torch.testing.assert_close(signed, levels.double().div(127.5).sub(1).float())
    assert (signed[0].item(), signed[-1].item()) == (-1.0, 1.0)
    torch.testing.assert_close(data.to_range(unit, "signed"), signed)
    assert data.to_range(unit, "unit") is unit
    with pytest.raises(ValueError, match="data_range must be one of \\('unit', 'signed'\\), got 'bytes'"):
        data.from_levels(levels, "bytes")
    with pytest.raises(ValueError, match="uint8"):
        data.from_levels(levels.float())

    k = torch.arange(256).repeat(200)
    for data_range, (low, high) in data.DATA_RANGES.items():
        x = data.from_levels(k.to(torch.uint8), data_range)
        deq = data.dequantize(x, torch.Generator().manual_seed(0), data_range=data_range)
        t = (deq.double() - low) / (high - low) * 256  # each in its own bin [k, k + 1)
        assert torch.equal(t.floor().long(), k)
        assert abs((t - k).mean().item() - 0.5) < 0.01  # uniform within it
    x = data.from_levels(k.to(torch.uint8))
    assert torch.equal(data.fixed_dequantize(x), data.fixed_dequantize(x))
    assert not torch.equal(data.dequantize(x), data.dequantize(x))


def test_trainer_prepares_data_as_the_likelihood_says():
    gaussian = TrainConfig(dataset="patches", model="conv", likelihood="gaussian")
    train, test = load_data(gaussian)
    assert train.shape[1:] == test.shape[1:] == (3, 32, 32)
    # The test set is dequantised once (fixed), the train batches afresh: off the grid, in their own bins.
    raw_train, raw_test = data.load("patches")
    assert torch.equal((test * 256).floor(), (raw_test * 255).round()) and not torch.equal(test, raw_test)
    assert torch.equal(load_data(gaussian)[1], test)
    batch = prepare_batch(gaussian, train[:50], torch.Generator().manual_seed(0))
    assert torch.equal((batch * 256).floor(), (train[:50] * 255).round())
    assert bits_per_dim_setup(gaussian, test.shape[1:]) == (3072, 1 / 256)
    # Bernoulli: binarised (fixed test draw, fresh train draws), a discrete likelihood.
    bernoulli = TrainConfig(dataset="patches", likelihood="bernoulli")
    train, test = load_data(bernoulli)
    assert set(test.unique().tolist()) == {0.0, 1.0} and train.shape == raw_train.shape
    assert bits_per_dim_setup(bernoulli, test.shape[1:]) == (3072, None)
    assert bits_per_dim_setup(TrainConfig(dataset="patches", binarize="none"), test.shape[1:]) is None
    assert bits_per_dim_setup(TrainConfig(dataset="digits", likelihood="gaussian"), (64,)) is None  # not 8-bit
    # Digits stay flat rows for the MLP and become 1x8x8 images for a conv model.
    assert load_data(TrainConfig())[0].shape == (1500, 64)
    assert load_data(TrainConfig(model="conv"))[0].shape == (1500, 1, 8, 8)
    with pytest.raises(ValueError, match="model='conv': data set 'synthetic' is not images"):
        load_data(TrainConfig(dataset="synthetic", model="conv"))


# ---- bits per dimension ----------------------------------------------------------------------------------------


def test_bits_per_dim_known_answers():
    d = 3072
    assert vf.bits_per_dim(0.0, d, 1 / 256) == 8.0  # the uniform density on [0, 1]^D
    assert vf.bits_per_dim(-d * math.log(256), d) == pytest.approx(8.0, abs=1e-12)  # uniform over 256 levels
    assert vf.bits_per_dim(-d * math.log(2), d) == pytest.approx(1.0, abs=1e-12)  # a fair coin per pixel
    assert vf.bits_per_dim(d * math.log(2), d, 1 / 256) == pytest.approx(7.0, abs=1e-12)  # twice the uniform density
    assert vf.bits_per_dim(0.0, d, 2 / 256) == pytest.approx(7.0, abs=1e-12)  # [-1, 1]: bins twice as wide
    t = vf.bits_per_dim(torch.tensor([0.0, -d * math.log(2)], dtype=torch.float64), d, 1 / 256)
    torch.testing.assert_close(t, torch.tensor([8.0, 9.0], dtype=torch.float64))
    for bad in ({"num_dims": 0}, {"num_dims": 2.0}, {"bin_width": 0.0}, {"bin_width": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            vf.bits_per_dim(0.0, **{"num_dims": 4, **bad})


def _prior_posterior(model):
    """Encoder outputs mu = 0, logvar = 0 whatever x is: q(z|x) = p(z), so every importance weight is
    p(x|z) and the estimate of log p(x) is exact when p(x|z) does not depend on z."""
    last = model.encoder[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    return model


def test_bits_per_dim_of_models_with_a_known_answer():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 8).round()
    # Bernoulli with logits 0 on binary data: -D log 2 exactly, so 1 bit per dimension.
    model = _prior_posterior(vf.conv_vae((3, 8, 8), 4))
    with torch.no_grad():
        model.decoder[-1].weight.zero_()
        model.decoder[-1].bias.zero_()
    ll = model.log_likelihood(x, 20)
    torch.testing.assert_close(ll, torch.full((4,), -192 * math.log(2)))
    torch.testing.assert_close(vf.bits_per_dim(ll.double(), 192), torch.ones(4, dtype=torch.float64), rtol=1e-6, atol=0)
    # Gaussian, mean 0.5, fixed log-variance -3, on dequantised 8-bit data: by hand.
    model = _prior_posterior(vf.conv_vae((3, 8, 8), latent_channels=2, likelihood="gaussian", obs_logvar=-3.0))
    with torch.no_grad():
        model.decoder[-1].weight.zero_()
        model.decoder[-1].bias.fill_(0.5)
    x = data.fixed_dequantize(data.from_levels(torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)))
    by_hand = (-0.5 * (math.log(2 * math.pi) - 3.0 + (x.double() - 0.5) ** 2 / math.exp(-3.0))).sum((1, 2, 3))
    ll = model.log_likelihood(x, 20)
    torch.testing.assert_close(ll.double(), by_hand, rtol=1e-5, atol=1e-3)
    expected = 8 - by_hand / (192 * math.log(2))
    torch.testing.assert_close(vf.bits_per_dim(ll.double(), 192, 1 / 256), expected, rtol=1e-6, atol=1e-5)


def test_likelihood_table_is_the_one_place():
    """Every likelihood in the table says how it reads 8-bit data, in which range, and what it asks of the
    decoder; the CLI, the config check and the models take their choices from it."""
    assert set(likelihoods.LIKELIHOODS) == {"bernoulli", "gaussian", "dmol"}
    for name, lik in likelihoods.LIKELIHOODS.items():
        assert lik.name == name and lik.data_range in data.DATA_RANGES and lik.eight_bit in likelihoods.EIGHT_BIT
    assert vf.models.vae.LIKELIHOODS == tuple(likelihoods.LIKELIHOODS)
    with pytest.raises(ValueError, match="likelihood must be one of \\('bernoulli', 'gaussian', 'dmol'\\), got 'poisson'"):
        vf.conv_vae((1, 8, 8), 2, likelihood="poisson")
    with pytest.raises(ValueError, match="likelihood must be bernoulli \\| gaussian \\| dmol, got 'poisson'"):
        TrainConfig(likelihood="poisson").validate()
    # the mixture of logistics: 8-bit images and a conv model only
    with pytest.raises(ValueError, match="likelihood='dmol' is a distribution over the 256 values of 8-bit images"):
        TrainConfig(likelihood="dmol").validate()
    with pytest.raises(ValueError, match="likelihood 'dmol' models images"):
        vf.mlp_vae(64, 2, likelihood="dmol")
    TrainConfig(likelihood="dmol", dataset="patches", model="conv").validate()
    assert likelihoods.get("dmol").decoder_shape((3, 8, 8), -3) == (100, 8, 8)
    assert likelihoods.get("dmol").decoder_shape((1, 8, 8), -3) == (30, 8, 8)
    gaussian = likelihoods.get("gaussian")
    assert gaussian.decoder_shape((3, 8, 8), -3, "decoder") == (6, 8, 8)
    assert gaussian.decoder_shape((64,), -1, "scalar") == (64,)
    assert isinstance(vf.conv_vae((1, 8, 8), 2).lik, likelihoods.Bernoulli)
    assert not any(isinstance(m, nn.Module) for m in vars(likelihoods.get("bernoulli")).values())


@pytest.mark.parametrize("channels", [1, 3])
def test_a_dmol_conv_vae_scores_8bit_images_with_the_fused_op(channels):
    """A conv VAE with the mixture of logistics: its log p(x|z) is the fused op on the decoder's output (checked
    against the exact composite formula), its IWAE bound is finite, its samples lie on the 8-bit grid of [-1, 1]
    and its mean in [-1, 1], and bits per dimension read it as a discrete likelihood (no bin width)."""
    from vae_fast.ops import _dmol_composite

    torch.manual_seed(0)
    model = vf.conv_vae((channels, 8, 8), latent_channels=2, likelihood="dmol")
    x = torch.randint(0, 256, (5, channels, 8, 8)).float() / 127.5 - 1
    z = torch.randn(5, *model.latent_shape)
    params = model.decode(z)
    want = _dmol_composite.dmol_log_prob(x.double(), params.double(), 8, "channels_first", 3)
    torch.testing.assert_close(model.lik.log_prob(x, params, 3).double(), want, rtol=1e-5, atol=1e-3)
    ll = model.log_likelihood(x, 4)
    assert ll.shape == (5,) and torch.isfinite(ll).all() and (ll < 0).all()
    sample = model.lik.output(params, mean=False)
    assert sample.shape == x.shape
    torch.testing.assert_close(torch.round((sample + 1) * 127.5) / 127.5 - 1, sample, rtol=0, atol=1e-6)
    mean = model.lik.output(params, mean=True)
    assert mean.shape == x.shape and mean.abs().max() <= 1
    assert likelihoods.get("dmol").bin_width(256, False) == (True, None)
    assert likelihoods.get("dmol").bin_width(None, False)[0] is False
