"""int8 weights: the quantiser against the format's definition written in numpy, each int8
kernel against float64 and the scalar reference, the whole model against transformers run on
the same dequantised weights, and the converted int8 folder: mapped in place, refused by
transformers, hostile variants refused in one line."""
from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from transformers import GPTNeoForCausalLM

import neocore
from neocore import _core
from neocore.convert import convert
from neocore.weights import Int8Matrix, quantize_i8

torch = pytest.importorskip("torch")  # none for Python 3.9: skipped there (conftest: an error in CI)

ISAS = [isa for isa in ("avx512", "avx2", "generic") if _core.isa_runs_here(isa)]
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


SHAPES = [(1, 8, 4), (1, 768, 50), (2, 13, 7), (3, 64, 33), (7, 100, 37), (16, 200, 5), (4, 2 * B + 8, 20),
          (1, 320 * B, 9)]  # the last: one row of x too long for L1 (2.7B's K of 10240)


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
@pytest.mark.parametrize("T, K", [(9, 3 * B + 13), (40, 6 * B + 13)])
def test_avx2_int8_agrees_with_the_scalar_reference(kernel, T, K):
    x, q, w = random_case(T, K, 45, seed=2)
    outs = {}
    for isa in ISAS:
        outs[isa] = np.zeros((T, 45), np.float32)
        _core.matmul(outs[isa], x, q, None, False, 1, isa, kernel)
    # both sum the same fp32 products (value * scale, then times x): only the order differs
    assert np.all(np.abs(outs["avx2"] - outs["generic"]) <= 2 * summation_bound(x, w))
    assert not np.array_equal(outs["avx2"], np.zeros_like(outs["avx2"]))


@pytest.mark.parametrize("isa", ISAS)
# AVX2 takes int8 rows in tiles past 3 rows; AVX-512 past 4 rows once x is past L1 (the last
# two; the last in two spans of columns)
@pytest.mark.parametrize("T, K", [(7, 2 * B + 24), (4, B - 1), (8, 3 * B - 1), (40, 6 * B + 13), (12, 40 * B + 5)])
def test_int8_matvec_rows_are_summed_as_alone_and_threads_do_not_matter(isa, T, K):
    x, q, _ = random_case(T, K, 70, seed=3)
    together = np.zeros((T, 70), np.float32)
    _core.matmul(together, x, q, None, False, 2, isa, "matvec")
    for t in range(T):
        alone = np.zeros((1, 70), np.float32)
        _core.matmul(alone, x[t:t + 1], q, None, False, 1, isa, "matvec")
        assert np.array_equal(alone[0], together[t])
    for kernel in ("gemm", "matvec"):
        results = []
        for threads in (1, 2, 3):
            out = np.zeros((T, 70), np.float32)
            _core.matmul(out, x, q, None, False, threads, isa, kernel)
            results.append(out)
        assert all(np.array_equal(r, results[0]) for r in results)


# ---- the whole model ------------------------------------------------------------------------

def run_cli(*args: str):
    return subprocess.run([sys.executable, "-m", "neocore", *args], capture_output=True, text=True,
                          timeout=300)


def assert_one_line_error(proc, pattern: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and pattern in lines[0], proc.stderr


@pytest.fixture(scope="module")
def tiny(reference_models, gpt2_tokenizer_dir):
    ref = reference_models("tiny")
    return ref, neocore.load(ref.folder, dtype="int8").logits(IDS)


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory) -> Path:
    """The tiny model through `neocore convert --dtype int8`, as a user runs it."""
    ref, _ = tiny
    dst = tmp_path_factory.mktemp("int8") / "converted"
    proc = run_cli("convert", str(ref.folder), str(dst), "--dtype", "int8")
    assert proc.returncode == 0, proc.stderr
    assert "int8 weights" in proc.stdout
    return dst


