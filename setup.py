"""Builds neocore's one native extension: the C core in csrc/ behind neocore/_core.pyx.

Portable by design: no -march=native. The AVX2+FMA kernels are compiled with per-function
target attributes and chosen at run time; -ffast-math is never used (it changes results and
would set flush-to-zero for the whole Python process)."""
import glob

from Cython.Build import cythonize
from setuptools import Extension, setup

core = Extension(
    "neocore._core",
    sources=["neocore/_core.pyx"] + sorted(glob.glob("csrc/*.c")),
    include_dirs=["csrc"],
    depends=sorted(glob.glob("csrc/*.h")),
    extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno", "-Wall"],
    extra_link_args=["-fopenmp"],
)

setup(ext_modules=cythonize([core], compiler_directives={"language_level": 3}))
