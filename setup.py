"""Builds neocore's one native extension: the C core in csrc/ behind neocore/_core.pyx.

Portable by design: no -march=native. The AVX2+FMA kernels are compiled with per-function
target attributes and chosen at run time; -ffast-math is never used (it changes results and
would set flush-to-zero for the whole Python process). OpenMP is used when the compiler can
compile and link it; otherwise (Apple's clang, clang without libomp) the build is
single-threaded rather than failing."""
import glob
import os
import sys
import tempfile

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP_PROBE = "#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n"


def compiler_has_openmp(compiler) -> bool:
    """Compiles and links a program that calls the OpenMP runtime, its errors kept off the log."""
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.c")
        with open(source, "w") as f:
            f.write(OPENMP_PROBE)
        saved_stderr = os.dup(2)
        try:
            with open(os.devnull, "w") as devnull:
                os.dup2(devnull.fileno(), 2)
                objects = compiler.compile([source], output_dir=tmp, extra_postargs=["-fopenmp"])
                compiler.link_executable(objects, "probe", output_dir=tmp, extra_postargs=["-fopenmp"])
            return True
        except Exception:  # CompileError, LinkError, or a compiler that is not there at all
            return False
        finally:
            os.dup2(saved_stderr, 2)
            os.close(saved_stderr)


class BuildExt(build_ext):
    def build_extensions(self):
        if compiler_has_openmp(self.compiler):
            for ext in self.extensions:
                ext.extra_compile_args.append("-fopenmp")
                ext.extra_link_args.append("-fopenmp")
        else:
            print("warning: neocore: the C compiler cannot build with OpenMP (-fopenmp); building "
                  "single-threaded", file=sys.stderr)
        super().build_extensions()


core = Extension(
    "neocore._core",
    sources=["neocore/_core.pyx"] + sorted(glob.glob("csrc/*.c")),
    include_dirs=["csrc"],
    depends=sorted(glob.glob("csrc/*.h")),
    extra_compile_args=["-O3", "-fno-math-errno", "-Wall"],
)

setup(ext_modules=cythonize([core], compiler_directives={"language_level": 3}),
      cmdclass={"build_ext": BuildExt})
