"""int8 weights: the quantiser against the format's definition written in numpy, each int8
kernel against float64 and the scalar reference, the whole model against transformers run on
the same dequantised weights, and the converted int8 folder: mapped in place, refused by
transformers, hostile variants refused in one line."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import GPTNeoForCausalLM

import neocore
from neocore import _core
from neocore.weights import Int8Matrix, quantize_i8

ISAS = ["generic"] + (["avx2"] if _core.cpu_has_avx2_fma() else [])
B = _core.I8_BLOCK
IDS = [5, 17, 900, 3, 44, 1002, 7, 0, 61, 250, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]


def reference_quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The format's definition, independently of the C quantiser: per block of B columns of a
    row, scale = max |x| / 127 (fp32) and value = x / scale rounded to nearest even."""
    rows, cols = w.shape
    blocks = -(-cols // B)
    padded = np.zeros((rows, blocks * B), np.float32)
    padded[:, :cols] = w
    grouped = padded.reshape(rows, blocks, B)
    scales = np.abs(grouped).max(axis=2) / np.float32(127)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.where(scales[..., None] > 0, np.rint(grouped / scales[..., None]), 0)
    return q.reshape(rows, -1)[:, :cols].astype(np.int8), scales.astype(np.float32)


def dequantize(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """value * scale rounded to fp32, the weight every kernel multiplies by."""
    return values.astype(np.float32) * np.repeat(scales, B, axis=1)[:, :values.shape[1]]


def int8(values: np.ndarray, scales: np.ndarray) -> Int8Matrix:
    return Int8Matrix(np.ascontiguousarray(values), np.ascontiguousarray(scales))


# ---- quantisation ---------------------------------------------------------------------------

@pytest.mark.parametrize("rows, cols", [(1, 1), (3, B), (5, B + 1), (7, 3 * B - 5), (64, 768)])
def test_quantize_matches_the_definition_and_stays_within_half_a_step(rows, cols):
    rng = np.random.default_rng(rows * cols)
    w = (rng.standard_normal((rows, cols)) * rng.choice([1e-3, 0.02, 1.0, 300.0], (rows, 1))).astype(np.float32)
    w[0, : min(cols, B)] = 0.0                       # an all-zero block: scale 0, values 0
    if cols > 2:
        w[-1, 1] = -np.abs(w[-1]).max() * 2          # the block maximum is negative
    q = quantize_i8(w, threads=2)
    values, scales = reference_quantize(w)
    assert np.array_equal(q.values, values) and np.array_equal(q.scales, scales)
    assert q.values.min() >= -127 and q.values.max() <= 127
    step = np.repeat(scales, B, axis=1)[:, :cols].astype(np.float64)
    error = np.abs(w.astype(np.float64) - dequantize(q.values, q.scales).astype(np.float64))
    # half a step, plus the two fp32 roundings of x / scale and value * scale
    assert np.all(error <= step * (0.5 + 2 ** -22) + 1e-45)
    assert np.array_equal(quantize_i8(w, threads=1).values, q.values)  # rows split by thread


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_quantize_refuses_non_finite_values(bad):
    w = np.ones((3, 40), np.float32)
    w[2, 39] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize_i8(w)


# ---- kernels --------------------------------------------------------------------------------

def random_case(T: int, K: int, N: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, K)).astype(np.float32)
    q = int8(*reference_quantize(rng.standard_normal((N, K)).astype(np.float32)))
    return x, q, dequantize(q.values, q.scales).astype(np.float64)


def summation_bound(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """|fp32 sum - exact| <= gamma_K * sum |x_k w_k| for any order of K fp32 additions."""
    K = x.shape[1]
    gamma = K * 2.0 ** -24 / (1 - K * 2.0 ** -24)
    return gamma * (np.abs(x.astype(np.float64)) @ np.abs(w).T) + 1e-30


SHAPES = [(1, 8, 4), (1, 768, 50), (2, 13, 7), (3, 64, 33), (7, 100, 37), (16, 200, 5), (4, 2 * B + 8, 20)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kernel", ["gemm", "matvec"])
@pytest.mark.parametrize("T, K, N", SHAPES)
def test_int8_kernels_match_float64(isa, kernel, T, K, N):
    x, q, w = random_case(T, K, N, seed=T * 1000 + K + N)
    bias = np.random.default_rng(1).standard_normal(N).astype(np.float32)
    out = np.zeros((T, N), np.float32)
    _core.matmul(out, x, q, bias, False, 2, isa, kernel)
    exact = x.astype(np.float64) @ w.T
    # the bias adds one more rounding of the sum's size
    bound = summation_bound(x, w) + 2 ** -23 * (np.abs(exact) + np.abs(bias))
    assert np.all(np.abs(out - (exact + bias)) <= bound)
    accumulated = out.copy()
    _core.matmul(accumulated, x, q, None, True, 2, isa, kernel)
    np.testing.assert_allclose(accumulated, 2 * exact + bias, rtol=1e-5, atol=1e-5 * np.sqrt(K))


@pytest.mark.skipif(len(ISAS) < 2, reason="this CPU has only the generic path")
@pytest.mark.parametrize("kernel", ["gemm", "matvec"])
def test_avx2_int8_agrees_with_the_scalar_reference(kernel):
    x, q, w = random_case(9, 3 * B + 13, 45, seed=2)
    outs = {}
    for isa in ISAS:
        outs[isa] = np.zeros((9, 45), np.float32)
        _core.matmul(outs[isa], x, q, None, False, 1, isa, kernel)
    # both sum the same fp32 products (value * scale, then times x): only the order differs
    assert np.all(np.abs(outs["avx2"] - outs["generic"]) <= 2 * summation_bound(x, w))
    assert not np.array_equal(outs["avx2"], np.zeros_like(outs["avx2"]))


@pytest.mark.parametrize("isa", ISAS)
def test_int8_matvec_rows_are_summed_as_alone_and_threads_do_not_matter(isa):
    x, q, _ = random_case(7, 2 * B + 24, 70, seed=3)
    together = np.zeros((7, 70), np.float32)
    _core.matmul(together, x, q, None, False, 2, isa, "matvec")
    for t in range(7):
        alone = np.zeros((1, 70), np.float32)
        _core.matmul(alone, x[t:t + 1], q, None, False, 1, isa, "matvec")
        assert np.array_equal(alone[0], together[t])
    for kernel in ("gemm", "matvec"):
        results = []
        for threads in (1, 2, 3):
            out = np.zeros((7, 70), np.float32)
            _core.matmul(out, x, q, None, False, threads, isa, kernel)
            results.append(out)
        assert all(np.array_equal(r, results[0]) for r in results)
