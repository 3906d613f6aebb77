"""The bf16 compute mode: its prefill GEMMs (AMX tiles, AVX512-BF16, and the scalar reference
that runs everywhere) against float64 products of the bf16-rounded operands (torch rounds),
against each other, row by row and across thread counts; and whole models in the mode against
transformers fp32. The hardware paths run where this CPU has them; the logic of both is also
checked on any x86 CPU through the SIMDe build (tests/test_avx512.py)."""
from __future__ import annotations

import numpy as np
import pytest

import neocore
import neocore.model
from neocore import _core
from neocore.weights import f32_to_bf16, quantize_i8

from neocore.model import ISA_NEEDS

torch = pytest.importorskip("torch")  # none for Python 3.9: skipped there (conftest: an error in CI)

# The hardware paths, skipped (saying what is missing) on CPUs without them; then the reference.
HARDWARE = [pytest.param(isa, marks=pytest.mark.skipif(not _core.isa_runs_here(isa),
                                                        reason=f"this CPU cannot run the {isa} path (it needs {ISA_NEEDS[isa]})"))
            for isa in ("amx", "avx512bf16")]
BF16_PATHS = HARDWARE + ["scalar"]
HAS_BF16_HARDWARE = any(_core.isa_runs_here(isa) for isa in ("amx", "avx512bf16"))


def bf16_round(a: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(a)).to(torch.bfloat16).double().numpy()


