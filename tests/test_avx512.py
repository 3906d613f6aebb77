"""The AVX-512 path. Its logic is checked on any x86 CPU by building the C core with every
intrinsic taken from SIMDe (portable C; -DNEOCORE_SIMDE) and running tests/native/forward_check.c
on it: each row computed as if alone, logits as the scalar reference gives them, the same bits
with any thread count. On a CPU with AVX-512F/BW/VL the path also runs for real."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import neocore
from neocore import _core

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REPO = Path(__file__).resolve().parent.parent
SIMDE_HEADER = Path("/usr/include/simde/x86/avx512.h")
# -O1: the check is of the logic, and SIMDe's headers compile slowly at -O3
FLAGS = ["-O1", "-fopenmp", "-fno-math-errno", "-Wall", "-Werror", "-Wno-psabi", "-DNEOCORE_SIMDE",
         "-I", str(REPO / "tests" / "native")]  # bf16_emulated.h: what SIMDe lacks


@pytest.fixture(scope="module")
def simde_build(tmp_path_factory) -> Path:
    if platform.machine() != "x86_64":
        pytest.skip("the AVX-512 kernels are x86-64 code")
    if not SIMDE_HEADER.is_file() or shutil.which("gcc") is None:
        if IN_CI:
            pytest.fail("SIMDe (Debian libsimde-dev) or gcc is not installed")
        pytest.skip("SIMDe (Debian libsimde-dev) or gcc is not installed")
    binary = tmp_path_factory.mktemp("simde") / "forward_check_simde"
    sources = [str(REPO / "tests" / "native" / "forward_check.c")] + sorted(str(p) for p in (REPO / "csrc").glob("*.c"))
    subprocess.run(["gcc", *FLAGS, "-I", str(REPO / "csrc"), *sources, "-o", str(binary), "-lm"], check=True, timeout=180)
    return binary

VOCAB = 301  # forward_check.c's model: it prints the prompt's logits, then each decoded token's

def logits(binary: Path, isa: str, threads: int, *mode: str) -> np.ndarray:
    proc = subprocess.run([str(binary), isa, str(threads), *mode], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr  # exit 3: a row's result depended on the other rows
    return np.array(proc.stdout.split(), dtype=np.float64)


def test_avx512_kernels_on_simde_match_the_scalar_reference(simde_build):
    avx512, scalar = logits(simde_build, "avx512", 2), logits(simde_build, "scalar", 2)
    assert np.isfinite(avx512).all() and avx512.std() > 0.1
    assert np.abs(avx512 - scalar).max() <= 1e-5 * np.abs(scalar).max() + 1e-5
    assert np.array_equal(avx512, logits(simde_build, "avx512", 1))
    assert np.array_equal(avx512, logits(simde_build, "avx512", 3))


def test_avx512_int8_kernels_on_simde_match_the_scalar_reference(simde_build):
    """Every matrix int8: the AVX-512 decode kernel's own widening (sign extension, conversion,
    the block's scale) and the GEMM's panels, row by row (exit 3) and through a whole model."""
    avx512, scalar = logits(simde_build, "avx512", 2, "int8"), logits(simde_build, "scalar", 2, "int8")
    assert np.isfinite(avx512).all() and avx512.std() > 0.1
    assert np.abs(avx512 - scalar).max() <= 1e-5 * np.abs(scalar).max() + 1e-5
    assert not np.array_equal(scalar, logits(simde_build, "scalar", 2))  # the weights did change
    assert np.array_equal(avx512, logits(simde_build, "avx512", 1, "int8"))
    assert np.array_equal(avx512, logits(simde_build, "avx512", 3, "int8"))


@pytest.mark.parametrize("isa", ["avx512bf16", "amx"])
def test_bf16_gemms_on_simde_match_the_scalar_bf16_reference(simde_build, isa):
    """The AMX tiles emulated in C (tests/native/bf16_emulated.h), VDPBF16PS from SIMDe: the
    layouts and loops of both bf16 GEMMs and of the bf16 decode kernel, row by row (exit 3) and
    through a whole model. The prompt's logits (the first row printed) come from the GEMMs
    alone and agree to fp32 summation order; the decoded tokens' drift further (an activation
    one summation order apart may round to the neighbouring bf16 value, and the next layers
    carry it on: 0.1% of the logit range seen here), where a wrong layout would be off by the
    logits' own size."""
    ours, reference = (logits(simde_build, path, 2, "bf16").reshape(-1, VOCAB) for path in (isa, "scalar"))
    assert np.isfinite(ours).all() and ours.std() > 0.1
    assert np.abs(ours[0] - reference[0]).max() <= 1e-5 * np.abs(reference[0]).max() + 1e-5
    assert np.abs(ours - reference).max() <= 0.01 * (reference.max() - reference.min())
    assert not np.array_equal(reference.ravel(), logits(simde_build, "scalar", 2))  # bf16 is not exact
    assert np.array_equal(ours.ravel(), logits(simde_build, isa, 1, "bf16"))
    assert np.array_equal(ours.ravel(), logits(simde_build, isa, 3, "bf16"))


@pytest.mark.skipif(not _core.cpu_has_avx512(), reason="this CPU cannot run the avx512 path (it needs AVX-512F/BW/VL)")
def test_avx512_path_runs_here_and_matches_transformers(reference_models, logits_close):
    """The kernel and parity tests already run on every usable path; this one says so by name."""
    ref = reference_models("wide-heads")
    ids = np.random.default_rng(2).integers(0, ref.config["vocab_size"], 70).tolist()
    model = neocore.load(ref.folder, isa="avx512", threads=2)
    assert model.isa == "avx512"
    logits_close(model.logits(ids), ref.logits(ids))


def test_auto_picks_the_fastest_path_this_cpu_runs(monkeypatch):
    from neocore.model import kernel_path
    monkeypatch.delenv("NEOCORE_ISA", raising=False)
    expected = ("amx" if _core.cpu_has_amx_bf16() else "avx512bf16" if _core.cpu_has_avx512_bf16()
                else "avx512" if _core.cpu_has_avx512() else "avx2" if _core.cpu_has_avx2_fma() else "generic")
    assert kernel_path() == expected
    if not _core.cpu_has_avx512():
        with pytest.raises(neocore.NeocoreError, match="AVX-512F/BW/VL"):
            kernel_path("avx512")