def test_int8_model_equals_transformers_on_the_dequantised_weights(tiny, logits_close):
    """Quantisation is the only approximation: transformers (fp32) given the dequantised
    weights, quantised here by the numpy definition, agrees to float precision."""
    ref, ours = tiny
    model = copy.deepcopy(ref.torch_model)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 2:  # every matrix; lm_head is tied to wte
                p.copy_(torch.from_numpy(dequantize(*reference_quantize(p.numpy()))))
        theirs = model(torch.tensor([IDS])).logits[0].numpy()
    logits_close(ours, theirs)


def test_int8_logits_stay_close_to_bfloat16(tiny):
    """Each weight moves by at most half a step, 1/254 of its block's largest magnitude: a
    noise well below the signal. On this random 4-layer model it moves the logits by 2.9% of
    their range (measured), so 5% is the bound, and the top token must not change."""
    ref, ours = tiny
    bf16 = neocore.load(ref.folder).logits(IDS)
    assert np.abs(ours - bf16).max() <= 0.05 * np.abs(bf16).max()
    assert np.array_equal(ours.argmax(axis=1), bf16.argmax(axis=1))


def test_int8_generation_is_the_same_for_any_thread_count(tiny):
    ref, _ = tiny
    outputs = [neocore.load(ref.folder, dtype="int8", threads=t).generate_ids(IDS[:5], 12)
               for t in (1, 2, 3)]
    assert outputs[0] == outputs[1] == outputs[2]


