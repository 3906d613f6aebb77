"""The C core built for aarch64 gives the logits the x86 build gives.

tests/native/forward_check.c runs a tiny random model through neo_step (a prefill and four
decode steps) and prints its logits. It is compiled here with the host compiler and with
gcc-aarch64-linux-gnu, and the aarch64 binary runs under qemu-user: this is the portable path
as an ARM machine (Graviton, Ampere, Apple silicon under Linux) builds it, NEON and all."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REPO = Path(__file__).resolve().parent.parent

CROSS_GCC = "aarch64-linux-gnu-gcc"
QEMU = "qemu-aarch64"
SYSROOT = "/usr/aarch64-linux-gnu"
FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-Wall", "-Werror"]  # setup.py's, warnings fatal


@pytest.fixture(scope="module")
def binaries(tmp_path_factory) -> dict:
    missing = [tool for tool in ("gcc", CROSS_GCC, QEMU) if shutil.which(tool) is None]
    if missing:
        message = f"{', '.join(missing)} not installed (Debian: gcc-aarch64-linux-gnu qemu-user)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    out = tmp_path_factory.mktemp("native")
    sources = [str(REPO / "tests" / "native" / "forward_check.c")] + sorted(str(p) for p in (REPO / "csrc").glob("*.c"))
    built = {}
    for arch, compiler in (("x86", "gcc"), ("aarch64", CROSS_GCC)):
        built[arch] = out / f"forward_check_{arch}"
        subprocess.run([compiler, *FLAGS, "-I", str(REPO / "csrc"), *sources, "-o", str(built[arch]), "-lm"],
                       check=True, timeout=120)
    return built


def logits(binaries: dict, arch: str, isa: str, threads: int) -> np.ndarray:
    command = [str(binaries[arch]), isa, str(threads)]
    if arch == "aarch64":
        command = [QEMU, "-L", SYSROOT] + command
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    values = np.array(proc.stdout.split(), dtype=np.float64).reshape(5, -1)  # last prompt row + 4 decoded
    assert np.isfinite(values).all() and values.std() > 0.1
    return values


def test_aarch64_build_is_really_aarch64(binaries):
    assert b"\x7fELF" == binaries["aarch64"].read_bytes()[:4]
    assert int.from_bytes(binaries["aarch64"].read_bytes()[18:20], "little") == 183  # EM_AARCH64


@pytest.mark.parametrize("isa", ["generic", "scalar"])
def test_aarch64_logits_match_x86(binaries, isa):
    """Same model, same path: equal but for rounding (aarch64 fuses multiply-adds)."""
    x86, arm = logits(binaries, "x86", isa, 2), logits(binaries, "aarch64", isa, 2)
    assert np.abs(arm - x86).max() <= 1e-5 * np.abs(x86).max() + 1e-5


def test_aarch64_portable_path_matches_its_scalar_reference_and_ignores_threads(binaries):
    generic = logits(binaries, "aarch64", "generic", 1)
    assert np.abs(generic - logits(binaries, "aarch64", "scalar", 1)).max() <= 1e-5 * np.abs(generic).max() + 1e-5
    assert np.array_equal(generic, logits(binaries, "aarch64", "generic", 3))
