"""Build palm_fast: the Python package, the Triton sources (installed as
``palm_fast.kernels``), the benchmark suite (installed as ``palm_fast.benchmarks``)
and the C++ CPU kernels (``palm_fast._C``).

The C++ extension is CPU-only (the GPU path is Triton), so it builds on a machine
without CUDA.  Build with ``pip install --no-build-isolation -e .`` after torch is
installed, so the extension is compiled against the torch you run.
"""
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cxx_flags():
    flags = ["-O3", "-fopenmp", "-std=c++17"]
    # Vectorise for the machine that builds (CI and users build where they run);
    # PALM_FAST_PORTABLE=1 gives a portable binary.
    if os.environ.get("PALM_FAST_PORTABLE", "0") != "1":
        flags.append("-march=native")
    return flags


ext = CppExtension(
    name="palm_fast._C",
    sources=sorted(glob.glob(os.path.join("csrc", "*.cpp"))),
    include_dirs=[os.path.join(ROOT, "csrc")],
    extra_compile_args={"cxx": _cxx_flags()},
    extra_link_args=["-fopenmp"],
)

setup(
    packages=[
        "palm_fast",
        "palm_fast.reference",
        "palm_fast.ops",
        "palm_fast.nn",
        "palm_fast.fusion",
        "palm_fast.kernels",
        "palm_fast.benchmarks",
    ],
    package_dir={
        "palm_fast": "palm_fast",
        "palm_fast.kernels": "kernels",
        "palm_fast.benchmarks": "benchmarks",
    },
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
