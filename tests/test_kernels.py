"""The SIMD kernels against the scalar reference and against numpy (float64)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from neocore import _core
from neocore.weights import f32_to_bf16, bf16_to_f32

ISAS = ["generic"] + (["avx2"] if _core.cpu_has_avx2_fma() else [])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("T, K, N", [(1, 8, 4), (1, 768, 50), (2, 13, 7), (3, 64, 33), (7, 100, 37), (16, 36, 5)])
@pytest.mark.parametrize("wtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("accumulate", [False, True])
def test_matmul_matches_float64(isa, T, K, N, wtype, accumulate):
    rng = np.random.default_rng(T * 1000 + K + N)
    x = rng.standard_normal((T, K)).astype(np.float32)
    w32 = rng.standard_normal((N, K)).astype(np.float32)
    w = f32_to_bf16(w32)[0] if wtype == "bfloat16" else w32
    w_exact = bf16_to_f32(w).astype(np.float64) if wtype == "bfloat16" else w32.astype(np.float64)
    bias = rng.standard_normal(N).astype(np.float32)
    out = rng.standard_normal((T, N)).astype(np.float32)
    expected = x.astype(np.float64) @ w_exact.T + bias + (out if accumulate else 0)
    _core.matmul(out, x, w, bias, accumulate, 2, isa)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.sqrt(K))


@pytest.mark.skipif(len(ISAS) < 2, reason="this CPU has only the generic path")
def test_avx2_matmul_agrees_with_scalar_reference():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 200)).astype(np.float32)
    w = f32_to_bf16(rng.standard_normal((45, 200)).astype(np.float32))[0]
    outs = []
    for isa in ISAS:
        out = np.zeros((9, 45), np.float32)
        _core.matmul(out, x, w, None, False, 1, isa)
        outs.append(out)
    np.testing.assert_allclose(outs[0], outs[1], rtol=2e-6, atol=2e-5)


def test_bf16_rounding_matches_torch():
    rng = np.random.default_rng(0)
    values = np.concatenate([
        rng.standard_normal(10000).astype(np.float32),
        np.array([0.0, -0.0, np.inf, -np.inf, 1e-40, -3e-39, 3.4e38, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8],
                 dtype=np.float32),
        (rng.integers(0, 2 ** 16, 1000, dtype=np.uint32) << 16 | 0x8000).view(np.float32),  # exact ties
    ])
    values = values[~np.isnan(values)]  # NaN payloads differ (torch makes all 0xFFFF); checked below
    ours, changed = f32_to_bf16(values)
    theirs = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert changed
    assert np.array_equal(ours, theirs)
    nan_bits, _ = f32_to_bf16(np.array([np.nan], dtype=np.float32))
    assert np.isnan(bf16_to_f32(nan_bits))[0]


def test_bf16_conversion_is_lossless_when_low_bits_are_zero():
    rng = np.random.default_rng(1)
    exact = bf16_to_f32(f32_to_bf16(rng.standard_normal(4096).astype(np.float32))[0])
    bits, changed = f32_to_bf16(exact)
    assert not changed
    assert np.array_equal(bf16_to_f32(bits), exact)


@pytest.mark.parametrize("isa", ISAS)
def test_gelu_new_matches_float64_formula(isa):
    rng = np.random.default_rng(3)
    x = np.concatenate([np.linspace(-12, 12, 20001), rng.standard_normal(50003) * 3,
                        [0.0, -0.0, 1e-30, -1e-20, 0.2499, 0.2501, -0.25, 40.0, -40.0, 1e4]]).astype(np.float32)
    expected = torch.nn.functional.gelu(torch.from_numpy(x).double(), approximate="tanh").numpy()
    y = x.copy()
    _core.gelu_new(y, 2, isa)
    # float32 evaluation of the same formula: as close as torch's own float32 result is
    torch32 = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    bound = np.abs(torch32 - expected).max()
    assert np.abs(y - expected).max() <= max(bound, 5e-7)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=5e-7)