def problem(T, K, N, wtype, seed):
    """x, w as the kernel takes it, w's values in fp32 (an int8 one's value * its block's scale,
    computed here), and a bias."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, K)).astype(np.float32)
    w32 = rng.standard_normal((N, K)).astype(np.float32)
    if wtype == "bfloat16":
        w = f32_to_bf16(w32)[0]
    elif wtype == "int8":
        w = quantize_i8(w32)
        w32 = w.values.astype(np.float32) * np.repeat(w.scales, _core.I8_BLOCK, axis=1)[:, :K]
    else:
        w = w32
    return x, w, w32, rng.standard_normal(N).astype(np.float32)


def run(x, w, bias, isa, threads=2, out=None, accumulate=False, kernel="bf16"):
    out = np.zeros((x.shape[0], w.shape[0]), np.float32) if out is None else out
    _core.matmul(out, x, w, bias, accumulate, threads, isa, kernel)
    return out


# the prompt GEMM ("bf16") and the decode kernel ("bf16-matvec", rows of x up to a server's step)
KERNEL_SHAPES = [("bf16", T, K, N) for T, K, N in [(1, 32, 1), (2, 36, 5), (17, 64, 33), (33, 100, 50),
                                                   (40, 768, 70), (128, 96, 17)]] + \
                [("bf16-matvec", T, K, N) for T, K, N in [(1, 32, 1), (1, 100, 37), (3, 36, 5), (4, 256, 33),
                                                          (5, 200, 17), (9, 768, 70), (16, 3072, 9)]]


@pytest.mark.parametrize("isa", BF16_PATHS)
@pytest.mark.parametrize("kernel, T, K, N", KERNEL_SHAPES)
@pytest.mark.parametrize("wtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("accumulate", [False, True])
def test_bf16_kernels_are_the_product_of_the_rounded_operands(isa, kernel, T, K, N, wtype, accumulate):
    x, w, w32, bias = problem(T, K, N, wtype, T * 1000 + K + N)
    out = np.random.default_rng(1).standard_normal((T, N)).astype(np.float32)
    # fp32 and int8 weights are rounded to bf16 too; bf16 ones are unchanged by it
    expected = bf16_round(x) @ bf16_round(w32).T + bias + (out if accumulate else 0)
    run(x, w, bias, isa, out=out, accumulate=accumulate, kernel=kernel)
    # fp32 sums in another order than float64's: the only difference allowed
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.sqrt(K))


@pytest.mark.parametrize("isa", BF16_PATHS)
@pytest.mark.parametrize("T, K", [(9, 200), (32, 3072)])
def test_bf16_decode_rows_are_computed_as_if_alone_at_any_thread_count(isa, T, K):
    """A server's step holds the decode rows of whoever is running: each row's result must be
    what it is alone (both loop orders of matvec_bf16_block, by the size of x), bit for bit."""
    x, w, _, bias = problem(T, K, 45, "bfloat16", 11)
    together = run(x, w, bias, isa, kernel="bf16-matvec")
    alone = [run(x[t:t + 1], w, bias, isa, threads=1, kernel="bf16-matvec") for t in range(T)]
    assert np.array_equal(together, np.concatenate(alone))
    assert np.array_equal(together, run(x, w, bias, isa, threads=3, kernel="bf16-matvec"))


def test_bf16_gemm_rounds_activations_unlike_the_exact_gemm():
    """Not the exact GEMM under another name: the result moves by the rounding of x."""
    x, w, w32, bias = problem(9, 200, 45, "bfloat16", 3)
    exact = np.zeros((9, 45), np.float32)
    _core.matmul(exact, x, w, bias, False, 2, "scalar", "gemm")
    moved = np.abs(run(x, w, bias, "scalar") - exact).max()
    assert 1e-4 < moved < 0.1 * np.abs(exact).max()


@pytest.mark.parametrize("isa", HARDWARE)
def test_bf16_paths_agree_with_the_scalar_reference(isa):
    x, w, _, bias = problem(45, 200, 77, "bfloat16", 0)
    np.testing.assert_allclose(run(x, w, bias, isa), run(x, w, bias, "scalar"), rtol=2e-6, atol=2e-5)


@pytest.mark.parametrize("isa", BF16_PATHS)
@pytest.mark.parametrize("T, K, N", [(7, 100, 37), (37, 768, 70)])
def test_a_row_is_computed_as_if_alone_in_bf16(isa, T, K, N):
    x, w, _, bias = problem(T, K, N, "bfloat16", 5)
    together = run(x, w, bias, isa)
    alone = np.concatenate([run(x[t:t + 1], w, bias, isa) for t in range(T)])
    assert np.array_equal(together, alone)


@pytest.mark.parametrize("isa", BF16_PATHS)
def test_thread_count_does_not_change_a_bf16_bit(isa):
    x, w, _, bias = problem(50, 320, 203, "bfloat16", 6)
    one = run(x, w, bias, isa, threads=1)
    for threads in (2, 3, 5):
        assert np.array_equal(one, run(x, w, bias, isa, threads=threads))


@pytest.mark.parametrize("isa", BF16_PATHS)
def test_whole_model_in_bf16_tracks_transformers_fp32(isa, reference_models):
    """The issue's bounds: logits within 2% of the logit range, the same top-1 token on >= 99%
    of positions, over 300 tokens (past the 256-token local window), at transformers' default
    weight scale (the larger scale of the other test shapes is chaotic: tiny roundings flip
    near-one-hot attention, so no lossy mode could be judged on it)."""
    ref = reference_models("default-init")
    ids = np.random.default_rng(7).integers(0, ref.config["vocab_size"], 300).tolist()
    model = neocore.load(ref.folder, isa=isa, compute="bf16", threads=2)
    assert model.compute == "bf16"
    ours, theirs = model.logits(ids), ref.logits(ids)
    span = theirs.max() - theirs.min()
    assert np.abs(ours - theirs).max() <= 0.02 * span
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.99
    exact = neocore.load(ref.folder, isa=isa, threads=2).logits(ids)
    assert not np.array_equal(ours, exact)  # the mode did change the arithmetic


@pytest.mark.parametrize("isa", HARDWARE)
def test_whole_model_on_bf16_hardware_matches_the_reference_path(isa, reference_models):
    """Through a whole model the paths drift apart by more than their kernels do (1e-5 above):
    an activation whose fp32 value moved by one summation order may round to the neighbouring
    bf16 value, which the next layers carry on. Measured on a Xeon (AMX): 0.0039 at most, about
    0.15% of the logit range, what each path is from fp32 as well. A wrong tile
    layout or a lost block would be off by the logits' own size."""
    ref = reference_models("default-init")
    ids = np.random.default_rng(8).integers(0, ref.config["vocab_size"], 100).tolist()
    ours = neocore.load(ref.folder, isa=isa, compute="bf16", threads=2).logits(ids)
    oracle = neocore.load(ref.folder, isa="scalar", compute="bf16", threads=2).logits(ids)
    assert np.abs(ours - oracle).max() <= 0.01 * (oracle.max() - oracle.min())


