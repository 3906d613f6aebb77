"""The C core under AddressSanitizer and UndefinedBehaviorSanitizer: tests/native/forward_check.c
(every matmul kernel of a path at three widths, one of them odd, then a prefill and four decode
steps of a tiny model) built with both sanitizers, on each path this CPU runs, with fp32 and
int8 weights and in the bf16 compute mode. Any out-of-bounds access, use after free or undefined
behaviour aborts the run.
(Not the Python extension: Python itself is not built with the sanitizers.)"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from neocore import _core

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REPO = Path(__file__).resolve().parent.parent
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
# -O0: the kernels' loops are checked as written, and the build takes seconds, not a minute
FLAGS = ["-O0", "-fopenmp", "-fno-math-errno", *SANITIZE]


@pytest.fixture(scope="module")
def sanitized(tmp_path_factory) -> Path:
    if shutil.which("gcc") is None:
        if IN_CI:
            pytest.fail("gcc is not installed")
        pytest.skip("gcc is not installed")
    binary = tmp_path_factory.mktemp("sanitized") / "forward_check"
    sources = [str(REPO / "tests" / "native" / "forward_check.c")] + sorted(str(p) for p in (REPO / "csrc").glob("*.c"))
    subprocess.run(["gcc", *FLAGS, "-I", str(REPO / "csrc"), *sources, "-o", str(binary), "-lm"],
                   check=True, timeout=300)
    return binary


def paths_for(mode: str) -> list:
    """The paths forward_check runs in mode on this CPU: bf16 runs the bf16 GEMMs (AMX,
    AVX512-BF16, the scalar reference), the others the exact kernel paths."""
    usable = _core.usable_isas()  # fastest first, then the scalar one
    if mode == "bf16":
        return [isa for isa in usable if isa in _core.BF16_GEMMS]
    return [isa for isa in usable if isa not in _core.BF16_GEMMS or isa == "scalar"]


@pytest.mark.parametrize("mode", ["fp32", "int8", "bf16"])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_core_runs_clean_under_the_sanitizers(sanitized, threads, mode):
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0", "UBSAN_OPTIONS": "print_stacktrace=1"}
    for isa in paths_for(mode):
        command = [str(sanitized), isa, str(threads)] + ([mode] if mode != "fp32" else [])
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0 and "runtime error" not in done.stderr, f"{isa}: {done.stderr[-3000:]}"
        assert len(done.stdout.split()) > 100  # the logits were printed