def test_convert_int8_round_trip(tiny, converted):
    ref, ours = tiny
    weights = converted / "neocore-int8.safetensors"
    assert not (converted / "model.safetensors").exists()
    header_len = int.from_bytes(weights.read_bytes()[:8], "little")
    header = json.loads(weights.read_bytes()[8:8 + header_len])
    assert header["__metadata__"]["format"] == "neocore-int8"
    assert header["__metadata__"]["neocore.i8_block"] == str(B)
    assert header["transformer.wte.weight"]["dtype"] == "I8"
    assert header["transformer.wte.weight.scales"] == {**header["transformer.wte.weight.scales"],
                                                       "dtype": "F32", "shape": [50257, -(-64 // B)]}
    assert header["transformer.h.0.ln_1.weight"]["dtype"] == "F32" and "lm_head.weight" not in header
    model = neocore.load(converted, dtype="int8", huge_pages=False)
    assert model.matrices_in_place == 2 + 6 * ref.config["num_layers"]
    wte = model._weights["wte"]
    assert not wte.values.flags.writeable and not wte.values.flags.owndata  # the read-only map
    assert np.array_equal(model.logits(IDS), ours)  # identical to quantising at load
    assert model.tokenizer is not None


def test_transformers_cannot_load_an_int8_folder(converted):
    with pytest.raises(OSError, match="no file named model.safetensors"):
        GPTNeoForCausalLM.from_pretrained(converted)


def test_int8_folder_refuses_other_dtypes_and_conversion_back(converted, tmp_path):
    with pytest.raises(neocore.CheckpointError, match="transformers cannot load; load it with dtype='int8'"):
        neocore.load(converted, dtype="bfloat16")
    assert neocore.load(converted).dtype == "int8"  # the default follows the file
    proc = run_cli("convert", str(converted), str(tmp_path / "back"))
    assert_one_line_error(proc, "cannot be converted back to bfloat16")
    assert "convert the original checkpoint" in proc.stderr
    proc = run_cli("generate", "-m", str(converted), "--dtype", "float32", "Hello")
    assert_one_line_error(proc, "--dtype int8")


def test_cli_int8(tiny, converted):
    ref, _ = tiny
    prompt = "The old lighthouse keeper"
    proc = run_cli("generate", "-m", str(converted), "--dtype", "int8", prompt, "--max-tokens", "16",
                   "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    expected = neocore.load(ref.folder, dtype="int8").generate(prompt, max_new_tokens=16, temperature=0)
    assert proc.stdout == expected + "\n"
    info = run_cli("info", "-m", str(converted), "--dtype", "int8")
    assert info.returncode == 0, info.stderr
    assert "weight dtype:    int8" in info.stdout and "transformers cannot load" in info.stdout


HOSTILE = {  # name -> (change to the tensors, the one-line message)
    "scales missing": (lambda t: t.pop("transformer.h.1.mlp.c_fc.weight.scales"),
                       "tensor 'transformer.h.1.mlp.c_fc.weight.scales' is missing"),
    "wrong block count": (lambda t: t.update({"transformer.wte.weight.scales":
                                              np.ones((50257, 64 // B + 1), np.float32)}),
                          f"expected [50257, {64 // B}] (one scale per {B} columns)"),
    "scales transposed": (lambda t: t.update({"transformer.h.0.attn.attention.q_proj.weight.scales":
                                              np.ones((64 // B, 64), np.float32)}),
                          f"has shape [{64 // B}, 64], expected [64, {64 // B}]"),
    "scales not float32": (lambda t: t.update({"transformer.wpe.weight.scales":
                                               t["transformer.wpe.weight.scales"].astype(np.float16)}),
                           "'transformer.wpe.weight.scales' is F16, not F32"),
    "values not int8": (lambda t: t.update({"transformer.h.2.mlp.c_proj.weight":
                                            t["transformer.h.2.mlp.c_proj.weight"].astype(np.int16)}),
                        "'transformer.h.2.mlp.c_proj.weight' is I16, not a floating-point weight"),
    "values wrong shape": (lambda t: t.update({"transformer.h.3.attn.attention.v_proj.weight":
                                               np.zeros((64, 65), np.int8)}),
                           "has shape [64, 65], expected [64, 64] from the config"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_int8_files_are_refused_in_one_line(converted, tmp_path, case):
    change, message = HOSTILE[case]
    folder = tmp_path / "hostile"
    shutil.copytree(converted, folder)
    weights = folder / "neocore-int8.safetensors"
    tensors = load_file(weights)  # the safetensors library, not neocore's reader
    change(tensors)
    save_file(tensors, weights, metadata={"format": "neocore-int8"})
    with pytest.raises(neocore.CheckpointError, match=re.escape(message)) as info:
        neocore.load(folder, dtype="int8")
    assert "\n" not in str(info.value)


def test_truncated_int8_file_is_refused(converted, tmp_path):
    folder = tmp_path / "truncated"
    shutil.copytree(converted, folder)
    weights = folder / "neocore-int8.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(neocore.CheckpointError, match="truncated or corrupt") as info:
        neocore.load(folder, dtype="int8")
    assert "\n" not in str(info.value)


def test_non_finite_weight_is_refused_when_quantising(tiny, tmp_path):
    ref, _ = tiny
    tensors = load_file(ref.folder / "model.safetensors")
    tensors["transformer.h.1.mlp.c_fc.weight"][3, 5] = np.inf
    folder = tmp_path / "inf"
    folder.mkdir()
    shutil.copy(ref.folder / "config.json", folder)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(neocore.CheckpointError, match="c_fc.weight' holds NaN or infinite values: cannot quantise"):
        neocore.load(folder, dtype="int8")
    with pytest.raises(neocore.CheckpointError, match="c_fc.weight' holds NaN or infinite values: cannot quantise"):
        convert(folder, tmp_path / "new" / "int8", dtype="int8")
    assert not (tmp_path / "new").exists()  # no empty folders left behind


def test_loading_int8_from_fp32_peaks_below_bfloat16(reference_models):
    """Quantised tensor by tensor, each mapped fp32 region let go: the peak is the int8 model
    plus one fp32 tensor, under what bf16 loading peaks at."""
    ref = reference_models("gpt-neo-125M")
    code = ("import neocore, sys; m = neocore.load(sys.argv[1], dtype=sys.argv[2]);"
            "print(int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024)")
    peak = {dtype: int(subprocess.run([sys.executable, "-c", code, str(ref.folder), dtype], check=True,
                                      capture_output=True, text=True).stdout)
            for dtype in ("bfloat16", "int8")}
    assert peak["int8"] < 0.85 * peak["bfloat16"], peak
