"""Known answers for the random stream: Philox4x32-10 against the published Random123 test vectors, and
the documented counter layout plus Box-Muller (csrc/core/philox.h's header) recomputed here in numpy, compared
element by element with the eps the CPU kernels, the emulated CUDA kernels and (when present) a GPU draw.

The numpy implementation shares no code with csrc/: it is verified against the published vectors first,
so a changed Philox round, key schedule, counter word or Box-Muller pairing fails here even though the
stream would still look normal to a statistical test."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import vae_fast as vf

REPO = Path(__file__).resolve().parent.parent
CUDA_EMU_SELFTEST = REPO / "build" / "cuda-emu" / "selftest"  # built by scripts/check_cuda_compile.sh

# ---- Philox4x32 in numpy (Salmon et al., SC'11) ---------------------------------------------------------------
MASK32 = np.uint64(0xFFFFFFFF)
MULTIPLIERS = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
WEYL = (np.uint64(0x9E3779B9), np.uint64(0xBB67AE85))


def philox4x32(counter, key, rounds=10):
    """Philox4x32-R of counter words (c0..c3) under key (k0, k1); each word an int or a uint array."""
    c = [np.asarray(w, dtype=np.uint64) & MASK32 for w in counter]
    k = [np.uint64(int(w)) & MASK32 for w in key]
    for r in range(rounds):
        if r > 0:  # the key schedule: bump by the Weyl constants before every round but the first
            k = [(k[0] + WEYL[0]) & MASK32, (k[1] + WEYL[1]) & MASK32]
        p0 = MULTIPLIERS[0] * c[0]  # 32 x 32 -> 64 bits: exact in uint64
        p1 = MULTIPLIERS[1] * c[2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & MASK32
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0]
    return c


# Random123's examples/kat_vectors, the "philox4x32 7" and "philox4x32 10" lines: rounds, counter, key, expected.
PI_COUNTER, PI_KEY = (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)
KAT_VECTORS = [
    (7, (0, 0, 0, 0), (0, 0), (0x5F6FB709, 0x0D893F64, 0x4F121F81, 0x4F730A48)),
    (7, (0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x5207DDC2, 0x45165E59, 0x4D8EE751, 0x8C52F662)),
    (7, PI_COUNTER, PI_KEY, (0x4DFCCABA, 0x190A87F0, 0xC47362BA, 0xB6B5242A)),
    (10, (0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (10, (0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (10, PI_COUNTER, PI_KEY, (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("rounds, counter, key, expected", KAT_VECTORS)
def test_numpy_philox_matches_random123_known_answers(rounds, counter, key, expected):
    assert [int(w) for w in philox4x32(counter, key, rounds)] == list(expected)


# ---- the documented eps stream, recomputed --------------------------------------------------------------------
def oracle_eps(seed: int, start: int, n: int) -> np.ndarray:
    """eps for flat indices start .. start + n - 1 by csrc/core/philox.h's documented layout, in float64.

    Block b = i // 4 under key (seed low word, seed high word), counter (b low, b high, 0, 0); its outputs
    give the block's four normals (normals_from_block)."""
    seed %= 2**64  # a negative int64 seed tensor is the same 64 bits
    i = np.arange(start, start + n, dtype=np.uint64)
    b = i >> np.uint64(2)
    x = philox4x32((b & MASK32, b >> np.uint64(32), 0, 0), (seed & 0xFFFFFFFF, seed >> 32))
    return normals_from_block(x, (i & np.uint64(3)).astype(np.int64))


def normals_from_block(x, lane):
    """Normal `lane` (0..3) of a block with Philox outputs (x0, x1, x2, x3): r(x0) cos t(x1), r(x0) sin t(x1),
    r(x2) cos t(x3), r(x2) sin t(x3). The layout fixes u(x) = x * 2^-32 + 2^-33 in float32 (reproduced
    exactly: a single IEEE operation) and t = 2 pi u with no rounding (the kernels take sincospi(2 u), 2 u
    exact); log, sqrt, sin and cos are taken in float64."""
    x = [np.asarray(w, dtype=np.uint64) for w in x]

    def uniform(w):  # float32(float32(w) * 2^-32 + 2^-33): the multiply is exact, the add rounds once
        return w.astype(np.float32) * np.float32(2.0**-32) + np.float32(2.0**-33)

    pair = lane // 2  # lanes 0, 1 use (x0, x1); lanes 2, 3 use (x2, x3)
    u_radius = np.where(pair == 0, uniform(x[0]), uniform(x[2])).astype(np.float64)
    u_angle = np.where(pair == 0, uniform(x[1]), uniform(x[3]))
    t = 2 * np.pi * u_angle.astype(np.float64)
    r = np.sqrt(-2.0 * np.log(u_radius))
    return np.where(lane % 2 == 0, r * np.cos(t), r * np.sin(t))


# float32 log, sqrt, sinpi/cospi (Sleef u35 on the CPU, CUDA's sincospif): a few ulps of
# r <= 6.7 each. A wrong bit in the stream changes an element by O(1).
EPS_ATOL, EPS_RTOL = 3e-6, 1e-6


def assert_eps_equal(ours: np.ndarray, seed: int, start: int, what: str) -> None:
    expected = oracle_eps(seed, start, ours.size)
    bad = np.abs(ours - expected) > EPS_ATOL + EPS_RTOL * np.abs(expected)
    assert not bad.any(), (
        f"{what}: {bad.sum()} of {ours.size} eps differ from the documented stream, first at flat index "
        f"{start + int(np.argmax(bad))}: {ours[bad][:4]} vs {expected[bad][:4]}")


