"""The kernels of every path this CPU runs against numpy (float64) and against the scalar
reference, and the properties every path keeps: a row's result does not depend on the other
rows, and no result depends on the thread count."""
from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest

import neocore.model
from neocore import _core
from neocore.config import GPTNeoConfig
from neocore.model import decode_prefetch
from neocore.weights import f32_to_bf16, bf16_to_f32

torch = pytest.importorskip("torch")  # none for Python 3.9: skipped there (conftest: an error in CI)

ISAS = _core.usable_isas()  # fastest first, the scalar reference last
PATHS = [isa for isa in ISAS if isa != "scalar"]
KERNELS = ["gemm", "matvec"]


def problem(T, K, N, wtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, K)).astype(np.float32)
    w32 = rng.standard_normal((N, K)).astype(np.float32)
    w = f32_to_bf16(w32)[0] if wtype == "bfloat16" else w32
    w_exact = bf16_to_f32(w).astype(np.float64) if wtype == "bfloat16" else w32.astype(np.float64)
    return x, w, w_exact, rng.standard_normal(N).astype(np.float32)


def run(x, w, bias, isa, kernel, threads=2):
    out = np.zeros((x.shape[0], w.shape[0]), np.float32)
    _core.matmul(out, x, w, bias, False, threads, isa, kernel)
    return out


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kernel", KERNELS)
# the last two: a few rows of x too long for L1 (K of 1.3B's and 2.7B's MLP down-projection)
@pytest.mark.parametrize("T, K, N", [(1, 8, 4), (1, 768, 50), (2, 13, 7), (3, 64, 33), (7, 100, 37), (16, 36, 5),
                                     (1, 10240, 20), (3, 2100, 9)])