@pytest.mark.parametrize("isa", BF16_PATHS)
def test_decode_in_bf16_tracks_transformers_fp32(isa, reference_models):
    """Decoded tokens go through the bf16 decode kernel where it is the faster (bf16_decodes:
    AMD Zen 4, on every path there, the scalar oracle too), else through the exact one; either
    way they attend over keys and values rounded to bf16, as the mode's cache holds them. One
    token at a time past the local window, the logits keep the issue's bounds against
    transformers fp32 and differ from the exact mode's. On the scalar path decoding in bf16, a
    token decoded alone gets the very logits it gets inside a prompt (both sum every product of
    rounded operands in index order, over the same rounded keys and values); where decode's
    matmuls stay exact, it does not."""
    ref = reference_models("default-init")
    ids = np.random.default_rng(9).integers(0, ref.config["vocab_size"], 270).tolist()
    model = neocore.load(ref.folder, isa=isa, compute="bf16", threads=2)
    model.reset()
    ours = np.stack([model.append([t]).copy() for t in ids])
    theirs = ref.logits(ids)
    assert np.abs(ours - theirs).max() <= 0.02 * (theirs.max() - theirs.min())
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.99
    exact = neocore.load(ref.folder, isa=isa, threads=2)
    exact.reset()
    assert not np.array_equal(ours, np.stack([exact.append([t]).copy() for t in ids]))
    if isa == "scalar":  # and where decode's matmuls stay exact, the two differ
        assert np.array_equal(ours, model.logits(ids)) == _core.bf16_decodes(isa)


@pytest.mark.parametrize("isa", BF16_PATHS)
def test_a_bf16_key_reads_the_same_fresh_or_cached(isa, reference_models):
    """The mode's cache holds keys and values in bf16, and a step rounds its own the same way
    before its attention reads them: a prompt fed in other chunks of several rows (a chunk's
    queries see the earlier chunks from the cache, its own rows fresh) gets the very same
    logits, across the local window. (The last row of a step takes its logits from the
    decode kernel, which sums in another order on the hardware paths: those rows are left out.)"""
    ref = reference_models("default-init")
    ids = np.random.default_rng(10).integers(0, ref.config["vocab_size"], 300).tolist()
    model = neocore.load(ref.folder, isa=isa, compute="bf16", threads=2)

    def fed_in(cuts: list[int]) -> np.ndarray:
        model.reset()
        return np.concatenate([model.append(ids[a:b], all_logits=True) for a, b in zip(cuts, cuts[1:])])

    halves, pieces = [0, 150, 300], [0, 137, 139, 229, 280, 300]  # 280: the local ring has wrapped
    inside = np.ones(len(ids), bool)
    inside[[cut - 1 for cut in halves[1:] + pieces[1:]]] = False
    assert np.array_equal(fed_in(halves)[inside], fed_in(pieces)[inside])


def test_bf16_without_bf16_hardware_computes_exactly_and_says_so_once(reference_models, monkeypatch, capfd):
    monkeypatch.setattr(neocore.model, "_told_bf16_runs_exact", False)
    ref = reference_models("tiny")
    ids = list(range(5, 40))
    exact = neocore.load(ref.folder, isa="generic", threads=2).logits(ids)
    for _ in range(2):
        model = neocore.load(ref.folder, isa="generic", compute="bf16", threads=2)
        assert model.compute == "exact"
        assert np.array_equal(model.logits(ids), exact)
    err = capfd.readouterr().err
    assert err.count("compute=bf16 needs AMX or AVX512-BF16") == 1


def test_unknown_compute_mode_is_refused(reference_models):
    with pytest.raises(neocore.NeocoreError, match="compute must be one of exact, bf16"):
        neocore.load(reference_models("tiny").folder, compute="fp8")


def test_cli_info_shows_the_compute_mode_and_its_cache(reference_models, capsys):
    """The mode, and what a token of key/value cache takes in it: keys and values of every
    layer, hidden_size values each, 4 bytes (fp32) or 2 (bf16); a full sequence's local layers
    keep their window only."""
    from neocore.cli import main
    ref = reference_models("window256")
    cfg = ref.config
    per_token = 2 * cfg["num_layers"] * cfg["hidden_size"]
    full = 2 * cfg["hidden_size"] * (cfg["max_position_embeddings"] + cfg["window_size"])  # global, local
    for compute in ("exact", "bf16"):
        assert main(["info", "-m", str(ref.folder), "--compute", compute]) == 0
        lines = dict(l.split(":", 1) for l in capsys.readouterr().out.splitlines())
        line = lines["compute"].strip()
        if compute == "exact" or not HAS_BF16_HARDWARE:
            assert line.split()[0] == "exact"
            value_bytes, dtype = 4, "float32"
        else:
            if _core.bf16_decodes(neocore.model.kernel_path()):
                assert "bf16 (matmuls in bf16: prompts on " in line and "decode on AVX512-BF16" in line
            else:
                assert "bf16 (prompt matmuls in bf16 on " in line and "decode's matmuls exact" in line
            value_bytes, dtype = 2, "bfloat16"
        assert lines["key/value cache"].split(",")[:3] == [
            f" {dtype}", f" {per_token * value_bytes / 1024:g} KiB a token",
            f" {full * value_bytes / 2**20:.1f} MiB a full sequence (taken as positions are written"]