def test_seed_0_block_0_is_the_published_zero_vector(device):
    # Seed 0, block 0 is Philox4x32-10 of counter 0 under key 0: its eps follow from the published
    # outputs directly, without this file's Philox.
    words = next(expected for rounds, counter, key, expected in KAT_VECTORS if rounds == 10 and not any(counter + key))
    zeros = torch.zeros(4, device=device)
    eps = vf.reparameterize(zeros, zeros, seed=0).cpu().double().numpy()
    np.testing.assert_allclose(eps, normals_from_block(words, np.arange(4)), rtol=EPS_RTOL, atol=EPS_ATOL)


def test_oracle_is_a_standard_normal_stream():
    # Not a known answer, but it keeps the oracle's own Box-Muller honest where no published vector
    # reaches (a wrong radius or angle scale gives the wrong variance or the wrong tails).
    e = oracle_eps(3, 0, 40_000)
    assert abs(e.mean()) < 0.03 and abs(e.var() - 1) < 0.03 and np.abs(e).max() < 6.7


# seed, shape of mu, num_samples: seeds using both key words and the top bit; odd row lengths and
# K > 1 so that chunks and samples start at flat indices that are not multiples of 4; enough elements
# (tens of thousands) for several CPU threads and kernel chunks.
STREAM_CASES = [
    (0, (7,), None),
    (21, (5, 7), 3),
    (2**32 + 5, (3, 1001), 2),
    (2**63 + 12345, (257, 33), 3),
    (2**64 - 1, (11, 13), 1),
    (0x243F6A8885A308D3, (4000, 9), 2),
]


@pytest.mark.parametrize("seed, shape, num_samples", STREAM_CASES)
def test_eps_is_the_documented_stream(seed, shape, num_samples, device):
    zeros = torch.zeros(shape, device=device)
    # mu = 0, logvar = 0: z = 0 + exp(0) * eps = eps exactly.
    z = vf.reparameterize(zeros, zeros, num_samples, seed=seed)
    assert_eps_equal(z.cpu().double().numpy().ravel(), seed, 0, f"{device} eps, seed {seed}, shape {tuple(z.shape)}")


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_cpu_isa_draws_the_documented_stream(isa, monkeypatch):
    if isa not in vf._C.build_info()["cpu_isas_built"].split(","):
        pytest.skip(f"{isa} variant not built on this platform")  # only on non-x86 builds
    monkeypatch.setenv("VAE_FAST_CPU_ISA", isa)
    zeros = torch.zeros(301, 7)
    z = vf.reparameterize(zeros, zeros, 3, seed=2**40 + 7)
    assert_eps_equal(z.double().numpy().ravel(), 2**40 + 7, 0, f"CPU {isa}")


def test_backward_regenerates_the_documented_stream():
    # dlogvar = 0.5 * sigma * sum_k g_k eps_k with logvar = 0, g = 1: 0.5 * sum_k eps_k, from the
    # regenerated eps (a separate code path from the forward's).
    mu = torch.zeros(37, 5, requires_grad=True)
    lv = torch.zeros(37, 5, requires_grad=True)
    seed, k = 2**33 + 1, 3
    (dlv,) = torch.autograd.grad(vf.reparameterize(mu, lv, k, seed=seed).sum(), lv)
    expected = 0.5 * oracle_eps(seed, 0, k * mu.numel()).reshape(k, -1).sum(0)
    np.testing.assert_allclose(dlv.double().numpy().ravel(), expected, rtol=1e-5, atol=1e-5)


def _emulated_cuda_eps(seed: int, start: int, n: int) -> np.ndarray:
    proc = subprocess.run([str(CUDA_EMU_SELFTEST), "--dump-eps", str(seed), str(start), str(n)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{CUDA_EMU_SELFTEST} --dump-eps failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    values = np.array([float(line) for line in proc.stdout.split()], dtype=np.float64)
    assert values.size == n, f"{CUDA_EMU_SELFTEST} --dump-eps printed {values.size} values, asked for {n}"
    return values


@pytest.mark.parametrize("seed, start, n", [(0, 0, 64), (21, 3, 101), (2**63 + 12345, 2**32 + 1, 203),
                                            (2**64 - 1, 5 * 2**33 + 2, 77)])
def test_emulated_cuda_kernels_draw_the_documented_stream(seed, start, n):
    # Starts past 2^32 * 4 put the block index's high word into counter word 1.
    if not CUDA_EMU_SELFTEST.exists():
        pytest.skip(f"{CUDA_EMU_SELFTEST.relative_to(REPO)} not built (scripts/check_cuda_compile.sh builds it)")
    assert_eps_equal(_emulated_cuda_eps(seed, start, n), seed, start, "emulated CUDA eps")



@pytest.mark.slow
def test_emulated_cuda_selftest_passes():
    # The CUDA kernels' whole self-test on the CPU emulator (CI also runs it in scripts/check_cuda_compile.sh);
    # here so that scripts/mutate.py's mutants of csrc/cuda/*.cu meet it.
    if not CUDA_EMU_SELFTEST.exists():
        pytest.skip(f"{CUDA_EMU_SELFTEST.relative_to(REPO)} not built (scripts/check_cuda_compile.sh builds it)")
    proc = subprocess.run([str(CUDA_EMU_SELFTEST)], capture_output=True, text=True, timeout=600)
    failures = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    assert proc.returncode == 0 and not failures, (
        f"emulated CUDA self-test failed (exit {proc.returncode}):\n" + "\n".join(failures[:20])
        + proc.stdout[-1500:] + proc.stderr[-1500:])
    assert re.search(r"^\d+ passed, 0 failed$", proc.stdout, re.M), proc.stdout[-500:]