@pytest.mark.parametrize("wtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("accumulate", [False, True])
def test_matmul_matches_float64(isa, kernel, T, K, N, wtype, accumulate):
    x, w, w_exact, bias = problem(T, K, N, wtype, T * 1000 + K + N)
    out = np.random.default_rng(1).standard_normal((T, N)).astype(np.float32)
    expected = x.astype(np.float64) @ w_exact.T + bias + (out if accumulate else 0)
    _core.matmul(out, x, w, bias, accumulate, 2, isa, kernel)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.sqrt(K))


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("wtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("T, K, N", [(9, 200, 45), (40, 203, 37)])
def test_every_path_agrees_with_the_scalar_reference(isa, kernel, wtype, T, K, N):
    x, w, _, bias = problem(T, K, N, wtype, 0)
    np.testing.assert_allclose(run(x, w, bias, isa, kernel), run(x, w, bias, "scalar", kernel),
                               rtol=2e-6, atol=2e-5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("T, K, N", [(7, 100, 37), (13, 768, 70), (40, 203, 37), (2, 8192, 9), (64, 100, 8),
                                     (4, 1541, 9), (129, 63, 5), (6, 520, 11), (8, 744, 13), (8, 1000, 21),
                                     (8, 1100, 21), (200, 20, 19), (5, 8224, 3)])
@pytest.mark.parametrize("wtype", ["float32", "bfloat16"])
def test_a_row_is_computed_as_if_alone(isa, kernel, T, K, N, wtype):
    """Bit for bit: the decode kernel sums each of T rows in the order of one row alone, in
    whichever tile shape T and K pick (tiles over a block, K tails of 1 to 7 columns); the GEMM
    sums each output along k whatever tile the row falls in."""
    x, w, _, bias = problem(T, K, N, wtype, 5)
    together = run(x, w, bias, isa, kernel)
    alone = np.concatenate([run(x[t:t + 1], w, bias, isa, kernel) for t in range(T)])
    assert np.array_equal(together, alone)


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("T, K, N", [(13, 768, 70), (40, 203, 37), (5, 8224, 3), (32, 3072, 50), (64, 100, 8),
                                     (8, 1000, 21), (200, 20, 19)])
@pytest.mark.parametrize("wtype", ["float32", "bfloat16"])
def test_a_model_decodes_with_its_decode_kernel_bits(isa, T, K, N, wtype):
    """What a model on path isa decodes with gives the bits of the decode kernel it names
    (decode_kernel): on Zen 4 the AVX-512 paths run the AVX2 kernel's tiles in zmm registers, which
    must sum every element as its ymm tiles do (these shapes take tiles: x past L1, spans or none,
    tails). Elsewhere a path decodes with its own kernel, and this only checks that it says so."""
    x, w, _, bias = problem(T, K, N, wtype, 8)
    kernel = _core.decode_kernel(isa, wtype)
    assert np.array_equal(run(x, w, bias, isa, "decode"), run(x, w, bias, kernel, "matvec"))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_thread_count_does_not_change_a_kernel_bit(isa, kernel):
    x, w, _, bias = problem(11, 300, 203, "bfloat16", 6)
    one = run(x, w, bias, isa, kernel, threads=1)
    for threads in (2, 3, 5):
        assert np.array_equal(one, run(x, w, bias, isa, kernel, threads=threads))


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
def test_gelu_new_of_a_value_does_not_depend_on_where_it_lies(isa):
    """A step's MLP activations are one array of every row: a row's values must come out the
    same whatever rows come before it (every offset modulo the widest vector, 16)."""
    row = (np.random.default_rng(4).standard_normal(100) * 2).astype(np.float32)
    alone = row.copy()
    _core.gelu_new(alone, 1, isa)
    for before in range(17):
        y = np.concatenate([np.ones(before, np.float32), row])
        _core.gelu_new(y, 1, isa)
        assert np.array_equal(y[before:], alone), before


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


def cpu_kind_from_cpuinfo() -> str:
    """The CPU kind as /proc/cpuinfo tells it (the core reads CPUID): AMD without AVX-512 is
    measured as Zen 3, AMD with it as Zen 4."""
    with open("/proc/cpuinfo") as f:
        first_cpu = f.read().split("\n\n")[0]
    fields = {key.strip(): value.strip() for key, _, value in
              (line.partition(":") for line in first_cpu.splitlines())}
    avx512 = {"avx512f", "avx512bw", "avx512vl"} <= set(fields.get("flags", "").split())
    return {"GenuineIntel": "intel", "AuthenticAMD": "amd-zen4" if avx512 else "amd-zen3"}.get(
        fields.get("vendor_id"), "other")


def test_decode_prefetch_and_kernel_are_chosen_by_the_cpu_kind():
    """Each choice was measured on its kind of CPU and loses on another (csrc/internal.h,
    csrc/matmul.c, csrc/attention.c). AMD Zen 3 prefetches non-temporally. Zen 4 does too where
    the AVX2 kernel takes tiles (int8: from 3 rows); into L2 for its groups of rows (int8: 1-2)
    and for one row 4096 columns long or more; not at all for one shorter bf16 or fp32 row.
    Zen 4 decodes bf16 and fp32 weights on the AVX-512 paths with the AVX2 kernel, decodes in
    bf16 in the bf16 compute mode, and fetches a decode row's attention values alongside its
    keys; Intel prefetches into L2 and fetches attention rows ahead. The portable paths leave
    prefetching to the hardware."""
    kind = cpu_kind_from_cpuinfo()
    assert _core.cpu_kind() == kind
    simd_paths = ("avx2", "avx512", "avx512bf16", "amx")
    for isa in ISAS:
        for dtype in _core.DTYPES:
            for rows, cols in itertools.product((1, 2, 3, 4, 8), (768, 4095, 4096)):
                if isa not in simd_paths or kind == "other":
                    expected = "none"
                elif kind == "amd-zen4" and dtype == "int8":
                    expected = "l2-far" if rows <= 2 else "nta-near"
                elif kind == "amd-zen4" and rows == 1:
                    expected = "none" if cols < 4096 else "l2-far"
                elif kind == "amd-zen4":  # the AVX2 kernel's groups, x within 24 KiB; its tiles
                    expected = "l2-far" if rows <= 3 or rows * cols * 4 <= 24 << 10 else "nta-near"
                else:
                    expected = {"amd-zen3": "nta-near", "intel": "l2-far"}[kind]
                assert _core.decode_prefetch(isa, dtype, rows, cols) == expected, (isa, dtype, rows, cols)
            on_avx512 = isa in ("avx512", "avx512bf16", "amx")
            avx2_instead = on_avx512 and kind == "amd-zen4" and dtype != "int8"
            own = "avx512" if on_avx512 else isa
            assert _core.decode_kernel(isa, dtype) == ("avx2" if avx2_instead else own), (isa, dtype)
        assert _core.bf16_decodes(isa) == (isa in ("avx512bf16", "amx", "scalar") and kind == "amd-zen4"), isa
        fetch = {"amd-zen4": "values-with-keys", "intel": "ahead"}.get(kind, "none") if isa in simd_paths else "none"
        assert _core.attention_fetch(isa) == fetch, isa
    for probe in (lambda: _core.decode_kernel("avx1024", "bfloat16"), lambda: _core.bf16_decodes("avx1024"),
                  lambda: _core.decode_prefetch("avx1024", "int8", 1, 768), lambda: _core.attention_fetch("avx1024")):
        with pytest.raises(ValueError, match="unknown kernel path"):
            probe()
    with pytest.raises(ValueError, match="dtype must be one of"):
        _core.decode_prefetch("avx2", "float16", 1, 768)
    for rows, cols in ((0, 768), (1, 0)):
        with pytest.raises(ValueError, match="rows and cols must be at least 1"):
            _core.decode_prefetch("avx2", "bfloat16", rows, cols)


def test_the_prefetch_summary_names_each_row_length_its_way(monkeypatch):
    """What info and bench print for one sequence: one way, or each row length's; in the bf16
    mode's own decode kernel, the non-temporal hint wherever the exact kernels prefetch at all."""
    config = GPTNeoConfig(hidden_size=2048, num_layers=24, num_heads=16, intermediate_size=8192,
                          vocab_size=50257, max_position_embeddings=2048, window_size=256,
                          attention_layers=("global", "local") * 12, layer_norm_epsilon=1e-5)
    monkeypatch.setattr(neocore.model._core, "decode_prefetch",
                        lambda isa, dtype, rows, cols: "l2-far" if cols >= 4096 else "none")
    monkeypatch.setattr(neocore.model._core, "bf16_decodes", lambda isa: True)
    assert decode_prefetch("avx512", "bfloat16", config) == \
        "none for 2048-column rows, l2-far for 8192-column rows"
    assert decode_prefetch("avx512", "bfloat16", config, "bf16") == \
        "none for 2048-column rows, nta-near for 8192-column rows"
    assert decode_prefetch("avx512", "bfloat16", replace(config, intermediate_size=2048)) == "none"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("T", [1, 2, 5, 9])
def test_projections_in_one_pass_equal_each_matrix_alone(isa, T):
    """matvec_projections (q, k and v in one parallel region) splits the blocks of several
    matrices over the threads together: each output must still be what the matrix gives alone,
    whatever the matrices' sizes and weight types, past the three the driver holds at once."""
    from neocore.weights import quantize_i8
    rng = np.random.default_rng(T)
    K = 200
    x = rng.standard_normal((T, K)).astype(np.float32)
    sizes = [5, 768, 33, 1, 47]
    matrices = [rng.standard_normal((N, K)).astype(np.float32) for N in sizes]
    weights = [matrices[0], f32_to_bf16(matrices[1])[0], quantize_i8(matrices[2]), matrices[3],
               f32_to_bf16(matrices[4])[0]]
    biases = [rng.standard_normal(N).astype(np.float32) if i % 2 else None for i, N in enumerate(sizes)]
    for accumulate in (False, True):
        start = [rng.standard_normal((T, N)).astype(np.float32) for N in sizes]
        alone = [s.copy() for s in start]
        for out, w, b in zip(alone, weights, biases):
            _core.matmul(out, x, w, b, accumulate, 2, isa, "matvec")
        for threads in (1, 2, 3):
            together = [s.copy() for s in start]
            _core.matvec_projections(together, x, weights, biases, accumulate, threads, isa)
            for i, (a, b) in enumerate(zip(together, alone)):
                assert np.array_equal(a, b), (i, threads, accumulate)


def ending_at_a_guard_page(array: np.ndarray) -> np.ndarray:
    """A copy of array whose last byte lies just before a page that may not be read, as the
    end of a mapped checkpoint file can: a kernel that reads past a matrix then faults."""
    import ctypes
    import mmap
    page = mmap.PAGESIZE
    data_pages = -(-array.nbytes // page)
    buffer = mmap.mmap(-1, (data_pages + 1) * page)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    PROT_NONE = 0  # <sys/mman.h>; Python's mmap module does not export it
    assert libc.mprotect(base + data_pages * page, page, PROT_NONE) == 0, ctypes.get_errno()
    guarded = np.frombuffer(buffer, array.dtype, array.size, data_pages * page - array.nbytes).reshape(array.shape)
    guarded[...] = array
    return guarded


GUARDED_KERNELS = [(isa, kernel) for isa in PATHS for kernel in KERNELS] + \
                  [(isa, kernel) for isa in ("amx", "avx512bf16", "scalar") if _core.isa_runs_here(isa)
                   for kernel in ("bf16", "bf16-matvec")]


@pytest.mark.parametrize("isa, kernel", GUARDED_KERNELS)
@pytest.mark.parametrize("wtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("T, K, N", [(1, 770, 45), (5, 100, 45), (9, 768, 17), (37, 201, 45)])
def test_kernels_read_nothing_past_the_last_weight_row(isa, kernel, wtype, T, K, N):
    """Weights are mapped files: the last matrix's last row (and an int8 one's last scale) ends
    at a page that may not be read here, and every path still gives numpy's product."""
    from neocore.weights import Int8Matrix, quantize_i8
    rng = np.random.default_rng(T + K + N)
    x = rng.standard_normal((T, K)).astype(np.float32)
    w32 = rng.standard_normal((N, K)).astype(np.float32)
    if wtype == "int8":
        q = quantize_i8(w32)
        w = Int8Matrix(ending_at_a_guard_page(q.values), ending_at_a_guard_page(q.scales))
        w32 = q.values.astype(np.float32) * np.repeat(q.scales, _core.I8_BLOCK, axis=1)[:, :K]
    else:
        w = ending_at_a_guard_page(f32_to_bf16(w32)[0] if wtype == "bfloat16" else w32)
        w32 = bf16_to_f32(w) if wtype == "bfloat16" else w32
    out = np.zeros((T, N), np.float32)
    _core.matmul(out, x, w, None, False, 2, isa, kernel)
    # bf16 kernels round x and w to bf16: checked exactly elsewhere; here the bound is theirs
    tolerance = 2e-2 if kernel.startswith("bf16") else 1e-5
    np.testing.assert_allclose(out, x.astype(np.float64) @ w32.T.astype(np.float64), rtol=tolerance,
                               atol=tolerance * np.sqrt(K))
